//! Where a model computes (`model.device`) and the `[model]` checks that do not need the data.

use std::fmt;

use super::{ModelConfig, ModelKind, Precision};

/// A compute device: the host CPU or one CUDA GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The host CPU.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl Device {
    /// Parses `"cpu"` or `"cuda:N"` (`"cuda"` alone means `cuda:0`).
    pub fn parse(s: &str) -> Option<Device> {
        match s {
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:")?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                n.parse().ok().map(Device::Cuda)
            }
        }
    }

    /// True for a CUDA device.
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `model.device` that picks the GPU from the launcher's local rank (`geomx run --from-env`).
pub const CUDA_LOCAL: &str = "cuda:local";

/// Number of devices a `CUDA_VISIBLE_DEVICES` value lists (its non-empty comma-separated
/// entries).
pub fn visible_count(visible: &str) -> usize {
    visible.split(',').filter(|s| !s.trim().is_empty()).count()
}

/// The device `geomx launch` gives its `index`-th worker (0-based over the whole job) on a host
/// whose processes see `gpus` GPUs: `cuda:{index mod gpus}` for `model.device = "cuda:local"`
/// (round robin), `None` for any other device (kept as written). Errors, with the reason, when
/// there is no GPU to give.
pub fn round_robin_device(
    device: &str,
    index: usize,
    gpus: usize,
) -> Result<Option<String>, String> {
    if device != CUDA_LOCAL {
        return Ok(None);
    }
    if gpus == 0 {
        return Err(
            "model.device = \"cuda:local\" gives each worker a GPU of this host, but it has none \
             (no CUDA device visible to libtorch, or CUDA_VISIBLE_DEVICES lists none); use \
             \"cpu\" or run where GPUs are"
                .into(),
        );
    }
    Ok(Some(format!("cuda:{}", index % gpus)))
}

/// True when this binary has the libtorch back end (feature `tch`).
pub const TCH_ENABLED: bool = cfg!(feature = "tch");

/// Longest emulated compute of one layer (`model.layer_delay_ms`).
const MAX_LAYER_DELAY_MS: f64 = 10_000.0;

/// `model.layer_delay_ms`: the MLP's, one finite value in [0, 10 s] per layer.
fn check_layer_delays(cfg: &ModelConfig) -> Result<(), (String, String)> {
    let d = &cfg.layer_delay_ms;
    if d.is_empty() {
        return Ok(());
    }
    let field = || "model.layer_delay_ms".to_string();
    if cfg.kind != ModelKind::Mlp {
        return Err((
            field(),
            "emulated compute is for the built-in mlp only".into(),
        ));
    }
    if d.len() != cfg.hidden.len() + 1 {
        return Err((
            field(),
            format!(
                "{} values for {} layers (hidden.len() + 1)",
                d.len(),
                cfg.hidden.len() + 1
            ),
        ));
    }
    match d
        .iter()
        .find(|v| !(v.is_finite() && (0.0..=MAX_LAYER_DELAY_MS).contains(*v)))
    {
        Some(v) => Err((
            field(),
            format!("{v} is not in [0, {MAX_LAYER_DELAY_MS}] ms"),
        )),
        None => Ok(()),
    }
}

/// Checks `[model]` without the data: the device string, that libtorch models are compiled in,
/// and that the built-in MLP runs on the CPU. On error returns `(field, message)`.
pub fn validate_model_config(cfg: &ModelConfig) -> Result<(), (String, String)> {
    // `cuda:local` becomes `cuda:<local rank>` in `geomx run --from-env`; check it as a GPU.
    let parsed = match cfg.device.as_str() {
        CUDA_LOCAL => Some(Device::Cuda(0)),
        d => Device::parse(d),
    };
    let Some(device) = parsed else {
        return Err((
            "model.device".into(),
            format!(
                "{:?} is not \"cpu\", \"cuda:N\" or \"cuda:local\"",
                cfg.device
            ),
        ));
    };
    check_layer_delays(cfg)?;
    match cfg.kind {
        ModelKind::Mlp if device != Device::Cpu => Err((
            "model.device".into(),
            format!(
                "the built-in mlp runs on the cpu only, not {}; use model.kind = \"cnn\" or \
                 \"resnet18\" (feature tch) for GPUs",
                cfg.device
            ),
        )),
        ModelKind::Mlp if cfg.precision != Precision::Fp32 => Err((
            "model.precision".into(),
            format!(
                "the built-in mlp computes in fp32 only, not \"{}\"; mixed precision is for the \
                 libtorch models (model.kind = \"cnn\" or \"resnet18\")",
                cfg.precision
            ),
        )),
        ModelKind::Cnn | ModelKind::Resnet18 if !TCH_ENABLED => Err((
            "model.kind".into(),
            format!(
                "{:?} needs the libtorch back end: build with `--features tch` (docs/tch.md)",
                cfg.kind
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_cuda_ordinals() {
        assert_eq!(Device::parse("cpu"), Some(Device::Cpu));
        assert_eq!(Device::parse("cuda"), Some(Device::Cuda(0)));
        assert_eq!(Device::parse("cuda:3"), Some(Device::Cuda(3)));
        for bad in [
            "", "gpu", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "CPU", "cuda:1 ",
        ] {
            assert_eq!(Device::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        assert_eq!(
            Device::parse(&Device::Cuda(7).to_string()),
            Some(Device::Cuda(7))
        );
    }

    #[test]
    fn cuda_local_workers_share_the_gpus_round_robin() {
        let got: Vec<String> = (0..5)
            .map(|i| round_robin_device(CUDA_LOCAL, i, 2).unwrap().unwrap())
            .collect();
        assert_eq!(got, ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]);
        assert_eq!(round_robin_device("cuda:3", 1, 2), Ok(None));
        assert_eq!(round_robin_device("cpu", 1, 0), Ok(None));
        let e = round_robin_device(CUDA_LOCAL, 0, 0).unwrap_err();
        assert!(e.contains("has none"), "{e}");
        assert_eq!(visible_count("0,1, 3"), 3);
        assert_eq!(visible_count(" "), 0);
        assert_eq!(visible_count("GPU-6f1c"), 1);
    }

    #[test]
    fn model_checks_name_their_field() {
        let mut cfg = ModelConfig::default();
        assert_eq!(validate_model_config(&cfg), Ok(()));
        cfg.device = "tpu".into();
        assert_eq!(validate_model_config(&cfg).unwrap_err().0, "model.device");
        cfg.device = "cuda:0".into();
        let (field, msg) = validate_model_config(&cfg).unwrap_err();
        assert_eq!(field, "model.device");
        assert!(msg.contains("cpu only"), "{msg}");
        cfg.device = CUDA_LOCAL.into();
        let (field, msg) = validate_model_config(&cfg).unwrap_err();
        assert_eq!(field, "model.device");
        assert!(msg.contains("not cuda:local"), "{msg}");
        cfg.device = "cpu".into();
        cfg.precision = Precision::Bf16;
        let (field, msg) = validate_model_config(&cfg).unwrap_err();
        assert_eq!(field, "model.precision");
        assert!(msg.contains("fp32 only"), "{msg}");
        cfg.device = CUDA_LOCAL.into();
        cfg.kind = ModelKind::Cnn;
        let r = validate_model_config(&cfg);
        if TCH_ENABLED {
            assert_eq!(r, Ok(()));
        } else {
            assert_eq!(r.unwrap_err().0, "model.kind");
        }
    }
}
