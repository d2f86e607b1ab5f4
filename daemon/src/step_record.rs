//! The engine's report of one optimizer step becomes the record the daemon stores, exports and
//! serves (`gantry_api::StepMetrics`) here, once: `gantry train` and the workers write it to
//! `metrics.jsonl`, and the workers send it to the daemon.

use gantry_api::StepMetrics;
use gantry_engine::train::StepReport;

pub fn step_metrics(rank: u32, r: &StepReport) -> StepMetrics {
    StepMetrics {
        rank,
        step: r.step as i64,
        loss: r.loss,
        lr: r.lr,
        grad_norm: r.grad_norm,
        skipped: r.skipped,
        tokens: r.tokens as i64,
        tokens_per_s: r.tokens_per_s,
        mem_bytes: r.mem_bytes as i64,
        step_ms: r.step_ms,
        comm_ms: r.comm_ms,
        grad_comm_ms: r.grad_comm_ms,
        grad_comm_waited_ms: r.grad_comm_waited_ms,
        mfu: r.mfu,
        stage_idle: r.stage_idle.clone(),
    }
}

/// The step's figures as the progress bar and the log show them.
pub fn summary(r: &StepReport) -> String {
    let skipped = if r.skipped { " (update skipped)" } else { "" };
    format!("loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s{skipped}", r.loss, r.lr, r.grad_norm, r.tokens_per_s)
}

/// Whether a log without a progress bar shows step `step` of `steps`: the first, every tenth,
/// the last, and any whose update was skipped.
pub fn logged(r: &StepReport, steps: u64) -> bool {
    r.step == 1 || r.step.is_multiple_of(10) || r.step == steps || r.skipped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of the engine's report reaches the record, none swapped with another.
    #[test]
    fn every_field_of_the_report_is_carried_over() {
        let r = StepReport {
            step: 7,
            loss: 2.0,
            lr: 3.0,
            grad_norm: 4.0,
            skipped: true,
            tokens_per_s: 5.0,
            mem_bytes: 6,
            step_ms: 7.5,
            comm_ms: 8.0,
            grad_comm_ms: 9.0,
            grad_comm_waited_ms: 10.0,
            tokens: 11,
            mfu: Some(0.12),
            stage_idle: vec![0.5, 0.25],
        };
        let m = step_metrics(2, &r);
        assert_eq!(
            m,
            StepMetrics {
                rank: 2,
                step: 7,
                loss: 2.0,
                lr: 3.0,
                grad_norm: 4.0,
                skipped: true,
                tokens: 11,
                tokens_per_s: 5.0,
                mem_bytes: 6,
                step_ms: 7.5,
                comm_ms: 8.0,
                grad_comm_ms: 9.0,
                grad_comm_waited_ms: 10.0,
                mfu: Some(0.12),
                stage_idle: vec![0.5, 0.25],
            }
        );
    }
}
