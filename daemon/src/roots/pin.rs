//! A worker's job files, opened once and checked where the opened files lie. The engine then
//! reads them through links to the worker's own descriptors (`/proc/self/fd/N`), which reopen
//! the very files checked: a path changed after the check (a link swapped to point at a key)
//! reads nothing new, at start or when a checkpoint copies the tokenizer hours later.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use gantry_api::{JobSpec, SpecError};

use super::ReadRoots;

/// The job's files held open for the worker's life.
pub struct Pinned {
    _files: Vec<File>,
}

/// Opens every file `spec` names (see `super::job_files`), refuses one that is not a regular file
/// or that lies outside `roots` once opened, and points `spec` at links to the open files in
/// `dir` (made anew).
pub fn pin_job(spec: &mut JobSpec, roots: &ReadRoots, dir: &Path) -> Result<Pinned, SpecError> {
    let io = |field: &str, e: std::io::Error| SpecError::new(field, format!("{}: {e}", dir.display()));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("model")).map_err(|e| io("model.path", e))?;
    let mut files = Vec::new();
    let mut pin = |field: &str, path: &Path, link: &Path| -> Result<(), SpecError> {
        // Non-blocking, so a FIFO put in a file's place is refused rather than waited on.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| SpecError::new(field, format!("{}: {e}", path.display())))?;
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            return Err(SpecError::new(field, format!("{} is not a regular file", path.display())));
        }
        let fd = format!("/proc/self/fd/{}", f.as_raw_fd());
        let real = std::fs::read_link(&fd).map_err(|e| SpecError::new(field, format!("{fd}: {e}")))?;
        if !roots.allows(&real) {
            return Err(roots.outside(field, path));
        }
        std::os::unix::fs::symlink(&fd, link).map_err(|e| io(field, e))?;
        files.push(f);
        Ok(())
    };
    let model = PathBuf::from(&spec.model.path);
    let pinned_model = dir.join("model");
    pin("model.path", &model.join("config.json"), &pinned_model.join("config.json"))?;
    let index = model.join("model.safetensors.index.json");
    if index.exists() {
        pin("model.path", &index, &pinned_model.join("model.safetensors.index.json"))?;
        // The shards the pinned index names (read through its link: the file checked).
        let shards =
            gantry_engine::checkpoint::weight_file_paths(&pinned_model).map_err(|e| SpecError::new("model.path", e.to_string()))?;
        for shard in shards {
            let name = shard.file_name().unwrap_or_default();
            pin("model.path", &model.join(name), &pinned_model.join(name))?;
        }
    } else if model.join("model.safetensors").exists() {
        pin("model.path", &model.join("model.safetensors"), &pinned_model.join("model.safetensors"))?;
    }
    match spec.data.tokenizer.clone() {
        Some(t) => {
            let link = dir.join("tokenizer.json");
            pin("data.tokenizer", Path::new(&t), &link)?;
            spec.data.tokenizer = Some(link.to_string_lossy().into_owned());
        }
        None if model.join("tokenizer.json").exists() => {
            pin("model.path", &model.join("tokenizer.json"), &pinned_model.join("tokenizer.json"))?;
        }
        None => {}
    }
    // The data's file name is kept: its extension says its format.
    let data = PathBuf::from(&spec.data.train);
    let link = dir.join(data.file_name().unwrap_or_default());
    pin("data.train", &data, &link)?;
    spec.data.train = link.to_string_lossy().into_owned();
    spec.model.path = pinned_model.to_string_lossy().into_owned();
    Ok(Pinned { _files: files })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link swapped after the files were pinned changes nothing the worker reads.
    #[test]
    fn pinned_files_are_the_files_checked_whatever_their_paths_name_later() {
        let roots_dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = roots_dir.path();
        std::fs::create_dir(r.join("model")).unwrap();
        std::fs::write(r.join("model/config.json"), b"{\"real\": 1}").unwrap();
        std::fs::write(r.join("tok-real.json"), b"real tokenizer").unwrap();
        std::os::unix::fs::symlink(r.join("tok-real.json"), r.join("tok.json")).unwrap();
        std::fs::write(r.join("data.bin"), [1u8, 0, 2, 0]).unwrap();
        std::fs::write(outside.path().join("secret"), b"hunter2").unwrap();
        let mut spec = JobSpec::from_toml(
            &format!(
                "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\ntokenizer = \"{}\"",
                r.join("model").display(),
                r.join("data.bin").display(),
                r.join("tok.json").display()
            ),
            &[],
        )
        .unwrap();
        let roots = ReadRoots::new(&[r.to_path_buf()]).unwrap();
        let pinned_dir = tempfile::tempdir().unwrap();
        let _pinned = pin_job(&mut spec, &roots, &pinned_dir.path().join("rank-0")).unwrap();
        // The tokenizer's link now points out of the roots: the pinned one still reads the real one.
        std::fs::remove_file(r.join("tok.json")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), r.join("tok.json")).unwrap();
        assert_eq!(std::fs::read(spec.data.tokenizer.as_ref().unwrap()).unwrap(), b"real tokenizer");
        assert_eq!(std::fs::read(Path::new(&spec.model.path).join("config.json")).unwrap(), b"{\"real\": 1}");
        assert_eq!(std::fs::read(&spec.data.train).unwrap(), [1u8, 0, 2, 0]);
        assert!(spec.data.train.ends_with("data.bin"), "the extension stays");

        // Pinning again (a restart) sees the swap and refuses it.
        let mut again = spec.clone();
        again.model.path = r.join("model").to_string_lossy().into_owned();
        again.data.train = r.join("data.bin").to_string_lossy().into_owned();
        again.data.tokenizer = Some(r.join("tok.json").to_string_lossy().into_owned());
        let err = pin_job(&mut again, &roots, &pinned_dir.path().join("rank-1")).err().unwrap();
        assert_eq!(err.field, "data.tokenizer");
        assert!(err.message.contains("outside") && !err.message.contains("hunter2"), "{err}");

        // A FIFO in a file's place is refused, not waited on.
        std::fs::remove_file(r.join("data.bin")).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(r.join("data.bin")).status().unwrap().success());
        again.data.tokenizer = None;
        let err = pin_job(&mut again, &roots, &pinned_dir.path().join("rank-2")).err().unwrap();
        assert!(err.field == "data.train" && err.message.contains("not a regular file"), "{err}");
    }
}
