//! The local scorers: CLIP- and BLIP-based ones in `tch` (feature `local`, on by default), pixel
//! statistics, and the composite of several scorers.

#[cfg(feature = "local")]
pub mod aesthetic;
#[cfg(feature = "local")]
pub mod clip_score;
pub mod composite;
#[cfg(feature = "local")]
pub mod image_reward;
#[cfg(feature = "local")]
mod local;
#[cfg(feature = "local")]
pub mod mps;
pub mod pixel;

#[cfg(feature = "local")]
pub use local::{load_local, LocalScorerKind};
