//! Memory that C lends until it is told to release it: a server's response values go to the
//! transport without a copy (as ps-lite hands its `SArray` to ZeroMQ) and are released once sent.

use std::ffi::c_void;

/// The release function of a keep-alive handle (`gxps_release_fn`).
pub type ReleaseFn = unsafe extern "C" fn(keep: *mut c_void);

/// A C keep-alive handle: `release(keep)` is called exactly once, when this is dropped (on any
/// thread).
pub struct Keeper {
    keep: *mut c_void,
    release: ReleaseFn,
}

// SAFETY: `gxps_respond_keep`'s contract: `release` may be called on any thread.
unsafe impl Send for Keeper {}

impl Keeper {
    /// Takes over `keep`; `release(keep)` runs when the keeper is dropped.
    ///
    /// # Safety
    /// `release(keep)` must be safe to call once, from any thread.
    pub unsafe fn new(keep: *mut c_void, release: ReleaseFn) -> Keeper {
        Keeper { keep, release }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // SAFETY: called once (drop), as the constructor's contract allows.
        unsafe { (self.release)(self.keep) }
    }
}

/// Bytes that stay valid while their keeper lives.
pub struct Kept {
    ptr: *const u8,
    len: usize,
    _keeper: Keeper,
}

// SAFETY: the bytes are only read, and valid until the keeper (moved along) releases them.
unsafe impl Send for Kept {}

impl Kept {
    /// `bytes`, kept valid by `keeper` beyond the borrow.
    ///
    /// # Safety
    /// `bytes` must stay valid and unchanged until `keeper` is dropped.
    pub unsafe fn new(bytes: &[u8], keeper: Keeper) -> Kept {
        Kept {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            _keeper: keeper,
        }
    }
}

impl AsRef<[u8]> for Kept {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: valid and unchanged while the keeper lives (constructor's contract).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RELEASED: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn count(keep: *mut c_void) {
        // SAFETY: the test passes a Box<u64> it gave away.
        let b = unsafe { Box::from_raw(keep as *mut u64) };
        RELEASED.fetch_add(*b as usize, Ordering::SeqCst);
    }

    #[test]
    fn releases_once_when_the_bytes_are_dropped_on_another_thread() {
        let data = vec![1u8, 2, 3];
        let keep = Box::into_raw(Box::new(5u64)) as *mut c_void;
        // SAFETY: `count` frees the box once; `data` outlives the kept bytes.
        let kept = unsafe { Kept::new(&data, Keeper::new(keep, count)) };
        assert_eq!(kept.as_ref(), &[1, 2, 3]);
        let boxed: geomx_net::OwnedBytes = Box::new(kept);
        assert_eq!(RELEASED.load(Ordering::SeqCst), 0);
        std::thread::spawn(move || drop(boxed)).join().unwrap();
        assert_eq!(RELEASED.load(Ordering::SeqCst), 5);
    }
}
