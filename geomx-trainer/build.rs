//! Build script of geomx-trainer.
//!
//! Does nothing unless the `tch` feature is on. With it, it finds libtorch's library folder the way
//! torch-sys does (`LIBTORCH`, or the `torch` package of `PYTHON_SYS_EXECUTABLE` / `python` when
//! `LIBTORCH_USE_PYTORCH` is set) and
//! - sets an rpath to that folder, so `geomx` and the tests run without `LD_LIBRARY_PATH`;
//! - links `torch_cuda` with `-Wl,--no-as-needed` when the folder has it: nothing references its
//!   symbols directly, so an as-needed linker would drop it and libtorch would see no CUDA device.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    for var in [
        "LIBTORCH",
        "LIBTORCH_LIB",
        "LIBTORCH_USE_PYTORCH",
        "PYTHON_SYS_EXECUTABLE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Some(lib) = torch_lib_dir() else {
        println!(
            "cargo:warning=geomx-trainer: libtorch's lib folder not found (set LIBTORCH or \
             LIBTORCH_USE_PYTORCH=1); no rpath set, torch_cuda not linked"
        );
        return;
    };
    let lib = lib.display();
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&format!("{lib}/libtorch_cuda.so")).exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// libtorch's `lib` folder, found as torch-sys finds it.
fn torch_lib_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("LIBTORCH_LIB") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    if let Some(dir) = env::var_os("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    env::var_os("LIBTORCH_USE_PYTORCH")?;
    let python = env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into());
    let out = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    dir.is_dir().then_some(dir)
}
