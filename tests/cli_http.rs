//! `pso reward serve` and `pso score --scorer http` end to end on loopback, with a tiny random
//! CLIPModel from scripts/oracle/make_clip.py: remote scores equal local PickScore scores.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn pso() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pso"));
    command
        .env_remove("RUST_LOG")
        .env_remove("PSO_REWARD_TOKEN");
    command
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Builds the tiny CLIP models; `DIR/quick` is a full HF CLIPModel folder.
fn tiny_clip() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_clip.py", &[dir.path().as_os_str()]);
    dir
}

/// A `pso reward serve` child, stopped with SIGTERM (or killed) when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        Server::start_kind("pickscore", model.as_os_str(), extra)
    }

    fn start_kind(kind: &str, model: &std::ffi::OsStr, extra: &[&str]) -> Server {
        let mut child = pso()
            .args(["reward", "serve", "--scorer", kind, "--model"])
            .arg(model)
            .args(["--bind", "127.0.0.1:0", "--max-batch", "3"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let mut server = Server {
            child,
            url: String::new(),
        };
        server.url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("`pso reward serve` prints `listening on URL` within 60 s");
        server
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn scores(out: &Output) -> Vec<f64> {
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap())
        .collect()
}

#[test]
fn remote_pickscore_equals_local_pickscore() {
    let models = tiny_clip();
    let model = models.path().join("quick");
    let images = tempfile::tempdir().unwrap();
    // Seven images: more than --max-batch 3, so the client splits and the server batches.
    let paths: Vec<PathBuf> = (0..7)
        .map(|i| {
            let path = images.path().join(format!("{i}.png"));
            std::fs::write(&path, common::png(i, 20 + i as u32 * 9, 31)).unwrap();
            path
        })
        .collect();
    let local = scores(
        &pso()
            .args(["score", "--scorer", "pickscore", "--model"])
            .arg(&model)
            .args(["--prompt", "a photo of a cat", "--json"])
            .args(&paths)
            .output()
            .unwrap(),
    );
    let server = Server::start(&model, &[]);
    let remote = scores(
        &pso()
            .args(["score", "--scorer", "http", "--model", &server.url])
            .args(["--prompt", "a photo of a cat", "--json"])
            .args(&paths)
            .output()
            .unwrap(),
    );
    assert_eq!(remote.len(), 7);
    for (r, l) in remote.iter().zip(&local) {
        assert!(
            (r - l).abs() <= 1e-5 * l.abs().max(1.0),
            "remote {remote:?}\nlocal {local:?}"
        );
    }
    let status = server.terminate();
    assert!(
        status.success(),
        "SIGTERM should shut down cleanly: {status}"
    );
}

/// Every kind `pso reward serve` accepts scores the same through `pso score` in this process and
/// through the server; `pixel` once fell into the HTTP client in `pso score`.
#[test]
fn every_local_scorer_kind_scores_alike_through_score_and_reward_serve() {
    let models = tiny_clip();
    let clip = models.path().join("quick");
    let images = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| {
            let path = images.path().join(format!("{i}.png"));
            std::fs::write(&path, common::png(i, 24, 16 + i as u32 * 5)).unwrap();
            path
        })
        .collect();
    for (kind, model) in [
        ("clip", clip.as_os_str()),
        ("pickscore", clip.as_os_str()),
        ("aesthetic", clip.as_os_str()),
        ("hpsv2", clip.as_os_str()),
        ("pixel", "centered".as_ref()),
    ] {
        let local = scores(
            &pso()
                .args(["score", "--scorer", kind, "--model"])
                .arg(model)
                .args(["--prompt", "a red square", "--json"])
                .args(&paths)
                .output()
                .unwrap(),
        );
        assert_eq!(local.len(), 3, "{kind}");
        let server = Server::start_kind(kind, model, &[]);
        let remote = scores(
            &pso()
                .args(["score", "--scorer", "http", "--model", &server.url])
                .args(["--prompt", "a red square", "--json"])
                .args(&paths)
                .output()
                .unwrap(),
        );
        for (r, l) in remote.iter().zip(&local) {
            assert!(
                (r - l).abs() <= 1e-5 * l.abs().max(1.0),
                "{kind}: remote {remote:?}\nlocal {local:?}"
            );
        }
        assert!(server.terminate().success(), "{kind}");
    }
    // A pixel metric is no URL: it is never sent to a server.
    let out = pso()
        .args([
            "score",
            "--scorer",
            "pixel",
            "--model",
            "http://127.0.0.1:9/",
        ])
        .args(["--prompt", "x"])
        .arg(&paths[0])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("pixel"), "{}", text(&out.stderr));
    // `reward serve` lists only the kinds it serves.
    let help = pso().args(["reward", "serve", "--help"]).output().unwrap();
    let help = text(&help.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains(
            "[possible values: clip, pickscore, aesthetic, hpsv2, imagereward, mps, pixel, composite]"
        ),
        "{help}"
    );
}

#[test]
fn token_file_guards_the_server_and_errors_are_clear() {
    let models = tiny_clip();
    let model = models.path().join("quick");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let image = dir.path().join("a.png");
    std::fs::write(&image, common::png(3, 16, 16)).unwrap();
    let server = Server::start(&model, &["--token-file", token.to_str().unwrap()]);
    let score = |token: Option<&str>| {
        let mut command = pso();
        command
            .args(["score", "--scorer", "http", "--model", &server.url])
            .args(["--prompt", "p", "--json"])
            .arg(&image);
        if let Some(t) = token {
            command.env("PSO_REWARD_TOKEN", t);
        }
        command.output().unwrap()
    };
    let out = score(None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("401") && err.contains("missing bearer token") && err.contains("--token-file"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let out = score(Some("nope"));
    assert!(text(&out.stderr).contains("wrong bearer token"));
    assert_eq!(scores(&score(Some("t0ken"))).len(), 1);
    let out = pso()
        .args(["score", "--scorer", "http", "--model", &server.url])
        .args(["--token-file"])
        .arg(&token)
        .args(["--prompt", "p", "--json"])
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(scores(&out).len(), 1);
    drop(server);

    // A missing token file is reported before any model is loaded.
    let out = pso()
        .args(["reward", "serve", "--scorer", "clip", "--model", "nowhere"])
        .args([
            "--bind",
            "127.0.0.1:0",
            "--token-file",
            "/nonexistent/token",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/token"));
    // `http` is no local scorer: refused as a usage error that lists the kinds it serves.
    let out = pso()
        .args(["reward", "serve", "--scorer", "http", "--model", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("'http'")
            && err
                .contains("clip, pickscore, aesthetic, hpsv2, imagereward, mps, pixel, composite"),
        "{err}"
    );
}

/// A server reachable from other machines needs a token, or `--insecure` said out loud.
#[test]
fn serving_beyond_loopback_without_a_token_is_refused_unless_insecure() {
    let out = pso()
        .args([
            "reward", "serve", "--scorer", "pixel", "--model", "centered",
        ])
        .args(["--bind", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--token-file") && err.contains("--insecure"),
        "{err}"
    );
    let server = Server::start_kind("pixel", "centered".as_ref(), &["--insecure"]);
    assert!(
        server.url.starts_with("http://127.0.0.1:"),
        "{}",
        server.url
    );
    assert!(server.terminate().success());
}
