//! Gantry's wire contract: the job spec (one schema for the TOML files of `gantry train` and the
//! JSON of the REST API), and the errors that name the offending field.

pub mod spec;

pub use spec::{
    CheckpointSpec, DataSpec, Devices, JobSpec, ModelInit, ModelSpec, ParallelSpec, Precision, ResourcesSpec, Schedule, SpecError,
    TrainSpec,
};
