//! Pipeline parallelism (`parallel.pp`): the model's blocks cut into stages on different ranks,
//! with micro-batches flowing through them. `stages.rs` cuts the blocks into stages by cost;
//! `schedule.rs` holds the schedules as data, checked and simulated before anything runs;
//! `runner.rs` runs them.

pub mod bench;
pub mod runner;
pub mod schedule;
pub mod stages;
pub mod training;

pub use bench::{bench_pipeline, PipelineBench, PipelineBenchSpec};
pub use runner::{PipelineRank, Run};
pub use schedule::{Action, Costs, Pass, Schedule, ScheduleKind, Timeline};
pub use stages::split_stages;
pub use training::{plan_stages, PipelineTraining};

#[cfg(test)]
mod tests;
