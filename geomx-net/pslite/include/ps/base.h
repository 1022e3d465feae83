// geomx-pslite: ps-lite's basic types and node-group constants.
#ifndef GEOMX_PSLITE_PS_BASE_H_
#define GEOMX_PSLITE_PS_BASE_H_

#include <cstdint>
#include <limits>

#include "ps/internal/utils.h"

namespace ps {

/// The key type.
typedef uint64_t Key;
/// The largest key.
static const Key kMaxKey = std::numeric_limits<Key>::max();
/// The scheduler's node id, and its group bit.
static const int kScheduler = 1;
/// The group bit of all servers.
static const int kServerGroup = 2;
/// The group bit of all workers.
static const int kWorkerGroup = 4;

}  // namespace ps

#endif  // GEOMX_PSLITE_PS_BASE_H_
