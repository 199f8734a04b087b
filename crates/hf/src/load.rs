//! Reading HF model folders: JSON configs through serde, and safetensors weights copied by name
//! into a `tch` var store.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::de::DeserializeOwned;
use tch::{nn, Kind, Tensor};

/// Errors loading a model folder; each names the file (and key or tensor) involved.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A model folder does not exist or lacks a file the scorer needs.
    #[error("{path} not found: {what}")]
    NotFound {
        /// The missing file or folder.
        path: PathBuf,
        /// What it should hold and how to get it.
        what: String,
    },
    /// A JSON file is malformed, misses a required key or has a wrong value.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key, line and column).
        source: serde_json::Error,
    },
    /// A config asks for something this implementation does not support.
    #[error("{path}: unsupported {why}")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// What is unsupported, and what is.
        why: String,
    },
    /// A safetensors file is malformed.
    #[error("{path} is not a valid safetensors file: {why}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        why: String,
    },
    /// The model needs a tensor the weight files do not have.
    #[error(
        "tensor `{name}` is missing from {files} (is this the right model folder for this model?)"
    )]
    MissingTensor {
        /// Tensor name.
        name: String,
        /// The files searched.
        files: String,
    },
    /// A tensor has another shape than the config implies.
    #[error("tensor `{name}` in {path} has shape {found:?}, but the config implies {expected:?} (config.json and weights disagree)")]
    Shape {
        /// Tensor name.
        name: String,
        /// The file.
        path: PathBuf,
        /// Shape the model expects.
        expected: Vec<i64>,
        /// Shape in the file.
        found: Vec<i64>,
    },
    /// A tensor's element type cannot be loaded.
    #[error(
        "tensor `{name}` in {path} has unsupported dtype {dtype}; convert it to f32, f16 or bf16"
    )]
    DType {
        /// Tensor name.
        name: String,
        /// The file.
        path: PathBuf,
        /// Its dtype.
        dtype: String,
    },
}

/// Reads and deserializes a JSON file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Checks that a model folder exists, so that a typo gives a clear message rather than a
/// missing `config.json`.
pub fn check_dir(dir: &Path) -> Result<(), LoadError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(LoadError::NotFound {
            path: dir.to_owned(),
            what: "expected a local model folder (config.json, model.safetensors, tokenizer and \
                   preprocessor files); download it first, e.g. with `hf download`"
                .into(),
        })
    }
}

/// The safetensors weight files of a model folder: `model.safetensors` (transformers) or
/// `diffusion_pytorch_model.safetensors` (diffusers), or the shards their
/// `*.safetensors.index.json` lists; `variant` (e.g. `fp16`) picks `NAME.VARIANT.safetensors`.
pub fn weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>, LoadError> {
    let stems = ["model", "diffusion_pytorch_model"].map(|stem| match variant {
        Some(v) => format!("{stem}.{v}"),
        None => stem.to_owned(),
    });
    for stem in &stems {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.exists() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: HashMap<String, String>,
            }
            let parsed: Index = read_json(&index)?;
            let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
        }
        let single = dir.join(format!("{stem}.safetensors"));
        if single.exists() {
            return Ok(vec![single]);
        }
    }
    Err(LoadError::NotFound {
        path: dir.to_owned(),
        what: format!(
            "expected {}.safetensors or {}.safetensors (or a sharded *.safetensors.index.json); \
             convert a .bin checkpoint with `save_pretrained(..., safe_serialization=True)`",
            stems[0], stems[1]
        ),
    })
}

/// Reads a folder's `config.json`.
pub fn read_config<T: DeserializeOwned>(dir: &Path) -> Result<T, LoadError> {
    read_json(&dir.join("config.json"))
}

/// The libtorch kind of a safetensors dtype, for the dtypes pso reads.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        _ => return None,
    })
}

/// Fills every variable of `vs` from the tensor of the same name in `files`, converting to the
/// variable's dtype and device. Tensors the model does not use (e.g. `position_ids` buffers, or
/// the other tower of a CLIPModel) are ignored.
pub fn load_safetensors(vs: &nn::VarStore, files: &[PathBuf]) -> Result<(), LoadError> {
    load_safetensors_with_prefix(vs, files, None)
}

/// [`load_safetensors`], also accepting a variable `PREFIX.NAME` stored as `NAME`: transformers
/// 5 saves a model without its `base_model_prefix` (e.g. `text_model.` of a `CLIPTextModel`),
/// older versions with it, and both must load.
pub fn load_safetensors_with_prefix(
    vs: &nn::VarStore,
    files: &[PathBuf],
    optional_prefix: Option<&str>,
) -> Result<(), LoadError> {
    let mut maps = Vec::with_capacity(files.len());
    for path in files {
        let file = File::open(path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the file is only read, and nothing in pso writes model files while they load.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        maps.push((path, mmap));
    }
    let mut parsed = Vec::with_capacity(maps.len());
    for (path, mmap) in &maps {
        let st = SafeTensors::deserialize(mmap).map_err(|e| LoadError::Safetensors {
            path: (*path).clone(),
            why: e.to_string(),
        })?;
        parsed.push((*path, st));
    }
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let _guard = tch::no_grad_guard();
    for (name, mut var) in variables {
        let Some((path, view)) = parsed.iter().find_map(|(path, st)| {
            let stripped = optional_prefix
                .and_then(|p| name.strip_prefix(p))
                .and_then(|rest| rest.strip_prefix('.'));
            st.tensor(&name)
                .or_else(|e| stripped.map_or(Err(e), |short| st.tensor(short)))
                .ok()
                .map(|v| (*path, v))
        }) else {
            return Err(LoadError::MissingTensor {
                name,
                files: files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let found: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if found != var.size() {
            return Err(LoadError::Shape {
                name,
                path: path.clone(),
                expected: var.size(),
                found,
            });
        }
        let kind = kind_of(view.dtype()).ok_or_else(|| LoadError::DType {
            name: name.clone(),
            path: path.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        var.copy_(&Tensor::from_data_size(view.data(), &found, kind));
    }
    Ok(())
}

/// Builds a model on `device` in `kind`, then loads every variable from `files`; the returned
/// var store is frozen (inference only).
pub fn build_and_load<T>(
    files: &[PathBuf],
    device: tch::Device,
    kind: Kind,
    build: impl FnOnce(nn::Path) -> T,
) -> Result<(nn::VarStore, T), LoadError> {
    build_and_load_with_prefix(files, device, kind, None, build)
}

/// Reads `dir/config.json` as `C`, refuses what `check` says cannot be built (naming the
/// file), and builds and loads the model from the folder's weights (`variant`, e.g. fp16).
pub fn load_model<C: DeserializeOwned, M>(
    dir: &Path,
    device: tch::Device,
    kind: Kind,
    variant: Option<&str>,
    check: impl FnOnce(&C) -> Result<(), String>,
    build: impl FnOnce(nn::Path, &C) -> M,
) -> Result<(nn::VarStore, M), LoadError> {
    // The config first: an unbuildable one is named before missing weights are.
    let config = checked_config(dir, check)?;
    build_and_load(&weight_files(dir, variant)?, device, kind, |vs| {
        build(vs, &config)
    })
}

/// `dir/config.json` as `C`, refused with the file named when `check` says it cannot be built.
fn checked_config<C: DeserializeOwned>(
    dir: &Path,
    check: impl FnOnce(&C) -> Result<(), String>,
) -> Result<C, LoadError> {
    let config: C = read_config(dir)?;
    check(&config).map_err(|why| LoadError::Unsupported {
        path: dir.join("config.json"),
        why,
    })?;
    Ok(config)
}

/// [`load_model`] with the weights of `files` instead of the folder's own (a fine-tuned or
/// merged export in the folder's layout).
pub fn load_model_with_weights<C: DeserializeOwned, M>(
    dir: &Path,
    files: &[PathBuf],
    device: tch::Device,
    kind: Kind,
    check: impl FnOnce(&C) -> Result<(), String>,
    build: impl FnOnce(nn::Path, &C) -> M,
) -> Result<(nn::VarStore, M), LoadError> {
    let config = checked_config(dir, check)?;
    build_and_load(files, device, kind, |vs| build(vs, &config))
}

/// [`build_and_load`] through [`load_safetensors_with_prefix`].
pub fn build_and_load_with_prefix<T>(
    files: &[PathBuf],
    device: tch::Device,
    kind: Kind,
    optional_prefix: Option<&str>,
    build: impl FnOnce(nn::Path) -> T,
) -> Result<(nn::VarStore, T), LoadError> {
    let mut vs = nn::VarStore::new(device);
    let model = build(vs.root());
    vs.set_kind(kind);
    load_safetensors_with_prefix(&vs, files, optional_prefix)?;
    vs.freeze();
    Ok((vs, model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A var store with one linear layer `lin` (weight [3, 2], bias [3]).
    fn model() -> nn::VarStore {
        let vs = nn::VarStore::new(Device::Cpu);
        nn::linear(vs.root() / "lin", 2, 3, Default::default());
        vs
    }

    fn write(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join("model.safetensors");
        Tensor::write_safetensors(tensors, &path).unwrap();
        path
    }

    #[test]
    fn loads_by_name_converting_dtype_and_ignoring_extras() {
        let dir = tempfile::tempdir().unwrap();
        let weight = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([3, 2]);
        let path = write(
            dir.path(),
            &[
                ("lin.weight", weight.to_kind(Kind::Half)),
                ("lin.bias", Tensor::ones([3], (Kind::BFloat16, Device::Cpu))),
                (
                    "position_ids",
                    Tensor::arange(4, (Kind::Int64, Device::Cpu)),
                ),
            ],
        );
        let vs = model();
        load_safetensors(&vs, &[path]).unwrap();
        let vars = vs.variables();
        assert!(vars["lin.weight"].equal(&weight));
        assert_eq!(vars["lin.bias"].kind(), Kind::Float);
    }

    #[test]
    fn a_missing_tensor_is_named_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &[(
                "lin.weight",
                Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
            )],
        );
        let err = load_safetensors(&model(), std::slice::from_ref(&path)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LoadError::MissingTensor { .. }), "{msg}");
        assert!(msg.contains("`lin.bias`"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn a_wrong_shape_is_named_with_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &[
                (
                    "lin.weight",
                    Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
                ),
                ("lin.bias", Tensor::zeros([3], (Kind::Float, Device::Cpu))),
            ],
        );
        let err = load_safetensors(&model(), &[path]).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, LoadError::Shape { name, expected, found, .. }
                if name == "lin.weight" && expected == &[3, 2] && found == &[2, 3]),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_folder_or_weights_file_says_what_is_expected() {
        let err = check_dir(Path::new("/nonexistent/model")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/model"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = weight_files(dir.path(), Some("fp16")).unwrap_err();
        assert!(err.to_string().contains("model.fp16.safetensors"), "{err}");
    }
}
