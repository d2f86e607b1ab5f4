//! GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm blocks, GELU (tanh) MLP, biases
//! everywhere, head tied to the token embedding unless the config unties it.

use gantry_kernels::cpu::activation::{gelu_backward_inplace, gelu_forward};
use gantry_kernels::cpu::attention::{attention_backward, attention_forward, AttnShape};
use gantry_kernels::cpu::embedding::embedding_backward;
use gantry_kernels::cpu::matmul::Accumulate::{Add, Overwrite};

use super::hooks::{span, Params};
use super::sliced::{add_positions, embed_in_slices, head_loss, head_scratch_len, need_final_norm};
use super::{layer, layer_mut, ModelConfig};
use crate::nn::{two_mut, LayerNorm, Linear, LmHead, WeightLayout};
use crate::params::{Chunking, Init, ParamRef, ParamTable, ParamTableBuilder};
use crate::Result;

#[derive(Debug)]
struct Block {
    ln1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    ln2: LayerNorm,
    fc: Linear,
    fc_proj: Linear,
}

#[derive(Debug)]
pub struct Gpt2 {
    /// Each block's parameters in the flat buffer (one contiguous span per block).
    block_ranges: Vec<std::ops::Range<usize>>,
    c: usize,
    heads: usize,
    inner: usize,
    wte: ParamRef,
    wpe: ParamRef,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: LmHead,
    /// The token embedding's and the head's slices (`ParamTable::slices`): under data
    /// parallelism a large one spans several chunks and runs a slice at a time.
    wte_slices: Vec<std::ops::Range<usize>>,
    head_slices: Vec<std::ops::Range<usize>>,
}

/// Saved activations (layer-major stacks) and backward scratch for one batch shape.
#[derive(Debug)]
pub struct Acts {
    n: usize,
    res: Vec<f32>,
    mid: Vec<f32>,
    ln1: Vec<f32>,
    ln1_stats: (Vec<f32>, Vec<f32>),
    qkv: Vec<f32>,
    att: Vec<f32>,
    lse: Vec<f32>,
    ln2: Vec<f32>,
    ln2_stats: (Vec<f32>, Vec<f32>),
    fc: Vec<f32>,
    gelu: Vec<f32>,
    lnf: Vec<f32>,
    lnf_stats: (Vec<f32>, Vec<f32>),
    dres: Vec<f32>,
    dc: Vec<f32>,
    dbig: Vec<f32>,
    logits: Vec<f32>,
}

impl Acts {
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
        ]
        .iter()
        .map(|v| v.len())
        .sum()
    }
}

impl Gpt2 {
    pub fn new(cfg: &ModelConfig, chunking: Chunking) -> (ParamTable, Gpt2) {
        let (c, l, v, inner) = (cfg.hidden, cfg.layers, cfg.vocab, cfg.intermediate);
        let std = cfg.initializer_range;
        // GPT-2 scales the init of the projections into the residual stream by 1/sqrt(2L).
        let proj_std = std / (2.0 * l as f32).sqrt();
        let mut b = ParamTableBuilder::new();
        let wte = b.add("transformer.wte.weight", &[v, c], Init::Normal { std });
        let wpe = b.add("transformer.wpe.weight", &[cfg.max_positions, c], Init::Normal { std });
        let mut idx = Vec::new();
        for i in 0..l {
            let p = format!("transformer.h.{i}.");
            idx.push([
                b.add(format!("{p}ln_1.weight"), &[c], Init::Ones),
                b.add(format!("{p}ln_1.bias"), &[c], Init::Zeros),
                b.add(format!("{p}attn.c_attn.weight"), &[c, 3 * c], Init::Normal { std }),
                b.add(format!("{p}attn.c_attn.bias"), &[3 * c], Init::Zeros),
                b.add(format!("{p}attn.c_proj.weight"), &[c, c], Init::Normal { std: proj_std }),
                b.add(format!("{p}attn.c_proj.bias"), &[c], Init::Zeros),
                b.add(format!("{p}ln_2.weight"), &[c], Init::Ones),
                b.add(format!("{p}ln_2.bias"), &[c], Init::Zeros),
                b.add(format!("{p}mlp.c_fc.weight"), &[c, inner], Init::Normal { std }),
                b.add(format!("{p}mlp.c_fc.bias"), &[inner], Init::Zeros),
                b.add(format!("{p}mlp.c_proj.weight"), &[inner, c], Init::Normal { std: proj_std }),
                b.add(format!("{p}mlp.c_proj.bias"), &[c], Init::Zeros),
            ]);
        }
        let lnf_w = b.add("transformer.ln_f.weight", &[c], Init::Ones);
        let lnf_b = b.add("transformer.ln_f.bias", &[c], Init::Zeros);
        let head = (!cfg.tie_embeddings).then(|| b.add("lm_head.weight", &[v, c], Init::Normal { std }));
        let t = b.build(chunking);
        let lin = |w: usize, bias: usize, d_in: usize, d_out: usize| Linear {
            weight: t.at(w),
            bias: Some(t.at(bias)),
            d_in,
            d_out,
            layout: WeightLayout::InOut,
        };
        let ln = |w: usize, bias: usize| LayerNorm { weight: t.at(w), bias: t.at(bias), eps: cfg.norm_eps };
        let blocks = idx
            .iter()
            .map(|i| Block {
                ln1: ln(i[0], i[1]),
                c_attn: lin(i[2], i[3], c, 3 * c),
                c_proj: lin(i[4], i[5], c, c),
                ln2: ln(i[6], i[7]),
                fc: lin(i[8], i[9], c, inner),
                fc_proj: lin(i[10], i[11], inner, c),
            })
            .collect();
        let block_ranges = idx.iter().map(|i| span(i.iter().map(|k| t.at(*k).range()))).collect();
        let model = Gpt2 {
            block_ranges,
            c,
            heads: cfg.heads,
            inner,
            wte: t.at(wte),
            wpe: t.at(wpe),
            blocks,
            ln_f: ln(lnf_w, lnf_b),
            head: LmHead { weight: t.at(head.unwrap_or(wte)), vocab: v, hidden: c },
            wte_slices: t.slices(t.at(wte)),
            head_slices: t.slices(t.at(head.unwrap_or(wte))),
        };
        (t, model)
    }

    /// The length of each activation buffer for `batch` sequences of `seq` tokens, in the order
    /// `acts` allocates them (so memory is known before anything is allocated).
    fn acts_lens(&self, batch: usize, seq: usize) -> [usize; 20] {
        let (n, c, l, inner) = (batch * seq, self.c, self.blocks.len(), self.inner);
        [
            (l + 1) * n * c,      // res
            l * n * c,            // mid
            l * n * c,            // ln1
            l * n,                // ln1 mean
            l * n,                // ln1 rstd
            l * n * 3 * c,        // qkv
            l * n * c,            // att
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
            n * c,                // dc
            n * inner.max(3 * c), // dbig
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
            ln1: z(),
            ln1_stats: (z(), z()),
            qkv: z(),
            att: z(),
            lse: z(),
            ln2: z(),
            ln2_stats: (z(), z()),
            fc: z(),
            gelu: z(),
            lnf: z(),
            lnf_stats: (z(), z()),
            dres: z(),
            dc: z(),
            dbig: z(),
            logits: z(),
        }
    }

    fn shape(&self, b: usize, seq: usize) -> AttnShape {
        AttnShape { batch: b, seq, heads: self.heads, kv_heads: self.heads, dim: self.c / self.heads }
    }

    /// Runs the blocks and the final norm for `b` sequences; leaves `a.lnf` ready for the head.
    fn forward(&self, pa: &mut dyn Params, a: &mut Acts, b: usize, seq: usize, inputs: &[u32]) -> Result<()> {
        self.embed(pa, a, b, seq, inputs)?;
        self.blocks_forward(pa, a, b, seq, 0..self.blocks.len())?;
        self.final_norm(pa, a, b, seq)
    }

    /// The batch's token embedding: the residual stream before block 0.
    pub fn embed(&self, pa: &mut dyn Params, a: &mut Acts, b: usize, seq: usize, inputs: &[u32]) -> Result<()> {
        let (c, n) = (self.c, b * seq);
        let nc = n * c;
        embed_in_slices(pa, &self.wte_slices, self.wte, Some(self.wpe.range()), &mut a.res[..nc], &inputs[..n], c)?;
        add_positions(&mut a.res[..nc], self.wpe.get(pa.get()), seq, c);
        Ok(())
    }

    /// Blocks `range` forward, from the residual stream before `range.start` (the embedding's or
    /// the earlier blocks') to the one after `range.end - 1`; their saved activations stay in `a`.
    pub fn blocks_forward(&self, pa: &mut dyn Params, a: &mut Acts, b: usize, seq: usize, range: std::ops::Range<usize>) -> Result<()> {
        let (c, n, cap) = (self.c, b * seq, a.n);
        let (nc, inner) = (n * c, self.inner);
        for l in range {
            let blk = &self.blocks[l];
            pa.need(&[self.block_ranges[l].clone()])?;
            let p = pa.get();
            let x = layer(&a.res, l, cap * c, nc);
            let ln1 = layer_mut(&mut a.ln1, l, cap * c, nc);
            let (mean, rstd) = (layer_mut(&mut a.ln1_stats.0, l, cap, n), layer_mut(&mut a.ln1_stats.1, l, cap, n));
            blk.ln1.forward(p, x, ln1, mean, rstd);
            let qkv = layer_mut(&mut a.qkv, l, cap * 3 * c, n * 3 * c);
            blk.c_attn.forward(p, ln1, c, qkv, 3 * c, n, Overwrite);
            let att = layer_mut(&mut a.att, l, cap * c, nc);
            attention_forward(self.shape(b, seq), qkv, att, layer_mut(&mut a.lse, l, cap * self.heads, n * self.heads));
            let mid = layer_mut(&mut a.mid, l, cap * c, nc);
            mid.copy_from_slice(x);
            blk.c_proj.forward(p, att, c, mid, c, n, Add);
            let ln2 = layer_mut(&mut a.ln2, l, cap * c, nc);
            let (mean, rstd) = (layer_mut(&mut a.ln2_stats.0, l, cap, n), layer_mut(&mut a.ln2_stats.1, l, cap, n));
            blk.ln2.forward(p, mid, ln2, mean, rstd);
            let fc = layer_mut(&mut a.fc, l, cap * inner, n * inner);
            blk.fc.forward(p, ln2, c, fc, inner, n, Overwrite);
            gelu_forward(&mut a.gelu[..n * inner], fc);
            let out = layer_mut(&mut a.res, l + 1, cap * c, nc);
            out.copy_from_slice(mid);
            blk.fc_proj.forward(p, &a.gelu[..n * inner], inner, out, c, n, Add);
        }
        Ok(())
    }

    /// The final norm after the last block: the head's input.
    pub fn final_norm(&self, pa: &mut dyn Params, a: &mut Acts, b: usize, seq: usize) -> Result<()> {
        let (c, n, cap) = (self.c, b * seq, a.n);
        let nc = n * c;
        let l = self.blocks.len();
        let ln_f = span([self.ln_f.weight.range(), self.ln_f.bias.range()]);
        need_final_norm(pa, &self.head, &self.head_slices, ln_f)?;
        let p = pa.get();
        self.ln_f.forward(p, layer(&a.res, l, cap * c, nc), &mut a.lnf[..nc], &mut a.lnf_stats.0[..n], &mut a.lnf_stats.1[..n]);
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
        let ln_f = span([self.ln_f.weight.range(), self.ln_f.bias.range()]);
        let (h, t, dh) = (&a.lnf[..nc], &targets[..n], &mut a.dc[..nc]);
        let loss = head_loss(pa, &self.head, &self.head_slices, untied, h, t, &mut a.logits, g, dh, scale, ln_f.clone())?;
        let p = pa.get();
        let dres = &mut a.dres[..nc];
        dres.fill(0.0);
        let l_all = self.blocks.len();
        self.ln_f.backward(p, g, dres, &a.dc[..nc], layer(&a.res, l_all, cap * c, nc), &a.lnf_stats.0[..n], &a.lnf_stats.1[..n]);
        pa.grads_ready(g, ln_f)?;
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
        let (c, n, cap, inner) = (self.c, b * seq, a.n, self.inner);
        let nc = n * c;
        let dres = &mut a.dres[..nc];
        for l in range.rev() {
            let blk = &self.blocks[l];
            pa.need(&[self.block_ranges[l].clone()])?;
            // MLP: the GELU output is recomputed rather than stored per layer. Each weight's
            // gradient is announced final as soon as it is (ZeRO-2/3 send it off at once).
            let fc = layer(&a.fc, l, cap * inner, n * inner);
            let gelu = &mut a.gelu[..n * inner];
            gelu_forward(gelu, fc);
            let dbig = &mut a.dbig[..n * inner];
            blk.fc_proj.backward(pa.get(), g, (gelu, inner), (dres, c), Some((dbig, inner, Overwrite)), n);
            pa.grads_ready(g, blk.fc_proj.range())?;
            gelu_backward_inplace(dbig, fc);
            let ln2 = layer(&a.ln2, l, cap * c, nc);
            let dc = &mut a.dc[..nc];
            blk.fc.backward(pa.get(), g, (ln2, c), (dbig, inner), Some((dc, c, Overwrite)), n);
            pa.grads_ready(g, blk.fc.range())?;
            let mid = layer(&a.mid, l, cap * c, nc);
            let (mean, rstd) = (layer(&a.ln2_stats.0, l, cap, n), layer(&a.ln2_stats.1, l, cap, n));
            blk.ln2.backward(pa.get(), g, dres, dc, mid, mean, rstd);
            pa.grads_ready(g, span([blk.ln2.weight.range(), blk.ln2.bias.range()]))?;
            // Attention.
            let att = layer(&a.att, l, cap * c, nc);
            blk.c_proj.backward(pa.get(), g, (att, c), (dres, c), Some((dc, c, Overwrite)), n);
            pa.grads_ready(g, blk.c_proj.range())?;
            let qkv = layer(&a.qkv, l, cap * 3 * c, n * 3 * c);
            let lse = layer(&a.lse, l, cap * self.heads, n * self.heads);
            let dqkv = &mut a.dbig[..n * 3 * c];
            attention_backward(self.shape(b, seq), qkv, att, lse, dc, dqkv);
            let ln1 = layer(&a.ln1, l, cap * c, nc);
            blk.c_attn.backward(pa.get(), g, (ln1, c), (dqkv, 3 * c), Some((dc, c, Overwrite)), n);
            pa.grads_ready(g, blk.c_attn.range())?;
            let x = layer(&a.res, l, cap * c, nc);
            let (mean, rstd) = (layer(&a.ln1_stats.0, l, cap, n), layer(&a.ln1_stats.1, l, cap, n));
            blk.ln1.backward(pa.get(), g, dres, dc, x, mean, rstd);
            pa.grads_ready(g, span([blk.ln1.weight.range(), blk.ln1.bias.range()]))?;
        }
        Ok(())
    }

    /// The token embedding's gradient, from the residual stream's before block 0.
    pub fn embed_backward(&self, pa: &mut dyn Params, g: &mut [f32], a: &mut Acts, b: usize, seq: usize, inputs: &[u32]) -> Result<()> {
        let (c, n) = (self.c, b * seq);
        let nc = n * c;
        let dres = &a.dres[..nc];
        let (dwte, dwpe) = two_mut(g, self.wte, self.wpe);
        embedding_backward(dwte, Some(dwpe), dres, &inputs[..n], seq, c);
        pa.grads_ready(g, self.wpe.range())?;
        pa.grads_ready(g, self.wte.range())?;
        Ok(())
    }

    /// Runs the blocks: the final hidden states (`[b·seq, hidden]`, after the last norm), the
    /// head, and the head's scratch.
    pub fn hidden<'a>(&self, p: &[f32], a: &'a mut Acts, b: usize, seq: usize, inputs: &[u32]) -> (&'a [f32], LmHead, &'a mut [f32]) {
        let mut all = p;
        self.forward(&mut all, a, b, seq, inputs).expect("reading a whole buffer cannot fail");
        (&a.lnf[..b * seq * self.c], self.head, &mut a.logits)
    }
}
