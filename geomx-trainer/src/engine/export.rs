//! The trained model as a safetensors file: one little-endian F32 tensor per key, named by
//! [`Model::export_names`] with the shape of its [`TensorSpec`](super::TensorSpec), so that the
//! equivalent PyTorch module loads it with `load_state_dict` (docs/architecture.md, "Model
//! export"). The file's metadata carries `format = "geomx"` and the parameters' `param_hash`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::Model;
use crate::hash::params_hash;

/// Largest safetensors file [`read`] accepts.
pub const MAX_EXPORT_BYTES: u64 = 16 << 30;

/// Why a model cannot be exported or read back.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The parameters do not fit the model.
    #[error("{0}")]
    Shape(String),
    /// safetensors refused the data or the file.
    #[error("{}: safetensors: {message}", path.display())]
    Format {
        /// The file (empty while serialising).
        path: PathBuf,
        /// The library's message.
        message: String,
    },
    /// Writing or reading the file failed.
    #[error(transparent)]
    Io(#[from] crate::checkpoint::CheckpointError),
}

/// One tensor read back: its shape and values.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// The safetensors bytes of `params` of `model`.
pub fn to_bytes(model: &dyn Model, params: &[Vec<f32>]) -> Result<Vec<u8>, ExportError> {
    let specs = model.tensors();
    let names = model.export_names();
    if params.len() != specs.len() || names.len() != specs.len() {
        return Err(ExportError::Shape(format!(
            "{} tensors for a model of {}",
            params.len(),
            specs.len()
        )));
    }
    let bytes: Vec<Vec<u8>> = params
        .iter()
        .map(|t| t.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(specs.len());
    for ((name, spec), b) in names.iter().zip(specs).zip(&bytes) {
        let v = TensorView::new(Dtype::F32, spec.shape.clone(), b)
            .map_err(|e| ExportError::Shape(format!("{name}: {e:?} (shape {:?})", spec.shape)))?;
        views.push((name.clone(), v));
    }
    let meta = HashMap::from([
        ("format".to_string(), "geomx".to_string()),
        (
            "param_hash".to_string(),
            format!("{:016x}", params_hash(params)),
        ),
    ]);
    safetensors::serialize(views, &Some(meta)).map_err(|e| ExportError::Format {
        path: PathBuf::new(),
        message: format!("{e:?}"),
    })
}

/// Writes `params` of `model` to `path` as safetensors, atomically.
pub fn write(path: &Path, model: &dyn Model, params: &[Vec<f32>]) -> Result<(), ExportError> {
    let bytes = to_bytes(model, params)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| crate::checkpoint::CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    crate::checkpoint::manifest::write_atomic(path, &bytes)?;
    Ok(())
}

/// A safetensors file read back: its tensors by name, and its metadata.
pub type Exported = (BTreeMap<String, Tensor>, HashMap<String, String>);

/// Reads a safetensors file of F32 tensors back: tensors by name, and the metadata.
pub fn read(path: &Path) -> Result<Exported, ExportError> {
    let bytes = crate::checkpoint::manifest::read_bounded(path, MAX_EXPORT_BYTES)?;
    let bad = |message: String| ExportError::Format {
        path: path.to_path_buf(),
        message,
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("{e:?}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("{e:?}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("{name}: {:?}, expected F32", view.dtype())));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let shape = view.shape().to_vec();
        out.insert(name, Tensor { shape, values });
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// The parameters of `model` from a file [`write`](fn@write) wrote: its tensors in key order, each checked
/// for name and shape.
pub fn read_params(path: &Path, model: &dyn Model) -> Result<Vec<Vec<f32>>, ExportError> {
    let (mut tensors, _) = read(path)?;
    model
        .export_names()
        .iter()
        .zip(model.tensors())
        .map(|(name, spec)| match tensors.remove(name) {
            Some(t) if t.shape == spec.shape => Ok(t.values),
            Some(t) => Err(ExportError::Shape(format!(
                "{}: {name} has shape {:?}, the model's is {:?}",
                path.display(),
                t.shape,
                spec.shape
            ))),
            None => Err(ExportError::Shape(format!(
                "{}: no tensor {name}",
                path.display()
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Mlp;

    #[test]
    fn mlp_export_reads_back_bit_identical_with_torch_names() {
        let mlp = Mlp::new(64, &[16, 8], 10).unwrap();
        let params = mlp.init(7);
        let path = std::env::temp_dir().join(format!("geomx-export-{}.st", std::process::id()));
        write(&path, &mlp, &params).unwrap();
        let (tensors, meta) = read(&path).unwrap();
        let names: Vec<&str> = tensors.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "layers.0.bias",
                "layers.0.weight",
                "layers.2.bias",
                "layers.2.weight",
                "layers.4.bias",
                "layers.4.weight"
            ]
        );
        // torch's Linear: weight [out, in], bias [out].
        assert_eq!(tensors["layers.0.weight"].shape, [16, 64]);
        assert_eq!(tensors["layers.4.weight"].shape, [10, 8]);
        assert_eq!(tensors["layers.2.bias"].shape, [8]);
        let back = read_params(&path, &mlp).unwrap();
        assert_eq!(params_hash(&back), params_hash(&params));
        assert_eq!(meta["param_hash"], format!("{:016x}", params_hash(&params)));
        assert_eq!(meta["format"], "geomx");
        // Another model's shapes are refused, naming the tensor.
        let other = Mlp::new(64, &[12, 8], 10).unwrap();
        let e = read_params(&path, &other).unwrap_err().to_string();
        assert!(e.contains("layers.0.weight"), "{e}");
        // Garbage is refused, naming the file.
        std::fs::write(&path, b"\x08\0\0\0\0\0\0\0{}garbage").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("safetensors"), "{e}");
        let _ = std::fs::remove_file(&path);
        assert!(to_bytes(&mlp, &params[..2]).is_err());
    }
}
