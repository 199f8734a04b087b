//! Safetensors files with metadata (tch's writer drops it), written atomically: a temporary file
//! in the same folder, fsynced, then renamed over the target.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::load::kind_of;
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

/// Errors reading or writing a tensor file.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    /// The OS refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid safetensors, or holds a dtype pso does not read.
    #[error("{path} is not a usable safetensors file: {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        _ => return None,
    })
}

/// Writes `tensors` (any device; f32/f16/bf16/f64/i64) and `metadata` to `path` atomically.
pub fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<(), TensorFileError> {
    let format = |why: String| TensorFileError::Format {
        path: path.to_owned(),
        why,
    };
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| {
            format(format!(
                "tensor `{name}` has unsupported dtype {:?}",
                t.kind()
            ))
        })?;
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut bytes, numel);
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.as_str(), dtype, shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (*name, v))
                .map_err(|e| format(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let info = (!metadata.is_empty()).then(|| metadata.clone());
    let data = safetensors::serialize(views, info).map_err(|e| format(e.to_string()))?;
    write_atomically(path, &data)
}

/// Writes `data` to `path` through a fsynced temporary file and a rename.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<(), TensorFileError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| TensorFileError::Io { path: p, source }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

/// A tensor file's tensors (on the CPU) and metadata.
#[derive(Debug)]
pub struct TensorFile {
    /// (name, tensor), sorted by name.
    pub tensors: Vec<(String, Tensor)>,
    /// The `__metadata__` map (empty when absent).
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file written by [`write`] or by another tool.
pub fn read(path: &Path) -> Result<TensorFile, TensorFileError> {
    let format = |why: String| TensorFileError::Format {
        path: path.to_owned(),
        why,
    };
    let data = std::fs::read(path).map_err(|source| TensorFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let (_, meta) = SafeTensors::read_metadata(&data).map_err(|e| format(e.to_string()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&data).map_err(|e| format(e.to_string()))?;
    let mut tensors = Vec::new();
    let mut names = meta.offset_keys();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(|e| format(e.to_string()))?;
        let kind = kind_of(view.dtype())
            .ok_or_else(|| format(format!("tensor `{name}` has dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.push((name, Tensor::from_data_size(view.data(), &shape, kind)));
    }
    Ok(TensorFile { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_and_metadata_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1]);
        let b = Tensor::from(7i64);
        let meta = HashMap::from([("format".to_string(), "test".to_string())]);
        write(
            &path,
            &[("a".into(), a.shallow_clone()), ("b".into(), b)],
            &meta,
        )
        .unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.metadata, meta);
        assert_eq!(back.tensors[0].0, "a");
        assert!(back.tensors[0].1.equal(&a));
        assert_eq!(back.tensors[1].1.int64_value(&[]), 7);
        assert!(!dir.path().join(".t.safetensors.tmp").exists());
        let e = read(&dir.path().join("missing.safetensors")).unwrap_err();
        assert!(e.to_string().contains("missing.safetensors"), "{e}");
    }
}
