//! Training one rank: the trainer (`trainer.rs`), the one step of both backends (`step.rs`) and its
//! update (`update.rs`), its checkpoints (`checkpointing.rs`), and the run loop every rank of `gantry train` and every daemon worker runs (`run.rs`).

pub(crate) mod bench;
mod bench_tp;
mod checkpointing;
mod eval;
mod gpu;
mod memory;
mod nonfinite;
#[cfg(test)]
mod pp_tests;
mod run;
#[cfg(test)]
mod sp_tests;
pub mod step;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tp_tests;
mod trainer;
pub mod update;

pub use bench::{bench, BenchResult};
pub use bench_tp::{bench_tensor_parallel, BenchLayout, TensorParallelBench};
pub use checkpointing::CheckpointOutcome;
pub use eval::{evaluate, EvalResult};
pub use memory::{estimate_memory, human_bytes, MemoryPlan};
pub use nonfinite::MAX_NONFINITE_STEPS_IN_A_ROW;
pub use run::{on_pool, run_to_end, KeptCheckpoints, RunEvents};
pub use trainer::{check_layout, check_model_layout, load_model, load_model_part, StepReport, Trainer};
