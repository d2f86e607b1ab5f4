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

pub use gantry_engine::train::on_pool;

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
