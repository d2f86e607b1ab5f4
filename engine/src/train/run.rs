//! The run loop: a rank trains to the last step, writing checkpoints on the way and the final
//! model at the end. One loop serves every rank of `gantry train` and every worker of the daemon;
//! what differs (the metrics file, progress on a terminal, reports to the daemon, a stop it
//! asks for) is the caller's, through [`RunEvents`].

use std::path::{Path, PathBuf};

use super::{CheckpointOutcome, StepReport, Trainer};
use crate::run_dir::RunDir;

/// Runs `f` on a worker of the global pool. The kernels it calls then fork from a pool thread's
/// own deque instead of injecting from outside and sleeping on a latch, which costs a thread
/// wake-up per kernel call (hundreds per training step).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(f, || ()).0
}

/// What the caller of [`run_to_end`] does as the run goes. An error from any of them ends the
/// run with it.
pub trait RunEvents {
    type Error: From<crate::Error>;

    /// Before each step (the step about to run is `step + 1`).
    fn before_step(&mut self, step: u64) -> Result<(), Self::Error> {
        let _ = step;
        Ok(())
    }

    /// After each step, with its report.
    fn step(&mut self, report: &StepReport) -> Result<(), Self::Error>;

    /// A checkpoint was committed (the oldest beyond `keep` are deleted already).
    fn checkpoint(&mut self, step: u64, dir: &Path) -> Result<(), Self::Error> {
        let _ = (step, dir);
        Ok(())
    }
}

/// The committed checkpoints a run keeps, oldest first, and how many.
#[derive(Debug)]
pub struct KeptCheckpoints {
    pub kept: Vec<PathBuf>,
    pub keep: usize,
}

impl KeptCheckpoints {
    pub fn new(kept: Vec<PathBuf>, keep: usize) -> KeptCheckpoints {
        KeptCheckpoints { kept, keep }
    }

    /// Records a checkpoint the background writer finished: when it committed, it joins the kept
    /// ones and the oldest beyond `keep` are deleted (only now that a newer one is complete);
    /// when it failed (a full disk, say), the failure is reported and training goes on with the
    /// earlier checkpoints intact. Returns whether it committed.
    pub fn done(&mut self, o: CheckpointOutcome) -> bool {
        match o.result {
            Ok(()) => {
                tracing::info!(
                    step = o.step,
                    bytes = o.bytes,
                    write_secs = o.write_secs,
                    stall_secs = o.stall_secs,
                    "checkpoint committed"
                );
                // A run that went back to an earlier step rewrites a checkpoint it had: the
                // directory is the newest now, and must not be deleted as the oldest.
                self.kept.retain(|k| k != &o.dir);
                self.kept.push(o.dir);
                while self.kept.len() > self.keep {
                    let old = self.kept.remove(0);
                    // Cleaning up is never worth the run: a checkpoint the user already deleted
                    // (to free space, say) or one that cannot be removed now is reported, not
                    // fatal.
                    match std::fs::remove_dir_all(&old) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => eprintln!("warning: could not remove the old checkpoint {}: {e}", old.display()),
                    }
                }
                true
            }
            Err(e) => {
                let earlier = self.kept.last().map_or("none".to_string(), |k| k.display().to_string());
                eprintln!("warning: the checkpoint of step {} failed: {e}; training goes on (newest intact checkpoint: {earlier})", o.step);
                false
            }
        }
    }
}

/// Trains from the trainer's step to `steps`, starting a checkpoint every `every` steps (0:
/// never; none at the last step, which writes the final model instead), then finishes the last
/// checkpoint and writes the final model to the run directory. Every rank runs it: the
/// collectives of the steps, of sharded checkpoints and of the final gather keep them in step.
/// Returns the first and the last step's reports (none when there was no step left).
pub fn run_to_end<E: RunEvents>(
    trainer: &mut Trainer,
    run: &RunDir,
    steps: u64,
    every: u64,
    checkpoints: &mut KeptCheckpoints,
    events: &mut E,
) -> Result<Option<(StepReport, StepReport)>, E::Error> {
    let mut first_last: Option<(StepReport, StepReport)> = None;
    let mut done = |o: CheckpointOutcome, events: &mut E| -> Result<(), E::Error> {
        let (step, dir) = (o.step, o.dir.clone());
        if checkpoints.done(o) {
            events.checkpoint(step, &dir)?;
        }
        Ok(())
    };
    while trainer.step < steps {
        events.before_step(trainer.step)?;
        let r = on_pool(|| trainer.train_step())?;
        events.step(&r)?;
        if let Some(o) = trainer.poll_checkpoint()? {
            done(o, events)?;
        }
        if every > 0 && r.step % every == 0 && r.step < steps {
            if let Some(o) = trainer.start_checkpoint(&run.checkpoint(r.step))? {
                done(o, events)?;
            }
        }
        match &mut first_last {
            Some((_, last)) => *last = r,
            None => first_last = Some((r.clone(), r)),
        }
    }
    if let Some(o) = trainer.finish_checkpoint()? {
        done(o, events)?;
    }
    trainer.save_final(&run.final_model())?;
    Ok(first_last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(dir: &Path) -> CheckpointOutcome {
        std::fs::create_dir_all(dir).unwrap();
        CheckpointOutcome { step: 1, dir: dir.to_path_buf(), result: Ok(()), bytes: 0, write_secs: 0.0, stall_secs: 0.0 }
    }

    /// The oldest checkpoints go once newer ones are committed; one already gone (deleted by
    /// hand) does not end the run, a step written again is not deleted as the oldest, and a
    /// failed one leaves the kept ones alone.
    #[test]
    fn old_checkpoints_are_cleaned_up_without_failing_the_run() {
        let d = tempfile::tempdir().unwrap();
        let ck = |n: u32| d.path().join(format!("step_{n}"));
        let mut kept = KeptCheckpoints::new(vec![ck(1), ck(2)], 2);
        std::fs::create_dir_all(ck(2)).unwrap(); // step_1 was deleted by hand
        assert!(kept.done(committed(&ck(3))));
        assert_eq!(kept.kept, [ck(2), ck(3)]);
        // Step 2 written again (a run resumed from step 1): it is the newest now.
        assert!(kept.done(committed(&ck(2))));
        assert_eq!(kept.kept, [ck(3), ck(2)]);
        assert!(ck(2).is_dir() && ck(3).is_dir());
        assert!(kept.done(committed(&ck(4))));
        assert_eq!(kept.kept, [ck(2), ck(4)]);
        assert!(!ck(3).exists(), "the oldest went");
        let failed = CheckpointOutcome {
            result: Err(crate::Error::Io { path: ck(5), err: std::io::Error::other("disk full") }),
            ..committed(&ck(5))
        };
        assert!(!kept.done(failed));
        assert_eq!(kept.kept, [ck(2), ck(4)], "a failed checkpoint changes nothing");
    }
}
