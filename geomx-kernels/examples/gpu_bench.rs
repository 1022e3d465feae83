//! GPU benchmark of the CUDA kernels; prints one JSON object on stdout.
//!
//! ```text
//! cargo run --release -p geomx-kernels --features cuda --example gpu_bench -- \
//!     [--cast-bytes 1073741824] [--topk-n 100000000] [--topk-density 0.01] [--iters 20] \
//!     [--hbm-gbs 4800]
//! ```
//!
//! - cast: f32 → f16 / bf16 on `cast-bytes` of f32 input, and the widening back, in GB/s of
//!   bytes read + written, and as a fraction of the HBM bandwidth `hbm-gbs` (H200: 4800 GB/s);
//! - top-k: exact selection of k = ⌈density·n⌉ of n uniform floats (no move), and the fused
//!   error-feedback + top-k + move push step; median and minimum milliseconds, measured on the
//!   host around the call (the call ends with a device→host copy, so it includes completion).
//!
//! Exits with status 2 and an `"error"` field when no CUDA device is usable.

#[cfg(feature = "cuda")]
fn main() {
    std::process::exit(bench::run(std::env::args().skip(1).collect()));
}

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("{{\"error\":\"gpu_bench needs --features cuda\"}}");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
mod bench {
    use std::time::Instant;

    use geomx_kernels::cuda::{CudaDevice, CudaError, TopkWorkspace};

    struct Args {
        cast_bytes: usize,
        topk_n: usize,
        topk_density: f64,
        iters: usize,
        hbm_gbs: f64,
    }

    fn parse(args: Vec<String>) -> Result<Args, String> {
        let mut a = Args {
            cast_bytes: 1 << 30,
            topk_n: 100_000_000,
            topk_density: 0.01,
            iters: 20,
            hbm_gbs: 4800.0,
        };
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = || format!("bad value for {flag}: {value}");
            match flag.as_str() {
                "--cast-bytes" => a.cast_bytes = value.parse().map_err(|_| bad())?,
                "--topk-n" => a.topk_n = value.parse().map_err(|_| bad())?,
                "--topk-density" => a.topk_density = value.parse().map_err(|_| bad())?,
                "--iters" => a.iters = value.parse::<usize>().map_err(|_| bad())?.max(1),
                "--hbm-gbs" => a.hbm_gbs = value.parse().map_err(|_| bad())?,
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        Ok(a)
    }

    /// (median, min) milliseconds of `iters` timed runs after one warm-up run.
    fn time_ms(
        iters: usize,
        mut f: impl FnMut() -> Result<(), CudaError>,
    ) -> Result<(f64, f64), CudaError> {
        f()?;
        let mut t = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = Instant::now();
            f()?;
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
        t.sort_by(f64::total_cmp);
        Ok((t[t.len() / 2], t[0]))
    }

    fn measure(a: &Args) -> Result<String, CudaError> {
        let d = CudaDevice::new(0)?;
        d.load_all()?;
        let sync = |d: &CudaDevice| d.synchronize();

        // Casts.
        let n = a.cast_bytes / 4;
        let mut x = d.zeros::<f32>(n)?;
        d.fill_uniform(&mut x, 1)?;
        let mut h = d.zeros::<u16>(n)?;
        let mut w = d.zeros::<f32>(n)?;
        let bytes = (n * 6) as f64;
        let mut cast = Vec::new();
        for name in ["f32_to_f16", "f32_to_bf16", "f16_to_f32", "bf16_to_f32"] {
            let (med, min) = time_ms(a.iters, || {
                match name {
                    "f32_to_f16" => d.f32_to_f16(&x, &mut h)?,
                    "f32_to_bf16" => d.f32_to_bf16(&x, &mut h)?,
                    "f16_to_f32" => d.f16_to_f32(&h, &mut w)?,
                    _ => d.bf16_to_f32(&h, &mut w)?,
                }
                sync(&d)
            })?;
            let gbs = bytes / (med * 1e-3) / 1e9;
            cast.push(format!(
                "\"{name}\":{{\"ms_median\":{med:.4},\"ms_min\":{min:.4},\"gbs\":{gbs:.1},\"hbm_fraction\":{:.3}}}",
                gbs / a.hbm_gbs
            ));
        }
        drop((x, h, w));

        // Top-k.
        let n = a.topk_n;
        let k = ((a.topk_density * n as f64).ceil() as usize).clamp(1, n.max(1));
        let mut ws = TopkWorkspace::new(&d, n)?;
        let mut v = d.zeros::<f32>(n)?;
        d.fill_uniform(&mut v, 2)?;
        let mut count = 0;
        let (tk_med, tk_min) = time_ms(a.iters, || {
            count = d.topk_into(&mut ws, &mut v, None, k, false)?.count;
            Ok(())
        })?;
        let mut g = d.zeros::<f32>(n)?;
        d.fill_uniform(&mut g, 3)?;
        let mut u = d.zeros::<f32>(n)?;
        let (ef_med, ef_min) = time_ms(a.iters, || {
            d.ef_update_topk(&mut ws, &mut u, &mut v, &g, 0.0, k)?;
            Ok(())
        })?;
        Ok(format!(
            "{{\"device\":\"{}\",\"arch\":\"{}\",\"sm_count\":{},\"cast\":{{\"elements\":{},\"bytes_moved\":{},{}}},\
\"topk\":{{\"n\":{n},\"k\":{k},\"selected\":{count},\"ms_median\":{tk_med:.4},\"ms_min\":{tk_min:.4}}},\
\"ef_topk_push\":{{\"ms_median\":{ef_med:.4},\"ms_min\":{ef_min:.4}}},\"iters\":{}}}",
            d.name().replace('"', "'"),
            d.arch(),
            d.sm_count(),
            a.cast_bytes / 4,
            bytes as u64,
            cast.join(","),
            a.iters
        ))
    }

    pub fn run(args: Vec<String>) -> i32 {
        let a = match parse(args) {
            Ok(a) => a,
            Err(e) => {
                println!("{{\"error\":\"{}\"}}", e.replace('"', "'"));
                return 2;
            }
        };
        match measure(&a) {
            Ok(json) => {
                println!("{json}");
                0
            }
            Err(e) => {
                println!("{{\"error\":\"{}\"}}", e.to_string().replace('"', "'"));
                2
            }
        }
    }
}
