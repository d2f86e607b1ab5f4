//! LLaMA family (`LlamaForCausalLM`): RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query
//! attention, optional explicit `head_dim`, tied or untied head. Written once, over either
//! backend (`crate::backend`).

use gantry_kernels::cpu::attention::AttnShape;
use gantry_kernels::cpu::rope::RopeTable;

use super::gpt2::row_parallel_out;
use super::hooks::{gather_seq, group_of, scatter_seq, seq_group_of, span, Params};
use super::sliced::{embed, head_loss, head_scratch_len, need_final_norm};
use super::sp::{HeadGroups, SpRank};
use super::{at, at_mut, Batch, Hidden, ModelConfig, PpStage, TpRank};
use crate::backend::Accumulate::{Add, Overwrite};
use crate::backend::{Backend, Cpu, Mat, MatMut, Span, SpanMut};
use crate::nn::{Linear, LmHead, RmsNorm, WeightLayout};
use crate::params::{Chunking, Init, ParamRef, ParamTable, ParamTableBuilder, Shard};
use crate::Result;

#[derive(Clone, Debug)]
struct Block {
    norm1: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm2: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Block {
    /// The block's parameters: one contiguous span of the flat buffer.
    fn range(&self) -> std::ops::Range<usize> {
        let lins = [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down];
        let refs = lins.iter().flat_map(|l| std::iter::once(l.weight).chain(l.bias)).chain([self.norm1.weight, self.norm2.weight]);
        span(refs.map(|r| r.range()))
    }
}

#[derive(Clone, Debug)]
pub struct Llama {
    c: usize,
    /// The query and key/value heads and the MLP width this rank runs (all of them, or its
    /// tensor-parallel part: see `models::tp`).
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inner: usize,
    tp: TpRank,
    /// The part of each sequence this rank runs (see `models::sp`).
    sp: SpRank,
    wte: ParamRef,
    /// The first vocabulary row of `wte` (0, or this rank's part of a vocabulary-parallel one).
    vocab_first: usize,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: LmHead,
    /// The token embedding's and the head's slices (`ParamTable::slices`): under data
    /// parallelism a large one spans several chunks and runs a slice at a time.
    wte_slices: Vec<std::ops::Range<usize>>,
    head_slices: Vec<std::ops::Range<usize>>,
    rope: RopeTable,
}

/// Saved activations (layer-major stacks) and backward scratch for one batch shape, on backend
/// `B`; norm statistics and the attention's log-sum-exp in f32.
pub struct Acts<B: Backend> {
    n: usize,
    res: B::ActBuf,
    mid: B::ActBuf,
    n1: B::ActBuf,
    n1_rstd: B::F32Buf,
    qkv: B::ActBuf,
    att: B::ActBuf,
    lse: B::F32Buf,
    n2: B::ActBuf,
    n2_rstd: B::F32Buf,
    gate: B::ActBuf,
    up: B::ActBuf,
    act: B::ActBuf,
    nf: B::ActBuf,
    nf_rstd: B::F32Buf,
    dres: B::ActBuf,
    dc: B::ActBuf,
    datt: B::ActBuf,
    dqkv: B::ActBuf,
    da: B::ActBuf,
    db: B::ActBuf,
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
    rope: B::Rope,
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
            &self.n1,
            &self.n1_rstd,
            &self.qkv,
            &self.att,
            &self.lse,
            &self.n2,
            &self.n2_rstd,
            &self.gate,
            &self.up,
            &self.act,
            &self.nf,
            &self.nf_rstd,
            &self.dres,
            &self.dc,
            &self.datt,
            &self.dqkv,
            &self.da,
            &self.db,
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

impl Llama {
    /// The model, or rank `tp.rank`'s part of it (see `models::tp`): the table's entries keep
    /// their global names and shapes, with the part this rank holds.
    pub fn new(cfg: &ModelConfig, chunking: Chunking, tp: TpRank, sp: SpRank, stage: &PpStage) -> Result<(ParamTable, Llama)> {
        let (c, v, inner) = (cfg.hidden, cfg.vocab, cfg.intermediate);
        let (h, kvh, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let std = cfg.initializer_range;
        let w = Init::Normal { std };
        // This rank's query heads, key/value heads, MLP columns and vocabulary rows, as features.
        let (heads, kv) = (tp.heads(h)?, tp.kv_heads(h, kvh)?);
        sp.check_heads(heads.len(), kv.len())?;
        let (q_feat, kv_feat) = (heads.start * d..heads.end * d, kv.start * d..kv.end * d);
        let (mlp, vocab) = (tp.part(inner), tp.part(v));
        let mut b = ParamTableBuilder::new();
        // A pipeline stage holds its blocks, the embedding on the first, the head on the last.
        b.hold(stage.first() || (stage.last() && cfg.tie_embeddings));
        let wte = b.add_sharded("model.embed_tokens.weight", &[v, c], tp.rows(0, v), w);
        let mut idx = Vec::new();
        // `torch.nn.Linear` weights are `[out, in]`: column-parallel layers cut dimension 0 (and
        // their bias), row-parallel ones dimension 1 (their bias is whole).
        let col = |r: &std::ops::Range<usize>| (!tp.is_whole()).then(|| Shard::rows(0, r.clone()));
        let row = |r: &std::ops::Range<usize>| (!tp.is_whole()).then(|| Shard::rows(1, r.clone()));
        for i in 0..cfg.layers {
            b.hold(stage.holds(i));
            let p = format!("model.layers.{i}.");
            let mut lin = |name: &str, out: usize, inp: usize, bias: bool, shard: Option<Shard>, local: (usize, usize)| {
                let wi = b.add_sharded(format!("{p}{name}.weight"), &[out, inp], shard.clone(), w);
                let bias_shard = shard.filter(|s| s.axis == 0);
                let bi = bias.then(|| b.add_sharded(format!("{p}{name}.bias"), &[out], bias_shard, Init::Zeros));
                let row_parallel = local.1 != inp;
                (wi, bi, local.1, local.0, row_parallel)
            };
            let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
            let q = lin("self_attn.q_proj", h * d, c, ab, col(&q_feat), (q_feat.len(), c));
            let k = lin("self_attn.k_proj", kvh * d, c, ab, col(&kv_feat), (kv_feat.len(), c));
            let vv = lin("self_attn.v_proj", kvh * d, c, ab, col(&kv_feat), (kv_feat.len(), c));
            let o = lin("self_attn.o_proj", c, h * d, ab, row(&q_feat), (c, q_feat.len()));
            let gate = lin("mlp.gate_proj", inner, c, mb, col(&mlp), (mlp.len(), c));
            let up = lin("mlp.up_proj", inner, c, mb, col(&mlp), (mlp.len(), c));
            let down = lin("mlp.down_proj", c, inner, mb, row(&mlp), (c, mlp.len()));
            let n1 = b.add(format!("{p}input_layernorm.weight"), &[c], Init::Ones);
            let n2 = b.add(format!("{p}post_attention_layernorm.weight"), &[c], Init::Ones);
            if stage.holds(i) {
                idx.push((n1, q, k, vv, o, n2, gate, up, down));
            }
        }
        b.hold(stage.last());
        let norm = b.add("model.norm.weight", &[c], Init::Ones);
        let head = (!cfg.tie_embeddings).then(|| b.add_sharded("lm_head.weight", &[v, c], tp.rows(0, v), w));
        b.hold(true);
        let t = b.build(chunking);
        let lin = |(wi, bi, d_in, d_out, row_parallel): (usize, Option<usize>, usize, usize, bool)| Linear {
            weight: t.at(wi),
            bias: bi.map(|i| t.at(i)),
            d_in,
            d_out,
            layout: WeightLayout::OutIn,
            partial: row_parallel && !tp.lead(),
            lead_bias_grad: row_parallel && tp.splits_seq(),
        };
        let rms = |i: usize| RmsNorm { weight: t.at(i), eps: cfg.norm_eps };
        let blocks = idx
            .into_iter()
            .map(|(n1, q, k, vv, o, n2, gate, up, down)| Block {
                norm1: rms(n1),
                q: lin(q),
                k: lin(k),
                v: lin(vv),
                o: lin(o),
                norm2: rms(n2),
                gate: lin(gate),
                up: lin(up),
                down: lin(down),
            })
            .collect();
        let head_ref = t.at(head.unwrap_or(wte));
        let model = Llama {
            c,
            heads: heads.len(),
            kv_heads: kv.len(),
            head_dim: d,
            inner: mlp.len(),
            tp,
            sp,
            wte: t.at(wte),
            vocab_first: vocab.start,
            blocks,
            norm: rms(norm),
            head: LmHead { weight: head_ref, vocab: vocab.len(), hidden: c, first: vocab.start, total: v },
            wte_slices: t.slices(t.at(wte)),
            head_slices: t.slices(head_ref),
            rope: RopeTable::new(cfg.max_positions, d, cfg.rope_theta),
        };
        Ok((t, model))
    }

    fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// The length of each activation buffer for `batch` sequences of `seq` tokens (the head's
    /// logits in blocks of `block_floats`), in the order `acts` allocates them (so memory is
    /// known before anything is allocated).
    fn acts_lens(&self, batch: usize, seq: usize, block_floats: usize) -> [usize; 26] {
        let (n, c, l) = (batch * seq, self.c, self.blocks.len());
        let (w, hd, inner) = (self.qkv_width(), self.heads * self.head_dim, self.inner);
        let sp = usize::from(self.sp.is_ulysses());
        // Split_gather: the residual stream and the norms hold this rank's part of each
        // sequence.
        let (sg, nl) = (usize::from(self.tp.splits_seq()), n / self.tp.seq_parts());
        [
            (l + 1) * nl * c,   // res
            l * nl * c,         // mid
            l * nl * c,         // n1
            l * nl,             // n1_rstd
            l * n * w,          // qkv
            l * n * hd,         // att
            l * n * self.heads, // lse
            l * nl * c,         // n2
            l * nl,             // n2_rstd
            l * n * inner,      // gate
            l * n * inner,      // up
            n * inner,          // act
            nl * c,             // nf
            nl,                 // nf_rstd
            nl * c,             // dres
            n * c,              // dc
            n * hd,             // datt
            n * w,              // dqkv
            n * inner,          // da
            n * inner,          // db
            head_scratch_len(&self.head, &self.head_slices, n, block_floats),
            sp * l * n * hd, // att_full
            sp * n * hd,     // datt_full
            sp * n * w,      // dqkv_full
            sg * n * c,      // gathered
            sg * nl * c,     // dlocal
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
            n1: t(2)?,
            n1_rstd: f(3)?,
            qkv: t(4)?,
            att: t(5)?,
            lse: f(6)?,
            n2: t(7)?,
            n2_rstd: f(8)?,
            gate: t(9)?,
            up: t(10)?,
            act: t(11)?,
            nf: t(12)?,
            nf_rstd: f(13)?,
            dres: t(14)?,
            dc: t(15)?,
            datt: t(16)?,
            dqkv: t(17)?,
            da: t(18)?,
            db: t(19)?,
            logits: t(20)?,
            att_full: t(21)?,
            datt_full: t(22)?,
            dqkv_full: t(23)?,
            gathered: t(24)?,
            dlocal: t(25)?,
            losses: be.losses(batch * seq)?,
            rope: be.upload_rope(&self.rope)?,
        })
    }

    /// Attention's shape for `b` sequences of `seq` tokens (this rank's part of each): whole
    /// sequences, for this rank's heads (all of them, its tensor-parallel part, or under
    /// sequence parallelism its share).
    fn shape(&self, b: usize, seq: usize) -> AttnShape {
        if self.sp.is_ring() {
            // Two local sequences (zigzag chunks) of each whole one, every head.
            return AttnShape { batch: b / 2, seq, heads: self.heads, kv_heads: self.kv_heads, dim: self.head_dim };
        }
        let n = self.head_split();
        AttnShape { batch: b, seq: seq * n, heads: self.heads / n, kv_heads: self.kv_heads / n, dim: self.head_dim }
    }

    /// The groups Ulysses' all-to-alls split the heads into (1 otherwise).
    fn head_split(&self) -> usize {
        if self.sp.is_ulysses() {
            self.sp.size
        } else {
            1
        }
    }

    /// RoPE on the first `heads` heads of every `stride`-wide row of `x`, rows being sequences
    /// of `seq` tokens from position 0; under ring attention each is a zigzag chunk, rotated at
    /// its place in the whole sequence.
    #[allow(clippy::too_many_arguments)]
    fn rope_apply<B: Backend>(
        &self,
        be: &B,
        x: SpanMut<'_, B::Act>,
        stride: usize,
        heads: usize,
        seq: usize,
        dev: &B::Rope,
        inverse: bool,
    ) -> Result<()> {
        if !self.sp.is_ring() {
            return be.rope_apply(x, stride, heads, seq, 0, &self.rope, dev, inverse);
        }
        let (at0, part) = (x.range.start, seq * stride);
        for i in 0..x.len() / part {
            let pos0 = self.sp.first_position(i, seq);
            be.rope_apply(SpanMut::at(&mut *x.buf, at0 + i * part, part), stride, heads, seq, pos0, &self.rope, dev, inverse)?;
        }
        Ok(())
    }

    /// Sequence parallelism: the columns of each rank's head group in a fused QKV row, and in an
    /// attention output row.
    fn head_groups(&self) -> (HeadGroups, HeadGroups) {
        let (n, d) = (self.head_split(), self.head_dim);
        let (hq, hkv) = (self.heads * d, self.kv_heads * d);
        let qkv = HeadGroups { parts: vec![(0, hq / n), (hq, hkv / n), (hq + hkv, hkv / n)] };
        (qkv, HeadGroups { parts: vec![(0, hq / n)] })
    }

    /// The batch's token embedding: the residual stream before block 0.
    pub fn embed<B: Backend>(&self, be: &B, pa: &mut dyn Params<B>, a: &mut Acts<B>, x: &Batch<'_, B>) -> Result<()> {
        let (tp, first, c) = (self.tp, self.vocab_first, self.c);
        if tp.splits_seq() {
            // Every row's partial embedding, reduce-scattered onto this rank's part of each
            // sequence.
            let full = B::act_mut(&mut a.gathered);
            embed(be, pa, tp, &self.wte_slices, self.wte, first, None, &mut *full, x.inputs, x.seq, c)?;
            let (rows, b) = (x.rows(), x.b);
            let local = SpanMut::at(B::act_mut(&mut a.res), 0, rows / tp.size * c);
            return group_of(pa, tp)?.scatter_seq(Span::at(&*full, 0, rows * c), b, local, Overwrite);
        }
        embed(be, pa, tp, &self.wte_slices, self.wte, first, None, B::act_mut(&mut a.res), x.inputs, x.seq, c)
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
        let (c, n, cap, seq, tp) = (self.c, x.rows(), a.n, x.seq, self.tp);
        let (nl, capl) = (n / tp.seq_parts(), cap / tp.seq_parts());
        let (nlc, w, hd, inner) = (nl * c, self.qkv_width(), self.heads * self.head_dim, self.inner);
        let (q_off, v_off) = (hd, hd + self.kv_heads * self.head_dim);
        let (ulysses, ring) = (self.sp.is_ulysses(), self.sp.is_ring());
        for l in range {
            let blk = &self.blocks[l];
            pa.need(&[blk.range()])?;
            let (lw, lhd, li) = (l * cap * w, l * cap * hd, l * cap * inner);
            blk.norm1.forward(
                be,
                pa.get(),
                at(B::act(&a.res), l, capl * c, nlc),
                at_mut(B::act_mut(&mut a.n1), l, capl * c, nlc),
                at_mut(B::f32s_mut(&mut a.n1_rstd), l, capl, nl),
            )?;
            let n1 = gather_seq(pa, tp, x.b, at(B::act(&a.n1), l, capl * c, nlc), B::act_mut(&mut a.gathered))?;
            let n1 = Mat::new(n1.buf, n1.range.start, n, c);
            let p = pa.get();
            // The projections write this rank's tokens with every head; under sequence
            // parallelism into scratch, from which the all-to-all fills the layer's QKV with
            // whole sequences for this rank's heads.
            let (qkv, at0) = if ulysses { (B::act_mut(&mut a.dqkv), 0) } else { (B::act_mut(&mut a.qkv), lw) };
            blk.q.forward(be, p, n1, MatMut::strided(&mut *qkv, at0, n, hd, w), Overwrite)?;
            blk.k.forward(be, p, n1, MatMut::strided(&mut *qkv, at0 + q_off, n, v_off - q_off, w), Overwrite)?;
            blk.v.forward(be, p, n1, MatMut::strided(&mut *qkv, at0 + v_off, n, w - v_off, w), Overwrite)?;
            if ulysses {
                let groups = &self.head_groups().0;
                seq_group_of(pa)?.seq_to_heads(
                    Mat::new(B::act(&a.dqkv), 0, n, w),
                    x.b,
                    groups,
                    at_mut(B::act_mut(&mut a.qkv), l, cap * w, n * w),
                )?;
            }
            let s = self.shape(x.b, seq);
            let (sw, sheads) = (w / self.head_split(), s.heads + s.kv_heads);
            self.rope_apply(be, SpanMut::at(B::act_mut(&mut a.qkv), lw, n * w), sw, sheads, seq * self.head_split(), &a.rope, false)?;
            let lse = at_mut(B::f32s_mut(&mut a.lse), l, cap * self.heads, n * self.heads);
            let att = if ulysses {
                at_mut(B::act_mut(&mut a.att_full), l, cap * hd, n * hd)
            } else {
                at_mut(B::act_mut(&mut a.att), l, cap * hd, n * hd)
            };
            let qkv = at(B::act(&a.qkv), l, cap * w, n * w);
            if ring {
                seq_group_of(pa)?.ring_attention_forward(s, qkv, att, lse)?;
            } else {
                be.attention_forward(s, qkv, att, lse)?;
            }
            if ulysses {
                let groups = &self.head_groups().1;
                let full = at(B::act(&a.att_full), l, cap * hd, n * hd);
                seq_group_of(pa)?.heads_to_seq(full, x.b, groups, MatMut::new(B::act_mut(&mut a.att), lhd, n, hd))?;
            }
            let att = Mat::new(B::act(&a.att), lhd, n, hd);
            let (mid, res) = (at_mut(B::act_mut(&mut a.mid), l, capl * c, nlc), at(B::act(&a.res), l, capl * c, nlc));
            row_parallel_out(be, pa, tp, x.b, c, mid, res, B::act_mut(&mut a.dc), |p, y, acc| blk.o.forward(be, p, att, y, acc))?;
            blk.norm2.forward(
                be,
                pa.get(),
                at(B::act(&a.mid), l, capl * c, nlc),
                at_mut(B::act_mut(&mut a.n2), l, capl * c, nlc),
                at_mut(B::f32s_mut(&mut a.n2_rstd), l, capl, nl),
            )?;
            let n2 = gather_seq(pa, tp, x.b, at(B::act(&a.n2), l, capl * c, nlc), B::act_mut(&mut a.gathered))?;
            let n2 = Mat::new(n2.buf, n2.range.start, n, c);
            let p = pa.get();
            blk.gate.forward(be, p, n2, MatMut::new(B::act_mut(&mut a.gate), li, n, inner), Overwrite)?;
            blk.up.forward(be, p, n2, MatMut::new(B::act_mut(&mut a.up), li, n, inner), Overwrite)?;
            let (gate, up) = (at(B::act(&a.gate), l, cap * inner, n * inner), at(B::act(&a.up), l, cap * inner, n * inner));
            be.swiglu_forward(SpanMut::at(B::act_mut(&mut a.act), 0, n * inner), gate, up)?;
            let act = Mat::new(B::act(&a.act), 0, n, inner);
            let (out, mid) = (at_mut(B::act_mut(&mut a.res), l + 1, capl * c, nlc), at(B::act(&a.mid), l, capl * c, nlc));
            row_parallel_out(be, pa, tp, x.b, c, out, mid, B::act_mut(&mut a.dc), |p, y, acc| blk.down.forward(be, p, act, y, acc))?;
        }
        Ok(())
    }

    /// The final norm after the last block: the head's input.
    pub fn final_norm<B: Backend>(&self, be: &B, pa: &mut dyn Params<B>, a: &mut Acts<B>, x: &Batch<'_, B>) -> Result<()> {
        let (c, nl, capl) = (self.c, x.rows() / self.tp.seq_parts(), a.n / self.tp.seq_parts());
        let l = self.blocks.len();
        need_final_norm(pa, &self.head, &self.head_slices, self.norm.weight.range())?;
        let (out, rstd) = (SpanMut::at(B::act_mut(&mut a.nf), 0, nl * c), SpanMut::at(B::f32s_mut(&mut a.nf_rstd), 0, nl));
        self.norm.forward(be, pa.get(), at(B::act(&a.res), l, capl * c, nl * c), out, rstd)
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
        let h = gather_seq(pa, tp, x.b, Span::at(B::act(&a.nf), 0, nlc), B::act_mut(&mut a.gathered))?;
        let (dh, logits) = (B::act_mut(&mut a.dc), B::act_mut(&mut a.logits));
        let (head, slices, norm) = (&self.head, &self.head_slices, self.norm.weight.range());
        head_loss(be, pa, tp, head, slices, untied, h.buf, x.targets, logits, &mut a.losses, g, dh, scale, norm)?;
        let loss = be.loss_sum(&mut a.losses, n)?;
        let dout = scatter_seq(pa, tp, x.b, SpanMut::at(B::act_mut(&mut a.dc), 0, n * c), B::act_mut(&mut a.dlocal))?;
        be.zero(SpanMut::at(B::act_mut(&mut a.dres), 0, nlc))?;
        let l_all = self.blocks.len();
        let (xs, rstd) = (at(B::act(&a.res), l_all, capl * c, nlc), at(B::f32s(&a.nf_rstd), 0, nl, nl));
        self.norm.backward(be, pa.get(), g, SpanMut::at(B::act_mut(&mut a.dres), 0, nlc), dout, xs, rstd)?;
        pa.grads_ready(g, self.norm.weight.range())?;
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
        let (c, n, cap, seq, tp) = (self.c, x.rows(), a.n, x.seq, self.tp);
        let (nl, capl) = (n / tp.seq_parts(), cap / tp.seq_parts());
        let (nc, nlc, w, hd, inner) = (n * c, nl * c, self.qkv_width(), self.heads * self.head_dim, self.inner);
        let (q_off, v_off) = (hd, hd + self.kv_heads * self.head_dim);
        let ni = n * inner;
        let (ulysses, ring) = (self.sp.is_ulysses(), self.sp.is_ring());
        for l in range.rev() {
            let blk = &self.blocks[l];
            pa.need(&[blk.range()])?;
            // MLP: silu(gate)·up is recomputed rather than stored per layer.
            let (gate, up) = (at(B::act(&a.gate), l, cap * inner, ni), at(B::act(&a.up), l, cap * inner, ni));
            be.swiglu_forward(SpanMut::at(B::act_mut(&mut a.act), 0, ni), gate.clone(), up.clone())?;
            let dres = gather_seq(pa, tp, x.b, Span::at(B::act(&a.dres), 0, nlc), B::act_mut(&mut a.gathered))?;
            let dres = Mat::new(dres.buf, dres.range.start, n, c);
            // Each weight's gradient is announced final as soon as it is, so that under ZeRO-2/3
            // it leaves this rank while the rest of the block is still running backward.
            let act = Mat::new(B::act(&a.act), 0, n, inner);
            blk.down.backward(be, pa.get(), g, act, dres, Some((MatMut::new(B::act_mut(&mut a.da), 0, n, inner), Overwrite)))?;
            pa.grads_ready(g, blk.down.range())?;
            be.swiglu_backward(SpanMut::at(B::act_mut(&mut a.da), 0, ni), SpanMut::at(B::act_mut(&mut a.db), 0, ni), gate, up)?;
            let n2 = gather_seq(pa, tp, x.b, at(B::act(&a.n2), l, capl * c, nlc), B::act_mut(&mut a.gathered))?;
            let n2 = Mat::new(n2.buf, n2.range.start, n, c);
            let (da, db) = (Mat::new(B::act(&a.da), 0, n, inner), Mat::new(B::act(&a.db), 0, n, inner));
            blk.gate.backward(be, pa.get(), g, n2, da, Some((MatMut::new(B::act_mut(&mut a.dc), 0, n, c), Overwrite)))?;
            pa.grads_ready(g, blk.gate.range())?;
            blk.up.backward(be, pa.get(), g, n2, db, Some((MatMut::new(B::act_mut(&mut a.dc), 0, n, c), Add)))?;
            pa.grads_ready(g, blk.up.range())?;
            let dc = scatter_seq(pa, tp, x.b, SpanMut::at(B::act_mut(&mut a.dc), 0, nc), B::act_mut(&mut a.dlocal))?;
            let (mid, rstd) = (at(B::act(&a.mid), l, capl * c, nlc), at(B::f32s(&a.n2_rstd), l, capl, nl));
            blk.norm2.backward(be, pa.get(), g, SpanMut::at(B::act_mut(&mut a.dres), 0, nlc), dc, mid, rstd)?;
            pa.grads_ready(g, blk.norm2.weight.range())?;
            // Attention.
            let att = Mat::new(B::act(&a.att), l * cap * hd, n, hd);
            let dres = gather_seq(pa, tp, x.b, Span::at(B::act(&a.dres), 0, nlc), B::act_mut(&mut a.gathered))?;
            let dres = Mat::new(dres.buf, dres.range.start, n, c);
            blk.o.backward(be, pa.get(), g, att, dres, Some((MatMut::new(B::act_mut(&mut a.datt), 0, n, hd), Overwrite)))?;
            pa.grads_ready(g, blk.o.range())?;
            let s = self.shape(x.b, seq);
            let (sw, sheads) = (w / self.head_split(), s.heads + s.kv_heads);
            if ulysses {
                // The output's gradient to whole sequences for this rank's heads, attention's
                // backward there, and the QKV gradient back to this rank's tokens.
                let groups = self.head_groups();
                let datt = Mat::new(B::act(&a.datt), 0, n, hd);
                seq_group_of(pa)?.seq_to_heads(datt, x.b, &groups.1, SpanMut::at(B::act_mut(&mut a.datt_full), 0, n * hd))?;
                let (qkv, lse) = (at(B::act(&a.qkv), l, cap * w, n * w), at(B::f32s(&a.lse), l, cap * self.heads, n * self.heads));
                let (att, datt) = (at(B::act(&a.att_full), l, cap * hd, n * hd), at(B::act(&a.datt_full), 0, n * hd, n * hd));
                be.attention_backward(s, qkv, att, lse, datt, SpanMut::at(B::act_mut(&mut a.dqkv_full), 0, n * w))?;
                self.rope_apply(be, SpanMut::at(B::act_mut(&mut a.dqkv_full), 0, n * w), sw, sheads, s.seq, &a.rope, true)?;
                let full = at(B::act(&a.dqkv_full), 0, n * w, n * w);
                seq_group_of(pa)?.heads_to_seq(full, x.b, &groups.0, MatMut::new(B::act_mut(&mut a.dqkv), 0, n, w))?;
            } else {
                let (qkv, lse) = (at(B::act(&a.qkv), l, cap * w, n * w), at(B::f32s(&a.lse), l, cap * self.heads, n * self.heads));
                let (att, datt) = (at(B::act(&a.att), l, cap * hd, n * hd), at(B::act(&a.datt), 0, n * hd, n * hd));
                let dqkv = SpanMut::at(B::act_mut(&mut a.dqkv), 0, n * w);
                if ring {
                    seq_group_of(pa)?.ring_attention_backward(s, qkv, att, lse, datt, dqkv)?;
                } else {
                    be.attention_backward(s, qkv, att, lse, datt, dqkv)?;
                }
                self.rope_apply(be, SpanMut::at(B::act_mut(&mut a.dqkv), 0, n * w), sw, sheads, seq, &a.rope, true)?;
            }
            let n1 = gather_seq(pa, tp, x.b, at(B::act(&a.n1), l, capl * c, nlc), B::act_mut(&mut a.gathered))?;
            let n1 = Mat::new(n1.buf, n1.range.start, n, c);
            let dqkv = B::act(&a.dqkv);
            let dc = B::act_mut(&mut a.dc);
            blk.q.backward(be, pa.get(), g, n1, Mat::strided(dqkv, 0, n, hd, w), Some((MatMut::new(&mut *dc, 0, n, c), Overwrite)))?;
            blk.k.backward(
                be,
                pa.get(),
                g,
                n1,
                Mat::strided(dqkv, q_off, n, v_off - q_off, w),
                Some((MatMut::new(&mut *dc, 0, n, c), Add)),
            )?;
            blk.v.backward(be, pa.get(), g, n1, Mat::strided(dqkv, v_off, n, w - v_off, w), Some((MatMut::new(&mut *dc, 0, n, c), Add)))?;
            pa.grads_ready(g, span([blk.q.range(), blk.k.range(), blk.v.range()]))?;
            let dc = scatter_seq(pa, tp, x.b, SpanMut::at(B::act_mut(&mut a.dc), 0, nc), B::act_mut(&mut a.dlocal))?;
            let (xs, rstd) = (at(B::act(&a.res), l, capl * c, nlc), at(B::f32s(&a.n1_rstd), l, capl, nl));
            blk.norm1.backward(be, pa.get(), g, SpanMut::at(B::act_mut(&mut a.dres), 0, nlc), dc, xs, rstd)?;
            pa.grads_ready(g, blk.norm1.weight.range())?;
        }
        Ok(())
    }

    /// The token embedding's gradient, from the residual stream's before block 0 (gathered over
    /// whole sequences under split_gather).
    pub fn embed_backward<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        g: &mut B::F32,
        a: &mut Acts<B>,
        x: &Batch<'_, B>,
    ) -> Result<()> {
        let (nc, tp) = (x.rows() * self.c, self.tp);
        let dres = gather_seq(pa, tp, x.b, Span::at(B::act(&a.dres), 0, nc / tp.seq_parts()), B::act_mut(&mut a.gathered))?;
        be.embedding_backward(g, self.wte.range(), self.vocab_first, None, dres, x.inputs, x.seq, self.c)?;
        pa.grads_ready(g, self.wte.range())
    }

    /// After `final_norm`: the final hidden states (`[b·seq, hidden]`), the head, and the
    /// buffers it runs on.
    pub fn head_input<'a, B: Backend>(&self, a: &'a mut Acts<B>) -> Hidden<'a, B> {
        (B::act(&a.nf), self.head, B::act_mut(&mut a.logits), &mut a.losses)
    }
}
