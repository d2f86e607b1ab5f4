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
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The job spec. Relative paths in it are resolved from the spec's own directory.
    pub spec: PathBuf,
    /// Override a spec key, e.g. `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where metrics, checkpoints and the final model go [default: runs/<spec name>-<time>].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Do not draw the progress bar (a line per step is logged instead).
    #[arg(long)]
    pub no_progress: bool,
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
pub struct BenchArgs {
    /// A model directory (config.json) or a preset: gpt2-tiny, gpt2, llama-tiny, llama-small.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub seq_len: usize,
    #[arg(long)]
    pub batch: usize,
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
