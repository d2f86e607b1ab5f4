//! Worker processes: starting them so they outlive the daemon, telling whether a PID is still the
//! process we started, and stopping them.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Everything a rank needs on its command line.
pub struct Launch<'a> {
    pub exe: &'a Path,
    pub job_id: i64,
    pub rank: u32,
    pub world_size: u32,
    pub attempt: u32,
    pub rendezvous: &'a str,
    pub daemon: &'a str,
    pub run_dir: &'a Path,
    pub resume_from: Option<&'a Path>,
    pub log: &'a Path,
    /// The device slot this rank was placed on (`cpu:3`, `cuda:1`).
    pub device: &'a str,
    /// The job attempt's worker secret (handed over in the environment, which other users cannot
    /// read, unlike the command line).
    pub secret: &'a str,
    /// Where the job's files must lie, and what they may never be (the worker checks again).
    pub read_roots: &'a crate::roots::ReadRoots,
}

/// How to start one rank: the binary, its arguments, and the log its output is appended to.
pub struct RankCommand<'a> {
    pub exe: &'a Path,
    pub args: Vec<std::ffi::OsString>,
    pub log: &'a Path,
    /// Put the rank in a process group of its own, so that it outlives whoever started it (the
    /// daemon's workers); `false` keeps it in the launcher's group, so a Ctrl-C reaches every rank
    /// (`gantry train`'s local ranks).
    pub detach: bool,
    /// Environment variables to set for it.
    pub env: Vec<(&'a str, &'a str)>,
}

/// Starts one rank: stdin closed, stdout and stderr appended to its log. The daemon's supervisor
/// and `gantry train`'s local launcher both start ranks through here.
pub fn spawn_rank(c: &RankCommand<'_>) -> Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(c.log).map_err(Error::io(c.log))?;
    let err = log.try_clone().map_err(Error::io(c.log))?;
    let mut cmd = Command::new(c.exe);
    cmd.args(&c.args)
        .env("GANTRY_LOG", std::env::var("GANTRY_LOG").unwrap_or_else(|_| "warn".into()))
        .envs(c.env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    if c.detach {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    } else {
        // A rank of `gantry train` dies with its launcher (rank 0), however that ends (a panic,
        // SIGKILL): a rank waiting outside a collective, or stopped, would otherwise stay.
        // A launcher that died before the call would leave the child unwatched: then the parent
        // is no longer the launcher, and the start fails.
        let launcher = nix::unistd::getpid();
        // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls
        // are allowed: prctl and getppid are plain system calls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                if nix::unistd::getppid() != launcher {
                    return Err(std::io::Error::other("the launcher ended while this rank started"));
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(Error::io(c.exe))
}

/// Starts one of a job's workers with its output appended to its log file. The worker gets a
/// process group of its own, so signals meant for the daemon (a Ctrl-C, a SIGTERM to the group)
/// do not reach it and a daemon restart leaves training running.
pub fn spawn(l: &Launch<'_>) -> Result<Child> {
    let mut args: Vec<std::ffi::OsString> =
        ["worker", "--job-id", &l.job_id.to_string(), "--rank", &l.rank.to_string(), "--world-size", &l.world_size.to_string()]
            .iter()
            .map(Into::into)
            .collect();
    for (k, v) in [
        ("--attempt", l.attempt.to_string()),
        ("--rendezvous", l.rendezvous.to_string()),
        ("--daemon", l.daemon.to_string()),
        ("--device", l.device.to_string()),
    ] {
        args.push(k.into());
        args.push(v.into());
    }
    args.push("--run-dir".into());
    args.push(l.run_dir.into());
    if let Some(r) = l.resume_from {
        args.push("--resume-from".into());
        args.push(r.into());
    }
    for root in l.read_roots.dirs() {
        args.push("--read-root".into());
        args.push(root.into());
    }
    for denied in l.read_roots.denied() {
        args.push("--deny-read".into());
        args.push(denied.into());
    }
    let env = vec![(crate::auth::worker::SECRET_ENV, l.secret)];
    spawn_rank(&RankCommand { exe: l.exe, args, log: l.log, detach: true, env })
}

/// The start time of a process, in clock ticks since boot (field 22 of `/proc/PID/stat`), or
/// `None` if there is no such process or it is a zombie.
pub fn proc_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start`.
pub fn is_alive(pid: u32, start: u64) -> bool {
    proc_start(pid) == Some(start)
}

/// Sends `signal` to the worker's process group (the worker and anything it started).
pub fn signal(pid: u32, start: u64, signal: Signal) {
    if is_alive(pid, start) {
        let _ = killpg(Pid::from_raw(pid as i32), signal);
    }
}

/// A port that was free a moment ago, for the ranks' rendezvous.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(Error::io("127.0.0.1:0"))?;
    Ok(l.local_addr().map_err(Error::io("127.0.0.1:0"))?.port())
}

/// Whether a process that ended this way may have said why in its output: it aborted (a failed
/// allocation prints "memory allocation of N bytes failed" first), crashed, or exited with an
/// error; not when it was killed from outside (SIGKILL, SIGTERM).
pub fn said_why(s: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    match s.signal() {
        Some(n) => [Signal::SIGABRT, Signal::SIGSEGV, Signal::SIGBUS, Signal::SIGILL, Signal::SIGFPE].iter().any(|sig| *sig as i32 == n),
        None => !s.success(),
    }
}

/// "signal 9 (SIGKILL)" for a process killed by a signal, else the status as the OS says it.
pub fn describe_status(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match s.signal() {
        Some(n) => match Signal::try_from(n) {
            Ok(sig) => format!("signal {n} ({sig})"),
            Err(_) => format!("signal {n}"),
        },
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_recognised_by_pid_and_start_time() {
        let me = std::process::id();
        let start = proc_start(me).expect("this process exists");
        assert!(is_alive(me, start));
        assert!(!is_alive(me, start + 1), "same PID, other start time: a different process");
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(proc_start(pid), None, "a reaped child is gone");
    }
}
