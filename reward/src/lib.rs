//! Reward models for pso: the [`Scorer`] interface and its checks, CLIP in `tch` (also the
//! diffusion models' text encoders), and the local scorers PickScore, CLIPScore and the LAION
//! aesthetic predictor, alone or combined.

pub mod clip;
mod error;
pub mod http;
pub mod load;
pub mod scorer;
pub mod scorers;

pub use error::RewardError;
pub use scorer::{check_scores, open_image, score_checked, ScoreItem, Scorer, ScorerInfo};
pub use scorers::{load_local, LocalScorerKind};
