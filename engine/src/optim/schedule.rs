//! Linear warmup, then cosine or linear decay to `min_lr` (or constant).

/// Learning-rate decay after the warmup (to `min_lr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub kind: Schedule,
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (1-based): `lr·step/warmup` during the warmup,
    /// then the decay from `lr` at the end of the warmup to `min_lr` at the last step.
    pub fn at(&self, step: u64) -> f64 {
        if step <= self.warmup_steps && self.warmup_steps > 0 {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps);
        if span == 0 {
            return self.lr;
        }
        let progress = ((step - self.warmup_steps) as f64 / span as f64).clamp(0.0, 1.0);
        match self.kind {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr - (self.lr - self.min_lr) * progress,
            Schedule::Cosine => self.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (self.lr - self.min_lr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_reaches_min_lr() {
        let s = LrSchedule { lr: 1.0, min_lr: 0.1, warmup_steps: 10, total_steps: 110, kind: Schedule::Cosine };
        assert!((s.at(1) - 0.1).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        assert!((s.at(60) - 0.55).abs() < 1e-12);
        assert!((s.at(110) - 0.1).abs() < 1e-12);
        let l = LrSchedule { kind: Schedule::Linear, ..s };
        assert!((l.at(60) - 0.55).abs() < 1e-12 && (l.at(35) - 0.775).abs() < 1e-12);
        let c = LrSchedule { kind: Schedule::Constant, ..s };
        assert_eq!(c.at(100), 1.0);
    }
}
