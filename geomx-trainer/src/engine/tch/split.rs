//! Large host work split over a few threads by size. One core's `memcpy` reaches only a fraction
//! of a server's memory bandwidth, and a step of ResNet-18 copies its 45 MB of parameters into
//! page-locked memory and its 45 MB of gradients out of it (and the GPU step benchmark's stand-in
//! server updates them).

/// Below this many elements in all one thread does the work (threads cost more than they save).
const PARALLEL_MIN: usize = 1 << 20;

/// Most threads one copy uses.
const MAX_THREADS: usize = 8;

/// Runs `run` on every job; jobs are grouped into contiguous runs of about equal `size` (at
/// least one job each), one thread per run, up to [`MAX_THREADS`] and only when the total size
/// reaches [`PARALLEL_MIN`] per thread. Returns the first error of a run in job order; a run stops
/// at its first error.
pub(super) fn run_split<J: Send, E: Send>(
    jobs: Vec<J>,
    size: impl Fn(&J) -> usize,
    run: impl Fn(J) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let total: usize = jobs.iter().map(&size).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS)
        .min(total / PARALLEL_MIN)
        .max(1);
    if threads == 1 {
        return jobs.into_iter().try_for_each(run);
    }
    let share = total.div_ceil(threads);
    let mut groups: Vec<Vec<J>> = vec![Vec::new()];
    let mut filled = 0;
    for job in jobs {
        let s = size(&job);
        if filled + s > share && groups.last().is_some_and(|g| !g.is_empty()) {
            groups.push(Vec::new());
            filled = 0;
        }
        filled += s;
        groups.last_mut().expect("one group at least").push(job);
    }
    let run = &run;
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| scope.spawn(move || g.into_iter().try_for_each(run)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })
}

/// Copies `src[ranges[i]]` into `out[i]` (replacing its contents), split over threads.
pub(super) fn copy_out<T: Copy + Send + Sync>(
    src: &[T],
    ranges: &[std::ops::Range<usize>],
    out: &mut [Vec<T>],
) {
    let jobs: Vec<_> = ranges.iter().zip(out).collect();
    let copied: Result<(), std::convert::Infallible> = run_split(
        jobs,
        |(r, _)| r.len(),
        |(r, v)| {
            v.clear();
            v.extend_from_slice(&src[r.clone()]);
            Ok(())
        },
    );
    let Ok(()) = copied;
}

/// Copies each `srcs[i]` to `dst[offsets[i]..]`, split over threads. Errors (copying nothing)
/// when the ranges are not increasing, overlap or do not fit in `dst`.
pub(super) fn copy_in<T: Copy + Send + Sync>(
    srcs: &[&[T]],
    offsets: &[usize],
    dst: &mut [T],
) -> Result<(), String> {
    if srcs.len() != offsets.len() {
        return Err(format!(
            "{} sources for {} offsets",
            srcs.len(),
            offsets.len()
        ));
    }
    let mut jobs = Vec::with_capacity(srcs.len());
    let (mut rest, mut at) = (dst, 0usize);
    for (s, &off) in srcs.iter().zip(offsets) {
        let end = off
            .checked_add(s.len())
            .filter(|&e| off >= at && e - at <= rest.len());
        let Some(end) = end else {
            return Err(format!(
                "range {off}..+{} does not follow {at} within the buffer",
                s.len()
            ));
        };
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - at);
        let (d, tail) = tail.split_at_mut(s.len());
        jobs.push((*s, d));
        (rest, at) = (tail, end);
    }
    run_split(
        jobs,
        |(s, _)| s.len(),
        |(s, d)| {
            d.copy_from_slice(s);
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split copy gives every key its own range, whatever the thread split (keys much larger
    /// than a thread's share, many small ones, empty ones).
    #[test]
    fn split_copies_give_each_key_its_range() {
        let src: Vec<u32> = (0..5_000_000).collect();
        let lens = [3_000_000, 1, 0, 999_999, 700_000, 300_000];
        let mut ranges = Vec::new();
        let mut at = 0;
        for l in lens {
            ranges.push(at..at + l);
            at += l;
        }
        let mut out = vec![vec![7u32; 3]; lens.len()];
        copy_out(&src, &ranges, &mut out);
        for (r, v) in ranges.iter().zip(&out) {
            assert_eq!(v.as_slice(), &src[r.clone()]);
        }
        let small = [0..2, 2..5];
        copy_out(&src, &small, &mut out[..2]);
        assert_eq!(
            (out[0].as_slice(), out[1].as_slice()),
            (&[0, 1][..], &[2, 3, 4][..])
        );

        // Back in, with gaps between the keys (alignment): the gaps keep their values.
        let offsets: Vec<usize> = ranges
            .iter()
            .map(|r| r.start + 16 * (r.start % 3))
            .collect();
        let mut offs = offsets.clone();
        for i in 1..offs.len() {
            offs[i] = offs[i].max(offs[i - 1] + out[i - 1].len());
        }
        let mut out = vec![vec![1u32; 0]; lens.len()];
        copy_out(&src, &ranges, &mut out);
        let srcs: Vec<&[u32]> = out.iter().map(Vec::as_slice).collect();
        let mut dst = vec![u32::MAX; 6_000_000];
        copy_in(&srcs, &offs, &mut dst).unwrap();
        for (s, &o) in srcs.iter().zip(&offs) {
            assert_eq!(&dst[o..o + s.len()], *s);
        }
        assert_eq!(dst[5_999_999], u32::MAX);
        // Overlapping, decreasing or overflowing ranges are refused.
        assert!(copy_in(&[&[1u32, 2][..], &[3][..]], &[0, 1], &mut dst).is_err());
        assert!(copy_in(&[&[1u32][..]], &[6_000_000], &mut dst).is_err());
        assert!(copy_in(&[&[1u32][..]], &[usize::MAX], &mut dst).is_err());
    }

    /// A failing job's error comes back, the first in job order, whether the jobs ran on one
    /// thread or several.
    #[test]
    fn the_first_error_in_job_order_is_returned() {
        for size in [1, 3 * PARALLEL_MIN] {
            let jobs: Vec<usize> = (0..6).collect();
            let r = run_split(jobs, |_| size, |j| if j >= 3 { Err(j) } else { Ok(()) });
            assert_eq!(r, Err(3), "job size {size}");
        }
    }
}
