//! Process-wide pool of large payload buffers.
//!
//! Decoders take their payload buffers from here; applications hand finished payloads back with
//! [`recycle`] (optional). Reuse avoids the page faults and zeroing of fresh large allocations,
//! which otherwise cost as much as the copy from the socket. Buffers below [`MIN_POOLED`] bytes
//! are left to the allocator. Fresh large buffers ask the kernel for transparent huge pages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Buffers smaller than this are not pooled.
pub const MIN_POOLED: usize = 64 << 10;

static LIMIT: AtomicUsize = AtomicUsize::new(512 << 20);
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Sets the most bytes of capacity the pool keeps (default 512 MiB); 0 disables pooling.
pub fn set_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
    let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    trim(&mut p, bytes);
}

fn trim(p: &mut Vec<Vec<u8>>, limit: usize) {
    let mut total: usize = p.iter().map(|b| b.capacity()).sum();
    while total > limit {
        match p.pop() {
            Some(b) => total -= b.capacity(),
            None => break,
        }
    }
}

/// Returns a payload buffer (e.g. `Response::payload` once used) for reuse by later receives.
pub fn recycle(mut buf: Vec<u8>) {
    if buf.capacity() < MIN_POOLED {
        return;
    }
    buf.clear();
    let limit = LIMIT.load(Ordering::Relaxed);
    let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let total: usize = p.iter().map(|b| b.capacity()).sum();
    if total + buf.capacity() <= limit {
        p.push(buf);
    }
}

/// A buffer handed to a send ([`crate::OwnedBytes`]) that goes back to the pool once sent.
pub(crate) struct Pooled(pub(crate) Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.0));
    }
}

/// Bytes of capacity currently pooled.
pub fn pooled_bytes() -> usize {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|b| b.capacity())
        .sum()
}

/// An empty buffer with capacity for `len` bytes: a pooled one that fits (capacity within 2x),
/// or a fresh allocation.
pub(crate) fn take(len: usize) -> Vec<u8> {
    if len >= MIN_POOLED {
        let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let best = p
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && b.capacity() / 2 <= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            return p.swap_remove(i);
        }
    }
    let v = Vec::with_capacity(len);
    advise_huge(&v);
    v
}

/// Asks for transparent huge pages on the 2 MiB-aligned interior of a large fresh buffer (fewer
/// page faults when the socket data lands in it).
#[cfg(target_os = "linux")]
fn advise_huge(v: &Vec<u8>) {
    const HUGE: usize = 2 << 20;
    if v.capacity() < 2 * HUGE {
        return;
    }
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_ptr() as usize + v.capacity()) / HUGE * HUGE;
    if end > start {
        // SAFETY: advisory call on memory this Vec owns; it does not change contents or mapping.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_v: &Vec<u8>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycled_buffer_is_reused_for_a_fitting_length() {
        let b = take(1 << 20);
        let ptr = b.as_ptr();
        recycle(b);
        let again = take((1 << 20) - 5);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
        // Too small a request for that buffer (more than 2x waste) allocates afresh.
        recycle(again);
        let small = take(100 << 10);
        assert_ne!(small.as_ptr(), ptr);
        assert!(take(10).capacity() >= 10);
    }
}
