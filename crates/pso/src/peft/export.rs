//! `pso export` and `pso sample --adapter`: the trained tensors of a run as a diffusers LoRA
//! file, a DiffFit file, or a merged diffusers UNet / DiT transformer folder, and loading any of
//! them back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use super::{difffit, lora, PeftError, PeftKind};
use crate::config::RunConfig;
use diffusion::models::backbone::Backbone;
use diffusion::pipeline::{backbone_folder, load_backbone, LoadOptions};
use hf::tensor_file;

/// Metadata key naming what a pso-written file holds.
pub const FORMAT_KEY: &str = "pso.format";
/// Metadata key naming the base model a file was trained on.
pub const BASE_MODEL_KEY: &str = "pso.base_model";

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A safetensors file diffusers' `load_lora_weights` loads (LoRA runs).
    DiffusersLora,
    /// The trained tensors and γ, with the base model in the metadata (DiffFit runs).
    Difffit,
    /// A full diffusers UNet or DiT transformer folder (config.json +
    /// diffusion_pytorch_model.safetensors).
    Merged,
}

fn tensors_err(what: &Path, why: String) -> PeftError {
    PeftError::Tensors {
        what: what.display().to_string(),
        why,
    }
}

fn file_err(e: tensor_file::TensorFileError) -> PeftError {
    PeftError::Tensors {
        what: "tensor file".into(),
        why: e.to_string(),
    }
}

/// Writes `tensors` (a run's trainable tensors under `config`) in `format` at `out`; `step` and
/// the base model go into the metadata. Returns what was written.
pub fn export(
    config: &RunConfig,
    tensors: Vec<(String, Tensor)>,
    step: u64,
    format: ExportFormat,
    out: &Path,
) -> Result<PathBuf, PeftError> {
    let kind = config.peft.kind.to_string();
    let mut meta = HashMap::from([
        (BASE_MODEL_KEY.to_string(), config.model.id.clone()),
        ("pso.step".to_string(), step.to_string()),
        ("pso.peft".to_string(), kind.to_string()),
    ]);
    let need = |want: &str, fmt: &str| {
        if kind.as_str() == want {
            Ok(())
        } else {
            Err(PeftError::Config(format!(
                "--format {fmt} needs a run with peft.kind = {want}, this run used {kind}; use \
                 --format merged"
            )))
        }
    };
    let root = hf::hub::resolve_model(&config.model.id, None)
        .map_err(|e| PeftError::Config(e.to_string()))?;
    match format {
        ExportFormat::DiffusersLora => {
            need("lora", "diffusers-lora")?;
            let scale = config.peft.alpha / config.peft.rank as f64;
            meta.insert(FORMAT_KEY.into(), "diffusers-lora".into());
            meta.insert("pso.rank".into(), config.peft.rank.to_string());
            meta.insert("pso.scale_folded_into_lora_B".into(), scale.to_string());
            // diffusers names the denoiser's entries by its pipeline component.
            let entries = lora::to_diffusers(&tensors, scale, backbone_folder(&root));
            tensor_file::write(out, &entries, &meta).map_err(file_err)?;
            Ok(out.to_owned())
        }
        ExportFormat::Difffit => {
            need("difffit", "difffit")?;
            meta.insert(FORMAT_KEY.into(), "difffit".into());
            tensor_file::write(out, &tensors, &meta).map_err(file_err)?;
            Ok(out.to_owned())
        }
        ExportFormat::Merged => {
            let opts = LoadOptions {
                device: Device::Cpu,
                kind: Kind::Float,
                variant: None,
                backbone_weights: config.model.unet.clone(),
                max_sequence_length: None,
                text_encoder_device: None,
            };
            let (vs, backbone) = load_backbone(&root, &opts).map_err(|e| {
                PeftError::Config(format!("loading the base model for merging: {e}"))
            })?;
            let map: HashMap<String, Tensor> = tensors.into_iter().collect();
            let what = format!("run tensors (peft.kind = {kind})");
            match config.peft.kind {
                PeftKind::Lora => {
                    let scale = config.peft.alpha / config.peft.rank as f64;
                    lora::attach_tensors(&backbone, &map, scale, &what)?;
                }
                // Full fine-tuning's tensors replace weights by name, as DiffFit's do.
                PeftKind::Difffit | PeftKind::Full => {
                    difffit::apply_tensors(&backbone, &vs, &map, &what)?;
                }
            }
            merge(&backbone, &vs);
            write_merged_folder(&vs, &root.join(backbone.folder()), out, &meta)?;
            Ok(out.to_owned())
        }
    }
}

/// Folds every attached adapter and γ into the base weights. A DiT whose blocks share block 0's
/// conditioning embedding (DiffFit trained only that copy) gets it copied into every block, as
/// diffusers reads each block's own.
pub fn merge(backbone: &Backbone, vs: &nn::VarStore) {
    backbone.merge_adapters();
    if let Backbone::DiT(d) = backbone {
        if d.shares_conditioning() {
            d.copy_shared_conditioning(vs);
        }
    }
}

fn write_merged_folder(
    vs: &nn::VarStore,
    base: &Path,
    out: &Path,
    meta: &HashMap<String, String>,
) -> Result<(), PeftError> {
    std::fs::create_dir_all(out).map_err(|e| tensors_err(out, e.to_string()))?;
    let config = base.join("config.json");
    std::fs::copy(&config, out.join("config.json"))
        .map_err(|e| tensors_err(&config, e.to_string()))?;
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = meta.clone();
    meta.insert(FORMAT_KEY.into(), "merged".into());
    meta.insert("format".into(), "pt".into());
    tensor_file::write(
        &out.join("diffusion_pytorch_model.safetensors"),
        &vars,
        &meta,
    )
    .map_err(file_err)
}

/// What `pso sample --adapter PATH` found at PATH.
#[derive(Debug)]
pub enum AdapterSource {
    /// A merged folder: load its weights file in place of the pipeline's unet/ or transformer/.
    Merged(PathBuf),
    /// A tensor file to apply to the loaded UNet.
    File(tensor_file::TensorFile),
}

/// Opens PATH: a merged folder or a LoRA / DiffFit file.
pub fn open_adapter(path: &Path) -> Result<AdapterSource, PeftError> {
    if path.is_dir() {
        let weights = path.join("diffusion_pytorch_model.safetensors");
        if !weights.exists() {
            return Err(tensors_err(
                path,
                "is a folder without diffusion_pytorch_model.safetensors; --adapter takes a \
                 merged export folder, a diffusers LoRA file or a DiffFit file"
                    .into(),
            ));
        }
        return Ok(AdapterSource::Merged(weights));
    }
    Ok(AdapterSource::File(
        tensor_file::read(path).map_err(file_err)?,
    ))
}

/// Applies a LoRA (diffusers layout) or DiffFit file to `backbone`; returns a one-line
/// description.
pub fn apply_file(
    backbone: &Backbone,
    vs: &nn::VarStore,
    file: tensor_file::TensorFile,
    path: &Path,
) -> Result<String, PeftError> {
    let what = path.display().to_string();
    let is_lora = file.tensors.iter().any(|(n, _)| n.ends_with(lora::DOWN));
    if is_lora {
        let map = lora::from_diffusers(file.tensors, backbone.folder(), &what)?;
        // diffusers files carry no alpha when the scale is folded in (pso's) or equals 1.
        let layers = lora::attach_tensors(backbone, &map, 1.0, &what)?;
        return Ok(format!("LoRA on {layers} layers"));
    }
    if file.metadata.get(FORMAT_KEY).map(String::as_str) == Some("difffit") {
        let map: HashMap<String, Tensor> = file.tensors.into_iter().collect();
        let n = difffit::apply_tensors(backbone, vs, &map, &what)?;
        return Ok(format!("DiffFit, {n} tensors"));
    }
    Err(tensors_err(
        path,
        format!(
            "holds neither LoRA entries (`{}.MODULE.lora_A.weight`) nor a DiffFit file \
             (metadata pso.format = difffit); export one with `pso export`",
            backbone.folder()
        ),
    ))
}
