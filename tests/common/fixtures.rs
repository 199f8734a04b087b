//! Pair-store fixtures: small images and fully populated pair records.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Cursor;

use pairs::{ImageFormat, Label, LatentDType, Latents, PairRecord, Side, Source};

/// A small PNG whose pixels depend on `seed`.
pub fn png(seed: u64, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x as u64 * 7 + y as u64 * 13 + seed * 31) as u8;
        image::Rgb([v, v.wrapping_mul(3), v ^ 0x5a])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A small JPEG whose pixels depend on `seed`.
pub fn jpeg(seed: u64, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 9) as u8, (y * 5) as u8, seed as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .unwrap();
    out
}

/// A fully populated online pair: every optional column set on even ids, left empty on odd ones.
pub fn record(run_id: &str, pair_id: i64) -> PairRecord {
    let full = pair_id % 2 == 0;
    let timesteps = vec![999, 749, 499, 249];
    let shape = vec![4, 8, 8];
    let one = 4 * 8 * 8 * 2;
    let bytes = |n: usize, salt: u8| {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(salt))
            .collect::<Vec<u8>>()
    };
    let s0 = (pair_id as f32) * 0.25 - 3.0;
    let s1 = if pair_id % 5 == 0 {
        s0
    } else {
        1.5 - pair_id as f32 * 0.125
    };
    PairRecord {
        run_id: run_id.to_owned(),
        pair_id,
        created_at_us: 1_700_000_000_000_000 + pair_id,
        policy_version: full.then_some(pair_id / 3),
        source: if full {
            Source::Online
        } else {
            Source::Relabelled
        },
        prompt: format!("a small red circle on a blue background #{pair_id} – ünïcode"),
        negative_prompt: full.then(|| "blurry".to_owned()),
        model_id: "stabilityai/sd-turbo".into(),
        sampler: "euler_ancestral".into(),
        timesteps: timesteps.clone(),
        guidance: if full { Some(0.0) } else { None },
        height: 16,
        width: 24,
        image_format: ImageFormat::Png,
        sides: [
            Side {
                seed: Some(u64::MAX - pair_id as u64),
                image: png(pair_id as u64 * 2, 24, 16),
                score: s0,
            },
            Side {
                seed: full.then_some(pair_id as u64 * 2 + 1),
                image: png(pair_id as u64 * 2 + 1, 24, 16),
                score: s1,
            },
        ],
        scorer: "pickscore".into(),
        scorer_version: "yuvalkirstain/PickScore_v1@main".into(),
        label: Label::from_scores(s0, s1, true),
        latents: full.then(|| Latents {
            dtype: LatentDType::F16,
            shape: shape.clone(),
            final_latents: [bytes(one, 3), bytes(one, 5)],
            trajectories: (pair_id % 4 == 0).then(|| [bytes(one * 5, 7), bytes(one * 5, 11)]),
        }),
    }
}
