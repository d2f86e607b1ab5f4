//! Reads confined to allowed roots. A job names files the daemon's workers will read (its model
//! directory and weights, its data, its tokenizer) with the daemon's rights, not its submitter's:
//! with `--read-roots DIR[,DIR…]`, every such path is resolved (symlinks followed) and must lie
//! under one of them, or the job is refused naming the field. Workers check again as they start,
//! so a link swapped after submission is caught there. See docs/security.md.

use std::path::{Path, PathBuf};

use gantry_api::{JobSpec, SpecError};

/// The directories a job may read from; none means anywhere the daemon's user can read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadRoots {
    roots: Vec<PathBuf>,
}

impl ReadRoots {
    /// No confinement.
    pub fn anywhere() -> ReadRoots {
        ReadRoots::default()
    }

    /// Confined to `dirs` (each must exist; kept resolved).
    pub fn new(dirs: &[PathBuf]) -> Result<ReadRoots, String> {
        let mut roots = Vec::new();
        for d in dirs {
            let resolved = d.canonicalize().map_err(|e| format!("--read-roots {}: {e}", d.display()))?;
            if !resolved.is_dir() {
                return Err(format!("--read-roots {}: not a directory", d.display()));
            }
            roots.push(resolved);
        }
        Ok(ReadRoots { roots })
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.roots
    }

    pub fn is_confined(&self) -> bool {
        !self.roots.is_empty()
    }

    fn describe(&self) -> String {
        self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Checks that `path` (named by the spec's `field`) resolves under a root; returns it resolved.
    /// The message never says where a link points: only that it leads outside.
    pub fn check(&self, field: &str, path: &Path) -> Result<PathBuf, SpecError> {
        let resolved = path.canonicalize().map_err(|e| SpecError::new(field, format!("{}: {}", path.display(), plain_io(&e))))?;
        if self.roots.is_empty() || self.roots.iter().any(|r| resolved.starts_with(r)) {
            return Ok(resolved);
        }
        Err(SpecError::new(
            field,
            format!(
                "{} lies outside the directories this daemon reads jobs' files from ({}; see --read-roots)",
                path.display(),
                self.describe()
            ),
        ))
    }
}

/// An I/O error as a user should read it (no OS error numbers).
fn plain_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "the daemon may not read it".into(),
        _ => e.to_string(),
    }
}

/// The files a job will read, by the spec field that names each: the model directory, its config
/// and weights (every shard its index names), the tokenizer, the training data.
pub fn job_files(spec: &JobSpec) -> Result<Vec<(&'static str, PathBuf)>, SpecError> {
    let model = PathBuf::from(&spec.model.path);
    let mut files = vec![("model.path", model.clone()), ("model.path", model.join("config.json"))];
    let weights = gantry_engine::checkpoint::weight_file_paths(&model).map_err(|e| SpecError::new("model.path", e.to_string()))?;
    if !weights.is_empty() {
        let index = model.join("model.safetensors.index.json");
        if index.is_file() {
            files.push(("model.path", index));
        }
        files.extend(weights.into_iter().map(|w| ("model.path", w)));
    }
    files.push(("data.train", PathBuf::from(&spec.data.train)));
    match &spec.data.tokenizer {
        Some(t) => files.push(("data.tokenizer", PathBuf::from(t))),
        None => {
            let t = model.join("tokenizer.json");
            if t.exists() || t.is_symlink() {
                files.push(("model.path", t));
            }
        }
    }
    Ok(files)
}

/// Checks every file of `spec` against `roots` (see `job_files`). The model directory and its
/// weights' index are checked before the index is read to list the shards.
pub fn check_job(spec: &JobSpec, roots: &ReadRoots) -> Result<(), SpecError> {
    if !roots.is_confined() {
        return Ok(());
    }
    let model = Path::new(&spec.model.path);
    roots.check("model.path", model)?;
    let index = model.join("model.safetensors.index.json");
    if index.exists() || index.is_symlink() {
        roots.check("model.path", &index)?;
    }
    for (field, path) in job_files(spec)? {
        roots.check(field, &path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_out_of_the_roots_is_refused_without_saying_where_it_points() {
        let inside = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.bin");
        std::fs::write(&secret, b"hunter2!").unwrap();
        std::os::unix::fs::symlink(&secret, inside.path().join("data.bin")).unwrap();
        std::fs::write(inside.path().join("ok.bin"), b"\0\0").unwrap();
        let roots = ReadRoots::new(&[inside.path().to_path_buf()]).unwrap();
        assert!(roots.check("data.train", &inside.path().join("ok.bin")).is_ok());
        let err = roots.check("data.train", &inside.path().join("data.bin")).unwrap_err();
        assert_eq!(err.field, "data.train");
        assert!(err.message.contains("outside the directories"), "{err}");
        assert!(!err.message.contains(&outside.path().display().to_string()), "the link's target is not told: {err}");
        let err = roots.check("data.train", &inside.path().join("../x/../../etc/passwd")).unwrap_err();
        assert!(err.message.contains("no such file") || err.message.contains("outside"), "{err}");
        assert!(ReadRoots::anywhere().check("data.train", &inside.path().join("data.bin")).is_ok());
        assert!(ReadRoots::new(&[PathBuf::from("/no/such/root")]).is_err());
    }
}
