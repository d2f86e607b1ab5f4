//! Steps whose gradients are not finite: skipped, counted, and after too many in a row, the end of
//! the run.
//!
//! A NaN or infinite gradient (a loss that overflowed, a learning rate too high for the model)
//! makes the global norm NaN or infinite, and AdamW would write NaN into every parameter and both moments:
//! the run would go on committing NaN checkpoints, and `checkpoint.keep` would rotate the good
//! ones out. Such a step is skipped instead, on every rank (they agree on the norm), as an fp16
//! step whose scaled gradients overflow already was. Gradients that stay non-finite mean the run
//! has diverged: it is stopped, and every checkpoint it wrote is still finite.

use crate::{Error, Result};

/// Optimizer steps in a row whose gradients may be non-finite before the run stops. One bad
/// batch is worth skipping; this many in a row is a model that has left the finite numbers, and
/// training on would only spend the machine's time.
pub const MAX_NONFINITE_STEPS_IN_A_ROW: u32 = 8;

/// How one optimizer step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepOutcome {
    /// The update was applied.
    Applied,
    /// fp16's scaled gradients overflowed and the loss scale was halved: normal while the scale
    /// settles, so not counted.
    // Only the GPU step reports it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    ScaleOverflow,
    /// The gradients were not finite and nothing is left to lower: fp32 and bf16, or fp16 at its
    /// floor scale of 1, where halving leaves the scale as it is.
    NonFinite,
}

/// Counts the steps skipped in a row for non-finite gradients.
#[derive(Debug, Default)]
pub(super) struct NonFiniteSteps {
    in_a_row: u32,
    /// The first step of the current run of them.
    since: u64,
    warned: bool,
}

impl NonFiniteSteps {
    /// Records how step `step` ended; the error once `MAX_NONFINITE_STEPS_IN_A_ROW` steps in a
    /// row were non-finite. Every rank records the same outcomes, so all of them stop at the same
    /// step and none is left waiting in a collective. `lead`: this rank logs the warning (rank 0,
    /// as for the run's other warnings).
    pub(super) fn record(&mut self, step: u64, outcome: StepOutcome, lead: bool) -> Result<()> {
        match outcome {
            StepOutcome::Applied => self.in_a_row = 0,
            // Neither counted nor a reset: overflows follow one another only while the scale
            // comes down to 1, and from there they count.
            StepOutcome::ScaleOverflow => {}
            StepOutcome::NonFinite => {
                if self.in_a_row == 0 {
                    self.since = step;
                }
                self.in_a_row += 1;
                if lead && !self.warned {
                    // Once per run: a steady trickle of warnings would bury the rest of the log;
                    // metrics.jsonl marks every skipped step.
                    self.warned = true;
                    tracing::warn!(
                        step,
                        "the gradients are not finite (NaN or infinite): this step's update is skipped (parameters and optimizer state \
                         are left as they were); {MAX_NONFINITE_STEPS_IN_A_ROW} such steps in a row stop the run. metrics.jsonl marks \
                         every skipped step with \"skipped\": true"
                    );
                }
                if self.in_a_row >= MAX_NONFINITE_STEPS_IN_A_ROW {
                    return Err(Error::NonFiniteGradients { steps: self.in_a_row, first: self.since, last: step });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_finite_steps_in_a_row_count() {
        let mut n = NonFiniteSteps::default();
        let mut step = 0;
        let mut record = |n: &mut NonFiniteSteps, o: StepOutcome| {
            step += 1;
            n.record(step, o, false)
        };
        for _ in 0..MAX_NONFINITE_STEPS_IN_A_ROW - 1 {
            record(&mut n, StepOutcome::NonFinite).unwrap();
        }
        // An applied step starts the count again; loss-scale overflows neither count nor reset.
        record(&mut n, StepOutcome::Applied).unwrap();
        for _ in 0..MAX_NONFINITE_STEPS_IN_A_ROW - 1 {
            record(&mut n, StepOutcome::NonFinite).unwrap();
            record(&mut n, StepOutcome::ScaleOverflow).unwrap();
        }
        // Steps 9 to 22 alternate; step 23 is the 8th non-finite one since step 9.
        match record(&mut n, StepOutcome::NonFinite) {
            Err(Error::NonFiniteGradients { steps, first, last }) => {
                assert_eq!((steps, first, last), (MAX_NONFINITE_STEPS_IN_A_ROW, 9, 23));
            }
            other => panic!("expected NonFiniteGradients, got {other:?}"),
        }
    }
}
