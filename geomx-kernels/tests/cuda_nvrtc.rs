//! NVRTC compiles every kernel family (`cuda/*.cu`) without a GPU. Skips, printing why, when
//! `libnvrtc.so*` is not on the library path (see docs/gpu.md for getting it from PyPI).
#![cfg(feature = "cuda")]

use geomx_kernels::cuda::{compile, nvrtc_available, ptxas_resources, Family};

/// Names of the `extern "C" __global__` kernels a source defines.
fn kernel_names(src: &str) -> Vec<String> {
    src.split("extern \"C\" __global__ void ")
        .skip(1)
        .map(|rest| {
            rest.split('(')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

#[test]
fn every_kernel_family_compiles_with_nvrtc() {
    if let Err(e) = nvrtc_available() {
        eprintln!("skipping NVRTC compile test: {e}");
        return;
    }
    for family in Family::ALL {
        let names = kernel_names(family.source());
        assert!(!names.is_empty(), "{} defines no kernel", family.name());
        for arch in [None, Some("compute_80"), Some("compute_90")] {
            let ptx = compile(family, arch).unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            for name in &names {
                assert!(
                    text.contains(&format!(".entry {name}(")),
                    "{}.cu ({arch:?}): kernel {name} missing from the PTX",
                    family.name()
                );
            }
            if let Some(arch) = arch {
                let sm = arch.replace("compute_", "sm_");
                assert!(
                    text.contains(&format!(".target {sm}")),
                    "PTX target is not {sm}"
                );
            }
        }
    }
}

/// Threads per block each kernel is launched with (geomx-kernels/src/cuda/*.rs).
fn block_threads(kernel: &str) -> u32 {
    match kernel {
        "topk_select" | "topk_scan_counts" => 1024,
        _ => 256,
    }
}

#[test]
fn kernels_fit_their_launch_and_do_not_spill() {
    if let Err(e) = nvrtc_available() {
        eprintln!("skipping ptxas resource test: {e}");
        return;
    }
    for family in Family::ALL {
        let mut names = kernel_names(family.source());
        names.sort();
        for sm in ["sm_80", "sm_90"] {
            let res = ptxas_resources(family, sm).unwrap_or_else(|e| panic!("{e}"));
            let mut got: Vec<String> = res.iter().map(|r| r.name.clone()).collect();
            got.sort();
            assert_eq!(
                got,
                names,
                "{}.cu on {sm}: kernels reported by ptxas",
                family.name()
            );
            for r in &res {
                assert_eq!(r.spill_stores, 0, "{} spills on {sm}", r.name);
                // 64K registers per block on sm_80 / sm_90.
                let regs = r.registers * block_threads(&r.name);
                assert!(
                    r.registers > 0 && regs <= 65_536,
                    "{} on {sm}: {} registers/thread",
                    r.name,
                    r.registers
                );
            }
        }
    }
}
