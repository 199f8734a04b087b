//! The diffusion stack in tch, laid out exactly like diffusers' modules so that diffusers'
//! weights load by name: building blocks, the VAE, and the loaders.

pub mod attention;
pub mod load;
pub mod resnet;
pub mod vae;
