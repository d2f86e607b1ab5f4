//! The CPU backend: `kernels::cpu` on f32 slices, matmuls on the current rayon pool.

use std::ops::Range;

use gantry_kernels::cpu::adamw::{adamw_update, AdamWStep};
use gantry_kernels::cpu::attention::AttnShape;
use gantry_kernels::cpu::matmul::{self, Accumulate, Threads};
use gantry_kernels::cpu::rope::RopeTable;
use gantry_kernels::cpu::{activation, attention, embedding, loss, norm, rope, vec};
use rayon::prelude::*;

use super::{Backend, Ids, Mat, MatMut, Span, SpanMut};
use crate::{Error, Result};

/// The CPU: every buffer is host memory, the working precision is f32.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

fn r<'a>(s: &Span<'a, [f32]>) -> &'a [f32] {
    &s.buf[s.range.clone()]
}

fn w<'a>(s: SpanMut<'a, [f32]>) -> &'a mut [f32] {
    &mut s.buf[s.range]
}

fn mat<'a>(m: Mat<'a, [f32]>) -> matmul::MatRef<'a> {
    matmul::MatRef::strided(&m.buf[m.offset..], m.rows, m.cols, m.rs, m.cs)
}

fn mat_mut<'a>(m: MatMut<'a, [f32]>) -> matmul::MatMut<'a> {
    matmul::MatMut::strided(&mut m.buf[m.offset..], m.rows, m.cols, m.rs, 1)
}

/// Two disjoint ranges of one buffer, mutably.
fn two_mut(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start || b.end <= a.start, "ranges {a:?} and {b:?} overlap");
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        let len = a.len();
        (&mut hi[..len], &mut lo[b])
    }
}

impl Backend for Cpu {
    type Act = [f32];
    type F32 = [f32];
    type ActBuf = Vec<f32>;
    type F32Buf = Vec<f32>;
    type Tokens = ();
    type Rope = ();
    type Losses = f64;

    /// 32 MiB: 8 MiB blocks measured slower on the `gpt2-tiny` bench, 64 MiB ones no faster.
    const HEAD_BLOCK_FLOATS: usize = 1 << 23;

    fn describe(&self) -> String {
        "cpu".into()
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn alloc_f32(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn alloc_tokens(&self, _: usize) -> Result<()> {
        Ok(())
    }

    fn load_tokens(&self, _: &mut (), _: &[u32]) -> Result<()> {
        Ok(())
    }

    fn upload_rope(&self, _: &RopeTable) -> Result<()> {
        Ok(())
    }

    fn losses(&self, _: usize) -> Result<f64> {
        Ok(0.0)
    }

    fn loss_sum(&self, losses: &mut f64, _: usize) -> Result<f64> {
        Ok(std::mem::take(losses))
    }

    fn matmul(&self, c: MatMut<'_, [f32]>, a: Mat<'_, [f32]>, b: Mat<'_, [f32]>, acc: Accumulate) -> Result<()> {
        matmul::matmul(mat_mut(c), mat(a), mat(b), acc, Threads::Pool);
        Ok(())
    }

    fn matmul_grad(&self, g: MatMut<'_, [f32]>, a: Mat<'_, [f32]>, b: Mat<'_, [f32]>) -> Result<()> {
        matmul::matmul(mat_mut(g), mat(a), mat(b), Accumulate::Add, Threads::Pool);
        Ok(())
    }

    fn add_bias(&self, y: MatMut<'_, [f32]>, bias: Span<'_, [f32]>, acc: Accumulate) -> Result<()> {
        let b = r(&bias);
        for row in 0..y.rows {
            let at = y.offset + row * y.rs;
            let out = &mut y.buf[at..at + y.cols];
            if acc == Accumulate::Add {
                out.iter_mut().zip(b).for_each(|(o, b)| *o += *b);
            } else {
                out.copy_from_slice(b);
            }
        }
        Ok(())
    }

    fn bias_grad(&self, db: SpanMut<'_, [f32]>, dy: Mat<'_, [f32]>) -> Result<()> {
        vec::add_col_sums_strided(w(db), &dy.buf[dy.offset..], dy.rows, dy.cols, dy.rs);
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: SpanMut<'_, [f32]>,
        mean: SpanMut<'_, [f32]>,
        rstd: SpanMut<'_, [f32]>,
        x: Span<'_, [f32]>,
        wt: Span<'_, [f32]>,
        b: Span<'_, [f32]>,
        eps: f32,
    ) -> Result<()> {
        norm::layernorm_forward(w(out), w(mean), w(rstd), r(&x), r(&wt), r(&b), eps);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dx: SpanMut<'_, [f32]>,
        g: &mut [f32],
        dw: Range<usize>,
        db: Range<usize>,
        dout: Span<'_, [f32]>,
        x: Span<'_, [f32]>,
        mean: Span<'_, [f32]>,
        rstd: Span<'_, [f32]>,
        wt: Span<'_, [f32]>,
    ) -> Result<()> {
        let (dw, db) = two_mut(g, dw, db);
        norm::layernorm_backward(w(dx), dw, db, r(&dout), r(&x), r(&mean), r(&rstd), r(&wt));
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: SpanMut<'_, [f32]>,
        rstd: SpanMut<'_, [f32]>,
        x: Span<'_, [f32]>,
        wt: Span<'_, [f32]>,
        eps: f32,
    ) -> Result<()> {
        norm::rmsnorm_forward(w(out), w(rstd), r(&x), r(&wt), eps);
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        dx: SpanMut<'_, [f32]>,
        dw: SpanMut<'_, [f32]>,
        dout: Span<'_, [f32]>,
        x: Span<'_, [f32]>,
        rstd: Span<'_, [f32]>,
        wt: Span<'_, [f32]>,
    ) -> Result<()> {
        norm::rmsnorm_backward(w(dx), w(dw), r(&dout), r(&x), r(&rstd), r(&wt));
        Ok(())
    }

    fn attention_forward(&self, s: AttnShape, qkv: Span<'_, [f32]>, out: SpanMut<'_, [f32]>, lse: SpanMut<'_, [f32]>) -> Result<()> {
        attention::attention_forward(s, r(&qkv), w(out), w(lse));
        Ok(())
    }

    fn attention_backward(
        &self,
        s: AttnShape,
        qkv: Span<'_, [f32]>,
        out: Span<'_, [f32]>,
        lse: Span<'_, [f32]>,
        dout: Span<'_, [f32]>,
        dqkv: SpanMut<'_, [f32]>,
    ) -> Result<()> {
        attention::attention_backward(s, r(&qkv), r(&out), r(&lse), r(&dout), w(dqkv));
        Ok(())
    }

    fn rope_apply(
        &self,
        x: SpanMut<'_, [f32]>,
        stride: usize,
        heads: usize,
        seq: usize,
        pos0: usize,
        host: &RopeTable,
        _: &(),
        inverse: bool,
    ) -> Result<()> {
        rope::rope_apply(w(x), stride, heads, seq, pos0, host, inverse);
        Ok(())
    }

    fn gelu_forward(&self, out: SpanMut<'_, [f32]>, x: Span<'_, [f32]>) -> Result<()> {
        activation::gelu_forward(w(out), r(&x));
        Ok(())
    }

    fn gelu_backward_inplace(&self, d: SpanMut<'_, [f32]>, x: Span<'_, [f32]>) -> Result<()> {
        activation::gelu_backward_inplace(w(d), r(&x));
        Ok(())
    }

    fn swiglu_forward(&self, out: SpanMut<'_, [f32]>, gate: Span<'_, [f32]>, up: Span<'_, [f32]>) -> Result<()> {
        activation::swiglu_forward(w(out), r(&gate), r(&up));
        Ok(())
    }

    fn swiglu_backward(
        &self,
        d_gate: SpanMut<'_, [f32]>,
        d_up: SpanMut<'_, [f32]>,
        gate: Span<'_, [f32]>,
        up: Span<'_, [f32]>,
    ) -> Result<()> {
        activation::swiglu_backward(w(d_gate), w(d_up), r(&gate), r(&up));
        Ok(())
    }

    fn copy(&self, dst: SpanMut<'_, [f32]>, src: Span<'_, [f32]>) -> Result<()> {
        w(dst).copy_from_slice(r(&src));
        Ok(())
    }

    fn zero(&self, dst: SpanMut<'_, [f32]>) -> Result<()> {
        w(dst).fill(0.0);
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: SpanMut<'_, [f32]>,
        tokens: Ids<'_, Self>,
        wte: Span<'_, [f32]>,
        wpe: Option<Span<'_, [f32]>>,
        seq: usize,
        c: usize,
    ) -> Result<()> {
        embedding::embedding_forward(w(out), tokens.host, r(&wte), wpe.as_ref().map(r), seq, c);
        Ok(())
    }

    fn embedding_rows(&self, out: SpanMut<'_, [f32]>, tokens: Ids<'_, Self>, table: Span<'_, [f32]>, first: usize, c: usize) -> Result<()> {
        let rows = first..first + table.len() / c;
        let t = r(&table);
        w(out).par_chunks_mut(c).zip(tokens.host.par_iter()).for_each(|(o, &tok)| {
            let tok = tok as usize;
            if rows.contains(&tok) {
                o.copy_from_slice(&t[(tok - first) * c..][..c]);
            }
        });
        Ok(())
    }

    fn add_positions(&self, out: SpanMut<'_, [f32]>, wpe: Span<'_, [f32]>, seq: usize, c: usize) -> Result<()> {
        let wpe = r(&wpe);
        w(out).par_chunks_mut(c).enumerate().for_each(|(row, o)| {
            let p = &wpe[(row % seq) * c..][..c];
            for i in 0..c {
                o[i] += p[i];
            }
        });
        Ok(())
    }

    fn embedding_backward(
        &self,
        g: &mut [f32],
        wte: Range<usize>,
        first: usize,
        wpe: Option<Range<usize>>,
        dout: Span<'_, [f32]>,
        tokens: Ids<'_, Self>,
        seq: usize,
        c: usize,
    ) -> Result<()> {
        match wpe {
            Some(wpe) => {
                let (dwte, dwpe) = two_mut(g, wte, wpe);
                embedding::embedding_backward(dwte, Some(dwpe), r(&dout), tokens.host, first, seq, c);
            }
            None => embedding::embedding_backward(&mut g[wte], None, r(&dout), tokens.host, first, seq, c),
        }
        Ok(())
    }

    fn softmax_xent(&self, logits: MatMut<'_, [f32]>, targets: Ids<'_, Self>, grad_scale: Option<f32>, losses: &mut f64) -> Result<()> {
        debug_assert_eq!(logits.rs, logits.cols, "logits are packed");
        let (at, len, vocab) = (logits.offset, logits.rows * logits.cols, logits.cols);
        *losses += loss::softmax_xent(&mut logits.buf[at..at + len], targets.host, vocab, grad_scale);
        Ok(())
    }

    fn xent_stats(&self, logits: MatMut<'_, [f32]>, targets: Ids<'_, Self>, first: usize, stats: SpanMut<'_, [f32]>) -> Result<()> {
        debug_assert_eq!(logits.rs, logits.cols, "logits are packed");
        let (at, len, vocab) = (logits.offset, logits.rows * logits.cols, logits.cols);
        loss::xent_stats(&mut logits.buf[at..at + len], targets.host, vocab, first, w(stats));
        Ok(())
    }

    fn xent_finish(
        &self,
        logits: MatMut<'_, [f32]>,
        targets: Ids<'_, Self>,
        first: usize,
        local: Span<'_, [f32]>,
        global: Span<'_, [f32]>,
        grad_scale: Option<f32>,
        losses: &mut f64,
    ) -> Result<()> {
        debug_assert_eq!(logits.rs, logits.cols, "logits are packed");
        let (at, len, vocab) = (logits.offset, logits.rows * logits.cols, logits.cols);
        *losses += loss::xent_finish(&mut logits.buf[at..at + len], targets.host, vocab, first, r(&local), r(&global), grad_scale);
        Ok(())
    }

    fn sum_squares(&self, x: &[f32], pieces: &[Range<usize>]) -> Result<f64> {
        // Summed in f64: one piece gives `vec::sum_squares` of it, bit for bit (adding to zero).
        Ok(pieces.iter().map(|p| vec::sum_squares(&x[p.clone()])).sum())
    }

    fn scale(&self, x: SpanMut<'_, [f32]>, s: f32) -> Result<()> {
        vec::scale(w(x), s);
        Ok(())
    }

    fn zero_f32(&self, x: SpanMut<'_, [f32]>) -> Result<()> {
        vec::zero(w(x));
        Ok(())
    }

    fn f32_as_act<'a>(&self, x: &'a [f32]) -> Option<&'a [f32]> {
        Some(x)
    }

    fn unscale_check(&self, g: &mut [f32], pieces: &[Range<usize>], inv_scale: f32) -> Result<bool> {
        let mut overflow = false;
        for p in pieces {
            let g = &mut g[p.clone()];
            vec::scale(g, inv_scale);
            overflow |= g.iter().any(|x| !x.is_finite());
        }
        Ok(overflow)
    }

    fn adamw(
        &self,
        p: SpanMut<'_, [f32]>,
        work: Option<SpanMut<'_, [f32]>>,
        g: Span<'_, [f32]>,
        m: SpanMut<'_, [f32]>,
        v: SpanMut<'_, [f32]>,
        hp: &AdamWStep,
        decay: bool,
    ) -> Result<()> {
        if work.is_some() {
            return Err(Error::Device("the CPU computes in f32 and keeps no working copy of the parameters".into()));
        }
        adamw_update(w(p), r(&g), w(m), w(v), hp, decay);
        Ok(())
    }
}
