//! The CUDA kernel sources, embedded in the binary. NVRTC compiles `PRELUDE` followed by one
//! source; a `#line` directive keeps compiler messages pointing at the `.cu` file's own lines.

/// One `.cu` file.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name under `kernels/cuda/`, without `.cu`; also the module name at run time.
    pub name: &'static str,
    pub code: &'static str,
}

/// Storage helpers, reductions and the per-type instantiation macro shared by every source.
pub const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");

/// Every kernel source Gantry ships.
pub const SOURCES: &[KernelSource] = &[
    KernelSource { name: "elementwise", code: include_str!("../../cuda/elementwise.cu") },
    KernelSource { name: "norm", code: include_str!("../../cuda/norm.cu") },
    KernelSource { name: "rope", code: include_str!("../../cuda/rope.cu") },
    KernelSource { name: "embedding", code: include_str!("../../cuda/embedding.cu") },
    KernelSource { name: "cross_entropy", code: include_str!("../../cuda/cross_entropy.cu") },
    KernelSource { name: "adamw", code: include_str!("../../cuda/adamw.cu") },
    KernelSource { name: "attention", code: include_str!("../../cuda/attention.cu") },
];

impl KernelSource {
    /// The text NVRTC compiles.
    pub fn full_text(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", self.name, self.code)
    }
}

/// The source with this name.
pub fn source(name: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_file_is_listed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
        let mut on_disk: Vec<String> =
            std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".cu").map(str::to_string)).collect();
        on_disk.sort();
        let mut listed: Vec<String> = SOURCES.iter().map(|s| s.name.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed, "kernels/cuda/*.cu and SOURCES must agree");
    }
}
