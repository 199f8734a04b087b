//! `pso report RUN`: a run directory's metrics, evaluations and sample grids as PNG plots in `OUT/`
//! (default `RUN/report/`) and one self-contained page, `OUT/index.html`, which inlines the plots
//! and grids as data URIs so the one file can be mailed or attached to an issue.
//!
//! It only reads the run directory, so it is safe to run while the run is still training: a
//! last line cut off by a write in progress (or by a killed run) is skipped with a warning.

mod data;
mod grids;
mod html;
mod plot;

use std::fs;
use std::path::{Path, PathBuf};

use data::RunData;
use grids::sample_grids;
use html::page;
use plot::draw;

/// Errors of `pso report`; each names the file (and line) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// RUN is not (yet) a run directory.
    #[error("{path}: {why}")]
    NotARun {
        /// The path given as RUN.
        path: PathBuf,
        /// What is missing and what to do.
        why: &'static str,
    },
    /// A line of a `.jsonl` file is not a JSON object with a step.
    #[error(
        "{path}:{line}: {why}; each line must be one JSON object with a whole-number \"step\": \
         fix or delete that line"
    )]
    BadLine {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The OS refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Drawing or encoding an image failed.
    #[error("rendering {path}: {why}")]
    Render {
        /// The image being made.
        path: PathBuf,
        /// The drawing or encoding error.
        why: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `write_report` wrote.
#[derive(Debug, Clone)]
pub struct ReportSummary {
    /// The HTML page, `OUT/index.html`.
    pub html: PathBuf,
    /// The PNG plots beside it, one per kind of metric the run logged.
    pub plots: Vec<PathBuf>,
    /// Lines of `metrics.jsonl` read (one per learner step).
    pub steps: usize,
    /// Lines and files skipped, each with why (also logged as warnings and shown on the page).
    pub warnings: Vec<String>,
}

/// Reads the run directory `run` and writes the plots and `index.html` into `out` (created if
/// missing; plots of metrics the run no longer has are removed).
pub fn write_report(run: &Path, out: &Path) -> Result<ReportSummary, ReportError> {
    let mut run_data = RunData::read(run)?;
    fs::create_dir_all(out).map_err(io(out))?;
    let mut plots = Vec::new();
    let mut drawn = Vec::new();
    for figure in run_data.figures() {
        let path = out.join(format!("{}.png", figure.name));
        if figure.panels.is_empty() {
            // A plot from an earlier report of a metric this run does not log would mislead.
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(io(&path)(e));
                }
            }
            continue;
        }
        let png = draw(&figure, &path)?;
        fs::write(&path, &png).map_err(io(&path))?;
        plots.push(path);
        drawn.push((figure.title, png));
    }
    let grids = sample_grids(&run.join("samples"), &mut run_data.warnings)?;
    for warning in &run_data.warnings {
        tracing::warn!("{warning}");
    }
    let html = out.join("index.html");
    let page = page(run, &run_data, &drawn, &grids);
    fs::write(&html, page).map_err(io(&html))?;
    Ok(ReportSummary {
        html,
        plots,
        steps: run_data.metrics.len(),
        warnings: run_data.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::html::data_uri;
    use super::plot::{PANEL_HEIGHT, WIDTH};
    use super::*;
    use serde_json::Value;

    const CONFIG: &str = "[run]\nname = \"toy\"\n[model]\nid = \"tiny-model\"\n\
                          [objective]\nkind = \"online_pso\"\n";

    /// A line of an online run's metrics.jsonl at `step`.
    fn metrics_line(step: u64) -> String {
        let s = step as f64;
        let mut line = serde_json::json!({
            "step": step, "policy_version": step, "loss": 0.7 - 0.1 * s, "margin": 0.2 * s,
            "accuracy": 0.5 + 0.1 * s, "lr": 1e-5, "grad_norm": 1.5, "skipped": false,
            "reward_mean": 0.1 * s, "reward_std": 0.05, "reward_max": 0.2 * s + 0.1,
            "score_margin": 0.02 * s, "pairs_per_s": 2.0 + s, "images_per_s": 4.0 + s,
            "staleness": 0, "time_actor_s": 1.0, "time_reward_s": 0.5, "time_learner_s": 0.25,
            "learner_busy": 0.2,
        });
        if step == 2 {
            // Non-finite values are written as null; a line may lack a key.
            line["grad_norm"] = Value::Null;
            line.as_object_mut().unwrap().remove("reward_std");
        }
        line.to_string()
    }

    pub(super) fn grid(run: &Path, step: u64, width: u32) -> Vec<u8> {
        let image =
            image::RgbImage::from_fn(width, 4, |x, _| image::Rgb([(x % 8) as u8 * 30, 90, 0]));
        let path = run.join(format!("samples/step-{step:08}.png"));
        image.save(&path).unwrap();
        fs::read(path).unwrap()
    }

    /// An online run after 3 steps with evaluations before step 1 and after step 2.
    pub(super) fn online_run() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("toy");
        fs::create_dir_all(run.join("samples")).unwrap();
        fs::write(run.join("config.toml"), CONFIG).unwrap();
        let metrics: String = (1..=3).map(|s| metrics_line(s) + "\n").collect();
        fs::write(run.join("metrics.jsonl"), metrics).unwrap();
        let evals = "{\"step\":0,\"samples\":\"x\",\"eval/pickscore\":20.5}\n\
                     {\"step\":2,\"samples\":\"y\",\"eval/pickscore\":21.25}\n";
        fs::write(run.join("eval.jsonl"), evals).unwrap();
        (dir, run)
    }

    fn decode(path: &Path) -> image::RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    #[test]
    fn a_run_becomes_plots_and_one_self_contained_page() {
        let (_dir, run) = online_run();
        let grids = [grid(&run, 0, 8), grid(&run, 2, 8)];
        let out = run.join("report");
        let summary = write_report(&run, &out).unwrap();
        assert_eq!(summary.html, out.join("index.html"));
        assert_eq!(summary.steps, 3);
        assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
        let panels = [
            ("reward", 2),
            ("eval", 1),
            ("loss", 1),
            ("preference", 2),
            ("optimizer", 2),
            ("throughput", 3),
        ];
        let expected: Vec<PathBuf> = panels
            .iter()
            .map(|(name, _)| out.join(format!("{name}.png")))
            .collect();
        assert_eq!(summary.plots, expected);
        let html = fs::read_to_string(&summary.html).unwrap();
        for (path, (name, count)) in summary.plots.iter().zip(panels) {
            let image = decode(path);
            assert_eq!(image.dimensions(), (WIDTH, PANEL_HEIGHT * count), "{name}");
            let white = image::Rgb([255, 255, 255]);
            let inked = image.pixels().filter(|&&p| p != white).count();
            // Axes, labels and curves: far more than a blank canvas, far less than a filled one.
            assert!(inked > 2_000, "{name}: only {inked} non-white pixels");
            assert!(inked < image.pixels().len() / 2, "{name}: {inked}");
            assert!(html.contains(&data_uri(&fs::read(path).unwrap())), "{name}");
        }
        for png in &grids {
            assert!(html.contains(&data_uri(png)));
        }
        for text in [
            "pso report: toy",
            "tiny-model",
            "online_pso",
            "3 logged (step 1 to 3)",
            "0.1000 (step 1) → 0.3000 (step 3)",
            "last loss</th><td>0.4000 (step 3)",
            "last eval/pickscore</th><td>21.2500 (step 2)",
            "after step 2",
            "[objective]",
        ] {
            assert!(html.contains(text), "missing `{text}`");
        }
    }

    /// Trained on pickscore, evaluated on it and on a held-out aesthetic scorer: the gold figure
    /// puts both on one panel as % change since the first evaluation, the training one named.
    #[test]
    fn a_held_out_scorer_is_plotted_against_the_training_reward() {
        let (_dir, run) = online_run();
        fs::write(
            run.join("config.toml"),
            format!("{CONFIG}[reward]\nscorer = \"pickscore\"\nmodel = \"ps\"\n"),
        )
        .unwrap();
        let evals = "{\"step\":0,\"eval/pickscore:ps\":20.0,\"eval/aesthetic:ae\":5.0}\n\
                     {\"step\":2,\"eval/pickscore:ps\":22.0,\"eval/aesthetic:ae\":4.5}\n";
        fs::write(run.join("eval.jsonl"), evals).unwrap();
        let data = RunData::read(&run).unwrap();
        let figures = data.figures();
        let gold = figures
            .iter()
            .find(|f| f.name == "gold")
            .expect("a gold figure");
        let lines = &gold.panels[0].lines;
        let by_label: Vec<(&str, &[(u64, f64)])> = lines
            .iter()
            .map(|l| (l.label.as_str(), l.points.as_slice()))
            .collect();
        assert_eq!(
            by_label,
            [
                ("aesthetic:ae (held out)", &[(0, 0.0), (2, -10.0)][..]),
                ("pickscore:ps (training reward)", &[(0, 0.0), (2, 10.0)][..]),
            ]
        );
        let out = run.join("report");
        let summary = write_report(&run, &out).unwrap();
        assert!(summary.plots.contains(&out.join("gold.png")));
        // One eval scorer: no gold figure.
        let (_dir, single) = online_run();
        let plots = write_report(&single, &single.join("report")).unwrap().plots;
        assert!(!plots.iter().any(|p| p.ends_with("gold.png")), "{plots:?}");
    }

    #[test]
    fn plots_of_metrics_the_run_does_not_log_are_left_out_and_removed() {
        let (_dir, run) = online_run();
        let out = run.join("report");
        write_report(&run, &out).unwrap();
        assert!(out.join("throughput.png").exists());
        // An offline run logs no throughput split, no eval and no sample grids.
        let offline = "{\"step\":1,\"loss\":0.69,\"reward_mean\":null}\n\
                       {\"step\":2,\"loss\":0.6,\"reward_mean\":null}\n";
        fs::write(run.join("metrics.jsonl"), offline).unwrap();
        fs::remove_file(run.join("eval.jsonl")).unwrap();
        let summary = write_report(&run, &out).unwrap();
        assert_eq!(summary.plots, [out.join("loss.png")]);
        assert!(!out.join("throughput.png").exists());
        assert!(!out.join("eval.png").exists());
        let html = fs::read_to_string(&summary.html).unwrap();
        assert!(
            !html.contains("reward mean"),
            "no reward row without rewards"
        );
        assert!(!html.contains("Fixed-seed samples"));
    }

    #[test]
    fn a_malformed_middle_line_is_named_by_file_and_line() {
        let (_dir, run) = online_run();
        let text = format!(
            "{}\n{{\"step\": 2, \"loss\":\n{}\n",
            metrics_line(1),
            metrics_line(3)
        );
        fs::write(run.join("metrics.jsonl"), text).unwrap();
        let err = write_report(&run, &run.join("report")).unwrap_err();
        assert!(
            matches!(err, ReportError::BadLine { line: 2, .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("metrics.jsonl:2: not valid JSON"),
            "{message}"
        );
        assert!(message.contains("fix or delete that line"), "{message}");

        fs::write(run.join("metrics.jsonl"), "{\"loss\": 1.0}\n").unwrap();
        let message = write_report(&run, &run.join("report"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("metrics.jsonl:1: has no whole-number \"step\""),
            "{message}"
        );
    }

    #[test]
    fn a_truncated_last_line_is_skipped_with_a_warning() {
        let (_dir, run) = online_run();
        let text = format!(
            "{}\n{}\n{{\"step\":3,\"lo",
            metrics_line(1),
            metrics_line(2)
        );
        fs::write(run.join("metrics.jsonl"), text).unwrap();
        let summary = write_report(&run, &run.join("report")).unwrap();
        assert_eq!(summary.steps, 2);
        assert_eq!(summary.warnings.len(), 1, "{:?}", summary.warnings);
        assert!(summary.warnings[0].contains("metrics.jsonl:3: skipped a truncated last line"));
        let html = fs::read_to_string(&summary.html).unwrap();
        assert!(html.contains("skipped a truncated last line"));
    }

    #[test]
    fn a_missing_run_directory_says_what_to_give() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_report(&dir.path().join("nope"), &dir.path().join("out")).unwrap_err();
        assert!(err.to_string().contains("no such directory"), "{err}");
        let err = write_report(dir.path(), &dir.path().join("out")).unwrap_err();
        assert!(err.to_string().contains("holds no metrics.jsonl"), "{err}");
        assert!(!dir.path().join("out").exists(), "nothing is written");
    }
}
