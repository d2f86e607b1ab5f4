use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use gantry_api::JobSpec;
use gantry_engine::comm::Comm;
use gantry_engine::run_dir::RunDir;
use gantry_engine::train::{run_to_end, KeptCheckpoints, RunEvents, StepReport, Trainer};

use crate::cli::TrainArgs;
use crate::progress;
use crate::supervisor::process;

/// Trains on one rank, or on `resources.devices` ranks: this process is rank 0 and starts the
/// others as child processes of the same binary, through the supervisor's `spawn_rank` (as the
/// daemon starts its workers), which meet it at a rendezvous port.
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    // A new run reads its spec from the file given; a resumed one from its run directory, where
    // the spec was stored with absolute paths.
    let (spec_path, run_dir) = match (&a.resume, &a.spec) {
        (Some(dir), _) => (RunDir::new(dir).spec(), dir.clone()),
        (None, Some(spec)) => (spec.clone(), a.run_dir.clone().unwrap_or_else(|| default_run_dir(spec))),
        (None, None) => bail!("give a spec, or --resume RUN_DIR"),
    };
    let text = std::fs::read_to_string(&spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let spec = JobSpec::from_toml(&text, &a.set).map_err(|e| anyhow::anyhow!("{}: {e}", spec_path.display()))?;
    if a.resume.is_some() && !a.set.is_empty() {
        warn_if_data_order_changes(&text, &spec);
    }
    let base = spec_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let spec = absolute_paths(spec, &base)?;
    // A layout the trainer cannot run is refused before any rank starts.
    let config = crate::engine_config::train_config(&spec);
    gantry_engine::train::check_layout(&config)?;
    let model = gantry_engine::models::ModelConfig::from_dir(&config.model.path)?;
    gantry_engine::train::check_model_layout(&config, &model)?;
    let world = spec.resources.devices.count();
    if world == 1 {
        return train_rank(&a, spec, run_dir, None);
    }
    if let (Some(rank), Some(rv)) = (a.rank, &a.rendezvous) {
        let comm = Comm::connect(rank, world, rv, super::comm_timeout())?;
        return train_rank(&a, spec, run_dir, Some(comm));
    }
    let rv = format!("127.0.0.1:{}", process::free_port()?);
    if a.resume.is_none() {
        keep_earlier_run(&run_dir)?;
    }
    let run = RunDir::new(&run_dir);
    let logs = run.logs();
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let exe = std::env::current_exe()?;
    let mut children: Vec<(usize, std::process::Child)> = Vec::new();
    for rank in 1..world {
        let log_path = run.log(rank as u32);
        let mut args: Vec<OsString> = vec!["train".into()];
        match &a.resume {
            Some(dir) => args.extend(["--resume".into(), dir.into()]),
            None => args.extend([spec_path.clone().into(), "--run-dir".into(), run_dir.clone().into()]),
        };
        args.extend(["--no-progress", "--rank", &rank.to_string(), "--rendezvous", &rv].map(OsString::from));
        for s in &a.set {
            args.extend(["--set".into(), s.into()]);
        }
        // The daemon's own way of starting a rank; kept in this process group, so a Ctrl-C here
        // stops every rank.
        let child = match process::spawn_rank(&process::RankCommand { exe: &exe, args, log: &log_path, detach: false, env: Vec::new() }) {
            Ok(c) => c,
            Err(e) => {
                // The ranks already started would otherwise wait for rank 0 until the rendezvous
                // times out.
                for (_, mut c) in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e.into());
            }
        };
        children.push((rank, child));
    }
    eprintln!("gantry train: {world} ranks (rank 0 here, the others' logs in {})", logs.display());
    let result = Comm::connect(0, world, &rv, super::comm_timeout())
        .map_err(anyhow::Error::from)
        .and_then(|c| train_rank(&a, spec, run_dir, Some(c)));
    // A rank that died on its own (killed, crashed) is the cause; rank 0 and the others then fail
    // naming whichever neighbour they were talking to. So the ranks that ended on their own are
    // told from those stopped here, and those that died by a signal are named first. A killed
    // process closes its connections a moment before it can be seen to have ended (while its
    // threads exit), so the others get up to 2 s to end by themselves before they are stopped
    // (they end within milliseconds: their connections to rank 0 are closed).
    let mut ended: Vec<bool> = children.iter_mut().map(|(_, c)| matches!(c.try_wait(), Ok(Some(_)))).collect();
    if result.is_err() {
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        while ended.contains(&false) && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            for (e, (_, c)) in ended.iter_mut().zip(children.iter_mut()) {
                *e = *e || matches!(c.try_wait(), Ok(Some(_)));
            }
        }
    }
    let mut lost = Vec::new();
    let mut failed = Vec::new();
    for ((rank, mut child), ended_first) in children.into_iter().zip(ended) {
        if result.is_err() && !ended_first {
            let _ = child.kill();
        }
        let log = logs.join(format!("rank-{rank}.log"));
        match child.wait() {
            Ok(s) if s.success() => {}
            Ok(s) if ended_first && s.signal().is_some() => {
                lost.push(format!("rank {rank} was lost: {} (see {})", process::describe_status(s), log.display()))
            }
            // Stopped here because rank 0 had already failed: not a cause.
            Ok(s) if !ended_first && result.is_err() && s.signal() == Some(nix::sys::signal::Signal::SIGKILL as i32) => {}
            Ok(s) => failed.push(format!("rank {rank} {} (see {})", process::describe_status(s), log.display())),
            Err(e) => failed.push(format!("rank {rank}: {e}")),
        }
    }
    if let Err(e) = result {
        let mut causes = lost;
        causes.push(format!("rank 0: {e:#}"));
        causes.extend(failed);
        bail!("{}", causes.join("; "));
    }
    lost.extend(failed);
    if !lost.is_empty() {
        bail!("{}", lost.join("; "));
    }
    Ok(())
}

fn train_rank(a: &TrainArgs, spec: JobSpec, run_dir: PathBuf, comm: Option<Comm>) -> anyhow::Result<()> {
    let workers = spec.resources.devices.count();
    let per_worker = spec.resources.threads.or_else(|| std::thread::available_parallelism().ok().map(|n| (n.get() / workers).max(1)));
    let threads = super::set_threads(per_worker)?;
    let started = Instant::now();
    // Everything that can reject the job (model, weights, data) is checked before the run
    // directory is created, so a bad spec leaves nothing behind.
    let mut trainer = Trainer::with_comm(crate::engine_config::train_config(&spec), comm)?;
    let saved = if a.resume.is_some() { super::resume_newest(&mut trainer, &run_dir)? } else { Vec::new() };
    if !trainer.is_lead() {
        return follow_rank(&mut trainer, &run_dir, &spec);
    }
    // (A job on several ranks did this before it started them: their logs go in the run dir.)
    if a.resume.is_none() && workers == 1 {
        keep_earlier_run(&run_dir)?;
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let run = RunDir::new(&run_dir);
    gantry_engine::checkpoint::write_replacing(&run.spec(), spec.to_toml()?.as_bytes()).context("writing the run's spec")?;
    let steps = spec.train.steps;
    eprintln!(
        "gantry train: {} parameters, {} tokens of data, {steps} steps × {} sequences × {} tokens, {threads} threads → {}",
        trainer.model.table.len(),
        trainer.tokens_in_data(),
        spec.train.global_batch_size,
        spec.data.seq_len,
        run_dir.display()
    );
    let interactive = progress::interactive() && !a.no_progress;
    let mut lead = Lead {
        metrics: super::open_metrics(&run.metrics(), trainer.step)?,
        progress: progress::bar(steps, "step {pos}/{len} [{bar:30}] {msg} ETA {eta}", interactive),
        interactive,
        steps,
        started,
    };
    let mut kept = KeptCheckpoints::new(saved, spec.checkpoint.keep);
    let ends = run_to_end(&mut trainer, &run, steps, spec.checkpoint.every, &mut kept, &mut lead);
    lead.progress.finish_and_clear();
    let final_dir = run.final_model();
    if let Some((f, l)) = ends? {
        eprintln!(
            "done in {:.1}s: loss {:.4} → {:.4} ({:+.1}%), model in {}",
            started.elapsed().as_secs_f64(),
            f.loss,
            l.loss,
            100.0 * (l.loss - f.loss) / f.loss,
            final_dir.display()
        );
        println!(
            "{}",
            serde_json::json!({"run_dir": run_dir, "steps": l.step, "loss_first": f.loss, "loss_last": l.loss, "final": final_dir})
        );
    }
    Ok(())
}

/// Relative paths of a spec, resolved from `base` (the spec file's directory), made absolute: the
/// run directory keeps the spec, and a resumed run reads it from there.
fn absolute_paths(mut spec: JobSpec, base: &Path) -> anyhow::Result<JobSpec> {
    let base = if base.as_os_str().is_empty() { Path::new(".") } else { base };
    let base = base.canonicalize().with_context(|| format!("{}", base.display()))?;
    let abs = |p: &str| if Path::new(p).is_absolute() { p.to_string() } else { base.join(p).to_string_lossy().into_owned() };
    spec.model.path = abs(&spec.model.path);
    spec.data.train = abs(&spec.data.train);
    spec.data.tokenizer = spec.data.tokenizer.as_deref().map(abs);
    Ok(spec)
}

/// Rank 0 of `gantry train`: the run's metrics file, and progress on the terminal (a bar) or
/// in the log (a line every ten steps).
struct Lead {
    metrics: std::fs::File,
    progress: indicatif::ProgressBar,
    interactive: bool,
    steps: u64,
    started: Instant,
}

impl RunEvents for Lead {
    type Error = anyhow::Error;

    fn step(&mut self, r: &StepReport) -> anyhow::Result<()> {
        let record = crate::step_record::step_metrics(0, r);
        writeln!(self.metrics, "{}", serde_json::to_string(&record)?).context("writing metrics.jsonl")?;
        let msg = crate::step_record::summary(r);
        let steps = self.steps;
        if self.interactive {
            self.progress.set_message(msg);
            self.progress.set_position(r.step);
        } else if crate::step_record::logged(r, steps) {
            let eta = self.started.elapsed().as_secs_f64() / r.step as f64 * (steps - r.step) as f64;
            eprintln!("step {}/{steps} {msg} ETA {eta:.0}s", r.step);
        }
        Ok(())
    }
}

/// A rank other than 0 of `gantry train`: trains in step with rank 0 and takes part in its
/// checkpoints and final gather, writing nothing itself.
struct Follower;

impl RunEvents for Follower {
    type Error = anyhow::Error;

    fn step(&mut self, _: &StepReport) -> anyhow::Result<()> {
        Ok(())
    }
}

fn follow_rank(trainer: &mut Trainer, run_dir: &Path, spec: &JobSpec) -> anyhow::Result<()> {
    let mut kept = KeptCheckpoints::new(Vec::new(), spec.checkpoint.keep);
    run_to_end(trainer, &RunDir::new(run_dir), spec.train.steps, spec.checkpoint.every, &mut kept, &mut Follower)?;
    Ok(())
}

/// A resumed run takes its data from where the step says; changing what maps steps to windows
/// (seed, batch, sequence length, data) makes it repeat some windows of the epoch and skip others.
fn warn_if_data_order_changes(stored: &str, spec: &JobSpec) {
    let Ok(was) = JobSpec::from_toml(stored, &[]) else { return };
    let changed: Vec<&str> = [
        ("train.seed", was.train.seed != spec.train.seed),
        ("train.global_batch_size", was.train.global_batch_size != spec.train.global_batch_size),
        ("data.seq_len", was.data.seq_len != spec.data.seq_len),
        ("data.train", was.data.train != spec.data.train),
    ]
    .into_iter()
    .filter_map(|(k, c)| c.then_some(k))
    .collect();
    if !changed.is_empty() {
        eprintln!(
            "warning: resuming with a different {}: the data order from here on is not the original run's (some windows of this epoch will repeat, others be skipped)",
            changed.join(", ")
        );
    }
}

/// A new run into a directory that holds an earlier run would mix the two (the earlier run's
/// later checkpoints and final model would outlive the new run's, and a later `--resume` or
/// `export` would pick them): the earlier run is moved aside to `DIR.N`, and nothing is lost.
fn keep_earlier_run(run_dir: &Path) -> anyhow::Result<()> {
    if !RunDir::new(run_dir).holds_a_run() {
        return Ok(());
    }
    let name = run_dir.file_name().and_then(|n| n.to_str()).unwrap_or("run");
    let aside = (1..).map(|n| run_dir.with_file_name(format!("{name}.{n}"))).find(|p| !p.exists()).expect("a free name");
    std::fs::rename(run_dir, &aside).with_context(|| format!("moving the earlier run in {} aside", run_dir.display()))?;
    eprintln!("gantry train: {} held an earlier run; moved it to {} (to continue a run, use --resume)", run_dir.display(), aside.display());
    Ok(())
}

fn default_run_dir(spec: &Path) -> PathBuf {
    let stem = spec.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("{stem}-{secs}"))
}
