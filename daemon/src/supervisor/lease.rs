//! One daemon per database. Two daemons on one database would both take charge of the same
//! running jobs (each finding the other's workers "not its own" and restarting them) and give
//! away each other's devices. So a daemon takes the database's lease before it starts and a task
//! of its own renews it; a second daemon refuses to start, naming the first.
//!
//! A holder that died without giving the lease up (SIGKILL, a crash) does not block the next
//! daemon: on the same machine its process is seen to be gone; from another, its lease lapses
//! after `TTL` unrenewed. A holder that is alive on the same machine is never replaced.
//!
//! The supervisor acts on jobs only while its lease is fresh (renewed within `ACT_WITHIN`), so a
//! daemon cut off from the store stops acting before its lease can lapse and be taken, and one
//! whose lease was taken stops for good.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::process;
use crate::error::{Error, Result};
use crate::store::{now_ms, LeaseHolder, Store};

/// How long a lease lasts unrenewed.
pub const TTL: Duration = Duration::from_secs(30);
/// How often it is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// The supervisor acts on jobs only while the last renewal is this recent: well inside `TTL`.
pub const ACT_WITHIN: Duration = Duration::from_secs(20);

/// This process, as a lease holder reachable at `address`.
pub fn this_process(address: &str) -> LeaseHolder {
    let pid = std::process::id();
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    LeaseHolder {
        host: host_name(),
        machine: format!("{} {pid_ns}", read("/proc/sys/kernel/random/boot_id")),
        pid,
        proc_start: process::proc_start(pid).unwrap_or(0),
        address: address.to_string(),
    }
}

/// This machine's host name, for messages.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn describe(h: &LeaseHolder) -> String {
    format!("pid {} on {} (REST on {})", h.pid, h.host, h.address)
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
                let here = holder.machine == me.machine;
                let alive = here && process::is_alive(holder.pid, holder.proc_start);
                let lapsed = expires_ms < now_ms();
                if holder == *me || (here && !alive) || (!here && lapsed) {
                    if holder != *me {
                        let why = if here { "its process is gone" } else { "its lease lapsed" };
                        tracing::info!("taking over the database's lease from {} ({why})", describe(&holder));
                    }
                    store.take_lease(me, Some((&holder, expires_ms)), until).await?
                } else {
                    let left = Duration::from_millis((expires_ms - now_ms()).max(0) as u64);
                    return Err(Error::Conflict(format!(
                        "another daemon supervises the jobs in this database: {}, its lease renewed for another {}s; stop it \
                         first, or give this daemon a database of its own",
                        describe(&holder),
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

/// The lease this daemon holds, as its keeper last saw it.
pub struct Lease {
    pub holder: LeaseHolder,
    renewed: Mutex<Instant>,
    lost: Mutex<Option<String>>,
}

impl Lease {
    /// Just acquired.
    pub fn new(holder: LeaseHolder) -> Lease {
        Lease { holder, renewed: Mutex::new(Instant::now()), lost: Mutex::new(None) }
    }

    /// Why the lease is no longer this daemon's, if it is not.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().expect("lease").clone()
    }

    /// How long ago the lease was last renewed.
    pub fn since_renewed(&self) -> Duration {
        self.renewed.lock().expect("lease").elapsed()
    }

    /// Renews the lease every `RENEW_EVERY` until `stop`, or until it is found taken by another
    /// daemon (this one's lapsed while the store could not be reached). A store that cannot be
    /// reached is logged; the supervisor stops acting once the last renewal is `ACT_WITHIN` old.
    pub async fn keep(&self, store: Store, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RENEW_EVERY) => {}
                _ = stop.changed() => return,
            }
            match store.renew_lease(&self.holder, now_ms() + TTL.as_millis() as i64).await {
                Ok(true) => *self.renewed.lock().expect("lease") = Instant::now(),
                Ok(false) => {
                    let now = store.lease().await.ok().flatten().map(|(h, _)| describe(&h));
                    let why = format!(
                        "this daemon lost its lease on the database to another daemon ({}): it stops supervising jobs",
                        now.unwrap_or_else(|| "none now".into())
                    );
                    tracing::error!("{why}");
                    *self.lost.lock().expect("lease") = Some(why);
                    return;
                }
                Err(e) => tracing::warn!("renewing the database lease: {e}"),
            }
        }
    }
}
