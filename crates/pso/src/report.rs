//! `pso report RUN`: a run directory's metrics, evaluations and sample grids as PNG plots in `OUT/`
//! (default `RUN/report/`) and one self-contained page, `OUT/index.html`, which inlines the plots
//! and grids as data URIs so the one file can be mailed or attached to an issue.
//!
//! It only reads the run directory, so it is safe to run while the run is still training: a
//! last line cut off by a write in progress (or by a killed run) is skipped with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine as _;
use diffusion::pipeline::images::png;
use image::codecs::png::CompressionType;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{Map, Value};

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

/// One line of a `.jsonl` file.
struct Row {
    step: u64,
    values: Map<String, Value>,
}

/// What the report reads from a run directory.
struct RunData {
    metrics: Vec<Row>,
    evals: Vec<Row>,
    config: Option<String>,
    /// `config` parsed, for the few settings the summary shows.
    settings: Option<toml::Table>,
    warnings: Vec<String>,
}

impl RunData {
    fn read(run: &Path) -> Result<RunData, ReportError> {
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
    fn setting(&self, section: &str, key: &str) -> Option<String> {
        let value = self.settings.as_ref()?.get(section)?.get(key)?;
        value.as_str().map(str::to_owned)
    }

    /// Every figure the report knows, each with the panels this run has data for.
    fn figures(&self) -> Vec<Figure> {
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
fn series(rows: &[Row], key: &str) -> Vec<(u64, f64)> {
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

/// A curve over steps, with an optional shaded band (low, high) around it.
struct Line {
    label: String,
    points: Vec<(u64, f64)>,
    band: Vec<(u64, f64, f64)>,
}

impl Line {
    fn new(label: &str, points: Vec<(u64, f64)>) -> Line {
        Line {
            label: label.into(),
            points,
            band: Vec::new(),
        }
    }
}

/// One chart: its caption, the curves that have data, and whether its y axis includes 0.
struct Panel {
    title: String,
    lines: Vec<Line>,
    zero: bool,
}

impl Panel {
    fn new(title: impl Into<String>, lines: Vec<Line>) -> Panel {
        Panel {
            title: title.into(),
            lines: lines.into_iter().filter(|l| !l.points.is_empty()).collect(),
            zero: false,
        }
    }

    /// The y axis starts at 0, for rates, durations and fractions: a flat throughput should
    /// look flat, not like noise magnified to fill the panel.
    fn zero_based(mut self) -> Panel {
        self.zero = true;
        self
    }
}

/// One PNG (`OUT/{name}.png`) of panels stacked vertically; titled on the page.
struct Figure {
    name: &'static str,
    title: &'static str,
    panels: Vec<Panel>,
}

impl Figure {
    fn new(name: &'static str, title: &'static str, panels: Vec<Panel>) -> Figure {
        Figure {
            name,
            title,
            panels: panels.into_iter().filter(|p| !p.lines.is_empty()).collect(),
        }
    }
}

/// Plot width in pixels.
const WIDTH: u32 = 960;
/// Height of one panel in pixels; a figure stacks its panels.
const PANEL_HEIGHT: u32 = 320;
/// Curves with at most this many points get a marker per point (sparse evals stay visible).
const MARKERS_UP_TO: usize = 60;
/// Matplotlib's tab10, which stays distinguishable on white.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Registers the embedded font as plotters' "sans-serif" (which all its text uses) once per
/// process; embedding it keeps the binary free of fontconfig and system fonts. A proportional
/// font, since plotters' ab_glyph renderer drops side bearings, which garbles monospace text.
fn register_font() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        )
        .is_ok()
    })
}

/// `figure` as PNG bytes (`path` is only for errors).
fn draw(figure: &Figure, path: &Path) -> Result<Vec<u8>, ReportError> {
    let err = |why: String| ReportError::Render {
        path: path.to_owned(),
        why,
    };
    if !register_font() {
        return Err(err("the embedded font (Ubuntu Light) does not load".into()));
    }
    let height = PANEL_HEIGHT * figure.panels.len() as u32;
    let mut pixels = vec![0u8; (WIDTH * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let areas = root.split_evenly((figure.panels.len(), 1));
        for (area, panel) in areas.iter().zip(&figure.panels) {
            draw_panel(area, panel).map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let image = image::RgbImage::from_raw(WIDTH, height, pixels).expect("buffer sized for it");
    // Compressed hard: the page inlines every plot, and plots compress well.
    Ok(png(&image, CompressionType::Best))
}

/// One panel into `area`: axes, each curve with its band and markers, and a legend.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let points = || panel.lines.iter().flat_map(|l| &l.points);
    let x0 = points().map(|p| p.0).min().unwrap_or(0);
    // A single step still needs a non-empty axis.
    let x1 = points().map(|p| p.0).max().unwrap_or(0).max(x0 + 1);
    let ys = points().map(|p| p.1).chain(
        panel
            .lines
            .iter()
            .flat_map(|l| l.band.iter().flat_map(|b| [b.1, b.2])),
    );
    let start = if panel.zero {
        (0.0, 0.0)
    } else {
        (f64::INFINITY, f64::NEG_INFINITY)
    };
    let (y0, y1) = ys.fold(start, |(lo, hi), y| (lo.min(y), hi.max(y)));
    let pad = if y1 > y0 {
        (y1 - y0) * 0.05
    } else if y0 != 0.0 {
        y0.abs() * 0.05
    } else {
        1.0
    };
    let (y0, y1) = (y0 - pad, y1 + pad);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_label_formatter(&tick_format(y0, y1))
        .draw()?;
    for (i, line) in panel.lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if line.band.len() >= 2 {
            let outline = line
                .band
                .iter()
                .map(|&(s, _, hi)| (s, hi))
                .chain(line.band.iter().rev().map(|&(s, lo, _)| (s, lo)))
                .collect::<Vec<_>>();
            chart.draw_series([Polygon::new(outline, color.mix(0.2).filled())])?;
        }
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(line.points.iter().copied(), style))?
            .label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        if line.points.len() <= MARKERS_UP_TO {
            chart.draw_series(
                line.points
                    .iter()
                    .map(|&p| Circle::new(p, 3, color.filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

/// Tick labels for a y axis from `lo` to `hi` that resolve a tenth of it (plotters' default
/// shows a learning rate of 1e-5 as "0.0"); scientific for tiny or huge magnitudes.
fn tick_format(lo: f64, hi: f64) -> impl Fn(&f64) -> String {
    let magnitude = lo.abs().max(hi.abs());
    let scientific = magnitude != 0.0 && !(1e-3..1e6).contains(&magnitude);
    let decimals = (-((hi - lo) / 10.0).log10()).ceil().clamp(0.0, 6.0) as usize;
    move |v| {
        if scientific {
            format!("{v:.1e}")
        } else {
            format!("{v:.decimals$}")
        }
    }
}

/// A sample grid to show: its step and PNG bytes.
struct Grid {
    step: u64,
    png: Vec<u8>,
}

/// How many of the newest grids the page shows (besides the first, the baseline).
const LATEST_GRIDS: usize = 3;
/// Grids wider than this are scaled down for the page (SDXL grids reach 4096 px), so the page
/// stays small enough to mail; the full-size files stay in RUN/samples/.
const MAX_GRID_WIDTH: u32 = 2048;

/// The first grid of `samples/` (the eval before the first step) and the newest few, by step.
fn sample_grids(samples: &Path, warnings: &mut Vec<String>) -> Result<Vec<Grid>, ReportError> {
    let Ok(entries) = fs::read_dir(samples) else {
        return Ok(Vec::new());
    };
    let mut steps = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(io(samples))?.path();
        let step = path.file_name().and_then(|n| n.to_str()).and_then(|n| {
            n.strip_prefix("step-")?
                .strip_suffix(".png")?
                .parse::<u64>()
                .ok()
        });
        if let Some(step) = step {
            steps.insert(step, path);
        }
    }
    let keep = steps.len().saturating_sub(LATEST_GRIDS);
    let chosen = steps
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| i == 0 || i >= keep)
        .map(|(_, grid)| grid);
    let mut grids = Vec::new();
    for (step, path) in chosen {
        match grid_png(&path) {
            Ok(png) => grids.push(Grid { step, png }),
            Err(why) => warnings.push(format!("{}: skipped ({why})", path.display())),
        }
    }
    Ok(grids)
}

/// The PNG bytes of the grid at `path`, scaled down when wider than `MAX_GRID_WIDTH`.
fn grid_png(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    let reader = || image::ImageReader::with_format(Cursor::new(&bytes), image::ImageFormat::Png);
    let (w, h) = reader().into_dimensions().map_err(|e| e.to_string())?;
    if w <= MAX_GRID_WIDTH {
        return Ok(bytes);
    }
    let image = reader().decode().map_err(|e| e.to_string())?;
    let height = (h as u64 * MAX_GRID_WIDTH as u64 / w as u64).max(1) as u32;
    let small = image.resize_exact(
        MAX_GRID_WIDTH,
        height,
        image::imageops::FilterType::Triangle,
    );
    Ok(png(&small.to_rgb8(), CompressionType::Best))
}

fn data_uri(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A value as the summary table shows it.
fn number(v: f64) -> String {
    format!("{v:.4}")
}

/// The summary table's rows (name, value), unescaped.
fn summary_rows(run: &Path, data: &RunData) -> Vec<(String, String)> {
    let mut rows = vec![("run".to_string(), run.display().to_string())];
    for (section, key) in [
        ("model", "id"),
        ("objective", "kind"),
        ("peft", "kind"),
        ("reward", "scorer"),
    ] {
        if let Some(value) = data.setting(section, key) {
            rows.push((format!("{section}.{key}"), value));
        }
    }
    let steps = match (data.metrics.first(), data.metrics.last()) {
        (Some(first), Some(last)) => format!(
            "{} logged (step {} to {})",
            data.metrics.len(),
            first.step,
            last.step
        ),
        _ => "none logged yet".into(),
    };
    rows.push(("learner steps".into(), steps));
    let at = |(step, v): (u64, f64)| format!("{} (step {step})", number(v));
    let reward = series(&data.metrics, "reward_mean");
    if let (Some(&first), Some(&last)) = (reward.first(), reward.last()) {
        rows.push((
            "reward mean, first → last".into(),
            format!("{} → {}", at(first), at(last)),
        ));
    }
    if let Some(&last) = series(&data.metrics, "loss").last() {
        rows.push(("last loss".into(), at(last)));
    }
    let eval_keys: BTreeSet<&String> = data
        .evals
        .iter()
        .flat_map(|row| row.values.keys())
        .filter(|k| k.starts_with("eval/"))
        .collect();
    for key in eval_keys {
        if let Some(&last) = series(&data.evals, key).last() {
            rows.push((format!("last {key}"), at(last)));
        }
    }
    rows
}

/// The HTML page: summary, warnings, plots, sample grids and the config, all inline.
fn page(run: &Path, data: &RunData, plots: &[(&str, Vec<u8>)], grids: &[Grid]) -> String {
    let folder = || {
        let path = run.canonicalize().unwrap_or_else(|_| run.to_owned());
        let name = path.file_name()?.to_string_lossy().into_owned();
        Some(name)
    };
    let name = data
        .setting("run", "name")
        .or_else(folder)
        .unwrap_or_else(|| run.display().to_string());
    let mut html = String::new();
    let mut w = |s: String| html.push_str(&s);
    w(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>pso report: {name}</title>\n<style>\
         body{{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2em .6em;\
         text-align:left;vertical-align:top}}img{{max-width:100%}}\
         pre{{background:#f5f5f5;padding:1em;overflow:auto}}.warn{{color:#a40}}\
         </style></head><body>\n<h1>pso report: {name}</h1>\n",
        name = escape(&name)
    ));
    w("<h2>Summary</h2>\n<table>\n".into());
    for (key, value) in summary_rows(run, data) {
        w(format!(
            "<tr><th>{}</th><td>{}</td></tr>\n",
            escape(&key),
            escape(&value)
        ));
    }
    w("</table>\n".into());
    if !data.warnings.is_empty() {
        w("<h2>Warnings</h2>\n<ul class=\"warn\">\n".into());
        for warning in &data.warnings {
            w(format!("<li>{}</li>\n", escape(warning)));
        }
        w("</ul>\n".into());
    }
    if !plots.is_empty() {
        w("<h2>Plots</h2>\n".into());
    }
    for (title, png) in plots {
        w(format!(
            "<h3>{t}</h3>\n<img alt=\"{t}\" src=\"{}\">\n",
            data_uri(png),
            t = escape(title)
        ));
    }
    if !grids.is_empty() {
        w("<h2>Fixed-seed samples</h2>\n".into());
    }
    for grid in grids {
        w(format!(
            "<figure><img alt=\"samples at step {s}\" src=\"{}\">\
             <figcaption>after step {s}</figcaption></figure>\n",
            data_uri(&grid.png),
            s = grid.step
        ));
    }
    if let Some(config) = &data.config {
        w(format!(
            "<h2>Config</h2>\n<details><summary>config.toml</summary><pre>{}</pre></details>\n",
            escape(config)
        ));
    }
    w("</body></html>\n".into());
    html
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn grid(run: &Path, step: u64, width: u32) -> Vec<u8> {
        let image =
            image::RgbImage::from_fn(width, 4, |x, _| image::Rgb([(x % 8) as u8 * 30, 90, 0]));
        let path = run.join(format!("samples/step-{step:08}.png"));
        image.save(&path).unwrap();
        fs::read(path).unwrap()
    }

    /// An online run after 3 steps with evaluations before step 1 and after step 2.
    fn online_run() -> (tempfile::TempDir, PathBuf) {
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

    #[test]
    fn the_first_and_newest_grids_are_shown_and_wide_ones_scaled_down() {
        let (_dir, run) = online_run();
        for step in [0, 1, 2, 3] {
            grid(&run, step, 8);
        }
        grid(&run, 4, 3000);
        let mut warnings = Vec::new();
        let grids = sample_grids(&run.join("samples"), &mut warnings).unwrap();
        let steps: Vec<u64> = grids.iter().map(|g| g.step).collect();
        assert_eq!(steps, [0, 2, 3, 4]);
        let wide = image::load_from_memory(&grids[3].png).unwrap();
        assert_eq!((wide.width(), wide.height()), (MAX_GRID_WIDTH, 2));
        assert!(warnings.is_empty());
    }
}
