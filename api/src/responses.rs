//! The REST API's bodies that wrap a job's records (or the node's devices) in an object, so
//! that each can grow a field without breaking its readers.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{DeviceInfo, JobEvent, LogLine, StepMetrics};

/// A job's recorded step metrics, by step (and by rank within a step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobMetrics {
    pub job_id: i64,
    pub steps: Vec<StepMetrics>,
}

/// A job's state transitions, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobEvents {
    pub job_id: i64,
    pub events: Vec<JobEvent>,
}

/// A job's stored log lines, by rank and then by offset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobLogs {
    pub job_id: i64,
    pub lines: Vec<LogLine>,
}

/// The node's device slots, in the order the daemon was configured with them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"devices": [
    {"id": "cpu:0", "kind": "cpu", "job_id": 42},
    {"id": "cpu:1", "kind": "cpu", "job_id": null}
]}))]
pub struct DeviceList {
    pub devices: Vec<DeviceInfo>,
}
