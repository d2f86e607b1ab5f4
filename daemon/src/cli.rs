//! Command-line interface definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gantry", version, about = "Train transformer models: one binary, explained layouts, the same loss under every layout")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model from a job spec (TOML).
    Train(TrainArgs),
    /// Mean next-token loss of a model over every full window of a token file.
    Eval(EvalArgs),
    /// Time full training steps on random tokens.
    Bench(BenchArgs),
    /// Tokenize a text file (.txt, or .jsonl with a `text` field) into a token file.
    Prepare(PrepareArgs),
    /// Write a run's model (its final model, or newest intact checkpoint) or a checkpoint as a
    /// Hugging Face directory.
    Export(ExportArgs),
    /// Run the job service: REST and gRPC APIs, scheduler, supervisor, metrics.
    Daemon(DaemonArgs),
    /// One rank of a job (started by the daemon, not by hand).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Submit a job spec to a daemon.
    Submit(SubmitArgs),
    /// List a daemon's jobs.
    Jobs(JobsArgs),
    /// Show one job: state, why it waits or failed, progress, events.
    Status(JobArgs),
    /// Print (or follow) a job's logs.
    Logs(LogsArgs),
    /// Cancel a job: every rank is stopped and the job recorded `cancelled`.
    Cancel(JobArgs),
    /// Delete a job that has ended: its records in the daemon's database and its run directory.
    Delete(JobArgs),
    /// Tokens for a daemon started with `--tokens`.
    Token(TokenArgs),
    /// List this machine's devices: GPUs (name, memory, compute capability) or CPU slots.
    Devices(DevicesArgs),
    /// CUDA kernel tools.
    Kernels(KernelsArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new secret for a user: prints the secret (first line; it is stored nowhere), then
    /// the `[[token]]` entry for the daemon's tokens file, which holds only its SHA-256.
    New {
        /// The user the token stands for (jobs record it as their owner).
        #[arg(long)]
        user: String,
        /// `admin` (acts on any job) or `user` (cancels and deletes only its own).
        #[arg(long)]
        role: crate::auth::Role,
        /// Also append the entry to this tokens file (created 0600 if missing).
        #[arg(long, value_name = "FILE")]
        append: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KernelsArgs {
    #[command(subcommand)]
    pub command: KernelsCommand,
}

#[derive(Debug, Subcommand)]
pub enum KernelsCommand {
    /// Compile every CUDA kernel source through NVRTC (no GPU needed); the last line is JSON with
    /// `kernels`, `compiled` and `archs`. Exits non-zero when any source fails.
    Check {
        /// Architectures to compile for, as sm_XY [default: sm_80,sm_90].
        #[arg(long, value_delimiter = ',')]
        arch: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// A TOML file with any of the settings below (flags and GANTRY_* variables override it).
    #[arg(long, env = "GANTRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// REST listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "GANTRY_HTTP")]
    pub http: Option<String>,
    /// gRPC listen address [default: 127.0.0.1:8081].
    #[arg(long, env = "GANTRY_GRPC")]
    pub grpc: Option<String>,
    /// Serve /metrics on this address instead of the REST listener.
    #[arg(long, env = "GANTRY_METRICS")]
    pub metrics: Option<String>,
    /// postgres://… or sqlite://… [default: sqlite://DATA_DIR/gantry.db].
    #[arg(long, env = "GANTRY_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Run directories, logs and checkpoints [default: ./gantry-data].
    #[arg(long, env = "GANTRY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Device slots to schedule: `cpu:N` or `cuda:0,1,...` [default: cpu:1].
    #[arg(long, env = "GANTRY_DEVICES")]
    pub devices: Option<String>,
    /// Seconds without a heartbeat before a rank counts as lost [default: 30].
    #[arg(long, env = "GANTRY_HEARTBEAT_TIMEOUT")]
    pub heartbeat_timeout: Option<u64>,
    /// Seconds a finished job's per-rank series stay on /metrics before they are dropped
    /// [default: 600].
    #[arg(long, env = "GANTRY_METRICS_RETENTION")]
    pub metrics_retention: Option<u64>,
    /// Seconds a rank may go without finishing a step (while its heartbeats go on) before it
    /// counts as hung and its job is restarted [default: 10 times the rank's slowest step so far,
    /// at least 600; at least 1800 before its first step, while it loads the model and data].
    #[arg(long, env = "GANTRY_STALL_TIMEOUT")]
    pub stall_timeout: Option<u64>,
    /// A TOML file of `[[token]]` entries (`user`, `role`, `token_sha256`; see `gantry token
    /// new`): every job call must then carry one of their secrets.
    #[arg(long, env = "GANTRY_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Listen on a non-loopback address without `--tokens`: anyone who reaches the port may then
    /// submit, cancel and delete jobs.
    #[arg(long)]
    pub insecure: bool,
    /// TLS for REST and gRPC: the certificate chain (PEM).
    #[arg(long, env = "GANTRY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "GANTRY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Directories jobs may read their model, data and tokenizer from (symlinks are followed)
    /// [default: DATA_DIR/inputs with --tokens; anywhere without].
    #[arg(long, env = "GANTRY_READ_ROOTS", value_delimiter = ',', value_name = "DIR[,DIR...]")]
    pub read_roots: Vec<PathBuf>,
    /// Connections each listener keeps open at once [default: 512].
    #[arg(long, env = "GANTRY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client may take to send a request's headers, or its body; a new connection
    /// gets the lesser of this and 10 s for its first bytes (a TLS handshake included)
    /// [default: 30].
    #[arg(long, env = "GANTRY_READ_TIMEOUT")]
    pub read_timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub job_id: i64,
    #[arg(long)]
    pub rank: u32,
    #[arg(long)]
    pub world_size: u32,
    #[arg(long)]
    pub attempt: u32,
    /// Where the ranks of this job meet (host:port).
    #[arg(long)]
    pub rendezvous: String,
    /// The daemon's gRPC endpoint (http://host:port).
    #[arg(long)]
    pub daemon: String,
    #[arg(long)]
    pub run_dir: PathBuf,
    /// A training checkpoint to continue from.
    #[arg(long)]
    pub resume_from: Option<PathBuf>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// The device slot the daemon placed this rank on (`cpu:N` or `cuda:N`); a GPU rank trains
    /// on that GPU whatever ids the spec lists.
    #[arg(long)]
    pub device: Option<String>,
    /// A directory the job's files must lie in (repeated; none: anywhere), checked again here.
    #[arg(long = "read-root")]
    pub read_roots: Vec<PathBuf>,
    /// A file the job may never read (the daemon's own; repeated).
    #[arg(long = "deny-read")]
    pub deny_read: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServerArg {
    /// The daemon's REST address (`https://…` for a daemon with TLS). The token, if the daemon
    /// wants one, is read from GANTRY_TOKEN.
    #[arg(long, env = "GANTRY_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    pub server: String,
    /// A PEM certificate to trust for an `https://` server, besides the system's (a daemon's
    /// self-signed certificate).
    #[arg(long, env = "GANTRY_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job spec (TOML). Relative paths in it are resolved from the spec's directory.
    pub spec: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Watch the job until it ends: progress, then the final state.
    #[arg(long, short)]
    pub follow: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only jobs in this state.
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    pub id: i64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub id: i64,
    /// Keep printing new lines until the job ends.
    #[arg(long, short)]
    pub follow: bool,
    /// Only this rank.
    #[arg(long)]
    pub rank: Option<u32>,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The job spec. Relative paths in it are resolved from the spec's own directory.
    #[arg(required_unless_present = "resume")]
    pub spec: Option<PathBuf>,
    /// Continue a run from its newest intact checkpoint, with the spec stored in the run
    /// directory (`--set` still applies).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["spec", "run_dir"])]
    pub resume: Option<PathBuf>,
    /// Override a spec key, e.g. `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where metrics, checkpoints and the final model go [default: runs/<spec name>-<time>].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Do not draw the progress bar (a line per step is logged instead).
    #[arg(long)]
    pub no_progress: bool,
    /// Set on the ranks that `gantry train` starts itself for a job on several devices.
    #[arg(long, hide = true, requires = "rendezvous")]
    pub rank: Option<usize>,
    #[arg(long, hide = true)]
    pub rendezvous: Option<String>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Token file (.bin, .u32) or text (.txt, .jsonl) with a tokenizer.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub seq_len: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// tokenizer.json for text data [default: the model directory's].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    /// A model directory (config.json) or a preset: gpt2-tiny, gpt2, llama-tiny, llama-small.
    #[arg(long, required = true)]
    pub model: Option<String>,
    #[arg(long, required = true)]
    pub seq_len: Option<usize>,
    #[arg(long, required = true)]
    pub batch: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `cpu`, or `cuda:N` for one GPU (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// fp32, bf16 or fp16 (GPU only; the CPU trains in fp32).
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// Cut the model across this many tensor-parallel ranks (CPU ranks: threads of this process
    /// over loopback sockets), and report the step's communication share and each rank's memory.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Sequence-parallel ranks of their own axis (with --sp-mode all_to_all or ring_attn).
    #[arg(long, default_value_t = 1)]
    pub sp: usize,
    /// How the sequence is split: none, split_gather (inside the --tp group), all_to_all or
    /// ring_attn (over --sp ranks).
    #[arg(long, default_value = "none")]
    pub sp_mode: String,
    /// Cut the model's blocks into this many pipeline stages (CPU ranks: threads of this
    /// process, each with its share of --threads) and report the measured bubble.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// gpipe, 1f1b, interleaved or zbv (with --pp > 1).
    #[arg(long, default_value = "1f1b")]
    pub pp_schedule: String,
    /// Block ranges per rank (2 or more for interleaved, 2 for zbv).
    #[arg(long)]
    pub pp_chunks: Option<usize>,
    /// Micro-batches of --batch sequences per step (with --pp > 1; default 2 × --pp).
    #[arg(long)]
    pub micro_batches: Option<usize>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A run directory, a checkpoint directory, or any model directory Gantry reads.
    pub source: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Split the weights into shards of at most this size (`500MB`, `5GB`, or bytes).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Bus bandwidth of each collective across message sizes, between local processes over TCP,
    /// beside a plain TCP stream between the same processes.
    Comm(CommBenchArgs),
    /// Asynchronous checkpoints: write throughput against the disk's sequential write speed, and
    /// the training step stall a save causes.
    Checkpoint(CheckpointBenchArgs),
}

#[derive(Debug, Args)]
pub struct CheckpointBenchArgs {
    /// A model directory (config.json) or a preset: gpt2-tiny, gpt2, llama-tiny, llama-small.
    #[arg(long, default_value = "gpt2")]
    pub model: String,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Training steps; a checkpoint starts every `--every` of them.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub every: u64,
    /// Where checkpoints (and the disk test file) are written [default: a temporary directory].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct CommBenchArgs {
    /// Processes (ranks).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Message sizes in bytes [default: 4 KiB to 256 MiB, by 4×].
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Timed repetitions per size (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub iters: usize,
    /// The collectives' transport: `auto` (Unix sockets between ranks on this machine, as
    /// training uses) or `tcp`.
    #[arg(long, default_value = "auto")]
    pub transport: String,
    /// Set on the ranks the benchmark starts itself.
    #[arg(long, hide = true)]
    pub rank: Option<usize>,
    #[arg(long, hide = true)]
    pub rendezvous: Option<String>,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Text to tokenize: .txt (one document) or .jsonl (a `text` field per line).
    pub input: PathBuf,
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output: .bin (uint16 tokens) or .u32 (uint32 tokens).
    #[arg(long)]
    pub out: PathBuf,
}

/// A count that must be at least 1 (`--iters`).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}
