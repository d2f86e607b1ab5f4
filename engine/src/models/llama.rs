//! LLaMA family (`LlamaForCausalLM`): RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query
//! attention, optional explicit `head_dim`, tied or untied head.

use gantry_kernels::cpu::activation::{swiglu_backward, swiglu_forward};
use gantry_kernels::cpu::attention::{attention_backward, attention_forward, AttnShape};
use gantry_kernels::cpu::embedding::embedding_backward;
use gantry_kernels::cpu::matmul::Accumulate::{Add, Overwrite};
use gantry_kernels::cpu::rope::{rope_apply, RopeTable};

use super::hooks::{span, Params};
use super::sliced::{embed_in_slices, head_loss, head_scratch_len, need_final_norm};
use super::{layer, layer_mut, ModelConfig};
use crate::nn::{Linear, LmHead, RmsNorm, WeightLayout};
use crate::params::{Chunking, Init, ParamRef, ParamTable, ParamTableBuilder};
use crate::Result;

#[derive(Debug)]
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

#[derive(Debug)]
pub struct Llama {
    c: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inner: usize,
    wte: ParamRef,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: LmHead,
    /// The token embedding's and the head's slices (`ParamTable::slices`): under data
    /// parallelism a large one spans several chunks and runs a slice at a time.
    wte_slices: Vec<std::ops::Range<usize>>,
    head_slices: Vec<std::ops::Range<usize>>,
    rope: RopeTable,
}

/// Saved activations (layer-major stacks) and backward scratch for one batch shape.
#[derive(Debug)]
pub struct Acts {
    n: usize,
    res: Vec<f32>,
    mid: Vec<f32>,
    n1: Vec<f32>,
    n1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    lse: Vec<f32>,
    n2: Vec<f32>,
    n2_rstd: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    nf: Vec<f32>,
    nf_rstd: Vec<f32>,
    dres: Vec<f32>,
    dc: Vec<f32>,
    datt: Vec<f32>,
    dqkv: Vec<f32>,
    da: Vec<f32>,
    db: Vec<f32>,
    logits: Vec<f32>,
}

impl Acts {
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
        ]
        .iter()
        .map(|v| v.len())
        .sum()
    }
}

impl Llama {
    pub fn new(cfg: &ModelConfig, chunking: Chunking) -> (ParamTable, Llama) {
        let (c, v, inner) = (cfg.hidden, cfg.vocab, cfg.intermediate);
        let (h, kvh, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let std = cfg.initializer_range;
        let w = Init::Normal { std };
        let mut b = ParamTableBuilder::new();
        let wte = b.add("model.embed_tokens.weight", &[v, c], w);
        let mut idx = Vec::new();
        for i in 0..cfg.layers {
            let p = format!("model.layers.{i}.");
            let mut lin = |name: &str, out: usize, inp: usize, bias: bool| {
                let wi = b.add(format!("{p}{name}.weight"), &[out, inp], w);
                let bi = bias.then(|| b.add(format!("{p}{name}.bias"), &[out], Init::Zeros));
                (wi, bi, inp, out)
            };
            let q = lin("self_attn.q_proj", h * d, c, cfg.attention_bias);
            let k = lin("self_attn.k_proj", kvh * d, c, cfg.attention_bias);
            let vv = lin("self_attn.v_proj", kvh * d, c, cfg.attention_bias);
            let o = lin("self_attn.o_proj", c, h * d, cfg.attention_bias);
            let gate = lin("mlp.gate_proj", inner, c, cfg.mlp_bias);
            let up = lin("mlp.up_proj", inner, c, cfg.mlp_bias);
            let down = lin("mlp.down_proj", c, inner, cfg.mlp_bias);
            let n1 = b.add(format!("{p}input_layernorm.weight"), &[c], Init::Ones);
            let n2 = b.add(format!("{p}post_attention_layernorm.weight"), &[c], Init::Ones);
            idx.push((n1, q, k, vv, o, n2, gate, up, down));
        }
        let norm = b.add("model.norm.weight", &[c], Init::Ones);
        let head = (!cfg.tie_embeddings).then(|| b.add("lm_head.weight", &[v, c], w));
        let t = b.build(chunking);
        let lin = |(wi, bi, d_in, d_out): (usize, Option<usize>, usize, usize)| Linear {
            weight: t.at(wi),
            bias: bi.map(|i| t.at(i)),
            d_in,
            d_out,
            layout: WeightLayout::OutIn,
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
        let model = Llama {
            c,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            inner,
            wte: t.at(wte),
            blocks,
            norm: rms(norm),
            head: LmHead { weight: t.at(head.unwrap_or(wte)), vocab: v, hidden: c },
            wte_slices: t.slices(t.at(wte)),
            head_slices: t.slices(t.at(head.unwrap_or(wte))),
            rope: RopeTable::new(cfg.max_positions, d, cfg.rope_theta),
        };
        (t, model)
    }

    fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// The length of each activation buffer for `batch` sequences of `seq` tokens, in the order
    /// `acts` allocates them (so memory is known before anything is allocated).
    fn acts_lens(&self, batch: usize, seq: usize) -> [usize; 21] {
        let (n, c, l) = (batch * seq, self.c, self.blocks.len());
        let (w, hd, inner) = (self.qkv_width(), self.heads * self.head_dim, self.inner);
        [
            (l + 1) * n * c,    // res
            l * n * c,          // mid
            l * n * c,          // n1
            l * n,              // n1_rstd
            l * n * w,          // qkv
            l * n * hd,         // att
            l * n * self.heads, // lse
            l * n * c,          // n2
            l * n,              // n2_rstd
            l * n * inner,      // gate
            l * n * inner,      // up
            n * inner,          // act
            n * c,              // nf
            n,                  // nf_rstd
            n * c,              // dres
            n * c,              // dc
            n * hd,             // datt
            n * w,              // dqkv
            n * inner,          // da
            n * inner,          // db
            head_scratch_len(&self.head, &self.head_slices, n),
        ]
    }

    /// Floats of activations and backward scratch for `batch` sequences of `seq` tokens.
    pub fn acts_elems(&self, batch: usize, seq: usize) -> usize {
        self.acts_lens(batch, seq).iter().sum()
    }

    pub fn acts(&self, batch: usize, seq: usize) -> Acts {
        let mut lens = self.acts_lens(batch, seq).into_iter().map(|len| vec![0.0f32; len]);
        let mut z = || lens.next().expect("one length per buffer");
        Acts {
            n: batch * seq,
            res: z(),
            mid: z(),
            n1: z(),
            n1_rstd: z(),
            qkv: z(),
            att: z(),
            lse: z(),
            n2: z(),
            n2_rstd: z(),
            gate: z(),
            up: z(),
            act: z(),
            nf: z(),
            nf_rstd: z(),
            dres: z(),
            dc: z(),
            datt: z(),
            dqkv: z(),
            da: z(),
            db: z(),
            logits: z(),
        }
    }

    fn shape(&self, b: usize, seq: usize) -> AttnShape {
        AttnShape { batch: b, seq, heads: self.heads, kv_heads: self.kv_heads, dim: self.head_dim }
    }

    fn forward(&self, pa: &mut dyn Params, a: &mut Acts, b: usize, seq: usize, inputs: &[u32]) -> Result<()> {
        self.embed(pa, a, b, seq, inputs)?;
        self.blocks_forward(pa, a, b, seq, 0..self.blocks.len())?;
        self.final_norm(pa, a, b, seq)
    }

    /// The batch's token embedding: the residual stream before block 0.
    pub fn embed(&self, pa: &mut dyn Params, a: &mut Acts, b: usize, seq: usize, inputs: &[u32]) -> Result<()> {
        let (c, n) = (self.c, b * seq);
        let nc = n * c;
        embed_in_slices(pa, &self.wte_slices, self.wte, None, &mut a.res[..nc], &inputs[..n], c)?;
        Ok(())
    }

    /// Blocks `range` forward, from the residual stream before `range.start` (the embedding's or
    /// the earlier blocks') to the one after `range.end - 1`; their saved activations stay in `a`.
    pub fn blocks_forward(&self, pa: &mut dyn Params, a: &mut Acts, b: usize, seq: usize, range: std::ops::Range<usize>) -> Result<()> {
        let (c, n, cap) = (self.c, b * seq, a.n);
        let (nc, w, hd, inner) = (n * c, self.qkv_width(), self.heads * self.head_dim, self.inner);
        let (q_off, v_off) = (hd, hd + self.kv_heads * self.head_dim);
        for l in range {
            let blk = &self.blocks[l];
            pa.need(&[blk.range()])?;
            let p = pa.get();
            let x = layer(&a.res, l, cap * c, nc);
            let n1 = layer_mut(&mut a.n1, l, cap * c, nc);
            blk.norm1.forward(p, x, n1, layer_mut(&mut a.n1_rstd, l, cap, n));
            let qkv = layer_mut(&mut a.qkv, l, cap * w, n * w);
            blk.q.forward(p, n1, c, qkv, w, n, Overwrite);
            blk.k.forward(p, n1, c, &mut qkv[q_off..], w, n, Overwrite);
            blk.v.forward(p, n1, c, &mut qkv[v_off..], w, n, Overwrite);
            rope_apply(qkv, w, self.heads + self.kv_heads, seq, &self.rope, false);
            let att = layer_mut(&mut a.att, l, cap * hd, n * hd);
            attention_forward(self.shape(b, seq), qkv, att, layer_mut(&mut a.lse, l, cap * self.heads, n * self.heads));
            let mid = layer_mut(&mut a.mid, l, cap * c, nc);
            mid.copy_from_slice(x);
            blk.o.forward(p, att, hd, mid, c, n, Add);
            let n2 = layer_mut(&mut a.n2, l, cap * c, nc);
            blk.norm2.forward(p, mid, n2, layer_mut(&mut a.n2_rstd, l, cap, n));
            let gate = layer_mut(&mut a.gate, l, cap * inner, n * inner);
            blk.gate.forward(p, n2, c, gate, inner, n, Overwrite);
            let up = layer_mut(&mut a.up, l, cap * inner, n * inner);
            blk.up.forward(p, n2, c, up, inner, n, Overwrite);
            swiglu_forward(&mut a.act[..n * inner], gate, up);
            let out = layer_mut(&mut a.res, l + 1, cap * c, nc);
            out.copy_from_slice(mid);
            blk.down.forward(p, &a.act[..n * inner], inner, out, c, n, Add);
        }
        Ok(())
    }

    /// The final norm after the last block: the head's input.
    pub fn final_norm(&self, pa: &mut dyn Params, a: &mut Acts, b: usize, seq: usize) -> Result<()> {
        let (c, n, cap) = (self.c, b * seq, a.n);
        let nc = n * c;
        let l = self.blocks.len();
        need_final_norm(pa, &self.head, &self.head_slices, self.norm.weight.range())?;
        self.norm.forward(pa.get(), layer(&a.res, l, cap * c, nc), &mut a.nf[..nc], &mut a.nf_rstd[..n]);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        pa: &mut dyn Params,
        g: &mut [f32],
        a: &mut Acts,
        b: usize,
        seq: usize,
        inputs: &[u32],
        targets: &[u32],
        scale: f32,
    ) -> Result<f64> {
        self.forward(pa, a, b, seq, inputs)?;
        let loss = self.head_backward(pa, g, a, b, seq, targets, scale)?;
        self.blocks_backward(pa, g, a, b, seq, 0..self.blocks.len())?;
        self.embed_backward(pa, g, a, b, seq, inputs)?;
        Ok(loss)
    }

    /// The head after `final_norm`: the summed loss, the head's and the final norm's gradients,
    /// and the loss's gradient at the residual stream after the last block (in `a`).
    #[allow(clippy::too_many_arguments)]
    pub fn head_backward(
        &self,
        pa: &mut dyn Params,
        g: &mut [f32],
        a: &mut Acts,
        b: usize,
        seq: usize,
        targets: &[u32],
        scale: f32,
    ) -> Result<f64> {
        let (c, n, cap) = (self.c, b * seq, a.n);
        let nc = n * c;
        let untied = self.head.weight != self.wte;
        let (h, t, dh) = (&a.nf[..nc], &targets[..n], &mut a.dc[..nc]);
        let loss = head_loss(pa, &self.head, &self.head_slices, untied, h, t, &mut a.logits, g, dh, scale, self.norm.weight.range())?;
        let p = pa.get();
        let dres = &mut a.dres[..nc];
        dres.fill(0.0);
        let l_all = self.blocks.len();
        self.norm.backward(p, g, dres, &a.dc[..nc], layer(&a.res, l_all, cap * c, nc), &a.nf_rstd[..n]);
        pa.grads_ready(g, self.norm.weight.range())?;
        Ok(loss)
    }

    /// Blocks `range` backward, the last first: from the gradient at the residual stream after
    /// `range.end - 1` to the one before `range.start`, with the activations `blocks_forward`
    /// saved.
    pub fn blocks_backward(
        &self,
        pa: &mut dyn Params,
        g: &mut [f32],
        a: &mut Acts,
        b: usize,
        seq: usize,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let (c, n, cap) = (self.c, b * seq, a.n);
        let (nc, w, hd, inner) = (n * c, self.qkv_width(), self.heads * self.head_dim, self.inner);
        let (q_off, v_off) = (hd, hd + self.kv_heads * self.head_dim);
        let dres = &mut a.dres[..nc];
        for l in range.rev() {
            let blk = &self.blocks[l];
            pa.need(&[blk.range()])?;
            // MLP: silu(gate)·up is recomputed rather than stored per layer.
            let gate = layer(&a.gate, l, cap * inner, n * inner);
            let up = layer(&a.up, l, cap * inner, n * inner);
            let act = &mut a.act[..n * inner];
            swiglu_forward(act, gate, up);
            let (da, db) = (&mut a.da[..n * inner], &mut a.db[..n * inner]);
            // Each weight's gradient is announced final as soon as it is, so that under ZeRO-2/3
            // it leaves this rank while the rest of the block is still running backward.
            blk.down.backward(pa.get(), g, (act, inner), (dres, c), Some((da, inner, Overwrite)), n);
            pa.grads_ready(g, blk.down.range())?;
            swiglu_backward(da, db, gate, up);
            let n2 = layer(&a.n2, l, cap * c, nc);
            let dc = &mut a.dc[..nc];
            blk.gate.backward(pa.get(), g, (n2, c), (da, inner), Some((dc, c, Overwrite)), n);
            pa.grads_ready(g, blk.gate.range())?;
            blk.up.backward(pa.get(), g, (n2, c), (db, inner), Some((dc, c, Add)), n);
            pa.grads_ready(g, blk.up.range())?;
            blk.norm2.backward(pa.get(), g, dres, dc, layer(&a.mid, l, cap * c, nc), layer(&a.n2_rstd, l, cap, n));
            pa.grads_ready(g, blk.norm2.weight.range())?;
            // Attention.
            let att = layer(&a.att, l, cap * hd, n * hd);
            let datt = &mut a.datt[..n * hd];
            blk.o.backward(pa.get(), g, (att, hd), (dres, c), Some((datt, hd, Overwrite)), n);
            pa.grads_ready(g, blk.o.range())?;
            let qkv = layer(&a.qkv, l, cap * w, n * w);
            let dqkv = &mut a.dqkv[..n * w];
            attention_backward(self.shape(b, seq), qkv, att, layer(&a.lse, l, cap * self.heads, n * self.heads), datt, dqkv);
            rope_apply(dqkv, w, self.heads + self.kv_heads, seq, &self.rope, true);
            let n1 = layer(&a.n1, l, cap * c, nc);
            blk.q.backward(pa.get(), g, (n1, c), (dqkv, w), Some((dc, c, Overwrite)), n);
            blk.k.backward(pa.get(), g, (n1, c), (&dqkv[q_off..], w), Some((dc, c, Add)), n);
            blk.v.backward(pa.get(), g, (n1, c), (&dqkv[v_off..], w), Some((dc, c, Add)), n);
            pa.grads_ready(g, span([blk.q.range(), blk.k.range(), blk.v.range()]))?;
            blk.norm1.backward(pa.get(), g, dres, dc, layer(&a.res, l, cap * c, nc), layer(&a.n1_rstd, l, cap, n));
            pa.grads_ready(g, blk.norm1.weight.range())?;
        }
        Ok(())
    }

    /// The token embedding's gradient, from the residual stream's before block 0.
    pub fn embed_backward(&self, pa: &mut dyn Params, g: &mut [f32], a: &mut Acts, b: usize, seq: usize, inputs: &[u32]) -> Result<()> {
        let (c, n) = (self.c, b * seq);
        let nc = n * c;
        let dres = &a.dres[..nc];
        embedding_backward(self.wte.get_mut(g), None, dres, &inputs[..n], seq, c);
        pa.grads_ready(g, self.wte.range())?;
        Ok(())
    }

    /// Runs the blocks: the final hidden states (`[b·seq, hidden]`, after the last norm), the
    /// head, and the head's scratch.
    pub fn hidden<'a>(&self, p: &[f32], a: &'a mut Acts, b: usize, seq: usize, inputs: &[u32]) -> (&'a [f32], LmHead, &'a mut [f32]) {
        let mut all = p;
        self.forward(&mut all, a, b, seq, inputs).expect("reading a whole buffer cannot fail");
        (&a.nf[..b * seq * self.c], self.head, &mut a.logits)
    }
}
