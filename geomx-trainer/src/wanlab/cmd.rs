//! Running the `ip`, `tc` and `sysctl` tools.

use std::process::Command;

use super::WanLabError;

/// Runs `program args…`; returns its stdout, or the command, status and stderr when it fails.
pub fn run(program: &str, args: &[String]) -> Result<String, WanLabError> {
    let line = || format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| WanLabError::io(format!("starting `{}`", line()), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(WanLabError::Command {
            command: line(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// [`run`] with string slices.
pub fn run_str(program: &str, args: &[&str]) -> Result<String, WanLabError> {
    run(
        program,
        &args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
}

/// Splits a command written as one string on whitespace (no quoting).
pub fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}
