//! CLIP in `tch`, laid out and named as transformers' `modeling_clip.py`, so HF checkpoints load
//! by name: the text tower (also the diffusion models' text encoders), the vision tower,
//! `CLIPModel`, its tokenizer and its image processor.

pub mod config;
pub mod encoder;
pub mod model;
pub mod preprocess;
pub mod text;
pub mod tokenizer;
pub mod vision;

pub use config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use model::ClipModel;
pub use preprocess::ClipImageProcessor;
pub use text::{ClipTextModel, ClipTextOutput, ClipTextTransformer};
pub use tokenizer::{ClipTokenizer, Encoded, TokenizedBatch};
pub use vision::{ClipVisionModelWithProjection, ClipVisionOutput, ClipVisionTransformer};
