// geomx-pslite: ps-lite's SimpleApp (requests with an int head and a string body) and the
// request tracking that KVWorker / KVServer share.
//
// Threads: handlers and callbacks run on geomx's threads (see geomx_pslite.h), one at a time
// per app, as with ps-lite's one receive thread per customer. An exception a handler throws is
// reported to the requester (its Wait throws ps::Error) instead of crossing into geomx.
#ifndef GEOMX_PSLITE_PS_SIMPLE_APP_H_
#define GEOMX_PSLITE_PS_SIMPLE_APP_H_

#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "geomx_pslite.h"
#include "ps/internal/postoffice.h"
#include "ps/internal/utils.h"

namespace ps {

/// A SimpleApp request or response.
struct SimpleData {
  int head;
  std::string body;
  int sender;
  int timestamp;
  int customer_id;
};

/// An app of (app_id, customer_id) that sends int heads with string bodies.
class SimpleApp {
 public:
  /// Handles a request or a response.
  using Handle = std::function<void(const SimpleData& recved, SimpleApp* app)>;

  /// Creates the app; its handlers run once set_request_handle (or Request) was called, so a
  /// request that arrives in between waits instead of meeting the default handler.
  SimpleApp(int app_id, int customer_id) : SimpleApp() { Open(app_id, customer_id, false); }
  virtual ~SimpleApp() { Close(); }

  /// Sends (head, body) to `recv_id` (a node id or group bits); returns the timestamp.
  virtual inline int Request(int req_head, const std::string& req_body, int recv_id) {
    Activate();
    std::vector<int> ids = Postoffice::Get()->GetNodeIDs(recv_id);
    int ts = NewRequest(static_cast<int>(ids.size()), nullptr);
    for (size_t i = 0; i < ids.size(); ++i) {
      gxps_outgoing out;
      std::memset(&out, 0, sizeof(out));
      out.simple_app = 1;
      out.head = req_head;
      out.timestamp = ts;
      out.peer = ids[i];
      out.body = req_body.data();
      out.body_len = req_body.size();
      SendOrFail(out, ts, static_cast<int>(ids.size() - i));
    }
    return ts;
  }
  /// Blocks until every response of `timestamp` arrived; throws ps::Error if one failed.
  virtual inline void Wait(int timestamp) {
    detail::Check(gxps_wait(handle_, timestamp), "ps::Wait");
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return tracker_.find(timestamp) == tracker_.end(); });
    auto f = failed_.find(timestamp);
    if (f != failed_.end()) {
      std::pair<int, std::string> e = f->second;
      failed_.erase(f);
      throw Error("request " + std::to_string(timestamp) + " failed: " + e.second, e.first);
    }
  }
  /// Answers a request with `res_body`.
  virtual inline void Response(const SimpleData& recv_req, const std::string& res_body = "") {
    gxps_outgoing out;
    std::memset(&out, 0, sizeof(out));
    out.simple_app = 1;
    out.head = recv_req.head;
    out.timestamp = recv_req.timestamp;
    out.peer = recv_req.sender;
    out.peer_customer_id = recv_req.customer_id;
    out.body = res_body.data();
    out.body_len = res_body.size();
    detail::Check(gxps_respond(handle_, &out), "ps::SimpleApp::Response");
  }
  /// Sets the request handler (the default answers with an empty body).
  virtual inline void set_request_handle(const Handle& request_handle) {
    CHECK(request_handle) << "invalid request handle";
    {
      std::lock_guard<std::mutex> lk(handle_mu_);
      request_handle_ = std::make_shared<Handle>(request_handle);
    }
    Activate();
  }
  /// Sets the response handler (the default does nothing).
  virtual inline void set_response_handle(const Handle& response_handle) {
    CHECK(response_handle) << "invalid response handle";
    std::lock_guard<std::mutex> lk(handle_mu_);
    response_handle_ = std::make_shared<Handle>(response_handle);
  }
  /// This app's id.
  int app_id() const { return app_id_; }
  /// This app's customer id.
  int customer_id() const { return customer_id_; }

 protected:
  /// A finished request: runs once its last response arrived (before Wait returns).
  using Done = std::function<void(int timestamp)>;

  SimpleApp()
      : request_handle_(std::make_shared<Handle>(
            [](const SimpleData& r, SimpleApp* app) { app->Response(r); })),
        response_handle_(std::make_shared<Handle>([](const SimpleData&, SimpleApp*) {})) {}

  /// Registers this app with geomx (the constructor of the most derived class calls it).
  void Open(int app_id, int customer_id, bool active) {
    app_id_ = app_id;
    customer_id_ = customer_id;
    active_ = active;
    detail::Check(gxps_customer_new(app_id, customer_id, active ? 1 : 0, &SimpleApp::Dispatch,
                                    this, &handle_),
                  "ps customer");
  }
  /// Unregisters: no handler runs after this returns (the most derived destructor calls it).
  void Close() {
    if (handle_ != 0) {
      gxps_customer_free(handle_);
      handle_ = 0;
    }
  }
  /// Lets requests reach the handler.
  void Activate() {
    std::lock_guard<std::mutex> lk(mu_);
    if (!active_) {
      detail::Check(gxps_customer_activate(handle_), "ps customer activate");
      active_ = true;
    }
  }
  /// A new timestamp expecting `responses` responses; `done` runs after the last.
  int NewRequest(int responses, const Done& done) {
    std::lock_guard<std::mutex> lk(mu_);
    int ts = next_ts_++;
    if (responses > 0) {
      Tracker& t = tracker_[ts];
      t.expected = responses;
      t.done = done;
    }
    return ts;
  }
  /// Sends one slice; on failure fails the `unsent` responses still expected and throws.
  void SendOrFail(const gxps_outgoing& out, int ts, int unsent) {
    int rc = gxps_send(handle_, &out);
    if (rc == GXPS_OK) return;
    Error e(std::string("ps send failed: ") + gxps_last_error(), rc);
    for (int i = 0; i < unsent; ++i) AddResponse(ts, rc, e.what());
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return tracker_.find(ts) == tracker_.end(); });
    failed_.erase(ts);
    throw e;
  }
  /// Counts one response of `ts` (`code` non-zero: it failed); runs `done` after the last.
  void AddResponse(int ts, int code, const char* why) {
    Done done;
    bool failed = false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = tracker_.find(ts);
      if (it == tracker_.end()) return;
      if (code != 0 && !it->second.code) {
        it->second.code = code;
        it->second.why = why ? why : "unknown error";
      }
      if (++it->second.received < it->second.expected) return;
      done.swap(it->second.done);
      failed = it->second.code != 0;
      if (failed) failed_[ts] = std::make_pair(it->second.code, it->second.why);
    }
    std::string late;
    if (done && !failed) {
      try {
        done(ts);
      } catch (const std::exception& ex) {
        late = ex.what();
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!late.empty()) failed_[ts] = std::make_pair(int(GXPS_E_INVALID), late);
      tracker_.erase(ts);
    }
    cv_.notify_all();
  }
  /// Handles one received message (on a geomx thread); KV apps override it.
  virtual void Process(const gxps_message& m) {
    SimpleData d;
    d.head = m.head;
    d.body.assign(m.body ? m.body : "", m.body_len);
    d.sender = m.sender;
    d.timestamp = m.timestamp;
    d.customer_id = m.customer_id;
    gxps_buffer_free(m.buffer);
    if (m.request) {
      std::shared_ptr<Handle> h;
      {
        std::lock_guard<std::mutex> lk(handle_mu_);
        h = request_handle_;
      }
      (*h)(d, this);
    } else {
      int code = m.status;
      std::string why = m.error ? m.error : "";
      if (code == 0) {
        std::shared_ptr<Handle> h;
        {
          std::lock_guard<std::mutex> lk(handle_mu_);
          h = response_handle_;
        }
        try {
          (*h)(d, this);
        } catch (const std::exception& e) {
          code = GXPS_E_INVALID;
          why = std::string("response handler threw: ") + e.what();
        }
      }
      AddResponse(m.timestamp, code, why.c_str());
    }
  }

  /// The geomx customer handle.
  uint64_t handle_ = 0;

 private:
  struct Tracker {
    int expected = 0;
    int received = 0;
    int code = 0;
    std::string why;
    Done done;
  };
  static int32_t Dispatch(void* ctx, const gxps_message* msg, char* err, size_t err_cap) {
    std::string why;
    try {
      static_cast<SimpleApp*>(ctx)->Process(*msg);
      return 0;
    } catch (const std::exception& e) {
      why = e.what();
    } catch (...) {
      why = "unknown C++ exception";
    }
    if (err_cap > 0) {
      size_t n = std::min(why.size(), err_cap - 1);
      std::memcpy(err, why.data(), n);
      err[n] = 0;
    }
    return 1;
  }

  int app_id_ = 0;
  int customer_id_ = 0;
  bool active_ = false;
  int next_ts_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<int, Tracker> tracker_;
  std::unordered_map<int, std::pair<int, std::string>> failed_;
  std::mutex handle_mu_;
  std::shared_ptr<Handle> request_handle_;
  std::shared_ptr<Handle> response_handle_;
};

}  // namespace ps

#endif  // GEOMX_PSLITE_PS_SIMPLE_APP_H_
