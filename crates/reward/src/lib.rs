//! Reward models for pso: the [`Scorer`] interface and its checks, the local scorers PickScore,
//! CLIPScore, HPSv2 and the LAION aesthetic predictor (on `hf`'s CLIP towers), pixel statistics, alone
//! or combined, the HTTP reward protocol (client and server), and [`build_scorer`], the one
//! factory every command uses. Without the default feature `local` the crate builds without
//! libtorch: the protocol types, client and server, the pixel scorers and the factory remain.

mod error;
pub mod factory;
pub mod http;
pub mod scorer;
pub mod scorers;

pub use error::RewardError;
pub use factory::{build_scorer, ScorerKind, ScorerSpec};
pub use scorer::{
    check_scores, open_image, score_checked, score_parts_checked, ScoreItem, Scored, Scorer,
    ScorerInfo,
};
#[cfg(feature = "local")]
pub use scorers::{load_local, LocalScorerKind};
