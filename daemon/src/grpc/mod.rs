//! The gRPC services (tonic): `JobService` for programs, `WorkerService` for the workers.

mod auth;

pub use auth::Gate;

use gantry_api::proto::job_service_server::JobService as JobRpc;
use gantry_api::proto::worker_service_server::WorkerService as WorkerRpc;
use gantry_api::proto::{self, WorkerId};
use gantry_api::{ErrorCode, Job, JobSpec, StepMetrics};
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::auth::worker::WorkerKeys;
use crate::auth::{Auth, Caller};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::service::JobService;

pub use gantry_api::proto::job_service_server::JobServiceServer;
pub use gantry_api::proto::worker_service_server::WorkerServiceServer;

#[derive(Clone)]
pub struct Grpc {
    pub service: JobService,
    pub metrics: Metrics,
    pub auth: Arc<Auth>,
    pub keys: Arc<WorkerKeys>,
}

/// The largest message the job service takes (a spec, as REST's body) and the worker service
/// (a batch of step reports or log lines).
pub const JOB_MESSAGE_LIMIT: usize = 2 << 20;
pub const WORKER_MESSAGE_LIMIT: usize = 1 << 20;

fn status(e: Error) -> Status {
    let msg = e.to_api().to_string();
    match e.code() {
        ErrorCode::BadRequest | ErrorCode::InvalidSpec => Status::invalid_argument(msg),
        ErrorCode::NotFound => Status::not_found(msg),
        ErrorCode::Conflict => Status::failed_precondition(msg),
        ErrorCode::Unavailable => Status::unavailable(msg),
        ErrorCode::Internal => Status::internal(msg),
        ErrorCode::Unauthorized => Status::unauthenticated(msg),
        ErrorCode::Forbidden => Status::permission_denied(msg),
    }
}

/// The `authorization` metadata of a call.
fn authorization<T>(r: &Request<T>) -> Option<&str> {
    r.metadata().get("authorization").map(|v| v.to_str().unwrap_or("?"))
}

impl Grpc {
    fn count<T>(&self, method: &str, r: Result<T, Error>) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => "ok",
            Err(e) => match e.code() {
                ErrorCode::Unavailable => "unavailable",
                ErrorCode::Internal => "internal",
                ErrorCode::Unauthorized | ErrorCode::Forbidden => "unauthorized",
                _ => "rejected",
            },
        };
        self.metrics.grpc_requests.with_label_values(&[method, code]).inc();
        r.map(Response::new).map_err(status)
    }

    /// Who makes a job call: the caller `Gate` found for it on its headers (it refuses calls
    /// without a valid token before they get here).
    fn caller<T>(&self, r: &Request<T>) -> Result<Caller, Error> {
        match r.extensions().get::<Caller>() {
            Some(c) => Ok(c.clone()),
            None => self.auth.caller(authorization(r)),
        }
    }

    /// The worker a call comes from, if it carries the secret of that worker's job attempt.
    fn worker<T>(&self, r: &Request<T>, w: Option<WorkerId>) -> Result<WorkerId, Error> {
        let w = w.ok_or_else(|| Error::BadRequest("the request names no worker".into()))?;
        let secret = authorization(r).and_then(crate::auth::bearer);
        match secret {
            Some(s) if self.keys.verify(w.job_id, w.attempt, s) => Ok(w),
            Some(_) => Err(Error::Unauthorized(format!("the worker secret is not that of job {} attempt {}", w.job_id, w.attempt))),
            None => Err(Error::Unauthorized("a worker call must carry its job attempt's secret".into())),
        }
    }
}

fn job_to_proto(j: Job) -> proto::Job {
    proto::Job {
        id: j.id,
        name: j.name,
        state: j.state.to_string(),
        owner: j.owner.unwrap_or_default(),
        memory_estimate_json: j.memory_estimate.map(|e| serde_json::to_string(&e).unwrap_or_default()).unwrap_or_default(),
        reason: j.reason,
        spec_json: serde_json::to_string(&j.spec).unwrap_or_default(),
        devices: j.devices,
        placement: j.placement,
        restarts: j.restarts,
        run_dir: j.run_dir,
        step: j.step,
        checkpoint_step: j.checkpoint_step,
        created_ms: j.created_ms,
        updated_ms: j.updated_ms,
    }
}

#[tonic::async_trait]
impl JobRpc for Grpc {
    async fn submit_job(&self, r: Request<proto::SubmitJobRequest>) -> Result<Response<proto::Job>, Status> {
        let res = async {
            let caller = self.caller(&r)?;
            match JobSpec::from_json(&r.into_inner().spec_json) {
                Ok(spec) => self.service.submit(&caller, spec).await.map(job_to_proto),
                Err(e) => Err(e.into()),
            }
        }
        .await;
        self.count("SubmitJob", res)
    }

    async fn get_job(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        let res = async {
            self.caller(&r)?;
            self.service.get(r.into_inner().id).await.map(job_to_proto)
        }
        .await;
        self.count("GetJob", res)
    }

    async fn list_jobs(&self, r: Request<proto::ListJobsRequest>) -> Result<Response<proto::ListJobsResponse>, Status> {
        let res = async {
            self.caller(&r)?;
            let q = r.into_inner();
            let after = (q.after > 0).then_some(q.after);
            let limit = (q.limit > 0).then_some(q.limit);
            self.service.list(Some(&q.state), after, limit).await.map(|page| proto::ListJobsResponse {
                jobs: page.jobs.into_iter().map(job_to_proto).collect(),
                next_after: page.next_after.unwrap_or(0),
            })
        }
        .await;
        self.count("ListJobs", res)
    }

    async fn cancel_job(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        let res = async {
            let caller = self.caller(&r)?;
            self.service.cancel(&caller, r.into_inner().id).await.map(job_to_proto)
        }
        .await;
        self.count("CancelJob", res)
    }

    async fn delete_job(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::DeleteJobResponse>, Status> {
        let res = async {
            let caller = self.caller(&r)?;
            let id = r.into_inner().id;
            self.service.delete(&caller, id).await.map(|()| proto::DeleteJobResponse { id })
        }
        .await;
        self.count("DeleteJob", res)
    }

    async fn get_metrics(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::MetricsResponse>, Status> {
        let res = async {
            self.caller(&r)?;
            self.service
                .metrics(r.into_inner().id, None, None, None)
                .await
                .map(|steps| proto::MetricsResponse { steps: steps.iter().map(proto::StepMetrics::from).collect() })
        }
        .await;
        self.count("GetMetrics", res)
    }

    async fn get_events(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::EventsResponse>, Status> {
        if let Err(e) = self.caller(&r) {
            return self.count("GetEvents", Err(e));
        }
        let res = self.service.events(r.into_inner().id).await.map(|events| proto::EventsResponse {
            events: events
                .into_iter()
                .map(|e| proto::Event {
                    at_ms: e.at_ms,
                    from: e.from.map(|f| f.to_string()).unwrap_or_default(),
                    to: e.to.to_string(),
                    reason: e.reason,
                })
                .collect(),
        });
        self.count("GetEvents", res)
    }
}

#[tonic::async_trait]
impl WorkerRpc for Grpc {
    async fn register(&self, r: Request<proto::RegisterRequest>) -> Result<Response<proto::RegisterResponse>, Status> {
        let res = async {
            let w = self.worker(&r, r.get_ref().worker)?;
            self.service.supervisor.register(w.job_id, w.rank, w.attempt).await?;
            Ok(proto::RegisterResponse {})
        }
        .await;
        self.count("Register", res)
    }

    async fn heartbeat(&self, r: Request<proto::HeartbeatRequest>) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let res = async {
            let w = self.worker(&r, r.get_ref().worker)?;
            let step = r.get_ref().step;
            let stop = match self.service.supervisor.heartbeat(w.job_id, w.rank, w.attempt, step) {
                Some(stop) => stop,
                // Not live here: a daemon that just started and has yet to take charge of the job
                // (go on), or a job that ended or moved to a later attempt while no daemon could
                // stop this worker, a cancel that came just before the previous daemon died, say
                // (stop). A store that cannot say lets the worker go on: the next beat asks again.
                None => match self.service.store.job_row(w.job_id).await {
                    Ok(row) => row.job.state.is_final() || row.attempt > w.attempt,
                    Err(Error::JobNotFound(_)) => true,
                    Err(_) => false,
                },
            };
            Ok(proto::HeartbeatResponse { stop })
        }
        .await;
        self.count("Heartbeat", res)
    }

    async fn report_steps(&self, r: Request<proto::ReportStepsRequest>) -> Result<Response<proto::Ack>, Status> {
        let res = async {
            let w = self.worker(&r, r.get_ref().worker)?;
            let q = r.into_inner();
            let job = self.service.check_worker(&w).await?;
            if let Some(s) = q.steps.iter().find(|s| s.step < 1 || s.step as u64 > job.spec.train.steps) {
                return Err(Error::BadRequest(format!("step {} is outside the job's 1..={}", s.step, job.spec.train.steps)));
            }
            let steps: Vec<StepMetrics> = q
                .steps
                .into_iter()
                // The rank is the authenticated worker's, whatever the message says.
                .map(|s| StepMetrics { rank: w.rank, ..StepMetrics::from(s) })
                .collect();
            self.service.record_steps(w.job_id, &steps).await?;
            Ok(proto::Ack {})
        }
        .await;
        self.count("ReportSteps", res)
    }

    async fn report_logs(&self, r: Request<proto::ReportLogsRequest>) -> Result<Response<proto::Ack>, Status> {
        let res = async {
            let w = self.worker(&r, r.get_ref().worker)?;
            let q = r.into_inner();
            self.service.check_worker(&w).await?;
            if q.lines.iter().any(|l| l.offset < 0) {
                return Err(Error::BadRequest("a log line's offset is negative".into()));
            }
            if q.lines.len() > 1000 {
                return Err(Error::BadRequest(format!("{} log lines in one report; at most 1000", q.lines.len())));
            }
            // As the daemon's own copy of the log files stores them: cut, and made safe to print.
            let lines: Vec<gantry_api::LogLine> = q
                .lines
                .into_iter()
                .map(|l| {
                    let clean = crate::text::clean_line(&l.line);
                    let line = if clean.len() > crate::text::MAX_LINE { crate::text::cut_line(&clean, l.line.len()) } else { clean };
                    gantry_api::LogLine { rank: w.rank, offset: l.offset, at_ms: l.at_ms, line }
                })
                .collect();
            self.service.store.insert_logs(w.job_id, &lines).await?;
            Ok(proto::Ack {})
        }
        .await;
        self.count("ReportLogs", res)
    }

    async fn checkpoint_committed(&self, r: Request<proto::CheckpointRequest>) -> Result<Response<proto::Ack>, Status> {
        let res = async {
            let w = self.worker(&r, r.get_ref().worker)?;
            let q = r.into_inner();
            let job = self.service.check_worker(&w).await?;
            if q.step < 1 || q.step as u64 > job.spec.train.steps {
                return Err(Error::BadRequest(format!("checkpoint step {} is outside the job's 1..={}", q.step, job.spec.train.steps)));
            }
            // A restart resumes from the recorded path: it must be one of this run's checkpoints.
            let inside = std::path::Path::new(&q.path)
                .canonicalize()
                .ok()
                .zip(gantry_engine::run_dir::RunDir::new(&job.run_dir).checkpoints().canonicalize().ok())
                .is_some_and(|(p, root)| p.starts_with(root));
            if !inside {
                return Err(Error::BadRequest(format!("{} is not a checkpoint of job {}'s run", q.path, job.id)));
            }
            self.service.store.record_checkpoint(w.job_id, q.step, &q.path).await?;
            Ok(proto::Ack {})
        }
        .await;
        self.count("CheckpointCommitted", res)
    }
}
