//! The gRPC services (tonic): `JobService` for programs, `WorkerService` for the workers.

use gantry_api::proto::job_service_server::JobService as JobRpc;
use gantry_api::proto::worker_service_server::WorkerService as WorkerRpc;
use gantry_api::proto::{self, WorkerId};
use gantry_api::{ErrorCode, Job, StepMetrics};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::service::JobService;

pub use gantry_api::proto::job_service_server::JobServiceServer;
pub use gantry_api::proto::worker_service_server::WorkerServiceServer;

#[derive(Clone)]
pub struct Grpc {
    pub service: JobService,
    pub metrics: Metrics,
}

fn status(e: Error) -> Status {
    let msg = e.to_api().to_string();
    match e.code() {
        ErrorCode::BadRequest | ErrorCode::InvalidSpec => Status::invalid_argument(msg),
        ErrorCode::NotFound => Status::not_found(msg),
        ErrorCode::Conflict => Status::failed_precondition(msg),
        ErrorCode::Unavailable => Status::unavailable(msg),
        ErrorCode::Internal => Status::internal(msg),
    }
}

impl Grpc {
    fn count<T>(&self, method: &str, r: Result<T, Error>) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => "ok",
            Err(e) => match e.code() {
                ErrorCode::Unavailable => "unavailable",
                ErrorCode::Internal => "internal",
                _ => "rejected",
            },
        };
        self.metrics.grpc_requests.with_label_values(&[method, code]).inc();
        r.map(Response::new).map_err(status)
    }
}

fn job_to_proto(j: Job) -> proto::Job {
    proto::Job {
        id: j.id,
        name: j.name,
        state: j.state.to_string(),
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

fn worker(w: Option<WorkerId>) -> Result<WorkerId, Error> {
    w.ok_or_else(|| Error::BadRequest("the request names no worker".into()))
}

#[tonic::async_trait]
impl JobRpc for Grpc {
    async fn submit_job(&self, r: Request<proto::SubmitJobRequest>) -> Result<Response<proto::Job>, Status> {
        let res = self.service.submit(&r.into_inner().spec_json).await.map(job_to_proto);
        self.count("SubmitJob", res)
    }

    async fn get_job(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        let res = self.service.get(r.into_inner().id).await.map(job_to_proto);
        self.count("GetJob", res)
    }

    async fn list_jobs(&self, r: Request<proto::ListJobsRequest>) -> Result<Response<proto::ListJobsResponse>, Status> {
        let q = r.into_inner();
        let after = (q.after > 0).then_some(q.after);
        let limit = (q.limit > 0).then_some(q.limit);
        let res = self.service.list(Some(&q.state), after, limit).await.map(|page| proto::ListJobsResponse {
            jobs: page.jobs.into_iter().map(job_to_proto).collect(),
            next_after: page.next_after.unwrap_or(0),
        });
        self.count("ListJobs", res)
    }

    async fn cancel_job(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        let res = self.service.cancel(r.into_inner().id).await.map(job_to_proto);
        self.count("CancelJob", res)
    }

    async fn get_metrics(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::MetricsResponse>, Status> {
        let res = self
            .service
            .metrics(r.into_inner().id, None, None, None)
            .await
            .map(|steps| proto::MetricsResponse { steps: steps.iter().map(crate::worker::reporter::to_proto).collect() });
        self.count("GetMetrics", res)
    }

    async fn get_events(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::EventsResponse>, Status> {
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
            let w = worker(r.into_inner().worker)?;
            self.service.supervisor.register(w.job_id, w.rank, w.attempt).await?;
            Ok(proto::RegisterResponse {})
        }
        .await;
        self.count("Register", res)
    }

    async fn heartbeat(&self, r: Request<proto::HeartbeatRequest>) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let res = async {
            let w = worker(r.into_inner().worker)?;
            let stop = match self.service.supervisor.heartbeat(w.job_id, w.rank, w.attempt) {
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
            let q = r.into_inner();
            let w = worker(q.worker)?;
            let job = self.service.check_worker(&w).await?;
            if let Some(s) = q.steps.iter().find(|s| s.step < 1 || s.step as u64 > job.spec.train.steps) {
                return Err(Error::BadRequest(format!("step {} is outside the job's 1..={}", s.step, job.spec.train.steps)));
            }
            let steps: Vec<StepMetrics> = q
                .steps
                .into_iter()
                .map(|s| StepMetrics {
                    rank: w.rank,
                    step: s.step,
                    loss: s.loss,
                    lr: s.lr,
                    grad_norm: s.grad_norm,
                    tokens_per_s: s.tokens_per_s,
                    mem_bytes: s.mem_bytes,
                    step_ms: s.step_ms,
                    comm_ms: s.comm_ms,
                })
                .collect();
            self.service.record_steps(w.job_id, &steps).await?;
            Ok(proto::Ack {})
        }
        .await;
        self.count("ReportSteps", res)
    }

    async fn report_logs(&self, r: Request<proto::ReportLogsRequest>) -> Result<Response<proto::Ack>, Status> {
        let res = async {
            let q = r.into_inner();
            let w = worker(q.worker)?;
            self.service.check_worker(&w).await?;
            if q.lines.iter().any(|l| l.offset < 0) {
                return Err(Error::BadRequest("a log line's offset is negative".into()));
            }
            let lines: Vec<gantry_api::LogLine> =
                q.lines.into_iter().map(|l| gantry_api::LogLine { rank: w.rank, offset: l.offset, at_ms: l.at_ms, line: l.line }).collect();
            self.service.store.insert_logs(w.job_id, &lines).await?;
            Ok(proto::Ack {})
        }
        .await;
        self.count("ReportLogs", res)
    }

    async fn checkpoint_committed(&self, r: Request<proto::CheckpointRequest>) -> Result<Response<proto::Ack>, Status> {
        let res = async {
            let q = r.into_inner();
            let w = worker(q.worker)?;
            let job = self.service.check_worker(&w).await?;
            if q.step < 1 || q.step as u64 > job.spec.train.steps {
                return Err(Error::BadRequest(format!("checkpoint step {} is outside the job's 1..={}", q.step, job.spec.train.steps)));
            }
            // A restart resumes from the recorded path: it must be one of this run's checkpoints.
            let inside = std::path::Path::new(&q.path)
                .canonicalize()
                .ok()
                .zip(std::path::Path::new(&job.run_dir).join("checkpoints").canonicalize().ok())
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
