// geomx-pslite's bad-input test: each misuse throws ps::Error with a clear message and the
// right code, and the job (other keys included) keeps working. Run with 2 servers.
#include <cstring>

#include "ps/ps.h"
using namespace ps;

#define EXPECT_ERROR(want, stmt)                                                          \
  do {                                                                                    \
    bool thrown = false;                                                                  \
    try {                                                                                 \
      stmt;                                                                               \
    } catch (const ps::Error& e) {                                                        \
      thrown = true;                                                                      \
      CHECK_EQ(e.code(), want) << e.what();                                               \
      CHECK(std::strlen(e.what()) > 10) << "message too short: " << e.what();             \
      std::fprintf(stderr, "expected error (%s): %s\n", #stmt, e.what());                 \
    }                                                                                     \
    CHECK(thrown) << #stmt << " did not throw";                                           \
  } while (0)

int main() {
  // Before Start.
  EXPECT_ERROR(GXPS_E_STATE, MyRank());
  EXPECT_ERROR(GXPS_E_STATE, IsWorker());
  EXPECT_ERROR(GXPS_E_STATE, Finalize(0, false));
  // The raw ABI: NULL pointers are refused, not dereferenced.
  CHECK_EQ(gxps_role(nullptr), GXPS_E_STATE);
  CHECK_EQ(gxps_customer_new(9, 9, 1, nullptr, nullptr, nullptr), GXPS_E_INVALID);
  CHECK(std::strlen(gxps_last_error()) > 0);
  CHECK_EQ(gxps_send(12345, nullptr), GXPS_E_INVALID);
  CHECK_EQ(gxps_wait(12345, 0), GXPS_E_NOT_FOUND);
  CHECK_EQ(gxps_start(0, 0, nullptr, 3), GXPS_E_INVALID);

  Start(0);
  CHECK_EQ(gxps_role(nullptr), GXPS_E_INVALID);
  if (IsServer()) {
    auto* server = new KVServer<float>(0);
    server->set_request_handle(KVServerDefaultHandle<float>());
    RegisterExitCallback([server]() { delete server; });
  }
  if (IsWorker()) {
    KVWorker<float> kv(0, 0);
    std::vector<Key> keys = {1, kMaxKey / 2 + 1};
    std::vector<float> vals = {1, 2};
    kv.Wait(kv.Push(keys, vals));
    std::vector<float> three = {1, 2, 3};
    std::vector<int> one_len = {1};
    std::vector<float> out;
    EXPECT_ERROR(GXPS_E_INVALID, kv.Push(keys, vals, one_len));
    EXPECT_ERROR(GXPS_E_INVALID, kv.Push(keys, three));
    EXPECT_ERROR(GXPS_E_INVALID, kv.Pull(keys, nullptr));
    std::vector<Key> unsorted = {5, 1};
    EXPECT_ERROR(GXPS_E_INVALID, kv.Push(unsorted, vals));
    std::vector<Key> outside = {1, kMaxKey};
    EXPECT_ERROR(GXPS_E_KEY_RANGE, kv.Push(outside, vals));
    EXPECT_ERROR(GXPS_E_KEY_RANGE, kv.Pull(outside, &out));
    std::vector<float> wrong_size(5);
    EXPECT_ERROR(GXPS_E_INVALID, kv.Wait(kv.Pull(keys, &wrong_size)));
    // The keys pushed before are untouched by the failed calls.
    kv.Wait(kv.Pull(keys, &out));
    CHECK_EQ(out.size(), 2u);
    CHECK_EQ(out[0], 1.0f);
    CHECK_EQ(out[1], 2.0f);
  }
  Finalize(0, true);
  // After Finalize.
  EXPECT_ERROR(GXPS_E_STATE, MyRank());
  EXPECT_ERROR(GXPS_E_STATE, Postoffice::Get()->Barrier(0, kWorkerGroup));
  std::printf("bad_input ok\n");
  return 0;
}
