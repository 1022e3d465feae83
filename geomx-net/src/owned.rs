//! Payloads handed over to a send instead of lent to it.

/// A payload a send keeps until the kernel is done with it, so it needs no copy and the sender
/// need not wait (e.g. a ps-lite `SArray` kept alive by its reference count, or a `Vec<u8>`).
/// `as_ref` must return the same bytes, unchanged and at the same address, every time it is
/// called while the value lives; the value is dropped (on any thread) once sent or failed.
pub type OwnedBytes = Box<dyn AsRef<[u8]> + Send>;
