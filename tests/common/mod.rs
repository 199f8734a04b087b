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

/// Generations of a pipeline folder (T5 prompts of 12 tokens) through `Pipeline::generate`, one
/// prompt at a time from its row of `latents`, `steps` steps at `guidance`: the VAE's output
/// mapped to [0, 1] as the pipelines' post-processing does before quantising, [N, 3, H, W].
pub fn generate_each(
    folder: &std::path::Path,
    prompts: &[&str],
    latents: &tch::Tensor,
    steps: usize,
    guidance: f64,
) -> tch::Tensor {
    use diffusion::pipeline::{GenerateRequest, LoadOptions, Pipeline};
    let opts = LoadOptions {
        device: tch::Device::Cpu,
        kind: tch::Kind::Float,
        variant: None,
        backbone_weights: None,
        max_sequence_length: Some(12),
        text_encoder_device: None,
    };
    let pipe = Pipeline::load(folder, &opts).unwrap_or_else(|e| panic!("{folder:?}: {e}"));
    let f = pipe.vae_scale_factor();
    let images: Vec<tch::Tensor> = prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let row = latents.narrow(0, i as i64, 1);
            let size = row.size();
            let out = pipe
                .generate(
                    GenerateRequest {
                        prompt,
                        negative_prompt: None,
                        timesteps: diffusion::sampling::Timesteps::Steps(steps),
                        guidance,
                        height: size[2] * f,
                        width: size[3] * f,
                        num_images: 1,
                        init_latents: Some(row),
                        record: false,
                    },
                    &mut diffusion::sampling::SeededNoise::new(0),
                )
                .unwrap_or_else(|e| panic!("prompt {i}: {e}"));
            pipe.vae.decode_raw(&out.latents).to_kind(tch::Kind::Float)
        })
        .collect();
    (tch::Tensor::cat(&images, 0) / 2.0 + 0.5).clamp(0.0, 1.0)
}

/// The online learner's loss on two recorded pairs of a model with `config` (its sampler and
/// schedule, the policy moved off the reference by random LoRA values), at the last and the
/// first stochastic step, equals online PSO computed from the sampler's own recorded kernels
/// and the reference model's.
pub fn learner_loss_matches_recorded_kernels(config: &pso::config::RunConfig) {
    use diffusion::sampling::SeededNoise;
    use pso::objective::online_pso::{OnlinePso, Transitions};
    use pso::run::online::OnlineTrainer;
    use pso::run::rounds::{Round, TrainingPair};
    use tch::{Device, Kind, Tensor};
    let trainer = OnlineTrainer::load(config, Device::Cpu).unwrap();
    // A policy away from the reference: random LoRA up-projections.
    tch::manual_seed(11);
    let values: Vec<(String, Tensor)> = trainer
        .adapter
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.randn_like() * 0.3))
        .collect();
    trainer.adapter.set_values(&values).unwrap();
    let p = &trainer.pipeline;
    let s = trainer.settings();
    let (h, w) = (s.height, s.width);
    let scheduler = p.scheduler(s.timesteps.clone(), h, w).unwrap();
    let prompts = ["a red fox", "a lighthouse"];
    let mut pairs = Vec::new();
    let mut recorded = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let g = p
            .generate(
                diffusion::pipeline::GenerateRequest {
                    prompt,
                    negative_prompt: None,
                    timesteps: s.timesteps.clone(),
                    guidance: 0.0,
                    height: h,
                    width: w,
                    num_images: 2,
                    init_latents: None,
                    record: true,
                },
                &mut SeededNoise::new(i as u64),
            )
            .unwrap();
        let tr = g.trajectory.unwrap();
        let traj = Tensor::stack(&tr.latents, 1);
        pairs.push(TrainingPair {
            pair_id: i as i64,
            prompt: prompt.to_string(),
            winner: traj.get(0),
            loser: traj.get(1),
            counted: true,
            margin: 1.0,
        });
        recorded.push(tr);
    }
    let stochastic = trainer.stochastic_steps();
    let at = [stochastic[stochastic.len() - 1], stochastic[0]];
    let prepared = trainer
        .prepare(Round {
            index: 0,
            policy_version: 0,
            pairs,
            scores: Vec::new(),
            actor_seconds: 0.0,
            reward_wait_seconds: 0.0,
            images: 4,
            parts: Vec::new(),
        })
        .unwrap();
    let refs: Vec<_> = prepared.iter().collect();
    let got = trainer.loss(&refs, &at).unwrap();

    // The same loss from the sampler's own kernels (policy) and the reference UNet's.
    let side = |s: i64| {
        let mut next = Vec::new();
        let mut policy = Vec::new();
        let mut reference = Vec::new();
        let mut std = Vec::new();
        for (i, tr) in recorded.iter().enumerate() {
            let j = at[i];
            let x = tr.latents[j].get(s).unsqueeze(0);
            next.push(tr.latents[j + 1].get(s).unsqueeze(0));
            policy.push(tr.kernels[j].mean.get(s).unsqueeze(0));
            let cond = p.condition(prompts[i], None, 0.0, h, w, 1).unwrap();
            let input = scheduler.scale_model_input(j, &x).unwrap();
            let t = Tensor::from(scheduler.timesteps()[j] as f32);
            let out = trainer
                .adapter
                .reference(&p.backbone, |u| p.predict_batch(u, &cond, &input, &t));
            let k = scheduler
                .transition(j, &x, &out.to_kind(Kind::Float))
                .unwrap();
            reference.push(k.mean);
            std.push(k.std);
        }
        (
            Tensor::cat(&next, 0),
            Tensor::cat(&policy, 0),
            Tensor::cat(&reference, 0),
            std,
        )
    };
    let (wn, wp, wr, ws) = side(0);
    let (ln, lp, lr, ls) = side(1);
    let want = OnlinePso::default()
        .loss(
            &Transitions {
                next: &wn,
                mean_policy: &wp,
                mean_reference: &wr,
                std: &ws,
            },
            &Transitions {
                next: &ln,
                mean_policy: &lp,
                mean_reference: &lr,
                std: &ls,
            },
            None,
        )
        .unwrap();
    let (g, w) = (got.diagnostics, want.diagnostics);
    assert!(
        w.log_ratio_winner.unwrap().abs() > 1e-4,
        "policy ≠ reference"
    );
    for (a, b) in [
        (g.loss, w.loss),
        (g.log_ratio_winner.unwrap(), w.log_ratio_winner.unwrap()),
        (g.log_ratio_loser.unwrap(), w.log_ratio_loser.unwrap()),
    ] {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1e-3), "{a} vs {b}");
    }
}
