// The loopback floor for bench/run.sh: the same three operations as pslite_bench.cc over one
// plain blocking TCP connection between two processes, no library at all. push: SIZE bytes out,
// an 8-byte answer back; pull: 8 bytes out, SIZE bytes back; pushpull: SIZE bytes each way.
// Args: bytes repeats. Prints RESULT lines in pslite_bench.cc's format.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {
void Fail(const char* what) {
  std::perror(what);
  std::exit(1);
}
void ReadAll(int fd, char* p, size_t n) {
  while (n) {
    ssize_t r = recv(fd, p, n, 0);
    if (r <= 0) Fail("recv");
    p += r;
    n -= static_cast<size_t>(r);
  }
}
void WriteAll(int fd, const char* p, size_t n) {
  while (n) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r <= 0) Fail("send");
    p += r;
    n -= static_cast<size_t>(r);
  }
}
void NoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}
// op 0 push, 1 pull, 2 pushpull: what each side sends per round.
size_t Up(int op, size_t bytes) { return op == 1 ? 8 : bytes; }
size_t Down(int op, size_t bytes) { return op == 0 ? 8 : bytes; }
}  // namespace

int main(int argc, char* argv[]) {
  size_t bytes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 4096;
  int repeat = argc > 2 ? std::atoi(argv[2]) : 100;
  int l = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (l < 0 || bind(l, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(l, 1) != 0 ||
      getsockname(l, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    Fail("listen");
  }
  std::vector<char> buf(bytes + 8, 1);
  pid_t child = fork();
  if (child < 0) Fail("fork");
  if (child == 0) {  // the server: answers every round, warm-up included
    int fd = accept(l, nullptr, nullptr);
    if (fd < 0) Fail("accept");
    NoDelay(fd);
    ReadAll(fd, buf.data(), bytes);
    WriteAll(fd, buf.data(), 8);
    for (int op = 0; op < 3; ++op) {
      for (int i = 0; i < repeat; ++i) {
        ReadAll(fd, buf.data(), Up(op, bytes));
        WriteAll(fd, buf.data(), Down(op, bytes));
      }
    }
    return 0;
  }
  close(l);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) Fail("connect");
  NoDelay(fd);
  WriteAll(fd, buf.data(), bytes);  // warm-up
  ReadAll(fd, buf.data(), 8);
  const char* names[3] = {"push", "pull", "pushpull"};
  for (int op = 0; op < 3; ++op) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < repeat; ++i) {
      WriteAll(fd, buf.data(), Up(op, bytes));
      ReadAll(fd, buf.data(), Down(op, bytes));
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double moved = static_cast<double>(bytes) * repeat * (op == 2 ? 2 : 1);
    std::printf("RESULT op=%s bytes=%zu latency_us=%.1f goodput_GBps=%.3f\n", names[op], bytes,
                s / repeat * 1e6, moved / s / 1e9);
  }
  close(fd);
  int status = 0;
  waitpid(child, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
