//! The kernels crate's one error type. CPU kernels check shapes with assertions (a wrong shape
//! there is a bug in the engine); the CUDA backend meets the outside world (a missing driver, an
//! NVRTC that rejects a source, a device out of memory) and reports it here.

/// What went wrong on the CUDA side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This binary was built without the `cuda` feature.
    #[error("this gantry was built without CUDA support (rebuild with `--features cuda`)")]
    NotBuilt,
    /// A CUDA library could not be loaded (no driver, no NVRTC, no cuBLASLt).
    #[error("{library} not found: {hint}")]
    LibraryMissing { library: &'static str, hint: String },
    /// No GPU with this ordinal.
    #[error("no CUDA device {ordinal}: this machine has {count}")]
    NoDevice { ordinal: usize, count: usize },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC failed to compile {source_name} for {arch}:\n{log}")]
    Compile { source_name: String, arch: String, log: String },
    /// A driver, NVRTC or cuBLASLt call failed.
    #[error("{context}: {message}")]
    Cuda { context: String, message: String },
    /// An operation was asked for a shape it does not support.
    #[error("{0}")]
    Shape(String),
    /// Reading or writing the kernel cache.
    #[error("kernel cache {path}: {source}")]
    Cache { path: String, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a CUDA-side error with what was being done.
    pub fn cuda(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Cuda { context: context.into(), message: err.to_string() }
    }
}
