//! `geomx bench`: one JSON line of measurements from the `geomx-bench` library.

/// Which measurements to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bench {
    /// Transport goodput and request rate against raw sockets ([`geomx_bench::net::summary`]).
    Net,
    /// Compression kernels against memcpy ([`geomx_bench::kernels::summary`]).
    Kernels,
}

/// Elements per tensor of the quick kernel run.
const QUICK_KERNEL_ELEMS: usize = 1 << 16;

/// Runs `what` (a short smoke-size run when `quick`) and returns its summary as one JSON line.
pub fn summary(what: Bench, quick: bool) -> String {
    let v = match (what, quick) {
        (Bench::Net, false) => geomx_bench::net::summary(&Default::default()),
        (Bench::Net, true) => geomx_bench::net::summary(&geomx_bench::net::SummaryOptions::quick()),
        (Bench::Kernels, false) => geomx_bench::kernels::summary(),
        (Bench::Kernels, true) => geomx_bench::kernels::summary_with(QUICK_KERNEL_ELEMS, 3),
    };
    v.to_string()
}
