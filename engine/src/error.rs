//! The engine's one error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O error is part of the message (not a `source`), so that a report printed with its
    /// cause chain does not say it twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A model config that Gantry cannot run exactly: the field is named.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// Weights that do not fit the model (missing, wrong shape, unreadable dtype).
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// Token or text data that cannot be used.
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A job spec the engine cannot run as asked (the field is named).
    #[error("{field}: {message}")]
    Unsupported { field: String, message: String },
    /// A device the build or the machine does not have.
    #[error("{0}")]
    Device(String),
    /// A CUDA-side failure (driver, NVRTC, cuBLASLt, a kernel's shape check).
    #[error(transparent)]
    Kernel(#[from] gantry_kernels::Error),
    /// Communication between ranks failed; the peer at fault is named when known.
    #[error("{}{message}", rank.map(|r| format!("rank {r}: ")).unwrap_or_default())]
    Comm { rank: Option<usize>, message: String },
    /// Training diverged: the gradients were not finite for `steps` optimizer steps in a row,
    /// `first` to `last`. Those steps updated nothing (see `train::MAX_NONFINITE_STEPS_IN_A_ROW`),
    /// so the parameters and every checkpoint written are still finite.
    #[error(
        "the gradients were not finite (NaN or infinite) for {steps} steps in a row (steps {first} to {last}): training diverged; \
         those steps were skipped, so the parameters and checkpoints are unharmed: lower train.lr (a tenth is a good first try), then resume from the last checkpoint or train again"
    )]
    NonFiniteGradients { steps: u32, first: u64, last: u64 },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), err }
    }
}
