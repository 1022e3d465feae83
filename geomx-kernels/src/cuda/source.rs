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

/// Register and spill use of one kernel, from ptxas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    /// Kernel name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of register spill stores.
    pub spill_stores: u32,
}

/// Compiles `family` for the real architecture `sm` (e.g. `sm_90`) with `ptxas -v` and returns
/// each kernel's resource use: a check of launchability (registers × threads per block) that
/// needs NVRTC but no GPU.
pub fn ptxas_resources(family: Family, sm: &str) -> Result<Vec<KernelResources>, CudaError> {
    use cudarc::nvrtc::result;
    use std::ffi::{CStr, CString};

    nvrtc_available()?;
    let err = |log: String| CudaError::Compile {
        family: family.name(),
        log,
    };
    let src = CString::new(family.program()).map_err(|e| err(e.to_string()))?;
    let name = CString::new(format!("{}.cu", family.name())).map_err(|e| err(e.to_string()))?;
    let mut options = vec![
        "--std=c++17".to_string(),
        format!("--gpu-architecture={sm}"),
        "--ptxas-options=-v".to_string(),
    ];
    let log = catch_unwind(AssertUnwindSafe(|| -> Result<String, CudaError> {
        // NVRTC 12.9 and later cache compiled programs across processes, and a program served
        // from the cache gets no ptxas report: a second run on the same machine saw none.
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let _ = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        if (major, minor) >= (12, 9) {
            options.push("--no-cache".to_string());
        }
        let prog = result::create_program(&src, Some(&name)).map_err(|e| err(format!("{e:?}")))?;
        // SAFETY: prog is a live program; it is destroyed exactly once below.
        let compiled = unsafe { result::compile_program(prog, &options) };
        // SAFETY: as above.
        let raw = unsafe { result::get_program_log(prog) };
        // SAFETY: as above; prog is not used afterwards.
        let _ = unsafe { result::destroy_program(prog) };
        let raw = raw.map_err(|e| err(format!("{e:?}")))?;
        // SAFETY: NVRTC returns a NUL-terminated log.
        let log = unsafe { CStr::from_ptr(raw.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        compiled.map_err(|_| err(log.clone()))?;
        Ok(log)
    }))
    .map_err(|_| CudaError::NvrtcUnavailable {
        reason: "NVRTC library is missing a required symbol".into(),
    })??;
    Ok(parse_ptxas_log(&log))
}

/// Parses `ptxas -v` output into per-kernel resources.
fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let pos = line.find(word)?;
        line[..pos].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            out.push(KernelResources {
                name: rest.trim().to_string(),
                registers: 0,
                spill_stores: 0,
            });
        } else if let Some(k) = out.last_mut() {
            if let Some(v) = number_before(line, "bytes spill stores") {
                k.spill_stores = v;
            }
            if let Some(v) = number_before(line, "registers") {
                k.registers = v;
            }
        }
    }
    out
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
    fn ptxas_log_parsing() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
            ptxas info    : Function properties for k\n\
            ptxas         .     0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n\
            ptxas info    : Used 76 registers, used 1 barriers, 64 bytes smem\n\
            ptxas info    : Function properties for j\n\
            ptxas info    : Used 12 registers, used 0 barriers\n";
        let r = parse_ptxas_log(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].name.as_str(), r[0].registers, r[0].spill_stores),
            ("k", 76, 8)
        );
        assert_eq!(
            (r[1].name.as_str(), r[1].registers, r[1].spill_stores),
            ("j", 12, 0)
        );
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
