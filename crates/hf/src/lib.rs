//! Hugging Face model files for pso: hub ids resolved through the HF cache ([`hub`]), diffusers
//! and transformers folders and their safetensors loaded into `tch` ([`load`]), safetensors
//! written with metadata ([`tensor_file`]), CLIP's tokenizer and towers ([`clip`]), shared by
//! the diffusion models' text encoders and the reward models, and the T5 encoder of SD3 and FLUX
//! ([`t5`]), and Qwen3, Z-Image's text encoder ([`qwen3`]).

pub mod blip;
pub mod clip;
mod error;
pub mod hub;
pub mod load;
pub mod padded_tokenizer;
pub mod qwen3;
pub mod t5;
pub mod tensor_file;

pub use error::HfError;
