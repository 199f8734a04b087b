//! AdamW, clip_grad_norm and the learning-rate schedules against torch.optim.AdamW,
//! torch.nn.utils.clip_grad_norm_ and diffusers.optimization (scripts/oracle/adamw.py, CPU, fp32);
//! plus a save / load round trip that resumes bit for bit.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use pso::optim::{AdamW, AdamWConfig, LrSchedule, OptimError, ScheduleKind};
use serde::Deserialize;
use tch::{Kind, Tensor};

/// Relative tolerance of fp32 results.
const TOL: f64 = 1e-6;
const STEPS: usize = 6;
const NAMES: [&str; 3] = ["a", "b", "c"];

fn config() -> AdamWConfig {
    AdamWConfig {
        betas: (0.9, 0.99),
        eps: 1e-3, // large enough that its placement matters
        weight_decay: 0.1,
    }
}

#[derive(Debug, Deserialize)]
struct SchedCase {
    kind: ScheduleKind,
    warmup: u64,
    total: u64,
    factors: Vec<f64>,
}

struct Oracle {
    dir: tempfile::TempDir,
    schedules: Vec<SchedCase>,
}

impl Oracle {
    fn tensors(&self) -> HashMap<String, Tensor> {
        Tensor::read_safetensors(self.dir.path().join("adamw.safetensors"))
            .unwrap()
            .into_iter()
            .collect()
    }
}

fn oracle() -> &'static Oracle {
    static O: OnceLock<Oracle> = OnceLock::new();
    O.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        common::oracle("adamw.py", &[dir.path().as_os_str()]);
        let schedules = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("schedules.json")).unwrap(),
        )
        .unwrap();
        Oracle { dir, schedules }
    })
}

fn close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let got = got.to_kind(Kind::Double);
    let want = want.to_kind(Kind::Double);
    let err = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1e-12);
    assert!(err <= TOL * scale, "{what}: max err {err} (scale {scale})");
}

fn params(init: impl Fn(&str) -> Tensor) -> Vec<(String, Tensor)> {
    NAMES
        .iter()
        .map(|n| (n.to_string(), init(n).set_requires_grad(true)))
        .collect()
}

/// Sets each parameter's gradient to the oracle's for step `k` (parameters without one keep theirs).
fn set_grads(opt: &mut AdamW, t: &HashMap<String, Tensor>, k: usize) {
    opt.zero_grad();
    let mut loss: Option<Tensor> = None;
    for (n, p) in opt.params() {
        if let Some(g) = t.get(&format!("grad.{n}.{k}")) {
            let term = (p * g).sum(Kind::Float);
            loss = Some(match loss {
                Some(l) => l + term,
                None => term,
            });
        }
    }
    loss.unwrap().backward();
}

#[test]
fn adamw_matches_torch() {
    let t = &oracle().tensors();
    let sched = LrSchedule::new(ScheduleKind::Cosine, 1e-2, 2, STEPS as u64);
    let lrs = Vec::<f64>::try_from(&t["lr"]).unwrap();
    let norms = Vec::<f64>::try_from(&t["norm"]).unwrap();
    let mut opt = AdamW::new(params(|n| t[&format!("init.{n}")].copy()), config());
    for k in 0..STEPS {
        set_grads(&mut opt, t, k);
        let norm = opt.clip_grad_norm(1.0);
        assert!(
            (norm - norms[k]).abs() <= 1e-6 * norms[k],
            "step {k}: norm {norm} vs {}",
            norms[k]
        );
        let lr = sched.lr_at(k as u64);
        assert!(
            (lr - lrs[k]).abs() <= 1e-15,
            "step {k}: lr {lr} vs {}",
            lrs[k]
        );
        opt.step(lr);
        let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        for (n, p) in opt.params() {
            close(&format!("param.{n}.{k}"), p, &t[&format!("param.{n}.{k}")]);
            for e in ["exp_avg", "exp_avg_sq", "step"] {
                let key = format!("{e}.{n}");
                match t.get(&format!("{key}.{k}")) {
                    Some(want) => close(&format!("{key}.{k}"), &state[&key], want),
                    None => assert!(!state.contains_key(&key), "{key} present at step {k}"),
                }
            }
        }
    }
}

#[test]
fn schedules_match_diffusers() {
    for c in &oracle().schedules {
        let s = LrSchedule::new(c.kind, 3e-4, c.warmup, c.total);
        for (i, want) in c.factors.iter().enumerate() {
            let got = s.factor(i as u64);
            assert!((got - want).abs() <= 1e-12, "{c:?} step {i}: {got}");
            assert!((s.lr_at(i as u64) - 3e-4 * want).abs() <= 1e-15);
        }
    }
}

/// Deterministic pseudo-random values (the global RNG is shared by parallel tests).
fn wave(shape: &[i64], freq: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) + 1.0) * (0.37 * freq))
        .sin()
        .g_mul_scalar(2.0)
        .view(shape)
}

fn random_grads(opt: &mut AdamW, k: usize) {
    opt.zero_grad();
    let mut loss = Tensor::from(0f32);
    for (i, (_, p)) in opt.params().iter().enumerate() {
        if i == 2 && k < 1 {
            continue;
        }
        loss += (p * wave(&p.size(), (k * 7 + i + 1) as f64)).sum(Kind::Float);
    }
    loss.backward();
}

fn run(opt: &mut AdamW, ks: std::ops::Range<usize>) {
    for k in ks {
        random_grads(opt, k);
        opt.clip_grad_norm(1.0);
        opt.step(1e-2 * (k + 1) as f64);
    }
}

fn init(n: &str) -> Tensor {
    let shape: &[i64] = match n {
        "a" => &[3, 4],
        "b" => &[5],
        _ => &[2, 3],
    };
    wave(shape, n.as_bytes()[0] as f64 * 0.01)
}

fn assert_bitwise(a: &AdamW, b: &AdamW) {
    for ((n, p), (_, q)) in a.params().iter().zip(b.params()) {
        assert!(p.equal(q), "param {n} differs");
    }
    let (sa, sb) = (a.state_tensors(), b.state_tensors());
    assert_eq!(sa.len(), sb.len());
    for ((n, x), (m, y)) in sa.iter().zip(&sb) {
        assert_eq!(n, m);
        assert!(x.equal(y), "state {n} differs");
    }
}

#[test]
fn resume_is_bitwise() {
    let mut straight = AdamW::new(params(init), config());
    run(&mut straight, 0..6);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let mut first = AdamW::new(params(init), config());
    run(&mut first, 0..3);
    first.save(&path).unwrap();
    let resumed_params: Vec<(String, Tensor)> = first
        .params()
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true)))
        .collect();
    drop(first);
    let mut resumed = AdamW::new(resumed_params, config());
    resumed.load(&path).unwrap();
    run(&mut resumed, 3..6);
    assert_bitwise(&straight, &resumed);
}

#[test]
fn load_state_errors_name_the_entry() {
    let mut opt = AdamW::new(params(init), config());
    run(&mut opt, 0..2);
    let st = opt.state_tensors();

    let missing: Vec<_> = st
        .iter()
        .filter(|(n, _)| n != "exp_avg_sq.b")
        .map(|(n, t)| (n.clone(), t.copy()))
        .collect();
    let err = opt.load_state(missing).unwrap_err();
    assert!(
        matches!(err, OptimError::Missing(ref n) if n == "exp_avg_sq.b"),
        "{err}"
    );

    let shaped: Vec<_> = st
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                if n == "exp_avg.a" {
                    Tensor::zeros([4, 3], (Kind::Float, tch::Device::Cpu))
                } else {
                    t.copy()
                },
            )
        })
        .collect();
    let err = opt.load_state(shaped).unwrap_err();
    assert!(err.to_string().contains("exp_avg.a"), "{err}");
    assert!(matches!(err, OptimError::Shape { .. }));

    let mut extra: Vec<_> = st.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    extra.push(("exp_avg.zzz".into(), Tensor::from(1f32)));
    let err = opt.load_state(extra).unwrap_err();
    assert!(
        matches!(err, OptimError::Unknown(ref n) if n == "exp_avg.zzz"),
        "{err}"
    );

    // Nothing changed on error; a correct load works.
    opt.load_state(st).unwrap();
}

#[test]
fn bf16_params_keep_dtype_with_fp32_state() {
    let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5])
        .to_kind(Kind::BFloat16)
        .set_requires_grad(true);
    let mut opt = AdamW::new(vec![("w".into(), p)], config());
    opt.zero_grad();
    (&opt.params()[0].1 * Tensor::from_slice(&[1.0f32, 1.0, -1.0]).to_kind(Kind::BFloat16))
        .sum(Kind::Float)
        .backward();
    opt.step(0.1);
    assert_eq!(opt.params()[0].1.kind(), Kind::BFloat16);
    let st: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    assert_eq!(st["exp_avg.w"].kind(), Kind::Float);
    // First Adam step moves each weight by about lr against the gradient's sign.
    let got = Vec::<f32>::try_from(&opt.params()[0].1.to_kind(Kind::Float)).unwrap();
    let want = [1.0f32 * 0.99 - 0.1, -2.0 * 0.99 - 0.1, 0.5 * 0.99 + 0.1];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-2, "{got:?} vs {want:?}");
    }
}

#[test]
fn clip_returns_non_finite_norm_untouched() {
    let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    (&p * Tensor::from_slice(&[f32::INFINITY, 1.0]))
        .sum(Kind::Float)
        .backward();
    let norm = pso::optim::clip_grad_norm(&[p.shallow_clone()], 1.0);
    assert!(!norm.is_finite());
    assert_eq!(
        Vec::<f32>::try_from(&p.grad()).unwrap(),
        vec![f32::INFINITY, 1.0]
    );
}
