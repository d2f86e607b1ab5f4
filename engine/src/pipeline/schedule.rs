//! Pipeline schedules as data (`parallel.pp_schedule`): for each rank, the ordered list of passes
//! it runs over the micro-batches of a step. A schedule is generated, checked (every micro-batch
//! forwarded and backwarded once per virtual stage, every message received by the pass that
//! needs it, no deadlock: `check`), simulated with per-pass costs into a timeline whose idle time
//! is the bubble (`simulate`), and printed (`Timeline::render`).
//!
//! The model's blocks are cut into `pp × chunks` virtual stages. `gpipe` and `1f1b` give each rank
//! one stage; `interleaved` gives rank r the stages `r, r + pp, …` (Megatron's virtual pipeline);
//! `zbv` gives rank r the stages `r` and `2·pp − 1 − r` (a V: the first and last stage on rank 0,
//! so the loss and the embedding meet) and splits each backward into the input gradient (`B`, on
//! the critical path) and the weight gradient (`W`, free to fill the bubbles).

use std::fmt::Write as _;

use crate::{Error, Result};

/// The schedules `parallel.pp_schedule` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    GPipe,
    OneFOneB,
    Interleaved,
    Zbv,
}

impl ScheduleKind {
    pub fn parse(s: &str) -> Result<ScheduleKind> {
        Ok(match s {
            "gpipe" => ScheduleKind::GPipe,
            "1f1b" => ScheduleKind::OneFOneB,
            "interleaved" => ScheduleKind::Interleaved,
            "zbv" => ScheduleKind::Zbv,
            other => {
                return Err(unsupported(
                    "parallel.pp_schedule",
                    format!("{other:?} is not a schedule: use gpipe, 1f1b, interleaved or zbv"),
                ))
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            ScheduleKind::GPipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Interleaved => "interleaved",
            ScheduleKind::Zbv => "zbv",
        }
    }
}

fn unsupported(field: &str, message: String) -> Error {
    Error::Unsupported { field: field.into(), message }
}

/// What a rank does with one micro-batch on one of its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    /// The input and weight gradients together.
    Backward,
    /// The input gradient alone (zbv), which the previous stage waits for.
    BackwardInput,
    /// The weight gradient alone (zbv), which nothing waits for.
    BackwardWeight,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Action {
    pub pass: Pass,
    pub micro_batch: usize,
    /// Which of the rank's chunks (0 unless the rank holds several virtual stages).
    pub chunk: usize,
}

/// The passes of every rank, in order.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub stages: usize,
    pub chunks: usize,
    pub micro_batches: usize,
    pub ranks: Vec<Vec<Action>>,
}

/// Costs of a pass on one virtual stage, in any unit.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    pub forward: f64,
    pub backward_input: f64,
    pub backward_weight: f64,
}

impl Costs {
    /// The usual model of a transformer stage: the backward costs twice the forward, half of it
    /// the input gradient and half the weight gradient.
    pub const IDEAL: Costs = Costs { forward: 1.0, backward_input: 1.0, backward_weight: 1.0 };

    fn of(&self, pass: Pass, chunks: usize) -> f64 {
        let per = match pass {
            Pass::Forward => self.forward,
            Pass::Backward => self.backward_input + self.backward_weight,
            Pass::BackwardInput => self.backward_input,
            Pass::BackwardWeight => self.backward_weight,
        };
        // A rank's chunks share its part of the model: each is 1/chunks of the work.
        per / chunks as f64
    }
}

impl Schedule {
    /// The schedule `kind` for `stages` pipeline ranks, `chunks` virtual stages each (1 for
    /// gpipe and 1f1b, 2 for zbv) and `micro_batches` per step; an error naming the spec key for
    /// a combination that cannot run.
    pub fn new(kind: ScheduleKind, stages: usize, chunks: usize, micro_batches: usize) -> Result<Schedule> {
        let (p, v, m) = (stages, chunks, micro_batches);
        if p == 0 || m == 0 {
            return Err(unsupported("parallel.pp", format!("{p} stages and {m} micro-batches: both must be positive")));
        }
        let ranks = match kind {
            ScheduleKind::GPipe => {
                one_chunk(v)?;
                (0..p).map(|_| (0..m).map(|i| fwd(i, 0)).chain((0..m).map(|i| bwd(i, 0))).collect()).collect()
            }
            ScheduleKind::OneFOneB => {
                one_chunk(v)?;
                if m < p {
                    return Err(unsupported(
                        "train.global_batch_size",
                        format!("1f1b needs at least as many micro-batches as stages: {m} micro-batches over {p} stages"),
                    ));
                }
                (0..p).map(|r| one_f_one_b(p - 1 - r, m, |i| fwd(i, 0), |i| bwd(i, 0))).collect()
            }
            ScheduleKind::Interleaved => {
                if v < 2 {
                    return Err(unsupported("parallel.pp_chunks", format!("interleaved needs 2 or more chunks per rank, not {v}")));
                }
                if !m.is_multiple_of(p) {
                    return Err(unsupported(
                        "train.global_batch_size",
                        format!("interleaved runs the micro-batches in groups of the stage count: {m} micro-batches do not divide by {p}"),
                    ));
                }
                // Megatron's order: groups of p micro-batches through each chunk in turn, the
                // backward through the chunks in reverse.
                let at = |k: usize, reverse: bool| {
                    let (group, within) = (k / (p * v), k % (p * v));
                    let chunk = if reverse { v - 1 - within / p } else { within / p };
                    (group * p + within % p, chunk)
                };
                (0..p)
                    .map(|r| {
                        let warm = ((p - 1 - r) * 2 + (v - 1) * p).min(m * v);
                        one_f_one_b_n(
                            warm,
                            m * v,
                            |k| {
                                let (i, c) = at(k, false);
                                fwd(i, c)
                            },
                            |k| {
                                let (i, c) = at(k, true);
                                bwd(i, c)
                            },
                        )
                    })
                    .collect()
            }
            ScheduleKind::Zbv => {
                if v != 2 {
                    return Err(unsupported("parallel.pp_chunks", format!("zbv runs exactly 2 chunks per rank (a V), not {v}")));
                }
                zero_bubble_v(p, m)
            }
        };
        let s = Schedule { kind, stages: p, chunks: v, micro_batches: m, ranks };
        s.check()?;
        Ok(s)
    }

    /// The virtual stage of `rank`'s chunk `chunk`.
    pub fn stage(&self, rank: usize, chunk: usize) -> usize {
        match self.kind {
            ScheduleKind::Zbv if chunk == 1 => 2 * self.stages - 1 - rank,
            _ => chunk * self.stages + rank,
        }
    }

    /// The rank and chunk of virtual stage `stage`.
    pub fn place(&self, stage: usize) -> (usize, usize) {
        match self.kind {
            ScheduleKind::Zbv if stage >= self.stages => (2 * self.stages - 1 - stage, 1),
            _ => (stage % self.stages, stage / self.stages),
        }
    }

    pub fn last_stage(&self) -> usize {
        self.stages * self.chunks - 1
    }

    /// Checks that every micro-batch is forwarded and backwarded exactly once on every virtual
    /// stage (the backward as one pass, or as its input and weight halves), by the rank holding
    /// it, and that the schedule runs to the end (`simulate` finds no rank waiting forever for a
    /// message or a pass that never comes).
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| unsupported("parallel.pp_schedule", format!("{} schedule: {m}", self.kind.name()));
        let mut seen = std::collections::HashMap::new();
        for (r, actions) in self.ranks.iter().enumerate() {
            for a in actions {
                if a.chunk >= self.chunks || a.micro_batch >= self.micro_batches {
                    return Err(bad(format!("rank {r} runs {a:?}, outside the step")));
                }
                *seen.entry((a.pass, a.micro_batch, self.stage(r, a.chunk))).or_insert(0usize) += 1;
            }
        }
        for stage in 0..=self.last_stage() {
            for mb in 0..self.micro_batches {
                let n = |p: Pass| seen.get(&(p, mb, stage)).copied().unwrap_or(0);
                let whole = n(Pass::Backward);
                let split = (n(Pass::BackwardInput), n(Pass::BackwardWeight));
                if n(Pass::Forward) != 1 || !((whole == 1 && split == (0, 0)) || (whole == 0 && split == (1, 1))) {
                    return Err(bad(format!("micro-batch {mb} on stage {stage} is not forwarded and backwarded exactly once")));
                }
            }
        }
        self.simulate(Costs::IDEAL).map(|_| ())
    }

    /// Runs the schedule with `costs` (messages take no time): each pass starts once its rank is
    /// free and what it needs is done (the previous stage's forward, the next stage's input
    /// gradient, the same micro-batch's forward here). An error names the passes every stuck
    /// rank waits on, should the schedule deadlock.
    pub fn simulate(&self, costs: Costs) -> Result<Timeline> {
        let mut done: std::collections::HashMap<(Pass, usize, usize), f64> = std::collections::HashMap::new();
        let mut next = vec![0usize; self.ranks.len()];
        let mut free = vec![0.0f64; self.ranks.len()];
        let mut spans: Vec<Vec<(f64, f64, Action)>> = vec![Vec::new(); self.ranks.len()];
        let total: usize = self.ranks.iter().map(Vec::len).sum();
        let mut ran = 0;
        while ran < total {
            let mut progressed = false;
            for r in 0..self.ranks.len() {
                while let Some(&a) = self.ranks[r].get(next[r]) {
                    let Some(ready) = self.ready_at(r, a, &done) else { break };
                    let start = free[r].max(ready);
                    let end = start + costs.of(a.pass, self.chunks);
                    let stage = self.stage(r, a.chunk);
                    done.insert((a.pass, a.micro_batch, stage), end);
                    spans[r].push((start, end, a));
                    free[r] = end;
                    next[r] += 1;
                    ran += 1;
                    progressed = true;
                }
            }
            if !progressed {
                let stuck: Vec<String> = (0..self.ranks.len())
                    .filter_map(|r| {
                        self.ranks[r].get(next[r]).map(|a| format!("rank {r} at {:?} of micro-batch {}", a.pass, a.micro_batch))
                    })
                    .collect();
                return Err(unsupported("parallel.pp_schedule", format!("{} schedule deadlocks: {}", self.kind.name(), stuck.join(", "))));
            }
        }
        Ok(Timeline { spans })
    }

    /// When `rank` may start `a`, given the passes done so far (`None`: something it needs has
    /// not run yet).
    fn ready_at(&self, rank: usize, a: Action, done: &std::collections::HashMap<(Pass, usize, usize), f64>) -> Option<f64> {
        let (mb, stage) = (a.micro_batch, self.stage(rank, a.chunk));
        let at = |p: Pass, s: usize| done.get(&(p, mb, s)).copied();
        // The input gradient from the stage after, whichever way it was run.
        let grad_from = |s: usize| at(Pass::Backward, s).or(at(Pass::BackwardInput, s));
        match a.pass {
            Pass::Forward if stage == 0 => Some(0.0),
            Pass::Forward => at(Pass::Forward, stage - 1),
            Pass::Backward | Pass::BackwardInput => {
                let own = at(Pass::Forward, stage)?;
                if stage == self.last_stage() {
                    Some(own)
                } else {
                    Some(own.max(grad_from(stage + 1)?))
                }
            }
            Pass::BackwardWeight => at(Pass::BackwardInput, stage),
        }
    }

    /// The most micro-batch chunks whose activations a rank holds at once (forwarded, their
    /// weight gradient not yet taken), per rank, counted in whole micro-batches' worth.
    pub fn peak_activations(&self) -> Vec<f64> {
        self.ranks
            .iter()
            .map(|actions| {
                let (mut now, mut peak) = (0i64, 0i64);
                for a in actions {
                    match a.pass {
                        Pass::Forward => now += 1,
                        Pass::Backward | Pass::BackwardWeight => now -= 1,
                        Pass::BackwardInput => {}
                    }
                    peak = peak.max(now);
                }
                peak as f64 / self.chunks as f64
            })
            .collect()
    }

    /// The schedule's bubble in closed form, where there is one: `(p−1)/(m+p−1)` for gpipe and
    /// 1f1b, `(p−1)/(v·m+p−1)` interleaved; for zbv the ideal run's (`simulate(Costs::IDEAL)`).
    pub fn bubble_theory(&self) -> f64 {
        let (p, m, v) = (self.stages as f64, self.micro_batches as f64, self.chunks as f64);
        match self.kind {
            ScheduleKind::GPipe | ScheduleKind::OneFOneB => (p - 1.0) / (m + p - 1.0),
            ScheduleKind::Interleaved => (p - 1.0) / (v * m + p - 1.0),
            ScheduleKind::Zbv => self.simulate(Costs::IDEAL).map_or(f64::NAN, |t| t.bubble()),
        }
    }
}

fn one_chunk(v: usize) -> Result<()> {
    if v != 1 {
        return Err(unsupported("parallel.pp_chunks", format!("gpipe and 1f1b run one chunk per rank, not {v}")));
    }
    Ok(())
}

fn fwd(micro_batch: usize, chunk: usize) -> Action {
    Action { pass: Pass::Forward, micro_batch, chunk }
}

fn bwd(micro_batch: usize, chunk: usize) -> Action {
    Action { pass: Pass::Backward, micro_batch, chunk }
}

/// 1F1B over `m` micro-batches with `warm` forwards first.
fn one_f_one_b(warm: usize, m: usize, f: impl Fn(usize) -> Action, b: impl Fn(usize) -> Action) -> Vec<Action> {
    one_f_one_b_n(warm.min(m), m, f, b)
}

/// `warm` forwards, then one forward and one backward at a time, then the backwards left: `n`
/// of each, the k-th forward `f(k)` and backward `b(k)`.
fn one_f_one_b_n(warm: usize, n: usize, f: impl Fn(usize) -> Action, b: impl Fn(usize) -> Action) -> Vec<Action> {
    let mut out: Vec<Action> = (0..warm).map(&f).collect();
    for k in 0..n - warm {
        out.push(f(warm + k));
        out.push(b(k));
    }
    out.extend((n - warm..n).map(&b));
    out
}

/// The V placement with split backwards, ordered greedily in simulated time: a free rank runs
/// the ready input gradient nearest the loss first (it is on the critical path), else the next
/// forward while it holds fewer than `2·p` chunks' activations (1F1B's memory), else a weight
/// gradient (which fills what would be a bubble).
fn zero_bubble_v(p: usize, m: usize) -> Vec<Vec<Action>> {
    let stage = |r: usize, c: usize| if c == 1 { 2 * p - 1 - r } else { r };
    let last = 2 * p - 1;
    let cost = 0.5; // Each pass of a chunk: half the rank's model.
    let mut done: std::collections::HashMap<(Pass, usize, usize), f64> = std::collections::HashMap::new();
    let mut todo: Vec<Vec<Action>> = (0..p)
        .map(|_| {
            (0..m)
                .flat_map(|i| {
                    (0..2).flat_map(move |c| {
                        [Pass::Forward, Pass::BackwardInput, Pass::BackwardWeight].map(|pass| Action { pass, micro_batch: i, chunk: c })
                    })
                })
                .collect()
        })
        .collect();
    let mut out = vec![Vec::new(); p];
    let (mut free, mut held) = (vec![0.0f64; p], vec![0usize; p]);
    let mut t = 0.0f64;
    while todo.iter().any(|v| !v.is_empty()) {
        let mut ran = false;
        for r in 0..p {
            if free[r] > t {
                continue;
            }
            let ready = |a: &Action| -> bool {
                let (mb, s) = (a.micro_batch, stage(r, a.chunk));
                let fin = |pass: Pass, s: usize| done.get(&(pass, mb, s)).is_some_and(|&e| e <= t);
                match a.pass {
                    Pass::Forward => s == 0 || fin(Pass::Forward, s - 1),
                    Pass::BackwardInput => fin(Pass::Forward, s) && (s == last || fin(Pass::BackwardInput, s + 1)),
                    Pass::BackwardWeight => fin(Pass::BackwardInput, s),
                    Pass::Backward => false,
                }
            };
            let pick = |pass: Pass| {
                todo[r]
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.pass == pass && ready(a))
                    .min_by_key(|(_, a)| (a.micro_batch, std::cmp::Reverse(stage(r, a.chunk))))
                    .map(|(i, _)| i)
            };
            let choice = pick(Pass::BackwardInput)
                .or_else(|| if held[r] < 2 * p { pick(Pass::Forward) } else { None })
                .or_else(|| pick(Pass::BackwardWeight));
            if let Some(i) = choice {
                let a = todo[r].remove(i);
                match a.pass {
                    Pass::Forward => held[r] += 1,
                    Pass::BackwardWeight => held[r] -= 1,
                    _ => {}
                }
                free[r] = t + cost;
                done.insert((a.pass, a.micro_batch, stage(r, a.chunk)), free[r]);
                out[r].push(a);
                ran = true;
            }
        }
        // Next moment anything can change: the earliest a busy rank frees up.
        let next = free.iter().copied().filter(|&f| f > t).fold(f64::INFINITY, f64::min);
        if next.is_finite() {
            t = next;
        } else if !ran {
            unreachable!("a rank with work left and nothing running has something ready");
        }
    }
    out
}

/// A simulated run: each rank's passes with their start and end.
#[derive(Clone, Debug)]
pub struct Timeline {
    pub spans: Vec<Vec<(f64, f64, Action)>>,
}

impl Timeline {
    /// When the last pass ends.
    pub fn makespan(&self) -> f64 {
        self.spans.iter().flat_map(|s| s.iter().map(|x| x.1)).fold(0.0, f64::max)
    }

    /// The share of the ranks' time they sat idle before the step ended.
    pub fn bubble(&self) -> f64 {
        let busy: f64 = self.spans.iter().flat_map(|s| s.iter().map(|x| x.1 - x.0)).sum();
        let span = self.makespan() * self.spans.len() as f64;
        if span == 0.0 {
            0.0
        } else {
            1.0 - busy / span
        }
    }

    /// One line per rank, one character per `unit` of time: each pass as its letter (`F`
    /// forward, `B` backward, `I` input gradient, `W` weight gradient) and micro-batch, padded
    /// with `-` to its length; `.` is idle time.
    pub fn render(&self, unit: f64) -> String {
        let mut out = String::new();
        for (r, spans) in self.spans.iter().enumerate() {
            let _ = write!(out, "rank {r:>2} |");
            let mut t = 0.0;
            for &(start, end, a) in spans {
                while t + unit / 2.0 < start {
                    out.push('.');
                    t += unit;
                }
                let letter = match a.pass {
                    Pass::Forward => 'F',
                    Pass::Backward => 'B',
                    Pass::BackwardInput => 'I',
                    Pass::BackwardWeight => 'W',
                };
                let cells = (((end - start) / unit).round() as usize).max(1);
                let label: String = format!("{letter}{}", a.micro_batch).chars().take(cells).collect();
                out.push_str(&label);
                out.extend(std::iter::repeat_n('-', cells - label.chars().count()));
                t = end;
            }
            out.push_str("|\n");
        }
        out
    }
}

#[cfg(test)]
mod tests;
