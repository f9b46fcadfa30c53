//! Learning-rate schedules: constant, cosine and linear decay, each after a linear warmup.

use serde::{Deserialize, Serialize};

/// The shape of the decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The peak rate throughout.
    #[default]
    Constant,
    /// Half a cosine from the peak down to `min_lr` at the last step.
    Cosine,
    /// A straight line from the peak down to `min_lr` at the last step.
    Linear,
}

/// The rate for each optimizer step (transformers' schedules, with a floor).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// The shape after warmup.
    pub kind: ScheduleKind,
    /// The peak learning rate.
    pub lr: f64,
    /// Steps of linear warmup from 0 to the peak.
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
    /// The rate the decaying schedules end at.
    pub min_lr: f64,
}

impl Schedule {
    /// The learning rate of 0-based optimizer step `step`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * step as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let factor = match self.kind {
            ScheduleKind::Constant => return self.lr,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            ScheduleKind::Linear => 1.0 - progress,
        };
        self.min_lr + (self.lr - self.min_lr) * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule { kind, lr: 1e-3, warmup: 10, total: 110, min_lr: 1e-5 }
    }

    #[test]
    fn warmup_rises_linearly_from_zero() {
        let s = schedule(ScheduleKind::Cosine);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-15);
        assert_eq!(s.lr(10), 1e-3);
    }

    #[test]
    fn decays_reach_the_floor_at_the_last_step() {
        let cos = schedule(ScheduleKind::Cosine);
        assert!((cos.lr(60) - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-12, "half way is the mean");
        assert!((cos.lr(110) - 1e-5).abs() < 1e-15);
        let lin = schedule(ScheduleKind::Linear);
        assert!((lin.lr(35) - (1e-5 + (1e-3 - 1e-5) * 0.75)).abs() < 1e-12);
        assert!((lin.lr(110) - 1e-5).abs() < 1e-15);
        assert_eq!(schedule(ScheduleKind::Constant).lr(100), 1e-3);
    }
}
