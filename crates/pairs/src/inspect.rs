//! `pso pairs inspect` and `pso pairs validate`: what a store holds, and what is wrong with it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use super::batch::Columns;
use super::reader::{
    open_shard, open_shard_paths, schema_version, shard_paths, PairReader, ReadOptions,
};
use super::record::Label;
use super::schema::col;
use super::PairsError;

/// Running mean / std / min / max.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Stats {
    /// Number of values.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    #[serde(skip)]
    m2: f64,
}

impl Stats {
    /// Adds a value (Welford's update).
    pub fn push(&mut self, x: f64) {
        if self.count == 0 {
            self.min = x;
            self.max = x;
        }
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
        self.std = (self.m2 / self.count as f64).sqrt();
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }
}

/// Pairs of one run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RunSummary {
    /// Pairs of this run.
    pub pairs: u64,
    /// Smallest policy version (none for imported pairs).
    pub policy_version_min: Option<i64>,
    /// Largest policy version.
    pub policy_version_max: Option<i64>,
}

/// What `pso pairs inspect` reports.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Shards read.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
    /// Pairs in them.
    pub pairs: u64,
    /// Pairs labelled side 0 / side 1 / tie.
    pub labels: BTreeMap<String, u64>,
    /// Ties among the pairs.
    pub ties: u64,
    /// Files per schema version.
    pub schema_versions: BTreeMap<u32, usize>,
    /// Per run id.
    pub runs: BTreeMap<String, RunSummary>,
    /// Pairs per source.
    pub sources: BTreeMap<String, u64>,
    /// Pairs per `scorer@version`.
    pub scorers: BTreeMap<String, u64>,
    /// Scores of both sides.
    pub score: Stats,
    /// |score_0 − score_1|.
    pub margin: Stats,
    /// Pairs that carry latents.
    pub with_latents: u64,
    /// Shards still open (`.parquet.tmp`): being written, or left by a crashed writer; their
    /// pairs are not counted above.
    pub open_shards: Vec<PathBuf>,
}

/// Summarises the shards under `paths`, reading only the small columns.
pub fn summarize(paths: &[PathBuf]) -> Result<Summary, PairsError> {
    let shards = shard_paths(paths)?;
    let mut s = Summary {
        open_shards: open_shard_paths(paths)?,
        ..Summary::default()
    };
    for path in &shards {
        let builder = open_shard(path)?;
        *s.schema_versions
            .entry(schema_version(path, &builder)?)
            .or_default() += 1;
        s.files += 1;
        s.bytes += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    let columns = [
        col::RUN_ID,
        col::POLICY_VERSION,
        col::SOURCE,
        col::SCORER,
        col::SCORER_VERSION,
        col::SCORE_0,
        col::SCORE_1,
        col::LABEL,
        col::LATENT_DTYPE,
    ];
    let opts = ReadOptions {
        columns: Some(columns.iter().map(|c| c.to_string()).collect()),
        batch_size: 4096,
        ..ReadOptions::default()
    };
    for batch in PairReader::open(&shards, opts)? {
        let batch = batch?;
        let c = Columns::new(&batch)?;
        for row in 0..batch.num_rows() {
            let bad = |why: String| PairsError::InvalidRecord { row, why };
            s.pairs += 1;
            let label = c.label(row).map_err(bad)?;
            let name = match label {
                Label::Side0 => "side_0",
                Label::Side1 => "side_1",
                Label::Tie => {
                    s.ties += 1;
                    "tie"
                }
            };
            *s.labels.entry(name.into()).or_default() += 1;
            let run = s
                .runs
                .entry(c.req_str(col::RUN_ID, row).map_err(bad)?.to_owned())
                .or_default();
            run.pairs += 1;
            if let Some(v) = c.i64(col::POLICY_VERSION, row).map_err(bad)? {
                run.policy_version_min = Some(run.policy_version_min.map_or(v, |m| m.min(v)));
                run.policy_version_max = Some(run.policy_version_max.map_or(v, |m| m.max(v)));
            }
            *s.sources
                .entry(c.req_str(col::SOURCE, row).map_err(bad)?.to_owned())
                .or_default() += 1;
            let scorer = format!(
                "{}@{}",
                c.req_str(col::SCORER, row).map_err(bad)?,
                c.req_str(col::SCORER_VERSION, row).map_err(bad)?
            );
            *s.scorers.entry(scorer).or_default() += 1;
            let a = c.f32(col::SCORE_0, row).map_err(bad)?.unwrap_or(f32::NAN) as f64;
            let b = c.f32(col::SCORE_1, row).map_err(bad)?.unwrap_or(f32::NAN) as f64;
            s.score.push(a);
            s.score.push(b);
            s.margin.push((a - b).abs());
            if c.str(col::LATENT_DTYPE, row).map_err(bad)?.is_some() {
                s.with_latents += 1;
            }
        }
    }
    Ok(s)
}

impl Summary {
    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mb = self.bytes as f64 / (1024.0 * 1024.0);
        let _ = writeln!(out, "files          {} ({mb:.1} MiB)", self.files);
        for path in &self.open_shards {
            let _ = writeln!(
                out,
                "open shard     {} (not counted: still being written, or left by a crashed \
                 writer; `pso pairs recover DIR` closes it)",
                path.display()
            );
        }
        let _ = writeln!(out, "pairs          {}", self.pairs);
        let tie_pct = if self.pairs > 0 {
            100.0 * self.ties as f64 / self.pairs as f64
        } else {
            0.0
        };
        let _ = writeln!(out, "ties           {} ({tie_pct:.1}%)", self.ties);
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "labels         {}", labels.join(" "));
        let versions: Vec<String> = self
            .schema_versions
            .iter()
            .map(|(v, n)| format!("v{v} ({n} files)"))
            .collect();
        let _ = writeln!(out, "schema         {}", versions.join(", "));
        let sources: Vec<String> = self
            .sources
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "sources        {}", sources.join(" "));
        for (scorer, n) in &self.scorers {
            let _ = writeln!(out, "scorer         {scorer}: {n} pairs");
        }
        if self.score.count > 0 {
            let (s, m) = (&self.score, &self.margin);
            let _ = writeln!(
                out,
                "score          mean {:.4} std {:.4} min {:.4} max {:.4}",
                s.mean, s.std, s.min, s.max
            );
            let _ = writeln!(
                out,
                "margin         mean {:.4} std {:.4} min {:.4} max {:.4}",
                m.mean, m.std, m.min, m.max
            );
        }
        let _ = writeln!(out, "with latents   {}", self.with_latents);
        for (run, r) in &self.runs {
            let versions = match (r.policy_version_min, r.policy_version_max) {
                (Some(a), Some(b)) => format!(", policy versions {a}..={b}"),
                _ => String::new(),
            };
            let _ = writeln!(out, "run            {run}: {} pairs{versions}", r.pairs);
        }
        out
    }
}

/// One thing wrong in a store.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    /// The file.
    pub path: PathBuf,
    /// The row in the file, when the problem is a row's.
    pub row: Option<usize>,
    /// What is wrong.
    pub why: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.row {
            Some(row) => write!(f, "{}: row {row}: {}", self.path.display(), self.why),
            None => write!(f, "{}: {}", self.path.display(), self.why),
        }
    }
}

/// Row problems reported per file before the rest are only counted.
const MAX_ROW_PROBLEMS_PER_FILE: usize = 20;

/// Where the labels of one scorer's pairs point: rows whose label makes the higher score the
/// winner, and rows whose label makes the lower one (as `(shard index, row)`).
#[derive(Default)]
struct LabelDirections {
    higher: Vec<(usize, usize)>,
    lower: Vec<(usize, usize)>,
}

/// Scorer name of imported human preferences, whose scores (1 / 0) are higher-is-better.
const HUMAN_SCORER: &str = "human";

/// Checks a row's label against its scores: a tie exactly when the scores are equal; otherwise
/// records which direction the label agrees with, to be judged against the scorer's majority.
fn check_label(
    record: &super::PairRecord,
    at: (usize, usize),
    directions: &mut HashMap<(String, String), LabelDirections>,
) -> Result<(), String> {
    let (s0, s1) = (record.sides[0].score, record.sides[1].score);
    match (s0 == s1, record.label) {
        (true, Label::Tie) => Ok(()),
        (true, label) => Err(format!(
            "{}: {} won, but both scores are {s0} (a tie is labelled -1)",
            col::LABEL,
            side_name(label)
        )),
        (false, Label::Tie) => Err(format!(
            "{}: a tie (-1), but the scores differ ({s0} vs {s1})",
            col::LABEL
        )),
        (false, label) => {
            let entry = directions
                .entry((record.scorer.clone(), record.scorer_version.clone()))
                .or_default();
            if label == Label::from_scores(s0, s1, true) {
                entry.higher.push(at);
            } else {
                entry.lower.push(at);
            }
            Ok(())
        }
    }
}

fn side_name(label: Label) -> &'static str {
    match label {
        Label::Side0 => "side 0",
        Label::Side1 => "side 1",
        Label::Tie => "neither side",
    }
}

/// The rows whose label points against the other pairs of the same scorer (the majority gives
/// its direction; `human` pairs are higher-is-better), at most `per_scorer` listed each.
fn label_problems(
    directions: HashMap<(String, String), LabelDirections>,
    shards: &[PathBuf],
    per_scorer: usize,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut scorers: Vec<_> = directions.into_iter().collect();
    scorers.sort_by(|a, b| a.0.cmp(&b.0));
    for ((scorer, version), d) in scorers {
        let higher_is_better = scorer == HUMAN_SCORER || d.higher.len() >= d.lower.len();
        let (agree, against) = if higher_is_better {
            (d.higher.len(), &d.lower)
        } else {
            (d.lower.len(), &d.higher)
        };
        let (won, lost) = if higher_is_better {
            ("higher", "lower")
        } else {
            ("lower", "higher")
        };
        for &(shard, row) in against.iter().take(per_scorer) {
            problems.push(Problem {
                path: shards[shard].clone(),
                row: Some(row),
                why: format!(
                    "{}: makes the {lost} score the winner, against {agree} other pairs of scorer                      {scorer} ({version}) that make the {won} one win; a flipped label                      (relabel the store with --relabel-with, or drop the pair)",
                    col::LABEL
                ),
            });
        }
        if against.len() > per_scorer {
            problems.push(Problem {
                path: shards[against[per_scorer].0].clone(),
                row: None,
                why: format!(
                    "{} more pairs of scorer {scorer} with a flipped label not listed",
                    against.len() - per_scorer
                ),
            });
        }
    }
    problems
}

/// Reads every row of every shard and lists what is wrong: unreadable files, foreign schemas,
/// rows that break the schema's invariants, pair ids stored twice, and labels that contradict
/// the scores (a tie with unequal scores, a winner with equal ones, or a winner against the
/// direction the other pairs of the same scorer follow).
pub fn validate(paths: &[PathBuf]) -> Result<(usize, u64, Vec<Problem>), PairsError> {
    let shards = shard_paths(paths)?;
    let mut problems: Vec<Problem> = open_shard_paths(paths)?
        .into_iter()
        .map(|path| Problem {
            path,
            row: None,
            why: "a shard still open: being written, or left by a crashed writer (its pairs are \
                  not read); `pso pairs recover DIR` closes it at its last flushed row group"
                .into(),
        })
        .collect();
    let mut rows_checked = 0u64;
    let mut seen: HashMap<(String, i64), (PathBuf, usize)> = HashMap::new();
    let mut directions = HashMap::new();
    for (shard, path) in shards.iter().enumerate() {
        let problem = |row: Option<usize>, why: String| Problem {
            path: path.clone(),
            row,
            why,
        };
        if let Err(e) = open_shard(path) {
            problems.push(problem(None, e.to_string()));
            continue;
        }
        let reader = PairReader::open(std::slice::from_ref(path), ReadOptions::default())?;
        let mut row0 = 0usize;
        let mut file_problems = 0usize;
        for batch in reader {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    problems.push(problem(None, format!("unreadable after row {row0}: {e}")));
                    break;
                }
            };
            let c = Columns::new(&batch)?;
            for i in 0..batch.num_rows() {
                let row = row0 + i;
                rows_checked += 1;
                let mut report = |why: String| {
                    file_problems += 1;
                    if file_problems <= MAX_ROW_PROBLEMS_PER_FILE {
                        problems.push(problem(Some(row), why));
                    }
                };
                match c.record(i) {
                    Err(why) => report(why),
                    Ok(r) => {
                        if let Err(why) = check_label(&r, (shard, row), &mut directions) {
                            report(why);
                        }
                        let key = (r.run_id.clone(), r.pair_id);
                        if let Some((p, first)) = seen.get(&key) {
                            report(format!(
                                "pair {} of run {} is stored twice (first at {} row {first})",
                                r.pair_id,
                                r.run_id,
                                p.display()
                            ));
                        } else {
                            seen.insert(key, (path.clone(), row));
                        }
                    }
                }
            }
            row0 += batch.num_rows();
        }
        if file_problems > MAX_ROW_PROBLEMS_PER_FILE {
            problems.push(problem(
                None,
                format!(
                    "{} more bad rows not listed",
                    file_problems - MAX_ROW_PROBLEMS_PER_FILE
                ),
            ));
        }
    }
    problems.extend(label_problems(
        directions,
        &shards,
        MAX_ROW_PROBLEMS_PER_FILE,
    ));
    Ok((shards.len(), rows_checked, problems))
}
