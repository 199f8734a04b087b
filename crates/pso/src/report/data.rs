//! Reading a run directory: metrics.jsonl, eval.jsonl and config.toml, and the figures they fill.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde_json::{Map, Value};

use super::plot::{Figure, Line, Panel};
use super::{io, ReportError};

/// One line of a `.jsonl` file.
pub(super) struct Row {
    pub(super) step: u64,
    pub(super) values: Map<String, Value>,
}

/// What the report reads from a run directory.
pub(super) struct RunData {
    pub(super) metrics: Vec<Row>,
    pub(super) evals: Vec<Row>,
    pub(super) config: Option<String>,
    /// `config` parsed, for the few settings the summary shows.
    settings: Option<toml::Table>,
    pub(super) warnings: Vec<String>,
}

impl RunData {
    pub(super) fn read(run: &Path) -> Result<RunData, ReportError> {
        let not_a_run = |why| ReportError::NotARun {
            path: run.to_owned(),
            why,
        };
        if !run.is_dir() {
            return Err(not_a_run(
                "no such directory; give the run directory that `pso online` or `pso offline` \
                 wrote (their --out, or run.out/run.name of the config)",
            ));
        }
        let metrics_path = run.join("metrics.jsonl");
        if !metrics_path.exists() {
            return Err(not_a_run(
                "holds no metrics.jsonl, so it is no run directory (or its run has not started \
                 training yet); give the folder that `pso online` or `pso offline` wrote (their \
                 --out, or run.out/run.name of the config)",
            ));
        }
        let mut warnings = Vec::new();
        let metrics = read_jsonl(&metrics_path, &mut warnings)?;
        let eval_path = run.join("eval.jsonl");
        let evals = if eval_path.exists() {
            read_jsonl(&eval_path, &mut warnings)?
        } else {
            Vec::new()
        };
        let config_path = run.join("config.toml");
        let config = if config_path.exists() {
            Some(fs::read_to_string(&config_path).map_err(io(&config_path))?)
        } else {
            warnings.push(format!(
                "{}: missing; the page shows no config",
                config_path.display()
            ));
            None
        };
        let settings = match config.as_deref().map(str::parse::<toml::Table>) {
            Some(Ok(table)) => Some(table),
            Some(Err(e)) => {
                warnings.push(format!(
                    "{}: not valid TOML, so the summary shows none of its settings ({e})",
                    config_path.display()
                ));
                None
            }
            None => None,
        };
        Ok(RunData {
            metrics,
            evals,
            config,
            settings,
            warnings,
        })
    }

    /// The string setting `section.key` of the run's config, if it has one.
    pub(super) fn setting(&self, section: &str, key: &str) -> Option<String> {
        let value = self.settings.as_ref()?.get(section)?.get(key)?;
        value.as_str().map(str::to_owned)
    }

    /// Every figure the report knows, each with the panels this run has data for.
    pub(super) fn figures(&self) -> Vec<Figure> {
        let m = |key| series(&self.metrics, key);
        let line = |label: &str, key| Line::new(label, m(key));
        let reward = Line {
            band: band(&m("reward_mean"), &m("reward_std")),
            ..line("mean ± std", "reward_mean")
        };
        let eval_names: BTreeSet<&str> = self
            .evals
            .iter()
            .flat_map(|row| row.values.keys())
            .filter_map(|k| k.strip_prefix("eval/"))
            .collect();
        let gold = self.gold_panel(&eval_names);
        // One panel per scorer: their scales differ (PickScore ≈ 22, aesthetic ≈ 5).
        let evals = eval_names
            .into_iter()
            .map(|name| {
                let points = series(&self.evals, &format!("eval/{name}"));
                Panel::new(
                    format!("eval: {name}"),
                    vec![Line::new("mean score", points)],
                )
            })
            .collect();
        vec![
            Figure::new(
                "reward",
                "Reward of the sampled pairs",
                vec![
                    Panel::new("reward", vec![reward, line("max", "reward_max")]),
                    Panel::new(
                        "winner − loser score",
                        vec![line("score margin", "score_margin")],
                    ),
                ],
            ),
            Figure::new("eval", "Fixed-seed evaluation", evals),
            Figure::new(
                "gold",
                "Training reward vs held-out rewards (reward hacking shows as a gap)",
                gold.into_iter().collect(),
            ),
            Figure::new(
                "loss",
                "Loss",
                vec![Panel::new("loss", vec![line("loss", "loss")])],
            ),
            Figure::new(
                "preference",
                "Implicit preference",
                vec![
                    Panel::new("margin", vec![line("margin", "margin")]),
                    Panel::new("accuracy", vec![line("accuracy", "accuracy")]).zero_based(),
                ],
            ),
            Figure::new(
                "optimizer",
                "Optimizer",
                vec![
                    Panel::new("gradient norm", vec![line("grad norm", "grad_norm")]).zero_based(),
                    Panel::new("learning rate", vec![line("lr", "lr")]).zero_based(),
                ],
            ),
            Figure::new(
                "throughput",
                "Throughput and time split",
                vec![
                    Panel::new(
                        "throughput (per second of wall time)",
                        vec![
                            line("pairs/s", "pairs_per_s"),
                            line("images/s", "images_per_s"),
                        ],
                    )
                    .zero_based(),
                    Panel::new(
                        "seconds per step",
                        vec![
                            line("actor", "time_actor_s"),
                            line("reward wait", "time_reward_s"),
                            line("learner", "time_learner_s"),
                        ],
                    )
                    .zero_based(),
                    Panel::new(
                        "learner busy fraction",
                        vec![line("learner busy", "learner_busy")],
                    )
                    .zero_based(),
                ],
            ),
        ]
    }
}

impl RunData {
    /// With two or more eval scorers (the held-out "gold" pattern: train on one scorer, evaluate
    /// on others through `eval.scorers`), every scorer's eval mean as its change since the first
    /// evaluation, in % of that value, on one panel: a training reward that climbs while the
    /// held-out ones stall or fall is a reward being hacked. The training scorer is named so.
    fn gold_panel(&self, eval_names: &BTreeSet<&str>) -> Option<Panel> {
        if eval_names.len() < 2 {
            return None;
        }
        let training = self.setting("reward", "scorer").map(|scorer| {
            let model = self.setting("reward", "model").unwrap_or_default();
            (scorer.clone(), format!("{scorer}:{model}"))
        });
        let lines = eval_names
            .iter()
            .filter_map(|name| {
                let points = series(&self.evals, &format!("eval/{name}"));
                let first = points.first()?.1;
                if first.abs() < 1e-12 {
                    return None;
                }
                let relative = points
                    .iter()
                    .map(|&(step, v)| (step, 100.0 * (v - first) / first.abs()))
                    .collect();
                let trains = training
                    .as_ref()
                    .is_some_and(|(kind, spec)| name == kind || name == spec);
                let label = if trains {
                    format!("{name} (training reward)")
                } else {
                    format!("{name} (held out)")
                };
                Some(Line::new(&label, relative))
            })
            .collect();
        Some(Panel::new("change since the first evaluation, %", lines))
    }
}

/// The objects of a `.jsonl` file, in order. A last line that does not parse and lacks its
/// newline is a write cut short (a killed run, or one still writing): skipped with a warning.
fn read_jsonl(path: &Path, warnings: &mut Vec<String>) -> Result<Vec<Row>, ReportError> {
    let bytes = fs::read(path).map_err(io(path))?;
    // Lossy, so a multi-byte character cut by the truncation does not fail the whole file.
    let text = String::from_utf8_lossy(&bytes);
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut rows = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| ReportError::BadLine {
            path: path.to_owned(),
            line: i + 1,
            why,
        };
        let mut values = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(values)) => values,
            Ok(_) => return Err(bad("not a JSON object".into())),
            Err(_) if i + 1 == lines.len() && !complete => {
                warnings.push(format!(
                    "{}:{}: skipped a truncated last line (a run killed or still writing leaves one)",
                    path.display(),
                    i + 1
                ));
                continue;
            }
            Err(e) => return Err(bad(format!("not valid JSON ({e})"))),
        };
        let step = values
            .remove("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| bad("has no whole-number \"step\"".into()))?;
        rows.push(Row { step, values });
    }
    Ok(rows)
}

/// The finite values of `key` by step; a step logged twice (an evaluation repeated after a
/// resume) keeps its last value.
pub(super) fn series(rows: &[Row], key: &str) -> Vec<(u64, f64)> {
    let mut by_step = BTreeMap::new();
    for row in rows {
        if let Some(v) = row.values.get(key).and_then(Value::as_f64) {
            if v.is_finite() {
                by_step.insert(row.step, v);
            }
        }
    }
    by_step.into_iter().collect()
}

/// mean ± std at the steps that have both.
fn band(mean: &[(u64, f64)], std: &[(u64, f64)]) -> Vec<(u64, f64, f64)> {
    let std: BTreeMap<u64, f64> = std.iter().copied().collect();
    mean.iter()
        .filter_map(|&(s, m)| std.get(&s).map(|&sd| (s, m - sd, m + sd)))
        .collect()
}
