//! The C ABI (`include/geomx_pslite.h`). Every entry point catches panics and returns a
//! `GXPS_E_*` code; the message of the last failure on the calling thread is `gxps_last_error()`.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::customer::{self, Callback};
use crate::error::{PsError, Result, GXPS_E_PANIC, GXPS_OK};
use crate::keep::{Keeper, ReleaseFn};
use crate::message::{GxOutgoing, RecvBuffer};
use crate::node;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(text: &str) {
    let c = CString::new(text.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs an entry point: its error (or a caught panic) becomes a code and the thread's message.
fn guard(f: impl FnOnce() -> Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => GXPS_OK,
        Ok(Err(e)) => {
            set_error(&format!("geomx-pslite: {e}"));
            e.code()
        }
        Err(p) => {
            set_error(&format!(
                "geomx-pslite: {}",
                PsError::Panic(panic_text(p.as_ref()))
            ));
            GXPS_E_PANIC
        }
    }
}

/// Writes `v` through `out`, rejecting NULL.
///
/// # Safety
/// `out` must be NULL or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, v: T, name: &str) -> Result<()> {
    if out.is_null() {
        return Err(PsError::Invalid(format!("{name} is NULL")));
    }
    // SAFETY: non-null, and valid for writes per this function's contract.
    unsafe { out.write(v) };
    Ok(())
}

/// The message of the last call that failed on this thread (empty if none failed yet). Valid
/// until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn gxps_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library version, e.g. `"0.1.0"`.
#[no_mangle]
pub extern "C" fn gxps_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// Starts this process's node (first call) and registers customer `customer_id` with the
/// scheduler; blocks until every node registered, and with `do_barrier` until every node started.
///
/// `env` lists `env_len` pairs of NUL-terminated strings (name, value) that take precedence over
/// the process environment (the C++ `Postoffice` passes what `ps::Environment` resolves); NULL
/// reads the process environment only.
///
/// # Safety
/// `env` must be NULL or point to `2 * env_len` pointers, each NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn gxps_start(
    customer_id: i32,
    do_barrier: i32,
    env: *const *const c_char,
    env_len: usize,
) -> i32 {
    guard(|| {
        let mut given: Vec<(String, Option<String>)> = Vec::new();
        if env_len > 0 {
            if env.is_null() {
                return Err(PsError::Invalid(format!(
                    "env is NULL but env_len is {env_len}"
                )));
            }
            // SAFETY: per the contract, `env` holds 2 * env_len readable pointers.
            let pairs = unsafe { std::slice::from_raw_parts(env, 2 * env_len) };
            for kv in pairs.chunks(2) {
                let text = |p: *const c_char| {
                    // SAFETY: each non-NULL pointer is a NUL-terminated string (contract).
                    (!p.is_null())
                        .then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                };
                if let Some(k) = text(kv[0]) {
                    given.push((k, text(kv[1])));
                }
            }
        }
        let lookup = |name: &str| -> Option<String> {
            match given.iter().find(|(k, _)| k == name) {
                Some((_, v)) => v.clone(),
                None => std::env::var(name).ok(),
            }
        };
        node::start(customer_id, do_barrier != 0, &lookup)
    })
}

/// Finalizes customer `customer_id` (after a barrier of all nodes with `do_barrier`); customer 0
/// shuts the node down once the process's other started customers finalized.
#[no_mangle]
pub extern "C" fn gxps_finalize(customer_id: i32, do_barrier: i32) -> i32 {
    guard(|| node::finalize(customer_id, do_barrier != 0))
}

/// Blocks until every node of `group` (ps-lite group bits: 1 scheduler, 2 servers, 4 workers)
/// entered this barrier.
#[no_mangle]
pub extern "C" fn gxps_barrier(customer_id: i32, group: i32) -> i32 {
    guard(|| node::barrier(customer_id, group))
}

/// This process's role (`GXPS_ROLE_SCHEDULER` 1, `_SERVER` 2, `_WORKER` 3); `GXPS_E_STATE`
/// before `gxps_start`.
///
/// # Safety
/// `out` must be valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn gxps_role(out: *mut i32) -> i32 {
    // SAFETY: forwarded contract.
    guard(|| unsafe { put(out, node::info()?.0.code(), "out") })
}

/// `DMLC_NUM_SERVER` of the started node.
///
/// # Safety
/// `out` must be valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn gxps_num_servers(out: *mut i32) -> i32 {
    // SAFETY: forwarded contract.
    guard(|| unsafe { put(out, node::info()?.1 as i32, "out") })
}

/// `DMLC_NUM_WORKER` of the started node.
///
/// # Safety
/// `out` must be valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn gxps_num_workers(out: *mut i32) -> i32 {
    // SAFETY: forwarded contract.
    guard(|| unsafe { put(out, node::info()?.2 as i32, "out") })
}

/// `PS_VERBOSE` of the started node (0 before `gxps_start`).
#[no_mangle]
pub extern "C" fn gxps_verbose() -> i32 {
    node::info().map_or(0, |i| i.3)
}

/// This process's rank within its role (after `gxps_start` returned).
///
/// # Safety
/// `out` must be valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn gxps_my_rank(out: *mut i32) -> i32 {
    // SAFETY: forwarded contract.
    guard(|| unsafe { put(out, node::identity()?.1, "out") })
}

/// This process's ps-lite node id (1 scheduler, 8 + 2 rank servers, 9 + 2 rank workers).
///
/// # Safety
/// `out` must be valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn gxps_my_node_id(out: *mut i32) -> i32 {
    // SAFETY: forwarded contract.
    guard(|| unsafe { put(out, node::identity()?.0, "out") })
}

/// Creates customer (`app_id`, `customer_id`), which receives messages through `cb(ctx, ...)`.
/// With `active` 0 it does not handle requests until `gxps_customer_activate` (requests wait).
/// Works before `gxps_start`.
///
/// `cb` runs on geomx's threads (driver threads, the customer's completer thread, a thread inside
/// `gxps_wait`), never two calls of one customer at once; it must not unwind. `ctx` must stay
/// valid, and `cb` callable from any thread, until `gxps_customer_free` returns.
///
/// # Safety
/// `out` must be valid for a write of a `uint64_t`; `cb` and `ctx` as above.
#[no_mangle]
pub unsafe extern "C" fn gxps_customer_new(
    app_id: i32,
    customer_id: i32,
    active: i32,
    cb: Option<Callback>,
    ctx: *mut c_void,
    out: *mut u64,
) -> i32 {
    guard(|| {
        if out.is_null() {
            return Err(PsError::Invalid("out is NULL".into()));
        }
        let cb = cb.ok_or_else(|| PsError::Invalid("callback is NULL".into()))?;
        let h = customer::create(app_id, customer_id, active != 0, cb, ctx)?;
        // SAFETY: checked non-null; valid for writes per the contract.
        unsafe { out.write(h) };
        Ok(())
    })
}

/// Lets a customer created inactive handle requests (those that waited are handed over in order).
#[no_mangle]
pub extern "C" fn gxps_customer_activate(handle: u64) -> i32 {
    guard(|| {
        customer::get(handle)?.activate();
        Ok(())
    })
}

/// Destroys a customer: no callback runs after this returns.
#[no_mangle]
pub extern "C" fn gxps_customer_free(handle: u64) -> i32 {
    guard(|| customer::free(handle))
}

/// Sends one request of a customer to node `msg->peer` (each node of a ps-lite request gets its
/// own slice). Its response comes to the customer's callback with the same timestamp.
///
/// # Safety
/// `msg` must be NULL or valid, and its arrays valid for their lengths during the call.
#[no_mangle]
pub unsafe extern "C" fn gxps_send(handle: u64, msg: *const GxOutgoing) -> i32 {
    guard(|| {
        // SAFETY: NULL is rejected; otherwise valid per the contract.
        let m = unsafe { msg.as_ref() }.ok_or_else(|| PsError::Invalid("msg is NULL".into()))?;
        // SAFETY: the arrays are valid for the call (contract).
        let v = unsafe { m.view()? };
        customer::get(handle)?.send(&v)
    })
}

/// Completes this timestamp's requests that no thread has taken yet, on the calling thread
/// (their responses reach the callback from here). Requests already taken by another thread
/// complete there; the caller waits for its own count of responses.
#[no_mangle]
pub extern "C" fn gxps_wait(handle: u64, timestamp: i32) -> i32 {
    guard(|| {
        customer::get(handle)?.wait(timestamp);
        Ok(())
    })
}

/// Answers a request the customer received: `msg->peer`, `peer_customer_id` and `timestamp`
/// identify it (`KVMeta::sender`, `customer_id`, `timestamp`).
///
/// # Safety
/// As `gxps_send`.
#[no_mangle]
pub unsafe extern "C" fn gxps_respond(handle: u64, msg: *const GxOutgoing) -> i32 {
    guard(|| {
        // SAFETY: NULL is rejected; otherwise valid per the contract.
        let m = unsafe { msg.as_ref() }.ok_or_else(|| PsError::Invalid("msg is NULL".into()))?;
        // SAFETY: the arrays are valid for the call (contract).
        let v = unsafe { m.view()? };
        customer::get(handle)?.respond(&v, None)
    })
}

/// Like `gxps_respond`, for responses whose values (`msg->vals`) the caller keeps valid and
/// unchanged until `release(keep)` is called: a one-key KV response then goes to the transport
/// without a copy, and this may return before it is sent. `release(keep)` is called exactly once,
/// on any thread: once the values were sent, or before this returns when they were copied or
/// the call failed. A NULL `release` makes this `gxps_respond`.
///
/// # Safety
/// As `gxps_send`; `release(keep)` must be safe to call once from any thread, and the values
/// must stay valid until it is called.
#[no_mangle]
pub unsafe extern "C" fn gxps_respond_keep(
    handle: u64,
    msg: *const GxOutgoing,
    keep: *mut c_void,
    release: Option<ReleaseFn>,
) -> i32 {
    // Built first, so that every path below releases it.
    // SAFETY: the caller's contract for `release`.
    let keeper = release.map(|f| unsafe { Keeper::new(keep, f) });
    guard(move || {
        // SAFETY: NULL is rejected; otherwise valid per the contract.
        let m = unsafe { msg.as_ref() }.ok_or_else(|| PsError::Invalid("msg is NULL".into()))?;
        // SAFETY: the arrays are valid for the call, the values until release (contract).
        let v = unsafe { m.view()? };
        customer::get(handle)?.respond(&v, keeper)
    })
}

/// Frees the memory of a received message (NULL is ignored).
///
/// # Safety
/// `buf` must be NULL or a buffer from a `gxps_message` not freed before.
#[no_mangle]
pub unsafe extern "C" fn gxps_buffer_free(buf: *mut RecvBuffer) {
    if buf.is_null() {
        return;
    }
    // SAFETY: a buffer from a gxps_message is a Box<RecvBuffer> given away with into_raw; the
    // contract says it is freed once.
    let b = unsafe { Box::from_raw(buf) };
    if catch_unwind(AssertUnwindSafe(move || (*b).release())).is_err() {
        set_error("geomx-pslite: panic while freeing a buffer");
    }
}
