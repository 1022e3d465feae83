// geomx-pslite: ps-lite's key-value apps. KVWorker pushes and pulls (key, value) lists sliced by
// the servers' key ranges; KVServer answers them through a request handler.
//
// Threads: callbacks (a Push / Pull `cb`, the server's request handler) run on geomx's threads,
// one at a time per app. Bad input (keys / lens length mismatch, unsorted keys, a key outside
// every server's range, NULL outputs, calls before Start) throws ps::Error from the call.
#ifndef GEOMX_PSLITE_PS_KV_APP_H_
#define GEOMX_PSLITE_PS_KV_APP_H_

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ps/base.h"
#include "ps/simple_app.h"
#include "ps/sarray.h"

namespace ps {

/// A list of (key, value) pairs; values per key are equal in number, or given by lens.
template <typename Val>
struct KVPairs {
  /// Keys, sorted ascending.
  SArray<Key> keys;
  /// Values.
  SArray<Val> vals;
  /// Values per key (optional).
  SArray<int> lens;
  /// Unused (ps-lite's priority).
  int priority = 0;
};

/// What a server's request handler learns about a request.
struct KVMeta {
  /// The request's command.
  int cmd;
  /// Whether it pushes values.
  bool push;
  /// Whether it pulls values.
  bool pull;
  /// The requesting node id.
  int sender;
  /// The request's timestamp.
  int timestamp;
  /// The requesting worker's customer id.
  int customer_id;
};

namespace detail {
/// The array behind an SArray or std::vector (resize + data).
template <typename C>
inline typename C::value_type* Data(C* c) {
  return c->data();
}
/// Shares received memory as an SArray (no copy): `holder` keeps the buffer alive.
template <typename T>
inline SArray<T> Share(const void* p, size_t n, const std::shared_ptr<gxps_buffer>& holder) {
  SArray<T> a;
  if (n) a.reset(static_cast<T*>(const_cast<void*>(p)), n, [holder](T*) {});
  return a;
}
/// A pulled result into an SArray: shares the memory when it is one piece and `out` is empty.
template <typename T>
inline bool TakeWhole(SArray<T>* out, const SArray<T>& piece) {
  if (!out->empty()) return false;
  *out = piece;
  return true;
}
/// std::vector outputs always copy.
template <typename T>
inline bool TakeWhole(std::vector<T>*, const SArray<T>&) {
  return false;
}
/// Releases a response's values kept alive for gxps_respond_keep.
template <typename V>
void ReleaseShared(void* keep) {
  delete static_cast<std::shared_ptr<V>*>(keep);
}
}  // namespace detail

/// A worker's key-value app: Push / Pull / PushPull to the servers.
template <typename Val>
class KVWorker : public SimpleApp {
 public:
  /// Runs when a request's last response arrived.
  using Callback = std::function<void()>;
  /// Splits a request among the servers (ps-lite's slicer type; the default one is used).
  using SlicedKVs = std::vector<std::pair<bool, KVPairs<Val>>>;

  /// The worker app (app_id, customer_id); call after Start(customer_id).
  explicit KVWorker(int app_id, int customer_id) : SimpleApp() {
    Open(app_id, customer_id, true);
  }
  virtual ~KVWorker() { Close(); }

  /// Pushes `vals` (lens[i] values of keys[i], or the same number per key) to the servers.
  int Push(const std::vector<Key>& keys, const std::vector<Val>& vals,
           const std::vector<int>& lens = {}, int cmd = 0, const Callback& cb = nullptr,
           int priority = 0) {
    (void)priority;
    return Send(true, false, cmd, keys.data(), keys.size(), vals.data(), vals.size(),
                lens.data(), lens.size(), Finisher(cb));
  }
  /// Pulls the values of `keys` into `vals` (and their counts into `lens`).
  int Pull(const std::vector<Key>& keys, std::vector<Val>* vals, std::vector<int>* lens = nullptr,
           int cmd = 0, const Callback& cb = nullptr, int priority = 0) {
    (void)priority;
    return PullInto(false, keys.data(), keys.size(), nullptr, 0, nullptr, 0, vals, lens, cmd, cb);
  }
  /// Pushes `vals` and pulls the resulting values into `outs`.
  int PushPull(const std::vector<Key>& keys, const std::vector<Val>& vals,
               std::vector<Val>* outs, std::vector<int>* lens = nullptr, int cmd = 0,
               const Callback& cb = nullptr, int priority = 0) {
    (void)priority;
    return PullInto(true, keys.data(), keys.size(), vals.data(), vals.size(), nullptr, 0, outs,
                    lens, cmd, cb);
  }
  /// Zero-copy Push.
  int ZPush(const SArray<Key>& keys, const SArray<Val>& vals, const SArray<int>& lens = {},
            int cmd = 0, const Callback& cb = nullptr, int priority = 0) {
    (void)priority;
    return Send(true, false, cmd, keys.data(), keys.size(), vals.data(), vals.size(),
                lens.data(), lens.size(), Finisher(cb));
  }
  /// Zero-copy Pull (`vals` empty: it shares the received memory when one server answered).
  int ZPull(const SArray<Key>& keys, SArray<Val>* vals, SArray<int>* lens = nullptr, int cmd = 0,
            const Callback& cb = nullptr, int priority = 0) {
    (void)priority;
    return PullInto(false, keys.data(), keys.size(), nullptr, 0, nullptr, 0, vals, lens, cmd, cb);
  }
  /// Zero-copy PushPull.
  int ZPushPull(const SArray<Key>& keys, const SArray<Val>& vals, SArray<Val>* outs,
                SArray<int>* lens = nullptr, int cmd = 0, const Callback& cb = nullptr,
                int priority = 0) {
    (void)priority;
    return PullInto(true, keys.data(), keys.size(), vals.data(), vals.size(), nullptr, 0, outs,
                    lens, cmd, cb);
  }
  /// Blocks until the request `timestamp` finished (its callback ran); throws ps::Error if it
  /// failed.
  void Wait(int timestamp) { SimpleApp::Wait(timestamp); }

 protected:
  void Process(const gxps_message& m) override {
    if (m.simple_app) {
      SimpleApp::Process(m);
      return;
    }
    std::shared_ptr<gxps_buffer> holder(m.buffer, gxps_buffer_free);
    if (m.request) return;  // workers serve no KV requests
    int code = m.status;
    std::string why = m.error ? m.error : "";
    if (code == 0 && m.pull) {
      if (m.vals_bytes % sizeof(Val) != 0) {
        code = GXPS_E_PROTOCOL;
        why = "a pull response's values are not whole values";
      } else {
        KVPairs<Val> kv;
        kv.keys = detail::Share<Key>(m.keys, m.num_keys, holder);
        kv.vals = detail::Share<Val>(m.vals, m.vals_bytes / sizeof(Val), holder);
        kv.lens = detail::Share<int>(m.lens, m.num_lens, holder);
        std::lock_guard<std::mutex> lk(recv_mu_);
        recv_kvs_[m.timestamp].push_back(kv);
      }
    }
    AddResponse(m.timestamp, code, why.c_str());
  }

 private:
  Done Finisher(const Callback& cb) {
    if (!cb) return nullptr;
    return [cb](int) { cb(); };
  }

  /// Slices (keys, vals, lens) by the servers' key ranges and sends one request per server.
  int Send(bool push, bool pull, int cmd, const Key* keys, size_t nkeys, const Val* vals,
           size_t nvals, const int* lens, size_t nlens, const Done& done) {
    if ((nkeys && !keys) || (nvals && !vals) || (nlens && !lens)) {
      throw Error("ps::KVWorker: a NULL array with a non-zero length", GXPS_E_INVALID);
    }
    if (nlens != 0 && nlens != nkeys) {
      throw Error("ps::KVWorker: " + std::to_string(nkeys) + " keys but " +
                      std::to_string(nlens) + " lens",
                  GXPS_E_INVALID);
    }
    std::vector<size_t> voff(nkeys + 1, 0);
    if (nlens) {
      for (size_t i = 0; i < nkeys; ++i) {
        if (lens[i] < 0) throw Error("ps::KVWorker: a negative len", GXPS_E_INVALID);
        voff[i + 1] = voff[i] + static_cast<size_t>(lens[i]);
      }
      if (push && voff[nkeys] != nvals) {
        throw Error("ps::KVWorker: lens sum to " + std::to_string(voff[nkeys]) + " values but " +
                        std::to_string(nvals) + " were given",
                    GXPS_E_INVALID);
      }
    } else if (push && nkeys) {
      if (nvals % nkeys != 0) {
        throw Error("ps::KVWorker: " + std::to_string(nvals) + " values do not divide among " +
                        std::to_string(nkeys) + " keys",
                    GXPS_E_INVALID);
      }
      size_t k = nvals / nkeys;
      for (size_t i = 0; i < nkeys; ++i) voff[i + 1] = voff[i] + k;
    } else if (push && nvals) {
      throw Error("ps::KVWorker: values for no key", GXPS_E_INVALID);
    }
    for (size_t i = 1; i < nkeys; ++i) {
      if (keys[i] <= keys[i - 1]) {
        throw Error("ps::KVWorker: keys must be unique and sorted ascending", GXPS_E_INVALID);
      }
    }
    const std::vector<Range>& ranges = Postoffice::Get()->GetServerKeyRanges();
    if (nkeys && (ranges.empty() || keys[nkeys - 1] >= ranges.back().end())) {
      throw Error("ps::KVWorker: key " + std::to_string(keys[nkeys - 1]) +
                      " is outside every server's key range",
                  GXPS_E_KEY_RANGE);
    }
    std::vector<size_t> pos(ranges.size() + 1, 0);
    int pieces = 0;
    for (size_t i = 0; i < ranges.size(); ++i) {
      pos[i + 1] = static_cast<size_t>(std::lower_bound(keys, keys + nkeys, ranges[i].end()) - keys);
      if (pos[i + 1] > pos[i]) ++pieces;
    }
    int ts = NewRequest(pieces, done);
    if (pieces == 0) {
      if (done) done(ts);
      return ts;
    }
    int left = pieces;
    for (size_t i = 0; i < ranges.size(); ++i) {
      size_t b = pos[i], e = pos[i + 1];
      if (e == b) continue;
      gxps_outgoing out;
      std::memset(&out, 0, sizeof(out));
      out.push = push;
      out.pull = pull;
      out.head = cmd;
      out.timestamp = ts;
      out.peer = Postoffice::ServerRankToID(static_cast<int>(i));
      out.urgent = done ? 1 : 0;
      out.keys = keys + b;
      out.num_keys = e - b;
      if (push) {
        out.vals = vals + voff[b];
        out.vals_bytes = (voff[e] - voff[b]) * sizeof(Val);
      }
      out.val_size = sizeof(Val);
      if (nlens) {
        out.lens = lens + b;
        out.num_lens = e - b;
      }
      SendOrFail(out, ts, left--);
    }
    return ts;
  }

  /// Push (with `push`) and pull into `vals` / `lens` (std::vector or SArray).
  template <typename C, typename D>
  int PullInto(bool push, const Key* keys, size_t nkeys, const Val* pvals, size_t npvals,
               const int* plens, size_t nplens, C* vals, D* lens, int cmd, const Callback& cb) {
    if (vals == nullptr) throw Error("ps::KVWorker: the output vals is NULL", GXPS_E_INVALID);
    Done done = [this, nkeys, vals, lens, cb](int ts) {
      std::vector<KVPairs<Val>> kvs;
      {
        std::lock_guard<std::mutex> lk(recv_mu_);
        auto it = recv_kvs_.find(ts);
        if (it != recv_kvs_.end()) {
          kvs.swap(it->second);
          recv_kvs_.erase(it);
        }
      }
      Assemble(kvs, nkeys, vals, lens);
      if (cb) cb();
    };
    return Send(push, true, cmd, keys, nkeys, pvals, npvals, plens, nplens, done);
  }

  /// Joins the servers' answers in key order into `vals` / `lens`.
  template <typename C, typename D>
  static void Assemble(std::vector<KVPairs<Val>>& kvs, size_t nkeys, C* vals, D* lens) {
    std::sort(kvs.begin(), kvs.end(), [](const KVPairs<Val>& a, const KVPairs<Val>& b) {
      return a.keys.size() && b.keys.size() && a.keys[0] < b.keys[0];
    });
    size_t total_key = 0, total_val = 0;
    for (const auto& s : kvs) {
      total_key += s.keys.size();
      total_val += s.vals.size();
    }
    if (total_key != nkeys) {
      throw Error("pull of " + std::to_string(nkeys) + " keys got " + std::to_string(total_key) +
                      " keys back",
                  GXPS_E_REMOTE);
    }
    if (kvs.size() == 1 && detail::TakeWhole(vals, kvs[0].vals)) {
      // shared the received memory
    } else {
      if (vals->empty()) {
        vals->resize(total_val);
      } else if (vals->size() != total_val) {
        throw Error("pull output has " + std::to_string(vals->size()) + " values, " +
                        std::to_string(total_val) + " arrived",
                    GXPS_E_INVALID);
      }
      Val* p = detail::Data(vals);
      for (const auto& s : kvs) {
        if (s.vals.size()) std::memcpy(p, s.vals.data(), s.vals.size() * sizeof(Val));
        p += s.vals.size();
      }
    }
    if (lens) {
      if (lens->empty()) {
        lens->resize(total_key);
      } else if (lens->size() != total_key) {
        throw Error("pull output lens has the wrong size", GXPS_E_INVALID);
      }
      int* q = detail::Data(lens);
      for (const auto& s : kvs) {
        if (s.lens.size() == s.keys.size()) {
          if (s.lens.size()) std::memcpy(q, s.lens.data(), s.lens.size() * sizeof(int));
        } else {
          size_t k = s.keys.size() ? s.vals.size() / s.keys.size() : 0;
          for (size_t i = 0; i < s.keys.size(); ++i) q[i] = static_cast<int>(k);
        }
        q += s.keys.size();
      }
    }
  }

  std::mutex recv_mu_;
  std::unordered_map<int, std::vector<KVPairs<Val>>> recv_kvs_;
};

/// A server's key-value app: its request handler answers pushes and pulls.
template <typename Val>
class KVServer : public SimpleApp {
 public:
  /// Handles one request; must call Response (now or later) exactly once.
  using ReqHandle = std::function<void(const KVMeta& req_meta, const KVPairs<Val>& req_data,
                                       KVServer* server)>;

  /// The server app `app_id`; requests wait until set_request_handle.
  explicit KVServer(int app_id) : SimpleApp() { Open(app_id, app_id, false); }
  virtual ~KVServer() { Close(); }

  /// Sets the handler and starts serving.
  void set_request_handle(const ReqHandle& request_handle) {
    CHECK(request_handle) << "invalid request handle";
    {
      std::lock_guard<std::mutex> lk(kv_mu_);
      request_handle_ = std::make_shared<ReqHandle>(request_handle);
    }
    Activate();
  }
  /// Answers request `req` with `res` (pulled keys and values; empty for a push).
  void Response(const KVMeta& req, const KVPairs<Val>& res = KVPairs<Val>()) {
    gxps_outgoing out;
    std::memset(&out, 0, sizeof(out));
    out.push = req.push;
    out.pull = req.pull;
    out.head = req.cmd;
    out.timestamp = req.timestamp;
    out.peer = req.sender;
    out.peer_customer_id = req.customer_id;
    out.keys = res.keys.data();
    out.num_keys = res.keys.size();
    out.vals = res.vals.data();
    out.vals_bytes = res.vals.size() * sizeof(Val);
    out.val_size = sizeof(Val);
    out.lens = res.lens.data();
    out.num_lens = res.lens.size();
    if (res.keys.size() == 1 && !res.vals.empty()) {
      // As ps-lite hands its SArray to ZeroMQ: the values go out without a copy, kept alive by
      // a reference until sent, so they must not be changed in place before then.
      auto* keep = new std::shared_ptr<Val>(res.vals.ptr());
      detail::Check(gxps_respond_keep(handle_, &out, keep, &detail::ReleaseShared<Val>),
                    "ps::KVServer::Response");
      return;
    }
    detail::Check(gxps_respond(handle_, &out), "ps::KVServer::Response");
  }

 protected:
  void Process(const gxps_message& m) override {
    if (m.simple_app) {
      SimpleApp::Process(m);
      return;
    }
    std::shared_ptr<gxps_buffer> holder(m.buffer, gxps_buffer_free);
    if (!m.request) return;
    if (m.vals_bytes % sizeof(Val) != 0) {
      throw Error("a request's values are not whole values of this server's type",
                  GXPS_E_PROTOCOL);
    }
    KVMeta meta;
    meta.cmd = m.head;
    meta.push = m.push != 0;
    meta.pull = m.pull != 0;
    meta.sender = m.sender;
    meta.timestamp = m.timestamp;
    meta.customer_id = m.customer_id;
    KVPairs<Val> data;
    data.keys = detail::Share<Key>(m.keys, m.num_keys, holder);
    data.vals = detail::Share<Val>(m.vals, m.vals_bytes / sizeof(Val), holder);
    data.lens = detail::Share<int>(m.lens, m.num_lens, holder);
    // The handler itself (not a copy): a stateful one such as KVServerDefaultHandle keeps its
    // state across requests.
    std::shared_ptr<ReqHandle> h;
    {
      std::lock_guard<std::mutex> lk(kv_mu_);
      h = request_handle_;
    }
    CHECK(h) << "no request handle";
    (*h)(meta, data, this);
  }

 private:
  std::mutex kv_mu_;
  std::shared_ptr<ReqHandle> request_handle_;
};

/// A handler that sums pushed values per key and returns the sums on pull.
template <typename Val>
struct KVServerDefaultHandle {
  void operator()(const KVMeta& req_meta, const KVPairs<Val>& req_data, KVServer<Val>* server) {
    size_t n = req_data.keys.size();
    KVPairs<Val> res;
    if (!req_meta.pull) {
      CHECK_EQ(n, req_data.vals.size());
    } else {
      res.keys = req_data.keys;
      res.vals.resize(n);
    }
    for (size_t i = 0; i < n; ++i) {
      Key key = req_data.keys[i];
      if (req_meta.push) store[key] += req_data.vals[i];
      if (req_meta.pull) res.vals[i] = store[key];
    }
    server->Response(req_meta, res);
  }
  /// The sums.
  std::unordered_map<Key, Val> store;
};

}  // namespace ps

#endif  // GEOMX_PSLITE_PS_KV_APP_H_
