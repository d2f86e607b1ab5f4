//! The daemon's lease on the database: one row naming the daemon that supervises the jobs in
//! it, and until when (see `supervisor::lease` for how it is taken and kept).

use sqlx::Row;

use super::Store;
use crate::error::Result;

/// A daemon process: where it runs and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The host name, for messages.
    pub host: String,
    /// The boot id and PID namespace: another process with the same `machine` can look `pid` up
    /// (a host name can be shared by containers with PID namespaces of their own).
    pub machine: String,
    pub pid: u32,
    /// The process's start time (clock ticks since boot): a pid reused by another process is not
    /// the holder.
    pub proc_start: u64,
    /// Its REST address, to name it in errors.
    pub address: String,
}

const COLUMNS: &str = "host, machine, pid, proc_start, address";
/// The holder's identity, for the conditional updates (placeholders `$N..$N+3`).
fn is_holder(first: usize) -> String {
    format!("id = 1 AND machine = ${first} AND pid = ${} AND proc_start = ${}", first + 1, first + 2)
}

impl Store {
    /// The lease's holder and when it runs out (Unix ms), if anyone holds it.
    pub async fn lease(&self) -> Result<Option<(LeaseHolder, i64)>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS}, expires_ms FROM daemon_lease WHERE id = 1")).fetch_optional(&self.pool).await?;
        row.map(|r| {
            Ok((
                LeaseHolder {
                    host: r.try_get("host")?,
                    machine: r.try_get("machine")?,
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
    /// `replacing` = (holder, its expiry as read), only if neither changed since (a holder that
    /// renewed meanwhile keeps it). False when another daemon got there first.
    pub async fn take_lease(&self, me: &LeaseHolder, replacing: Option<(&LeaseHolder, i64)>, expires_ms: i64) -> Result<bool> {
        let sql = match replacing {
            None => format!(
                "INSERT INTO daemon_lease (id, {COLUMNS}, expires_ms) VALUES (1, $1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING"
            ),
            Some(_) => format!(
                "UPDATE daemon_lease SET host = $1, machine = $2, pid = $3, proc_start = $4, address = $5, expires_ms = $6 \
                 WHERE {} AND expires_ms = $10",
                is_holder(7)
            ),
        };
        let mut q = sqlx::query(&sql)
            .bind(&me.host)
            .bind(&me.machine)
            .bind(i64::from(me.pid))
            .bind(me.proc_start as i64)
            .bind(&me.address)
            .bind(expires_ms);
        if let Some((old, old_expires)) = replacing {
            q = q.bind(&old.machine).bind(i64::from(old.pid)).bind(old.proc_start as i64).bind(old_expires);
        }
        Ok(q.execute(&self.pool).await?.rows_affected() == 1)
    }

    /// Extends the lease `me` holds; false if it is no longer `me`'s.
    pub async fn renew_lease(&self, me: &LeaseHolder, expires_ms: i64) -> Result<bool> {
        let done = sqlx::query(&format!("UPDATE daemon_lease SET expires_ms = $1 WHERE {}", is_holder(2)))
            .bind(expires_ms)
            .bind(&me.machine)
            .bind(i64::from(me.pid))
            .bind(me.proc_start as i64)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up (at shutdown), if `me` still holds it.
    pub async fn release_lease(&self, me: &LeaseHolder) -> Result<()> {
        sqlx::query(&format!("DELETE FROM daemon_lease WHERE {}", is_holder(1)))
            .bind(&me.machine)
            .bind(i64::from(me.pid))
            .bind(me.proc_start as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
