//! Jobs as the service sees them: their states and the legal moves between them, and the records
//! the REST and gRPC APIs return (jobs, events, step metrics, log lines, devices). Their doc
//! comments are the descriptions of the REST API's OpenAPI schemas (`utoipa`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a job is in its life. `queued`: waiting for devices. `scheduled`: devices assigned,
/// workers starting. `running`: every rank has registered and training runs. `restarting`: a
/// worker failed; the job waits to be started again from its last checkpoint. `succeeded`,
/// `failed` and `cancelled` are final and never change. Legal moves:
///
/// ```text
/// queued ──► scheduled ──► running ──► succeeded | failed | cancelled
///               │  ▲          │
///               ▼  │          ▼
///             restarting ◄────┘       (any non-final state ──► cancelled)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for devices.
    Queued,
    /// Devices assigned, workers starting.
    Scheduled,
    /// Every rank has registered and training runs.
    Running,
    /// A worker failed; the job waits to be started again from its last checkpoint.
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Scheduled,
        JobState::Running,
        JobState::Restarting,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Restarting => "restarting",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// A final state never changes again.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// Whether the job holds devices in this state.
    pub fn holds_devices(self) -> bool {
        matches!(self, JobState::Scheduled | JobState::Running)
    }

    /// The state machine: which moves are legal.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (from, Cancelled) => !from.is_final(),
            (Queued, Scheduled) => true,
            (Scheduled, Running | Failed | Restarting) => true,
            (Running, Succeeded | Failed | Restarting) => true,
            (Restarting, Scheduled | Failed) => true,
            _ => false,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            format!("`{s}` is not a job state: expected one of {}", names.join(", "))
        })
    }
}

/// A job as `GET /v1/jobs/{id}` answers it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "id": 42, "name": "tiny-gpt2", "state": "queued", "reason": "waiting for the scheduler",
    "spec": crate::spec::example_stored(),
    "devices": 1, "placement": [], "restarts": 0, "run_dir": "/srv/gantry/gantry-data/runs/3f9a1c0b7d2e4a56/job-42",
    "step": null, "checkpoint_step": null, "created_ms": 1718000000000_i64, "updated_ms": 1718000000000_i64
}))]
pub struct Job {
    /// The job id, assigned by the daemon; ids grow with submission order.
    pub id: i64,
    /// The spec's `name`, or the model directory's name when the spec has none.
    pub name: String,
    pub state: JobState,
    /// Why the job is in its state: what a queued job waits for, why one failed.
    pub reason: String,
    /// The spec as stored: paths made absolute and every key with a default filled in; the
    /// optional keys without a default (`name`, `data.tokenizer`, `train.micro_batch_size`,
    /// `train.min_lr`, `resources.threads`) are left out when unset.
    pub spec: crate::JobSpec,
    /// How many devices the job needs.
    pub devices: u32,
    /// The device slots the job holds while scheduled or running (`cpu:0`, `cuda:1`); empty
    /// otherwise.
    pub placement: Vec<String>,
    /// How many times the job has been restarted after a worker failure.
    pub restarts: u32,
    /// Run directory on the daemon's machine: `DATA_DIR/runs/<database id>/job-ID` (metrics,
    /// logs, checkpoints, final model).
    pub run_dir: String,
    /// Last recorded optimizer step, if any.
    #[schema(required = true)]
    pub step: Option<i64>,
    /// Newest committed checkpoint step, if any.
    #[schema(required = true)]
    pub checkpoint_step: Option<i64>,
    /// When the job was submitted, in milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// When the job last changed, in milliseconds since the Unix epoch.
    pub updated_ms: i64,
    /// The user who submitted the job (the name of the token it came with); absent on a daemon
    /// without tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub owner: Option<String>,
    /// The memory each rank was estimated to need when the job was submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub memory_estimate: Option<MemoryEstimate>,
}

/// Bytes one rank of a job holds while it trains, as estimated from its model's config and
/// layout before anything runs. A job whose ranks would need more than the node's memory is
/// refused at submission (422).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemoryEstimate {
    /// The rank's copy of the parameters (f32; under ZeRO-3 only its shard and the chunks in
    /// use).
    pub parameters: u64,
    /// Its gradients (sharded under ZeRO-2/3).
    pub gradients: u64,
    /// AdamW's two moments (sharded under ZeRO 1-3).
    pub optimizer: u64,
    /// The activations one micro-batch saves for its backward, and the backward's scratch.
    pub activations: u64,
    /// Everything else the rank holds in memory: the token data of text files, the host copy of
    /// the state that asynchronous checkpoints write from.
    pub other: u64,
    /// The sum, per rank.
    pub per_rank: u64,
    /// How many ranks run on the node (each holds `per_rank`).
    #[schema(minimum = 1)]
    pub ranks: u32,
    /// The memory the ranks share on the node (host memory for CPU ranks, one GPU's for a GPU
    /// job), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub node_bytes: Option<u64>,
}

/// One recorded state transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    pub job_id: i64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The state before; `null` for the event that creates the job.
    #[schema(required = true)]
    pub from: Option<JobState>,
    pub to: JobState,
    /// Why the job moved (`submitted` for the creating event).
    pub reason: String,
}

/// One line a worker wrote to its stdout or stderr.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"rank": 0, "offset": 0, "at_ms": 1718000001234_i64, "line": "step 1/300 loss 10.9"}))]
pub struct LogLine {
    pub rank: u32,
    /// Byte offset of the line in the rank's log file: stable, so a reader can resume after it.
    pub offset: i64,
    /// When the daemon read the line, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The text, without its line ending.
    pub line: String,
}

/// A device slot of the daemon's node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceInfo {
    /// `cpu:0`, `cuda:1`, ...
    pub id: String,
    /// The slot's kind: the part of `id` before the colon (`cpu`, `cuda`).
    pub kind: String,
    /// The job that holds the slot, if any.
    #[schema(required = true)]
    pub job_id: Option<i64>,
}

/// A committed training checkpoint of a job's run (`RUN_DIR/checkpoints/step_N`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointInfo {
    /// The optimizer step it was saved after.
    pub step: i64,
    /// The checkpoint directory on the daemon's machine.
    pub path: String,
    /// The size of its files.
    pub bytes: u64,
    /// When it was committed (its manifest written), in milliseconds since the Unix epoch.
    pub written_ms: i64,
}

/// What a job's run has saved: its committed checkpoints, oldest first, and its final model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Checkpoints {
    pub job_id: i64,
    pub checkpoints: Vec<CheckpointInfo>,
    /// The Hugging Face directory written when the job succeeded (`RUN_DIR/final`), if any;
    /// absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub final_model: Option<String>,
}

/// Who the caller is, as the daemon sees its token, and what it may do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// The token's user; absent on a daemon without tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub user: Option<String>,
    /// `admin` (acts on any job) or `user` (cancels and deletes its own jobs); every caller of a
    /// daemon without tokens is an `admin`.
    #[schema(example = "admin")]
    pub role: String,
    /// Whether this daemon asks every job call for a token.
    pub tokens: bool,
    /// The daemon's host name.
    pub node: String,
    /// The daemon's version.
    pub version: String,
}

/// A page of jobs, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Pass as `after` to get the next page (the id of this page's last job); absent on the last
    /// one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub next_after: Option<i64>,
}

/// The one error shape of the REST API (and the message of gRPC errors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
    /// The dotted spec key at fault, for invalid specs (`invalid_spec` only); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub field: Option<String>,
}

/// The small set of error codes shared by HTTP and gRPC. `bad_request` (400): the request is
/// malformed (also with 405 for a method a route does not serve, 413 for a body that is too
/// large). `invalid_spec` (422): the spec parses but a field is invalid. `not_found` (404): no
/// such job, or no such route. `conflict` (409): the request conflicts with the job's state.
/// `unavailable` (503): the store is unreachable for now; retry. `internal` (500): anything else.
/// `unauthorized` (401): the daemon has tokens and the request carries no valid one.
/// `forbidden` (403): the token's user may not act on this job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed (HTTP 400).
    BadRequest,
    /// The spec parses but a field is invalid (HTTP 422).
    InvalidSpec,
    /// No such job, or no such route (HTTP 404).
    NotFound,
    /// The request conflicts with the job's state (HTTP 409).
    Conflict,
    /// The store is unreachable for now; retry (HTTP 503).
    Unavailable,
    /// Anything else (HTTP 500).
    Internal,
    /// No valid token came with the request (HTTP 401).
    Unauthorized,
    /// The token's user may not do this (HTTP 403): cancel or delete another user's job.
    Forbidden,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobState::{self, *};

    #[test]
    fn the_state_machine_allows_only_the_documented_moves() {
        let legal = [
            (Queued, Scheduled),
            (Queued, Cancelled),
            (Scheduled, Running),
            (Scheduled, Failed),
            (Scheduled, Restarting),
            (Scheduled, Cancelled),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Restarting),
            (Running, Cancelled),
            (Restarting, Scheduled),
            (Restarting, Failed),
            (Restarting, Cancelled),
        ];
        let mut allowed = 0;
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(from.can_become(to), legal.contains(&(from, to)), "{from} -> {to}");
                allowed += from.can_become(to) as usize;
            }
        }
        assert_eq!(allowed, legal.len());
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(s));
        }
        assert!("done".parse::<JobState>().unwrap_err().contains("queued, scheduled"));
    }
}
