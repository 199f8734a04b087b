//! Progress bars of training runs (hidden when stderr is not a terminal).

/// A progress bar over optimizer steps (hidden when `show` is false).
pub fn progress(show: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    progress_of("step", show, total, done)
}

/// A progress bar counting `unit`s (hidden when `show` is false).
pub fn progress_of(unit: &str, show: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:40}}] {unit} {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(done);
    bar
}
