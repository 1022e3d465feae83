// geomx-pslite: ps-lite's Environment, settings that take precedence over the process's
// environment variables (passed to gxps_start).
#ifndef GEOMX_PSLITE_PS_INTERNAL_ENV_H_
#define GEOMX_PSLITE_PS_INTERNAL_ENV_H_

#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace ps {

/// Settings that take precedence over environment variables of the same name.
class Environment {
 public:
  /// The process-wide instance.
  static Environment* Get() { return Instance(); }
  /// Sets the process-wide instance's settings.
  static Environment* Init(const std::unordered_map<std::string, std::string>& envs) {
    Environment* e = Instance();
    std::lock_guard<std::mutex> lk(e->mu_);
    e->kvs_ = envs;
    return e;
  }
  /// The value of `k`: a setting, else the environment variable, else NULL.
  const char* find(const char* k) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = kvs_.find(k);
    return it == kvs_.end() ? std::getenv(k) : it->second.c_str();
  }
  /// The settings as (name, value) C strings, for gxps_start; valid while unchanged.
  std::vector<const char*> pairs() {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<const char*> out;
    for (const auto& kv : kvs_) {
      out.push_back(kv.first.c_str());
      out.push_back(kv.second.c_str());
    }
    return out;
  }

 private:
  static Environment* Instance() {
    static Environment e;
    return &e;
  }
  std::mutex mu_;
  std::unordered_map<std::string, std::string> kvs_;
};

}  // namespace ps

#endif  // GEOMX_PSLITE_PS_INTERNAL_ENV_H_
