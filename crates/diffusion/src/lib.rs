//! The diffusion stack of pso in `tch`: diffusers' models ([`models`]: UNet, VAE, DiT and their
//! blocks), schedulers and the few-step sampler ([`sampling`]), and text- and class-conditional
//! pipelines ([`pipeline`]).

pub mod models;
pub mod pipeline;
pub mod sampling;
