//! One optimizer step of one rank: the record that flows from a worker to the store, `/metrics`,
//! the REST and gRPC APIs, the dashboard and the run's `metrics.jsonl`. The engine's step report
//! becomes this record once, in the worker (`daemon/src/step_record.rs`); the gRPC message is its
//! field-for-field image (the conversions below), and `metrics.jsonl` holds it as JSON.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::proto;

/// One optimizer step of one rank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "rank": 0, "step": 120, "loss": 3.41, "lr": 0.0006, "grad_norm": 0.82, "skipped": false, "tokens": 8192,
    "tokens_per_s": 51200.0, "mem_bytes": 1990000000_i64, "step_ms": 160.0, "comm_ms": 21.5, "grad_comm_ms": 18.0,
    "grad_comm_waited_ms": 4.0, "mfu": 0.41
}))]
pub struct StepMetrics {
    /// The rank (`metrics.jsonl`, written by rank 0, may leave it out).
    #[serde(default)]
    #[schema(required = true)]
    pub rank: u32,
    /// The optimizer step.
    pub step: i64,
    /// Training loss of the step; `null` when it is not a finite number (a diverged step: JSON
    /// has no NaN).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    #[schema(nullable, required = true)]
    pub loss: f64,
    /// Learning rate of the step.
    #[serde(default)]
    #[schema(required = true)]
    pub lr: f64,
    /// Global gradient norm (before clipping); `null` when it is not a finite number.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    #[schema(nullable, required = true)]
    pub grad_norm: f64,
    /// The update was skipped: the gradients were not finite, or fp16's overflowed at its loss
    /// scale. The step still counts (its data and learning rate are used up).
    #[serde(default)]
    #[schema(required = true)]
    pub skipped: bool,
    /// Tokens the step trained on, across the job (the global batch).
    #[serde(default)]
    #[schema(required = true)]
    pub tokens: i64,
    /// The whole job's training throughput at this step (the global batch's tokens over the step
    /// time): every rank reports the same rate, so do not add ranks up.
    #[serde(default)]
    #[schema(required = true)]
    pub tokens_per_s: f64,
    /// Bytes the rank holds that grow with the model: parameters, gradients and optimizer state,
    /// in whatever shards, gathered chunks and buffers the layout keeps.
    #[serde(default)]
    #[schema(required = true)]
    pub mem_bytes: i64,
    /// Duration of the step in milliseconds.
    #[serde(default)]
    #[schema(required = true)]
    pub step_ms: f64,
    /// Time the rank spent communicating (all-reduce, all-gather) during the step, in
    /// milliseconds; 0 on one rank.
    #[serde(default)]
    #[schema(required = true)]
    pub comm_ms: f64,
    /// Of `comm_ms`, the gradient collectives (all-reduce or reduce-scatter), in milliseconds.
    #[serde(default)]
    #[schema(required = true)]
    pub grad_comm_ms: f64,
    /// Of `grad_comm_ms`, the part training waited for after backward; the rest ran hidden
    /// behind backward.
    #[serde(default)]
    #[schema(required = true)]
    pub grad_comm_waited_ms: f64,
    /// Model FLOP utilisation: the model's FLOPs per second over the peak of the job's devices;
    /// `null` when the peak is not known (CPU ranks, GPUs Gantry has no data sheet for).
    #[serde(default)]
    #[schema(required = true, nullable)]
    pub mfu: Option<f64>,
    /// Under pipeline parallelism, each stage's share of the step spent idle waiting for its
    /// neighbours (the pipeline's bubble), in stage order; empty (and left out of JSON)
    /// otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_idle: Vec<f64>,
}

/// A loss or norm a line leaves out: not known.
fn nan() -> f64 {
    f64::NAN
}

/// JSON has no NaN or infinity: serde_json writes them as `null`, read back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl From<&StepMetrics> for proto::StepMetrics {
    fn from(m: &StepMetrics) -> Self {
        proto::StepMetrics {
            rank: m.rank,
            step: m.step,
            loss: m.loss,
            lr: m.lr,
            grad_norm: m.grad_norm,
            tokens_per_s: m.tokens_per_s,
            mem_bytes: m.mem_bytes,
            step_ms: m.step_ms,
            comm_ms: m.comm_ms,
            skipped: m.skipped,
            tokens: m.tokens,
            grad_comm_ms: m.grad_comm_ms,
            grad_comm_waited_ms: m.grad_comm_waited_ms,
            mfu: m.mfu,
            stage_idle: m.stage_idle.clone(),
        }
    }
}

impl From<proto::StepMetrics> for StepMetrics {
    fn from(m: proto::StepMetrics) -> Self {
        StepMetrics {
            rank: m.rank,
            step: m.step,
            loss: m.loss,
            lr: m.lr,
            grad_norm: m.grad_norm,
            skipped: m.skipped,
            tokens: m.tokens,
            tokens_per_s: m.tokens_per_s,
            mem_bytes: m.mem_bytes,
            step_ms: m.step_ms,
            comm_ms: m.comm_ms,
            grad_comm_ms: m.grad_comm_ms,
            grad_comm_waited_ms: m.grad_comm_waited_ms,
            mfu: m.mfu,
            stage_idle: m.stage_idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> StepMetrics {
        StepMetrics {
            rank: 3,
            step: 17,
            loss: 2.5,
            lr: 1e-3,
            grad_norm: 0.75,
            skipped: true,
            tokens: 4096,
            tokens_per_s: 1234.5,
            mem_bytes: 1 << 33,
            step_ms: 88.0,
            comm_ms: 9.0,
            grad_comm_ms: 7.0,
            grad_comm_waited_ms: 2.0,
            mfu: Some(0.37),
            stage_idle: vec![0.25, 0.125],
        }
    }

    #[test]
    fn the_grpc_message_carries_every_field() {
        let r = record();
        assert_eq!(StepMetrics::from(proto::StepMetrics::from(&r)), r);
        let unknown = StepMetrics { mfu: None, ..record() };
        assert_eq!(StepMetrics::from(proto::StepMetrics::from(&unknown)), unknown);
    }

    /// As `metrics.jsonl` holds it: non-finite numbers as null, read back as NaN; a line written
    /// before the newer fields existed still reads.
    #[test]
    fn json_round_trips_with_non_finite_numbers_and_older_lines() {
        let diverged = StepMetrics { loss: f64::NAN, grad_norm: f64::INFINITY, ..record() };
        let text = serde_json::to_string(&diverged).unwrap();
        assert!(text.contains("\"loss\":null") && text.contains("\"grad_norm\":null"), "{text}");
        let back: StepMetrics = serde_json::from_str(&text).unwrap();
        assert!(back.loss.is_nan() && back.grad_norm.is_nan());
        assert_eq!(StepMetrics { loss: 0.0, grad_norm: 0.0, ..back }, StepMetrics { loss: 0.0, grad_norm: 0.0, ..diverged });
        let old = r#"{"step":4,"loss":3.0,"lr":0.001,"grad_norm":1.0,"tokens_per_s":10.0,"mem_bytes":64,"step_ms":5.0}"#;
        let back: StepMetrics = serde_json::from_str(old).unwrap();
        assert_eq!((back.rank, back.step, back.skipped, back.tokens, back.mfu), (0, 4, false, 0, None));
        // A line that says little (hand-written, or cut short) still reads: what it leaves out is
        // zero, or not known for the loss and the norm.
        let bare: StepMetrics = serde_json::from_str(r#"{"step":2,"loss":2.5}"#).unwrap();
        assert_eq!((bare.step, bare.loss, bare.lr, bare.mem_bytes), (2, 2.5, 0.0, 0));
        assert!(bare.grad_norm.is_nan());
        assert!(serde_json::from_str::<StepMetrics>(r#"{"loss":2.5}"#).is_err(), "a line without its step is not a step");
    }
}
