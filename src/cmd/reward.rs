//! `pso reward serve`: a local scorer behind the HTTP reward protocol.

use anyhow::{Context, Result};
use clap::Subcommand;
use reward::http::{bind, load_token, serve, shutdown_signal, ServerOptions};
use reward::{build_scorer, ScorerKind};
use std::net::ToSocketAddrs;
use std::path::PathBuf;

use super::scorer_kind;

#[derive(Subcommand)]
pub enum RewardCommand {
    /// Serve a local scorer over the HTTP reward protocol.
    Serve {
        /// Which scorer (any that scores in this process).
        #[arg(long, value_parser = scorer_kind(ScorerKind::ALL.into_iter().filter(|k| k.is_local())))]
        scorer: ScorerKind,
        /// Model folder or hub id (pixel: centered, redness or size; composite: its TOML file).
        #[arg(long)]
        model: String,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8787")]
        bind: String,
        /// File holding the bearer token clients must send.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Serve an address beyond this machine (not 127.0.0.0/8 or ::1) without a token; by
        /// default that is refused, since anyone who reaches the port could use the scorer.
        #[arg(long)]
        insecure: bool,
        /// Most items in one scorer call; requests from concurrent clients are batched up to it.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
    },
}

/// Runs a `pso reward` subcommand.
pub fn run(command: RewardCommand) -> Result<()> {
    let RewardCommand::Serve {
        scorer,
        model,
        bind: address,
        token_file,
        insecure,
        max_batch,
    } = command;
    if token_file.is_none() && !insecure && !is_loopback(&address)? {
        anyhow::bail!(
            "--bind {address} listens beyond this machine and no --token-file guards it: give \
             --token-file F (clients send that bearer token), bind 127.0.0.1, or pass --insecure \
             to serve it open"
        );
    }
    // Read the token before loading the model: a bad token file fails fast.
    let token = match &token_file {
        Some(file) => load_token(Some(file))?,
        None => None,
    };
    let scorer = build_scorer(scorer, &model, None)
        .with_context(|| format!("loading scorer model {model}"))?;
    let options = ServerOptions {
        token,
        max_batch,
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        let (listener, addr) = bind(&address).await?;
        // Scripts and tests read this line to find the port when --bind asks for port 0.
        println!("listening on http://{addr}");
        std::io::Write::flush(&mut std::io::stdout())?;
        tracing::info!(scorer = %scorer.info(), %addr, max_batch, "serving protocol v1");
        serve(listener, scorer, options, shutdown).await?;
        tracing::info!("reward server stopped");
        anyhow::Ok(())
    })
}

/// Whether every address `address` resolves to is a loopback one.
fn is_loopback(address: &str) -> Result<bool> {
    let resolved: Vec<_> = address
        .to_socket_addrs()
        .with_context(|| format!("--bind {address} is not HOST:PORT"))?
        .collect();
    Ok(!resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback()))
}
