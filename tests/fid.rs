//! FID: the Fréchet distance against pytorch-fid's scipy computation on random features
//! (singular covariances included), and `pso eval fid` end to end with a tiny TorchScript
//! feature extractor (as a file and as a Hub id in the HF cache), references as a folder and as
//! pytorch-fid's .npz (scripts/oracle/fid.py).

mod common;

use std::collections::HashMap;
use std::process::Command;

use pso::fid::{frechet_distance, FeatureStats};
use tch::Tensor;

fn close(got: f64, want: f64, what: &str) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        err < 1e-6,
        "{what}: {got} vs scipy's {want} (relative {err:e})"
    );
}

#[test]
fn fid_matches_pytorch_fid_on_features_and_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("fid.py", &[dir.path().as_os_str()]);
    let expected: HashMap<String, f64> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();
    let features: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("features.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let stats = |k: &str| FeatureStats::of(&features[k]).unwrap();
    close(
        frechet_distance(&stats("a"), &stats("b")).unwrap(),
        expected["a_b"],
        "a vs b",
    );
    close(
        frechet_distance(&stats("c"), &stats("d")).unwrap(),
        expected["c_d"],
        "singular c vs d",
    );

    let extractor = dir.path().join("extractor.pt");
    let run_with = |inception: &std::ffi::OsStr, reference: &std::path::Path, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_pso"))
            .args(["eval", "fid", "--device", "cpu", "--batch-size", "4"])
            .arg("--inception")
            .arg(inception)
            .env("HF_HOME", dir.path().join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .arg("--reference")
            .arg(reference)
            .arg("--samples")
            .arg(dir.path().join("samples"))
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse::<f64>()
            .unwrap()
    };
    let run = |reference: &std::path::Path, extra: &[&str]| {
        run_with(extractor.as_os_str(), reference, extra)
    };
    let saved = dir.path().join("samples.npz");
    let from_folder = run(
        &dir.path().join("ref"),
        &["--save-stats", saved.to_str().unwrap()],
    );
    close(
        from_folder,
        expected["folders"],
        "pso eval fid, reference folder",
    );
    let from_npz = run(&dir.path().join("ref_stats.npz"), &[]);
    close(
        from_npz,
        expected["folders"],
        "pso eval fid, reference .npz",
    );
    // The samples' own statistics as the reference: distance 0.
    assert!(run(&saved, &[]).abs() < 1e-6);

    // The extractor as a Hub id, from the HF cache (offline).
    let repo = dir.path().join("hf/hub/models--tiny--fid-extractor");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::copy(&extractor, snapshot.join("extractor.pt")).unwrap();
    for id in ["tiny/fid-extractor", "tiny/fid-extractor/extractor.pt"] {
        close(
            run_with(id.as_ref(), &dir.path().join("ref_stats.npz"), &[]),
            expected["folders"],
            id,
        );
    }

    let bad = Command::new(env!("CARGO_BIN_EXE_pso"))
        .args(["eval", "fid", "--device", "cpu", "--inception"])
        .arg(dir.path().join("features.safetensors"))
        .arg("--reference")
        .arg(dir.path().join("ref"))
        .arg("--samples")
        .arg(dir.path().join("samples"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(e.contains("is not a TorchScript module"), "{e}");
}
