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
