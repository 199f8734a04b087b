//! Scorers read straight off the pixels, with no model: where the foreground sits, how red the
//! image is, how much of it the foreground covers. They reward the toy model (data/toy) in tests,
//! benchmarks and the demo: fast, deterministic, and checkable by eye.
//!
//! The foreground is every pixel far (L1 distance > 96 of 765) from the background colour, taken
//! as the per-channel median of the border pixels.

use async_trait::async_trait;
use image::RgbImage;

use crate::{RewardError, ScoreItem, Scorer, ScorerInfo};

/// Which pixel statistic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelMetric {
    /// 1 − (distance of the foreground centroid from the image centre) / (the farthest the
    /// centroid of a disc of the foreground's area can be while inside the image), in [0, 1].
    /// Normalising by the room the shape has makes the score blind to size: otherwise large
    /// shapes, which cannot stray far, score higher, and a policy learns to grow them. 0 unless
    /// the foreground covers 1–60 % of the image (no shape, or no background left: a washed-out
    /// image must not win by having a centred "foreground").
    Centered,
    /// Mean over pixels of (R − max(G, B)) / 255, in [−1, 1].
    Redness,
    /// Fraction of pixels in the foreground.
    Size,
}

impl PixelMetric {
    /// The names `reward.model` takes.
    pub const NAMES: [&'static str; 3] = ["centered", "redness", "size"];

    /// Parses a metric name.
    pub fn from_name(name: &str) -> Result<PixelMetric, RewardError> {
        Ok(match name {
            "centered" => PixelMetric::Centered,
            "redness" => PixelMetric::Redness,
            "size" => PixelMetric::Size,
            other => {
                return Err(RewardError::Config(format!(
                    "pixel scorer `{other}` does not exist; use one of: {}",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            PixelMetric::Centered => "centered",
            PixelMetric::Redness => "redness",
            PixelMetric::Size => "size",
        }
    }

    /// The statistic of one image.
    pub fn measure(self, image: &RgbImage) -> f32 {
        if self == PixelMetric::Redness {
            let total: f32 = image
                .pixels()
                .map(|p| (p[0] as f32 - p[1].max(p[2]) as f32) / 255.0)
                .sum();
            return total / (image.width() * image.height()).max(1) as f32;
        }
        let foreground = foreground(image);
        let count = foreground.len() as f32;
        let (w, h) = (image.width() as f32, image.height() as f32);
        match self {
            PixelMetric::Size => count / (w * h).max(1.0),
            _ if !(0.01..=0.6).contains(&(count / (w * h))) => 0.0,
            _ => {
                let (sx, sy) = foreground.iter().fold((0.0, 0.0), |(sx, sy), &(x, y)| {
                    (sx + x as f32, sy + y as f32)
                });
                // Pixel centres sit at +0.5.
                let (cx, cy) = (sx / count + 0.5, sy / count + 0.5);
                let distance = ((cx - w / 2.0).powi(2) + (cy - h / 2.0).powi(2)).sqrt();
                let radius = (count / std::f32::consts::PI).sqrt();
                let room = (w / 2.0 - radius).hypot(h / 2.0 - radius).max(1.0);
                (1.0 - distance / room).clamp(0.0, 1.0)
            }
        }
    }
}

/// Coordinates of the pixels that differ from the border's median colour.
fn foreground(image: &RgbImage) -> Vec<(u32, u32)> {
    let (w, h) = image.dimensions();
    if w < 3 || h < 3 {
        return Vec::new();
    }
    let border: Vec<[u8; 3]> = (0..w)
        .flat_map(|x| [(x, 0), (x, h - 1)])
        .chain((1..h - 1).flat_map(|y| [(0, y), (w - 1, y)]))
        .map(|(x, y)| image.get_pixel(x, y).0)
        .collect();
    let background: [i32; 3] = std::array::from_fn(|c| {
        let mut v: Vec<u8> = border.iter().map(|p| p[c]).collect();
        v.sort_unstable();
        v[v.len() / 2] as i32
    });
    image
        .enumerate_pixels()
        .filter(|(_, _, p)| {
            (0..3)
                .map(|c| (p[c] as i32 - background[c]).abs())
                .sum::<i32>()
                > 96
        })
        .map(|(x, y, _)| (x, y))
        .collect()
}

/// A [`Scorer`] of one pixel statistic (higher is better).
#[derive(Debug, Clone, Copy)]
pub struct PixelScorer {
    metric: PixelMetric,
}

impl PixelScorer {
    /// The scorer of metric `name` (see [`PixelMetric::NAMES`]).
    pub fn new(name: &str) -> Result<PixelScorer, RewardError> {
        Ok(PixelScorer {
            metric: PixelMetric::from_name(name)?,
        })
    }
}

#[async_trait]
impl Scorer for PixelScorer {
    fn info(&self) -> ScorerInfo {
        ScorerInfo {
            name: "pixel".into(),
            version: self.metric.name().into(),
            higher_is_better: true,
        }
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        Ok(items.iter().map(|i| self.metric.measure(i.image)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// A 32² blue image with a red 6×6 square at (x, y).
    fn square_at(x: u32, y: u32) -> RgbImage {
        RgbImage::from_fn(32, 32, |px, py| {
            if (x..x + 6).contains(&px) && (y..y + 6).contains(&py) {
                Rgb([220, 40, 40])
            } else {
                Rgb([40, 80, 220])
            }
        })
    }

    #[test]
    fn centered_is_one_in_the_middle_and_falls_towards_a_corner() {
        let m = PixelMetric::Centered;
        assert!((m.measure(&square_at(13, 13)) - 1.0).abs() < 1e-6);
        let corner = m.measure(&square_at(1, 1));
        // Centroid (4, 4), centre (16, 16): distance 12√2; a disc of area 36 (r = 3.385) has
        // room (16 − r)√2 to move.
        let r = (36.0 / std::f32::consts::PI).sqrt();
        assert!(
            (corner - (1.0 - 12.0 / (16.0 - r))).abs() < 1e-5,
            "{corner}"
        );
        assert!(m.measure(&square_at(8, 8)) > corner);
        let plain = RgbImage::from_pixel(32, 32, Rgb([9, 9, 9]));
        assert_eq!(m.measure(&plain), 0.0);
        // A frame of background around a centred foreground filling most of the image.
        let washed = RgbImage::from_fn(32, 32, |x, y| {
            if (2..30).contains(&x) && (2..30).contains(&y) {
                Rgb([200, 200, 200])
            } else {
                Rgb([9, 9, 9])
            }
        });
        assert_eq!(m.measure(&washed), 0.0);
    }

    #[test]
    fn centered_does_not_prefer_large_shapes_at_the_same_relative_offset() {
        // Discs of radius 3 and 10, each displaced (diagonally) half of the room it has.
        let disc = |r: f32| {
            let offset = (16.0 - r) / 2.0;
            RgbImage::from_fn(32, 32, move |x, y| {
                let (dx, dy) = (
                    x as f32 + 0.5 - 16.0 - offset,
                    y as f32 + 0.5 - 16.0 - offset,
                );
                if dx * dx + dy * dy <= r * r {
                    Rgb([220, 40, 40])
                } else {
                    Rgb([40, 80, 220])
                }
            })
        };
        let m = PixelMetric::Centered;
        let (small, large) = (m.measure(&disc(3.0)), m.measure(&disc(10.0)));
        assert!(
            (small - 0.5).abs() < 0.05 && (large - 0.5).abs() < 0.05,
            "{small} vs {large}"
        );
    }

    #[test]
    fn size_and_redness_read_the_pixels() {
        let img = square_at(3, 3);
        assert_eq!(PixelMetric::Size.measure(&img), 36.0 / 1024.0);
        let red = RgbImage::from_pixel(4, 4, Rgb([255, 0, 0]));
        assert_eq!(PixelMetric::Redness.measure(&red), 1.0);
        assert!(PixelMetric::Redness.measure(&img) < 0.0);
    }

    #[test]
    fn scores_come_in_order_and_bad_names_say_what_exists() {
        let scorer = PixelScorer::new("centered").unwrap();
        let (a, b) = (square_at(13, 13), square_at(0, 0));
        let items = [
            ScoreItem {
                prompt: "p",
                image: &a,
            },
            ScoreItem {
                prompt: "p",
                image: &b,
            },
        ];
        let scores = futures::executor::block_on(scorer.score(&items)).unwrap();
        assert!(scores[0] > scores[1]);
        assert_eq!(scorer.info().version, "centered");
        let e = PixelScorer::new("blueness").unwrap_err().to_string();
        assert!(e.contains("centered, redness, size"), "{e}");
    }
}
