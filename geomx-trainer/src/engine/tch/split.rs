//! Large host work split over a few threads by size. One core's `memcpy` reaches only a fraction
//! of a server's memory bandwidth, and a step of ResNet-18 copies its 45 MB of parameters into
//! page-locked memory (and the GPU step benchmark's stand-in server updates them).

/// Each thread gets at least this many elements (fewer cost more to hand over than they save).
const PARALLEL_MIN: usize = 1 << 18;

/// Most threads one copy uses.
const MAX_THREADS: usize = 8;

/// Elements per piece when a key is cut into jobs: a large key (ResNet-18 has keys of 2.36 M
/// elements, a fifth of the model) would otherwise keep one thread busy while the others wait.
pub(super) const PIECE: usize = 1 << 17;

/// Runs `run` on every job; jobs are grouped into contiguous runs of about equal `size` (at
/// least one job each), one thread of a persistent pool per run, up to [`MAX_THREADS`] and only
/// when the total size reaches [`PARALLEL_MIN`] per thread. Returns the first error of a run in job order; a run stops
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
    let Some(pool) = pool() else {
        return groups.into_iter().flatten().try_for_each(run);
    };
    use rayon::iter::{IntoParallelIterator, ParallelIterator};
    // A job's panic comes back here (rayon resumes it on this thread).
    let results: Vec<Result<(), E>> = pool.install(|| {
        groups
            .into_par_iter()
            .map(|g| g.into_iter().try_for_each(run))
            .collect()
    });
    results.into_iter().collect()
}

/// [`run_split`] of work that cannot fail.
pub(super) fn each_split<J: Send>(
    jobs: Vec<J>,
    size: impl Fn(&J) -> usize,
    run: impl Fn(J) + Sync,
) {
    let done: Result<(), std::convert::Infallible> = run_split(jobs, size, |j| {
        run(j);
        Ok(())
    });
    let Ok(()) = done;
}

/// The threads [`run_split`] uses, started at its first parallel call and kept (starting
/// threads for every split cost more than a small split saves); `None` if they cannot be
/// started, and the work runs on the calling thread.
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.min(MAX_THREADS))
            .thread_name(|i| format!("geomx-split-{i}"))
            .build()
            .map_err(|e| tracing::warn!(error = %e, "split threads unavailable: one thread"))
            .ok()
    })
    .as_ref()
}

/// Copies each `srcs[i]` to `dst[offsets[i]..]`, split over threads (large keys in pieces). Errors (copying nothing)
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
        jobs.extend(s.chunks(PIECE).zip(d.chunks_mut(PIECE)));
        (rest, at) = (tail, end);
    }
    each_split(jobs, |(s, _)| s.len(), |(s, d)| d.copy_from_slice(s));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split copy puts every key at its offset, whatever the thread split (keys much larger
    /// than a thread's share, many small ones, empty ones), and leaves the gaps alone.
    #[test]
    fn split_copies_put_each_key_at_its_offset() {
        let lens = [3_000_000, 1, 0, 999_999, 700_000, 300_000];
        let keys: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(k, &l)| (0..l as u32).map(|i| i ^ (k as u32) << 24).collect())
            .collect();
        let mut offs = Vec::new();
        let mut at = 0;
        for (k, l) in lens.iter().enumerate() {
            offs.push(at + 16 * (k % 3));
            at = offs[k] + l;
        }
        let srcs: Vec<&[u32]> = keys.iter().map(Vec::as_slice).collect();
        let mut dst = vec![u32::MAX; 6_000_000];
        copy_in(&srcs, &offs, &mut dst).unwrap();
        for (s, &o) in srcs.iter().zip(&offs) {
            assert_eq!(&dst[o..o + s.len()], *s);
        }
        assert_eq!(dst[offs[1] - 1], u32::MAX, "gap");
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
