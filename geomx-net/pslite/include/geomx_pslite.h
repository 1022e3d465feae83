/*
 * geomx_pslite.h: the C ABI of libgeomx_pslite (geomx-net as a ps-lite transport).
 *
 * Hand-written to match geomx-net/pslite/src/ffi.rs, message.rs and error.rs; the crate's
 * `c_header` integration test compiles a C program against it and checks the struct layouts.
 *
 * Conventions:
 *  - every function returns GXPS_OK (0) or a GXPS_E_* code; gxps_last_error() then gives the
 *    reason (per thread, valid until the next failing call on that thread);
 *  - no function lets a Rust panic cross the boundary: it becomes GXPS_E_PANIC;
 *  - customer callbacks run on geomx's threads (driver threads, a customer's completer thread,
 *    or the thread inside gxps_wait), never two calls of one customer at once, and must not
 *    throw / unwind.
 */
#ifndef GEOMX_PSLITE_H_
#define GEOMX_PSLITE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GXPS_OK 0
#define GXPS_E_INVALID 1   /* a bad argument: NULL pointer, length mismatch, unknown node */
#define GXPS_E_STATE 2     /* before Start, after Finalize, or twice */
#define GXPS_E_KEY_RANGE 3 /* a key outside every server's range */
#define GXPS_E_NET 4       /* transport failure */
#define GXPS_E_ABORTED 5   /* the job was aborted */
#define GXPS_E_REMOTE 6    /* the remote side answered with an error */
#define GXPS_E_PANIC 7     /* an internal panic was caught at the boundary */
#define GXPS_E_ENV 8       /* a DMLC_* variable is missing or malformed */
#define GXPS_E_NOT_FOUND 9 /* no such customer or unanswered request */
#define GXPS_E_PROTOCOL 10 /* a peer broke the message format */

#define GXPS_ROLE_SCHEDULER 1
#define GXPS_ROLE_SERVER 2
#define GXPS_ROLE_WORKER 3

/* Owns the memory of a received message; free with gxps_buffer_free (any thread, any time). */
typedef struct gxps_buffer gxps_buffer;

/* A received message handed to a customer's callback. */
typedef struct gxps_message {
  int32_t request;     /* 1: a request to this customer; 0: a response to one of its requests */
  int32_t simple_app;  /* 1: a SimpleApp message (head + body) */
  int32_t push;        /* carries pushed values / answers a push */
  int32_t pull;        /* asks for values / answers a pull */
  int32_t head;        /* KV cmd or SimpleApp head */
  int32_t app_id;
  int32_t customer_id; /* the requesting customer's id */
  int32_t timestamp;
  int32_t sender;      /* ps-lite node id of the sender / the node that answered */
  int32_t status;      /* responses: 0, or the GXPS_E_* code of a request that failed */
  const char* error;   /* NUL-terminated reason when status != 0, else NULL */
  const uint64_t* keys;
  size_t num_keys;
  const void* vals;
  size_t vals_bytes;
  const int32_t* lens;
  size_t num_lens;     /* 0 or num_keys */
  const char* body;    /* not NUL-terminated */
  size_t body_len;
  gxps_buffer* buffer; /* the callee owns it; NULL when there is no memory */
} gxps_message;

/* An outgoing request or response. */
typedef struct gxps_outgoing {
  int32_t push;
  int32_t pull;
  int32_t simple_app;
  int32_t head;
  int32_t timestamp;        /* requests: the new timestamp; responses: the request's */
  int32_t peer;             /* requests: receiving node id; responses: KVMeta::sender */
  int32_t peer_customer_id; /* responses: KVMeta::customer_id */
  int32_t urgent;           /* requests: 1 when a callback waits on it (completes without Wait) */
  const uint64_t* keys;
  size_t num_keys;
  const void* vals;
  size_t vals_bytes;
  size_t val_size;          /* sizeof(Val) */
  const int32_t* lens;      /* NULL or num_keys entries */
  size_t num_lens;
  const char* body;
  size_t body_len;
} gxps_outgoing;

/* A customer's callback: returns 0, or non-zero with a NUL-terminated reason in err. */
typedef int32_t (*gxps_callback)(void* ctx, const gxps_message* msg, char* err, size_t err_cap);

const char* gxps_last_error(void);
const char* gxps_version(void);

/* env: env_len (name, value) pairs overriding the process environment, or NULL. */
int32_t gxps_start(int32_t customer_id, int32_t do_barrier, const char* const* env, size_t env_len);
int32_t gxps_finalize(int32_t customer_id, int32_t do_barrier);
/* group: ps-lite group bits (1 scheduler, 2 servers, 4 workers). */
int32_t gxps_barrier(int32_t customer_id, int32_t group);
int32_t gxps_role(int32_t* out);
int32_t gxps_num_servers(int32_t* out);
int32_t gxps_num_workers(int32_t* out);
int32_t gxps_verbose(void);
int32_t gxps_my_rank(int32_t* out);
int32_t gxps_my_node_id(int32_t* out);

int32_t gxps_customer_new(int32_t app_id, int32_t customer_id, int32_t active, gxps_callback cb,
                          void* ctx, uint64_t* out);
int32_t gxps_customer_activate(uint64_t handle);
int32_t gxps_customer_free(uint64_t handle);
int32_t gxps_send(uint64_t handle, const gxps_outgoing* msg);
int32_t gxps_wait(uint64_t handle, int32_t timestamp);
int32_t gxps_respond(uint64_t handle, const gxps_outgoing* msg);
/* Called once to release what gxps_respond_keep's caller kept alive (on any thread). */
typedef void (*gxps_release_fn)(void* keep);
/* Like gxps_respond; msg->vals stay valid and unchanged until release(keep), which is called
   exactly once, on any thread: once they were sent, or before this returns when they were
   copied or the call failed. A one-key KV response then goes out without a copy. */
int32_t gxps_respond_keep(uint64_t handle, const gxps_outgoing* msg, void* keep,
                          gxps_release_fn release);
void gxps_buffer_free(gxps_buffer* buf);

#ifdef __cplusplus
}
#endif

#endif /* GEOMX_PSLITE_H_ */
