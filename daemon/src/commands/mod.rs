//! One module per subcommand.

mod bench;
mod bench_checkpoint;
mod bench_comm;
mod client;
mod daemon;
mod devices;
mod eval;
mod export;
mod prepare;
mod train;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Prepare(a) => prepare::run(a),
        Command::Export(a) => export::run(a),
        Command::Daemon(a) => daemon::run(a),
        Command::Worker(a) => crate::worker::run(a),
        Command::Submit(a) => client::submit(a),
        Command::Jobs(a) => client::jobs(a),
        Command::Status(a) => client::status(a),
        Command::Logs(a) => client::logs(a),
        Command::Cancel(a) => client::cancel(a),
        Command::Delete(a) => client::delete(a),
        Command::Token(a) => token(a),
        Command::Devices(a) => devices::devices(a),
        Command::Kernels(a) => devices::kernels(a),
    }
}

/// `gantry token new`.
fn token(a: crate::cli::TokenArgs) -> anyhow::Result<()> {
    match a.command {
        crate::cli::TokenCommand::New { user, role, append } => {
            let (secret, entry) = crate::auth::new_token(&user, role, append.as_deref())?;
            println!("{secret}");
            println!();
            print!("{entry}");
            match append {
                Some(f) => {
                    eprintln!("the entry was appended to {}; give {user} the secret (first line): it is stored nowhere", f.display())
                }
                None => eprintln!("add the entry to the daemon's tokens file; give {user} the secret (first line): it is stored nowhere"),
            }
            Ok(())
        }
    }
}

/// Sizes the global thread pool once (the GEMMs and every kernel share it).
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    Ok(n)
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Runs `f` on a worker of the global pool. The kernels it calls then fork from a pool thread's
/// own deque instead of injecting from outside and sleeping on a latch, which costs a thread
/// wake-up per kernel call (hundreds per training step).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(f, || ()).0
}

/// How long a rank waits on a silent peer in a collective: `GANTRY_COMM_TIMEOUT` seconds, 120 by
/// default (a dead peer is noticed at once: its connections close).
pub fn comm_timeout() -> std::time::Duration {
    let secs = std::env::var("GANTRY_COMM_TIMEOUT").ok().and_then(|v| v.parse::<u64>().ok()).filter(|s| *s > 0).unwrap_or(120);
    std::time::Duration::from_secs(secs)
}

/// Loads the newest checkpoint of `run_dir` that passes its checksums (a damaged one is reported
/// and the one before it used); returns the checkpoints kept, oldest first.
pub fn resume_newest(trainer: &mut gantry_engine::train::Trainer, run_dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let dir = gantry_engine::run_dir::RunDir::new(run_dir).checkpoints();
    if !dir.is_dir() {
        anyhow::bail!("{} has no checkpoints to resume from", run_dir.display());
    }
    let all = gantry_engine::checkpoint::committed_checkpoints(run_dir);
    for (i, ck) in all.iter().enumerate().rev() {
        match trainer.resume(ck) {
            Ok(()) => {
                eprintln!("resuming from {} (step {})", ck.display(), trainer.step);
                trainer.check_ranks_resumed_alike()?;
                return Ok(all[..=i].to_vec());
            }
            Err(e) => eprintln!("warning: skipping checkpoint {}: {e}", ck.display()),
        }
    }
    anyhow::bail!(
        "no checkpoint in {} can be resumed: each was damaged or written for another model (see the warnings above)",
        dir.display()
    )
}

/// Records a checkpoint the background writer finished: when it committed, it joins `kept` and
/// the oldest beyond `keep` are deleted (only now that a newer one is complete); when it failed
/// (a full disk, say), the failure is reported and training goes on with the earlier checkpoints
/// intact. Returns whether it committed.
pub fn checkpoint_done(
    o: gantry_engine::train::CheckpointOutcome,
    kept: &mut Vec<std::path::PathBuf>,
    keep: usize,
) -> anyhow::Result<bool> {
    match o.result {
        Ok(()) => {
            tracing::info!(step = o.step, bytes = o.bytes, write_secs = o.write_secs, stall_secs = o.stall_secs, "checkpoint committed");
            // A run that went back to an earlier step rewrites a checkpoint it had: the directory
            // is the newest now, and must not be deleted as the oldest.
            kept.retain(|k| k != &o.dir);
            kept.push(o.dir);
            while kept.len() > keep {
                let old = kept.remove(0);
                // Cleaning up is never worth the run: a checkpoint the user already deleted (to
                // free space, say) or one that cannot be removed now is reported, not fatal.
                match std::fs::remove_dir_all(&old) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => eprintln!("warning: could not remove the old checkpoint {}: {e}", old.display()),
                }
            }
            Ok(true)
        }
        Err(e) => {
            let earlier = kept.last().map_or("none".to_string(), |k| k.display().to_string());
            eprintln!("warning: the checkpoint of step {} failed: {e}; training goes on (newest intact checkpoint: {earlier})", o.step);
            Ok(false)
        }
    }
}

/// The run's metrics file, keeping the lines of the steps up to `step` (a resumed run repeats
/// the later ones).
pub fn open_metrics(path: &std::path::Path, step: u64) -> anyhow::Result<std::fs::File> {
    let kept: String = match std::fs::read_to_string(path) {
        Ok(text) if step > 0 => text
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step))
            .map(|l| format!("{l}\n"))
            .collect(),
        _ => String::new(),
    };
    use anyhow::Context;
    gantry_engine::checkpoint::write_replacing(path, kept.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("opening {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_engine::train::CheckpointOutcome;

    fn committed(dir: &std::path::Path) -> CheckpointOutcome {
        std::fs::create_dir_all(dir).unwrap();
        CheckpointOutcome { step: 1, dir: dir.to_path_buf(), result: Ok(()), bytes: 0, write_secs: 0.0, stall_secs: 0.0 }
    }

    /// The oldest checkpoints go once newer ones are committed; one already gone (deleted by
    /// hand) does not end the run, and a step written again is not deleted as the oldest.
    #[test]
    fn old_checkpoints_are_cleaned_up_without_failing_the_run() {
        let d = tempfile::tempdir().unwrap();
        let ck = |n: u32| d.path().join(format!("step_{n}"));
        let mut kept = vec![ck(1), ck(2)];
        std::fs::create_dir_all(ck(2)).unwrap(); // step_1 was deleted by hand
        assert!(checkpoint_done(committed(&ck(3)), &mut kept, 2).unwrap());
        assert_eq!(kept, [ck(2), ck(3)]);
        // Step 2 written again (a run resumed from step 1): it is the newest now.
        assert!(checkpoint_done(committed(&ck(2)), &mut kept, 2).unwrap());
        assert_eq!(kept, [ck(3), ck(2)]);
        assert!(ck(2).is_dir() && ck(3).is_dir());
        assert!(checkpoint_done(committed(&ck(4)), &mut kept, 2).unwrap());
        assert_eq!(kept, [ck(2), ck(4)]);
        assert!(!ck(3).exists(), "the oldest went");
    }
}
