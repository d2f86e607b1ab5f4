//! The CUDA backend.
//!
//! Kernels are `.cu` files under `kernels/cuda/`, embedded in the binary ([`sources`]) and
//! compiled at run time by NVRTC for the GPU at hand, with the CUBIN cached on disk per source
//! hash, compiler options, NVRTC version and architecture. Nothing is compiled at build time, so
//! one binary runs on any recent driver, and a CPU-only machine with NVIDIA's NVRTC wheel can
//! still compile every kernel ([`check_sources`], `gantry kernels check`).
//!
//! cudarc loads libcuda, NVRTC and cuBLASLt when first needed; every entry point here checks that
//! the library is present first and returns an error naming it, never a panic. Without the
//! `cuda` feature the same functions exist and return [`Error::NotBuilt`](crate::Error::NotBuilt).

pub mod sources;

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub mod ops;

#[cfg(feature = "cuda")]
pub use device::{cache_dir, Gpu};
/// The CUDA bindings and 16-bit float types the launchers' signatures use, so dependants need
/// not pin their own versions.
#[cfg(feature = "cuda")]
pub use {cudarc, half};

use crate::Result;

/// Architectures `gantry kernels check` compiles for: Ampere (A100) and Hopper (H100/H200).
pub const CHECK_ARCHS: &[u32] = &[80, 90];

/// One GPU as the driver describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory_bytes: u64,
    /// `(major, minor)`, e.g. `(9, 0)` for an H100.
    pub compute_capability: (u32, u32),
}

/// How many GPUs this machine has, without opening them (unlike [`list_gpus`], which creates a
/// context on each to describe it).
pub fn gpu_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        device::count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::Error::NotBuilt)
    }
}

/// A GPU's memory in bytes, read without opening it.
pub fn gpu_memory(ordinal: usize) -> Result<u64> {
    #[cfg(feature = "cuda")]
    {
        device::total_memory(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(crate::Error::NotBuilt)
    }
}

/// The GPUs the driver reports (a context is created on each to describe it).
pub fn list_gpus() -> Result<Vec<GpuInfo>> {
    #[cfg(feature = "cuda")]
    {
        device::list()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::Error::NotBuilt)
    }
}

/// The outcome of compiling one source for one architecture.
#[derive(Clone, Debug)]
pub struct CheckOutcome {
    pub source: &'static str,
    pub arch: String,
    /// CUBIN size on success, the compiler's message on failure.
    pub result: std::result::Result<usize, String>,
    pub millis: u64,
}

/// Compiles every source for every architecture in `archs` (`sm_XY` as `XY`). An error means
/// NVRTC itself could not be used; a source that fails to compile is an outcome, not an error.
pub fn check_sources(archs: &[u32]) -> Result<Vec<CheckOutcome>> {
    #[cfg(feature = "cuda")]
    {
        nvrtc::ensure_loaded()?;
        let mut out = Vec::new();
        for src in sources::SOURCES {
            for &a in archs {
                let arch = nvrtc::Arch(a);
                let start = std::time::Instant::now();
                let result = nvrtc::compile(src, arch).map(|c| c.len()).map_err(|e| e.to_string());
                out.push(CheckOutcome { source: src.name, arch: arch.to_string(), result, millis: start.elapsed().as_millis() as u64 });
            }
        }
        Ok(out)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = archs;
        Err(crate::Error::NotBuilt)
    }
}

/// NVRTC's version, when it can be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    #[cfg(feature = "cuda")]
    {
        nvrtc::version()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::Error::NotBuilt)
    }
}

/// Stands in for the GPU handle in builds without CUDA, so callers compile unchanged.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub struct Gpu(());

#[cfg(not(feature = "cuda"))]
impl Gpu {
    /// Always [`Error::NotBuilt`](crate::Error::NotBuilt).
    pub fn open(_ordinal: usize) -> Result<Self> {
        Err(crate::Error::NotBuilt)
    }
}
