//! NVRTC compiles every kernel family (`cuda/*.cu`) without a GPU. Skips, printing why, when
//! `libnvrtc.so*` is not on the library path (see docs/gpu.md for getting it from PyPI).
#![cfg(feature = "cuda")]

use geomx_kernels::cuda::{compile, nvrtc_available, Family};

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
