//! The job spec's sections. Every struct refuses unknown keys; every key but `model.path` and
//! `data.train` has a default. The doc comments are the descriptions of the REST API's OpenAPI
//! schemas; the rules `JobSpec::validate` enforces are stated there too (as bounds where a schema
//! can say them).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::SpecError;

/// The longest job name, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// The longest path a spec may name, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// A training job: the body of `POST /v1/jobs` (as JSON, or as TOML), the same schema as the
/// TOML spec files of `gantry train`. Every section and every key refuses unknown keys; every key
/// but `model.path` and `data.train` has a default, and the sections other than `model` and
/// `data` may be left out. A value of the wrong type, an unknown key, a missing required key or a
/// value that breaks a rule below is refused with HTTP 422 and `field` set to the key's dotted
/// path (`train.learning_rate`, `data.seq_len`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = super::example_request)]
pub struct JobSpec {
    /// A human-readable name (defaults to the model directory's name): at most 256 characters,
    /// no control characters. Omitted from the stored spec when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 256)]
    pub name: Option<String>,
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub parallel: ParallelSpec,
    #[serde(default)]
    pub resources: ResourcesSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub restart: RestartSpec,
}

/// What the daemon does when a worker of the job fails.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartSpec {
    /// How many times a failed job is restarted from its last checkpoint before it is marked
    /// failed (0: never).
    #[serde(default = "default_max_restarts")]
    #[schema(default = default_max_restarts)]
    pub max_restarts: u32,
}

impl Default for RestartSpec {
    fn default() -> Self {
        RestartSpec { max_restarts: default_max_restarts() }
    }
}

fn default_max_restarts() -> u32 {
    3
}

/// The model to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A Hugging Face model directory (`config.json`, optionally safetensors weights). Must not be
    /// blank; at most 4096 bytes, no control characters. A relative path is taken from the
    /// daemon's working directory and stored absolute. On submit the directory must hold
    /// `config.json` on the daemon's machine, else 422 with field `model.path`.
    #[schema(pattern = r"\S", max_length = 4096)]
    pub path: String,
    #[serde(default)]
    pub init: ModelInit,
}

/// Where the initial weights come from. `auto`: the directory's weights if it has any, else a
/// seeded random init. `random`: seeded random init (from `train.seed`), ignoring any weights.
/// `pretrained`: the directory's weights; an error if there are none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(default = ModelInit::default)]
pub enum ModelInit {
    /// The directory's weights if it has any, else a seeded random init.
    #[default]
    Auto,
    /// Seeded random init (from `train.seed`), ignoring any weights.
    Random,
    /// The directory's weights; an error if there are none.
    Pretrained,
}

/// The training data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training tokens: `.bin` (uint16), `.u32` (uint32), or `.txt`/`.jsonl` text. Must not be
    /// blank; at most 4096 bytes, no control characters. A relative path is taken from the
    /// daemon's working directory and stored absolute. On submit it must be a file on the
    /// daemon's machine, else 422 with field `data.train`.
    #[schema(pattern = r"\S", max_length = 4096)]
    pub train: String,
    /// Tokens per training sequence (each window reads `seq_len + 1` tokens).
    #[serde(default = "default_seq_len")]
    #[schema(default = default_seq_len, minimum = 1)]
    pub seq_len: usize,
    /// `tokenizer.json` for text data; defaults to the one in the model directory. A relative
    /// path is taken from the daemon's working directory and stored absolute. When given it must
    /// be a file on the daemon's machine, else 422 with field `data.tokenizer`. Omitted from the
    /// stored spec when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 4096)]
    pub tokenizer: Option<String>,
}

/// The optimizer (AdamW) and its schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Optimizer steps.
    #[serde(default = "default_steps")]
    #[schema(default = default_steps, minimum = 1, maximum = 9223372036854775807_i64)]
    pub steps: u64,
    /// Sequences per optimizer step, across all data-parallel ranks. Must be a multiple of
    /// `train.micro_batch_size` × `parallel.dp`.
    #[serde(default = "default_global_batch")]
    #[schema(default = default_global_batch, minimum = 1)]
    pub global_batch_size: usize,
    /// Sequences per forward/backward pass on one rank; defaults to the global batch divided by
    /// `parallel.dp` (no gradient accumulation). Omitted from the stored spec when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub micro_batch_size: Option<usize>,
    /// The peak learning rate: a positive number (checked as the f32 the optimizer sees).
    #[serde(default = "default_lr")]
    #[schema(default = default_lr, exclusive_minimum = 0)]
    pub lr: f64,
    /// The learning rate at the end of the decay; defaults to `lr / 10`. Must lie between 0 and
    /// `train.lr`. Omitted from the stored spec when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0)]
    pub min_lr: Option<f64>,
    /// Steps of linear warmup; at most `train.steps`.
    #[serde(default)]
    #[schema(default = 0, maximum = 9223372036854775807_i64)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub schedule: Schedule,
    /// Decoupled (AdamW) weight decay; ≥ 0.
    #[serde(default = "default_weight_decay")]
    #[schema(default = default_weight_decay, minimum = 0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    #[serde(default = "default_grad_clip")]
    #[schema(default = default_grad_clip, minimum = 0)]
    pub grad_clip: f64,
    /// Seed of the random init and the data order.
    #[serde(default = "default_seed")]
    #[schema(default = default_seed, maximum = 9223372036854775807_i64)]
    pub seed: u64,
    #[serde(default)]
    pub precision: Precision,
    /// AdamW β1, in [0, 1) (also as an f32).
    #[serde(default = "default_beta1")]
    #[schema(default = default_beta1, minimum = 0, exclusive_maximum = 1)]
    pub beta1: f64,
    /// AdamW β2, in [0, 1) (also as an f32).
    #[serde(default = "default_beta2")]
    #[schema(default = default_beta2, minimum = 0, exclusive_maximum = 1)]
    pub beta2: f64,
    /// AdamW ε: a positive number representable in f32 (at least about 1.1754944e-38).
    #[serde(default = "default_eps")]
    #[schema(default = default_eps, exclusive_minimum = 0)]
    pub eps: f64,
}

/// Learning-rate decay after the warmup (to `train.min_lr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(default = Schedule::default)]
pub enum Schedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// Arithmetic precision of the forward and backward passes (master weights are always fp32).
/// `bf16` and `fp16` need the CUDA backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(default = Precision::default)]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

/// The parallel layout. `dp × tp × pp × sp` must equal the number of devices in
/// `resources.devices` (else 422 with field `parallel`); a layout this build cannot run, or that
/// the model cannot be cut into, is refused on submit with 422 naming the field to change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    /// Data-parallel ranks.
    #[serde(default = "one")]
    #[schema(default = one, minimum = 1)]
    pub dp: usize,
    /// Tensor-parallel ranks: the model's layers are cut across them (attention heads, MLP
    /// columns and the vocabulary; see docs/parallel.md).
    #[serde(default = "one")]
    #[schema(default = one, minimum = 1)]
    pub tp: usize,
    /// How tensor parallelism cuts the layers: `1d` (Megatron: column- and row-parallel
    /// linears) or `2d` (weights and activations on a q × q grid; `tp` must be a square).
    #[serde(default, skip_serializing_if = "TpMode::is_default")]
    pub tp_mode: TpMode,
    /// Sequence-parallel ranks (their own axis, for `sp_mode = "all_to_all"` or `"ring_attn"`).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[schema(default = one, minimum = 1)]
    pub sp: usize,
    /// How the sequence is split: `none`, `split_gather` (Megatron's sequence parallelism, inside
    /// the tp group: needs `tp > 1`), `all_to_all` (DeepSpeed Ulysses, over `sp`) or `ring_attn`
    /// (ring attention, over `sp`).
    #[serde(default, skip_serializing_if = "SpMode::is_default")]
    pub sp_mode: SpMode,
    /// Pipeline-parallel stages.
    #[serde(default = "one")]
    #[schema(default = one, minimum = 1)]
    pub pp: usize,
    /// How micro-batches flow through the stages: `1f1b` (default), `gpipe`, `interleaved` or
    /// `zbv` (see docs/parallel.md).
    #[serde(default, skip_serializing_if = "PpSchedule::is_default")]
    pub pp_schedule: PpSchedule,
    /// Chunks (virtual stages) per pipeline rank: 1 for `gpipe` and `1f1b`, 2 or more for
    /// `interleaved`, exactly 2 for `zbv` (the default for those two: 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub pp_chunks: Option<usize>,
    /// Blocks per stage, in order (default: cut to balance the stages' estimated cost). With
    /// several chunks a rank, one count per virtual stage (`pp × pp_chunks`, in order: rank 0's
    /// first chunk, rank 1's first, …, then each rank's second; zbv's second chunks run back
    /// from the last rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp_layers: Option<Vec<usize>>,
    /// ZeRO stage, 0-3.
    #[serde(default)]
    #[schema(default = 0, maximum = 3)]
    pub zero: u8,
    /// How GPU ranks exchange gradients and parameters (CPU ranks always use Gantry's own
    /// socket communicator). Omitted from the stored spec when `nccl`.
    #[serde(default, skip_serializing_if = "GpuComm::is_default")]
    pub gpu_comm: GpuComm,
}

/// The communicator of a multi-GPU job's device buffers. `nccl`: NCCL, GPU to GPU (NVLink,
/// PCIe, InfiniBand), the fast path. `host`: staged through host memory over Gantry's socket
/// communicator; slower, but it needs no NCCL and lets several ranks share one GPU (for tests on
/// one-GPU machines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(default = GpuComm::default)]
pub enum GpuComm {
    /// NCCL, GPU to GPU (NVLink, PCIe, InfiniBand): the fast path.
    #[default]
    Nccl,
    /// Staged through host memory over Gantry's socket communicator: slower, but it needs no
    /// NCCL and lets several ranks share one GPU (for tests on one-GPU machines).
    Host,
}

impl GpuComm {
    fn is_default(&self) -> bool {
        *self == GpuComm::default()
    }
}

/// How tensor parallelism cuts the layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(default = TpMode::default)]
pub enum TpMode {
    /// Megatron's layout: column-parallel then row-parallel linears, one all-reduce per block half.
    #[default]
    #[serde(rename = "1d")]
    OneD,
    /// ColossalAI's 2D layout: weights and activations on a q × q grid (tp = q²).
    #[serde(rename = "2d")]
    TwoD,
}

impl TpMode {
    fn is_default(&self) -> bool {
        *self == TpMode::default()
    }

    pub fn name(&self) -> &'static str {
        match self {
            TpMode::OneD => "1d",
            TpMode::TwoD => "2d",
        }
    }
}

/// How micro-batches flow through the pipeline stages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(default = PpSchedule::default)]
pub enum PpSchedule {
    /// All forwards, then all backwards.
    #[serde(rename = "gpipe")]
    GPipe,
    /// Warm-up, one forward and one backward at a time, cool-down: at most `pp` micro-batches'
    /// activations on a stage.
    #[default]
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Each rank holds `pp_chunks` non-adjacent block ranges; the bubble shrinks by that factor.
    #[serde(rename = "interleaved")]
    Interleaved,
    /// Zero-bubble V: two chunks per rank in a V, the backward split into input and weight
    /// gradients, the weight gradients deferred into the bubbles.
    #[serde(rename = "zbv")]
    Zbv,
}

impl PpSchedule {
    fn is_default(&self) -> bool {
        *self == PpSchedule::default()
    }

    pub fn name(&self) -> &'static str {
        match self {
            PpSchedule::GPipe => "gpipe",
            PpSchedule::OneFOneB => "1f1b",
            PpSchedule::Interleaved => "interleaved",
            PpSchedule::Zbv => "zbv",
        }
    }

    /// Chunks per rank when `parallel.pp_chunks` is not given.
    pub fn default_chunks(&self) -> usize {
        match self {
            PpSchedule::GPipe | PpSchedule::OneFOneB => 1,
            PpSchedule::Interleaved | PpSchedule::Zbv => 2,
        }
    }
}

/// How the sequence is split across ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(default = SpMode::default)]
pub enum SpMode {
    /// The whole sequence on every rank.
    #[default]
    None,
    /// Megatron's sequence parallelism inside the tp group: norms and residuals on a sequence
    /// shard, all-gathered before a column-parallel linear, reduce-scattered after a row-parallel one.
    SplitGather,
    /// DeepSpeed Ulysses over the sp axis: an all-to-all turns the sequence shard into a head
    /// shard around attention, and back.
    AllToAll,
    /// Ring attention over the sp axis: key/value blocks travel around the ring.
    RingAttn,
}

impl SpMode {
    fn is_default(&self) -> bool {
        *self == SpMode::default()
    }

    pub fn name(&self) -> &'static str {
        match self {
            SpMode::None => "none",
            SpMode::SplitGather => "split_gather",
            SpMode::AllToAll => "all_to_all",
            SpMode::RingAttn => "ring_attn",
        }
    }
}

fn is_one(x: &usize) -> bool {
    *x == 1
}

/// What the job runs on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcesSpec {
    #[serde(default)]
    pub devices: Devices,
    /// CPU threads per worker; defaults to the machine's cores divided among the workers.
    /// Omitted from the stored spec when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub threads: Option<usize>,
}

/// Periodic Hugging Face snapshots in the run directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Save every N optimizer steps; 0 saves only the final model.
    #[serde(default)]
    #[schema(default = 0, maximum = 9223372036854775807_i64)]
    pub every: u64,
    /// How many checkpoints to retain.
    #[serde(default = "default_keep")]
    #[schema(default = default_keep, minimum = 1)]
    pub keep: usize,
}

/// The devices a job runs on: `cpu:N` (N worker processes on CPU) or `cuda:0,1,...`. A string on
/// the wire, described by its `PartialSchema` impl below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Devices {
    Cpu(usize),
    Cuda(Vec<u32>),
}

/// What `FromStr` takes, as the schema's pattern (`usize`/`u32` parsing allows a leading `+`).
const DEVICES_PATTERN: &str = r"^(cpu:\+?0*[1-9][0-9]*|cuda:\s*\+?[0-9]+\s*(,\s*\+?[0-9]+\s*)*)$";

impl utoipa::PartialSchema for Devices {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "The devices a job runs on: `cpu:N` (N ≥ 1 worker processes on CPU) or `cuda:0,1,...` (distinct GPU indices). The \
                 stored spec always holds the canonical form (`cpu:4`, `cuda:0,1`). On submit the node must have at least that \
                 many slots of the kind, else 422 with field `resources.devices`.",
            ))
            .pattern(Some(DEVICES_PATTERN))
            .default(Some(serde_json::json!(Devices::default().to_string())))
            .examples(["cpu:1", "cpu:4", "cuda:0,1"])
            .into()
    }
}

impl ToSchema for Devices {
    fn name() -> std::borrow::Cow<'static, str> {
        "Devices".into()
    }
}

impl Devices {
    pub fn count(&self) -> usize {
        match self {
            Devices::Cpu(n) => *n,
            Devices::Cuda(ids) => ids.len(),
        }
    }
}

impl Default for Devices {
    fn default() -> Self {
        Devices::Cpu(1)
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Devices::Cpu(n) => write!(f, "cpu:{n}"),
            Devices::Cuda(ids) => {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(f, "cuda:{}", ids.join(","))
            }
        }
    }
}

impl FromStr for Devices {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a device list: expected `cpu:N` or `cuda:0,1,...`");
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "cpu" => match rest.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Devices::Cpu(n)),
                _ => Err(bad()),
            },
            "cuda" => {
                let ids: Result<Vec<u32>, _> = rest.split(',').map(|x| x.trim().parse::<u32>()).collect();
                let ids = ids.map_err(|_| bad())?;
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if ids.is_empty() || sorted.len() != ids.len() {
                    return Err(bad());
                }
                Ok(Devices::Cuda(ids))
            }
            _ => Err(bad()),
        }
    }
}

impl Serialize for Devices {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Devices {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            steps: default_steps(),
            global_batch_size: default_global_batch(),
            micro_batch_size: None,
            lr: default_lr(),
            min_lr: None,
            warmup_steps: 0,
            schedule: Schedule::default(),
            weight_decay: default_weight_decay(),
            grad_clip: default_grad_clip(),
            seed: default_seed(),
            precision: Precision::default(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
        }
    }
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            dp: 1,
            tp: 1,
            tp_mode: TpMode::OneD,
            sp: 1,
            sp_mode: SpMode::None,
            pp: 1,
            pp_schedule: PpSchedule::OneFOneB,
            pp_chunks: None,
            pp_layers: None,
            zero: 0,
            gpu_comm: GpuComm::Nccl,
        }
    }
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec { every: 0, keep: default_keep() }
    }
}

fn default_seq_len() -> usize {
    256
}
fn default_steps() -> u64 {
    100
}
fn default_global_batch() -> usize {
    8
}
fn default_lr() -> f64 {
    6e-4
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    1337
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_keep() -> usize {
    3
}
fn one() -> usize {
    1
}

impl TrainSpec {
    pub fn min_lr(&self) -> f64 {
        self.min_lr.unwrap_or(self.lr / 10.0)
    }
}

impl JobSpec {
    /// Sequences per forward/backward pass on one rank.
    pub fn micro_batch_size(&self) -> usize {
        self.train.micro_batch_size.unwrap_or(self.train.global_batch_size / self.parallel.dp.max(1))
    }

    /// Micro-batches per optimizer step on one rank.
    pub fn accumulation_steps(&self) -> usize {
        self.train.global_batch_size / (self.micro_batch_size() * self.parallel.dp)
    }

    /// Checks the relations between fields; the error names the field to change.
    pub fn validate(&self) -> Result<(), SpecError> {
        let e = |f: &str, m: String| Err(SpecError::new(f, m));
        // Names and paths are stored as text: a NUL (which PostgreSQL's text refuses) or another
        // control character is a mistake, named here rather than failing the store.
        let fields = [
            ("name", self.name.as_deref()),
            ("model.path", Some(self.model.path.as_str())),
            ("data.train", Some(self.data.train.as_str())),
            ("data.tokenizer", self.data.tokenizer.as_deref()),
        ];
        for (field, text) in fields {
            if let Some(c) = text.and_then(|t| t.chars().find(|c| c.is_control())) {
                return e(field, format!("contains the control character {c:?}"));
            }
        }
        // Every job carries its name and paths in each listing: bounded, so a page of jobs stays
        // small and no client has to lay out a megabyte-wide column.
        if let Some(n) = self.name.as_deref().map(|n| n.chars().count()).filter(|n| *n > MAX_NAME_CHARS) {
            return e("name", format!("is {n} characters long; at most {MAX_NAME_CHARS}"));
        }
        for (field, text) in fields.into_iter().skip(1) {
            if let Some(len) = text.map(str::len).filter(|l| *l > MAX_PATH_BYTES) {
                return e(field, format!("is {len} bytes long; a path has at most {MAX_PATH_BYTES}"));
            }
        }
        if self.model.path.trim().is_empty() {
            return e("model.path", "must name a Hugging Face model directory".into());
        }
        if self.data.train.trim().is_empty() {
            return e("data.train", "must name a token or text file".into());
        }
        if self.data.seq_len == 0 {
            return e("data.seq_len", "must be at least 1".into());
        }
        let t = &self.train;
        if t.steps == 0 {
            return e("train.steps", "must be at least 1".into());
        }
        if t.global_batch_size == 0 {
            return e("train.global_batch_size", "must be at least 1".into());
        }
        if t.micro_batch_size == Some(0) {
            return e("train.micro_batch_size", "must be at least 1".into());
        }
        let p = &self.parallel;
        for (name, v) in [("parallel.dp", p.dp), ("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.sp", p.sp)] {
            if v == 0 {
                return e(name, "must be at least 1".into());
            }
        }
        if p.tp_mode == TpMode::TwoD {
            let q = (p.tp as f64).sqrt().round() as usize;
            if q < 2 || q * q != p.tp {
                return e(
                    "parallel.tp_mode",
                    format!("\"2d\" lays tp ranks out on a q × q grid: parallel.tp must be 4, 9, 16, …, not {}", p.tp),
                );
            }
        }
        match p.sp_mode {
            SpMode::SplitGather if p.tp == 1 => {
                return e("parallel.sp_mode", "\"split_gather\" splits the sequence inside the tp group: it needs parallel.tp > 1".into())
            }
            SpMode::SplitGather if p.sp != 1 => {
                return e(
                    "parallel.sp",
                    "\"split_gather\" runs inside the tp group and has no axis of its own: parallel.sp must be 1".into(),
                )
            }
            SpMode::AllToAll | SpMode::RingAttn if p.sp == 1 => {
                return e(
                    "parallel.sp",
                    format!("sp_mode \"{}\" splits the sequence over parallel.sp ranks: it needs parallel.sp > 1", p.sp_mode.name()),
                )
            }
            SpMode::None if p.sp != 1 => {
                return e(
                    "parallel.sp_mode",
                    format!("parallel.sp = {} needs a way to split the sequence: \"all_to_all\" or \"ring_attn\"", p.sp),
                )
            }
            _ => {}
        }
        if p.zero > 3 {
            return e("parallel.zero", format!("ZeRO stage {} does not exist: use 0, 1, 2 or 3", p.zero));
        }
        let per_step = self.micro_batch_size().checked_mul(p.dp).unwrap_or(0);
        if per_step == 0 || !t.global_batch_size.is_multiple_of(per_step) {
            return e(
                "train.global_batch_size",
                format!(
                    "{} is not a multiple of train.micro_batch_size ({}) × parallel.dp ({})",
                    t.global_batch_size,
                    self.micro_batch_size(),
                    p.dp
                ),
            );
        }
        let chunks = p.pp_chunks.unwrap_or(p.pp_schedule.default_chunks());
        let schedule = p.pp_schedule.name();
        match p.pp_schedule {
            _ if chunks == 0 => return e("parallel.pp_chunks", "must be at least 1".into()),
            PpSchedule::GPipe | PpSchedule::OneFOneB if chunks != 1 => {
                return e("parallel.pp_chunks", format!("{schedule} runs one chunk per rank, not {chunks}"))
            }
            PpSchedule::Interleaved if chunks < 2 => {
                return e("parallel.pp_chunks", format!("interleaved needs 2 or more chunks per rank, not {chunks}"))
            }
            PpSchedule::Zbv if chunks != 2 => {
                return e("parallel.pp_chunks", format!("zbv runs exactly 2 chunks per rank (a V), not {chunks}"))
            }
            _ => {}
        }
        if let Some(layers) = &p.pp_layers {
            // One count per virtual stage: pp of them, or pp × pp_chunks with several chunks a rank.
            let stages = p.pp * chunks;
            if layers.len() != stages || layers.contains(&0) {
                let each = if chunks == 1 {
                    format!("each of the {} stages (parallel.pp)", p.pp)
                } else {
                    format!("each of the {stages} virtual stages (parallel.pp × parallel.pp_chunks, in order)")
                };
                return e("parallel.pp_layers", format!("{layers:?} must give {each} its count of blocks, at least 1"));
            }
        }
        if p.pp > 1 {
            // Micro-batches per step flow through the stages.
            let m = t.global_batch_size / per_step;
            if p.pp_schedule == PpSchedule::OneFOneB && m < p.pp {
                return e(
                    "train.global_batch_size",
                    format!("1f1b needs at least as many micro-batches per step as stages: {m} micro-batches for {} stages", p.pp),
                );
            }
            if p.pp_schedule == PpSchedule::Interleaved && !m.is_multiple_of(p.pp) {
                return e(
                    "train.global_batch_size",
                    format!("interleaved runs the micro-batches in groups of parallel.pp: {m} micro-batches do not divide by {}", p.pp),
                );
            }
        }
        // Integers must fit TOML's i64 (the run directory stores the spec as TOML).
        for (name, v) in [
            ("train.steps", t.steps),
            ("train.warmup_steps", t.warmup_steps),
            ("train.seed", t.seed),
            ("checkpoint.every", self.checkpoint.every),
        ] {
            if v > i64::MAX as u64 {
                return e(name, format!("{v} is larger than {}", i64::MAX));
            }
        }
        // The optimizer runs in f32: check the values it will actually see.
        if !((t.lr as f32).is_finite() && (t.lr as f32) > 0.0) {
            return e("train.lr", format!("must be a positive number, got {}", t.lr));
        }
        let min_lr = t.min_lr();
        if !(min_lr.is_finite() && (0.0..=t.lr).contains(&min_lr)) {
            return e("train.min_lr", format!("must lie between 0 and train.lr ({}), got {min_lr}", t.lr));
        }
        if t.warmup_steps > t.steps {
            return e("train.warmup_steps", format!("{} exceeds train.steps ({})", t.warmup_steps, t.steps));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return e("train.weight_decay", format!("must be ≥ 0, got {}", t.weight_decay));
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            return e("train.grad_clip", format!("must be ≥ 0 (0 disables clipping), got {}", t.grad_clip));
        }
        for (name, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&b) || b as f32 >= 1.0 {
                return e(name, format!("must lie in [0, 1), got {b}"));
            }
        }
        if !(t.eps.is_finite() && (t.eps as f32) >= f32::MIN_POSITIVE) {
            return e("train.eps", format!("must be a positive number representable in f32, got {}", t.eps));
        }
        let world = p.dp.checked_mul(p.tp).and_then(|w| w.checked_mul(p.pp)).and_then(|w| w.checked_mul(p.sp)).unwrap_or(usize::MAX);
        if world != self.resources.devices.count() {
            return e(
                "parallel",
                format!(
                    "dp × tp × pp × sp = {world} but resources.devices = \"{}\" has {} devices",
                    self.resources.devices,
                    self.resources.devices.count()
                ),
            );
        }
        if self.resources.threads == Some(0) {
            return e("resources.threads", "must be at least 1".into());
        }
        if self.checkpoint.keep == 0 {
            return e("checkpoint.keep", "must be at least 1".into());
        }
        Ok(())
    }
}
