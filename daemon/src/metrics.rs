//! The daemon's Prometheus series (all `gantry_`-prefixed; documented in docs/operations.md).

use prometheus::{Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Jobs by state.
    pub jobs: IntGaugeVec,
    /// Jobs waiting for devices (queued or restarting).
    pub queue_length: IntGauge,
    /// Device slots in use.
    pub devices_busy: IntGauge,
    pub step: IntGaugeVec,
    pub step_seconds: GaugeVec,
    pub comm_seconds: GaugeVec,
    pub tokens_per_second: GaugeVec,
    pub loss: GaugeVec,
    pub mem_bytes: GaugeVec,
    pub grad_comm_seconds: GaugeVec,
    pub grad_comm_waited_seconds: GaugeVec,
    pub mfu: GaugeVec,
    /// Steps whose update was skipped (non-finite gradients, fp16 overflow), each counted once.
    pub skipped_steps: IntCounterVec,
    /// Tokens trained, counted once per step from rank 0's reports (every rank reports the job's).
    pub tokens: IntCounterVec,
    pub worker_restarts: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_latency: HistogramVec,
    pub grpc_requests: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let per_rank = ["job", "rank"];
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry.register(Box::new(m.clone())).expect("metric names are unique");
                m
            }};
        }
        Metrics {
            jobs: reg!(IntGaugeVec::new(Opts::new("gantry_jobs", "Jobs by state"), &["state"])),
            queue_length: reg!(IntGauge::new("gantry_queue_length", "Jobs waiting for devices (queued or restarting)")),
            devices_busy: reg!(IntGauge::new("gantry_devices_busy", "Device slots held by jobs")),
            step: reg!(IntGaugeVec::new(Opts::new("gantry_job_step", "Last reported optimizer step"), &per_rank)),
            step_seconds: reg!(GaugeVec::new(Opts::new("gantry_job_step_seconds", "Duration of the last optimizer step"), &per_rank)),
            comm_seconds: reg!(GaugeVec::new(
                Opts::new("gantry_job_comm_seconds", "Time the rank spent communicating in the last step"),
                &per_rank
            )),
            tokens_per_second: reg!(GaugeVec::new(
                Opts::new("gantry_job_tokens_per_second", "Training throughput of the last step"),
                &per_rank
            )),
            loss: reg!(GaugeVec::new(Opts::new("gantry_job_loss", "Training loss of the last step"), &per_rank)),
            mem_bytes: reg!(GaugeVec::new(
                Opts::new("gantry_job_memory_bytes", "Parameters, gradients and optimizer state held by the rank"),
                &per_rank
            )),
            grad_comm_seconds: reg!(GaugeVec::new(
                Opts::new("gantry_job_grad_comm_seconds", "Of the communication time, the gradient collectives of the last step"),
                &per_rank
            )),
            grad_comm_waited_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "gantry_job_grad_comm_waited_seconds",
                    "Of the gradient collectives' time, the part training waited for after backward (the rest overlapped it)"
                ),
                &per_rank
            )),
            mfu: reg!(GaugeVec::new(
                Opts::new(
                    "gantry_job_mfu",
                    "Model FLOP utilisation of the last step: model FLOP/s over the devices' peak (absent when the peak is unknown)"
                ),
                &per_rank
            )),
            skipped_steps: reg!(IntCounterVec::new(
                Opts::new("gantry_job_skipped_steps_total", "Steps whose update was skipped (non-finite gradients or fp16 overflow)"),
                &per_rank
            )),
            tokens: reg!(IntCounterVec::new(Opts::new("gantry_job_tokens_total", "Tokens the job trained on"), &["job"])),
            worker_restarts: reg!(IntCounterVec::new(
                Opts::new("gantry_worker_restarts_total", "Jobs restarted after a worker failure"),
                &["job"]
            )),
            http_requests: reg!(IntCounterVec::new(
                Opts::new("gantry_http_requests_total", "REST requests by route and status"),
                &["method", "route", "status"]
            )),
            http_latency: reg!(HistogramVec::new(
                HistogramOpts::new("gantry_http_request_duration_seconds", "REST request latency")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
                &["method", "route"]
            )),
            grpc_requests: reg!(IntCounterVec::new(
                Opts::new("gantry_grpc_requests_total", "gRPC requests by method and outcome"),
                &["method", "code"]
            )),
            registry,
        }
    }

    /// Drops a job's per-rank series (and its restart count): the job is over and its final
    /// values have been on /metrics for the retention period.
    pub fn forget_job(&self, job_id: i64, ranks: &std::collections::BTreeSet<u32>) {
        let job = job_id.to_string();
        for rank in ranks {
            let labels = [job.as_str(), &rank.to_string()];
            let _ = self.step.remove_label_values(&labels);
            for g in [
                &self.step_seconds,
                &self.comm_seconds,
                &self.tokens_per_second,
                &self.loss,
                &self.mem_bytes,
                &self.grad_comm_seconds,
                &self.grad_comm_waited_seconds,
                &self.mfu,
            ] {
                let _ = g.remove_label_values(&labels);
            }
            let _ = self.skipped_steps.remove_label_values(&labels);
        }
        let _ = self.worker_restarts.remove_label_values(&[&job]);
        let _ = self.tokens.remove_label_values(&[&job]);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding never fails");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}
