//! The trainer: one rank's training loop over a job spec.

pub(crate) mod bench;
mod eval;
mod gpu;
mod trainer;

pub use bench::{bench, BenchResult};
pub use eval::{evaluate, EvalResult};
pub use trainer::{check_layout, load_model, CheckpointOutcome, StepReport, Trainer};
