//! `pso config`: run configs as pso reads them.

use anyhow::Result;
use clap::Subcommand;

use super::train::ConfigArgs;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the fully resolved config (defaults filled in, overrides applied).
    Show(ConfigArgs),
}

/// Runs a `pso config` subcommand.
pub fn run(command: ConfigCommand) -> Result<()> {
    match command {
        ConfigCommand::Show(args) => print!("{}", args.load()?.to_toml()),
    }
    Ok(())
}
