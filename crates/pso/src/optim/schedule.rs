//! Learning-rate schedules as diffusers' `get_constant_schedule`,
//! `get_constant_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (0.5 cycles).

use std::f64::consts::PI;

use super::OptimSection;

/// The shape of a schedule, as `optim.schedule` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The peak rate at every step.
    Constant,
    /// Linear warm-up from 0 over `warmup_steps`, then constant.
    Warmup,
    /// Linear warm-up, then a half cosine from the peak down to 0 at `total_steps`.
    Cosine,
}

/// A learning rate as a function of the optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The shape.
    pub kind: ScheduleKind,
    /// The peak learning rate.
    pub peak_lr: f64,
    /// Linear warm-up steps (ignored by `constant`).
    pub warmup_steps: u64,
    /// Total training steps (used by `cosine`).
    pub total_steps: u64,
}

impl LrSchedule {
    /// A schedule from its parts.
    pub fn new(kind: ScheduleKind, peak_lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        LrSchedule {
            kind,
            peak_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// The schedule that `optim.schedule`, `optim.lr` and `optim.warmup_steps` describe.
    pub fn from_config(optim: &OptimSection, total_steps: u64) -> Self {
        LrSchedule::new(optim.schedule, optim.lr, optim.warmup_steps, total_steps)
    }

    /// The multiplier of the peak rate at `step` (diffusers' `lr_lambda`).
    pub fn factor(&self, step: u64) -> f64 {
        let warm = self.warmup_steps;
        let ramp = || step as f64 / warm.max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Warmup if step < warm => ramp(),
            ScheduleKind::Warmup => 1.0,
            ScheduleKind::Cosine if step < warm => ramp(),
            ScheduleKind::Cosine => {
                let progress =
                    (step - warm) as f64 / self.total_steps.saturating_sub(warm).max(1) as f64;
                (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate for the update after `step` earlier updates.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.peak_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_config_names() {
        let parse = |name: &str| serde_json::from_value::<ScheduleKind>(name.into());
        assert_eq!(parse("constant").unwrap(), ScheduleKind::Constant);
        assert_eq!(parse("warmup").unwrap(), ScheduleKind::Warmup);
        assert_eq!(parse("cosine").unwrap(), ScheduleKind::Cosine);
        let err = parse("linear").unwrap_err();
        assert!(err.to_string().contains("`linear`"));
        let s = LrSchedule::from_config(&OptimSection::default(), 10);
        assert_eq!(s.kind, ScheduleKind::Constant);
        assert_eq!(s.lr_at(0), 1e-5);
    }

    #[test]
    fn closed_forms() {
        let c = LrSchedule::new(ScheduleKind::Constant, 2.0, 5, 10);
        assert_eq!(c.lr_at(0), 2.0);
        let w = LrSchedule::new(ScheduleKind::Warmup, 2.0, 4, 10);
        let got: Vec<f64> = (0..6).map(|s| w.lr_at(s)).collect();
        assert_eq!(got, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.0]);
        let w0 = LrSchedule::new(ScheduleKind::Warmup, 2.0, 0, 10);
        assert_eq!(w0.lr_at(0), 2.0);
        let cos = LrSchedule::new(ScheduleKind::Cosine, 1.0, 2, 10);
        assert_eq!(cos.lr_at(1), 0.5);
        assert_eq!(cos.lr_at(2), 1.0);
        for s in 2..=10u64 {
            let p = (s - 2) as f64 / 8.0;
            let want = 0.5 * (1.0 + (PI * p).cos());
            assert!((cos.lr_at(s) - want.max(0.0)).abs() < 1e-15, "step {s}");
        }
        assert!(cos.lr_at(10).abs() < 1e-15);
    }
}
