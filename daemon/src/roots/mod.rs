//! Reads confined to allowed roots. A job names files the daemon's workers will read (its model
//! directory and weights, its data, its tokenizer) with the daemon's rights, not its submitter's:
//! with `--read-roots DIR[,DIR…]`, every such path must lie under one of them, symlinks followed,
//! or the job is refused naming the field. The daemon's own files (its worker key, its database,
//! its tokens file and TLS key) are never readable, whatever the roots. A worker opens every file
//! once and checks where the opened file lies (`pin`), so a link swapped after submission reads
//! nothing new. See docs/security.md.

mod pin;

use std::path::{Component, Path, PathBuf};

use gantry_api::{JobSpec, SpecError};

pub use pin::pin_job;

/// The directories a job may read from (none: anywhere the daemon's user can read), and the
/// files it may never read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadRoots {
    /// Each root as given and resolved: a path may name it either way.
    roots: Vec<(PathBuf, PathBuf)>,
    denied: Vec<PathBuf>,
}

impl ReadRoots {
    /// No confinement.
    pub fn anywhere() -> ReadRoots {
        ReadRoots::default()
    }

    /// Confined to `dirs` (each must exist).
    pub fn new(dirs: &[PathBuf]) -> Result<ReadRoots, String> {
        let mut roots = Vec::new();
        for d in dirs {
            let resolved = d.canonicalize().map_err(|e| format!("--read-roots {}: {e}", d.display()))?;
            if !resolved.is_dir() {
                return Err(format!("--read-roots {}: not a directory", d.display()));
            }
            roots.push((normalize(&std::path::absolute(d).unwrap_or_else(|_| d.clone())), resolved));
        }
        Ok(ReadRoots { roots, denied: Vec::new() })
    }

    /// Never to be read, whatever the roots: the daemon's own files (and, for a directory,
    /// everything in it).
    pub fn deny(mut self, paths: impl IntoIterator<Item = PathBuf>) -> ReadRoots {
        self.denied.extend(paths.into_iter().map(|p| p.canonicalize().unwrap_or_else(|_| normalize(&p))));
        self
    }

    /// The roots, resolved (what workers are told).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.roots.iter().map(|(_, r)| r.clone()).collect()
    }

    pub fn denied(&self) -> &[PathBuf] {
        &self.denied
    }

    pub fn is_confined(&self) -> bool {
        !self.roots.is_empty()
    }

    fn describe(&self) -> String {
        self.roots.iter().map(|(_, r)| r.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    fn outside(&self, field: &str, path: &Path) -> SpecError {
        SpecError::new(
            field,
            format!(
                "{} lies outside the directories this daemon reads jobs' files from ({}; see --read-roots)",
                path.display(),
                self.describe()
            ),
        )
    }

    /// Whether a resolved path may be read: under a root, and none of the daemon's own files.
    fn allows(&self, resolved: &Path) -> bool {
        let under = self.roots.is_empty() || self.roots.iter().any(|(_, r)| resolved.starts_with(r));
        under && !self.denied.iter().any(|d| resolved.starts_with(d))
    }

    /// Checks that `path` (named by the spec's `field`) resolves to a file it may read; returns
    /// it resolved. A path that does not name a root is refused before the file system is asked
    /// about it, so refusals tell nothing of what exists outside the roots; the message never says
    /// where a link points.
    pub fn check(&self, field: &str, path: &Path) -> Result<PathBuf, SpecError> {
        if !self.roots.is_empty() {
            let named = normalize(path);
            if !self.roots.iter().any(|(given, resolved)| named.starts_with(given) || named.starts_with(resolved)) {
                return Err(self.outside(field, path));
            }
        }
        let resolved = path.canonicalize().map_err(|e| SpecError::new(field, format!("{}: {}", path.display(), plain_io(&e))))?;
        if self.allows(&resolved) {
            Ok(resolved)
        } else if self.denied.iter().any(|d| resolved.starts_with(d)) {
            Err(SpecError::new(field, format!("{} is one of the daemon's own files, which jobs may not read", path.display())))
        } else {
            Err(self.outside(field, path))
        }
    }
}

/// An absolute path with `.` and `..` taken away without asking the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// An I/O error as a user should read it (no OS error numbers).
fn plain_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "the daemon may not read it".into(),
        _ => e.to_string(),
    }
}

/// The largest index of weights read to list its shards (a large model's is a few MiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// The files a job will read, by the spec field that names each: the model directory's config,
/// weights (every shard its index names) and tokenizer, the training data, the named tokenizer.
/// (The index is read to list the shards: call this only once the index is known to be allowed.)
pub fn job_files(spec: &JobSpec) -> Result<Vec<(&'static str, PathBuf)>, SpecError> {
    let model = PathBuf::from(&spec.model.path);
    let mut files = vec![("model.path", model.join("config.json"))];
    let index = model.join("model.safetensors.index.json");
    if index.is_file() && std::fs::metadata(&index).is_ok_and(|m| m.len() > MAX_INDEX_BYTES) {
        return Err(SpecError::new("model.path", format!("{} is larger than {} MiB", index.display(), MAX_INDEX_BYTES >> 20)));
    }
    let weights = gantry_engine::checkpoint::weight_file_paths(&model).map_err(|e| SpecError::new("model.path", e.to_string()))?;
    if !weights.is_empty() && index.is_file() {
        files.push(("model.path", index));
    }
    files.extend(weights.into_iter().map(|w| ("model.path", w)));
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
    if !roots.is_confined() && roots.denied.is_empty() {
        return Ok(());
    }
    let model = Path::new(&spec.model.path);
    roots.check("model.path", model)?;
    let index = model.join("model.safetensors.index.json");
    if index.exists() || index.is_symlink() {
        roots.check("model.path", &index)?;
    }
    // (The index, checked above, is not checked twice.)
    for (field, path) in job_files(spec)?.into_iter().filter(|(_, p)| *p != index) {
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
        assert!(ReadRoots::anywhere().check("data.train", &inside.path().join("data.bin")).is_ok());
        assert!(ReadRoots::new(&[PathBuf::from("/no/such/root")]).is_err());
    }

    /// Outside the roots, a file that exists and one that does not get the same answer: the
    /// file system is not asked.
    #[test]
    fn refusals_outside_the_roots_tell_nothing_of_what_exists_there() {
        let inside = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("there"), b"x").unwrap();
        let roots = ReadRoots::new(&[inside.path().to_path_buf()]).unwrap();
        let there = roots.check("data.train", &outside.path().join("there")).unwrap_err().message;
        let not = roots.check("data.train", &outside.path().join("not-there")).unwrap_err().message;
        assert_eq!(there.replace("there", ""), not.replace("not-there", ""));
        let climbing = inside.path().join("../").join(outside.path().file_name().unwrap()).join("there");
        assert!(roots.check("data.train", &climbing).unwrap_err().message.contains("outside"), "`..` is taken away first");
    }

    #[test]
    fn the_daemons_own_files_are_never_readable() {
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("worker.key"), b"k").unwrap();
        std::fs::write(data.path().join("data.bin"), b"\0\0").unwrap();
        let roots = ReadRoots::new(&[data.path().to_path_buf()]).unwrap().deny([data.path().join("worker.key")]);
        let err = roots.check("data.train", &data.path().join("worker.key")).unwrap_err();
        assert!(err.message.contains("one of the daemon's own files"), "{err}");
        assert!(roots.check("data.train", &data.path().join("data.bin")).is_ok());
        let anywhere = ReadRoots::anywhere().deny([data.path().join("worker.key")]);
        assert!(anywhere.check("data.train", &data.path().join("worker.key")).is_err(), "also without roots");
    }
}
