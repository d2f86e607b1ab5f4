//! GPT-2 and LLaMA on the GPU. One struct serves both: they differ in the norm (LayerNorm with
//! bias, or RMSNorm), the attention projections (GPT-2's fused `c_attn`, LLaMA's q, k, v writing
//! column blocks of one fused buffer, then RoPE), the MLP (GELU, or SwiGLU) and learned positions.
//!
//! Weights are read from `p`, the parameters in the working precision; norm weights, biases and
//! embedding tables from `master` (f32). Gradients accumulate into the f32 buffer `grads` in the
//! table's layout. Weight gradients are computed in `T` and added to `grads` (as PyTorch's autocast
//! does).

use std::ops::Range;

use gantry_kernels::cpu::attention::AttnShape;
use gantry_kernels::cpu::rope::RopeTable;
use gantry_kernels::cuda::cudarc::cublaslt::{CudaBlasLT, Matmul};
use gantry_kernels::cuda::cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use gantry_kernels::cuda::ops::{self, GpuRopeTable, In, Out, Storage, Strides};
use gantry_kernels::cuda::Gpu;

use super::acts::GpuActs;
use crate::models::{Arch, Model};
use crate::nn::WeightLayout;
use crate::params::ParamRef;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug)]
struct Lin {
    w: ParamRef,
    b: Option<ParamRef>,
    d_in: usize,
    d_out: usize,
    layout: WeightLayout,
}

#[derive(Clone, Copy, Debug)]
struct Norm {
    w: ParamRef,
    /// LayerNorm's bias (GPT-2); RMSNorm has none.
    b: Option<ParamRef>,
}

#[derive(Debug)]
enum AttnProj {
    /// GPT-2's `c_attn`: `[c, 3c]`, writing q, k, v heads side by side.
    Fused(Lin),
    /// LLaMA's q, k, v projections, each writing its column block of the fused buffer.
    Split { q: Lin, k: Lin, v: Lin },
}

#[derive(Debug)]
enum Mlp {
    Gelu { fc: Lin, proj: Lin },
    SwiGlu { gate: Lin, up: Lin, down: Lin },
}

#[derive(Debug)]
pub(super) struct Block {
    n1: Norm,
    attn: AttnProj,
    o: Lin,
    n2: Norm,
    mlp: Mlp,
}

/// A model's layer structure over the flat parameter buffer, ready to run on a GPU.
pub struct GpuModel {
    pub(super) c: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) inner: usize,
    pub(super) vocab: usize,
    pub(super) max_positions: usize,
    pub(super) eps: f32,
    pub(super) layer_norm: bool,
    wte: ParamRef,
    wpe: Option<ParamRef>,
    pub(super) blocks: Vec<Block>,
    final_norm: Norm,
    head: ParamRef,
    pub(super) rope: Option<GpuRopeTable>,
    /// The largest weight matrix (the size of the `T` weight-gradient scratch).
    pub(super) max_weight: usize,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel").field("layers", &self.blocks.len()).field("hidden", &self.c).finish()
    }
}

/// Rows of logits per block of the head: at most 256 MiB of f32-sized logits at a time.
const HEAD_BLOCK_ELEMS: usize = 1 << 26;

impl GpuModel {
    /// The GPU form of `model` (the same parameter table), with the rotary table uploaded to `gpu`.
    pub fn new(gpu: &Gpu, model: &Model) -> Result<Self> {
        let cfg = &model.config;
        let t = &model.table;
        let at = |name: String| -> Result<ParamRef> {
            t.find(&name)
                .map(|e| e.at)
                .ok_or_else(|| Error::Unsupported { field: "model".into(), message: format!("parameter {name} missing from the table") })
        };
        let opt = |name: String| t.find(&name).map(|e| e.at);
        let (c, inner, hd) = (cfg.hidden, cfg.intermediate, cfg.heads * cfg.head_dim);
        let kvd = cfg.kv_heads * cfg.head_dim;
        let mut blocks = Vec::new();
        let (wte, wpe, final_norm, rope, layer_norm);
        match cfg.arch {
            Arch::Gpt2 => {
                layer_norm = true;
                wte = at("transformer.wte.weight".into())?;
                wpe = Some(at("transformer.wpe.weight".into())?);
                let lin = |p: &str, d_in: usize, d_out: usize| -> Result<Lin> {
                    Ok(Lin { w: at(format!("{p}.weight"))?, b: Some(at(format!("{p}.bias"))?), d_in, d_out, layout: WeightLayout::InOut })
                };
                for i in 0..cfg.layers {
                    let p = format!("transformer.h.{i}.");
                    blocks.push(Block {
                        n1: Norm { w: at(format!("{p}ln_1.weight"))?, b: Some(at(format!("{p}ln_1.bias"))?) },
                        attn: AttnProj::Fused(lin(&format!("{p}attn.c_attn"), c, 3 * c)?),
                        o: lin(&format!("{p}attn.c_proj"), c, c)?,
                        n2: Norm { w: at(format!("{p}ln_2.weight"))?, b: Some(at(format!("{p}ln_2.bias"))?) },
                        mlp: Mlp::Gelu { fc: lin(&format!("{p}mlp.c_fc"), c, inner)?, proj: lin(&format!("{p}mlp.c_proj"), inner, c)? },
                    });
                }
                final_norm = Norm { w: at("transformer.ln_f.weight".into())?, b: Some(at("transformer.ln_f.bias".into())?) };
                rope = None;
            }
            Arch::Llama => {
                layer_norm = false;
                wte = at("model.embed_tokens.weight".into())?;
                wpe = None;
                let lin = |p: &str, d_in: usize, d_out: usize| -> Result<Lin> {
                    Ok(Lin { w: at(format!("{p}.weight"))?, b: opt(format!("{p}.bias")), d_in, d_out, layout: WeightLayout::OutIn })
                };
                for i in 0..cfg.layers {
                    let p = format!("model.layers.{i}.");
                    blocks.push(Block {
                        n1: Norm { w: at(format!("{p}input_layernorm.weight"))?, b: None },
                        attn: AttnProj::Split {
                            q: lin(&format!("{p}self_attn.q_proj"), c, hd)?,
                            k: lin(&format!("{p}self_attn.k_proj"), c, kvd)?,
                            v: lin(&format!("{p}self_attn.v_proj"), c, kvd)?,
                        },
                        o: lin(&format!("{p}self_attn.o_proj"), hd, c)?,
                        n2: Norm { w: at(format!("{p}post_attention_layernorm.weight"))?, b: None },
                        mlp: Mlp::SwiGlu {
                            gate: lin(&format!("{p}mlp.gate_proj"), c, inner)?,
                            up: lin(&format!("{p}mlp.up_proj"), c, inner)?,
                            down: lin(&format!("{p}mlp.down_proj"), inner, c)?,
                        },
                    });
                }
                final_norm = Norm { w: at("model.norm.weight".into())?, b: None };
                let table = RopeTable::new(cfg.max_positions, cfg.head_dim, cfg.rope_theta);
                rope = Some(GpuRopeTable::upload(gpu, &table)?);
            }
        }
        let head = opt("lm_head.weight".into()).unwrap_or(wte);
        if cfg.head_dim > ops::ATTENTION_MAX_DIM {
            return Err(Error::Unsupported {
                field: "model.head_dim".into(),
                message: format!("{} exceeds the CUDA attention kernels' {}", cfg.head_dim, ops::ATTENTION_MAX_DIM),
            });
        }
        let max_weight = t.entries().iter().map(|e| e.at.len).max().unwrap_or(1);
        Ok(GpuModel {
            c,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            inner,
            vocab: cfg.vocab,
            max_positions: cfg.max_positions,
            eps: cfg.norm_eps,
            layer_norm,
            wte,
            wpe,
            blocks,
            final_norm,
            head,
            rope,
            max_weight,
        })
    }

    pub(super) fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    pub(super) fn head_block_rows(&self, rows: usize) -> usize {
        rows.clamp(1, (HEAD_BLOCK_ELEMS / self.vocab).max(1))
    }

    fn shape(&self, b: usize, seq: usize) -> AttnShape {
        AttnShape { batch: b, seq, heads: self.heads, kv_heads: self.kv_heads, dim: self.head_dim }
    }

    /// The forward pass over `b` loaded sequences; leaves the final normed hidden states in
    /// `a.nf`.
    fn forward<T: Storage>(&self, gpu: &Gpu, p: &CudaView<'_, T>, master: &CudaView<'_, f32>, a: &mut GpuActs<T>, b: usize) -> Result<()>
    where
        CudaBlasLT: Matmul<T>,
    {
        let (c, seq, cap) = (self.c, a.seq, a.cap);
        let n = b * seq;
        let nc = n * c;
        let (w, hd, inner) = (self.qkv_width(), self.heads * self.head_dim, self.inner);
        let lay = |l: usize, width: usize, len: usize| l * cap * width..l * cap * width + len;
        let wpe = self.wpe.map(|r| master.slice(r.range()));
        ops::embedding_forward(
            gpu,
            &mut a.res.slice_mut(..nc),
            &a.inputs.slice(..n),
            &master.slice(self.wte.range()),
            wpe.as_ref(),
            seq,
            c,
        )?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let x = a.res.slice(lay(l, c, nc));
            self.norm_forward(gpu, &blk.n1, master, &x, &mut a.n1.slice_mut(lay(l, c, nc)), &mut a.n1_mean, &mut a.n1_rstd, l * cap, n)?;
            {
                let n1 = a.n1.slice(lay(l, c, nc));
                let mut qkv = a.qkv.slice_mut(lay(l, w, n * w));
                match &blk.attn {
                    AttnProj::Fused(lin) => lin_forward(gpu, lin, p, master, &n1, c, &mut qkv, w, n, false)?,
                    AttnProj::Split { q, k, v } => {
                        lin_forward(gpu, q, p, master, &n1, c, &mut qkv, w, n, false)?;
                        lin_forward(gpu, k, p, master, &n1, c, &mut qkv.slice_mut(hd..), w, n, false)?;
                        lin_forward(gpu, v, p, master, &n1, c, &mut qkv.slice_mut(hd + self.kv_heads * self.head_dim..), w, n, false)?;
                    }
                }
                if let Some(rope) = &self.rope {
                    ops::rope_apply(gpu, &mut qkv, w, self.heads + self.kv_heads, seq, rope, false)?;
                }
            }
            ops::attention_forward(
                gpu,
                self.shape(b, seq),
                &a.qkv.slice(lay(l, w, n * w)),
                &mut a.att.slice_mut(lay(l, hd, n * hd)),
                &mut a.lse.slice_mut(lay(l, self.heads, n * self.heads)),
            )?;
            {
                let mut mid = a.mid.slice_mut(lay(l, c, nc));
                ops::copy(gpu, &mut mid, &x)?;
                lin_forward(gpu, &blk.o, p, master, &a.att.slice(lay(l, hd, n * hd)), hd, &mut mid, c, n, true)?;
            }
            let mid = a.mid.slice(lay(l, c, nc));
            self.norm_forward(gpu, &blk.n2, master, &mid, &mut a.n2.slice_mut(lay(l, c, nc)), &mut a.n2_mean, &mut a.n2_rstd, l * cap, n)?;
            let n2 = a.n2.slice(lay(l, c, nc));
            let act = &mut a.act;
            match &blk.mlp {
                Mlp::Gelu { fc, .. } => {
                    let mut h1 = a.h1.slice_mut(lay(l, inner, n * inner));
                    lin_forward(gpu, fc, p, master, &n2, c, &mut h1, inner, n, false)?;
                    ops::gelu_forward(gpu, &mut act.slice_mut(..n * inner), &h1)?;
                }
                Mlp::SwiGlu { gate, up, .. } => {
                    let mut h1 = a.h1.slice_mut(lay(l, inner, n * inner));
                    lin_forward(gpu, gate, p, master, &n2, c, &mut h1, inner, n, false)?;
                    let mut h2 = a.h2.slice_mut(lay(l, inner, n * inner));
                    lin_forward(gpu, up, p, master, &n2, c, &mut h2, inner, n, false)?;
                    ops::swiglu_forward(gpu, &mut act.slice_mut(..n * inner), &h1, &h2)?;
                }
            }
            // `x` (layer l of `res`) is not read again, so layer l+1 of the same stack can be written.
            let mut out = a.res.slice_mut(lay(l + 1, c, nc));
            ops::copy(gpu, &mut out, &mid)?;
            let proj = match &blk.mlp {
                Mlp::Gelu { proj, .. } => proj,
                Mlp::SwiGlu { down, .. } => down,
            };
            lin_forward(gpu, proj, p, master, &act.slice(..n * inner), inner, &mut out, c, n, true)?;
        }
        let l = self.blocks.len();
        let last = a.res.slice(lay(l, c, nc));
        self.norm_forward(gpu, &self.final_norm, master, &last, &mut a.nf.slice_mut(..nc), &mut a.nf_mean, &mut a.nf_rstd, 0, n)
    }

    /// One norm's forward; its statistics go to `mean`/`rstd` from row `at`.
    #[allow(clippy::too_many_arguments)]
    fn norm_forward<T: Storage>(
        &self,
        gpu: &Gpu,
        norm: &Norm,
        master: &CudaView<'_, f32>,
        x: &CudaView<'_, T>,
        out: &mut CudaViewMut<'_, T>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        at: usize,
        n: usize,
    ) -> Result<()> {
        let w = master.slice(norm.w.range());
        let mut rstd = rstd.slice_mut(at..at + n);
        match norm.b {
            Some(b) => {
                Ok(ops::layernorm_forward(gpu, out, &mut mean.slice_mut(at..at + n), &mut rstd, x, &w, &master.slice(b.range()), self.eps)?)
            }
            None => Ok(ops::rmsnorm_forward(gpu, out, &mut rstd, x, &w, self.eps)?),
        }
    }

    /// One norm's backward: `dx += …`, weight (and bias) gradients accumulate.
    #[allow(clippy::too_many_arguments)]
    fn norm_backward<T: Storage>(
        &self,
        gpu: &Gpu,
        norm: &Norm,
        master: &CudaView<'_, f32>,
        grads: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<T>,
        dout: &CudaView<'_, T>,
        x: &CudaView<'_, T>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        at: usize,
        n: usize,
    ) -> Result<()> {
        let nc = n * self.c;
        let w = master.slice(norm.w.range());
        let rstd = rstd.slice(at..at + n);
        let mut dxv = dx.slice_mut(..nc);
        match norm.b {
            Some(b) => with_two(grads, norm.w, b, |dw, db| {
                Ok(ops::layernorm_backward(gpu, &mut dxv, dw, db, dout, x, &mean.slice(at..at + n), &rstd, &w)?)
            }),
            None => Ok(ops::rmsnorm_backward(gpu, &mut dxv, &mut grads.slice_mut(norm.w.range()), dout, x, &rstd, &w)?),
        }
    }

    /// Forward and backward over `b` loaded sequences: accumulates `grad_scale × ∂(summed
    /// loss)/∂params` into `grads`; returns the summed loss in nats.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_backward<T: Storage>(
        &self,
        gpu: &Gpu,
        p: &CudaView<'_, T>,
        master: &CudaView<'_, f32>,
        grads: &mut CudaSlice<f32>,
        a: &mut GpuActs<T>,
        b: usize,
        grad_scale: f32,
    ) -> Result<f64>
    where
        CudaBlasLT: Matmul<T>,
    {
        self.forward(gpu, p, master, a, b)?;
        let (c, seq, cap) = (self.c, a.seq, a.cap);
        let n = b * seq;
        let nc = n * c;
        let (w, hd, inner) = (self.qkv_width(), self.heads * self.head_dim, self.inner);
        let lay = |l: usize, width: usize, len: usize| l * cap * width..l * cap * width + len;
        let loss = self.head_loss(gpu, p, grads, a, n, Some(grad_scale))?;
        ops::zero(gpu, &mut a.dres.slice_mut(..nc))?;
        let l_all = self.blocks.len();
        self.norm_backward(
            gpu,
            &self.final_norm,
            master,
            grads,
            &mut a.dres,
            &a.dc.slice(..nc),
            &a.res.slice(lay(l_all, c, nc)),
            &a.nf_mean,
            &a.nf_rstd,
            0,
            n,
        )?;
        for (l, blk) in self.blocks.iter().enumerate().rev() {
            // MLP: the activation is recomputed rather than stored per layer.
            let n2 = a.n2.slice(lay(l, c, nc));
            let h1 = a.h1.slice(lay(l, inner, n * inner));
            match &blk.mlp {
                Mlp::Gelu { fc, proj } => {
                    ops::gelu_forward(gpu, &mut a.act.slice_mut(..n * inner), &h1)?;
                    let mut da = a.da.slice_mut(..n * inner);
                    lin_backward(
                        gpu,
                        proj,
                        p,
                        grads,
                        &mut a.wgrad,
                        &a.act.slice(..n * inner),
                        inner,
                        &a.dres.slice(..nc),
                        c,
                        Some((&mut da, inner, false)),
                        n,
                    )?;
                    ops::gelu_backward_inplace(gpu, &mut da, &h1)?;
                    lin_backward(gpu, fc, p, grads, &mut a.wgrad, &n2, c, &da, inner, Some((&mut a.dc.slice_mut(..nc), c, false)), n)?;
                }
                Mlp::SwiGlu { gate, up, down } => {
                    let h2 = a.h2.slice(lay(l, inner, n * inner));
                    ops::swiglu_forward(gpu, &mut a.act.slice_mut(..n * inner), &h1, &h2)?;
                    let (mut da, mut db) = (a.da.slice_mut(..n * inner), a.db.slice_mut(..n * inner));
                    lin_backward(
                        gpu,
                        down,
                        p,
                        grads,
                        &mut a.wgrad,
                        &a.act.slice(..n * inner),
                        inner,
                        &a.dres.slice(..nc),
                        c,
                        Some((&mut da, inner, false)),
                        n,
                    )?;
                    ops::swiglu_backward(gpu, &mut da, &mut db, &h1, &h2)?;
                    let mut dc = a.dc.slice_mut(..nc);
                    lin_backward(gpu, gate, p, grads, &mut a.wgrad, &n2, c, &da, inner, Some((&mut dc, c, false)), n)?;
                    lin_backward(gpu, up, p, grads, &mut a.wgrad, &n2, c, &db, inner, Some((&mut dc, c, true)), n)?;
                }
            }
            self.norm_backward(
                gpu,
                &blk.n2,
                master,
                grads,
                &mut a.dres,
                &a.dc.slice(..nc),
                &a.mid.slice(lay(l, c, nc)),
                &a.n2_mean,
                &a.n2_rstd,
                l * cap,
                n,
            )?;
            // Attention.
            let att = a.att.slice(lay(l, hd, n * hd));
            lin_backward(
                gpu,
                &blk.o,
                p,
                grads,
                &mut a.wgrad,
                &att,
                hd,
                &a.dres.slice(..nc),
                c,
                Some((&mut a.datt.slice_mut(..n * hd), hd, false)),
                n,
            )?;
            let qkv = a.qkv.slice(lay(l, w, n * w));
            let mut dqkv = a.dqkv.slice_mut(..n * w);
            ops::attention_backward(
                gpu,
                self.shape(b, seq),
                &qkv,
                &att,
                &a.lse.slice(lay(l, self.heads, n * self.heads)),
                &a.datt.slice(..n * hd),
                &mut dqkv,
            )?;
            if let Some(rope) = &self.rope {
                ops::rope_apply(gpu, &mut dqkv, w, self.heads + self.kv_heads, seq, rope, true)?;
            }
            let n1 = a.n1.slice(lay(l, c, nc));
            let mut dc = a.dc.slice_mut(..nc);
            match &blk.attn {
                AttnProj::Fused(lin) => lin_backward(gpu, lin, p, grads, &mut a.wgrad, &n1, c, &dqkv, w, Some((&mut dc, c, false)), n)?,
                AttnProj::Split { q, k, v } => {
                    let v_off = hd + self.kv_heads * self.head_dim;
                    lin_backward(gpu, q, p, grads, &mut a.wgrad, &n1, c, &dqkv, w, Some((&mut dc, c, false)), n)?;
                    lin_backward(gpu, k, p, grads, &mut a.wgrad, &n1, c, &dqkv.slice(hd..), w, Some((&mut dc, c, true)), n)?;
                    lin_backward(gpu, v, p, grads, &mut a.wgrad, &n1, c, &dqkv.slice(v_off..), w, Some((&mut dc, c, true)), n)?;
                }
            }
            self.norm_backward(
                gpu,
                &blk.n1,
                master,
                grads,
                &mut a.dres,
                &a.dc.slice(..nc),
                &a.res.slice(lay(l, c, nc)),
                &a.n1_mean,
                &a.n1_rstd,
                l * cap,
                n,
            )?;
        }
        let inputs = &a.inputs_host[..n];
        let dres = a.dres.slice(..nc);
        match self.wpe {
            Some(wpe) => {
                with_two(grads, self.wte, wpe, |dwte, dwpe| Ok(ops::embedding_backward(gpu, dwte, Some(dwpe), &dres, inputs, seq, c)?))?
            }
            None => ops::embedding_backward(gpu, &mut grads.slice_mut(self.wte.range()), None, &dres, inputs, seq, c)?,
        }
        Ok(loss)
    }

    /// The head and the loss, a block of rows at a time. With `grad_scale`, writes the hidden
    /// states' gradient into `a.dc` and accumulates the head weight's gradient.
    fn head_loss<T: Storage>(
        &self,
        gpu: &Gpu,
        p: &CudaView<'_, T>,
        grads: &mut CudaSlice<f32>,
        a: &mut GpuActs<T>,
        rows: usize,
        grad_scale: Option<f32>,
    ) -> Result<f64>
    where
        CudaBlasLT: Matmul<T>,
    {
        let (c, v) = (self.c, self.vocab);
        let block = self.head_block_rows(rows);
        let wt = p.slice(self.head.range());
        let mut r0 = 0;
        while r0 < rows {
            let r = block.min(rows - r0);
            let h = a.nf.slice(r0 * c..(r0 + r) * c);
            let mut logits = a.logits.slice_mut(..r * v);
            ops::matmul(gpu, &mut logits, &h, &wt, r, c, v, false, true, false)?;
            ops::softmax_xent_rows(gpu, &mut logits, &a.targets.slice(r0..r0 + r), &mut a.losses.slice_mut(r0..r0 + r), v, grad_scale)?;
            if grad_scale.is_some() {
                ops::matmul(gpu, &mut a.dc.slice_mut(r0 * c..(r0 + r) * c), &logits, &wt, r, v, c, false, false, false)?;
                let mut wg = a.wgrad.slice_mut(..v * c);
                ops::matmul(gpu, &mut wg, &logits, &h, v, r, c, true, false, false)?;
                ops::accumulate(gpu, &mut grads.slice_mut(self.head.range()), &wg)?;
            }
            r0 += r;
        }
        // One read of every row's loss (this waits for the pass), summed in row order in f64.
        let losses = gpu.stream().clone_dtoh(&a.losses.slice(..rows)).map_err(|e| Error::Device(format!("copying losses: {e}")))?;
        Ok(losses.iter().map(|&l| l as f64).sum())
    }

    /// Summed loss over `b` loaded sequences, forward only.
    pub(super) fn loss<T: Storage>(
        &self,
        gpu: &Gpu,
        p: &CudaView<'_, T>,
        master: &CudaView<'_, f32>,
        grads: &mut CudaSlice<f32>,
        a: &mut GpuActs<T>,
        b: usize,
    ) -> Result<f64>
    where
        CudaBlasLT: Matmul<T>,
    {
        self.forward(gpu, p, master, a, b)?;
        let n = b * a.seq;
        self.head_loss(gpu, p, grads, a, n, None)
    }
}

/// `y (+)= x · W + b` for `rows` rows; `x` and `y` are `(buffer, row stride)`.
#[allow(clippy::too_many_arguments)]
fn lin_forward<T: Storage>(
    gpu: &Gpu,
    lin: &Lin,
    p: &CudaView<'_, T>,
    master: &CudaView<'_, f32>,
    x: &impl In<T>,
    x_stride: usize,
    y: &mut impl Out<T>,
    y_stride: usize,
    rows: usize,
    add: bool,
) -> Result<()>
where
    CudaBlasLT: Matmul<T>,
{
    let mut acc = add;
    if let Some(b) = lin.b {
        ops::add_bias(gpu, y, &master.slice(b.range()), rows, y_stride, !add)?;
        acc = true;
    }
    let (tb, ldb) = match lin.layout {
        WeightLayout::InOut => (false, lin.d_out),
        WeightLayout::OutIn => (true, lin.d_in),
    };
    let ld = Strides { a: x_stride, b: ldb, c: y_stride };
    Ok(ops::matmul_strided(gpu, y, x, &p.slice(lin.w.range()), rows, lin.d_in, lin.d_out, false, tb, ld, acc)?)
}

/// Accumulates the weight (and bias) gradient from the saved input `x` and the output gradient
/// `dy`, and writes (or with `true`, adds) the input gradient into `dx` when asked.
#[allow(clippy::too_many_arguments)]
fn lin_backward<T: Storage>(
    gpu: &Gpu,
    lin: &Lin,
    p: &CudaView<'_, T>,
    grads: &mut CudaSlice<f32>,
    wgrad: &mut CudaSlice<T>,
    x: &impl In<T>,
    x_stride: usize,
    dy: &impl In<T>,
    dy_stride: usize,
    dx: Option<(&mut CudaViewMut<'_, T>, usize, bool)>,
    rows: usize,
) -> Result<()>
where
    CudaBlasLT: Matmul<T>,
{
    let (d_in, d_out) = (lin.d_in, lin.d_out);
    {
        let mut wg = wgrad.slice_mut(..lin.w.len);
        match lin.layout {
            // dW [in, out] = xᵀ · dy
            WeightLayout::InOut => ops::matmul_strided(
                gpu,
                &mut wg,
                x,
                dy,
                d_in,
                rows,
                d_out,
                true,
                false,
                Strides { a: x_stride, b: dy_stride, c: d_out },
                false,
            )?,
            // dW [out, in] = dyᵀ · x
            WeightLayout::OutIn => ops::matmul_strided(
                gpu,
                &mut wg,
                dy,
                x,
                d_out,
                rows,
                d_in,
                true,
                false,
                Strides { a: dy_stride, b: x_stride, c: d_in },
                false,
            )?,
        }
        ops::accumulate(gpu, &mut grads.slice_mut(lin.w.range()), &wg)?;
    }
    if let Some(b) = lin.b {
        ops::add_col_sums(gpu, &mut grads.slice_mut(b.range()), dy, rows, d_out, dy_stride)?;
    }
    if let Some((dx, dx_stride, add)) = dx {
        // dx [rows, in] = dy · Wᵀ
        let (tb, ldb) = match lin.layout {
            WeightLayout::InOut => (true, d_out),
            WeightLayout::OutIn => (false, d_in),
        };
        ops::matmul_strided(
            gpu,
            dx,
            dy,
            &p.slice(lin.w.range()),
            rows,
            d_out,
            d_in,
            false,
            tb,
            Strides { a: dy_stride, b: ldb, c: dx_stride },
            add,
        )?;
    }
    Ok(())
}

/// Runs `f` on two disjoint parameters' views of `g` at once.
fn with_two<R>(
    g: &mut CudaSlice<f32>,
    a: ParamRef,
    b: ParamRef,
    f: impl FnOnce(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>) -> Result<R>,
) -> Result<R> {
    let shift = |r: Range<usize>, by: usize| r.start - by..r.end - by;
    if a.offset < b.offset {
        assert!(a.offset + a.len <= b.offset, "parameters overlap");
        let (mut lo, mut hi) = g.split_at_mut(b.offset);
        let (mut av, mut bv) = (lo.slice_mut(a.range()), hi.slice_mut(shift(b.range(), b.offset)));
        f(&mut av, &mut bv)
    } else {
        assert!(b.offset + b.len <= a.offset, "parameters overlap");
        let (mut lo, mut hi) = g.split_at_mut(a.offset);
        let (mut bv, mut av) = (lo.slice_mut(b.range()), hi.slice_mut(shift(a.range(), a.offset)));
        f(&mut av, &mut bv)
    }
}
