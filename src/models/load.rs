//! Loading diffusers / transformers component folders: `config.json` through serde, and
//! safetensors weights (single, sharded, or a precision variant) into a `tch` var store.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::de::DeserializeOwned;
use tch::{nn, Kind, Tensor};

/// Errors loading a model component; each names the file (and tensor) involved.
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
    /// A JSON file is malformed or misses a required key.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key).
        source: serde_json::Error,
    },
    /// A config asks for something this implementation does not build.
    #[error("{path}: unsupported {why}")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// What is unsupported.
        why: String,
    },
    /// A folder holds no weights in a format we read.
    #[error("no weights in {dir}: expected {expected}")]
    NoWeights {
        /// The component folder.
        dir: PathBuf,
        /// The file names looked for.
        expected: String,
    },
    /// A safetensors file is malformed.
    #[error("{path} is not a valid safetensors file: {why}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        why: String,
    },
    /// The model needs a tensor the files do not have.
    #[error("tensor `{name}` is missing from {files} (is this the right model folder for this component?)")]
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
    #[error("tensor `{name}` in {path} has unsupported dtype {dtype:?}")]
    DType {
        /// Tensor name.
        name: String,
        /// The file.
        path: PathBuf,
        /// Its dtype.
        dtype: Dtype,
    },
}

/// Reads and deserializes `dir/config.json`.
pub fn read_config<T: DeserializeOwned>(dir: &Path) -> Result<T, LoadError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json { path, source })
}

/// Weight files of a component folder, in this order of preference: a sharded index
/// (`*.safetensors.index.json`), then a single file; `variant` (e.g. `fp16`) picks
/// `NAME.VARIANT.safetensors` files.
pub fn weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>, LoadError> {
    let stems = ["diffusion_pytorch_model", "model"];
    let file = |stem: &str, ext: &str| match variant {
        Some(v) => format!("{stem}.{v}.{ext}"),
        None => format!("{stem}.{ext}"),
    };
    for stem in stems {
        let index = dir.join(file(stem, "safetensors.index.json"));
        if index.exists() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: HashMap<String, String>,
            }
            let text = std::fs::read_to_string(&index).map_err(|source| LoadError::Io {
                path: index.clone(),
                source,
            })?;
            let parsed: Index = serde_json::from_str(&text).map_err(|source| LoadError::Json {
                path: index.clone(),
                source,
            })?;
            let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
        }
        let single = dir.join(file(stem, "safetensors"));
        if single.exists() {
            return Ok(vec![single]);
        }
    }
    Err(LoadError::NoWeights {
        dir: dir.to_owned(),
        expected: stems
            .iter()
            .map(|s| file(s, "safetensors"))
            .collect::<Vec<_>>()
            .join(" or ")
            + " (or a sharded *.safetensors.index.json)",
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        _ => return None,
    })
}

/// Fills every variable of `vs` from the tensors of the same name in `files`, converting to
/// the variable's dtype and device. Tensors in the files that the model does not use are
/// ignored (e.g. `position_ids` buffers).
pub fn load_weights(vs: &nn::VarStore, files: &[PathBuf]) -> Result<(), LoadError> {
    let mut maps = Vec::with_capacity(files.len());
    for path in files {
        let file = File::open(path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the file is only read, and pso does not modify model files while loading.
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
        let Some((path, view)) = parsed
            .iter()
            .find_map(|(path, st)| st.tensor(&name).ok().map(|v| (*path, v)))
        else {
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
            dtype: view.dtype(),
        })?;
        let src = Tensor::from_data_size(view.data(), &found, kind);
        var.copy_(&src);
    }
    Ok(())
}

/// Builds a component: a fresh var store on `device`, the model laid out from its config,
/// then every variable loaded from the folder's weights.
pub fn load_component<T>(
    dir: &Path,
    device: tch::Device,
    variant: Option<&str>,
    build: impl FnOnce(nn::Path) -> T,
) -> Result<(nn::VarStore, T), LoadError> {
    let files = weight_files(dir, variant)?;
    let mut vs = nn::VarStore::new(device);
    let model = build(vs.root());
    load_weights(&vs, &files)?;
    vs.freeze();
    Ok((vs, model))
}
