// geomx-pslite's own KV test: Push / Pull / PushPull with and without lens, ZPush / ZPull,
// callbacks, a cmd, and two customers (threads) per worker process when argv[1] is "2".
#include <atomic>
#include <thread>

#include "ps/ps.h"
using namespace ps;

// Sums pushes per key and value slot; answers pulls with the sums and the cmd in lens.
struct SumHandle {
  void operator()(const KVMeta& m, const KVPairs<int>& d, KVServer<int>* s) {
    size_t per = d.keys.size() ? (d.lens.size() ? 0 : d.vals.size() / d.keys.size()) : 0;
    KVPairs<int> res;
    if (m.push) {
      size_t off = 0;
      for (size_t i = 0; i < d.keys.size(); ++i) {
        size_t n = d.lens.size() ? static_cast<size_t>(d.lens[i]) : per;
        std::vector<int>& v = store[d.keys[i]];
        if (v.size() < n) v.resize(n);
        for (size_t j = 0; j < n; ++j) v[j] += d.vals[off + j];
        off += n;
      }
      CHECK_EQ(off, d.vals.size());
    }
    if (m.pull) {
      res.keys = d.keys;
      for (size_t i = 0; i < d.keys.size(); ++i) {
        const std::vector<int>& v = store[d.keys[i]];
        for (int x : v) res.vals.push_back(x + m.cmd);
        res.lens.push_back(static_cast<int>(v.size()));
      }
    }
    s->Response(m, res);
  }
  std::unordered_map<Key, std::vector<int>> store;
};

void RunWorker(int cid, int customers) {
  if (customers > 1) Start(cid);
  if (!IsWorker()) return;
  KVWorker<int> kv(0, cid);
  const int num = 257;
  const int id = MyRank() * customers + cid;  // distinct keys per customer
  std::vector<Key> keys(num);
  std::vector<int> vals(num * 2), lens(num, 2);
  for (int i = 0; i < num; ++i) {
    keys[i] = kMaxKey / num * i + id;
    vals[2 * i] = i;
    vals[2 * i + 1] = -i;
  }
  std::vector<int> ts;
  for (int r = 0; r < 5; ++r) ts.push_back(kv.Push(keys, vals, lens));
  for (int t : ts) kv.Wait(t);
  std::vector<int> out, out_lens;
  kv.Wait(kv.Pull(keys, &out, &out_lens));
  CHECK_EQ(out.size(), vals.size());
  CHECK_EQ(out_lens.size(), keys.size());
  for (int i = 0; i < num; ++i) {
    CHECK_EQ(out_lens[i], 2);
    CHECK_EQ(out[2 * i], 5 * i);
    CHECK_EQ(out[2 * i + 1], -5 * i);
  }
  // PushPull with a cmd (the handler adds it) and a callback.
  std::atomic<int> called(0);
  std::vector<int> pp;
  kv.Wait(kv.PushPull(keys, vals, &pp, nullptr, 3, [&]() { ++called; }));
  CHECK_EQ(called.load(), 1);
  for (int i = 0; i < num; ++i) CHECK_EQ(pp[2 * i], 6 * i + 3);
  // Zero-copy variants: one value per key.
  SArray<Key> zk(keys);
  SArray<int> zv(num, 7);
  kv.Wait(kv.ZPush(zk, zv));
  SArray<int> zo;
  kv.Wait(kv.ZPull(zk, &zo));
  CHECK_EQ(zo.size(), vals.size());
  CHECK_EQ(zo[0], 7);
  CHECK_EQ(zo[2 * (num - 1)], 6 * (num - 1) + 7);
  // One key with 8 MiB of values (more than a socket buffer holds): the server's response
  // goes out without a copy, kept alive by a reference until sent (gxps_respond_keep).
  {
    const size_t n = (8u << 20) / sizeof(int);
    SArray<Key> one(1, kMaxKey / num * 5 + 1000 + id);
    SArray<int> big(n);
    for (size_t j = 0; j < n; ++j) big[j] = static_cast<int>(j % 1000) - 500 + id;
    for (int r = 0; r < 2; ++r) {
      kv.Wait(kv.ZPush(one, big));
      SArray<int> got;
      kv.Wait(kv.ZPull(one, &got));
      CHECK_EQ(got.size(), n);
      for (size_t j = 0; j < n; ++j) CHECK_EQ(got[j], (r + 1) * big[j]);
    }
  }
  // A callback without Wait still runs.
  std::atomic<int> done(0);
  std::vector<int> late;
  kv.Pull(keys, &late, nullptr, 0, [&]() { done = 1; });
  while (!done.load()) std::this_thread::yield();
  CHECK_EQ(late.size(), vals.size());
  if (customers > 1) Finalize(cid, true);
}

int main(int argc, char* argv[]) {
  int customers = argc > 1 ? atoi(argv[1]) : 1;
  std::string role = std::getenv("DMLC_ROLE") ? std::getenv("DMLC_ROLE") : "";
  if (role == "worker" && customers > 1) {
    std::vector<std::thread> th;
    for (int c = 0; c < customers; ++c) th.emplace_back(RunWorker, c, customers);
    for (auto& t : th) t.join();
    return 0;
  }
  Start(0);
  CHECK(IsWorker() || IsServer() || IsScheduler());
  if (IsServer()) {
    auto* server = new KVServer<int>(0);
    server->set_request_handle(SumHandle());
    RegisterExitCallback([server]() { delete server; });
  }
  if (customers == 1) RunWorker(0, 1);
  Finalize(0, true);
  return 0;
}
