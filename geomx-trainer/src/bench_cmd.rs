//! `geomx bench`: one JSON line of measurements from the `geomx-bench` library.

/// Which measurements to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bench {
    /// Compression kernels against memcpy ([`geomx_bench::kernels::summary`]).
    Kernels,
}

/// Runs `what` and prints its summary as one JSON line on stdout.
pub fn run(what: Bench) -> Result<(), String> {
    let v = match what {
        Bench::Kernels => geomx_bench::kernels::summary(),
    };
    println!("{v}");
    Ok(())
}
