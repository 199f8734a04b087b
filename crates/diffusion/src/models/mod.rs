//! The diffusion stack in tch, laid out exactly like diffusers' modules so that diffusers'
//! weights load by name: building blocks, the VAE, the UNet, DiT, SD3's MMDiT, FLUX and Z-Image.

pub mod attention;
pub mod backbone;
pub mod dit;
pub mod embeddings;
pub mod flux;
pub mod linear;
pub mod recompute;
pub mod resnet;
pub mod sd3;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod z_image;

/// Model-folder loading (configs, safetensors) is shared with the reward models.
pub use hf::load;
