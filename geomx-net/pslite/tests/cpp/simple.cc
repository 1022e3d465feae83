// geomx-pslite's own SimpleApp test: requests to groups and single nodes, response bodies,
// a response handler, and group barriers.
#include <atomic>

#include "ps/ps.h"
using namespace ps;

int main() {
  Start(0);
  std::atomic<int> served(0), answered(0);
  SimpleApp app(0, 0);
  app.set_response_handle([&](const SimpleData& r, SimpleApp*) {
    CHECK_EQ(r.body, "pong:" + std::to_string(r.head));
    ++answered;
  });
  app.set_request_handle([&](const SimpleData& r, SimpleApp* a) {
    CHECK_EQ(r.body, "ping");
    ++served;
    a->Response(r, "pong:" + std::to_string(r.head));
  });
  Postoffice::Get()->Barrier(0, kScheduler + kServerGroup + kWorkerGroup);
  int everyone = 1 + NumServers() + NumWorkers();
  if (IsScheduler()) {
    std::vector<int> ts;
    for (int i = 0; i < 20; ++i) ts.push_back(app.Request(i, "ping", kScheduler + kServerGroup + kWorkerGroup));
    for (int t : ts) app.Wait(t);
    CHECK_EQ(answered.load(), 20 * everyone);
  }
  if (IsWorker()) {
    app.Wait(app.Request(5, "ping", Postoffice::ServerRankToID(0)));
    Postoffice::Get()->Barrier(0, kWorkerGroup);
  }
  // Queries fail after Finalize(0): read them now.
  int expect = 20 + (IsServer() && MyRank() == 0 ? NumWorkers() : 0);
  Finalize(0, true);
  CHECK_EQ(served.load(), expect);
  return 0;
}
