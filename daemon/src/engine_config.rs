//! The edge between the wire contract and the engine: a validated job spec (`gantry_api::JobSpec`)
//! becomes the engine's own training config and parallel plan here, and nowhere else. The engine
//! does not depend on the API crate; what it needs of a spec is spelled out below, field by field.

use std::path::PathBuf;

use gantry_api as api;
use gantry_engine::config::{
    DataConfig, Devices, GpuComm, ModelInit, ModelSource, OptimConfig, ParallelPlan, Precision, Schedule, ScheduleKind, SpMode, TpMode,
    TrainConfig,
};

/// The run `spec` describes. Paths are taken as the spec holds them: the callers have made them
/// absolute (the CLI against the spec file's folder, the daemon at submission).
pub fn train_config(spec: &api::JobSpec) -> TrainConfig {
    let t = &spec.train;
    TrainConfig {
        model: ModelSource { path: PathBuf::from(&spec.model.path), init: model_init(spec.model.init) },
        data: DataConfig {
            train: PathBuf::from(&spec.data.train),
            seq_len: spec.data.seq_len,
            tokenizer: spec.data.tokenizer.as_ref().map(PathBuf::from),
        },
        optim: OptimConfig {
            steps: t.steps,
            global_batch: t.global_batch_size,
            micro_batch: spec.micro_batch_size(),
            lr: t.lr,
            min_lr: t.min_lr(),
            warmup_steps: t.warmup_steps,
            schedule: match t.schedule {
                api::Schedule::Cosine => Schedule::Cosine,
                api::Schedule::Linear => Schedule::Linear,
                api::Schedule::Constant => Schedule::Constant,
            },
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
        },
        seed: t.seed,
        precision: precision(t.precision),
        plan: plan(&spec.parallel),
        devices: devices(&spec.resources.devices),
        checkpoint_every: spec.checkpoint.every,
    }
}

pub fn model_init(init: api::ModelInit) -> ModelInit {
    match init {
        api::ModelInit::Auto => ModelInit::Auto,
        api::ModelInit::Random => ModelInit::Random,
        api::ModelInit::Pretrained => ModelInit::Pretrained,
    }
}

pub fn precision(p: api::Precision) -> Precision {
    match p {
        api::Precision::Fp32 => Precision::Fp32,
        api::Precision::Bf16 => Precision::Bf16,
        api::Precision::Fp16 => Precision::Fp16,
    }
}

pub fn plan(p: &api::ParallelSpec) -> ParallelPlan {
    ParallelPlan {
        dp: p.dp,
        tp: p.tp,
        tp_mode: match p.tp_mode {
            api::TpMode::OneD => TpMode::OneD,
            api::TpMode::TwoD => TpMode::TwoD,
        },
        pp: p.pp,
        pp_schedule: match p.pp_schedule {
            api::PpSchedule::GPipe => ScheduleKind::GPipe,
            api::PpSchedule::OneFOneB => ScheduleKind::OneFOneB,
            api::PpSchedule::Interleaved => ScheduleKind::Interleaved,
            api::PpSchedule::Zbv => ScheduleKind::Zbv,
        },
        pp_chunks: p.pp_chunks.unwrap_or(p.pp_schedule.default_chunks()),
        pp_layers: p.pp_layers.clone(),
        sp: p.sp,
        sp_mode: match p.sp_mode {
            api::SpMode::None => SpMode::None,
            api::SpMode::SplitGather => SpMode::SplitGather,
            api::SpMode::AllToAll => SpMode::AllToAll,
            api::SpMode::RingAttn => SpMode::RingAttn,
        },
        zero: p.zero,
        gpu_comm: match p.gpu_comm {
            api::GpuComm::Nccl => GpuComm::Nccl,
            api::GpuComm::Host => GpuComm::Host,
        },
    }
}

pub fn devices(d: &api::Devices) -> Devices {
    match d {
        api::Devices::Cpu(n) => Devices::Cpu(*n),
        api::Devices::Cuda(ids) => Devices::Cuda(ids.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> api::JobSpec {
        api::JobSpec::from_toml(text, &[]).unwrap()
    }

    /// The engine's hand-built default run (tests and benchmarks use it) is the job spec's: the
    /// two sets of defaults cannot drift apart unnoticed.
    #[test]
    fn a_spec_of_defaults_is_the_engines_default_run() {
        let s = spec("[model]\npath = \"/m\"\n[data]\ntrain = \"/t.bin\"\n");
        assert_eq!(train_config(&s), TrainConfig::new("/m", "/t.bin"));
    }

    /// Every field reaches the engine, none swapped with another.
    #[test]
    fn every_field_is_carried_over() {
        let s = spec(
            r#"
[model]
path = "/m"
init = "pretrained"
[data]
train = "/t.txt"
tokenizer = "/tok.json"
seq_len = 64
[train]
steps = 70
global_batch_size = 24
micro_batch_size = 3
lr = 2e-3
min_lr = 1e-5
warmup_steps = 7
schedule = "linear"
weight_decay = 0.05
grad_clip = 0.5
seed = 9
precision = "bf16"
beta1 = 0.8
beta2 = 0.99
eps = 1e-6
[parallel]
dp = 2
zero = 3
gpu_comm = "host"
[resources]
devices = "cuda:3,5"
[checkpoint]
every = 11
"#,
        );
        let c = train_config(&s);
        assert_eq!(c.model, ModelSource { path: "/m".into(), init: ModelInit::Pretrained });
        assert_eq!(c.data, DataConfig { train: "/t.txt".into(), seq_len: 64, tokenizer: Some("/tok.json".into()) });
        let o = &c.optim;
        assert_eq!((o.steps, o.global_batch, o.micro_batch, o.warmup_steps), (70, 24, 3, 7));
        assert_eq!((o.lr, o.min_lr, o.weight_decay, o.grad_clip), (2e-3, 1e-5, 0.05, 0.5));
        assert_eq!((o.beta1, o.beta2, o.eps, o.schedule), (0.8, 0.99, 1e-6, Schedule::Linear));
        assert_eq!((c.seed, c.precision, c.checkpoint_every), (9, Precision::Bf16, 11));
        assert_eq!(c.plan, ParallelPlan { dp: 2, zero: 3, gpu_comm: GpuComm::Host, ..ParallelPlan::default() });
        assert_eq!(c.devices, Devices::Cuda(vec![3, 5]));
        assert_eq!(c.accumulation_steps(), 4);
    }
}
