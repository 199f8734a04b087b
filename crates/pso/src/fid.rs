//! Fréchet Inception Distance: Gaussian statistics of image features and the Fréchet distance
//! between two of them, as pytorch-fid computes it (`calculate_frechet_distance`), with the
//! feature extractor supplied by the user as a TorchScript module (the standard FID Inception-v3
//! weights, e.g. NVIDIA's `inception-2015-12-05.pt`; nothing is downloaded).

use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Kind, Tensor};

/// Errors of FID computation; each names the file involved and the fix.
#[derive(Debug, thiserror::Error)]
pub enum FidError {
    /// A file could not be read or written, or does not hold what FID needs.
    #[error("{path}: {why}")]
    File {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The two sides cannot be compared.
    #[error("{0}")]
    Mismatch(String),
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> FidError {
    FidError::File {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// Mean and covariance of a feature set (float64), pytorch-fid's `mu` and `sigma`.
#[derive(Debug)]
pub struct FeatureStats {
    /// Mean feature, [D].
    pub mu: Tensor,
    /// Covariance with N − 1 normalisation (`np.cov(rowvar=False)`), [D, D].
    pub sigma: Tensor,
}

impl FeatureStats {
    /// The statistics of `features` [N, D] (N ≥ 2).
    pub fn of(features: &Tensor) -> Result<FeatureStats, FidError> {
        let (n, _) = features
            .size2()
            .map_err(|_| FidError::Mismatch("features must be [N, D]".into()))?;
        if n < 2 {
            return Err(FidError::Mismatch(format!(
                "{n} feature vector(s): a covariance needs at least 2 images"
            )));
        }
        let x = features.to_kind(Kind::Double).to_device(Device::Cpu);
        let mu = x.mean_dim(0, false, Kind::Double);
        let centered = &x - mu.unsqueeze(0);
        let sigma = centered.tr().matmul(&centered) / (n - 1) as f64;
        Ok(FeatureStats { mu, sigma })
    }

    /// Reads pytorch-fid's `.npz` (arrays `mu` and `sigma`).
    pub fn read_npz(path: &Path) -> Result<FeatureStats, FidError> {
        let arrays = Tensor::read_npz(path).map_err(|e| file_err(path, e))?;
        let get = |name: &str| {
            arrays
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.to_kind(Kind::Double))
                .ok_or_else(|| {
                    file_err(
                        path,
                        format!("holds no array `{name}`; FID statistics need `mu` and `sigma`"),
                    )
                })
        };
        let (mu, sigma) = (get("mu")?, get("sigma")?);
        let d = mu.size();
        if d.len() != 1 || sigma.size() != [d[0], d[0]] {
            return Err(file_err(
                path,
                format!(
                    "`mu` {:?} and `sigma` {:?} are not [D] and [D, D]",
                    mu.size(),
                    sigma.size()
                ),
            ));
        }
        Ok(FeatureStats { mu, sigma })
    }

    /// Writes pytorch-fid's `.npz`.
    pub fn write_npz(&self, path: &Path) -> Result<(), FidError> {
        Tensor::write_npz(&[("mu", &self.mu), ("sigma", &self.sigma)], path)
            .map_err(|e| file_err(path, e))
    }
}

/// The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below 0,
/// rounding, clamped).
fn sqrt_psd(m: &Tensor) -> Tensor {
    let (values, vectors) = m.linalg_eigh("L");
    vectors
        .matmul(&values.clamp_min(0.0).sqrt().diag_embed(0, -2, -1))
        .matmul(&vectors.tr())
}

/// ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2 Tr((Σ₁Σ₂)^½).
///
/// Tr((Σ₁Σ₂)^½) is computed as the trace of (Σ₁^½ Σ₂ Σ₁^½)^½, which has the same eigenvalues and
/// is symmetric, so a symmetric eigendecomposition in float64 suffices where pytorch-fid calls
/// scipy's general `sqrtm` (and adds 1e-6 to the diagonals when that fails).
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64, FidError> {
    if a.mu.size() != b.mu.size() {
        return Err(FidError::Mismatch(format!(
            "the feature sizes differ ({:?} vs {:?}): both sides must come from the same \
             feature extractor",
            a.mu.size(),
            b.mu.size()
        )));
    }
    let diff = (&a.mu - &b.mu).square().sum(Kind::Double);
    let root_a = sqrt_psd(&a.sigma);
    let inner = root_a.matmul(&b.sigma).matmul(&root_a);
    let inner = (&inner + inner.tr()) / 2.0;
    let (values, _) = inner.linalg_eigh("L");
    let tr_covmean = values.clamp_min(0.0).sqrt().sum(Kind::Double);
    let fid = diff + a.sigma.trace() + b.sigma.trace() - tr_covmean * 2.0;
    Ok(fid.double_value(&[]))
}

/// A feature extractor: a TorchScript module mapping float images [N, 3, H, W] in 0..=255 to
/// features [N, D]. NVIDIA's `inception-2015-12-05.pt` takes `return_features=True` as a second
/// argument; modules without it are called with the images alone.
pub struct FeatureExtractor {
    module: CModule,
    device: Device,
    path: PathBuf,
}

impl FeatureExtractor {
    /// Loads the TorchScript file `path` onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<FeatureExtractor, FidError> {
        let mut module = CModule::load_on_device(path, device).map_err(|e| {
            file_err(
                path,
                format!(
                    "is not a TorchScript module ({e}); give the FID Inception-v3 weights as \
                     TorchScript, e.g. NVIDIA's inception-2015-12-05.pt"
                ),
            )
        })?;
        module.set_eval();
        Ok(FeatureExtractor {
            module,
            device,
            path: path.to_owned(),
        })
    }

    /// Features [N, D] (float64, CPU) of [N, H, W, 3] uint8 images.
    pub fn features(&self, images: &Tensor) -> Result<Tensor, FidError> {
        let _guard = tch::no_grad_guard();
        let x = images
            .to_device(self.device)
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float);
        let with_flag = self
            .module
            .forward_is(&[IValue::Tensor(x.shallow_clone()), IValue::Bool(true)]);
        let out = match with_flag {
            Ok(out) => out,
            Err(_) => self
                .module
                .forward_is(&[IValue::Tensor(x)])
                .map_err(|e| file_err(&self.path, format!("forward failed: {e}")))?,
        };
        let IValue::Tensor(features) = out else {
            return Err(file_err(
                &self.path,
                "returned something other than one feature tensor [N, D]",
            ));
        };
        Ok(features
            .flatten(1, -1)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu))
    }

    /// The statistics of every PNG / JPEG image in `dir` (sorted by name), `batch` at a time;
    /// images must share one size.
    pub fn folder_stats(&self, dir: &Path, batch: usize) -> Result<FeatureStats, FidError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| file_err(dir, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
            })
            .collect();
        paths.sort();
        if paths.len() < 2 {
            return Err(file_err(
                dir,
                format!(
                    "holds {} image(s); FID needs at least 2 (thousands for a meaningful value)",
                    paths.len()
                ),
            ));
        }
        let mut features = Vec::new();
        let mut size = None;
        for chunk in paths.chunks(batch.max(1)) {
            let mut images = Vec::with_capacity(chunk.len());
            for path in chunk {
                let image = image::open(path).map_err(|e| file_err(path, e))?.to_rgb8();
                let (w, h) = image.dimensions();
                if *size.get_or_insert((w, h)) != (w, h) {
                    return Err(file_err(
                        path,
                        format!(
                            "is {w}×{h} but the folder's first image is {}×{}; resize the \
                             images to one size",
                            size.unwrap().0,
                            size.unwrap().1
                        ),
                    ));
                }
                images.push(Tensor::from_slice(image.as_raw()).view([h as i64, w as i64, 3]));
            }
            features.push(self.features(&Tensor::stack(&images, 0))?);
        }
        FeatureStats::of(&Tensor::cat(&features, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_statistics_are_at_distance_zero_and_a_shift_adds_its_square() {
        let features = Tensor::randn([40, 6], (Kind::Double, Device::Cpu));
        let a = FeatureStats::of(&features).unwrap();
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-9);
        let b = FeatureStats::of(&(&features + 0.5)).unwrap();
        let fid = frechet_distance(&a, &b).unwrap();
        assert!((fid - 6.0 * 0.25).abs() < 1e-9, "{fid}");
        let c = FeatureStats::of(&Tensor::randn([40, 5], (Kind::Double, Device::Cpu))).unwrap();
        assert!(frechet_distance(&a, &c)
            .unwrap_err()
            .to_string()
            .contains("feature sizes differ"));
    }
}
