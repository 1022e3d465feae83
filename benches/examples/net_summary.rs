//! Prints `geomx_bench::net::summary` as JSON:
//! `cargo run --release -p geomx-bench --example net_summary [-- --quick] [--sizes 4096,1048576] [--repeats N]`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut opts = if args.iter().any(|a| a == "--quick") {
        geomx_bench::net::SummaryOptions::quick()
    } else {
        geomx_bench::net::SummaryOptions::default()
    };
    for w in args.windows(2) {
        match w[0].as_str() {
            "--sizes" => opts.sizes = w[1].split(',').filter_map(|s| s.parse().ok()).collect(),
            "--repeats" => opts.repeats = w[1].parse().unwrap_or(opts.repeats),
            "--pipelined" => opts.pipelined_pushes = w[1].parse().unwrap_or(opts.pipelined_pushes),
            _ => {}
        }
    }
    let t0 = std::time::Instant::now();
    let mut v = geomx_bench::net::summary(&opts);
    v["elapsed_s"] = serde_json::json!((t0.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    println!("{}", serde_json::to_string_pretty(&v).expect("json"));
}
