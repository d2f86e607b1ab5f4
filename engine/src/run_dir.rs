//! The layout of a run directory, in one place: what `gantry train` and the daemon's workers
//! write, what resuming, exporting and the daemon read.
//!
//! ```text
//! RUN_DIR/
//!   spec.toml               the resolved spec (paths absolute for the daemon's jobs)
//!   metrics.jsonl           one JSON object per optimizer step (rank 0)
//!   checkpoints/step_N/     committed training checkpoints (N zero-padded to 8 digits)
//!   final/                  the Hugging Face directory of a finished run
//!   logs/rank-R.log         each rank's output (the daemon's workers, and `gantry train` ranks)
//!   ranks/rank-R.json       how each rank of a daemon job ended
//! ```

use std::path::{Path, PathBuf};

/// A run directory: the paths of what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> RunDir {
        RunDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The run's resolved spec.
    pub fn spec(&self) -> PathBuf {
        self.root.join("spec.toml")
    }

    /// The spec as daemons before 0.1 stored it (JSON); read when `spec()` is absent.
    pub fn legacy_spec_json(&self) -> PathBuf {
        self.root.join("spec.json")
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// The folder of the training checkpoints.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// The checkpoint of optimizer step `step`.
    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.checkpoints().join(format!("step_{step:08}"))
    }

    /// The Hugging Face directory a finished run leaves.
    pub fn final_model(&self) -> PathBuf {
        self.root.join("final")
    }

    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn log(&self, rank: u32) -> PathBuf {
        self.logs().join(format!("rank-{rank}.log"))
    }

    /// The folder where a daemon job's ranks record how they ended.
    pub fn outcomes(&self) -> PathBuf {
        self.root.join("ranks")
    }

    pub fn outcome(&self, rank: u32) -> PathBuf {
        self.outcomes().join(format!("rank-{rank}.json"))
    }

    /// Whether the directory holds a run: its spec, its metrics, its final model or a committed
    /// checkpoint.
    pub fn holds_a_run(&self) -> bool {
        [self.spec(), self.legacy_spec_json(), self.metrics(), self.final_model()].iter().any(|p| p.exists())
            || !crate::checkpoint::committed_checkpoints(&self.root).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::RunDir;

    #[test]
    fn the_layout_is_as_documented() {
        let r = RunDir::new("/runs/a");
        assert_eq!(r.checkpoint(100).to_str(), Some("/runs/a/checkpoints/step_00000100"));
        assert_eq!(crate::checkpoint::checkpoint_step(&r.checkpoint(100)), Some(100), "the step reads back");
        assert_eq!(r.spec().to_str(), Some("/runs/a/spec.toml"));
        assert_eq!(r.log(3).to_str(), Some("/runs/a/logs/rank-3.log"));
        assert_eq!(r.outcome(1).to_str(), Some("/runs/a/ranks/rank-1.json"));
        assert_eq!(r.final_model().to_str(), Some("/runs/a/final"));
        let d = tempfile::tempdir().unwrap();
        let r = RunDir::new(d.path());
        assert!(!r.holds_a_run());
        std::fs::write(r.metrics(), "").unwrap();
        assert!(r.holds_a_run());
    }
}
