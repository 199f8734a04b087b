//! Drawing figures of stacked panels of curves over steps as PNG, with plotters.

use std::path::Path;
use std::sync::OnceLock;

use diffusion::pipeline::images::png;
use image::codecs::png::CompressionType;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::ReportError;

/// A curve over steps, with an optional shaded band (low, high) around it.
pub(super) struct Line {
    pub(super) label: String,
    pub(super) points: Vec<(u64, f64)>,
    pub(super) band: Vec<(u64, f64, f64)>,
}

impl Line {
    pub(super) fn new(label: &str, points: Vec<(u64, f64)>) -> Line {
        Line {
            label: label.into(),
            points,
            band: Vec::new(),
        }
    }
}

/// One chart: its caption, the curves that have data, and whether its y axis includes 0.
pub(super) struct Panel {
    title: String,
    pub(super) lines: Vec<Line>,
    zero: bool,
}

impl Panel {
    pub(super) fn new(title: impl Into<String>, lines: Vec<Line>) -> Panel {
        Panel {
            title: title.into(),
            lines: lines.into_iter().filter(|l| !l.points.is_empty()).collect(),
            zero: false,
        }
    }

    /// The y axis starts at 0, for rates, durations and fractions: a flat throughput should
    /// look flat, not like noise magnified to fill the panel.
    pub(super) fn zero_based(mut self) -> Panel {
        self.zero = true;
        self
    }
}

/// One PNG (`OUT/{name}.png`) of panels stacked vertically; titled on the page.
pub(super) struct Figure {
    pub(super) name: &'static str,
    pub(super) title: &'static str,
    pub(super) panels: Vec<Panel>,
}

impl Figure {
    pub(super) fn new(name: &'static str, title: &'static str, panels: Vec<Panel>) -> Figure {
        Figure {
            name,
            title,
            panels: panels.into_iter().filter(|p| !p.lines.is_empty()).collect(),
        }
    }
}

/// Plot width in pixels.
pub(super) const WIDTH: u32 = 960;
/// Height of one panel in pixels; a figure stacks its panels.
pub(super) const PANEL_HEIGHT: u32 = 320;
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
pub(super) fn draw(figure: &Figure, path: &Path) -> Result<Vec<u8>, ReportError> {
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
