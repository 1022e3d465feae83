//! Prints `geomx_bench::net::summary` as JSON: `cargo run --release -p geomx-bench --example net_summary [-- --quick]`.

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let opts = if quick {
        geomx_bench::net::SummaryOptions::quick()
    } else {
        geomx_bench::net::SummaryOptions::default()
    };
    let t0 = std::time::Instant::now();
    let mut v = geomx_bench::net::summary(&opts);
    v["elapsed_s"] = serde_json::json!((t0.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    println!("{}", serde_json::to_string_pretty(&v).expect("json"));
}
