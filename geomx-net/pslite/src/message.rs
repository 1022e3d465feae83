//! The C view of a message (`gxps_message`, `gxps_outgoing`) and the received buffers behind it.

use std::ffi::{c_char, c_void, CString};

use crate::codec::{self, Layout, Meta, F_LENS, F_PULL, F_PUSH, F_SIMPLE};
use crate::error::PsError;

/// A received message handed to a customer's callback (`gxps_message` in `geomx_pslite.h`).
#[repr(C)]
#[derive(Debug)]
pub struct GxMessage {
    /// 1: a request to this customer; 0: a response to one of its requests.
    pub request: i32,
    /// 1: a SimpleApp message (head + body).
    pub simple_app: i32,
    /// 1: carries pushed values (requests) / answers a push (responses).
    pub push: i32,
    /// 1: asks for values (requests) / answers a pull (responses).
    pub pull: i32,
    /// KV `cmd` or SimpleApp head.
    pub head: i32,
    /// Application id.
    pub app_id: i32,
    /// The requesting customer's id.
    pub customer_id: i32,
    /// The request's timestamp.
    pub timestamp: i32,
    /// ps-lite node id of the sender (requests) or of the node that answered (responses).
    pub sender: i32,
    /// Responses: 0, or the `GXPS_E_*` code of a request that failed.
    pub status: i32,
    /// NUL-terminated reason when `status` is not 0, else NULL.
    pub error: *const c_char,
    /// Keys.
    pub keys: *const u64,
    /// Number of keys.
    pub num_keys: usize,
    /// Values.
    pub vals: *const c_void,
    /// Value bytes.
    pub vals_bytes: usize,
    /// Value lengths.
    pub lens: *const i32,
    /// Number of value lengths (0 or `num_keys`).
    pub num_lens: usize,
    /// SimpleApp body (not NUL-terminated).
    pub body: *const c_char,
    /// Body bytes.
    pub body_len: usize,
    /// Owns the memory behind keys / vals / lens / body; the callee frees it with
    /// `gxps_buffer_free` (from any thread, at any time). NULL when there is no memory.
    pub buffer: *mut RecvBuffer,
}

/// An outgoing message or response (`gxps_outgoing` in `geomx_pslite.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GxOutgoing {
    /// 1: carries values to push (requests) / answers a push (responses).
    pub push: i32,
    /// 1: asks for values (requests) / answers a pull (responses).
    pub pull: i32,
    /// 1: a SimpleApp message: head and body, no keys.
    pub simple_app: i32,
    /// KV `cmd` or SimpleApp head.
    pub head: i32,
    /// Requests: the new request's timestamp; responses: the request's.
    pub timestamp: i32,
    /// Requests: the receiving node id; responses: the requesting node id (`KVMeta::sender`).
    pub peer: i32,
    /// Responses: the requesting customer's id (`KVMeta::customer_id`); ignored for requests.
    pub peer_customer_id: i32,
    /// Requests: 1 when a user callback waits on this request (it completes without `Wait`
    /// as soon as it can); 0 lets `gxps_wait` complete it on the waiting thread.
    pub urgent: i32,
    /// Keys.
    pub keys: *const u64,
    /// Number of keys.
    pub num_keys: usize,
    /// Values.
    pub vals: *const c_void,
    /// Value bytes.
    pub vals_bytes: usize,
    /// Bytes per value (`sizeof(Val)`), for the consistency checks.
    pub val_size: usize,
    /// Value lengths (NULL or `num_keys` entries).
    pub lens: *const i32,
    /// Number of value lengths.
    pub num_lens: usize,
    /// SimpleApp body.
    pub body: *const c_char,
    /// Body bytes.
    pub body_len: usize,
}

/// Borrowed, checked view of a [`GxOutgoing`].
#[derive(Debug, Clone, Copy)]
pub struct OutView<'a> {
    /// Flags from push / pull / simple_app.
    pub flags: u32,
    /// Head / cmd.
    pub head: i32,
    /// Timestamp.
    pub timestamp: i32,
    /// Peer node.
    pub peer: i32,
    /// Peer customer (responses).
    pub peer_customer_id: i32,
    /// User callback attached.
    pub urgent: bool,
    /// Arrays.
    pub kv: codec::KvRef<'a>,
    /// Bytes per value.
    pub val_size: usize,
    /// SimpleApp body.
    pub body: &'a [u8],
}

/// Builds a slice from a C pointer and length, rejecting NULL with a non-zero length.
///
/// # Safety
/// When `ptr` is not NULL it must be valid for reads of `len` elements for `'a`.
unsafe fn slice<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T], PsError> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(PsError::Invalid(format!(
            "{what} is NULL but its length is {len}"
        )));
    }
    if (ptr as usize) % std::mem::align_of::<T>() != 0 {
        return Err(PsError::Invalid(format!(
            "{what} is not aligned for its type"
        )));
    }
    // SAFETY: non-null and aligned, and the caller guarantees `len` readable elements.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

impl GxOutgoing {
    /// Checks the pointers and lengths and borrows the arrays.
    ///
    /// # Safety
    /// Every non-NULL pointer must be valid for reads of its length for `'a`.
    pub unsafe fn view<'a>(&self) -> Result<OutView<'a>, PsError> {
        let mut flags = 0;
        if self.push != 0 {
            flags |= F_PUSH;
        }
        if self.pull != 0 {
            flags |= F_PULL;
        }
        if self.simple_app != 0 {
            flags |= F_SIMPLE;
        }
        // SAFETY: forwarded from this function's contract.
        let (keys, vals, lens, body) = unsafe {
            (
                slice(self.keys, self.num_keys, "keys")?,
                slice(self.vals as *const u8, self.vals_bytes, "vals")?,
                slice(self.lens, self.num_lens, "lens")?,
                slice(self.body as *const u8, self.body_len, "body")?,
            )
        };
        let kv = codec::KvRef { keys, vals, lens };
        if self.simple_app != 0 {
            if !keys.is_empty() || !vals.is_empty() || !lens.is_empty() {
                return Err(PsError::Invalid(
                    "a SimpleApp message carries no keys or values".into(),
                ));
            }
        } else {
            if !body.is_empty() {
                return Err(PsError::Invalid("a KV message carries no body".into()));
            }
            codec::validate(&kv, self.val_size)?;
        }
        Ok(OutView {
            flags,
            head: self.head,
            timestamp: self.timestamp,
            peer: self.peer,
            peer_customer_id: self.peer_customer_id,
            urgent: self.urgent != 0,
            kv,
            val_size: self.val_size,
            body,
        })
    }
}

/// Memory of a received message (`gxps_buffer`): the payload, plus the key and length of a compact
/// message, which travel in the frame header.
#[derive(Debug)]
pub struct RecvBuffer {
    data: Storage,
    key: u64,
    len: i32,
}

#[derive(Debug)]
enum Storage {
    /// The received payload as is (8-byte aligned, as the allocator returns it).
    Bytes(Vec<u8>),
    /// A copy into 8-byte words, used only if an allocator returned a less aligned payload.
    Words(Vec<u64>, usize),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Bytes(v) => v,
            Storage::Words(w, len) => {
                // SAFETY: `w` owns at least `len` initialised bytes (len <= 8 * w.len()); u8 has
                // no alignment requirement.
                unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, *len) }
            }
        }
    }
}

impl RecvBuffer {
    fn new(payload: Vec<u8>, key: u64, len: i32) -> Box<RecvBuffer> {
        let data = if (payload.as_ptr() as usize) % 8 == 0 {
            Storage::Bytes(payload)
        } else {
            let n = payload.len();
            let mut w = vec![0u64; n.div_ceil(8)];
            // SAFETY: `w` has room for n bytes; the regions do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(payload.as_ptr(), w.as_mut_ptr() as *mut u8, n)
            };
            geomx_net::bufpool::recycle(payload);
            Storage::Words(w, n)
        };
        Box::new(RecvBuffer { data, key, len })
    }

    /// Frees the buffer, returning large payloads to geomx-net's buffer pool.
    pub fn release(self) {
        if let Storage::Bytes(v) = self.data {
            geomx_net::bufpool::recycle(v);
        }
    }
}

/// Everything about a received message except the arrays.
#[derive(Debug, Clone)]
pub struct Header {
    /// Request (1) or response (0).
    pub request: bool,
    /// Meta from the frame (flags say push / pull / simple).
    pub meta: Meta,
    /// Sender (requests) or responder (responses) node id.
    pub sender: i32,
}

/// A message ready for a callback: the C struct plus what keeps its pointers alive.
#[derive(Debug)]
pub struct Delivery {
    /// The C view (its `buffer` is owned by this value until handed over).
    pub msg: GxMessage,
    _error: Option<CString>,
}

// SAFETY: the raw pointers point into the boxed RecvBuffer and the CString this value owns (or are
// NULL); nothing else aliases them, so moving the whole value to another thread is sound.
unsafe impl Send for Delivery {}

impl Delivery {
    fn base(h: &Header) -> GxMessage {
        GxMessage {
            request: h.request as i32,
            simple_app: h.meta.has(F_SIMPLE) as i32,
            push: h.meta.has(F_PUSH) as i32,
            pull: h.meta.has(F_PULL) as i32,
            head: h.meta.head,
            app_id: h.meta.app_id,
            customer_id: h.meta.customer_id,
            timestamp: h.meta.timestamp,
            sender: h.sender,
            status: 0,
            error: std::ptr::null(),
            keys: std::ptr::null(),
            num_keys: 0,
            vals: std::ptr::null(),
            vals_bytes: 0,
            lens: std::ptr::null(),
            num_lens: 0,
            body: std::ptr::null(),
            body_len: 0,
            buffer: std::ptr::null_mut(),
        }
    }

    /// A data message: `flags` / `aux` / `key` describe `payload`'s layout (see [`codec`]).
    pub fn data(
        h: &Header,
        flags: u32,
        aux: u32,
        key: u64,
        payload: Vec<u8>,
    ) -> Result<Delivery, PsError> {
        let mut msg = Self::base(h);
        if payload.is_empty() && flags & F_SIMPLE != 0 {
            return Ok(Delivery { msg, _error: None });
        }
        let simple = flags & F_SIMPLE != 0;
        let layout = if simple {
            None
        } else {
            Some(codec::locate(flags, aux, key, payload.len())?)
        };
        // A KV message without keys (the answer to a push) needs no buffer.
        if let Some(Layout::General { keys, .. }) = &layout {
            if keys.is_empty() && payload.is_empty() {
                return Ok(Delivery { msg, _error: None });
            }
        }
        let len = match &layout {
            Some(Layout::Compact { len: Some(l), .. }) => *l,
            _ => 0,
        };
        let buf = RecvBuffer::new(payload, key, len);
        let bytes = buf.data.bytes();
        let base = bytes.as_ptr();
        match layout {
            None => {
                msg.body = base as *const c_char;
                msg.body_len = bytes.len();
            }
            Some(Layout::Compact { len: l, .. }) => {
                msg.keys = &buf.key;
                msg.num_keys = 1;
                if l.is_some() {
                    msg.lens = &buf.len;
                    msg.num_lens = 1;
                }
                msg.vals = base as *const c_void;
                msg.vals_bytes = bytes.len();
            }
            Some(Layout::General { keys, lens, vals }) => {
                // SAFETY (all three adds): the ranges were checked against the payload length by
                // `codec::locate`, so each offset is within the buffer.
                msg.keys = unsafe { base.add(keys.start) } as *const u64;
                msg.num_keys = keys.len() / 8;
                if flags & F_LENS != 0 {
                    msg.lens = unsafe { base.add(lens.start) } as *const i32;
                    msg.num_lens = lens.len() / 4;
                }
                msg.vals = unsafe { base.add(vals.start) } as *const c_void;
                msg.vals_bytes = vals.len();
            }
        }
        if msg.num_keys == 0 {
            msg.keys = std::ptr::null();
        }
        msg.buffer = Box::into_raw(buf);
        Ok(Delivery { msg, _error: None })
    }

    /// A failed response.
    pub fn failure(h: &Header, err: &PsError) -> Delivery {
        let mut msg = Self::base(h);
        let text = CString::new(err.to_string().replace('\0', " ")).unwrap_or_default();
        msg.status = err.code();
        msg.error = text.as_ptr();
        Delivery {
            msg,
            _error: Some(text),
        }
    }

    /// Takes the buffer back (the callback was not called); frees it.
    pub fn discard(mut self) {
        let b = std::mem::replace(&mut self.msg.buffer, std::ptr::null_mut());
        if !b.is_null() {
            // SAFETY: `b` came from Box::into_raw in `data` and was not handed to anyone.
            (*unsafe { Box::from_raw(b) }).release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{layout, KvRef, F_COMPACT, F_REQUEST};

    fn header() -> Header {
        Header {
            request: true,
            meta: Meta {
                flags: F_PUSH | F_REQUEST,
                head: 3,
                app_id: 0,
                customer_id: 1,
                timestamp: 5,
            },
            sender: 9,
        }
    }

    fn free(d: Delivery) {
        assert!(!d.msg.buffer.is_null());
        // SAFETY: the buffer came from Box::into_raw and is freed once here.
        (*unsafe { Box::from_raw(d.msg.buffer) }).release();
    }

    #[test]
    fn general_delivery_points_into_the_buffer() {
        let keys = [4u64, 8];
        let lens = [1i32, 2];
        let vals: Vec<u8> = (0..12).collect();
        let out = layout(
            &KvRef {
                keys: &keys,
                vals: &vals,
                lens: &lens,
            },
            true,
            Vec::new,
        );
        let p = out.payload().to_vec();
        let d = Delivery::data(&header(), out.flags(), out.aux(), 0, p).unwrap();
        let m = &d.msg;
        assert_eq!(
            (m.request, m.push, m.pull, m.head, m.sender),
            (1, 1, 0, 3, 9)
        );
        // SAFETY: the pointers point into the live buffer with the counts given.
        unsafe {
            assert_eq!(std::slice::from_raw_parts(m.keys, m.num_keys), &keys);
            assert_eq!(std::slice::from_raw_parts(m.lens, m.num_lens), &lens);
            assert_eq!(
                std::slice::from_raw_parts(m.vals as *const u8, m.vals_bytes),
                &vals[..]
            );
        }
        free(d);
    }

    #[test]
    fn compact_delivery_uses_the_header_key() {
        let d = Delivery::data(
            &header(),
            F_COMPACT | F_LENS,
            2,
            77,
            vec![1, 2, 3, 4, 5, 6, 7, 8],
        )
        .unwrap();
        // SAFETY: as above.
        unsafe {
            assert_eq!(*d.msg.keys, 77);
            assert_eq!(*d.msg.lens, 2);
        }
        assert_eq!(d.msg.vals_bytes, 8);
        free(d);
    }

    #[test]
    fn malformed_payloads_and_failures() {
        assert!(Delivery::data(&header(), 0, 4, 0, vec![0; 8]).is_err());
        let d = Delivery::failure(&header(), &PsError::Aborted("worker 1 died".into()));
        assert_eq!(d.msg.status, crate::error::GXPS_E_ABORTED);
        // SAFETY: `error` points to the CString the delivery owns.
        let s = unsafe { std::ffi::CStr::from_ptr(d.msg.error) };
        assert!(s.to_str().unwrap().contains("worker 1 died"));
        d.discard();
        let body = Delivery::data(&header(), F_SIMPLE, 0, 0, b"test".to_vec()).unwrap();
        assert_eq!(body.msg.body_len, 4);
        body.discard();
    }
}
