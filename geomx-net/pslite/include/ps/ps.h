// geomx-pslite: ps-lite's top-level API (`#include "ps/ps.h"`), over geomx-net.
#ifndef GEOMX_PSLITE_PS_PS_H_
#define GEOMX_PSLITE_PS_PS_H_

#include <functional>
#include <thread>

#include "ps/base.h"
#include "ps/internal/env.h"
#include "ps/internal/postoffice.h"
#include "ps/kv_app.h"
#include "ps/sarray.h"
#include "ps/simple_app.h"

namespace ps {

/// Number of worker nodes.
inline int NumWorkers() { return Postoffice::Get()->num_workers(); }
/// Number of server nodes.
inline int NumServers() { return Postoffice::Get()->num_servers(); }
/// Whether this node is a worker.
inline bool IsWorker() { return Postoffice::Get()->is_worker(); }
/// Whether this node is a server.
inline bool IsServer() { return Postoffice::Get()->is_server(); }
/// Whether this node is the scheduler.
inline bool IsScheduler() { return Postoffice::Get()->is_scheduler(); }
/// This node's rank within its role.
inline int MyRank() { return Postoffice::Get()->my_rank(); }
/// Starts customer `customer_id` and waits until every node started.
inline void Start(int customer_id, const char* argv0 = nullptr) {
  Postoffice::Get()->Start(customer_id, argv0, true);
}
/// Starts customer `customer_id` without waiting for the other nodes.
inline void StartAsync(int customer_id, const char* argv0 = nullptr) {
  Postoffice::Get()->Start(customer_id, argv0, false);
}
/// Finalizes customer `customer_id` (after a barrier of all nodes with `do_barrier`).
inline void Finalize(int customer_id, const bool do_barrier = true) {
  Postoffice::Get()->Finalize(customer_id, do_barrier);
}
/// Runs `cb` after Finalize(0) stopped the node.
inline void RegisterExitCallback(const std::function<void()>& cb) {
  Postoffice::Get()->RegisterExitCallback(cb);
}

}  // namespace ps

#endif  // GEOMX_PSLITE_PS_PS_H_
