//! Byte and frame counters, counted at the socket.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of traffic counters (bytes as handed to / taken from the socket, headers included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes written to sockets.
    pub bytes_sent: u64,
    /// Bytes read from sockets.
    pub bytes_recv: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Frames read.
    pub frames_recv: u64,
    /// io_uring `SEND_ZC` notifications reporting true zero copy.
    pub zerocopy_sent: u64,
    /// io_uring `SEND_ZC` notifications reporting that the kernel copied instead (always the
    /// case on loopback).
    pub zerocopy_copied: u64,
}

/// Live, shareable counters updated by the drivers.
#[derive(Debug, Default)]
pub struct LiveCounters {
    bytes_sent: AtomicU64,
    bytes_recv: AtomicU64,
    frames_sent: AtomicU64,
    frames_recv: AtomicU64,
    zerocopy_sent: AtomicU64,
    zerocopy_copied: AtomicU64,
}

impl LiveCounters {
    /// Records bytes written.
    pub fn add_sent(&self, bytes: usize, frames: u64) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        self.frames_sent.fetch_add(frames, Ordering::Relaxed);
    }

    /// Records bytes read.
    pub fn add_recv_bytes(&self, bytes: usize) {
        self.bytes_recv.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Records frames read.
    pub fn add_recv_frames(&self, frames: u64) {
        self.frames_recv.fetch_add(frames, Ordering::Relaxed);
    }

    /// Records one zero-copy notification.
    pub fn add_zerocopy(&self, copied: bool) {
        let c = if copied {
            &self.zerocopy_copied
        } else {
            &self.zerocopy_sent
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> Counters {
        Counters {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_recv: self.bytes_recv.load(Ordering::Relaxed),
            frames_sent: self.frames_sent.load(Ordering::Relaxed),
            frames_recv: self.frames_recv.load(Ordering::Relaxed),
            zerocopy_sent: self.zerocopy_sent.load(Ordering::Relaxed),
            zerocopy_copied: self.zerocopy_copied.load(Ordering::Relaxed),
        }
    }
}
