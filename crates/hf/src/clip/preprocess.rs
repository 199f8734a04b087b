//! `CLIPImageProcessor` (its PIL backend): resize the shortest side with PIL's resampling, centre
//! crop (zero-padding when the image is smaller), rescale and normalise, as configured by
//! `preprocessor_config.json`.

use std::path::Path;

use image::RgbImage;
use serde::Deserialize;
use tch::Tensor;

use crate::load::{read_json, LoadError};
use crate::HfError;

/// `size`: an int (the shortest edge, in old configs) or a dict.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    /// `"size": 224`: the shortest edge.
    Int(u32),
    /// `{"shortest_edge": 224}` or `{"height": H, "width": W}`.
    Dict {
        /// Resize so that the shorter side has this length.
        shortest_edge: Option<u32>,
        /// Exact output height.
        height: Option<u32>,
        /// Exact output width.
        width: Option<u32>,
        /// A cap on the long side (not implemented; rejected).
        longest_edge: Option<u32>,
    },
}

/// `crop_size`: an int (square) or `{"height": H, "width": W}`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum CropSpec {
    /// A square crop.
    Int(u32),
    /// A rectangular crop.
    Dict {
        /// Crop height.
        height: u32,
        /// Crop width.
        width: u32,
    },
}

impl CropSpec {
    /// (height, width).
    pub fn hw(self) -> (u32, u32) {
        match self {
            CropSpec::Int(s) => (s, s),
            CropSpec::Dict { height, width } => (height, width),
        }
    }
}

/// PIL resampling filters (`resample` in the config: PIL's enum values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    fn from_pil(code: u32, path: &Path) -> Result<Self, HfError> {
        match code {
            2 => Ok(Filter::Bilinear),
            3 => Ok(Filter::Bicubic),
            other => Err(LoadError::Unsupported {
                path: path.to_owned(),
                why: format!(
                    "`resample` {other}: only 2 (bilinear) and 3 (bicubic) are implemented"
                ),
            }
            .into()),
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            // Keys' cubic convolution with a = -0.5, as PIL's bicubic_filter.
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_size() -> SizeSpec {
    SizeSpec::Int(224)
}
fn default_crop() -> CropSpec {
    CropSpec::Int(224)
}
fn default_resample() -> u32 {
    3
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> [f32; 3] {
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn default_std() -> [f32; 3] {
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}

/// The keys of `preprocessor_config.json` CLIPImageProcessor uses, with its defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PreprocessorConfig {
    /// Whether to resize.
    #[serde(default = "default_true")]
    pub do_resize: bool,
    /// Target size.
    #[serde(default = "default_size")]
    pub size: SizeSpec,
    /// PIL resampling filter.
    #[serde(default = "default_resample")]
    pub resample: u32,
    /// Whether to centre crop.
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    /// Crop size.
    #[serde(default = "default_crop")]
    pub crop_size: CropSpec,
    /// Whether to multiply by `rescale_factor`.
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    /// Usually 1/255.
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    /// Whether to normalise with `image_mean` / `image_std`.
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    /// Per-channel mean.
    #[serde(default = "default_mean")]
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation.
    #[serde(default = "default_std")]
    pub image_std: [f32; 3],
}

/// CLIPImageProcessor: turns RGB images into `pixel_values`.
#[derive(Debug, Clone)]
pub struct ClipImageProcessor {
    config: PreprocessorConfig,
    filter: Filter,
}

impl ClipImageProcessor {
    /// Reads `dir/preprocessor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, HfError> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Err(LoadError::NotFound {
                path,
                what: "the CLIPImageProcessor config of the model; copy it from the model's \
                       processor repository"
                    .into(),
            }
            .into());
        }
        let config: PreprocessorConfig = read_json(&path)?;
        let filter = Filter::from_pil(config.resample, &path)?;
        if let SizeSpec::Dict {
            shortest_edge: None,
            height: None,
            ..
        }
        | SizeSpec::Dict {
            shortest_edge: None,
            width: None,
            ..
        }
        | SizeSpec::Dict {
            longest_edge: Some(_),
            ..
        } = config.size
        {
            return Err(LoadError::Unsupported {
                path,
                why: "`size`: expected {\"shortest_edge\": N} or {\"height\": H, \"width\": W}"
                    .into(),
            }
            .into());
        }
        Ok(ClipImageProcessor { config, filter })
    }

    /// The (height, width) of every processed image, when centre cropping fixes it.
    pub fn fixed_output_size(&self) -> Option<(u32, u32)> {
        self.config
            .do_center_crop
            .then(|| self.config.crop_size.hw())
    }

    /// (width, height) after the resize step.
    fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        if !self.config.do_resize {
            return (w, h);
        }
        match self.config.size {
            SizeSpec::Int(s)
            | SizeSpec::Dict {
                shortest_edge: Some(s),
                ..
            } => {
                // transformers: the long side is int(size * long / short), truncated.
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as f64 * long as f64 / short as f64) as u32;
                if w <= h {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
            SizeSpec::Dict {
                height: Some(hh),
                width: Some(ww),
                ..
            } => (ww, hh),
            SizeSpec::Dict { .. } => unreachable!("rejected by from_dir"),
        }
    }

    /// `pixel_values` `[N, 3, H, W]` (f32, CPU); every image must give the same output size
    /// (always true with centre cropping).
    pub fn preprocess<'a>(&self, images: impl IntoIterator<Item = &'a RgbImage>) -> Tensor {
        let tensors: Vec<Tensor> = images
            .into_iter()
            .map(|im| self.preprocess_one(im))
            .collect();
        Tensor::stack(&tensors, 0)
    }

    fn preprocess_one(&self, image: &RgbImage) -> Tensor {
        let (w, h) = self.resized_size(image.width(), image.height());
        let resized = resample(image, w, h, self.filter);
        let (ch, cw) = if self.config.do_center_crop {
            self.config.crop_size.hw()
        } else {
            (h, w)
        };
        let (oh, ow) = (ch as usize, cw as usize);
        // transformers' centre crop starts at floor((orig - crop) / 2), which is negative where
        // the crop is larger than the image: there it zero-pads.
        let (ih, iw) = (resized.height() as i64, resized.width() as i64);
        let top = (ih - ch as i64).div_euclid(2);
        let left = (iw - cw as i64).div_euclid(2);
        let c = &self.config;
        let mut out = vec![0f32; 3 * oh * ow];
        for y in 0..oh {
            for x in 0..ow {
                let (sy, sx) = (top + y as i64, left + x as i64);
                let inside = sy >= 0 && sy < ih && sx >= 0 && sx < iw;
                for k in 0..3 {
                    let v = if inside {
                        resized.get_pixel(sx as u32, sy as u32)[k]
                    } else {
                        0
                    };
                    // numpy: uint8 → float64 × factor → float32, then (x - mean) / std in f32.
                    let mut f = if c.do_rescale {
                        (v as f64 * c.rescale_factor) as f32
                    } else {
                        v as f32
                    };
                    if c.do_normalize {
                        f = (f - c.image_mean[k]) / c.image_std[k];
                    }
                    out[k * oh * ow + y * ow + x] = f;
                }
            }
        }
        Tensor::from_slice(&out).view([3, oh as i64, ow as i64])
    }
}

/// Fixed-point precision of PIL's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output position's input window and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`: an antialiased filter whose support
/// grows with the downscale factor, normalised, then rounded to fixed point.
fn coefficients(in_size: u32, out_size: u32, filter: Filter) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let weights = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    let scaled = k * (1u32 << PRECISION_BITS) as f64;
                    if scaled < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            Taps {
                start: xmin as usize,
                weights,
            }
        })
        .collect()
}

/// PIL's `clip8`: round the fixed-point sum (the caller adds one half) and clamp to 0..=255.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize` for 8-bit RGB: a horizontal pass, then a vertical pass, each rounding
/// to 8 bits; a pass is skipped when its size does not change.
fn resample(image: &RgbImage, out_w: u32, out_h: u32, filter: Filter) -> RgbImage {
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut current = image.clone();
    if out_w != current.width() {
        let taps = coefficients(current.width(), out_w, filter);
        let src = &current;
        current = RgbImage::from_fn(out_w, src.height(), |x, y| {
            let t = &taps[x as usize];
            let mut acc = [half; 3];
            for (i, &k) in t.weights.iter().enumerate() {
                let p = src.get_pixel((t.start + i) as u32, y);
                for c in 0..3 {
                    acc[c] += p[c] as i64 * k as i64;
                }
            }
            image::Rgb(acc.map(clip8))
        });
    }
    if out_h != current.height() {
        let taps = coefficients(current.height(), out_h, filter);
        let src = &current;
        current = RgbImage::from_fn(src.width(), out_h, |x, y| {
            let t = &taps[y as usize];
            let mut acc = [half; 3];
            for (i, &k) in t.weights.iter().enumerate() {
                let p = src.get_pixel(x, (t.start + i) as u32);
                for c in 0..3 {
                    acc[c] += p[c] as i64 * k as i64;
                }
            }
            image::Rgb(acc.map(clip8))
        });
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor(json: &str) -> Result<ClipImageProcessor, HfError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("preprocessor_config.json"), json).unwrap();
        ClipImageProcessor::from_dir(dir.path())
    }

    #[test]
    fn legacy_int_sizes_mean_shortest_edge_and_square_crop() {
        let p = processor(r#"{"size": 224, "crop_size": 224, "resample": 3}"#).unwrap();
        assert_eq!(p.fixed_output_size(), Some((224, 224)));
        assert_eq!(p.resized_size(300, 17), (3952, 224));
        assert_eq!(p.resized_size(37, 61), (224, 369));
        let out = p.preprocess([&RgbImage::new(37, 61)]);
        assert_eq!(out.size(), [1, 3, 224, 224]);
    }

    #[test]
    fn unsupported_resampling_and_sizes_name_the_file() {
        let err = processor(r#"{"resample": 1}"#).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("preprocessor_config.json") && msg.contains("resample"),
            "{msg}"
        );
        let err =
            processor(r#"{"size": {"shortest_edge": 224, "longest_edge": 300}}"#).unwrap_err();
        assert!(err.to_string().contains("shortest_edge"), "{err}");
    }

    #[test]
    fn a_missing_config_says_where_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipImageProcessor::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, HfError::Load(LoadError::NotFound { .. })),
            "{err}"
        );
    }
}
