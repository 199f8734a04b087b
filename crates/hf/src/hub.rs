//! `--model` (a pipeline) and single-file arguments such as `--inception` as Hugging Face Hub
//! ids: found in the standard HF cache (`HF_HOME`, default `~/.cache/huggingface`), or
//! downloaded into it with hf-hub. With `HF_HUB_OFFLINE=1` only the cache is used.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use crate::HfError;

/// Component folders of the pipelines this crate runs, and the files they need besides weights.
const COMPONENTS: [&str; 10] = [
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
];
const SMALL_FILES: [&str; 7] = [
    "config.json",
    "scheduler_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Whether `spec` has the shape of a hub id (`owner/name`).
fn is_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The variant (`fp16`, …) a weight file name carries, if any: `NAME.VARIANT.safetensors`,
/// `NAME.VARIANT-00001-of-00002.safetensors`, `NAME.VARIANT.safetensors.index.json`.
fn weight_variant(file: &str) -> Option<Option<&str>> {
    let stem = file
        .strip_suffix(".safetensors.index.json")
        .or_else(|| file.strip_suffix(".safetensors"))?;
    let stem = stem.split('-').next().unwrap_or(stem);
    Some(stem.split_once('.').map(|(_, v)| v))
}

/// The repository files a pipeline needs: model_index.json, each component's configs and
/// tokenizer files, and its safetensors weights of the requested variant.
pub fn needed_files<'a>(repo_files: &'a [String], variant: Option<&str>) -> Vec<&'a str> {
    repo_files
        .iter()
        .map(String::as_str)
        .filter(|f| {
            if *f == "model_index.json" {
                return true;
            }
            let Some((dir, name)) = f.split_once('/') else {
                return false;
            };
            if !COMPONENTS.contains(&dir) || name.contains('/') {
                return false;
            }
            SMALL_FILES.contains(&name) || weight_variant(name) == Some(variant)
        })
        .collect()
}

/// The Hub client (HF_ENDPOINT, HF_TOKEN, HF_HOME from the environment), with download progress
/// on a terminal.
fn hub_api() -> Result<hf_hub::api::sync::Api, String> {
    hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .map_err(|e| format!("cannot reach the Hugging Face Hub: {e}"))
}

/// `owner/name`, or `owner/name@REVISION` (a branch, tag, commit or `refs/pr/N`), as a Hub
/// model repository.
fn parse_repo(spec: &str) -> Option<hf_hub::Repo> {
    match spec.split_once('@') {
        None => is_repo_id(spec).then(|| hf_hub::Repo::model(spec.to_owned())),
        Some((id, revision)) => (is_repo_id(id) && !revision.is_empty()).then(|| {
            hf_hub::Repo::with_revision(id.to_owned(), hf_hub::RepoType::Model, revision.to_owned())
        }),
    }
}

/// The model components of a repository listing that have a `config.json` but no safetensors
/// weights of `variant`, each with the other weight files it holds.
pub fn components_without_weights(
    repo_files: &[String],
    variant: Option<&str>,
) -> Vec<(String, Vec<String>)> {
    fn in_dir<'a>(files: &'a [String], dir: &'a str) -> impl Iterator<Item = &'a str> {
        files
            .iter()
            .filter_map(move |f| f.strip_prefix(dir)?.strip_prefix('/'))
            .filter(|name| !name.contains('/'))
    }
    COMPONENTS
        .iter()
        .filter(|dir| !dir.starts_with("tokenizer") && **dir != "scheduler")
        .filter(|dir| in_dir(repo_files, dir).any(|n| n == "config.json"))
        .filter(|dir| !in_dir(repo_files, dir).any(|n| weight_variant(n) == Some(variant)))
        .map(|dir| {
            let others = in_dir(repo_files, dir)
                .filter(|n| {
                    [".bin", ".safetensors", ".ckpt", ".pt"]
                        .iter()
                        .any(|e| n.ends_with(e))
                })
                .map(|n| format!("{dir}/{n}"))
                .collect();
            (dir.to_string(), others)
        })
        .collect()
}

/// What a repository holds, and so which of its files are fetched.
#[derive(Debug, Clone, Copy)]
enum Layout<'a> {
    /// A diffusers pipeline (model_index.json and component folders), weights of `variant`.
    Pipeline { variant: Option<&'a str> },
    /// A transformers model such as a CLIPModel: configs, tokenizer and safetensors at the top.
    Model,
}

impl Layout<'_> {
    /// The file whose folder is the resolved root.
    fn marker(self) -> &'static str {
        match self {
            Layout::Pipeline { .. } => "model_index.json",
            Layout::Model => "config.json",
        }
    }
}

/// Resolves `--model`: an existing folder as is, otherwise a hub id (`owner/name`, or
/// `owner/name@REVISION`) through the HF cache.
pub fn resolve_model(spec: &str, variant: Option<&str>) -> Result<PathBuf, HfError> {
    resolve_repo(spec, Layout::Pipeline { variant })
}

/// A pipeline `spec` that is here already: an existing folder, or a hub id whose snapshot is
/// in the Hugging Face cache. Never touches the network.
pub fn local_model(spec: &str) -> Option<PathBuf> {
    let path = Path::new(spec);
    let repo_ref = match parse_repo(spec) {
        Some(repo) if !path.exists() => repo,
        _ => return path.exists().then(|| path.to_owned()),
    };
    hf_hub::Cache::from_env()
        .repo(repo_ref)
        .get(Layout::Pipeline { variant: None }.marker())
        .and_then(|p| p.parent().map(Path::to_owned))
}

/// Resolves a scorer's model (a transformers model folder such as PickScore's CLIPModel): an
/// existing folder as is, otherwise a hub id through the HF cache, fetching its top-level
/// configs, tokenizer files and safetensors weights.
pub fn resolve_model_folder(spec: &str) -> Result<PathBuf, HfError> {
    resolve_repo(spec, Layout::Model)
}

/// The top-level files of a transformers model repository that a scorer reads.
fn model_files(repo_files: &[String]) -> Vec<&str> {
    repo_files
        .iter()
        .map(String::as_str)
        .filter(|f| !f.contains('/'))
        .filter(|f| {
            SMALL_FILES.contains(f)
                || *f == "preprocessor_config.json"
                || f.ends_with(".safetensors")
                || f.ends_with(".safetensors.index.json")
        })
        .collect()
}

fn resolve_repo(spec: &str, layout: Layout) -> Result<PathBuf, HfError> {
    let path = Path::new(spec);
    let repo_ref = match parse_repo(spec) {
        Some(repo) if !path.exists() => repo,
        _ => return Ok(path.to_owned()),
    };
    let cache = hf_hub::Cache::from_env();
    let cached = cache
        .repo(repo_ref.clone())
        .get(layout.marker())
        .and_then(|p| p.parent().map(Path::to_owned));
    if offline() {
        return cached.ok_or_else(|| HfError::Hub {
            path: cache.path().join(repo_ref.folder_name()),
            why: format!(
                "`{spec}` is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE \
                 is set; download it where there is network (`hf download {spec}`) and copy the \
                 cache, set HF_HOME to where it is, or pass a local folder"
            ),
        });
    }
    let hub_error = |why: String| HfError::Hub {
        path: PathBuf::from(spec),
        why,
    };
    let api = hub_api().map_err(hub_error)?;
    let repo = api.repo(repo_ref);
    let info = repo.info().map_err(|e| {
        hub_error(format!(
            "not a local folder, and the Hub lookup failed: {e} (check the id, your network, or \
             HF_TOKEN for gated models; HF_HUB_OFFLINE=1 uses the cache only)"
        ))
    })?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let needed = match layout {
        Layout::Pipeline { variant } => {
            check_pipeline_files(spec, &files, variant).map_err(hub_error)?;
            needed_files(&files, variant)
        }
        Layout::Model => {
            let needed = model_files(&files);
            if !needed.contains(&"config.json") {
                return Err(hub_error(
                    "the repository has no config.json: it is not a transformers model".into(),
                ));
            }
            if !needed.iter().any(|f| f.ends_with(".safetensors")) {
                return Err(hub_error(
                    "the repository has no .safetensors weights at its top level; pso reads \
                     safetensors only: save the model with `save_pretrained(DIR, \
                     safe_serialization=True)` and pass DIR"
                        .into(),
                ));
            }
            needed
        }
    };
    let mut root = None;
    for file in needed {
        tracing::info!("downloading {spec}/{file}");
        let local = repo
            .get(file)
            .map_err(|e| hub_error(format!("downloading {file}: {e}")))?;
        if file == layout.marker() {
            root = local.parent().map(Path::to_owned);
        }
    }
    Ok(root.expect("the marker file was downloaded"))
}

/// Refuses a repository listing that is no pipeline, or whose components lack safetensors
/// weights of `variant`; says what to pass instead.
fn check_pipeline_files(spec: &str, files: &[String], variant: Option<&str>) -> Result<(), String> {
    if !files.iter().any(|f| f == "model_index.json") {
        return Err(
            "the repository has no model_index.json: it is not a diffusers pipeline".into(),
        );
    }
    if let Some((dir, others)) = components_without_weights(files, variant).first() {
        let variant = variant
            .map(|v| format!(" of variant {v}"))
            .unwrap_or_default();
        return Err(format!(
            "{dir}/ has no .safetensors weights{variant} (it holds {}); pso reads safetensors \
             only: pass a revision that has them (`{}@refs/pr/N` of the Hub's safetensors \
             conversion, or a branch), or save the pipeline with diffusers' \
             `save_pretrained(DIR, safe_serialization=True)` and pass DIR",
            if others.is_empty() {
                "no weight file".to_owned()
            } else {
                others.join(", ")
            },
            spec.split('@').next().unwrap_or(spec)
        ));
    }
    Ok(())
}

/// Resolves a one-file argument: an existing file as is; otherwise `owner/name/PATH` (that file
/// of a Hub model repository) or `owner/name` (the repository's one file ending in one of
/// `extensions`), through the HF cache as [`resolve_model`].
pub fn resolve_file(spec: &str, extensions: &[&str]) -> Result<PathBuf, HfError> {
    resolve_file_in(&hf_hub::Cache::from_env(), offline(), spec, extensions)
}

fn resolve_file_in(
    cache: &hf_hub::Cache,
    offline: bool,
    spec: &str,
    extensions: &[&str],
) -> Result<PathBuf, HfError> {
    let path = Path::new(spec);
    let parts: Vec<&str> = spec.splitn(3, '/').collect();
    let (repo_id, file) = match parts.as_slice() {
        _ if path.exists() => return Ok(path.to_owned()),
        [owner, name, file] if is_repo_id(&format!("{owner}/{name}")) => (
            format!("{owner}/{name}"),
            Some(*file).filter(|f| !f.is_empty()),
        ),
        _ if is_repo_id(spec) => (spec.to_owned(), None),
        _ => return Ok(path.to_owned()),
    };
    let wanted = |f: &str| extensions.iter().any(|e| f.ends_with(e));
    let pick = |files: Vec<String>, where_: &str| -> Result<String, HfError> {
        let found: Vec<String> = files.into_iter().filter(|f| wanted(f)).collect();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(HfError::Hub {
                path: PathBuf::from(spec),
                why: format!(
                    "{where_} holds {} file(s) ending in {}{}; name one as {repo_id}/FILE",
                    found.len(),
                    extensions.join(" / "),
                    if found.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", found.join(", "))
                    }
                ),
            }),
        }
    };
    if offline {
        let snapshot = cached_snapshot(cache, &repo_id);
        let file = match (file, &snapshot) {
            (Some(f), _) => Some(f.to_owned()),
            (None, Some(dir)) => Some(pick(files_under(dir, dir), "the cached snapshot")?),
            (None, None) => None,
        };
        return file
            .as_deref()
            .and_then(|f| cache.model(repo_id.clone()).get(f))
            .ok_or_else(|| HfError::Hub {
                path: PathBuf::from(spec),
                why: format!(
                    "neither a local file nor in the Hugging Face cache ({}), and HF_HUB_OFFLINE \
                     is set; download it where there is network (`hf download {repo_id}{}`) \
                     and copy the cache, set HF_HOME to where it is, or pass a local file",
                    cache.path().display(),
                    file.as_deref().map(|f| format!(" {f}")).unwrap_or_default()
                ),
            });
    }
    let hub_error = |why: String| HfError::Hub {
        path: PathBuf::from(spec),
        why,
    };
    let api = hub_api().map_err(hub_error)?;
    let repo = api.model(repo_id.clone());
    let file = match file {
        Some(f) => f.to_owned(),
        None => {
            let info = repo.info().map_err(|e| {
                hub_error(format!(
                    "not a local file, and the Hub lookup of {repo_id} failed: {e} (check the \
                     id and your network; HF_HUB_OFFLINE=1 uses the cache only)"
                ))
            })?;
            let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
            pick(files, &format!("the repository {repo_id}"))?
        }
    };
    tracing::info!("downloading {repo_id}/{file}");
    repo.get(&file).map_err(|e| {
        hub_error(format!(
            "not a local file, and downloading {file} from {repo_id} failed: {e}"
        ))
    })
}

/// The snapshot folder `refs/main` of a cached model repository points at.
fn cached_snapshot(cache: &hf_hub::Cache, repo_id: &str) -> Option<PathBuf> {
    let repo = cache
        .path()
        .join(hf_hub::Repo::model(repo_id.to_owned()).folder_name());
    let commit = std::fs::read_to_string(repo.join("refs/main")).ok()?;
    Some(repo.join("snapshots").join(commit.trim())).filter(|p| p.is_dir())
}

/// The files under `dir`, as paths relative to `root` with `/` separators.
fn files_under(dir: &Path, root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for path in entries.filter_map(Result::ok).map(|e| e.path()) {
        if path.is_dir() {
            out.extend(files_under(&path, root));
        } else if let Ok(rel) = path.strip_prefix(root) {
            let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy()).collect();
            out.push(parts.join("/"));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(is_repo_id("stabilityai/sd-turbo"));
        assert!(is_repo_id("tianweiy/DMD2"));
        for not in [
            "sd-turbo",
            "./a/b",
            "/abs/path",
            "a/b/c",
            "a/",
            "a b/c",
            "../x",
        ] {
            assert!(!is_repo_id(not), "{not}");
        }
    }

    #[test]
    fn single_files_resolve_from_the_cache_offline_by_path_or_by_extension() {
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join("hub/models--fid--inception");
        let snapshot = repo.join("snapshots/abc123");
        std::fs::create_dir_all(snapshot.join("jit")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        std::fs::write(snapshot.join("jit/inception.pt"), b"x").unwrap();
        std::fs::write(snapshot.join("README.md"), b"x").unwrap();
        let cache = hf_hub::Cache::new(home.path().join("hub"));
        let resolve_file = |spec: &str, ext: &[&str]| resolve_file_in(&cache, true, spec, ext);
        let want = snapshot.join("jit/inception.pt");
        assert_eq!(resolve_file("fid/inception", &[".pt"]).unwrap(), want);
        assert_eq!(
            resolve_file("fid/inception/jit/inception.pt", &[".pt"]).unwrap(),
            want
        );
        let e = resolve_file("fid/inception", &[".pth"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0 file(s) ending in .pth") && e.contains("fid/inception/FILE"),
            "{e}"
        );
        std::fs::write(snapshot.join("other.pt"), b"x").unwrap();
        let e = resolve_file("fid/inception", &[".pt"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("(jit/inception.pt, other.pt)"), "{e}");
        let e = resolve_file("fid/missing/x.pt", &[".pt"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
        let local = home.path().join("local.pt");
        std::fs::write(&local, b"x").unwrap();
        let spec = local.to_str().unwrap();
        assert_eq!(resolve_file(spec, &[".pt"]).unwrap(), local);
    }

    #[test]
    fn flow_pipelines_fetch_their_t5_encoders_and_sharded_weights() {
        // The file lists of stabilityai/stable-diffusion-3.5-large-turbo and
        // black-forest-labs/FLUX.1-schnell (weights shortened to what the rules see).
        let sd3: Vec<String> = [
            "model_index.json",
            "sd3.5_large_turbo.safetensors",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors",
            "text_encoder_3/config.json",
            "text_encoder_3/model-00001-of-00002.safetensors",
            "text_encoder_3/model-00002-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.json",
            "tokenizer/merges.txt",
            "tokenizer/vocab.json",
            "tokenizer_3/spiece.model",
            "tokenizer_3/tokenizer.json",
            "tokenizer_3/tokenizer_config.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
        .map(String::from)
        .to_vec();
        let needed = needed_files(&sd3, None);
        for f in [
            "text_encoder_3/model-00001-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.json",
            "tokenizer_3/tokenizer.json",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
        ] {
            assert!(needed.contains(&f), "{f} missing from {needed:?}");
        }
        assert!(!needed.contains(&"sd3.5_large_turbo.safetensors"));
        assert!(!needed.contains(&"tokenizer_3/spiece.model"));
        assert!(components_without_weights(&sd3, None).is_empty());
    }

    #[test]
    fn a_z_image_pipeline_fetches_its_sharded_qwen3_and_tokenizer() {
        // The file list of Tongyi-MAI/Z-Image-Turbo (weights shortened to what the rules see).
        let files: Vec<String> = [
            "model_index.json",
            "README.md",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model-00001-of-00003.safetensors",
            "text_encoder/model-00003-of-00003.safetensors",
            "text_encoder/model.safetensors.index.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
        .map(String::from)
        .to_vec();
        let needed = needed_files(&files, None);
        for f in [
            "text_encoder/model-00003-of-00003.safetensors",
            "text_encoder/model.safetensors.index.json",
            "tokenizer/tokenizer.json",
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        ] {
            assert!(needed.contains(&f), "{f} missing from {needed:?}");
        }
        assert!(!needed.contains(&"README.md"));
        assert!(components_without_weights(&files, None).is_empty());
    }

    #[test]
    fn revisions_parse_and_pickled_only_components_are_named() {
        let repo = parse_repo("facebook/DiT-XL-2-256@refs/pr/1").unwrap();
        assert_eq!(repo.revision(), "refs/pr/1");
        assert_eq!(repo.folder_name(), "models--facebook--DiT-XL-2-256");
        assert_eq!(parse_repo("a/b").unwrap().revision(), "main");
        assert!(parse_repo("a/b@").is_none() && parse_repo("a@b").is_none());
        let files: Vec<String> = [
            "model_index.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.bin",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            components_without_weights(&files, None),
            [(
                "transformer".to_owned(),
                vec!["transformer/diffusion_pytorch_model.bin".to_owned()]
            )]
        );
        let fp16 = components_without_weights(&files, Some("fp16"));
        assert_eq!(fp16.len(), 2, "{fp16:?}");
    }

    #[test]
    fn a_model_repository_fetches_its_top_level_configs_tokenizer_and_safetensors() {
        let files: Vec<String> = [
            "config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "preprocessor_config.json",
            "tokenizer.json",
            "merges.txt",
            "vocab.json",
            "README.md",
            "onnx/model.safetensors",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            model_files(&files),
            [
                "config.json",
                "model.safetensors",
                "preprocessor_config.json",
                "tokenizer.json",
                "merges.txt",
                "vocab.json"
            ]
        );
    }

    #[test]
    fn a_cached_model_repository_resolves_offline() {
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join("hub/models--yuvalkirstain--PickScore_v1");
        let snapshot = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        std::fs::write(snapshot.join("config.json"), b"{}").unwrap();
        // No other test of this crate reads HF_HOME or HF_HUB_OFFLINE.
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        assert_eq!(
            resolve_model_folder("yuvalkirstain/PickScore_v1").unwrap(),
            snapshot
        );
        let e = resolve_model_folder("yuvalkirstain/missing")
            .unwrap_err()
            .to_string();
        assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    }

    #[test]
    fn only_the_needed_files_of_the_wanted_variant_are_fetched() {
        let files: Vec<String> = [
            "model_index.json",
            "README.md",
            "sd_turbo.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
            "vae/diffusion_pytorch_model.safetensors.index.json",
            "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "text_encoder/model.safetensors",
            "text_encoder/flax_model.msgpack",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
            "safety_checker/model.safetensors",
        ]
        .map(String::from)
        .to_vec();
        let plain = needed_files(&files, None);
        assert_eq!(
            plain,
            [
                "model_index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "transformer/config.json",
                "transformer/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
                "vae/diffusion_pytorch_model.safetensors.index.json",
                "text_encoder/model.safetensors",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "scheduler/scheduler_config.json",
            ]
        );
        let fp16 = needed_files(&files, Some("fp16"));
        assert!(fp16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors"));
        assert!(fp16.contains(&"vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"));
        assert!(!fp16.contains(&"unet/diffusion_pytorch_model.safetensors"));
    }
}
