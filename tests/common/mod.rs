//! Helpers shared by the integration tests.
#![allow(dead_code, unused_imports)] // each test binary uses a different subset

mod fixtures;
mod oracle;
mod ranks;

pub use fixtures::{jpeg, png, record};
pub use oracle::{oracle, python, workspace_root};
pub use ranks::{run_ranks, spawn_ranks};

/// Asserts that an 8-bit image equals diffusers' ([H, W, 3] uint8) within 1/255, with at most
/// 1 % of the values off by that much (fp32 rounding at the last step).
pub fn assert_image_matches(ours: &image::RgbImage, theirs: &tch::Tensor, what: &str) {
    use tch::{Kind, Tensor};
    assert_eq!(
        (ours.height() as i64, ours.width() as i64),
        (theirs.size()[0], theirs.size()[1]),
        "{what}: size"
    );
    let ours = Tensor::from_slice(ours.as_raw())
        .view_as(theirs)
        .to_kind(Kind::Int);
    let diff = (ours - theirs.to_kind(Kind::Int)).abs();
    let max = diff.max().int64_value(&[]);
    let off = diff
        .gt(0)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(
        max <= 1 && off < 0.01,
        "{what}: max |Δ| {max}, {:.2}% of values differ",
        off * 100.0
    );
}

/// `pso sample` of `folder` for each prompt from its row of `latents` (given as --init-noise),
/// compared with the reference pipeline's images [N, 3, H, W] in [0, 1] to 1/255 per value.
pub fn sample_matches(
    folder: &std::path::Path,
    prompts: &[&str],
    latents: &tch::Tensor,
    images: &tch::Tensor,
    extra: &[&str],
) {
    let dir = tempfile::tempdir().unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let noise = dir.path().join(format!("noise-{i}.safetensors"));
        let row = latents.narrow(0, i as i64, 1).contiguous();
        tch::Tensor::write_safetensors(&[("latents", &row)], &noise).unwrap();
        let out = dir.path().join(format!("out-{i}"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_pso"))
            .args(["sample", "--model"])
            .arg(folder)
            .args(["--prompt", prompt, "--device", "cpu", "--init-noise"])
            .arg(&noise)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "pso sample: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let png = image::open(out.join("000000.png")).unwrap().to_rgb8();
        let theirs = (images.get(i as i64).permute([1, 2, 0]) * 255.0).round();
        assert_image_matches(
            &png,
            &theirs.to_kind(tch::Kind::Uint8),
            &format!("prompt {i}"),
        );
    }
}
