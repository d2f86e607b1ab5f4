//! Gantry's wire contract: the job spec (one schema for the TOML files of `gantry train` and the
//! JSON of the REST API), job records and their state machine, the API's error codes, and the
//! gRPC services (generated from `proto/gantry.proto`).

pub mod job;
pub mod responses;
pub mod spec;
pub mod step;

pub use job::{
    ApiError, CheckpointInfo, Checkpoints, DeviceInfo, ErrorCode, Job, JobEvent, JobPage, JobState, LogLine, MemoryEstimate, WhoAmI,
};
pub use responses::{DeviceList, JobEvents, JobLogs, JobMetrics};
pub use spec::{
    CheckpointSpec, DataSpec, Devices, GpuComm, JobSpec, ModelInit, ModelSpec, ParallelSpec, PpSchedule, Precision, ResourcesSpec,
    RestartSpec, Schedule, SpMode, SpecError, TpMode, TrainSpec,
};
pub use step::StepMetrics;

/// The gRPC messages and services (`gantry.v1`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("gantry.v1");
}
