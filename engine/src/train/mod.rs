//! The trainer: one rank's training loop over a job spec.

pub(crate) mod bench;
mod eval;
mod gpu;
mod memory;
mod nonfinite;
#[cfg(test)]
mod tests;
mod trainer;

pub use bench::{bench, BenchResult};
pub use eval::{evaluate, EvalResult};
pub use memory::{estimate_memory, human_bytes, MemoryPlan};
pub use nonfinite::MAX_NONFINITE_STEPS_IN_A_ROW;
pub use trainer::{check_layout, load_model, CheckpointOutcome, StepReport, Trainer};
