//! Pair-store throughput: pairs/s written (two 512×512 PNGs, f16 latents and trajectories per
//! pair, fsync at every row-group flush) and read back, full rows and column-projected, next to
//! pyarrow reading the same files in the same run.
//!
//! Run: `cargo bench -p pairs --bench pairs [-- PAIRS]` (default 512 pairs). Prints a Markdown table.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use pairs::{
    col, ImageFormat, Label, LatentDType, Latents, PairReader, PairRecord, PairStoreWriter,
    ReadOptions, Side, Source, WriterOptions,
};

/// A 512×512 image with smooth structure and mild noise, so its PNG is about the size of a
/// real sample's (a few hundred KB), not a best or worst case.
fn sample_png(seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let img = image::RgbImage::from_fn(512, 512, |x, y| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = ((state >> 59) as i32) - 16;
        let f = |k: u32, phase: u64| {
            let v =
                (((x * k + y * (7 - k)) as f32 / 40.0 + phase as f32).sin() * 100.0 + 128.0) as i32;
            (v + noise).clamp(0, 255) as u8
        };
        image::Rgb([f(1, seed), f(3, seed + 1), f(5, seed + 2)])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn record(i: i64, images: &[Vec<u8>]) -> PairRecord {
    let one = 4 * 64 * 64 * 2;
    let latent = |salt: u8| {
        (0..one)
            .map(|k| (k as u8).wrapping_mul(salt))
            .collect::<Vec<u8>>()
    };
    let trajectory = |salt: u8| {
        (0..one * 5)
            .map(|k| (k as u8).wrapping_add(salt))
            .collect::<Vec<u8>>()
    };
    PairRecord {
        run_id: "bench".into(),
        pair_id: i,
        created_at_us: 1_700_000_000_000_000 + i,
        policy_version: Some(i / 16),
        source: Source::Online,
        prompt: format!("a photo of an astronaut riding a horse, variation {i}"),
        negative_prompt: None,
        model_id: "stabilityai/sd-turbo".into(),
        sampler: "euler_ancestral".into(),
        timesteps: vec![999, 749, 499, 249],
        guidance: Some(0.0),
        height: 512,
        width: 512,
        image_format: ImageFormat::Png,
        sides: [
            Side {
                seed: Some(2 * i as u64),
                image: images[(2 * i) as usize % images.len()].clone(),
                score: 21.5,
            },
            Side {
                seed: Some(2 * i as u64 + 1),
                image: images[(2 * i + 1) as usize % images.len()].clone(),
                score: 22.0,
            },
        ],
        scorer: "pickscore".into(),
        scorer_version: "v1".into(),
        label: Label::Side1,
        latents: Some(Latents {
            dtype: LatentDType::F16,
            shape: vec![4, 64, 64],
            final_latents: [latent(3), latent(5)],
            trajectories: Some([trajectory(7), trajectory(11)]),
        }),
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn read_all(dir: &Path, columns: Option<&[&str]>) -> (usize, f64) {
    let opts = ReadOptions {
        columns: columns.map(|c| c.iter().map(|s| s.to_string()).collect()),
        batch_size: 64,
        ..Default::default()
    };
    let start = Instant::now();
    let mut rows = 0;
    let mut touched = 0usize;
    for batch in PairReader::open(&[dir.to_owned()], opts).unwrap() {
        let batch = batch.unwrap();
        rows += batch.num_rows();
        touched += batch.get_array_memory_size();
    }
    std::hint::black_box(touched);
    (rows, start.elapsed().as_secs_f64())
}

fn main() {
    let pairs: i64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(512);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("target/bench-pairs");
    let _ = std::fs::remove_dir_all(&out);
    let images: Vec<Vec<u8>> = (0..16).map(sample_png).collect();
    let png_kib = images.iter().map(Vec::len).sum::<usize>() as f64 / images.len() as f64 / 1024.0;
    let records: Vec<PairRecord> = (0..pairs).map(|i| record(i, &images)).collect();

    let start = Instant::now();
    let mut writer = PairStoreWriter::open(WriterOptions::new(&out, "bench")).unwrap();
    for r in records {
        writer.append(r).unwrap();
    }
    writer.close().unwrap();
    let write_s = start.elapsed().as_secs_f64();
    let mib = dir_bytes(&out) as f64 / (1 << 20) as f64;

    let projected = [
        col::PROMPT,
        col::LABEL,
        col::SCORE_0,
        col::SCORE_1,
        col::POLICY_VERSION,
    ];
    let replay = [
        col::PROMPT,
        col::LABEL,
        col::TIMESTEPS,
        col::LATENTS_0,
        col::LATENTS_1,
        col::TRAJECTORY_0,
        col::TRAJECTORY_1,
    ];
    let (n_full, full_s) = read_all(&out, None);
    let (n_proj, proj_s) = read_all(&out, Some(&projected));
    let (n_replay, replay_s) = read_all(&out, Some(&replay));
    assert!(n_full as i64 == pairs && n_proj as i64 == pairs && n_replay as i64 == pairs);

    let python = std::env::var("PSO_PYTHON")
        .unwrap_or_else(|_| root.join(".venv/bin/python").display().to_string());
    let py = Command::new(python)
        .arg(root.join("bench/pairs_pyarrow.py"))
        .arg(&out)
        .args([projected.join(","), replay.join(",")])
        .output()
        .expect("run scripts/setup.sh: the bench compares with pyarrow");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let py: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let rate = |s: f64| pairs as f64 / s;

    println!(
        "{pairs} pairs, {png_kib:.0} KiB per PNG, {mib:.1} MiB on disk ({:.0} KiB/pair)\n",
        mib * 1024.0 / pairs as f64
    );
    println!("| operation | pso pairs/s | pyarrow pairs/s | pso / pyarrow |");
    println!("|---|---|---|---|");
    println!(
        "| write (fsync per 64-pair row group) | {:.0} | – | – |",
        rate(write_s)
    );
    for (name, s, key) in [
        ("read full rows", full_s, "full_s"),
        (
            "read projected: prompt, label, scores, policy_version",
            proj_s,
            "projected_s",
        ),
        (
            "read replay columns: prompt, label, timesteps, latents, trajectories",
            replay_s,
            "replay_s",
        ),
    ] {
        let py_s = py[key].as_f64().unwrap();
        println!(
            "| {name} | {:.0} | {:.0} | {:.2}× |",
            rate(s),
            rate(py_s),
            py_s / s
        );
    }
}
