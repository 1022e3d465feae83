//! Kernel sources (`cuda/*.cu`, one file per family) and their NVRTC compilation.
//!
//! Each family is compiled as `cuda/common.cuh` followed by the family's file, at first use, and
//! the PTX is cached per (family, architecture) for the life of the process.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::error::CudaError;

const COMMON: &str = include_str!("../../../cuda/common.cuh");

/// A family of kernels: one `.cu` file, one CUDA module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `cuda/cast.cu`: f32 ↔ f16 / bf16.
    Cast,
    /// `cuda/error_feedback.cu`: error feedback / momentum update, fused threshold count.
    ErrorFeedback,
    /// `cuda/topk.cu`: radix-select top-k and ordered compaction.
    Topk,
    /// `cuda/scatter.cu`: sparse scatter-add.
    Scatter,
    /// `cuda/dgt.cu`: DGT per-block mean |x|.
    Dgt,
    /// `cuda/fill.cu`: deterministic test patterns (tests and benchmarks).
    Fill,
}

impl Family {
    /// Every family, in a fixed order (the index of a family is its position here).
    pub const ALL: [Family; 6] = [
        Family::Cast,
        Family::ErrorFeedback,
        Family::Topk,
        Family::Scatter,
        Family::Dgt,
        Family::Fill,
    ];

    /// File stem under `cuda/`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Cast => "cast",
            Family::ErrorFeedback => "error_feedback",
            Family::Topk => "topk",
            Family::Scatter => "scatter",
            Family::Dgt => "dgt",
            Family::Fill => "fill",
        }
    }

    /// Position in [`Family::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The family's own source text (without the common prelude).
    pub fn source(self) -> &'static str {
        match self {
            Family::Cast => include_str!("../../../cuda/cast.cu"),
            Family::ErrorFeedback => include_str!("../../../cuda/error_feedback.cu"),
            Family::Topk => include_str!("../../../cuda/topk.cu"),
            Family::Scatter => include_str!("../../../cuda/scatter.cu"),
            Family::Dgt => include_str!("../../../cuda/dgt.cu"),
            Family::Fill => include_str!("../../../cuda/fill.cu"),
        }
    }

    /// The full program handed to NVRTC.
    pub fn program(self) -> String {
        format!(
            "{COMMON}\n#line 1 \"{}.cu\"\n{}",
            self.name(),
            self.source()
        )
    }
}

/// Whether `libnvrtc` can be loaded (never panics).
pub fn nvrtc_available() -> Result<(), CudaError> {
    // SAFETY: only tries to dlopen the candidate library names.
    let present =
        catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false);
    if present {
        Ok(())
    } else {
        Err(CudaError::NvrtcUnavailable {
            reason: "libnvrtc.so* not found on the library path (set LD_LIBRARY_PATH)".into(),
        })
    }
}

/// Compiles `family` to PTX for the virtual architecture `arch` (e.g. `compute_90`), or for
/// NVRTC's default when `arch` is `None`. Never panics.
pub fn compile(family: Family, arch: Option<&str>) -> Result<Ptx, CudaError> {
    nvrtc_available()?;
    let mut options = vec!["--std=c++17".to_string()];
    if let Some(arch) = arch {
        options.push(format!("--gpu-architecture={arch}"));
    }
    let opts = CompileOptions {
        options,
        name: Some(format!("{}.cu", family.name())),
        ..Default::default()
    };
    let program = family.program();
    let result = catch_unwind(AssertUnwindSafe(|| {
        cudarc::nvrtc::compile_ptx_with_opts(&program, opts)
    }));
    match result {
        Ok(Ok(ptx)) => Ok(ptx),
        Ok(Err(CompileError::CompileError { log, .. })) => Err(CudaError::Compile {
            family: family.name(),
            log: log.to_string_lossy().into_owned(),
        }),
        Ok(Err(e)) => Err(CudaError::Compile {
            family: family.name(),
            log: e.to_string(),
        }),
        Err(_) => Err(CudaError::NvrtcUnavailable {
            reason: "NVRTC library is missing a required symbol".into(),
        }),
    }
}

type PtxCache = Mutex<HashMap<(Family, String), Ptx>>;

/// [`compile`] with a process-wide cache keyed by (family, arch).
pub fn compile_cached(family: Family, arch: &str) -> Result<Ptx, CudaError> {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (family, arch.to_string());
    if let Some(ptx) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(ptx.clone());
    }
    let ptx = compile(family, Some(arch))?;
    tracing::debug!(
        family = family.name(),
        arch,
        "compiled CUDA kernels with NVRTC"
    );
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, ptx.clone());
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_kernels_and_the_prelude() {
        for (i, family) in Family::ALL.into_iter().enumerate() {
            assert_eq!(family.index(), i);
            assert!(
                family.source().contains("extern \"C\" __global__"),
                "{}",
                family.name()
            );
            let p = family.program();
            assert!(p.starts_with(COMMON));
            assert!(p.ends_with(family.source()));
        }
    }

    #[test]
    fn compile_reports_missing_nvrtc_as_an_error() {
        // With libnvrtc on the library path this compiles; without it, a typed error, no panic.
        match compile(Family::Scatter, None) {
            Ok(ptx) => assert!(ptx.to_src().contains(".entry scatter_add_f32(")),
            Err(e) => assert!(matches!(e, CudaError::NvrtcUnavailable { .. }), "{e}"),
        }
    }
}
