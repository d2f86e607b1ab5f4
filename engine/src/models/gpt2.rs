//! GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm blocks, GELU (tanh) MLP, biases
//! everywhere, head tied to the token embedding unless the config unties it. Written once, over
//! either backend (`crate::backend`).

use gantry_kernels::cpu::attention::AttnShape;

use super::hooks::{gather_seq, group_of, scatter_seq, seq_group_of, span, tp_sum, Params};
use super::sliced::{embed, head_loss, head_scratch_len, need_final_norm};
use super::sp::{HeadGroups, SpRank};
use super::{at, at_mut, Batch, Hidden, ModelConfig, PpStage, TpRank};
use crate::backend::Accumulate::{Add, Overwrite};
use crate::backend::{Backend, Cpu, Mat, MatMut, Span, SpanMut};
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
    /// Split_gather: a column-parallel layer's input gathered over whole sequences (or the
    /// residual gradient, for a row-parallel layer's backward), and an input gradient summed
    /// onto this rank's part of the sequence (empty otherwise).
    gathered: B::ActBuf,
    dlocal: B::ActBuf,
    losses: B::Losses,
}

impl Acts<Cpu> {
    /// The residual stream's stack (`layers + 1` of them).
    pub(super) fn residual_mut(&mut self) -> &mut [f32] {
        &mut self.res
    }

    /// The gradient at the residual stream.
    pub(super) fn residual_grad_mut(&mut self) -> &mut [f32] {
        &mut self.dres
    }

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
            &self.gathered,
            &self.dlocal,
        ]
        .iter()
        .map(|v| v.len())
        .sum()
    }
}

impl Gpt2 {
    /// The model, or rank `tp.rank`'s part of it (see `models::tp`): the table's entries keep
    /// their global names and shapes, with the part this rank holds.
    pub fn new(cfg: &ModelConfig, chunking: Chunking, tp: TpRank, sp: SpRank, stage: &PpStage) -> Result<(ParamTable, Gpt2)> {
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
        // A pipeline stage holds its blocks, the embedding on the first, the head on the last.
        b.hold(stage.first() || (stage.last() && cfg.tie_embeddings));
        let wte = b.add_sharded("transformer.wte.weight", &[v, c], tp.rows(0, v), Init::Normal { std });
        b.hold(stage.first());
        let wpe = b.add("transformer.wpe.weight", &[cfg.max_positions, c], Init::Normal { std });
        let mut idx = Vec::new();
        for i in 0..l {
            b.hold(stage.holds(i));
            let p = format!("transformer.h.{i}.");
            // Conv1D weights are `[in, out]`: column-parallel layers cut dimension 1, row-parallel
            // ones dimension 0.
            let block = [
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
            ];
            if stage.holds(i) {
                idx.push(block);
            }
        }
        b.hold(stage.last());
        let lnf_w = b.add("transformer.ln_f.weight", &[c], Init::Ones);
        let lnf_b = b.add("transformer.ln_f.bias", &[c], Init::Zeros);
        let head = (!cfg.tie_embeddings).then(|| b.add_sharded("lm_head.weight", &[v, c], tp.rows(0, v), Init::Normal { std }));
        b.hold(true);
        let t = b.build(chunking);
        let lin = |w: usize, bias: usize, d_in: usize, d_out: usize, row_parallel: bool| Linear {
            weight: t.at(w),
            bias: Some(t.at(bias)),
            d_in,
            d_out,
            layout: WeightLayout::InOut,
            partial: row_parallel && !tp.lead(),
            lead_bias_grad: row_parallel && tp.splits_seq(),
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
    fn acts_lens(&self, batch: usize, seq: usize, block_floats: usize) -> [usize; 25] {
        let (n, c, l, inner, a) = (batch * seq, self.c, self.blocks.len(), self.inner, self.attn());
        let sp = usize::from(self.sp.is_ulysses());
        // Split_gather: the residual stream and the norms hold this rank's part of each
        // sequence.
        let (sg, nl) = (usize::from(self.tp.splits_seq()), n / self.tp.seq_parts());
        [
            (l + 1) * nl * c,     // res
            l * nl * c,           // mid
            l * nl * c,           // ln1
            l * nl,               // ln1 mean
            l * nl,               // ln1 rstd
            l * n * 3 * a,        // qkv
            l * n * a,            // att
            l * n * self.heads,   // lse
            l * nl * c,           // ln2
            l * nl,               // ln2 mean
            l * nl,               // ln2 rstd
            l * n * inner,        // fc
            n * inner,            // gelu
            nl * c,               // lnf
            nl,                   // lnf mean
            nl,                   // lnf rstd
            nl * c,               // dres
            n * c.max(a),         // dc
            n * inner.max(3 * a), // dbig
            head_scratch_len(&self.head, &self.head_slices, n, block_floats),
            sp * l * n * a, // att_full
            sp * n * a,     // datt_full
            sp * n * 3 * a, // dqkv_full
            sg * n * c,     // gathered
            sg * nl * c,    // dlocal
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
            gathered: t(23)?,
            dlocal: t(24)?,
            losses: be.losses(batch * seq)?,
        })
    }

    /// Attention's shape for `b` sequences of `seq` tokens (this rank's part of each): whole
    /// sequences, for this rank's heads.
    fn shape(&self, b: usize, seq: usize) -> AttnShape {
        if self.sp.is_ring() {
            // Two local sequences (zigzag chunks) of each whole one, every head.
            return AttnShape { batch: b / 2, seq, heads: self.heads, kv_heads: self.heads, dim: self.head_dim };
        }
        let n = if self.sp.is_ulysses() { self.sp.size } else { 1 };
        let h = self.heads / n;
        AttnShape { batch: b, seq: seq * n, heads: h, kv_heads: h, dim: self.head_dim }
    }

    /// Sequence parallelism: the columns of each rank's head group in a fused QKV row, and in an
    /// attention output row.
    fn head_groups(&self) -> (HeadGroups, HeadGroups) {
        let (a, n) = (self.attn(), self.sp.size);
        debug_assert!(self.sp.is_ulysses());
        (HeadGroups { parts: vec![(0, a / n), (a, a / n), (2 * a, a / n)] }, HeadGroups { parts: vec![(0, a / n)] })
    }

    /// The batch's token embedding: the residual stream before block 0.
    pub fn embed<B: Backend>(&self, be: &B, pa: &mut dyn Params<B>, a: &mut Acts<B>, x: &Batch<'_, B>) -> Result<()> {
        let (tp, first, pos0) = (self.tp, self.vocab_first, self.sp.rank * x.seq);
        let (wpe, c) = (Some((self.wpe, pos0)), self.c);
        if tp.splits_seq() {
            // Every row's partial embedding (the positions on the lead), reduce-scattered onto
            // this rank's part of each sequence.
            let full = B::act_mut(&mut a.gathered);
            embed(be, pa, tp, &self.wte_slices, self.wte, first, wpe, &mut *full, x.inputs, x.seq, c)?;
            let (rows, b) = (x.rows(), x.b);
            let local = SpanMut::at(B::act_mut(&mut a.res), 0, rows / tp.size * c);
            return group_of(pa, tp)?.scatter_seq(Span::at(&*full, 0, rows * c), b, local, Overwrite);
        }
        if self.sp.is_ring() {
            // Each local sequence is a zigzag chunk: its positions start at the chunk's place.
            embed(be, pa, tp, &self.wte_slices, self.wte, first, None, B::act_mut(&mut a.res), x.inputs, x.seq, c)?;
            pa.need(&[self.wpe.range()])?;
            let part = x.seq * c;
            for i in 0..x.b {
                let from = self.wpe.offset + self.sp.first_position(i, x.seq) * c;
                let positions = Span::new(pa.get().master, from..self.wpe.offset + self.wpe.len);
                be.add_positions(SpanMut::at(B::act_mut(&mut a.res), i * part, part), positions, x.seq, c)?;
            }
            return Ok(());
        }
        embed(be, pa, tp, &self.wte_slices, self.wte, first, wpe, B::act_mut(&mut a.res), x.inputs, x.seq, c)
    }

    /// Blocks `range` forward, from the residual stream before `range.start` (the embedding's or
    /// the earlier blocks') to the one after `range.end - 1`; their saved activations stay in `a`.
    /// Under split_gather the residual stream and the norms hold this rank's part of each
    /// sequence (`nl` rows), the projections, attention and the MLP every row (`n`).
    pub fn blocks_forward<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        a: &mut Acts<B>,
        x: &Batch<'_, B>,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let (c, n, cap, tp) = (self.c, x.rows(), a.n, self.tp);
        let (nl, capl) = (n / tp.seq_parts(), cap / tp.seq_parts());
        let (nlc, inner, aw) = (nl * c, self.inner, self.attn());
        let (ulysses, ring) = (self.sp.is_ulysses(), self.sp.is_ring());
        for l in range {
            let blk = &self.blocks[l];
            pa.need(&[self.block_ranges[l].clone()])?;
            let (mean, rstd) = (at_mut(B::f32s_mut(&mut a.ln1_stats.0), l, capl, nl), at_mut(B::f32s_mut(&mut a.ln1_stats.1), l, capl, nl));
            let (res, ln1) = (at(B::act(&a.res), l, capl * c, nlc), at_mut(B::act_mut(&mut a.ln1), l, capl * c, nlc));
            blk.ln1.forward(be, pa.get(), res, ln1, mean, rstd)?;
            let ln1 = gather_seq(pa, tp, x.b, at(B::act(&a.ln1), l, capl * c, nlc), B::act_mut(&mut a.gathered))?;
            let ln1 = Mat::new(ln1.buf, ln1.range.start, n, c);
            let p = pa.get();
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
            let qkv = at(B::act(&a.qkv), l, cap * 3 * aw, n * 3 * aw);
            if ring {
                seq_group_of(pa)?.ring_attention_forward(self.shape(x.b, x.seq), qkv, att, lse)?;
            } else {
                be.attention_forward(self.shape(x.b, x.seq), qkv, att, lse)?;
            }
            if ulysses {
                let (groups, full) = (self.head_groups().1, at(B::act(&a.att_full), l, cap * aw, n * aw));
                seq_group_of(pa)?.heads_to_seq(full, x.b, &groups, MatMut::new(B::act_mut(&mut a.att), l * cap * aw, n, aw))?;
            }
            let att = Mat::new(B::act(&a.att), l * cap * aw, n, aw);
            let (mid, res) = (at_mut(B::act_mut(&mut a.mid), l, capl * c, nlc), at(B::act(&a.res), l, capl * c, nlc));
            row_parallel_out(be, pa, tp, x.b, c, mid, res, B::act_mut(&mut a.dc), |p, y, acc| blk.c_proj.forward(be, p, att, y, acc))?;
            let (mean, rstd) = (at_mut(B::f32s_mut(&mut a.ln2_stats.0), l, capl, nl), at_mut(B::f32s_mut(&mut a.ln2_stats.1), l, capl, nl));
            let (mid, ln2) = (at(B::act(&a.mid), l, capl * c, nlc), at_mut(B::act_mut(&mut a.ln2), l, capl * c, nlc));
            blk.ln2.forward(be, pa.get(), mid, ln2, mean, rstd)?;
            let ln2 = gather_seq(pa, tp, x.b, at(B::act(&a.ln2), l, capl * c, nlc), B::act_mut(&mut a.gathered))?;
            let ln2 = Mat::new(ln2.buf, ln2.range.start, n, c);
            blk.fc.forward(be, pa.get(), ln2, MatMut::new(B::act_mut(&mut a.fc), l * cap * inner, n, inner), Overwrite)?;
            be.gelu_forward(SpanMut::at(B::act_mut(&mut a.gelu), 0, n * inner), at(B::act(&a.fc), l, cap * inner, n * inner))?;
            let gelu = Mat::new(B::act(&a.gelu), 0, n, inner);
            let (out, mid) = (at_mut(B::act_mut(&mut a.res), l + 1, capl * c, nlc), at(B::act(&a.mid), l, capl * c, nlc));
            row_parallel_out(be, pa, tp, x.b, c, out, mid, B::act_mut(&mut a.dc), |p, y, acc| blk.fc_proj.forward(be, p, gelu, y, acc))?;
        }
        Ok(())
    }

    /// The final norm after the last block: the head's input.
    pub fn final_norm<B: Backend>(&self, be: &B, pa: &mut dyn Params<B>, a: &mut Acts<B>, x: &Batch<'_, B>) -> Result<()> {
        let (c, nl, capl) = (self.c, x.rows() / self.tp.seq_parts(), a.n / self.tp.seq_parts());
        let nlc = nl * c;
        let l = self.blocks.len();
        need_final_norm(pa, &self.head, &self.head_slices, self.ln_f.range())?;
        let (mean, rstd) = (SpanMut::at(B::f32s_mut(&mut a.lnf_stats.0), 0, nl), SpanMut::at(B::f32s_mut(&mut a.lnf_stats.1), 0, nl));
        self.ln_f.forward(be, pa.get(), at(B::act(&a.res), l, capl * c, nlc), SpanMut::at(B::act_mut(&mut a.lnf), 0, nlc), mean, rstd)
    }

    /// The head after `final_norm`: the summed loss, the head's and the final norm's gradients,
    /// and the loss's gradient at the residual stream after the last block (in `a`). Under
    /// split_gather the head runs on every row (the final norm's output gathered), and its
    /// input gradient is reduce-scattered back onto this rank's part.
    pub fn head_backward<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        g: &mut B::F32,
        a: &mut Acts<B>,
        x: &Batch<'_, B>,
        scale: f32,
    ) -> Result<f64> {
        let (c, n, tp) = (self.c, x.rows(), self.tp);
        let (nl, capl) = (n / tp.seq_parts(), a.n / tp.seq_parts());
        let nlc = nl * c;
        let untied = self.head.weight != self.wte;
        let h = gather_seq(pa, tp, x.b, Span::at(B::act(&a.lnf), 0, nlc), B::act_mut(&mut a.gathered))?;
        let (dh, logits) = (B::act_mut(&mut a.dc), B::act_mut(&mut a.logits));
        let (head, slices) = (&self.head, &self.head_slices);
        head_loss(be, pa, tp, head, slices, untied, h.buf, x.targets, logits, &mut a.losses, g, dh, scale, self.ln_f.range())?;
        let loss = be.loss_sum(&mut a.losses, n)?;
        let dout = scatter_seq(pa, tp, x.b, SpanMut::at(B::act_mut(&mut a.dc), 0, n * c), B::act_mut(&mut a.dlocal))?;
        be.zero(SpanMut::at(B::act_mut(&mut a.dres), 0, nlc))?;
        let l_all = self.blocks.len();
        let xs = at(B::act(&a.res), l_all, capl * c, nlc);
        let (mean, rstd) = (at(B::f32s(&a.lnf_stats.0), 0, nl, nl), at(B::f32s(&a.lnf_stats.1), 0, nl, nl));
        self.ln_f.backward(be, pa.get(), g, SpanMut::at(B::act_mut(&mut a.dres), 0, nlc), dout, xs, mean, rstd)?;
        pa.grads_ready(g, self.ln_f.range())?;
        Ok(loss)
    }

    /// Blocks `range` backward, the last first: from the gradient at the residual stream after
    /// `range.end - 1` to the one before `range.start`, with the activations `blocks_forward`
    /// saved. Under split_gather the residual gradient is gathered before each row-parallel
    /// layer's backward, a norm's saved output before each column-parallel one's, and the
    /// column-parallel layers' input gradient reduce-scattered.
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
        let (nl, capl) = (n / tp.seq_parts(), cap / tp.seq_parts());
        let (nc, nlc, ni, aw) = (n * c, nl * c, n * inner, self.attn());
        let (ulysses, ring) = (self.sp.is_ulysses(), self.sp.is_ring());
        for l in range.rev() {
            let blk = &self.blocks[l];
            pa.need(&[self.block_ranges[l].clone()])?;
            // MLP: the GELU output is recomputed rather than stored per layer. Each weight's
            // gradient is announced final as soon as it is (ZeRO-2/3 send it off at once).
            let fc = at(B::act(&a.fc), l, cap * inner, ni);
            be.gelu_forward(SpanMut::at(B::act_mut(&mut a.gelu), 0, ni), fc.clone())?;
            let dres = gather_seq(pa, tp, x.b, Span::at(B::act(&a.dres), 0, nlc), B::act_mut(&mut a.gathered))?;
            let (gelu, dres) = (Mat::new(B::act(&a.gelu), 0, n, inner), Mat::new(dres.buf, dres.range.start, n, c));
            blk.fc_proj.backward(be, pa.get(), g, gelu, dres, Some((MatMut::new(B::act_mut(&mut a.dbig), 0, n, inner), Overwrite)))?;
            pa.grads_ready(g, blk.fc_proj.range())?;
            be.gelu_backward_inplace(SpanMut::at(B::act_mut(&mut a.dbig), 0, ni), fc)?;
            let ln2 = gather_seq(pa, tp, x.b, at(B::act(&a.ln2), l, capl * c, nlc), B::act_mut(&mut a.gathered))?;
            let (ln2, dbig) = (Mat::new(ln2.buf, ln2.range.start, n, c), Mat::new(B::act(&a.dbig), 0, n, inner));
            blk.fc.backward(be, pa.get(), g, ln2, dbig, Some((MatMut::new(B::act_mut(&mut a.dc), 0, n, c), Overwrite)))?;
            pa.grads_ready(g, blk.fc.range())?;
            let dc = scatter_seq(pa, tp, x.b, SpanMut::at(B::act_mut(&mut a.dc), 0, nc), B::act_mut(&mut a.dlocal))?;
            let mid = at(B::act(&a.mid), l, capl * c, nlc);
            let (mean, rstd) = (at(B::f32s(&a.ln2_stats.0), l, capl, nl), at(B::f32s(&a.ln2_stats.1), l, capl, nl));
            blk.ln2.backward(be, pa.get(), g, SpanMut::at(B::act_mut(&mut a.dres), 0, nlc), dc, mid, mean, rstd)?;
            pa.grads_ready(g, blk.ln2.range())?;
            // Attention.
            let dres = gather_seq(pa, tp, x.b, Span::at(B::act(&a.dres), 0, nlc), B::act_mut(&mut a.gathered))?;
            let (att, dres) = (Mat::new(B::act(&a.att), l * cap * aw, n, aw), Mat::new(dres.buf, dres.range.start, n, c));
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
                let dqkv = SpanMut::at(B::act_mut(&mut a.dbig), 0, n * 3 * aw);
                if ring {
                    seq_group_of(pa)?.ring_attention_backward(self.shape(x.b, x.seq), qkv, att, lse, dc, dqkv)?;
                } else {
                    be.attention_backward(self.shape(x.b, x.seq), qkv, att, lse, dc, dqkv)?;
                }
            }
            let ln1 = gather_seq(pa, tp, x.b, at(B::act(&a.ln1), l, capl * c, nlc), B::act_mut(&mut a.gathered))?;
            let (ln1, dqkv) = (Mat::new(ln1.buf, ln1.range.start, n, c), Mat::new(B::act(&a.dbig), 0, n, 3 * aw));
            blk.c_attn.backward(be, pa.get(), g, ln1, dqkv, Some((MatMut::new(B::act_mut(&mut a.dc), 0, n, c), Overwrite)))?;
            pa.grads_ready(g, blk.c_attn.range())?;
            let dc = scatter_seq(pa, tp, x.b, SpanMut::at(B::act_mut(&mut a.dc), 0, nc), B::act_mut(&mut a.dlocal))?;
            let xs = at(B::act(&a.res), l, capl * c, nlc);
            let (mean, rstd) = (at(B::f32s(&a.ln1_stats.0), l, capl, nl), at(B::f32s(&a.ln1_stats.1), l, capl, nl));
            blk.ln1.backward(be, pa.get(), g, SpanMut::at(B::act_mut(&mut a.dres), 0, nlc), dc, xs, mean, rstd)?;
            pa.grads_ready(g, blk.ln1.range())?;
        }
        Ok(())
    }

    /// The token and position embeddings' gradients, from the residual stream's before block 0.
    /// Under split_gather it is gathered over whole sequences first, and the lead alone (which
    /// added the positions) takes the positions' gradient.
    pub fn embed_backward<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        g: &mut B::F32,
        a: &mut Acts<B>,
        x: &Batch<'_, B>,
    ) -> Result<()> {
        let (nc, tp) = (x.rows() * self.c, self.tp);
        let (wte, first) = (self.wte.range(), self.vocab_first);
        let dres = gather_seq(pa, tp, x.b, Span::at(B::act(&a.dres), 0, nc / tp.seq_parts()), B::act_mut(&mut a.gathered))?;
        if self.sp.is_ring() {
            // A local sequence at a time: each starts at its chunk's place.
            let (c, part) = (self.c, x.seq * self.c);
            for i in 0..x.b {
                let wpe = self.wpe.offset + self.sp.first_position(i, x.seq) * c..self.wpe.offset + self.wpe.len;
                let (dres, inputs) = (Span::at(B::act(&a.dres), i * part, part), x.inputs.rows(i * x.seq..(i + 1) * x.seq));
                be.embedding_backward(g, wte.clone(), first, Some(wpe), dres, inputs, x.seq, c)?;
            }
            pa.grads_ready(g, self.wpe.range())?;
            return pa.grads_ready(g, self.wte.range());
        }
        // This rank's positions of the table (its part of each sequence).
        let wpe = self.wpe.offset + self.sp.first_position(0, x.seq) * self.c..self.wpe.offset + self.wpe.len;
        let wpe = (!tp.splits_seq() || tp.lead()).then_some(wpe);
        be.embedding_backward(g, wte, first, wpe, dres, x.inputs, x.seq, self.c)?;
        pa.grads_ready(g, self.wpe.range())?;
        pa.grads_ready(g, self.wte.range())
    }

    /// After `final_norm`: the final hidden states (`[b·seq, hidden]`), the head, and the
    /// buffers it runs on.
    pub fn head_input<'a, B: Backend>(&self, a: &'a mut Acts<B>) -> Hidden<'a, B> {
        (B::act(&a.lnf), self.head, B::act_mut(&mut a.logits), &mut a.losses)
    }
}

/// A row-parallel layer's output (`layer` writes or adds it into the rows it is given) added to
/// the residual stream `x` into `out` (the rows this rank holds, `c` wide, of `b` sequences).
/// Whole or plain tensor-parallel: `out` starts as the residual (on the lead rank; zeros on the
/// others, so the group's sum holds it once), the layer adds its partial sum, the group sums
/// it in place. Under split_gather the layer writes every row's partial sum into `scratch` and
/// the group reduce-scatters it onto the residual, each rank keeping its part of the sequence.
#[allow(clippy::too_many_arguments)]
pub(super) fn row_parallel_out<B: Backend>(
    be: &B,
    pa: &mut dyn Params<B>,
    tp: TpRank,
    b: usize,
    c: usize,
    out: SpanMut<'_, B::Act>,
    x: crate::backend::Span<'_, B::Act>,
    scratch: &mut B::Act,
    layer: impl FnOnce(crate::backend::Weights<'_, B>, MatMut<'_, B::Act>, crate::backend::Accumulate) -> Result<()>,
) -> Result<()> {
    let rows = out.len() / c;
    if tp.splits_seq() {
        let full = rows * tp.size;
        be.copy(SpanMut::new(&mut *out.buf, out.range.clone()), x)?;
        layer(pa.get(), MatMut::new(&mut *scratch, 0, full, c), Overwrite)?;
        return group_of(pa, tp)?.scatter_seq(crate::backend::Span::at(&*scratch, 0, full * c), b, out, Add);
    }
    let at0 = out.range.start;
    residual(be, tp, SpanMut::new(&mut *out.buf, out.range.clone()), x)?;
    layer(pa.get(), MatMut::new(&mut *out.buf, at0, rows, c), Add)?;
    tp_sum(pa, tp, out)
}

/// The residual stream `x` into `out`, where a row-parallel layer adds its output next: on the
/// lead rank of a tensor-parallel group (or a whole model), zeros on the others, so that the
/// group's sum holds it once.
fn residual<B: Backend>(be: &B, tp: TpRank, out: SpanMut<'_, B::Act>, x: crate::backend::Span<'_, B::Act>) -> Result<()> {
    if tp.lead() {
        be.copy(out, x)
    } else {
        be.zero(out)
    }
}
