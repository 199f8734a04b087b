//! The fixed-seed sample grids of `RUN/samples/` the page shows, scaled down when too wide.

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::path::Path;

use diffusion::pipeline::images::png;
use image::codecs::png::CompressionType;

use super::{io, ReportError};

/// A sample grid to show: its step and PNG bytes.
pub(super) struct Grid {
    pub(super) step: u64,
    pub(super) png: Vec<u8>,
}

/// How many of the newest grids the page shows (besides the first, the baseline).
const LATEST_GRIDS: usize = 3;
/// Grids wider than this are scaled down for the page (SDXL grids reach 4096 px), so the page
/// stays small enough to mail; the full-size files stay in RUN/samples/.
const MAX_GRID_WIDTH: u32 = 2048;

/// The first grid of `samples/` (the eval before the first step) and the newest few, by step.
pub(super) fn sample_grids(
    samples: &Path,
    warnings: &mut Vec<String>,
) -> Result<Vec<Grid>, ReportError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{grid, online_run};

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
