//! Time a thread spends in two kinds of work that a role's round split books apart from the
//! rest (docs/benchmarks.md, "Where each role's round went"):
//! - **codec**: encoding and decoding payloads. Every encoder and decoder of
//!   [`crate::codec`] opens a [`span`].
//! - **copy**: moving parameters, gradients and batches between the host and a model's tensors
//!   (on a GPU, the host thread's part of the transfers). A model back end opens a
//!   [`copy_span`] around each such copy.
//!
//! Only the outermost span of a thread counts, whatever its kind, and its time goes to its own
//! kind: an encoder that calls another is counted once, and a copy made while encoding is
//! encoding. A role reads the thread's running totals with [`Mark::now`] before a part of its
//! round and takes the difference after it ([`Mark::elapsed`]).

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The kind of work a span times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Codec = 0,
    Copy = 1,
}

thread_local! {
    /// This thread's time so far, by [`Kind`].
    static TOTAL: Cell<[Duration; 2]> = const { Cell::new([Duration::ZERO; 2]) };
    /// Open spans of this thread (only the outermost one counts).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// An open span; its time is added to the thread's total of its kind when the outermost one
/// drops.
pub struct Span {
    /// When the span started.
    start: Instant,
    /// Its kind when it is the outermost span; `None` for a nested one.
    counts: Option<Kind>,
}

fn open(kind: Kind) -> Span {
    let depth = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v
    });
    Span {
        start: Instant::now(),
        counts: (depth == 0).then_some(kind),
    }
}

/// Opens a codec span on this thread.
pub fn span() -> Span {
    open(Kind::Codec)
}

/// Opens a copy span on this thread.
pub fn copy_span() -> Span {
    open(Kind::Copy)
}

impl Span {
    /// Closes the span; its duration (for a nested span too).
    pub fn end(self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        if let Some(kind) = self.counts {
            let spent = self.start.elapsed();
            TOTAL.with(|t| {
                let mut v = t.get();
                v[kind as usize] += spent;
                t.set(v);
            });
        }
    }
}

/// Codec time this thread has spent so far.
pub fn total() -> Duration {
    TOTAL.with(Cell::get)[Kind::Codec as usize]
}

/// Copy time this thread has spent so far.
pub fn copy_total() -> Duration {
    TOTAL.with(Cell::get)[Kind::Copy as usize]
}

/// A point in a thread's time: the wall clock and its codec and copy totals then.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    /// Wall clock.
    pub at: Instant,
    /// [`total`] at `at`.
    pub codec: Duration,
    /// [`copy_total`] at `at`.
    pub copy: Duration,
}

/// The time since a [`Mark`]: the wall time and this thread's codec and copy time in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    /// Wall time.
    pub wall: Duration,
    /// Spent in codecs.
    pub codec: Duration,
    /// Spent copying.
    pub copy: Duration,
}

impl Spent {
    /// The wall time less the codec and copy time.
    pub fn rest(&self) -> Duration {
        self.wall.saturating_sub(self.codec + self.copy)
    }
}

impl Mark {
    /// Now, on this thread.
    pub fn now() -> Mark {
        Mark {
            at: Instant::now(),
            codec: total(),
            copy: copy_total(),
        }
    }

    /// The time since the mark and the parts of it this thread spent in codecs and copies
    /// (together at most the wall time).
    pub fn elapsed(&self) -> Spent {
        let wall = self.at.elapsed();
        let codec = total().saturating_sub(self.codec).min(wall);
        let copy = copy_total()
            .saturating_sub(self.copy)
            .min(wall.saturating_sub(codec));
        Spent { wall, codec, copy }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn nested_spans_count_once_and_marks_see_only_their_own_thread() {
        let m = Mark::now();
        let before = total();
        let wall = Instant::now();
        {
            let _outer = span();
            busy(Duration::from_millis(20));
            {
                let _inner = span();
                busy(Duration::from_millis(20));
            }
        }
        let spent = total() - before;
        // At least both busy parts, and no more than the wall time: counted twice, the inner
        // 20 ms would put it over.
        assert!(spent >= Duration::from_millis(40), "{spent:?}");
        assert!(spent <= wall.elapsed(), "{spent:?} > {:?}", wall.elapsed());
        busy(Duration::from_millis(10));
        let s = m.elapsed();
        assert_eq!((s.codec, s.copy), (spent, Duration::ZERO));
        assert!(s.rest() >= Duration::from_millis(10), "{s:?}");
        // Another thread's spans do not count here.
        let here = (total(), copy_total());
        std::thread::spawn(|| {
            let _s = span();
            let _c = copy_span();
            busy(Duration::from_millis(5));
        })
        .join()
        .unwrap();
        assert_eq!((total(), copy_total()), here);
    }

    #[test]
    fn copies_count_apart_and_a_copy_inside_an_encoder_is_encoding() {
        let m = Mark::now();
        {
            let _c = copy_span();
            busy(Duration::from_millis(15));
        }
        let s = m.elapsed();
        assert!(s.copy >= Duration::from_millis(15), "{s:?}");
        // `end` gives the span's own duration.
        let c = copy_span();
        busy(Duration::from_millis(5));
        assert!(c.end() >= Duration::from_millis(5));
        assert_eq!(s.codec, Duration::ZERO);
        // A copy opened inside a codec span adds nothing to the copy total: the codec span
        // has its time.
        let m = Mark::now();
        {
            let _e = span();
            busy(Duration::from_millis(5));
            let _c = copy_span();
            busy(Duration::from_millis(5));
        }
        let s = m.elapsed();
        assert_eq!(s.copy, Duration::ZERO, "{s:?}");
        assert!(s.codec >= Duration::from_millis(10), "{s:?}");
        assert!(s.codec + s.copy <= s.wall, "{s:?}");
    }
}
