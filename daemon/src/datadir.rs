//! The daemon's data directory: locked by the daemon that uses it, and bound to the database whose
//! jobs it holds.
//!
//! **One daemon per data directory.** Two daemons on one directory (with two databases) would both
//! number their jobs from 1 and write into the same `runs/job-1/`. The daemon holds an exclusive
//! lock on `DATA_DIR/daemon.lock` while it runs (released by the kernel however it ends; workers do
//! not inherit it), and a second daemon refuses to start, naming the first.
//!
//! **Runs belong to one database.** A database has an identity (a random id made with its schema),
//! and its runs live under `DATA_DIR/runs/<database id>/job-<id>/`: a data directory reused with
//! another database (the old `gantry.db` deleted to start afresh, or a move from SQLite to
//! PostgreSQL) never gives a new job 1 the directory, checkpoints or metrics of an old job 1. The
//! directory records which database it serves (`identity.json`) and the database records each data
//! directory that served it, so a change of either is seen and said at start.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::Store;

/// What the lock file says about the daemon holding it.
#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    address: String,
    since_ms: i64,
}

/// `DATA_DIR/identity.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Identity {
    data_dir_id: String,
    /// The database whose runs this directory holds now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    database_id: Option<String>,
}

/// A locked data directory.
pub struct DataDir {
    pub path: PathBuf,
    /// Held for the daemon's life: the lock is the open file.
    _lock: std::fs::File,
}

/// 8 random bytes in hex: an identity.
pub fn new_id() -> Result<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Internal(format!("reading random bytes from the OS: {e}")))?;
    Ok(hex::encode(b))
}

impl DataDir {
    /// Locks `path` for this daemon (whose REST address is `address`), or fails naming the daemon
    /// that holds it.
    pub fn lock(path: &Path, address: &str) -> Result<DataDir> {
        let lock_path = path.join("daemon.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(Error::io(&lock_path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let who = match serde_json::from_str::<Holder>(&text) {
                    Ok(h) => format!("pid {} on {} (REST on {})", h.pid, h.host, h.address),
                    Err(_) => "a daemon that has not said who it is yet".into(),
                };
                return Err(Error::Conflict(format!(
                    "another daemon uses the data directory {}: {who}; stop it first, or give this daemon a data directory of its own (--data-dir)",
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path)(e)),
        }
        let me = Holder {
            pid: std::process::id(),
            host: crate::supervisor::lease::host_name(),
            address: address.to_string(),
            since_ms: crate::store::now_ms(),
        };
        let written = (|| {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(serde_json::to_string(&me)?.as_bytes())?;
            file.sync_all()
        })();
        written.map_err(Error::io(&lock_path))?;
        Ok(DataDir { path: path.to_path_buf(), _lock: file })
    }

    /// Binds this directory and `store` to each other; returns the root of this database's runs
    /// and the database's identity.
    pub async fn bind(&self, store: &Store) -> Result<(PathBuf, String)> {
        let database_id = store.database_id().await?;
        let id_path = self.path.join("identity.json");
        let mut identity: Identity = match std::fs::read_to_string(&id_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Internal(format!("{}: {e}; move it aside to give the directory a new identity", id_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Identity { data_dir_id: new_id()?, database_id: None },
            Err(e) => return Err(Error::io(&id_path)(e)),
        };
        let runs = self.path.join("runs").join(&database_id);
        match &identity.database_id {
            Some(before) if *before != database_id => tracing::warn!(
                "the data directory {} held the runs of another database ({before}); they stay where they are, and this database's \
                 ({database_id}) runs go to {}",
                self.path.display(),
                runs.display()
            ),
            _ => {}
        }
        let others =
            store.record_data_dir(&identity.data_dir_id, &crate::supervisor::lease::host_name(), &self.path.to_string_lossy()).await?;
        for (id, host, path) in others {
            tracing::info!(
                "this database was also served from the data directory {path} on {host} (id {id}); its jobs keep the run directories recorded for them"
            );
        }
        if identity.database_id.as_deref() != Some(database_id.as_str()) {
            identity.database_id = Some(database_id.clone());
            let text = serde_json::to_string_pretty(&identity).map_err(|e| Error::Internal(e.to_string()))?;
            gantry_engine::checkpoint::write_replacing(&id_path, text.as_bytes()).map_err(|e| Error::Internal(e.to_string()))?;
        }
        std::fs::create_dir_all(&runs).map_err(Error::io(&runs))?;
        Ok((runs, database_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_data_directory_refuses_a_second_daemon_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::lock(dir.path(), "http://127.0.0.1:8080").unwrap();
        let err = DataDir::lock(dir.path(), "http://127.0.0.1:9090").err().unwrap().to_string();
        assert!(err.contains("another daemon uses the data directory"), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())) && err.contains("REST on http://127.0.0.1:8080"), "{err}");
        drop(first);
        DataDir::lock(dir.path(), "http://127.0.0.1:9090").expect("free once the first is gone");
    }

    #[tokio::test]
    async fn a_data_directory_reused_with_a_new_database_gives_it_runs_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::lock(dir.path(), "x").unwrap();
        let (one, _g1) = crate::testing::sqlite_store().await;
        let (two, _g2) = crate::testing::sqlite_store().await;
        let (runs_one, _) = data.bind(&one).await.unwrap();
        assert_eq!(data.bind(&one).await.unwrap().0, runs_one, "the same database, the same runs");
        let (runs_two, id_two) = data.bind(&two).await.unwrap();
        assert_eq!(runs_two.file_name().unwrap().to_str(), Some(id_two.as_str()));
        assert_ne!(runs_one, runs_two);
        assert!(runs_one.starts_with(dir.path().join("runs")) && runs_two.is_dir());
        let identity: Identity = serde_json::from_str(&std::fs::read_to_string(dir.path().join("identity.json")).unwrap()).unwrap();
        assert_eq!(identity.database_id, Some(two.database_id().await.unwrap()));
    }
}
