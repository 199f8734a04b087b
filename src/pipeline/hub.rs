//! `--model` as a Hugging Face Hub id: found in the standard HF cache (`HF_HOME`, default
//! `~/.cache/huggingface`), or downloaded into it with hf-hub. With `HF_HUB_OFFLINE=1` only the
//! cache is used.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use super::PipelineError;

/// Component folders of the pipelines this crate runs, and the files they need besides weights.
const COMPONENTS: [&str; 7] = [
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
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

/// Resolves `--model`: an existing folder as is, otherwise a hub id through the HF cache.
pub fn resolve_model(spec: &str, variant: Option<&str>) -> Result<PathBuf, PipelineError> {
    let path = Path::new(spec);
    if path.exists() || !is_repo_id(spec) {
        return Ok(path.to_owned());
    }
    let cache = hf_hub::Cache::from_env();
    let cached = cache
        .model(spec.to_owned())
        .get("model_index.json")
        .and_then(|p| p.parent().map(Path::to_owned));
    if offline() {
        return cached.ok_or_else(|| PipelineError::Folder {
            path: cache.path().join(format!("models--{}", spec.replace('/', "--"))),
            why: format!(
                "`{spec}` is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE \
                 is set; download it where there is network (`hf download {spec}`) and copy the \
                 cache, set HF_HOME to where it is, or pass a local folder"
            ),
        });
    }
    let hub_error = |why: String| PipelineError::Folder {
        path: PathBuf::from(spec),
        why,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .map_err(|e| hub_error(format!("cannot reach the Hugging Face Hub: {e}")))?;
    let repo = api.model(spec.to_owned());
    let info = repo.info().map_err(|e| {
        hub_error(format!(
            "not a local folder, and the Hub lookup failed: {e} (check the id, your network, or \
             HF_TOKEN for gated models; HF_HUB_OFFLINE=1 uses the cache only)"
        ))
    })?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let needed = needed_files(&files, variant);
    if !needed.contains(&"model_index.json") {
        return Err(hub_error(
            "the repository has no model_index.json: it is not a diffusers pipeline".into(),
        ));
    }
    let mut root = None;
    for file in needed {
        tracing::info!("downloading {spec}/{file}");
        let local = repo
            .get(file)
            .map_err(|e| hub_error(format!("downloading {file}: {e}")))?;
        if file == "model_index.json" {
            root = local.parent().map(Path::to_owned);
        }
    }
    Ok(root.expect("model_index.json was downloaded"))
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
    fn only_the_needed_files_of_the_wanted_variant_are_fetched() {
        let files: Vec<String> = [
            "model_index.json",
            "README.md",
            "sd_turbo.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
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
