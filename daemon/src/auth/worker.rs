//! Worker secrets. Each attempt of a job gets a secret of its own, handed to its workers in their
//! environment (`GANTRY_WORKER_TOKEN`, which other users cannot read, unlike a command line), and
//! every worker call carries it. The secret is an HMAC of (database, job, attempt) under a key
//! kept in the data directory (`worker.key`, 0600), so any later daemon on that directory and
//! database can check the workers it re-adopts, and a secret for one job or attempt, or for the
//! same job number of another database, is no good for another.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// The environment variable a worker finds its secret in.
pub const SECRET_ENV: &str = "GANTRY_WORKER_TOKEN";

pub struct WorkerKeys {
    key: [u8; 32],
    database_id: String,
}

impl WorkerKeys {
    /// The key of `data_dir`, made on first use, for the jobs of the database `database_id`.
    pub fn open(data_dir: &Path, database_id: &str) -> Result<WorkerKeys> {
        let key = Self::key(data_dir)?;
        Ok(WorkerKeys { key, database_id: database_id.to_string() })
    }

    fn key(data_dir: &Path) -> Result<[u8; 32]> {
        let path = data_dir.join("worker.key");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
                    Error::Internal(format!("{} holds {} bytes, not 32: remove it to make a new key", path.display(), b.len()))
                })?;
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| Error::Internal(format!("reading random bytes from the OS: {e}")))?;
                // Written whole and then renamed, so a daemon killed meanwhile leaves no short key.
                let tmp = data_dir.join(".worker.key.tmp");
                let written = (|| {
                    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
                    f.write_all(&key)?;
                    f.sync_all()?;
                    std::fs::rename(&tmp, &path)
                })();
                written.map_err(Error::io(&path))?;
                Ok(key)
            }
            Err(e) => Err(Error::io(&path)(e)),
        }
    }

    fn mac(&self, job_id: i64, attempt: u32) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(format!("gantry worker: database {} job {job_id} attempt {attempt}", self.database_id).as_bytes());
        mac
    }

    /// The secret of a job's attempt.
    pub fn secret(&self, job_id: i64, attempt: u32) -> String {
        hex::encode(self.mac(job_id, attempt).finalize().into_bytes())
    }

    /// Whether `presented` is the secret of the job's attempt (compared in constant time).
    pub fn verify(&self, job_id: i64, attempt: u32, presented: &str) -> bool {
        let want = self.secret(job_id, attempt);
        want.len() == presented.len() && bool::from(want.as_bytes().ct_eq(presented.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_good_for_its_own_job_and_attempt_only_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let keys = WorkerKeys::open(dir.path(), "db1").unwrap();
        let s = keys.secret(7, 2);
        assert!(keys.verify(7, 2, &s));
        assert!(!keys.verify(7, 1, &s) && !keys.verify(8, 2, &s) && !keys.verify(7, 2, "") && !keys.verify(7, 2, &s[1..]));
        let again = WorkerKeys::open(dir.path(), "db1").unwrap();
        assert!(again.verify(7, 2, &s), "the key is kept in the data directory");
        let other = WorkerKeys::open(tempfile::tempdir().unwrap().path(), "db1").unwrap();
        assert!(!other.verify(7, 2, &s), "another data directory has another key");
        let other_db = WorkerKeys::open(dir.path(), "db2").unwrap();
        assert!(!other_db.verify(7, 2, &s), "job 7 of another database is another job");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.path().join("worker.key")).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
