//! One module per `pso` command: its arguments (clap), their checks, and a short handler that
//! calls the library crates.

pub mod bench;
pub mod config;
pub mod eval;
pub mod export;
pub mod pairs;
pub mod report;
pub mod reward;
pub mod sample;
pub mod score;
pub mod toy;
pub mod train;

use ::reward::ScorerKind;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use diffusion::sampling::SchedulerKind;

/// A `--scorer` parser that accepts (and `--help` lists) exactly `kinds`.
fn scorer_kind(
    kinds: impl IntoIterator<Item = ScorerKind>,
) -> impl TypedValueParser<Value = ScorerKind> {
    PossibleValuesParser::new(kinds.into_iter().map(ScorerKind::name))
        .map(|name| name.parse().expect("a listed scorer kind parses"))
}

/// A `--sampler` parser that accepts (and `--help` lists) every scheduler a run can sample with.
fn scheduler_kind() -> impl TypedValueParser<Value = SchedulerKind> {
    PossibleValuesParser::new(SchedulerKind::ALL.map(SchedulerKind::name))
        .map(|name| SchedulerKind::from_name(&name).expect("a listed scheduler kind parses"))
}
