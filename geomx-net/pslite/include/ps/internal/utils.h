// geomx-pslite: ps-lite's small utilities (LL, PS_VLOG) and the error type of the ABI.
#ifndef GEOMX_PSLITE_PS_INTERNAL_UTILS_H_
#define GEOMX_PSLITE_PS_INTERNAL_UTILS_H_

#include <string>

#include "dmlc/logging.h"
#include "geomx_pslite.h"

namespace ps {

/// A failed call into geomx-pslite: code() is the GXPS_E_* code, what() says why.
class Error : public dmlc::Error {
 public:
  Error(const std::string& what, int code) : dmlc::Error(what), code_(code) {}
  /// The GXPS_E_* code.
  int code() const { return code_; }

 private:
  int code_;
};

namespace detail {
/// Throws ps::Error for a non-zero return code of a gxps_* call.
inline void Check(int rc, const char* call) {
  if (rc != GXPS_OK) {
    throw Error(std::string(call) + " failed: " + gxps_last_error(), rc);
  }
}
}  // namespace detail

}  // namespace ps

/// ps-lite's shorthand for an error-level log line.
#define LL LOG(ERROR)

#endif  // GEOMX_PSLITE_PS_INTERNAL_UTILS_H_
