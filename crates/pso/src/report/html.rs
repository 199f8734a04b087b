//! The self-contained HTML page: summary table, warnings, inlined plots and grids, the config.

use std::collections::BTreeSet;
use std::path::Path;

use base64::Engine as _;

use super::data::{series, RunData};
use super::grids::Grid;

pub(super) fn data_uri(png: &[u8]) -> String {
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
pub(super) fn page(
    run: &Path,
    data: &RunData,
    plots: &[(&str, Vec<u8>)],
    grids: &[Grid],
) -> String {
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
