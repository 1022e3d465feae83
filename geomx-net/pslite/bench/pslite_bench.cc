// One ps-lite program for the geomx-pslite vs ps-lite comparison (bench/run.sh builds it
// against both): one worker pushes / pulls / push+pulls one key of SIZE bytes to one server
// and prints latency and goodput per operation. Args: bytes repeats.
#include <chrono>
#include <cstdio>

#include "ps/ps.h"
using namespace ps;

struct Store {
  void operator()(const KVMeta& m, const KVPairs<float>& d, KVServer<float>* s) {
    KVPairs<float> res;
    if (m.push) val.CopyFrom(d.vals);
    if (m.pull) {
      res.keys = d.keys;
      res.vals = val;
    }
    s->Response(m, res);
  }
  SArray<float> val;
};

int main(int argc, char* argv[]) {
  size_t bytes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 4096;
  int repeat = argc > 2 ? std::atoi(argv[2]) : 100;
  Start(0);
  if (IsServer()) {
    auto* server = new KVServer<float>(0);
    server->set_request_handle(Store());
    RegisterExitCallback([server]() { delete server; });
  }
  if (IsWorker()) {
    KVWorker<float> kv(0, 0);
    SArray<Key> keys(1, 1);
    SArray<float> vals(bytes / sizeof(float), 1.0f);
    SArray<float> out(bytes / sizeof(float));
    kv.Wait(kv.ZPush(keys, vals));  // warm-up
    const char* names[3] = {"push", "pull", "pushpull"};
    for (int op = 0; op < 3; ++op) {
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < repeat; ++i) {
        if (op == 0) kv.Wait(kv.ZPush(keys, vals));
        if (op == 1) kv.Wait(kv.ZPull(keys, &out));
        if (op == 2) kv.Wait(kv.ZPushPull(keys, vals, &out));
      }
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      double moved = static_cast<double>(bytes) * repeat * (op == 2 ? 2 : 1);
      std::printf("RESULT op=%s bytes=%zu latency_us=%.1f goodput_GBps=%.3f\n", names[op], bytes,
                  s / repeat * 1e6, moved / s / 1e9);
    }
    CHECK_EQ(out.size(), vals.size());
    CHECK_EQ(out[0], 1.0f);
  }
  Finalize(0, true);
  return 0;
}
