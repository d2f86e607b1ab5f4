//! Which waiting job gets which device slots: a pure function of the queue and the free slots.
//!
//! Jobs are placed first in, first out, all of a job's devices at once (a gang) or none. The
//! first job that does not fit blocks those behind it, so a large job is never starved by a
//! stream of small ones; every waiting job is told why it waits.

use std::collections::BTreeMap;

use gantry_api::Devices;

use crate::config::{device_kind, fits_node, slot_kind};

/// A job waiting for devices, in queue order.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub id: i64,
    pub devices: Devices,
    /// A restarting job that must wait this long yet before its next attempt (see
    /// `supervisor::restart_pause`). It keeps its place: the jobs behind it wait too, or they
    /// would take its devices and it could wait behind them for their whole run.
    pub paused_for: Option<std::time::Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start the job on these slots.
    Place { id: i64, slots: Vec<String> },
    /// The job stays queued, for this reason.
    Wait { id: i64, reason: String },
    /// The job can never run on this node.
    Reject { id: i64, reason: String },
}

/// The busy slots: those of the jobs live here, and those the store records for every job that is
/// scheduled or running. The two differ when a job could not be taken charge of (re-adopting it
/// failed on a store error): its workers still run on its slots, which must not be given away.
pub fn occupied<'a>(live: BTreeMap<String, i64>, stored: impl IntoIterator<Item = (i64, &'a [String])>) -> BTreeMap<String, i64> {
    let mut held = live;
    for (id, slots) in stored {
        for s in slots {
            held.entry(s.clone()).or_insert(id);
        }
    }
    held
}

/// `held` maps each busy slot to the job holding it.
pub fn plan(queue: &[Waiting], slots: &[String], held: &BTreeMap<String, i64>) -> Vec<Decision> {
    let mut free: Vec<&String> = slots.iter().filter(|s| !held.contains_key(*s)).collect();
    let mut blocker: Option<i64> = None;
    let mut out = Vec::new();
    for w in queue {
        if let Err(reason) = fits_node(&w.devices, slots) {
            out.push(Decision::Reject { id: w.id, reason });
            continue;
        }
        let kind = device_kind(&w.devices);
        let need = w.devices.count();
        let total = slots.iter().filter(|s| slot_kind(s) == kind).count();
        if let Some(b) = blocker {
            out.push(Decision::Wait { id: w.id, reason: format!("waiting behind job {b} (jobs start first in, first out)") });
            continue;
        }
        if let Some(left) = w.paused_for {
            out.push(Decision::Wait { id: w.id, reason: format!("restarting in {:.0}s", left.as_secs_f64().ceil()) });
            blocker = Some(w.id);
            continue;
        }
        let fitting: Vec<&String> = free.iter().copied().filter(|s| slot_kind(s) == kind).take(need).collect();
        if fitting.len() == need {
            free.retain(|s| !fitting.contains(s));
            out.push(Decision::Place { id: w.id, slots: fitting.into_iter().cloned().collect() });
        } else {
            let mut holders: Vec<i64> = held.iter().filter(|(s, _)| slot_kind(s) == kind).map(|(_, j)| *j).collect();
            holders.sort_unstable();
            holders.dedup();
            let holders = holders.iter().map(|j| format!("job {j}")).collect::<Vec<_>>().join(", ");
            out.push(Decision::Wait {
                id: w.id,
                reason: format!("waiting for {}: {} of {total} free (held by {holders})", devices(need, kind), fitting.len()),
            });
            blocker = Some(w.id);
        }
    }
    out
}

fn devices(n: usize, kind: &str) -> String {
    format!("{n} {kind} device{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cpu:{i}")).collect()
    }

    fn waiting(id: i64, n: usize) -> Waiting {
        Waiting { id, devices: Devices::Cpu(n), paused_for: None }
    }

    #[test]
    fn jobs_that_fit_are_placed_in_order_on_whole_gangs() {
        let d = plan(&[waiting(1, 2), waiting(2, 1), waiting(3, 1)], &slots(4), &BTreeMap::new());
        assert_eq!(
            d,
            [
                Decision::Place { id: 1, slots: vec!["cpu:0".into(), "cpu:1".into()] },
                Decision::Place { id: 2, slots: vec!["cpu:2".into()] },
                Decision::Place { id: 3, slots: vec!["cpu:3".into()] },
            ]
        );
    }

    #[test]
    fn the_first_job_that_does_not_fit_blocks_the_ones_behind_it() {
        let held: BTreeMap<String, i64> = [("cpu:0".to_string(), 7), ("cpu:1".to_string(), 7)].into();
        let d = plan(&[waiting(8, 2), waiting(9, 1)], &slots(3), &held);
        assert_eq!(
            d,
            [
                Decision::Wait { id: 8, reason: "waiting for 2 cpu devices: 1 of 3 free (held by job 7)".into() },
                Decision::Wait { id: 9, reason: "waiting behind job 8 (jobs start first in, first out)".into() },
            ]
        );
    }

    /// Job 4 runs on cpu:0 but is not live here (taking charge of it failed): its slot stays
    /// busy, and a queued job waits rather than land on its devices.
    #[test]
    fn the_slots_of_a_job_running_but_not_live_here_stay_busy() {
        let stored = [(4, vec!["cpu:0".to_string()]), (5, vec!["cpu:1".to_string()])];
        let live: BTreeMap<String, i64> = [("cpu:1".to_string(), 5)].into();
        let held = occupied(live, stored.iter().map(|(id, s)| (*id, s.as_slice())));
        assert_eq!(held, [("cpu:0".to_string(), 4), ("cpu:1".to_string(), 5)].into());
        let d = plan(&[waiting(6, 1)], &slots(2), &held);
        assert_eq!(d, [Decision::Wait { id: 6, reason: "waiting for 1 cpu device: 0 of 2 free (held by job 4, job 5)".into() }]);
        // Holders are named once each, whatever the order of their slots.
        let held: BTreeMap<String, i64> = [("cpu:0".to_string(), 5), ("cpu:1".to_string(), 4), ("cpu:2".to_string(), 5)].into();
        let d = plan(&[waiting(6, 1)], &slots(3), &held);
        assert_eq!(d, [Decision::Wait { id: 6, reason: "waiting for 1 cpu device: 0 of 3 free (held by job 4, job 5)".into() }]);
    }

    /// A restarting job in its pause keeps its place at the head of the queue: the job behind it
    /// does not take the devices it will need.
    #[test]
    fn a_job_pausing_before_its_restart_keeps_its_place() {
        let paused = Waiting { paused_for: Some(std::time::Duration::from_millis(1500)), ..waiting(1, 2) };
        let d = plan(&[paused, waiting(2, 1)], &slots(2), &BTreeMap::new());
        assert_eq!(
            d,
            [
                Decision::Wait { id: 1, reason: "restarting in 2s".into() },
                Decision::Wait { id: 2, reason: "waiting behind job 1 (jobs start first in, first out)".into() },
            ]
        );
    }

    #[test]
    fn a_job_larger_than_the_node_is_rejected_without_blocking_others() {
        let d = plan(
            &[waiting(1, 5), waiting(2, 1), Waiting { id: 3, devices: Devices::Cuda(vec![0]), paused_for: None }],
            &slots(2),
            &BTreeMap::new(),
        );
        assert_eq!(d[0], Decision::Reject { id: 1, reason: "needs 5 cpu devices; this node has 2".into() });
        assert_eq!(d[1], Decision::Place { id: 2, slots: vec!["cpu:0".into()] });
        assert_eq!(d[2], Decision::Reject { id: 3, reason: "needs 1 cuda device; this node has 0".into() });
    }
}
