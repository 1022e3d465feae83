// geomx-pslite: the logging and CHECK macros that ps-lite applications use (dmlc-core's names).
// LOG(FATAL) and a failed CHECK throw dmlc::Error (uncaught, the process terminates as with
// ps-lite); the other severities print one line to stderr.
#ifndef GEOMX_PSLITE_DMLC_LOGGING_H_
#define GEOMX_PSLITE_DMLC_LOGGING_H_

#include <ctime>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>

namespace dmlc {

/// The exception a failed CHECK or LOG(FATAL) throws.
struct Error : public std::runtime_error {
  explicit Error(const std::string& s) : std::runtime_error(s) {}
};

/// One log line, written to stderr when the statement ends.
class LogMessage {
 public:
  LogMessage(const char* file, int line) {
    std::time_t t = std::time(nullptr);
    char buf[16];
    std::tm tm_buf;
    localtime_r(&t, &tm_buf);
    std::strftime(buf, sizeof(buf), "%H:%M:%S", &tm_buf);
    os_ << "[" << buf << "] " << file << ":" << line << ": ";
  }
  ~LogMessage() {
    os_ << '\n';
    std::cerr << os_.str() << std::flush;
  }
  std::ostringstream& stream() { return os_; }

 private:
  std::ostringstream os_;
};

/// A fatal log line: throws dmlc::Error with the message when the statement ends.
class LogMessageFatal {
 public:
  LogMessageFatal(const char* file, int line) { os_ << "[" << file << ":" << line << "] "; }
  ~LogMessageFatal() noexcept(false) { throw Error(os_.str()); }
  std::ostringstream& stream() { return os_; }

 private:
  std::ostringstream os_;
};

/// Turns a stream expression into void (for LOG_IF's conditional).
struct LogMessageVoidify {
  void operator&(std::ostream&) {}
};

#define GEOMX_DMLC_DEFINE_CHECK(name, op)                                         \
  template <typename X, typename Y>                                               \
  inline std::unique_ptr<std::string> LogCheck##name(const X& x, const Y& y) {    \
    if (x op y) return std::unique_ptr<std::string>();                            \
    std::ostringstream os;                                                        \
    os << " (" << x << " vs. " << y << ") ";                                      \
    return std::unique_ptr<std::string>(new std::string(os.str()));               \
  }
GEOMX_DMLC_DEFINE_CHECK(_LT, <)
GEOMX_DMLC_DEFINE_CHECK(_GT, >)
GEOMX_DMLC_DEFINE_CHECK(_LE, <=)
GEOMX_DMLC_DEFINE_CHECK(_GE, >=)
GEOMX_DMLC_DEFINE_CHECK(_EQ, ==)
GEOMX_DMLC_DEFINE_CHECK(_NE, !=)
#undef GEOMX_DMLC_DEFINE_CHECK

}  // namespace dmlc

#define LOG_INFO dmlc::LogMessage(__FILE__, __LINE__)
#define LOG_ERROR LOG_INFO
#define LOG_WARNING LOG_INFO
#define LOG_FATAL dmlc::LogMessageFatal(__FILE__, __LINE__)
#define LOG_QFATAL LOG_FATAL
#define LOG(severity) LOG_##severity.stream()
#define LG LOG(INFO)
#define LOG_IF(severity, condition) \
  !(condition) ? (void)0 : dmlc::LogMessageVoidify() & LOG(severity)

#define CHECK(x) \
  if (!(x)) dmlc::LogMessageFatal(__FILE__, __LINE__).stream() << "Check failed: " #x << ' '
#define CHECK_BINARY_OP(name, op, x, y)                                        \
  if (std::unique_ptr<std::string> _geomx_check_err = dmlc::LogCheck##name(x, y)) \
  dmlc::LogMessageFatal(__FILE__, __LINE__).stream()                           \
      << "Check failed: " #x " " #op " " #y << *_geomx_check_err
#define CHECK_LT(x, y) CHECK_BINARY_OP(_LT, <, x, y)
#define CHECK_GT(x, y) CHECK_BINARY_OP(_GT, >, x, y)
#define CHECK_LE(x, y) CHECK_BINARY_OP(_LE, <=, x, y)
#define CHECK_GE(x, y) CHECK_BINARY_OP(_GE, >=, x, y)
#define CHECK_EQ(x, y) CHECK_BINARY_OP(_EQ, ==, x, y)
#define CHECK_NE(x, y) CHECK_BINARY_OP(_NE, !=, x, y)
#define CHECK_NOTNULL(x)                                                                   \
  ((x) == nullptr ? (dmlc::LogMessageFatal(__FILE__, __LINE__).stream() << "Check notnull: " #x, \
                     (x))                                                                   \
                  : (x))

#define DCHECK(x) CHECK(x)
#define DCHECK_LT(x, y) CHECK_LT(x, y)
#define DCHECK_GT(x, y) CHECK_GT(x, y)
#define DCHECK_LE(x, y) CHECK_LE(x, y)
#define DCHECK_GE(x, y) CHECK_GE(x, y)
#define DCHECK_EQ(x, y) CHECK_EQ(x, y)
#define DCHECK_NE(x, y) CHECK_NE(x, y)

#endif  // GEOMX_PSLITE_DMLC_LOGGING_H_
