//! Runs one scenario: `geomx launch FILE --report R` as a child process (so the normal launcher,
//! WAN lab included, does the work), with a wall-time cap.
//!
//! The child's output goes to a log file. At the cap the child gets SIGTERM (the launcher and its
//! lab guard then stop the cluster and tear the lab down), SIGKILL if it is still there after a
//! grace period; the scenario's figures then come from the progress lines in the log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::E2eError;
use crate::hips::worker::Progress;
use crate::report::Report;

/// How long a capped launcher may take to clean up after SIGTERM.
const TERM_GRACE: Duration = Duration::from_secs(20);
/// Polling interval while a launch runs.
const POLL: Duration = Duration::from_millis(100);

/// Files of one launch (absolute paths).
#[derive(Debug, Clone)]
pub struct LaunchFiles {
    /// The launcher's working directory.
    pub dir: PathBuf,
    /// The configuration to launch.
    pub config: PathBuf,
    /// Where the launcher writes its JSON report.
    pub report: PathBuf,
    /// The launcher's stdout and stderr.
    pub log: PathBuf,
}

/// How a launch ended.
#[derive(Debug)]
pub enum Outcome {
    /// It finished; its report (typed, and as JSON for fields this build does not know).
    Done(Box<Report>, serde_json::Value),
    /// It hit the cap after `wall_s` seconds; the progress lines read from its log.
    Capped {
        /// Seconds it ran.
        wall_s: f64,
        /// Progress lines it printed.
        progress: Vec<Progress>,
    },
    /// It failed; the last lines of its log.
    Failed(String),
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The last `n` non-empty lines of `text`, joined with "; ".
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("; ")
}

/// Parses the launcher's human progress line
/// `round     10  loss 1.0850  test loss 0.6998  test accuracy 0.8306  (1.07 s)`.
pub fn parse_progress_line(line: &str) -> Option<Progress> {
    let t: Vec<&str> = line.split_whitespace().collect();
    match t.as_slice() {
        ["round", round, "loss", loss, "test", "loss", test_loss, "test", "accuracy", acc, elapsed, "s)"] => {
            Some(Progress {
                round: round.parse().ok()?,
                loss: loss.parse().ok()?,
                test_loss: test_loss.parse().ok()?,
                test_accuracy: acc.parse().ok()?,
                elapsed_s: elapsed.strip_prefix('(')?.parse().ok()?,
            })
        }
        _ => None,
    }
}

fn sigterm(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain kill(2) on the pid of our own child, which we have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// Launches `files.config` with `exe launch`, waits at most `cap`, and returns what happened.
pub fn run_launch(exe: &Path, files: &LaunchFiles, cap: Duration) -> Result<Outcome, E2eError> {
    let io = |what: String| move |e| E2eError::Io(what, e);
    let log = std::fs::File::create(&files.log)
        .map_err(io(format!("creating {}", files.log.display())))?;
    let log_err = log
        .try_clone()
        .map_err(io(format!("opening {}", files.log.display())))?;
    let _ = std::fs::remove_file(&files.report);
    let started = Instant::now();
    let mut child = Command::new(exe)
        .current_dir(&files.dir)
        .arg("launch")
        .arg(&files.config)
        .arg("--report")
        .arg(&files.report)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(io(format!("starting {} launch", exe.display())))?;
    let mut capped = false;
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .map_err(io("waiting for the launch".into()))?
        {
            break s;
        }
        if !capped && started.elapsed() >= cap {
            capped = true;
            sigterm(&child);
        }
        if capped && started.elapsed() >= cap + TERM_GRACE {
            let _ = child.kill();
            break child.wait().map_err(io("waiting for the launch".into()))?;
        }
        std::thread::sleep(POLL);
    };
    let wall_s = started.elapsed().as_secs_f64().min(cap.as_secs_f64());
    let log_text = std::fs::read_to_string(&files.log).unwrap_or_default();
    if capped {
        let progress = log_text.lines().filter_map(parse_progress_line).collect();
        return Ok(Outcome::Capped { wall_s, progress });
    }
    if !status.success() {
        return Ok(Outcome::Failed(format!(
            "launch {}: {}",
            describe(&status),
            tail(&log_text, 4)
        )));
    }
    let text = std::fs::read_to_string(&files.report)
        .map_err(io(format!("reading {}", files.report.display())))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| E2eError::Report {
        path: files.report.clone(),
        message: e.to_string(),
    })?;
    let report: Report = serde_json::from_value(json.clone()).map_err(|e| E2eError::Report {
        path: files.report.clone(),
        message: e.to_string(),
    })?;
    Ok(Outcome::Done(Box::new(report), json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_launchers_progress_line() {
        let p = parse_progress_line(
            "round     10  loss 1.0850  test loss 0.6998  test accuracy 0.8306  (1.07 s)",
        )
        .unwrap();
        assert_eq!(p.round, 10);
        assert_eq!(p.loss, 1.085);
        assert_eq!(p.test_loss, 0.6998);
        assert_eq!(p.test_accuracy, 0.8306);
        assert_eq!(p.elapsed_s, 1.07);
        for other in [
            "geomx launch: started worker (dc 0, rank 0) pid 12",
            "[worker (dc 0, rank 0)] round 3",
            "done: 100 rounds in 8.34 s, test accuracy 0.9778",
            "",
        ] {
            assert_eq!(parse_progress_line(other), None, "{other}");
        }
    }

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        assert_eq!(tail("a\n\nb\nc\n\n", 2), "b; c");
        assert_eq!(tail("", 3), "");
    }

    /// A fresh scratch folder and the launch files inside it.
    fn scratch_files(tag: &str) -> (PathBuf, LaunchFiles) {
        let dir = std::env::temp_dir().join(format!("geomx-e2e-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = LaunchFiles {
            dir: dir.clone(),
            config: dir.join("c.toml"),
            report: dir.join("r.json"),
            log: dir.join("l.log"),
        };
        (dir, files)
    }

    #[test]
    fn a_missing_executable_is_an_error() {
        let (dir, files) = scratch_files("runner");
        let r = run_launch(
            Path::new("/nonexistent/geomx"),
            &files,
            Duration::from_secs(1),
        );
        assert!(matches!(r, Err(E2eError::Io(..))), "{r:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failing_launch_reports_its_last_lines_and_a_slow_one_is_capped() {
        let (dir, files) = scratch_files("runner2");
        // `sh launch FILE --report R` fails: "launch" is not a script; its error is reported.
        match run_launch(Path::new("/bin/sh"), &files, Duration::from_secs(10)).unwrap() {
            Outcome::Failed(m) => assert!(m.starts_with("launch exit code"), "{m}"),
            o => panic!("{o:?}"),
        }
        // A script named "launch" that prints progress and sleeps past the cap.
        let script = dir.join("launch");
        std::fs::write(
            &script,
            "echo 'round 10  loss 1.0  test loss 0.9  test accuracy 0.5  (0.20 s)'\nexec sleep 30\n",
        )
        .unwrap();
        // The cap leaves the shell ample time to print its line on a loaded machine.
        let t = Instant::now();
        let out = run_launch(Path::new("/bin/sh"), &files, Duration::from_secs(3)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(25), "SIGTERM ends it");
        match out {
            Outcome::Capped { wall_s, progress } => {
                assert!((3.0..3.5).contains(&wall_s), "{wall_s}");
                assert_eq!(progress.len(), 1);
                assert_eq!(progress[0].test_accuracy, 0.5);
            }
            o => panic!("{o:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
