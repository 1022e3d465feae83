// geomx-pslite: ps-lite's Postoffice (the node's role, ranks, barriers, key ranges), backed by
// the C ABI (gxps_*). Queries before Start or after Finalize throw ps::Error.
#ifndef GEOMX_PSLITE_PS_INTERNAL_POSTOFFICE_H_
#define GEOMX_PSLITE_PS_INTERNAL_POSTOFFICE_H_

#include <algorithm>
#include <functional>
#include <mutex>
#include <vector>

#include "geomx_pslite.h"
#include "ps/base.h"
#include "ps/internal/env.h"
#include "ps/internal/utils.h"
#include "ps/range.h"

namespace ps {

/// The process's node: role, ranks, barriers and server key ranges.
class Postoffice {
 public:
  /// The process-wide instance.
  static Postoffice* Get() {
    static Postoffice e;
    return &e;
  }
  /// Starts customer `customer_id` (the first call starts the node); with `do_barrier`, waits
  /// until every node started.
  void Start(int customer_id, const char* argv0, const bool do_barrier) {
    (void)argv0;
    std::vector<const char*> env = Environment::Get()->pairs();
    detail::Check(gxps_start(customer_id, do_barrier ? 1 : 0, env.empty() ? nullptr : env.data(),
                             env.size() / 2),
                  "ps::Start");
  }
  /// Finalizes customer `customer_id`; customer 0 stops the node and then runs the exit
  /// callback.
  void Finalize(const int customer_id, const bool do_barrier = true) {
    detail::Check(gxps_finalize(customer_id, do_barrier ? 1 : 0), "ps::Finalize");
    if (customer_id == 0) {
      std::function<void()> cb;
      {
        std::lock_guard<std::mutex> lk(mu_);
        cb.swap(exit_callback_);
        ranges_.clear();
      }
      if (cb) cb();
    }
  }
  /// Runs `cb` after Finalize(0) stopped the node.
  void RegisterExitCallback(const std::function<void()>& cb) {
    std::lock_guard<std::mutex> lk(mu_);
    exit_callback_ = cb;
  }
  /// Blocks until every node of `node_group` (group bits) entered the barrier.
  void Barrier(int customer_id, int node_group) {
    detail::Check(gxps_barrier(customer_id, node_group), "ps::Postoffice::Barrier");
  }
  /// The node ids of a group (group bits) or the node id itself.
  std::vector<int> GetNodeIDs(int node_id) const {
    std::vector<int> ids;
    if (node_id >= 8) {
      ids.push_back(node_id);
      return ids;
    }
    if (node_id & kScheduler) ids.push_back(kScheduler);
    if (node_id & kServerGroup) {
      for (int r = 0; r < num_servers(); ++r) ids.push_back(ServerRankToID(r));
    }
    if (node_id & kWorkerGroup) {
      for (int r = 0; r < num_workers(); ++r) ids.push_back(WorkerRankToID(r));
    }
    return ids;
  }
  /// The key range of each server rank: kMaxKey split evenly, as ps-lite does.
  const std::vector<Range>& GetServerKeyRanges() {
    std::lock_guard<std::mutex> lk(mu_);
    int n = num_servers();
    if (static_cast<int>(ranges_.size()) != n) {
      ranges_.clear();
      for (int i = 0; i < n; ++i) {
        ranges_.push_back(Range(kMaxKey / n * i, kMaxKey / n * (i + 1)));
      }
    }
    return ranges_;
  }
  static inline int WorkerRankToID(int rank) { return rank * 2 + 9; }
  static inline int ServerRankToID(int rank) { return rank * 2 + 8; }
  static inline int IDtoRank(int id) { return std::max((id - 8) / 2, 0); }
  int num_servers() const { return Query(gxps_num_servers, "ps::NumServers"); }
  int num_workers() const { return Query(gxps_num_workers, "ps::NumWorkers"); }
  int my_rank() const { return Query(gxps_my_rank, "ps::MyRank"); }
  int verbose() const { return gxps_verbose(); }
  bool is_worker() const { return role() == GXPS_ROLE_WORKER; }
  bool is_server() const { return role() == GXPS_ROLE_SERVER; }
  bool is_scheduler() const { return role() == GXPS_ROLE_SCHEDULER; }
  /// geomx-pslite does not restart failed nodes.
  bool is_recovery() const { return false; }

 private:
  Postoffice() {}
  int role() const { return Query(gxps_role, "ps::Postoffice role"); }
  static int Query(int32_t (*f)(int32_t*), const char* what) {
    int32_t v = 0;
    detail::Check(f(&v), what);
    return v;
  }
  std::mutex mu_;
  std::function<void()> exit_callback_;
  std::vector<Range> ranges_;
};

}  // namespace ps

#endif  // GEOMX_PSLITE_PS_INTERNAL_POSTOFFICE_H_
