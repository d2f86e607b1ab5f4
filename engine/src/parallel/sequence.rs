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

use gantry_kernels::cpu::attention::AttnShape;
use gantry_kernels::cpu::ring_attention::{
    pack_kv, ring_backward_step, ring_delta, ring_forward_init, ring_forward_step, zigzag_chunks, RingStep,
};

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

    /// Starts passing `block` to the next rank of the ring (and receiving the previous one's).
    fn start_shift(&self, block: Arc<Vec<f32>>) -> crate::comm::Pending<Vec<f32>> {
        let g = self.group.clone();
        self.comm.submit(move |c| {
            let mut recv = vec![0.0f32; block.len()];
            c.shift(&g, &block, &mut recv)?;
            Ok(recv)
        })
    }

    /// Waits for a shift, counting the time it kept this rank waiting.
    fn finish_shift(&mut self, p: crate::comm::Pending<Vec<f32>>) -> Result<Vec<f32>> {
        let start = Instant::now();
        let r = p.wait().map(|(v, _)| v);
        self.busy += start.elapsed();
        r
    }

    /// The step's shape and chunks for the block that came from `src`.
    fn step<'a>(&self, s: AttnShape, qkv: &'a [f32], kv: &'a [f32], src: usize) -> RingStep<'a> {
        let n = self.size();
        RingStep { s, qkv, q_chunks: zigzag_chunks(self.rank(), n), kv, k_chunks: zigzag_chunks(src, n) }
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

    /// The rank's own block first, then each predecessor's as it arrives; the next block is
    /// already travelling while this one is computed.
    fn ring_attention_forward(
        &mut self,
        s: AttnShape,
        qkv: Span<'_, [f32]>,
        out: SpanMut<'_, [f32]>,
        lse: SpanMut<'_, [f32]>,
    ) -> Result<()> {
        let (n, me) = (self.size(), self.rank());
        let (qkv, out, lse) = (&qkv.buf[qkv.range], &mut out.buf[out.range], &mut lse.buf[lse.range]);
        ring_forward_init(out, lse);
        let mut kv = Arc::new(pack_kv(s, qkv));
        for j in 0..n {
            let next = (j + 1 < n).then(|| self.start_shift(kv.clone()));
            ring_forward_step(self.step(s, qkv, &kv, (me + n - j) % n), out, lse);
            if let Some(p) = next {
                kv = Arc::new(self.finish_shift(p)?);
            }
        }
        Ok(())
    }

    /// The blocks come round again in the same order; each carries the key/value gradient the
    /// ranks before added to it, and after `n` steps every block's gradient is back with its
    /// owner.
    fn ring_attention_backward(
        &mut self,
        s: AttnShape,
        qkv: Span<'_, [f32]>,
        out: Span<'_, [f32]>,
        lse: Span<'_, [f32]>,
        dout: Span<'_, [f32]>,
        dqkv: SpanMut<'_, [f32]>,
    ) -> Result<()> {
        let (n, me) = (self.size(), self.rank());
        let (qkv, out, lse, dout) = (&qkv.buf[qkv.range], &out.buf[out.range], &lse.buf[lse.range], &dout.buf[dout.range]);
        let delta = ring_delta(s, out, dout);
        let mut dq = vec![0.0f32; out.len()];
        let mut kv = Arc::new(pack_kv(s, qkv));
        let mut dkv = vec![0.0f32; kv.len()];
        for j in 0..n {
            let next = (j + 1 < n).then(|| self.start_shift(kv.clone()));
            ring_backward_step(self.step(s, qkv, &kv, (me + n - j) % n), lse, &delta, dout, &mut dq, &mut dkv);
            let p = self.start_shift(Arc::new(dkv));
            dkv = self.finish_shift(p)?;
            if let Some(p) = next {
                kv = Arc::new(self.finish_shift(p)?);
            }
        }
        let (w, hd) = (s.qkv_width(), s.out_width());
        let dqkv = &mut dqkv.buf[dqkv.range];
        for ((row, q), kv) in dqkv.chunks_exact_mut(w).zip(dq.chunks_exact(hd)).zip(dkv.chunks_exact(w - hd)) {
            row[..hd].copy_from_slice(q);
            row[hd..].copy_from_slice(kv);
        }
        Ok(())
    }
}
