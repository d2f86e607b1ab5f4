//! One GPU: its context and stream, the kernel modules compiled for it (through a disk cache),
//! and the cuBLASLt handle.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::nvrtc::{self, Arch};
use super::sources::{self, KernelSource};
use super::GpuInfo;
use crate::{Error, Result};

/// Makes the driver library loadable, or says it is missing. Must come before any cudarc driver
/// call: cudarc panics when a library it needs cannot be loaded.
pub fn ensure_driver() -> Result<()> {
    // SAFETY: is_culib_present only tries to dlopen libcuda under its usual names.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::LibraryMissing {
            library: "the NVIDIA driver (libcuda.so)",
            hint: "this machine has no NVIDIA driver, or its folder is not on LD_LIBRARY_PATH".into(),
        })
    }
}

/// How many GPUs the driver reports, without opening any: no context is created, so a GPU that
/// is busy (full memory, exclusive-process mode) is counted all the same.
pub fn count() -> Result<usize> {
    ensure_driver()?;
    Ok(CudaContext::device_count().map_err(|e| Error::cuda("cuDeviceGetCount", e))? as usize)
}

/// A GPU's memory in bytes, without opening it (no context is created).
pub fn total_memory(ordinal: usize) -> Result<u64> {
    ensure_driver()?;
    cudarc::driver::result::init().map_err(|e| Error::cuda("cuInit", e))?;
    let dev = cudarc::driver::result::device::get(ordinal as i32).map_err(|e| Error::cuda(format!("CUDA device {ordinal}"), e))?;
    // SAFETY: `dev` was just returned by cuDeviceGet, as total_mem requires.
    let bytes = unsafe { cudarc::driver::result::device::total_mem(dev) }.map_err(|e| Error::cuda("device memory", e))?;
    Ok(bytes as u64)
}

/// The GPUs the driver reports.
pub fn list() -> Result<Vec<GpuInfo>> {
    ensure_driver()?;
    let count = CudaContext::device_count().map_err(|e| Error::cuda("cuDeviceGetCount", e))? as usize;
    (0..count)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda(format!("opening CUDA device {ordinal}"), e))?;
            let (major, minor) = ctx.compute_capability().map_err(|e| Error::cuda("compute capability", e))?;
            Ok(GpuInfo {
                ordinal,
                name: ctx.name().map_err(|e| Error::cuda("device name", e))?,
                total_memory_bytes: ctx.total_mem().map_err(|e| Error::cuda("device memory", e))? as u64,
                compute_capability: (major as u32, minor as u32),
            })
        })
        .collect()
}

/// An open GPU.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernels looked up so far, by (source, name): a launch then costs no driver lookup.
    functions: Mutex<HashMap<&'static str, HashMap<String, CudaFunction>>>,
    blas: Mutex<Option<Arc<CudaBlasLT>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("ordinal", &self.ctx.ordinal()).field("arch", &self.arch).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal` with a stream of its own.
    pub fn open(ordinal: usize) -> Result<Self> {
        ensure_driver()?;
        let count = CudaContext::device_count().map_err(|e| Error::cuda("cuDeviceGetCount", e))? as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda(format!("opening CUDA device {ordinal}"), e))?;
        // SAFETY: cudarc's per-buffer event tracking (an event wait and record per kernel
        // argument) would cost thousands of driver calls per training step. Gantry keeps every
        // buffer on this handle's one stream, where the stream order is the synchronisation; the
        // one exception, a copy stream for checkpoints (`engine::cuda::GpuTrainer`), orders itself
        // against this stream with explicit events and is synchronised before its buffers drop.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(|e| Error::cuda("compute capability", e))?;
        let stream = ctx.new_stream().map_err(|e| Error::cuda("creating a stream", e))?;
        Ok(Gpu {
            ctx,
            stream,
            arch: Arch::from_capability(major, minor),
            modules: Mutex::default(),
            functions: Mutex::default(),
            blas: Mutex::default(),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::cuda("synchronising the stream", e))
    }

    /// The cuBLASLt handle, created on first use.
    pub fn blas(&self) -> Result<Arc<CudaBlasLT>> {
        let mut slot = self.blas.lock().expect("blas lock");
        if let Some(b) = &*slot {
            return Ok(b.clone());
        }
        // SAFETY: is_culib_present only tries to dlopen libcublasLt under its usual names.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(Error::LibraryMissing {
                library: "cuBLASLt (libcublasLt.so)",
                hint: "install the CUDA toolkit or `pip install nvidia-cublas`, and put its folder on LD_LIBRARY_PATH".into(),
            });
        }
        let b = Arc::new(CudaBlasLT::new(self.stream.clone()).map_err(|e| Error::cuda("creating the cuBLASLt handle", format!("{e:?}")))?);
        *slot = Some(b.clone());
        Ok(b)
    }

    /// Kernel `name` from source `source`, compiling (or loading from the cache) the module on
    /// first use.
    pub fn function(&self, source: &'static str, name: &str) -> Result<CudaFunction> {
        // Looked up by `&str`: the launch path allocates nothing once a kernel is known.
        if let Some(f) = self.functions.lock().expect("function lock").get(source).and_then(|m| m.get(name)) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().expect("module lock");
            match modules.get(source) {
                Some(m) => m.clone(),
                None => {
                    let src = sources::source(source).ok_or_else(|| Error::Shape(format!("no kernel source named {source}")))?;
                    let cubin = cached_cubin(src, self.arch)?;
                    let m = self.ctx.load_module(Ptx::from_binary(cubin)).map_err(|e| Error::cuda(format!("loading {source}.cu"), e))?;
                    modules.insert(source, m.clone());
                    m
                }
            }
        };
        let f = module.load_function(name).map_err(|e| Error::cuda(format!("kernel {name} in {source}.cu"), e))?;
        self.functions.lock().expect("function lock").entry(source).or_default().insert(name.to_string(), f.clone());
        Ok(f)
    }
}

/// Where compiled kernels are kept: `GANTRY_KERNEL_CACHE`, else `$XDG_CACHE_HOME/gantry/kernels`,
/// else `~/.cache/gantry/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GANTRY_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("gantry").join("kernels")
}

/// The CUBIN of `src` for `arch`, from the cache when this exact source, option set and NVRTC
/// version were compiled before; otherwise compiled and stored (written to a temporary name and
/// renamed, so concurrent workers never read half a file). A cache that cannot be written only
/// costs a recompile next time.
pub fn cached_cubin(src: &KernelSource, arch: Arch) -> Result<Vec<u8>> {
    let (major, minor) = nvrtc::version()?;
    let opts = nvrtc::options(arch).join(" ");
    let key = nvrtc::fnv1a(&[src.full_text().as_bytes(), opts.as_bytes(), format!("{major}.{minor}").as_bytes()]);
    let dir = cache_dir();
    let path = dir.join(format!("{}-{key:016x}-{arch}.cubin", src.name));
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            return Ok(bytes);
        }
    }
    let cubin = nvrtc::compile(src, arch)?;
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(".{}-{key:016x}-{arch}.{}.tmp", src.name, std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(cubin)
}
