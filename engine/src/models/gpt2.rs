//! GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm blocks, GELU (tanh) MLP, biases
//! everywhere, head tied to the token embedding unless the config unties it. Written once, over
//! either backend (`crate::backend`).

use gantry_kernels::cpu::attention::AttnShape;

use super::hooks::{seq_group_of, span, tp_sum, Params};
use super::sliced::{embed, head_loss, head_scratch_len, need_final_norm};
use super::sp::{HeadGroups, SpRank};
use super::{at, at_mut, Batch, Hidden, ModelConfig, TpRank};
use crate::backend::Accumulate::{Add, Overwrite};
use crate::backend::{Backend, Cpu, Mat, MatMut, SpanMut};
use crate::nn::{LayerNorm, Linear, LmHead, WeightLayout};
use crate::params::{Chunking, Init, ParamRef, ParamTable, ParamTableBuilder};
use crate::Result;

#[derive(Clone, Debug)]
struct Block {
    ln1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    ln2: LayerNorm,
    fc: Linear,
    fc_proj: Linear,
}

#[derive(Clone, Debug)]
pub struct Gpt2 {
    /// Each block's parameters in the flat buffer (one contiguous span per block).
    block_ranges: Vec<std::ops::Range<usize>>,
    c: usize,
    /// The attention heads and MLP width this rank runs (all of them, or its tensor-parallel
    /// part: see `models::tp`), and the heads' width.
    heads: usize,
    head_dim: usize,
    inner: usize,
    tp: TpRank,
    /// The part of each sequence this rank runs (see `models::sp`).
    sp: SpRank,
    wte: ParamRef,
    /// The first vocabulary row of `wte` (0, or this rank's part of a vocabulary-parallel one).
    vocab_first: usize,
    wpe: ParamRef,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: LmHead,
    /// The token embedding's and the head's slices (`ParamTable::slices`): under data
    /// parallelism a large one spans several chunks and runs a slice at a time.
    wte_slices: Vec<std::ops::Range<usize>>,
    head_slices: Vec<std::ops::Range<usize>>,
}

/// Saved activations (layer-major stacks) and backward scratch for one batch shape, on backend
/// `B`; norm statistics and the attention's log-sum-exp in f32.
pub struct Acts<B: Backend> {
    n: usize,
    res: B::ActBuf,
    mid: B::ActBuf,
    ln1: B::ActBuf,
    ln1_stats: (B::F32Buf, B::F32Buf),
    qkv: B::ActBuf,
    att: B::ActBuf,
    lse: B::F32Buf,
    ln2: B::ActBuf,
    ln2_stats: (B::F32Buf, B::F32Buf),
    fc: B::ActBuf,
    gelu: B::ActBuf,
    lnf: B::ActBuf,
    lnf_stats: (B::F32Buf, B::F32Buf),
    dres: B::ActBuf,
    dc: B::ActBuf,
    dbig: B::ActBuf,
    logits: B::ActBuf,
    /// Sequence parallelism: each layer's attention output over whole sequences for this rank's
    /// heads, and backward's scratch for it and the QKV gradient in that layout (empty
    /// otherwise; `qkv` and `lse` then hold whole sequences for this rank's heads too).
    att_full: B::ActBuf,
    datt_full: B::ActBuf,
    dqkv_full: B::ActBuf,
    losses: B::Losses,
}

impl Acts<Cpu> {
    /// Floats held (for the test that `acts_elems` tells the truth).
    pub fn elems(&self) -> usize {
        [
            &self.res,
            &self.mid,
            &self.ln1,
            &self.ln1_stats.0,
            &self.ln1_stats.1,
            &self.qkv,
            &self.att,
            &self.lse,
            &self.ln2,
            &self.ln2_stats.0,
            &self.ln2_stats.1,
            &self.fc,
            &self.gelu,
            &self.lnf,
            &self.lnf_stats.0,
            &self.lnf_stats.1,
            &self.dres,
            &self.dc,
            &self.dbig,
            &self.logits,
            &self.att_full,
            &self.datt_full,
            &self.dqkv_full,
        ]
        .iter()
        .map(|v| v.len())
        .sum()
    }
}

impl Gpt2 {
    /// The model, or rank `tp.rank`'s part of it (see `models::tp`): the table's entries keep
    /// their global names and shapes, with the part this rank holds.
    pub fn new(cfg: &ModelConfig, chunking: Chunking, tp: TpRank, sp: SpRank) -> Result<(ParamTable, Gpt2)> {
        let (c, l, v, inner) = (cfg.hidden, cfg.layers, cfg.vocab, cfg.intermediate);
        let std = cfg.initializer_range;
        // GPT-2 scales the init of the projections into the residual stream by 1/sqrt(2L).
        let proj_std = std / (2.0 * l as f32).sqrt();
        let d = c / cfg.heads;
        // This rank's heads (as features of each of q, k and v), MLP columns and vocabulary rows.
        let heads = tp.heads(cfg.heads)?;
        sp.check_heads(heads.len(), heads.len())?;
        let attn = heads.start * d..heads.end * d;
        let (mlp, vocab) = (tp.part(inner), tp.part(v));
        let mut b = ParamTableBuilder::new();
        let wte = b.add_sharded("transformer.wte.weight", &[v, c], tp.rows(0, v), Init::Normal { std });
        let wpe = b.add("transformer.wpe.weight", &[cfg.max_positions, c], Init::Normal { std });
        let mut idx = Vec::new();
        for i in 0..l {
            let p = format!("transformer.h.{i}.");
            // Conv1D weights are `[in, out]`: column-parallel layers cut dimension 1, row-parallel
            // ones dimension 0.
            idx.push([
                b.add(format!("{p}ln_1.weight"), &[c], Init::Ones),
                b.add(format!("{p}ln_1.bias"), &[c], Init::Zeros),
                b.add_sharded(format!("{p}attn.c_attn.weight"), &[c, 3 * c], tp.blocks(1, 3, attn.clone()), Init::Normal { std }),
                b.add_sharded(format!("{p}attn.c_attn.bias"), &[3 * c], tp.blocks(0, 3, attn.clone()), Init::Zeros),
                b.add_sharded(format!("{p}attn.c_proj.weight"), &[c, c], tp.blocks(0, 1, attn.clone()), Init::Normal { std: proj_std }),
                b.add(format!("{p}attn.c_proj.bias"), &[c], Init::Zeros),
                b.add(format!("{p}ln_2.weight"), &[c], Init::Ones),
                b.add(format!("{p}ln_2.bias"), &[c], Init::Zeros),
                b.add_sharded(format!("{p}mlp.c_fc.weight"), &[c, inner], tp.rows(1, inner), Init::Normal { std }),
                b.add_sharded(format!("{p}mlp.c_fc.bias"), &[inner], tp.rows(0, inner), Init::Zeros),
                b.add_sharded(format!("{p}mlp.c_proj.weight"), &[inner, c], tp.rows(0, inner), Init::Normal { std: proj_std }),
                b.add(format!("{p}mlp.c_proj.bias"), &[c], Init::Zeros),
            ]);
        }
        let lnf_w = b.add("transformer.ln_f.weight", &[c], Init::Ones);
        let lnf_b = b.add("transformer.ln_f.bias", &[c], Init::Zeros);
        let head = (!cfg.tie_embeddings).then(|| b.add_sharded("lm_head.weight", &[v, c], tp.rows(0, v), Init::Normal { std }));
        let t = b.build(chunking);
        let lin = |w: usize, bias: usize, d_in: usize, d_out: usize, row_parallel: bool| Linear {
            weight: t.at(w),
            bias: Some(t.at(bias)),
            d_in,
            d_out,
            layout: WeightLayout::InOut,
            partial: row_parallel && !tp.lead(),
        };
        let ln = |w: usize, bias: usize| LayerNorm { weight: t.at(w), bias: t.at(bias), eps: cfg.norm_eps };
        let (aw, mw) = (attn.len(), mlp.len());
        let blocks = idx
            .iter()
            .map(|i| Block {
                ln1: ln(i[0], i[1]),
                c_attn: lin(i[2], i[3], c, 3 * aw, false),
                c_proj: lin(i[4], i[5], aw, c, true),
                ln2: ln(i[6], i[7]),
                fc: lin(i[8], i[9], c, mw, false),
                fc_proj: lin(i[10], i[11], mw, c, true),
            })
            .collect();
        let block_ranges = idx.iter().map(|i| span(i.iter().map(|k| t.at(*k).range()))).collect();
        let head_ref = t.at(head.unwrap_or(wte));
        let model = Gpt2 {
            block_ranges,
            c,
            heads: heads.len(),
            head_dim: d,
            inner: mw,
            tp,
            sp,
            wte: t.at(wte),
            vocab_first: vocab.start,
            wpe: t.at(wpe),
            blocks,
            ln_f: ln(lnf_w, lnf_b),
            head: LmHead { weight: head_ref, vocab: vocab.len(), hidden: c, first: vocab.start, total: v },
            wte_slices: t.slices(t.at(wte)),
            head_slices: t.slices(head_ref),
        };
        Ok((t, model))
    }

    /// The width of the attention this rank runs: its heads' features.
    fn attn(&self) -> usize {
        self.heads * self.head_dim
    }

    /// The length of each activation buffer for `batch` sequences of `seq` tokens (the head's
    /// logits in blocks of `block_floats`), in the order `acts` allocates them (so memory is
    /// known before anything is allocated).
    fn acts_lens(&self, batch: usize, seq: usize, block_floats: usize) -> [usize; 23] {
        let (n, c, l, inner, a) = (batch * seq, self.c, self.blocks.len(), self.inner, self.attn());
        let sp = usize::from(!self.sp.is_whole());
        [
            (l + 1) * n * c,      // res
            l * n * c,            // mid
            l * n * c,            // ln1
            l * n,                // ln1 mean
            l * n,                // ln1 rstd
            l * n * 3 * a,        // qkv
            l * n * a,            // att
            l * n * self.heads,   // lse
            l * n * c,            // ln2
            l * n,                // ln2 mean
            l * n,                // ln2 rstd
            l * n * inner,        // fc
            n * inner,            // gelu
            n * c,                // lnf
            n,                    // lnf mean
            n,                    // lnf rstd
            n * c,                // dres
            n * c.max(a),         // dc
            n * inner.max(3 * a), // dbig
            head_scratch_len(&self.head, &self.head_slices, n, block_floats),
            sp * l * n * a, // att_full
            sp * n * a,     // datt_full
            sp * n * 3 * a, // dqkv_full
        ]
    }

    /// Floats of activations and backward scratch on the CPU for `batch` sequences of `seq`
    /// tokens.
    pub fn acts_elems(&self, batch: usize, seq: usize) -> usize {
        self.acts_lens(batch, seq, Cpu::HEAD_BLOCK_FLOATS).iter().sum()
    }

    pub fn acts<B: Backend>(&self, be: &B, batch: usize, seq: usize) -> Result<Acts<B>> {
        let lens = self.acts_lens(batch, seq, B::HEAD_BLOCK_FLOATS);
        let t = |i: usize| be.alloc(lens[i]);
        let f = |i: usize| be.alloc_f32(lens[i]);
        Ok(Acts {
            n: batch * seq,
            res: t(0)?,
            mid: t(1)?,
            ln1: t(2)?,
            ln1_stats: (f(3)?, f(4)?),
            qkv: t(5)?,
            att: t(6)?,
            lse: f(7)?,
            ln2: t(8)?,
            ln2_stats: (f(9)?, f(10)?),
            fc: t(11)?,
            gelu: t(12)?,
            lnf: t(13)?,
            lnf_stats: (f(14)?, f(15)?),
            dres: t(16)?,
            dc: t(17)?,
            dbig: t(18)?,
            logits: t(19)?,
            att_full: t(20)?,
            datt_full: t(21)?,
            dqkv_full: t(22)?,
            losses: be.losses(batch * seq)?,
        })
    }

    /// Attention's shape for `b` sequences of `seq` tokens (this rank's part of each): whole
    /// sequences, for this rank's heads.
    fn shape(&self, b: usize, seq: usize) -> AttnShape {
        let (n, h) = (self.sp.size, self.heads / self.sp.size);
        AttnShape { batch: b, seq: seq * n, heads: h, kv_heads: h, dim: self.head_dim }
    }

    /// Sequence parallelism: the columns of each rank's head group in a fused QKV row, and in an
    /// attention output row.
    fn head_groups(&self) -> (HeadGroups, HeadGroups) {
        let (a, n) = (self.attn(), self.sp.size);
        (HeadGroups { parts: vec![(0, a / n), (a, a / n), (2 * a, a / n)] }, HeadGroups { parts: vec![(0, a / n)] })
    }

    /// The batch's token embedding: the residual stream before block 0.
    pub fn embed<B: Backend>(&self, be: &B, pa: &mut dyn Params<B>, a: &mut Acts<B>, x: &Batch<'_, B>) -> Result<()> {
        let (tp, first, pos0) = (self.tp, self.vocab_first, self.sp.rank * x.seq);
        let wpe = Some((self.wpe, pos0));
        embed(be, pa, tp, &self.wte_slices, self.wte, first, wpe, B::act_mut(&mut a.res), x.inputs, x.seq, self.c)
    }

    /// Blocks `range` forward, from the residual stream before `range.start` (the embedding's or
    /// the earlier blocks') to the one after `range.end - 1`; their saved activations stay in `a`.
    pub fn blocks_forward<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        a: &mut Acts<B>,
        x: &Batch<'_, B>,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let (c, n, cap, tp) = (self.c, x.rows(), a.n, self.tp);
        let (nc, inner, aw) = (n * c, self.inner, self.attn());
        let ulysses = !self.sp.is_whole();
        for l in range {
            let blk = &self.blocks[l];
            pa.need(&[self.block_ranges[l].clone()])?;
            let p = pa.get();
            let lc = l * cap * c;
            let res = B::act(&a.res);
            let (mean, rstd) = (at_mut(B::f32s_mut(&mut a.ln1_stats.0), l, cap, n), at_mut(B::f32s_mut(&mut a.ln1_stats.1), l, cap, n));
            blk.ln1.forward(be, p, at(res, l, cap * c, nc), at_mut(B::act_mut(&mut a.ln1), l, cap * c, nc), mean, rstd)?;
            let ln1 = Mat::new(B::act(&a.ln1), lc, n, c);
            if ulysses {
                // This rank's tokens with every head into scratch; the all-to-all fills the
                // layer's QKV with whole sequences for this rank's heads.
                blk.c_attn.forward(be, p, ln1, MatMut::new(B::act_mut(&mut a.dbig), 0, n, 3 * aw), Overwrite)?;
                let (groups, local) = (self.head_groups().0, Mat::new(B::act(&a.dbig), 0, n, 3 * aw));
                seq_group_of(pa)?.seq_to_heads(local, x.b, &groups, at_mut(B::act_mut(&mut a.qkv), l, cap * 3 * aw, n * 3 * aw))?;
            } else {
                blk.c_attn.forward(be, p, ln1, MatMut::new(B::act_mut(&mut a.qkv), l * cap * 3 * aw, n, 3 * aw), Overwrite)?;
            }
            let lse = at_mut(B::f32s_mut(&mut a.lse), l, cap * self.heads, n * self.heads);
            let att = if ulysses {
                at_mut(B::act_mut(&mut a.att_full), l, cap * aw, n * aw)
            } else {
                at_mut(B::act_mut(&mut a.att), l, cap * aw, n * aw)
            };
            be.attention_forward(self.shape(x.b, x.seq), at(B::act(&a.qkv), l, cap * 3 * aw, n * 3 * aw), att, lse)?;
            if ulysses {
                let (groups, full) = (self.head_groups().1, at(B::act(&a.att_full), l, cap * aw, n * aw));
                seq_group_of(pa)?.heads_to_seq(full, x.b, &groups, MatMut::new(B::act_mut(&mut a.att), l * cap * aw, n, aw))?;
            }
            let p = pa.get();
            // The residual stream, once: a row-parallel layer's ranks each add a partial sum.
            residual(be, tp, at_mut(B::act_mut(&mut a.mid), l, cap * c, nc), at(res, l, cap * c, nc))?;
            let att = Mat::new(B::act(&a.att), l * cap * aw, n, aw);
            blk.c_proj.forward(be, p, att, MatMut::new(B::act_mut(&mut a.mid), lc, n, c), Add)?;
            tp_sum(pa, tp, at_mut(B::act_mut(&mut a.mid), l, cap * c, nc))?;
            let p = pa.get();
            let mid = at(B::act(&a.mid), l, cap * c, nc);
            let (mean, rstd) = (at_mut(B::f32s_mut(&mut a.ln2_stats.0), l, cap, n), at_mut(B::f32s_mut(&mut a.ln2_stats.1), l, cap, n));
            blk.ln2.forward(be, p, mid.clone(), at_mut(B::act_mut(&mut a.ln2), l, cap * c, nc), mean, rstd)?;
            let ln2 = Mat::new(B::act(&a.ln2), lc, n, c);
            blk.fc.forward(be, p, ln2, MatMut::new(B::act_mut(&mut a.fc), l * cap * inner, n, inner), Overwrite)?;
            be.gelu_forward(SpanMut::at(B::act_mut(&mut a.gelu), 0, n * inner), at(B::act(&a.fc), l, cap * inner, n * inner))?;
            let res = B::act_mut(&mut a.res);
            residual(be, tp, at_mut(&mut *res, l + 1, cap * c, nc), mid)?;
            blk.fc_proj.forward(be, p, Mat::new(B::act(&a.gelu), 0, n, inner), MatMut::new(res, (l + 1) * cap * c, n, c), Add)?;
            tp_sum(pa, tp, at_mut(B::act_mut(&mut a.res), l + 1, cap * c, nc))?;
        }
        Ok(())
    }

    /// The final norm after the last block: the head's input.
    pub fn final_norm<B: Backend>(&self, be: &B, pa: &mut dyn Params<B>, a: &mut Acts<B>, x: &Batch<'_, B>) -> Result<()> {
        let (c, n, cap) = (self.c, x.rows(), a.n);
        let nc = n * c;
        let l = self.blocks.len();
        need_final_norm(pa, &self.head, &self.head_slices, self.ln_f.range())?;
        let (mean, rstd) = (SpanMut::at(B::f32s_mut(&mut a.lnf_stats.0), 0, n), SpanMut::at(B::f32s_mut(&mut a.lnf_stats.1), 0, n));
        self.ln_f.forward(be, pa.get(), at(B::act(&a.res), l, cap * c, nc), SpanMut::at(B::act_mut(&mut a.lnf), 0, nc), mean, rstd)
    }

    /// The head after `final_norm`: the summed loss, the head's and the final norm's gradients,
    /// and the loss's gradient at the residual stream after the last block (in `a`).
    pub fn head_backward<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        g: &mut B::F32,
        a: &mut Acts<B>,
        x: &Batch<'_, B>,
        scale: f32,
    ) -> Result<f64> {
        let (c, n, cap) = (self.c, x.rows(), a.n);
        let nc = n * c;
        let untied = self.head.weight != self.wte;
        let (h, dh, logits) = (B::act(&a.lnf), B::act_mut(&mut a.dc), B::act_mut(&mut a.logits));
        let (head, slices) = (&self.head, &self.head_slices);
        head_loss(be, pa, self.tp, head, slices, untied, h, x.targets, logits, &mut a.losses, g, dh, scale, self.ln_f.range())?;
        let loss = be.loss_sum(&mut a.losses, n)?;
        be.zero(SpanMut::at(B::act_mut(&mut a.dres), 0, nc))?;
        let l_all = self.blocks.len();
        let (dout, xs) = (at(B::act(&a.dc), 0, nc, nc), at(B::act(&a.res), l_all, cap * c, nc));
        let (mean, rstd) = (at(B::f32s(&a.lnf_stats.0), 0, n, n), at(B::f32s(&a.lnf_stats.1), 0, n, n));
        self.ln_f.backward(be, pa.get(), g, SpanMut::at(B::act_mut(&mut a.dres), 0, nc), dout, xs, mean, rstd)?;
        pa.grads_ready(g, self.ln_f.range())?;
        Ok(loss)
    }

    /// Blocks `range` backward, the last first: from the gradient at the residual stream after
    /// `range.end - 1` to the one before `range.start`, with the activations `blocks_forward`
    /// saved.
    pub fn blocks_backward<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        g: &mut B::F32,
        a: &mut Acts<B>,
        x: &Batch<'_, B>,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let (c, n, cap, inner, tp) = (self.c, x.rows(), a.n, self.inner, self.tp);
        let (nc, ni, aw) = (n * c, n * inner, self.attn());
        let ulysses = !self.sp.is_whole();
        for l in range.rev() {
            let blk = &self.blocks[l];
            pa.need(&[self.block_ranges[l].clone()])?;
            let lc = l * cap * c;
            // MLP: the GELU output is recomputed rather than stored per layer. Each weight's
            // gradient is announced final as soon as it is (ZeRO-2/3 send it off at once).
            let fc = at(B::act(&a.fc), l, cap * inner, ni);
            be.gelu_forward(SpanMut::at(B::act_mut(&mut a.gelu), 0, ni), fc.clone())?;
            let (gelu, dres) = (Mat::new(B::act(&a.gelu), 0, n, inner), Mat::new(B::act(&a.dres), 0, n, c));
            blk.fc_proj.backward(be, pa.get(), g, gelu, dres, Some((MatMut::new(B::act_mut(&mut a.dbig), 0, n, inner), Overwrite)))?;
            pa.grads_ready(g, blk.fc_proj.range())?;
            be.gelu_backward_inplace(SpanMut::at(B::act_mut(&mut a.dbig), 0, ni), fc)?;
            let (ln2, dbig) = (Mat::new(B::act(&a.ln2), lc, n, c), Mat::new(B::act(&a.dbig), 0, n, inner));
            blk.fc.backward(be, pa.get(), g, ln2, dbig, Some((MatMut::new(B::act_mut(&mut a.dc), 0, n, c), Overwrite)))?;
            pa.grads_ready(g, blk.fc.range())?;
            tp_sum(pa, tp, SpanMut::at(B::act_mut(&mut a.dc), 0, nc))?;
            let (dc, mid) = (at(B::act(&a.dc), 0, nc, nc), at(B::act(&a.mid), l, cap * c, nc));
            let (mean, rstd) = (at(B::f32s(&a.ln2_stats.0), l, cap, n), at(B::f32s(&a.ln2_stats.1), l, cap, n));
            blk.ln2.backward(be, pa.get(), g, SpanMut::at(B::act_mut(&mut a.dres), 0, nc), dc, mid, mean, rstd)?;
            pa.grads_ready(g, blk.ln2.range())?;
            // Attention.
            let (att, dres) = (Mat::new(B::act(&a.att), l * cap * aw, n, aw), Mat::new(B::act(&a.dres), 0, n, c));
            blk.c_proj.backward(be, pa.get(), g, att, dres, Some((MatMut::new(B::act_mut(&mut a.dc), 0, n, aw), Overwrite)))?;
            pa.grads_ready(g, blk.c_proj.range())?;
            let qkv = at(B::act(&a.qkv), l, cap * 3 * aw, n * 3 * aw);
            let lse = at(B::f32s(&a.lse), l, cap * self.heads, n * self.heads);
            if ulysses {
                // The output's gradient to whole sequences for this rank's heads, attention's
                // backward there, and the QKV gradient back to this rank's tokens.
                let groups = self.head_groups();
                let datt = Mat::new(B::act(&a.dc), 0, n, aw);
                seq_group_of(pa)?.seq_to_heads(datt, x.b, &groups.1, SpanMut::at(B::act_mut(&mut a.datt_full), 0, n * aw))?;
                let (qkv, lse) =
                    (at(B::act(&a.qkv), l, cap * 3 * aw, n * 3 * aw), at(B::f32s(&a.lse), l, cap * self.heads, n * self.heads));
                let (att, datt) = (at(B::act(&a.att_full), l, cap * aw, n * aw), at(B::act(&a.datt_full), 0, n * aw, n * aw));
                be.attention_backward(
                    self.shape(x.b, x.seq),
                    qkv,
                    att,
                    lse,
                    datt,
                    SpanMut::at(B::act_mut(&mut a.dqkv_full), 0, n * 3 * aw),
                )?;
                let full = at(B::act(&a.dqkv_full), 0, n * 3 * aw, n * 3 * aw);
                seq_group_of(pa)?.heads_to_seq(full, x.b, &groups.0, MatMut::new(B::act_mut(&mut a.dbig), 0, n, 3 * aw))?;
            } else {
                let (att, dc) = (at(B::act(&a.att), l, cap * aw, n * aw), at(B::act(&a.dc), 0, n * aw, n * aw));
                be.attention_backward(self.shape(x.b, x.seq), qkv, att, lse, dc, SpanMut::at(B::act_mut(&mut a.dbig), 0, n * 3 * aw))?;
            }
            let (ln1, dqkv) = (Mat::new(B::act(&a.ln1), lc, n, c), Mat::new(B::act(&a.dbig), 0, n, 3 * aw));
            blk.c_attn.backward(be, pa.get(), g, ln1, dqkv, Some((MatMut::new(B::act_mut(&mut a.dc), 0, n, c), Overwrite)))?;
            pa.grads_ready(g, blk.c_attn.range())?;
            tp_sum(pa, tp, SpanMut::at(B::act_mut(&mut a.dc), 0, nc))?;
            let (dc, xs) = (at(B::act(&a.dc), 0, nc, nc), at(B::act(&a.res), l, cap * c, nc));
            let (mean, rstd) = (at(B::f32s(&a.ln1_stats.0), l, cap, n), at(B::f32s(&a.ln1_stats.1), l, cap, n));
            blk.ln1.backward(be, pa.get(), g, SpanMut::at(B::act_mut(&mut a.dres), 0, nc), dc, xs, mean, rstd)?;
            pa.grads_ready(g, blk.ln1.range())?;
        }
        Ok(())
    }

    /// The token and position embeddings' gradients, from the residual stream's before block 0.
    pub fn embed_backward<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        g: &mut B::F32,
        a: &mut Acts<B>,
        x: &Batch<'_, B>,
    ) -> Result<()> {
        let nc = x.rows() * self.c;
        let (wte, first, dres) = (self.wte.range(), self.vocab_first, at(B::act(&a.dres), 0, nc, nc));
        // This rank's positions of the table (its part of each sequence).
        let wpe = self.wpe.offset + self.sp.rank * x.seq * self.c..self.wpe.offset + self.wpe.len;
        be.embedding_backward(g, wte, first, Some(wpe), dres, x.inputs, x.seq, self.c)?;
        pa.grads_ready(g, self.wpe.range())?;
        pa.grads_ready(g, self.wte.range())
    }

    /// After `final_norm`: the final hidden states (`[b·seq, hidden]`), the head, and the
    /// buffers it runs on.
    pub fn head_input<'a, B: Backend>(&self, a: &'a mut Acts<B>) -> Hidden<'a, B> {
        (B::act(&a.lnf), self.head, B::act_mut(&mut a.logits), &mut a.losses)
    }
}

/// The residual stream `x` into `out`, where a row-parallel layer adds its output next: on the
/// lead rank of a tensor-parallel group (or a whole model), zeros on the others, so that the
/// group's sum holds it once.
pub(super) fn residual<B: Backend>(be: &B, tp: TpRank, out: SpanMut<'_, B::Act>, x: crate::backend::Span<'_, B::Act>) -> Result<()> {
    if tp.lead() {
        be.copy(out, x)
    } else {
        be.zero(out)
    }
}
