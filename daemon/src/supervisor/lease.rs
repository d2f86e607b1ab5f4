//! One daemon per database. Two daemons on one database would both take charge of the same
//! running jobs (each finding the other's workers "not its own" and restarting them) and give
//! away each other's devices. So a daemon takes the database's lease before it starts and renews
//! it while it runs; a second daemon refuses to start, naming the first.
//!
//! A holder that died without giving the lease up (SIGKILL, a crash) does not block the next
//! daemon: on the same host its process is seen to be gone, elsewhere its lease lapses after
//! `TTL` unrenewed.

use std::time::Duration;

use super::process;
use crate::error::{Error, Result};
use crate::store::{now_ms, LeaseHolder, Store};

/// How long a lease lasts unrenewed.
pub const TTL: Duration = Duration::from_secs(30);
/// How often the supervisor renews it.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// This process, as a lease holder reachable at `address`.
pub fn this_process(address: &str) -> LeaseHolder {
    let pid = std::process::id();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    LeaseHolder { host, pid, proc_start: process::proc_start(pid).unwrap_or(0), address: address.to_string() }
}

/// Takes the lease, or fails naming the daemon that holds it.
pub async fn acquire(store: &Store, me: &LeaseHolder) -> Result<()> {
    // Two daemons starting at once may both find the lease free or lapsed: the store lets one
    // take it, and the other looks again.
    for _ in 0..3 {
        let until = now_ms() + TTL.as_millis() as i64;
        let taken = match store.lease().await? {
            None => store.take_lease(me, None, until).await?,
            Some((holder, expires_ms)) => {
                let gone = holder.host == me.host && !process::is_alive(holder.pid, holder.proc_start);
                if holder == *me || gone || expires_ms < now_ms() {
                    if holder != *me {
                        tracing::info!(
                            "taking over the database's lease from pid {} on {} ({})",
                            holder.pid,
                            holder.host,
                            if gone { "its process is gone" } else { "its lease lapsed" }
                        );
                    }
                    store.take_lease(me, Some(&holder), until).await?
                } else {
                    let left = Duration::from_millis((expires_ms - now_ms()).max(0) as u64);
                    return Err(Error::Conflict(format!(
                        "another daemon supervises the jobs in this database: pid {} on {} (REST on {}), its lease renewed for \
                         another {}s; stop it first, or give this daemon a database of its own",
                        holder.pid,
                        holder.host,
                        holder.address,
                        left.as_secs()
                    )));
                }
            }
        };
        if taken {
            return Ok(());
        }
    }
    Err(Error::Conflict("another daemon is taking this database's lease at the same time".into()))
}

/// Renews the lease: an error when another daemon holds it now (this one's lapsed while the
/// store could not be reached, and the other took it), in which case this daemon must stop
/// supervising. A store that cannot be reached is only logged: the lease runs on meanwhile.
pub async fn renew(store: &Store, me: &LeaseHolder) -> Result<()> {
    match store.renew_lease(me, now_ms() + TTL.as_millis() as i64).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            let now = store.lease().await.ok().flatten().map(|(h, _)| format!("pid {} on {} (REST on {})", h.pid, h.host, h.address));
            Err(Error::Conflict(format!(
                "this daemon lost its lease on the database to another daemon ({}): it stops supervising jobs",
                now.unwrap_or_else(|| "none now".into())
            )))
        }
        Err(e) => {
            tracing::warn!("renewing the database lease: {e}");
            Ok(())
        }
    }
}
