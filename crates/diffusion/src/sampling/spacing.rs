//! Inference timesteps from a step count, reproducing numpy's arithmetic in diffusers'
//! `set_timesteps` (f64 `linspace` / `arange`, round-half-to-even), so the values are identical.

use super::config::TimestepSpacing;

/// numpy's `linspace(start, stop, num, endpoint)`: `i·step + start`, the end point set exactly.
pub fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let step = if div > 0 {
        (stop - start) / div as f64
    } else {
        0.0
    };
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if endpoint && num > 1 {
        out[num - 1] = stop;
    }
    out
}

/// The timesteps of `spacing`, first (noisiest) to last, before any per-scheduler cast.
///
/// `linspace` gives fractional values (Euler keeps them as fp32, DDIM rounds them); `leading` adds
/// `steps_offset`; `trailing` ignores it, as in diffusers. Returns `None` when numpy's float
/// `arange` of the trailing spacing would give a different number of timesteps than `steps`
/// (e.g. 61 of 1000), which diffusers turns into an out-of-range timestep.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    steps: usize,
    steps_offset: i64,
) -> Option<Vec<f64>> {
    let n = num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t = np_linspace(0.0, (n - 1) as f64, steps, true);
            t.reverse();
            Some(t)
        }
        TimestepSpacing::Leading => {
            let ratio = (n / steps) as f64;
            Some(
                (0..steps)
                    .rev()
                    .map(|i| (i as f64 * ratio).round_ties_even() + steps_offset as f64)
                    .collect(),
            )
        }
        TimestepSpacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            // numpy: len(arange(n, 0, -ratio)) = ceil((0 − n) / −ratio), values n − i·ratio.
            let len = ((0.0 - n as f64) / -ratio).ceil() as usize;
            (len == steps).then(|| {
                (0..len)
                    .map(|i| (n as f64 + i as f64 * -ratio).round_ties_even() - 1.0)
                    .collect()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TimestepSpacing::*;

    #[test]
    fn few_step_schedules_match_diffusers() {
        assert_eq!(
            spaced_timesteps(Trailing, 1000, 4, 1).unwrap(),
            [999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(spaced_timesteps(Trailing, 1000, 1, 0).unwrap(), [999.0]);
        assert_eq!(
            spaced_timesteps(Trailing, 1000, 3, 0).unwrap(),
            [999.0, 666.0, 332.0]
        );
        assert_eq!(
            spaced_timesteps(Leading, 1000, 4, 1).unwrap(),
            [751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            spaced_timesteps(Leading, 1000, 3, 0).unwrap(),
            [666.0, 333.0, 0.0]
        );
        assert_eq!(
            spaced_timesteps(Linspace, 1000, 4, 1).unwrap(),
            [999.0, 666.0, 333.0, 0.0]
        );
        assert_eq!(
            spaced_timesteps(Linspace, 1000, 3, 0).unwrap(),
            [999.0, 499.5, 0.0]
        );
        // A single linspace step is timestep 0, as numpy's linspace(0, 999, 1) is [0].
        assert_eq!(spaced_timesteps(Linspace, 1000, 1, 0).unwrap(), [0.0]);
    }

    #[test]
    fn every_step_count_up_to_n_is_strictly_descending_and_in_range() {
        for spacing in [Linspace, Leading, Trailing] {
            for steps in 1..=1000 {
                let Some(t) = spaced_timesteps(spacing, 1000, steps, 0) else {
                    assert_eq!(spacing, Trailing);
                    continue;
                };
                assert_eq!(t.len(), steps);
                assert!(
                    t.windows(2).all(|w| w[0] > w[1]),
                    "{spacing:?} {steps}: {t:?}"
                );
                assert!(
                    t.iter().all(|&x| (0.0..=999.0).contains(&x)),
                    "{spacing:?} {steps}"
                );
            }
        }
    }

    #[test]
    fn trailing_step_counts_where_numpy_arange_overshoots_are_refused() {
        assert_eq!(spaced_timesteps(Trailing, 1000, 61, 0), None);
        assert!(spaced_timesteps(Trailing, 1000, 60, 0).is_some());
    }
}
