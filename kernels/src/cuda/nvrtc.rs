//! Finding NVRTC and compiling kernel sources with it.
//!
//! NVRTC is looked up the way cudarc loads it (by soname, so `LD_LIBRARY_PATH` works), and
//! failing that in the Python environments NVIDIA's PyPI wheels install into
//! (`nvidia/cu13/lib/libnvrtc.so.13`, `nvidia/cuda_nvrtc/lib/libnvrtc.so.12`), or at the path in
//! `GANTRY_NVRTC`. A library found by path is loaded with `RTLD_GLOBAL` and kept loaded, so
//! cudarc's later lookup by soname resolves to it.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result as nvrtc, sys};

use super::sources::KernelSource;
use crate::{Error, Result};

/// A GPU architecture to compile for, `sm_XY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arch(pub u32);

impl Arch {
    /// The architecture of a device with compute capability `major.minor`.
    pub fn from_capability(major: i32, minor: i32) -> Self {
        Arch((major * 10 + minor) as u32)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}", self.0)
    }
}

/// Makes NVRTC loadable, or says where it was looked for.
pub fn ensure_loaded() -> Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED.get_or_init(locate_and_load).clone().map_err(|hint| Error::LibraryMissing { library: "NVRTC (libnvrtc)", hint })
}

fn locate_and_load() -> Result<(), String> {
    // SAFETY: is_culib_present only tries to dlopen the candidate names; loading NVRTC runs no
    // initialisers with preconditions.
    if std::env::var_os("GANTRY_NVRTC").is_none() && unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    let mut tried = Vec::new();
    for path in candidate_paths() {
        if !path.is_file() {
            tried.push(path.display().to_string());
            continue;
        }
        // SAFETY: loading a shared library runs its initialisers; NVRTC's have no preconditions.
        // The handle is leaked on purpose: the library must stay loaded for the process's life.
        match unsafe {
            libloading::os::unix::Library::open(Some(&path), libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL)
        } {
            Ok(lib) => {
                std::mem::forget(lib);
                // SAFETY: as above.
                if unsafe { sys::is_culib_present() } {
                    return Ok(());
                }
                tried.push(format!("{} (loaded, but its soname is not one cudarc looks for)", path.display()));
            }
            Err(e) => tried.push(format!("{} ({e})", path.display())),
        }
    }
    Err(format!(
        "install it with `pip install nvidia-cuda-nvrtc`, put its folder on LD_LIBRARY_PATH, or set GANTRY_NVRTC to the library's path (looked for: {})",
        if tried.is_empty() { "nothing but the library search path".to_string() } else { tried.join(", ") }
    ))
}

/// Where NVRTC may live: `GANTRY_NVRTC`, then the `nvidia` wheels of the active Python
/// environments.
fn candidate_paths() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("GANTRY_NVRTC") {
        return vec![PathBuf::from(p)];
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        roots.extend(site_packages_under(Path::new(&venv).join("lib")));
    }
    let python = std::env::var("GANTRY_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let script = "import site,sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))";
    if let Ok(out) = std::process::Command::new(python).args(["-c", script]).output() {
        if out.status.success() {
            roots.extend(String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from));
        }
    }
    let mut paths = Vec::new();
    for root in roots {
        for rel in ["nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"] {
            let p = root.join(rel);
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
    }
    paths
}

fn site_packages_under(lib: PathBuf) -> Vec<PathBuf> {
    std::fs::read_dir(&lib)
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path().join("site-packages")).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    ensure_loaded()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both out-pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| Error::cuda("nvrtcVersion", format!("{e:?}")))?;
    Ok((major, minor))
}

/// The options every source is compiled with.
pub fn options(arch: Arch) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
}

/// Compiles `src` for `arch` to a CUBIN (NVRTC runs the whole back end, so a kernel that needs too
/// many registers or too much shared memory for the architecture fails here, not at launch).
pub fn compile(src: &KernelSource, arch: Arch) -> Result<Vec<u8>> {
    ensure_loaded()?;
    let text = CString::new(src.full_text()).map_err(|_| Error::Shape(format!("{}.cu contains a NUL byte", src.name)))?;
    let name = CString::new(format!("{}.cu", src.name)).expect("source names have no NUL");
    let prog = nvrtc::create_program(&text, Some(&name)).map_err(|e| Error::cuda("nvrtcCreateProgram", format!("{e:?}")))?;
    let mut opts = options(arch);
    // GANTRY_NVRTC_VERBOSE=1 prints ptxas's register, shared-memory and spill report per kernel.
    let verbose = std::env::var("GANTRY_NVRTC_VERBOSE").is_ok_and(|v| v == "1");
    if verbose {
        opts.push("--ptxas-options=-v".into());
    }
    // SAFETY: `prog` is a live program; it is destroyed exactly once below, on every path.
    let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
    let result = match compiled {
        Ok(()) => {
            if verbose {
                eprintln!("{}.cu {arch}:\n{}", src.name, program_log(prog));
            }
            cubin(prog)
        }
        Err(_) => Err(Error::Compile { source_name: format!("{}.cu", src.name), arch: arch.to_string(), log: program_log(prog) }),
    };
    // SAFETY: `prog` came from create_program and is not used after this.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    // SAFETY: `prog` is a live program.
    match unsafe { nvrtc::get_program_log(prog) } {
        Ok(log) => {
            let bytes: Vec<u8> = log.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        }
        Err(e) => format!("(no log: {e:?})"),
    }
}

fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: `prog` is a compiled program and `size` is valid for writes.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| Error::cuda("nvrtcGetCUBINSize", format!("{e:?}")))?;
    if size == 0 {
        return Err(Error::cuda("nvrtcGetCUBIN", "NVRTC produced an empty CUBIN"));
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds exactly the `size` bytes NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }.result().map_err(|e| Error::cuda("nvrtcGetCUBIN", format!("{e:?}")))?;
    Ok(buf)
}

/// Compiles `src` to PTX for the virtual architecture `compute_XY` (used to list the kernels a
/// source defines: every `.entry` in the PTX).
pub fn entry_points(src: &KernelSource, arch: Arch) -> Result<Vec<String>> {
    ensure_loaded()?;
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec!["--std=c++17".into(), format!("--gpu-architecture=compute_{}", arch.0)],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src.full_text(), opts).map_err(|e| Error::Compile {
        source_name: format!("{}.cu", src.name),
        arch: format!("compute_{}", arch.0),
        log: format!("{e:?}"),
    })?;
    Ok(ptx
        .to_src()
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry ").or_else(|| l.trim().strip_prefix(".entry ")))
        .map(|l| l.split('(').next().unwrap_or("").trim().to_string())
        .collect())
}

/// A stable 64-bit FNV-1a hash, for cache keys that must not change between builds.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
