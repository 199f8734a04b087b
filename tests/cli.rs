//! The `pso` binary as users and scripts call it.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use pairs::{PairStoreWriter, WriterOptions};

fn pso(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pso"))
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn binary_finds_libtorch_without_ld_library_path_and_keeps_libtorch_cuda() {
    let out = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_pso")])
        .output()
        .expect("readelf (binutils) is needed for this test");
    let dynamic = text(&out.stdout);
    assert!(
        dynamic.contains("RUNPATH") || dynamic.contains("RPATH"),
        "{dynamic}"
    );
    // Only when the libtorch in use ships CUDA (the pip build does) must it stay linked.
    let torch_lib = std::env::var("LIBTORCH")
        .map(|l| Path::new(&l).join("lib"))
        .unwrap();
    if torch_lib.join("libtorch_cuda.so").exists() {
        assert!(
            dynamic.contains("[libtorch_cuda.so]"),
            "libtorch_cuda was dropped:\n{dynamic}"
        );
    }
}

#[test]
fn doctor_reports_the_libtorch_it_loaded() {
    let out = pso(&["doctor", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["libtorch_version"]
            .as_str()
            .unwrap()
            .starts_with("2.11.0"),
        "{v}"
    );
    let loaded = v["libtorch_loaded_from"].as_str().unwrap();
    assert!(
        Path::new(loaded).join("libtorch_cpu.so").exists(),
        "{loaded}"
    );
    assert!(v["torch_threads"].as_i64().unwrap() >= 1);
    assert_eq!(
        v["cuda_devices"].as_array().unwrap().len() as i64,
        v["cuda_device_count"].as_i64().unwrap()
    );
    let human = text(&pso(&["doctor"]).stdout);
    for line in [
        "libtorch ",
        "loaded from",
        "CUDA available",
        "bf16 on CPU",
        "threads",
        "data-parallel   one process",
        "c10d backends   gloo",
    ] {
        assert!(human.contains(line), "missing `{line}` in:\n{human}");
    }
    // Under torchrun's variables it names this process's place in the launch.
    let launched = Command::new(env!("CARGO_BIN_EXE_pso"))
        .args(["doctor", "--json"])
        .envs(dist::Launch::local(1, 2, 29500).to_env())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&launched.stdout).unwrap();
    assert_eq!(
        v["launch"],
        "rank 1 of 2 (local 1 of 2), rendezvous 127.0.0.1:29500"
    );
    // scripts/setup.sh installs the CUDA and NCCL headers, so the bridge has NCCL.
    assert_eq!(v["dist_backends"], serde_json::json!(["gloo", "nccl"]));
}

#[test]
fn help_lists_every_subcommand() {
    let out = pso(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for cmd in [
        "doctor", "sample", "score", "pairs", "online", "offline", "export", "report", "reward",
        "config",
    ] {
        assert!(help.contains(cmd), "`{cmd}` missing from --help:\n{help}");
    }
}

#[test]
fn online_refuses_an_offline_objective_before_loading_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/sd-turbo-pickscore.toml"
    );
    let args = [
        "online",
        "--config",
        config,
        "--set",
        "objective.kind=dpo",
        "--set",
        "reward.scorer=http",
        "--set",
        "reward.model=http://127.0.0.1:9",
        "--out",
        out_dir.to_str().unwrap(),
    ];
    let out = pso(&args);
    assert_eq!(out.status.code(), Some(1), "{args:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("objective.kind = dpo replays stored pairs") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out_dir.exists(), "nothing is written for a refused run");
}

#[test]
fn export_of_a_folder_that_is_no_run_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().to_str().unwrap();
    let out = pso(&["export", "--run", run, "--format", "merged", "--out", "o"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("is not a run directory"), "{err}");
}

#[test]
fn report_of_a_missing_run_directory_says_what_to_give() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("no-such-run");
    let out = pso(&["report", run.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot write the report")
            && err.contains("no-such-run: no such directory")
            && err.contains("`pso online` or `pso offline`")
            && !err.contains("panicked"),
        "{err}"
    );
    assert!(!run.exists(), "nothing is written for a missing run");
}

#[test]
fn a_bad_config_is_reported_with_file_and_key_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, "[optim]\nlr = 0.5\nbeta1 = 0.9\n").unwrap();
    let out = pso(&["online", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("run.toml: key `optim.beta1`") && err.contains("unknown field"),
        "{err}"
    );

    std::fs::write(&cfg, "[optim]\nlr = 0.5\n").unwrap();
    let out = pso(&[
        "config",
        "show",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "optim.lr=7",
    ]);
    let err = text(&out.stderr);
    assert!(
        err.contains("key `optim.lr` (set on the command line): 7 is not in (0, 1)"),
        "{err}"
    );

    let out = pso(&[
        "config",
        "show",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "run.seed=42",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("seed = 42") && shown.contains("lr = 0.5") && shown.contains("[pairs]"),
        "{shown}"
    );
}

#[test]
fn pairs_commands_inspect_validate_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut w = PairStoreWriter::open(WriterOptions {
        flush_every_pairs: 4,
        ..WriterOptions::new(&store, "r")
    })
    .unwrap();
    for i in 0..10 {
        w.append(common::record("r", i)).unwrap();
    }
    w.close().unwrap();
    let s = store.to_str().unwrap();

    let out = pso(&["pairs", "inspect", s, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pairs"], 10);
    assert_eq!(v["ties"], 2);
    assert_eq!(v["schema_versions"]["1"], 1);
    assert_eq!(v["runs"]["r"]["policy_version_max"], 2);
    let human = text(&pso(&["pairs", "inspect", s]).stdout);
    assert!(
        human.contains("pairs          10") && human.contains("ties           2 (20.0%)"),
        "{human}"
    );

    let out = pso(&["pairs", "validate", s]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("ok: 1 files, 10 pairs"));
    std::fs::write(store.join("broken.parquet"), b"PAR1 not really").unwrap();
    let out = pso(&["pairs", "validate", s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("broken.parquet: "),
        "{}",
        text(&out.stdout)
    );

    let input = dir.path().join("pick.parquet");
    common::oracle("make_pickapic.py", &[input.as_os_str(), "9".as_ref()]);
    let out_dir = dir.path().join("imported");
    let out = pso(&[
        "pairs",
        "import",
        "--format",
        "pickapic",
        input.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("imported 6 pairs from 9 rows of 1 files"),
        "{}",
        text(&out.stdout)
    );
    let out = pso(&[
        "pairs",
        "import",
        "--format",
        "pickapic",
        "/nonexistent.parquet",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("/nonexistent.parquet") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn score_names_a_missing_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.png");
    std::fs::write(&img, common::png(0, 4, 4)).unwrap();
    let missing = dir.path().join("no-such-model");
    let out = pso(&[
        "score",
        "--scorer",
        "pickscore",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "p",
        img.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no-such-model") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn sample_names_a_missing_model_folder_and_a_missing_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-pipeline");
    let out = pso(&[
        "sample",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "p",
        "--out",
        "o",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no-such-pipeline") && err.contains("model_index.json"),
        "{err}"
    );
    let out = pso(&[
        "sample",
        "--model",
        "m",
        "--prompt",
        "p",
        "--out",
        "o",
        "--adapter",
        "a.safetensors",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--adapter a.safetensors") && err.contains("a.safetensors:"),
        "{err}"
    );
}

#[test]
fn every_shipped_config_parses() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let out = pso(&["config", "show", "--config", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
        seen += 1;
    }
    assert!(seen >= 3, "only {seen} configs in {dir}");
}

/// Values that cannot make an image are refused with the flag named, before a model loads (they
/// once panicked or ran on).
#[test]
fn sample_refuses_impossible_values_before_loading_the_model() {
    for (flag, value, says) in [
        ("--num-images", "0", "--num-images 0 is not in 1..=1024"),
        ("--num-images", "1000000000000", "is not in 1..=1024"),
        (
            "--height",
            "100000",
            "--height 100000 is not a multiple of 8 in 8..=4096",
        ),
        ("--width", "12", "--width 12 is not a multiple of 8"),
        ("--guidance", "nan", "--guidance NaN is not a finite number"),
        ("--steps", "0", "--steps 0 is not in 1..=1000"),
    ] {
        let out = pso(&[
            "sample",
            "--model",
            "no-such-model",
            "--prompt",
            "x",
            flag,
            value,
            "--out",
            "o",
        ]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_data_parallel_launch_with_a_wrong_backend_is_refused_before_joining() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny-cpu.toml");
    for (backend, expected) in [
        ("nccl", "PSO_DIST_BACKEND=nccl, but model.device"),
        ("mpi", "PSO_DIST_BACKEND=\"mpi\": use nccl or gloo"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pso"))
            .args(["offline", "--config", config, "--pairs", "nowhere"])
            .envs(dist::Launch::local(0, 2, 1).to_env())
            .env("PSO_DIST_BACKEND", backend)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// `pso score --scorer composite`: a weighted sum of a running-normalised and a fixed-normalised
/// part equals the sum computed here from the parts scored alone, and the JSON carries each
/// part's raw scores under its name.
#[test]
fn a_composite_normalises_its_parts_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (i, (side, red)) in [(4u32, 250u8), (10, 120), (14, 200)]
        .into_iter()
        .enumerate()
    {
        let mut im = image::RgbImage::from_pixel(16, 16, image::Rgb([20, 20, 20]));
        for y in 0..side {
            for x in 0..side {
                im.put_pixel(x, y, image::Rgb([red, 10, 10]));
            }
        }
        let path = dir.path().join(format!("{i}.png"));
        im.save(&path).unwrap();
        paths.push(path.to_str().unwrap().to_owned());
    }
    let toml = dir.path().join("composite.toml");
    std::fs::write(
        &toml,
        "[[parts]]\nscorer = \"pixel\"\nmodel = \"redness\"\nname = \"red\"\n\
         normalize = \"running\"\n\n[[parts]]\nscorer = \"pixel\"\nmodel = \"size\"\n\
         weight = 2.0\nnormalize = { mean = 0.5, std = 0.25 }\n",
    )
    .unwrap();
    let score = |scorer: &str, model: &str| -> serde_json::Value {
        let mut args = vec![
            "score", "--scorer", scorer, "--model", model, "--prompt", "p",
        ];
        args.push("--json");
        args.extend(paths.iter().map(String::as_str));
        let out = pso(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let red = floats(&score("pixel", "redness")["scores"]);
    let size = floats(&score("pixel", "size")["scores"]);
    let composite = score("composite", toml.to_str().unwrap());
    let n = red.len() as f64;
    let mean = red.iter().sum::<f64>() / n;
    let std = (red.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let got = floats(&composite["scores"]);
    for i in 0..red.len() {
        let want = (red[i] - mean) / std + 2.0 * (size[i] - 0.5) / 0.25;
        assert!(
            (got[i] - want).abs() < 1e-4,
            "image {i}: {} vs {want}",
            got[i]
        );
    }
    assert_eq!(floats(&composite["parts"]["red"]), red);
    assert_eq!(floats(&composite["parts"]["pixel"]), size);
}

/// HPSv2 end to end: an OpenCLIP checkpoint laid out as HPS_v2.1_compressed.pt (tiny, random,
/// built by the oracle), converted by scripts/convert_hpsv2.py, scores through
/// `pso score --scorer hpsv2` as HPSv2's own img_score.py scores it with OpenCLIP. Images that
/// need resizing differ by the two resizers' rounding (torchvision vs the CLIP processor), a few
/// 1e-5 on a cosine.
#[test]
fn hpsv2_scores_a_converted_openclip_checkpoint_as_openclip_does() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_hpsv2.py", &[dir.path().as_os_str()]);
    let converted = dir.path().join("hf");
    let script = common::workspace_root().join("scripts/convert_hpsv2.py");
    let out = Command::new(common::python())
        .arg(&script)
        .arg(dir.path().join("hps.pt"))
        .arg(&converted)
        .args(["--vision-heads", "2", "--text-heads", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (prompt, want, got) in scores_against_oracle(dir.path(), "hpsv2", &converted) {
        // Image 0 needs no resize: equal to fp32 rounding.
        assert!(
            (got[0] - want[0]).abs() < 2e-6,
            "{prompt}: {got:?} vs {want:?}"
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{prompt}: {got:?} vs {want:?}");
        }
    }
}

#[test]
fn imagereward_scores_a_converted_checkpoint_as_imagereward_does() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_imagereward.py", &[dir.path().as_os_str()]);
    let converted = dir.path().join("hf");
    let out = Command::new(common::python())
        .arg(common::workspace_root().join("scripts/convert_imagereward.py"))
        .arg(dir.path().join("ImageReward.pt"))
        .arg(dir.path().join("med_config.json"))
        .arg(&converted)
        .arg("--tokenizer")
        .arg(dir.path().join("bert"))
        .args(["--vision-heads", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (prompt, want, got) in scores_against_oracle(dir.path(), "imagereward", &converted) {
        // Equal to fp32 rounding, the resized images too (PIL's bicubic in torchvision and in
        // the CLIP processor alike).
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{prompt}: {got:?} vs {want:?}");
        }
        // The scores tell the images apart (a test that could not fail otherwise).
        assert!((want[0] - want[2]).abs() > 1e-2, "{want:?}");
    }
}

#[test]
fn mps_scores_a_converted_checkpoint_as_mps_inference_does() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_mps.py", &[dir.path().as_os_str()]);
    let converted = dir.path().join("hf");
    let out = Command::new(common::python())
        .arg(common::workspace_root().join("scripts/convert_mps.py"))
        .arg(dir.path().join("MPS_overall_checkpoint.pth"))
        .arg(&converted)
        .arg("--clip")
        .arg(dir.path().join("clip"))
        .args(["--threshold", "0.8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (prompt, want, got) in scores_against_oracle(dir.path(), "mps", &converted) {
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-4 * w.abs().max(1.0),
                "{prompt}: {got:?} vs {want:?}"
            );
        }
        assert!((want[0] - want[2]).abs() > 1e-2, "{want:?}");
    }
}

/// For each prompt of an oracle's `dir/scores.json` ({prompt: [score of images/0.png, …]}): the
/// prompt, the oracle's scores and `pso score --scorer SCORER --model MODEL --json`'s.
fn scores_against_oracle(
    dir: &std::path::Path,
    scorer: &str,
    model: &std::path::Path,
) -> Vec<(String, Vec<f64>, Vec<f64>)> {
    let expected: std::collections::BTreeMap<String, Vec<f64>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scores.json")).unwrap()).unwrap();
    let images: Vec<String> = (0..3)
        .map(|i| {
            dir.join(format!("images/{i}.png"))
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    expected
        .into_iter()
        .map(|(prompt, want)| {
            let mut args = vec!["score", "--scorer", scorer, "--model"];
            args.push(model.to_str().unwrap());
            args.extend(["--prompt", &prompt, "--json"]);
            args.extend(images.iter().map(String::as_str));
            let out = pso(&args);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let got: Vec<f64> = v["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(got.len(), want.len(), "{prompt}");
            (prompt, want, got)
        })
        .collect()
}
