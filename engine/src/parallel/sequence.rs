//! Sequence parallelism, DeepSpeed Ulysses (`parallel.sp_mode = "all_to_all"`), on CPU ranks:
//! the two all-to-alls the model runs around attention (`models::hooks::SequenceGroup`), over the
//! sp group of the mesh, on the job's communication thread.
//!
//! Before attention, each rank holds its `t` tokens of every sequence with every head; it sends
//! rank j the columns of j's head group and receives every rank's tokens for its own group, so
//! attention runs over whole sequences for `heads / n` heads. After attention the reverse brings
//! each rank its tokens with every head again. Each all-to-all moves `(n−1)/n` of a layer's
//! QKV (or attention output) per rank, whatever the sequence length's share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Cpu, Mat, MatMut, Span, SpanMut};
use crate::comm::{AsyncComm, Group};
use crate::models::hooks::SequenceGroup;
use crate::models::HeadGroups;
use crate::{Error, Result};

pub struct SequenceParallel {
    comm: Arc<AsyncComm>,
    group: Group,
    /// Time spent in the group's collectives since last taken.
    busy: Duration,
}

impl std::fmt::Debug for SequenceParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceParallel").field("group", &self.group).finish()
    }
}

impl SequenceParallel {
    pub fn new(comm: Arc<AsyncComm>, group: Group) -> SequenceParallel {
        SequenceParallel { comm, group, busy: Duration::ZERO }
    }

    pub fn rank(&self) -> usize {
        self.group.me
    }

    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// Time spent in the group's collectives since last taken.
    pub fn take_comm_time(&mut self) -> Duration {
        std::mem::take(&mut self.busy)
    }

    fn all_to_all(&mut self, send: Vec<f32>) -> Result<Vec<f32>> {
        let start = Instant::now();
        let g = self.group.clone();
        let r = self.comm.run(move |c| {
            let mut recv = vec![0.0f32; send.len()];
            c.all_to_all(&g, &send, &mut recv)?;
            Ok(recv)
        });
        self.busy += start.elapsed();
        r
    }
}

fn shape_error(what: String) -> Error {
    Error::Unsupported { field: "parallel.sp".into(), message: what }
}

impl SequenceGroup<Cpu> for SequenceParallel {
    fn seq_to_heads(&mut self, local: Mat<'_, [f32]>, b: usize, groups: &HeadGroups, full: SpanMut<'_, [f32]>) -> Result<()> {
        let (n, rows, w) = (self.size(), local.rows, groups.width());
        if b == 0 || !rows.is_multiple_of(b) || full.len() != n * rows * w {
            return Err(shape_error(format!("{rows} rows of {b} sequences into {} elements over {n} ranks", full.len())));
        }
        let t = rows / b;
        // Block j (for rank j): this rank's rows, with j's head group's columns.
        let mut send = vec![0.0f32; n * rows * w];
        for j in 0..n {
            for r in 0..rows {
                let mut at = (j * rows + r) * w;
                for cols in groups.of(j) {
                    let src = local.offset + r * local.rs + cols.start;
                    send[at..at + cols.len()].copy_from_slice(&local.buf[src..src + cols.len()]);
                    at += cols.len();
                }
            }
        }
        let recv = self.all_to_all(send)?;
        // Block i (from rank i): its t tokens of each sequence, which are positions i·t.. of it.
        let out = &mut full.buf[full.range];
        for i in 0..n {
            for s in 0..b {
                let (src, dst) = ((i * rows + s * t) * w, (s * n * t + i * t) * w);
                out[dst..dst + t * w].copy_from_slice(&recv[src..src + t * w]);
            }
        }
        Ok(())
    }

    fn heads_to_seq(&mut self, full: Span<'_, [f32]>, b: usize, groups: &HeadGroups, local: MatMut<'_, [f32]>) -> Result<()> {
        let (n, rows, w) = (self.size(), local.rows, groups.width());
        if b == 0 || !rows.is_multiple_of(b) || full.len() != n * rows * w {
            return Err(shape_error(format!("{} elements over {n} ranks into {rows} rows of {b} sequences", full.len())));
        }
        let t = rows / b;
        let src_all = &full.buf[full.range];
        // Block i (for rank i): rank i's tokens of every sequence, this rank's head group.
        let mut send = vec![0.0f32; n * rows * w];
        for i in 0..n {
            for s in 0..b {
                let (dst, src) = ((i * rows + s * t) * w, (s * n * t + i * t) * w);
                send[dst..dst + t * w].copy_from_slice(&src_all[src..src + t * w]);
            }
        }
        let recv = self.all_to_all(send)?;
        // Block j (from rank j): this rank's rows, j's head group's columns.
        for j in 0..n {
            for r in 0..rows {
                let mut at = (j * rows + r) * w;
                for cols in groups.of(j) {
                    let dst = local.offset + r * local.rs + cols.start;
                    local.buf[dst..dst + cols.len()].copy_from_slice(&recv[at..at + cols.len()]);
                    at += cols.len();
                }
            }
        }
        Ok(())
    }
}
