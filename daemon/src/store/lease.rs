//! The daemon's lease on the database: one row naming the daemon that supervises the jobs in
//! it, and until when (see `supervisor::lease` for how it is taken and kept).

use sqlx::Row;

use super::Store;
use crate::error::Result;

/// A daemon process: where it runs and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseHolder {
    pub host: String,
    pub pid: u32,
    /// The process's start time (clock ticks since boot): a pid reused by another process is not
    /// the holder.
    pub proc_start: u64,
    /// Its REST address, to name it in errors.
    pub address: String,
}

impl Store {
    /// The lease's holder and when it runs out (Unix ms), if anyone holds it.
    pub async fn lease(&self) -> Result<Option<(LeaseHolder, i64)>> {
        let row = sqlx::query("SELECT host, pid, proc_start, address, expires_ms FROM daemon_lease WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok((
                LeaseHolder {
                    host: r.try_get("host")?,
                    pid: r.try_get::<i64, _>("pid")? as u32,
                    proc_start: r.try_get::<i64, _>("proc_start")? as u64,
                    address: r.try_get("address")?,
                },
                r.try_get("expires_ms")?,
            ))
        })
        .transpose()
    }

    /// Takes the lease until `expires_ms`: when nobody holds it (`replacing` None), or from
    /// `replacing` (a dead or lapsed holder). False when another daemon got there first.
    pub async fn take_lease(&self, me: &LeaseHolder, replacing: Option<&LeaseHolder>, expires_ms: i64) -> Result<bool> {
        let done = match replacing {
            None => {
                sqlx::query(
                    "INSERT INTO daemon_lease (id, host, pid, proc_start, address, expires_ms) VALUES (1, $1, $2, $3, $4, $5) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(&me.host)
                .bind(i64::from(me.pid))
                .bind(me.proc_start as i64)
                .bind(&me.address)
                .bind(expires_ms)
                .execute(&self.pool)
                .await?
            }
            Some(old) => {
                sqlx::query(
                    "UPDATE daemon_lease SET host = $1, pid = $2, proc_start = $3, address = $4, expires_ms = $5 \
                     WHERE id = 1 AND host = $6 AND pid = $7 AND proc_start = $8",
                )
                .bind(&me.host)
                .bind(i64::from(me.pid))
                .bind(me.proc_start as i64)
                .bind(&me.address)
                .bind(expires_ms)
                .bind(&old.host)
                .bind(i64::from(old.pid))
                .bind(old.proc_start as i64)
                .execute(&self.pool)
                .await?
            }
        };
        Ok(done.rows_affected() == 1)
    }

    /// Extends the lease `me` holds; false if it is no longer `me`'s.
    pub async fn renew_lease(&self, me: &LeaseHolder, expires_ms: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE daemon_lease SET expires_ms = $1 WHERE id = 1 AND host = $2 AND pid = $3 AND proc_start = $4")
            .bind(expires_ms)
            .bind(&me.host)
            .bind(i64::from(me.pid))
            .bind(me.proc_start as i64)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up (at shutdown), if `me` still holds it.
    pub async fn release_lease(&self, me: &LeaseHolder) -> Result<()> {
        sqlx::query("DELETE FROM daemon_lease WHERE id = 1 AND host = $1 AND pid = $2 AND proc_start = $3")
            .bind(&me.host)
            .bind(i64::from(me.pid))
            .bind(me.proc_start as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
