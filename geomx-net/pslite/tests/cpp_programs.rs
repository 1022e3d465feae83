//! Builds geomx-pslite's own C++ test programs (`tests/cpp/*.cc`) with g++ against this
//! crate's static library and runs each as a small job, one process per role with ps-lite's
//! `DMLC_*` variables on loopback. Skips with a printed reason when g++ is absent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: a loaded 2-core machine runs several of these jobs at once.
const JOB_TIMEOUT: Duration = Duration::from_secs(180);

fn gxx() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let ok = Command::new(&cxx)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(cxx)
}

/// The static library cargo built for this test run (next to the test binary).
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    let candidates = [
        deps.join("libgeomx_pslite.a"),
        deps.join("../libgeomx_pslite.a"),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| panic!("libgeomx_pslite.a not found near {}", deps.display()))
}

fn compile(cxx: &str, name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("geomx-pslite-{}-{name}", std::process::id()));
    let status = Command::new(cxx)
        .args(["-std=c++11", "-O1", "-Wall", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join("tests/cpp").join(format!("{name}.cc")))
        .arg(static_lib())
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .status()
        .expect("run the C++ compiler");
    assert!(status.success(), "compiling tests/cpp/{name}.cc failed");
    out
}

/// How one attempt at a job ended.
enum Outcome {
    Done(Vec<String>),
    /// The scheduler could not listen on its port (taken meanwhile): try another.
    PortTaken,
}

/// Runs `bin` as a ps-lite job: a scheduler, `servers` servers and `worker_procs` worker
/// processes (`workers` is DMLC_NUM_WORKER); every process must exit 0. A scheduler that
/// finds its port taken is retried on another (3 attempts).
fn run_job(bin: &Path, servers: u32, workers: u32, worker_procs: u32, args: &[&str]) {
    for attempt in 1..=3 {
        match run_once(bin, servers, workers, worker_procs, args) {
            Outcome::Done(failures) => {
                assert!(failures.is_empty(), "{}: {failures:?}", bin.display());
                return;
            }
            Outcome::PortTaken => eprintln!("attempt {attempt}: the scheduler's port was taken"),
        }
    }
    panic!("{}: the scheduler's port was taken 3 times", bin.display());
}

fn run_once(bin: &Path, servers: u32, workers: u32, worker_procs: u32, args: &[&str]) -> Outcome {
    // Below the ephemeral range: an outgoing connection elsewhere cannot take it meanwhile.
    let port = geomx_net::port::free_loopback_port().expect("a loopback port");
    let spawn = |role: &str, stderr: Stdio| -> Child {
        Command::new(bin)
            .args(args)
            .env("DMLC_ROLE", role)
            .env("DMLC_NUM_SERVER", servers.to_string())
            .env("DMLC_NUM_WORKER", workers.to_string())
            .env("DMLC_PS_ROOT_URI", "127.0.0.1")
            .env("DMLC_PS_ROOT_PORT", port.to_string())
            .env("DMLC_NODE_HOST", "127.0.0.1")
            .stderr(stderr)
            .spawn()
            .expect("spawn a C++ test process")
    };
    // The scheduler's stderr is passed on, and read for its listen error.
    let mut scheduler = spawn("scheduler", Stdio::piped());
    let taken = scheduler.stderr.take().map(|err| {
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut taken = false;
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("{line}");
                taken |= line.contains("cannot listen") && line.contains("Address already in use");
            }
            taken
        })
    });
    let mut procs = vec![("scheduler", scheduler)];
    procs.extend((0..servers).map(|_| ("server", spawn("server", Stdio::inherit()))));
    procs.extend((0..worker_procs).map(|_| ("worker", spawn("worker", Stdio::inherit()))));
    let deadline = Instant::now() + JOB_TIMEOUT;
    let mut failures = Vec::new();
    let mut running: Vec<usize> = (0..procs.len()).collect();
    // Once one process fails the job cannot finish: the others are ended, not waited for.
    while !running.is_empty() && failures.is_empty() {
        running.retain(|&i| {
            let (role, child) = &mut procs[i];
            match child.try_wait().expect("wait for a C++ test process") {
                Some(s) if !s.success() => {
                    failures.push(format!("{role} exited with {s}"));
                    false
                }
                Some(_) => false,
                None => true,
            }
        });
        if Instant::now() > deadline {
            for &i in &running {
                failures.push(format!("{} did not finish in {JOB_TIMEOUT:?}", procs[i].0));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (_, child) in &mut procs {
        let _ = child.kill();
        let _ = child.wait();
    }
    let taken = taken.is_some_and(|t| t.join().unwrap_or(false));
    if taken && failures.iter().any(|f| f.starts_with("scheduler")) {
        return Outcome::PortTaken;
    }
    Outcome::Done(failures)
}

/// The checked-in C header's struct layouts equal the Rust `#[repr(C)]` ones.
#[test]
fn c_header_layout_matches_the_rust_structs() {
    use geomx_pslite::message::{GxMessage, GxOutgoing};
    use std::mem::{offset_of, size_of};
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("geomx-pslite-{}-layout", std::process::id()));
    let Ok(status) = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join("tests/cpp/layout.c"))
        .arg("-o")
        .arg(&out)
        .status()
    else {
        eprintln!("skipping: no C compiler ({cc}) found");
        return;
    };
    assert!(
        status.success(),
        "compiling tests/cpp/layout.c against geomx_pslite.h failed"
    );
    let printed = Command::new(&out).output().expect("run the layout program");
    let _ = std::fs::remove_file(&out);
    let text = String::from_utf8_lossy(&printed.stdout).into_owned();
    let want = format!(
        "gxps_message {} {} {} {} {} {}\ngxps_outgoing {} {} {} {} {} {}\n",
        size_of::<GxMessage>(),
        offset_of!(GxMessage, error),
        offset_of!(GxMessage, keys),
        offset_of!(GxMessage, lens),
        offset_of!(GxMessage, body_len),
        offset_of!(GxMessage, buffer),
        size_of::<GxOutgoing>(),
        offset_of!(GxOutgoing, urgent),
        offset_of!(GxOutgoing, keys),
        offset_of!(GxOutgoing, val_size),
        offset_of!(GxOutgoing, lens),
        offset_of!(GxOutgoing, body_len),
    );
    assert_eq!(
        text, want,
        "include/geomx_pslite.h and src/message.rs disagree"
    );
}

#[test]
fn cpp_programs_run_as_pslite_jobs() {
    let Some(cxx) = gxx() else {
        eprintln!("skipping: no C++ compiler (g++ or $CXX) found");
        return;
    };
    let kv = compile(&cxx, "kv");
    let simple = compile(&cxx, "simple");
    let bad = compile(&cxx, "bad_input");
    run_job(&kv, 2, 3, 3, &[]);
    // Two customers (threads) in one worker process, each counted as a worker.
    run_job(&kv, 2, 2, 1, &["2"]);
    run_job(&simple, 2, 3, 3, &[]);
    run_job(&bad, 2, 1, 1, &[]);
    for p in [kv, simple, bad] {
        let _ = std::fs::remove_file(p);
    }
}
