//! `pso report`: a run's metrics, evals and sample grids as one self-contained HTML page.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

/// Arguments of `pso report` (its help text is on `Command::Report`, where clap shows it).
#[derive(Args)]
#[command(after_help = "Example: pso report runs/sd-turbo-pickscore\nThen open \
                  runs/sd-turbo-pickscore/report/index.html in a browser, or mail it.")]
pub struct ReportArgs {
    /// Run directory: what `pso online` or `pso offline` wrote (their --out).
    run: PathBuf,
    /// Folder for index.html and the plots (default: RUN/report).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Writes the report and prints the path of its page.
pub fn run(args: ReportArgs) -> Result<()> {
    let out = args.out.unwrap_or_else(|| args.run.join("report"));
    let summary = pso::report::write_report(&args.run, &out).context("cannot write the report")?;
    println!("{}", summary.html.display());
    Ok(())
}
