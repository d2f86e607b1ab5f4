//! Device buffers for one batch shape: the saved activations (layer-major stacks, as on CPU) and
//! the backward scratch, in the working precision `T`; norm statistics and the attention
//! log-sum-exp in f32.

use gantry_kernels::cuda::cudarc::driver::CudaSlice;
use gantry_kernels::cuda::ops::Storage;
use gantry_kernels::cuda::Gpu;

use super::model::GpuModel;
use crate::{Error, Result};

pub struct GpuActs<T: Storage> {
    pub(super) batch: usize,
    pub(super) seq: usize,
    /// Rows the buffers hold (`batch * seq`): the stride of the layer stacks.
    pub(super) cap: usize,
    /// The batch's tokens on the host (the inputs also feed the embedding backward's bucketing).
    pub(super) inputs_host: Vec<u32>,
    targets_host: Vec<u32>,
    pub(super) inputs: CudaSlice<u32>,
    pub(super) targets: CudaSlice<u32>,
    pub(super) res: CudaSlice<T>,
    pub(super) mid: CudaSlice<T>,
    pub(super) n1: CudaSlice<T>,
    pub(super) n1_mean: CudaSlice<f32>,
    pub(super) n1_rstd: CudaSlice<f32>,
    pub(super) qkv: CudaSlice<T>,
    pub(super) att: CudaSlice<T>,
    pub(super) lse: CudaSlice<f32>,
    pub(super) n2: CudaSlice<T>,
    pub(super) n2_mean: CudaSlice<f32>,
    pub(super) n2_rstd: CudaSlice<f32>,
    /// GPT-2: the MLP's first projection; LLaMA: the gate projection.
    pub(super) h1: CudaSlice<T>,
    /// LLaMA: the up projection (GPT-2: empty).
    pub(super) h2: CudaSlice<T>,
    pub(super) act: CudaSlice<T>,
    pub(super) nf: CudaSlice<T>,
    pub(super) nf_mean: CudaSlice<f32>,
    pub(super) nf_rstd: CudaSlice<f32>,
    pub(super) dres: CudaSlice<T>,
    pub(super) dc: CudaSlice<T>,
    pub(super) datt: CudaSlice<T>,
    pub(super) dqkv: CudaSlice<T>,
    pub(super) da: CudaSlice<T>,
    pub(super) db: CudaSlice<T>,
    pub(super) logits: CudaSlice<T>,
    /// Each row's loss, read back once per pass.
    pub(super) losses: CudaSlice<f32>,
    /// A weight gradient in `T` before it is added to the f32 gradient buffer.
    pub(super) wgrad: CudaSlice<T>,
}

impl<T: Storage> GpuActs<T> {
    pub fn new(gpu: &Gpu, m: &GpuModel, batch: usize, seq: usize) -> Result<Self> {
        if batch == 0 || seq == 0 || seq > m.max_positions {
            return Err(Error::Unsupported {
                field: "data.seq_len".into(),
                message: format!(
                    "batch {batch} of sequence length {seq}: both must be positive and the length at most {}",
                    m.max_positions
                ),
            });
        }
        let n = batch * seq;
        let (c, l, inner, w, hd) = (m.c, m.blocks.len(), m.inner, m.qkv_width(), m.heads * m.head_dim);
        let s = gpu.stream();
        let alloc_t =
            |len: usize| s.alloc_zeros::<T>(len.max(1)).map_err(|e| Error::Device(format!("allocating {len} activations on the GPU: {e}")));
        let alloc_f = |len: usize| {
            s.alloc_zeros::<f32>(len.max(1)).map_err(|e| Error::Device(format!("allocating {len} activations on the GPU: {e}")))
        };
        let layer_norm = m.layer_norm;
        let llama = m.rope.is_some();
        Ok(GpuActs {
            batch,
            seq,
            cap: n,
            inputs_host: vec![0; n],
            targets_host: vec![0; n],
            inputs: s.alloc_zeros::<u32>(n).map_err(|e| Error::Device(format!("allocating tokens on the GPU: {e}")))?,
            targets: s.alloc_zeros::<u32>(n).map_err(|e| Error::Device(format!("allocating tokens on the GPU: {e}")))?,
            res: alloc_t((l + 1) * n * c)?,
            mid: alloc_t(l * n * c)?,
            n1: alloc_t(l * n * c)?,
            n1_mean: alloc_f(if layer_norm { l * n } else { 0 })?,
            n1_rstd: alloc_f(l * n)?,
            qkv: alloc_t(l * n * w)?,
            att: alloc_t(l * n * hd)?,
            lse: alloc_f(l * n * m.heads)?,
            n2: alloc_t(l * n * c)?,
            n2_mean: alloc_f(if layer_norm { l * n } else { 0 })?,
            n2_rstd: alloc_f(l * n)?,
            h1: alloc_t(l * n * inner)?,
            h2: alloc_t(if llama { l * n * inner } else { 0 })?,
            act: alloc_t(n * inner)?,
            nf: alloc_t(n * c)?,
            nf_mean: alloc_f(n)?,
            nf_rstd: alloc_f(n)?,
            dres: alloc_t(n * c)?,
            dc: alloc_t(n * c)?,
            datt: alloc_t(n * hd)?,
            dqkv: alloc_t(n * w)?,
            da: alloc_t(n * inner)?,
            db: alloc_t(if llama { n * inner } else { 0 })?,
            logits: alloc_t(m.head_block_rows(n) * m.vocab)?,
            losses: alloc_f(n)?,
            wgrad: alloc_t(m.max_weight)?,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Splits `windows` (`[b, seq+1]` tokens) into inputs and targets on the device; returns `b`.
    pub(super) fn load(&mut self, gpu: &Gpu, windows: &[u32], vocab: usize) -> Result<usize> {
        let b = crate::models::split_windows(windows, self.seq, self.batch, vocab, &mut self.inputs_host, &mut self.targets_host)?;
        let s = gpu.stream();
        let n = b * self.seq;
        s.memcpy_htod(&self.inputs_host[..n], &mut self.inputs.slice_mut(..n))
            .map_err(|e| Error::Device(format!("copying tokens to the GPU: {e}")))?;
        s.memcpy_htod(&self.targets_host[..n], &mut self.targets.slice_mut(..n))
            .map_err(|e| Error::Device(format!("copying tokens to the GPU: {e}")))?;
        Ok(b)
    }
}
