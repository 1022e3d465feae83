//! Time spent encoding and decoding payloads, per thread: the `codec` part of a role's round
//! split (docs/benchmarks.md, "Where each role's round went").
//!
//! Every encoder and decoder of this module opens a [`span`]; only the outermost span of a
//! thread counts, so an encoder that calls another is counted once. A role reads the thread's
//! running total with [`total`] before and after a part of its round and takes the difference
//! as that part's codec time ([`Mark`]).

use std::cell::Cell;
use std::time::{Duration, Instant};

thread_local! {
    /// Codec time of this thread so far.
    static TOTAL: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// Open spans of this thread (only the outermost one counts).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// An open codec span; its time is added to the thread's total when the outermost one drops.
pub struct Span {
    /// When the outermost span started; `None` for a nested one.
    start: Option<Instant>,
}

/// Opens a codec span on this thread.
pub fn span() -> Span {
    let depth = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v
    });
    Span {
        start: (depth == 0).then(Instant::now),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        if let Some(s) = self.start {
            let spent = s.elapsed();
            TOTAL.with(|t| t.set(t.get() + spent));
        }
    }
}

/// Codec time this thread has spent so far.
pub fn total() -> Duration {
    TOTAL.with(Cell::get)
}

/// A point in a thread's time: the wall clock and its codec total then.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    /// Wall clock.
    pub at: Instant,
    /// [`total`] at `at`.
    pub codec: Duration,
}

impl Mark {
    /// Now, on this thread.
    pub fn now() -> Mark {
        Mark {
            at: Instant::now(),
            codec: total(),
        }
    }

    /// Wall time since the mark and the part of it this thread spent in codecs.
    pub fn elapsed(&self) -> (Duration, Duration) {
        let wall = self.at.elapsed();
        let codec = total().saturating_sub(self.codec).min(wall);
        (wall, codec)
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
        let (wall, codec) = m.elapsed();
        assert_eq!(codec, spent);
        assert!(
            wall - codec >= Duration::from_millis(10),
            "{wall:?} {codec:?}"
        );
        // Another thread's spans do not count here.
        let here = total();
        std::thread::spawn(|| {
            let _s = span();
            busy(Duration::from_millis(5));
        })
        .join()
        .unwrap();
        assert_eq!(total(), here);
    }
}
