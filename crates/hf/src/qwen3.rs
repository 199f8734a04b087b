//! transformers' `Qwen3Model` (models/qwen3/modeling_qwen3.py) and its tokenizer, as Z-Image's
//! text encoder uses them: the prompt wrapped in Qwen3's chat template as one user turn, and the
//! hidden states after the second-to-last decoder layer (`hidden_states[-2]`) as the prompt's
//! tokens. Decoder layers: RMS-normed causal grouped-query attention with per-head RMS norms on
//! queries and keys and rotary positions (`rotate_half` layout), then a SiLU-gated MLP.
//!
//! The pipeline pads prompts to `max_sequence_length` but keeps only the unpadded positions, and
//! causal attention never lets a real token see the padding after it, so
//! [`Qwen3Model::penultimate_hidden_states`] runs on the unpadded ids alone.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use crate::load::{build_and_load_with_prefix, read_config, weight_files, LoadError};
use crate::t5::RmsNorm;
use crate::HfError;

/// The rotary settings of transformers 5 configs (`rope_parameters`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    /// `default` is the only kind this model implements.
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    /// The rotary base.
    pub rope_theta: f64,
}

fn default_rope_type() -> String {
    "default".into()
}

/// `text_encoder/config.json` (a transformers `Qwen3Config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Qwen3Config {
    /// Vocabulary rows of the embedding.
    pub vocab_size: i64,
    /// Token width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key / value heads (grouped-query attention; `num_attention_heads` when absent).
    pub num_key_value_heads: Option<i64>,
    /// Width per head.
    pub head_dim: i64,
    /// Bias on the attention projections.
    pub attention_bias: bool,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// The rotary base of transformers 4 configs.
    pub rope_theta: Option<f64>,
    /// The rotary settings of transformers 5 configs.
    pub rope_parameters: Option<RopeParameters>,
    /// Older configs' rotary scaling; only `null` is implemented.
    pub rope_scaling: Option<serde_json::Value>,
    /// The MLP's activation (`silu`).
    pub hidden_act: String,
    /// Whether some layers attend within a window only (not implemented).
    pub use_sliding_window: bool,
}

impl Default for Qwen3Config {
    fn default() -> Self {
        Qwen3Config {
            vocab_size: 151936,
            hidden_size: 4096,
            intermediate_size: 22016,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(32),
            head_dim: 128,
            attention_bias: false,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            hidden_act: "silu".into(),
            use_sliding_window: false,
        }
    }
}

impl Qwen3Config {
    /// Key / value heads.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The rotary base: `rope_parameters.rope_theta`, else `rope_theta`, else transformers'
    /// default 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    fn check(&self) -> Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim),
        ];
        if let Some((key, v)) = sizes.iter().find(|(_, v)| *v < 1) {
            return Err(format!("{key} {v}: it must be at least 1"));
        }
        if self.num_hidden_layers < 2 {
            return Err(format!(
                "num_hidden_layers {}: Z-Image reads the hidden states before the last layer, \
                 so the model needs at least 2",
                self.num_hidden_layers
            ));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?}: only \"silu\" (Qwen3's)",
                self.hidden_act
            ));
        }
        if self.use_sliding_window {
            return Err("use_sliding_window true: only full attention (Qwen3's default)".into());
        }
        let scaled = self.rope_scaling.as_ref().is_some_and(|v| !v.is_null())
            || self
                .rope_parameters
                .as_ref()
                .is_some_and(|r| r.rope_type != "default");
        if scaled {
            return Err(
                "a scaled rotary embedding (rope_scaling / rope_type other than \
                        \"default\"): only plain RoPE is implemented"
                    .into(),
            );
        }
        Ok(())
    }
}

fn linear(vs: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    nn::linear(
        vs,
        i,
        o,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

/// `rotate_half`: (x1, x2) → (−x2, x1) over the halves of the last dimension.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let (x1, x2) = (x.narrow(-1, 0, half), x.narrow(-1, half, half));
    Tensor::cat(&[-x2, x1], -1)
}

/// `Qwen3Attention`: grouped-query causal self-attention with RMS-normed heads.
#[derive(Debug)]
struct Qwen3Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Qwen3Attention {
    fn new(vs: nn::Path, c: &Qwen3Config) -> Self {
        let d = c.head_dim;
        Qwen3Attention {
            q_proj: linear(
                &vs / "q_proj",
                c.hidden_size,
                c.num_attention_heads * d,
                c.attention_bias,
            ),
            k_proj: linear(
                &vs / "k_proj",
                c.hidden_size,
                c.kv_heads() * d,
                c.attention_bias,
            ),
            v_proj: linear(
                &vs / "v_proj",
                c.hidden_size,
                c.kv_heads() * d,
                c.attention_bias,
            ),
            o_proj: linear(
                &vs / "o_proj",
                c.num_attention_heads * d,
                c.hidden_size,
                c.attention_bias,
            ),
            q_norm: RmsNorm::new(&vs / "q_norm", d, c.rms_norm_eps),
            k_norm: RmsNorm::new(&vs / "k_norm", d, c.rms_norm_eps),
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: d,
        }
    }

    fn forward(&self, x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Tensor {
        let (b, n) = (x.size()[0], x.size()[1]);
        let split = |t: Tensor, heads: i64| t.view([b, n, heads, self.head_dim]);
        // 1. Projections; the norms act per head, before the heads move to dim 1.
        let q = self
            .q_norm
            .forward(&split(self.q_proj.forward(x), self.heads))
            .transpose(1, 2);
        let k = self
            .k_norm
            .forward(&split(self.k_proj.forward(x), self.kv_heads))
            .transpose(1, 2);
        let v = split(self.v_proj.forward(x), self.kv_heads).transpose(1, 2);
        // 2. Rotary positions (cos / sin [n, head_dim], in the activations' dtype).
        let rope = |t: &Tensor| t * cos + rotate_half(t) * sin;
        let (q, k) = (rope(&q), rope(&k));
        // 3. Each key / value head serves heads / kv_heads query heads.
        let groups = self.heads / self.kv_heads;
        let (k, v) = if groups > 1 {
            (
                k.repeat_interleave_self_int(groups, 1, None),
                v.repeat_interleave_self_int(groups, 1, None),
            )
        } else {
            (k, v)
        };
        let attended = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            true,
            None,
            false,
        );
        self.o_proj
            .forward(&attended.transpose(1, 2).reshape([b, n, -1]))
    }
}

/// `Qwen3DecoderLayer`: pre-normed attention and SiLU-gated MLP, each with a residual.
#[derive(Debug)]
struct Qwen3DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Qwen3Attention,
    post_attention_layernorm: RmsNorm,
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Qwen3DecoderLayer {
    fn new(vs: nn::Path, c: &Qwen3Config) -> Self {
        let mlp = &vs / "mlp";
        Qwen3DecoderLayer {
            input_layernorm: RmsNorm::new(&vs / "input_layernorm", c.hidden_size, c.rms_norm_eps),
            self_attn: Qwen3Attention::new(&vs / "self_attn", c),
            post_attention_layernorm: RmsNorm::new(
                &vs / "post_attention_layernorm",
                c.hidden_size,
                c.rms_norm_eps,
            ),
            gate_proj: linear(
                &mlp / "gate_proj",
                c.hidden_size,
                c.intermediate_size,
                false,
            ),
            up_proj: linear(&mlp / "up_proj", c.hidden_size, c.intermediate_size, false),
            down_proj: linear(
                &mlp / "down_proj",
                c.intermediate_size,
                c.hidden_size,
                false,
            ),
        }
    }

    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor)) -> Tensor {
        let x = x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x), rope);
        let h = self.post_attention_layernorm.forward(&x);
        let gated = self.gate_proj.forward(&h).silu() * self.up_proj.forward(&h);
        &x + self.down_proj.forward(&gated)
    }
}

/// transformers' `Qwen3Model` up to its second-to-last layer: the last layer and the final norm
/// never shape what Z-Image reads, so they are not built (their weights are skipped at load).
#[derive(Debug)]
pub struct Qwen3Model {
    config: Qwen3Config,
    embed_tokens: nn::Embedding,
    layers: Vec<Qwen3DecoderLayer>,
}

impl Qwen3Model {
    /// Lays out the embedding and the first `num_hidden_layers − 1` layers under `vs`.
    pub fn new(vs: nn::Path, config: &Qwen3Config) -> Self {
        Qwen3Model {
            config: config.clone(),
            embed_tokens: nn::embedding(
                &vs / "embed_tokens",
                config.vocab_size,
                config.hidden_size,
                Default::default(),
            ),
            layers: (0..config.num_hidden_layers - 1)
                .map(|i| Qwen3DecoderLayer::new(&vs / "layers" / i, config))
                .collect(),
        }
    }

    /// Loads a transformers `Qwen3Model` folder (config.json + model.safetensors, sharded or
    /// not); a `Qwen3ForCausalLM` checkpoint (names under `model.`, its `lm_head` unused) loads
    /// too.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<(nn::VarStore, Self), LoadError> {
        let config: Qwen3Config = read_config(dir)?;
        config.check().map_err(|why| LoadError::Unsupported {
            path: dir.join("config.json"),
            why,
        })?;
        build_and_load_with_prefix(
            &weight_files(dir, None)?,
            device,
            kind,
            Some("model"),
            |vs| Qwen3Model::new(&vs / "model", &config),
        )
    }

    /// The config.
    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    /// `hidden_states[-2]` [B, n, hidden_size] of unpadded token ids [B, n]: the output of the
    /// second-to-last decoder layer, causal attention from position 0.
    pub fn penultimate_hidden_states(&self, input_ids: &Tensor) -> Tensor {
        let n = input_ids.size()[1];
        let mut x = self.embed_tokens.forward(input_ids);
        let rope = self.rotary(n, x.device(), x.kind());
        for layer in &self.layers {
            x = layer.forward(&x, &rope);
        }
        x
    }

    /// cos and sin [n, head_dim] of positions 0..n, computed in fp32 as transformers does and
    /// cast to the activations' dtype.
    fn rotary(&self, n: i64, device: Device, kind: Kind) -> (Tensor, Tensor) {
        let d = self.config.head_dim;
        let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / d as f64;
        let inv_freq = Tensor::from(self.config.rope_theta() as f32)
            .to_device(device)
            .pow(&exponent)
            .reciprocal();
        let positions = Tensor::arange(n, (Kind::Int64, device)).to_kind(Kind::Float);
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
        let angles = Tensor::cat(&[&freqs, &freqs], -1);
        (angles.cos().to_kind(kind), angles.sin().to_kind(kind))
    }
}

/// Qwen3's tokenizer with its chat template applied to one user turn and the generation prompt,
/// as `apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
/// enable_thinking=True)` renders it, truncated to `max_length` ids.
pub struct Qwen3Tokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for Qwen3Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qwen3Tokenizer")
            .field("dir", &self.dir)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl Qwen3Tokenizer {
    /// Reads `dir/tokenizer.json`; prompts become at most `max_length` ids.
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self, HfError> {
        let err = |why: String| HfError::Tokenizer {
            dir: dir.to_owned(),
            why,
        };
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| err(format!("{}: {e} (Qwen3's tokenizer.json)", path.display())))?;
        for special in ["<|im_start|>", "<|im_end|>"] {
            if tokenizer.token_to_id(special).is_none() {
                return Err(err(format!(
                    "the vocabulary has no {special}: Qwen3's chat template needs it; is this \
                     a Qwen tokenizer?"
                )));
            }
        }
        if max_length == 0 {
            return Err(err("max_length 0".into()));
        }
        Ok(Qwen3Tokenizer {
            tokenizer,
            max_length,
            dir: dir.to_owned(),
        })
    }

    /// The chat-formatted text of `prompt`: Qwen3's template for one user message with the
    /// assistant's turn opened (thinking enabled adds nothing there).
    pub fn chat_text(prompt: &str) -> String {
        format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    }

    /// The ids [1, n ≤ max_length] of `prompt`, chat-formatted and truncated, on `device`.
    pub fn encode(&self, prompt: &str, device: Device) -> Result<Tensor, HfError> {
        let encoding = self
            .tokenizer
            .encode(Self::chat_text(prompt), true)
            .map_err(|e| HfError::Tokenizer {
                dir: self.dir.clone(),
                why: format!("encoding {prompt:?}: {e}"),
            })?;
        let ids: Vec<i64> = encoding
            .get_ids()
            .iter()
            .take(self.max_length)
            .map(|&id| i64::from(id))
            .collect();
        Ok(Tensor::from_slice(&ids).unsqueeze(0).to_device(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny config.json and random weights named as `save` says, in a temporary folder.
    fn folder(save: impl Fn(&str) -> String) -> (tempfile::TempDir, Tensor) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 4, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}"#,
        )
        .unwrap();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let config: Qwen3Config = read_config(dir.path()).unwrap();
        let model = Qwen3Model::new(vs.root() / "model", &config);
        let ids = Tensor::from_slice(&[1i64, 4, 2, 9]).unsqueeze(0);
        let expected = tch::no_grad(|| model.penultimate_hidden_states(&ids));
        let named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| (save(&name), t))
            .collect();
        Tensor::write_safetensors(&named, dir.path().join("model.safetensors")).unwrap();
        (dir, expected)
    }

    #[test]
    fn qwen3_model_and_causal_lm_checkpoints_load_alike() {
        let ids = Tensor::from_slice(&[1i64, 4, 2, 9]).unsqueeze(0);
        let bare = |name: &str| name.strip_prefix("model.").unwrap().to_owned();
        for save in [bare as fn(&str) -> String, |name: &str| name.to_owned()] {
            let (dir, expected) = folder(save);
            let (_vs, model) = Qwen3Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
            let out = tch::no_grad(|| model.penultimate_hidden_states(&ids));
            assert!(out.equal(&expected));
        }
    }

    #[test]
    fn unsupported_configs_are_named() {
        let base = Qwen3Config {
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: Some(1),
            head_dim: 4,
            ..Qwen3Config::default()
        };
        assert!(base.check().is_ok());
        let one_layer = Qwen3Config {
            num_hidden_layers: 1,
            ..base.clone()
        };
        assert!(one_layer.check().unwrap_err().contains("at least 2"));
        let groups = Qwen3Config {
            num_key_value_heads: Some(3),
            ..base.clone()
        };
        assert!(groups.check().unwrap_err().contains("multiple"));
        let scaled = Qwen3Config {
            rope_scaling: Some(serde_json::json!({"rope_type": "yarn"})),
            ..base
        };
        assert!(scaled.check().unwrap_err().contains("plain RoPE"));
    }
}
