//! Progress bars of the commands that are not training runs (those use `pso::run::progress`);
//! hidden when stderr is not a terminal, so logs stay clean.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting rows, for imports; its length is set as the inputs are opened.
pub fn rows_bar(what: &str) -> ProgressBar {
    bar(
        0,
        "{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
        what,
    )
}

/// A bar over the `total` steps of one stage of a longer job.
pub fn stage_bar(stage: &str, total: u64) -> ProgressBar {
    bar(
        total,
        "{msg:12} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
        stage,
    )
}

fn bar(total: u64, template: &str, message: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}
