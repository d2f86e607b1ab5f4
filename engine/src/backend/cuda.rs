//! The CUDA backend: `kernels::cuda::ops` on one GPU, activations and matmul weights in the
//! working precision `T` (f32, bf16 or f16), everything else in f32. Without the `cuda` feature
//! the backend still exists and answers that this build has no CUDA.

#[cfg(feature = "cuda")]
pub use imp::Cuda;

/// Stands in for the CUDA backend in builds without CUDA, so callers compile unchanged.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub struct Cuda<T>(std::marker::PhantomData<T>);

#[cfg(not(feature = "cuda"))]
impl<T> Cuda<T> {
    /// Always the "built without CUDA" error.
    pub fn open(_ordinal: usize) -> crate::Result<Self> {
        Err(gantry_kernels::Error::NotBuilt.into())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::ops::Range;
    use std::sync::Mutex;

    use gantry_kernels::cpu::adamw::AdamWStep;
    use gantry_kernels::cpu::attention::AttnShape;
    use gantry_kernels::cpu::rope::RopeTable;
    use gantry_kernels::cuda::cudarc::cublaslt::{CudaBlasLT, Matmul};
    use gantry_kernels::cuda::cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
    use gantry_kernels::cuda::ops::{self, GpuRopeTable, Storage, Strides};
    use gantry_kernels::cuda::Gpu;

    use crate::backend::{Accumulate, Backend, Ids, Mat, MatMut, Span, SpanMut};
    use crate::{Error, Result};

    /// One GPU, computing in `T`.
    pub struct Cuda<T: Storage> {
        gpu: Gpu,
        /// A weight gradient in `T` before it is added to the f32 gradients; grown to the
        /// largest weight on first use.
        scratch: Mutex<Option<CudaSlice<T>>>,
    }

    impl<T: Storage> std::fmt::Debug for Cuda<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Cuda").field("gpu", &self.gpu).field("precision", &T::SUFFIX).finish()
        }
    }

    impl<T: Storage> Cuda<T> {
        pub fn new(gpu: Gpu) -> Self {
            Cuda { gpu, scratch: Mutex::new(None) }
        }

        pub fn open(ordinal: usize) -> Result<Self> {
            Ok(Self::new(Gpu::open(ordinal)?))
        }

        pub fn gpu(&self) -> &Gpu {
            &self.gpu
        }
    }

    fn dev(what: &'static str) -> impl Fn(gantry_kernels::cuda::cudarc::driver::DriverError) -> Error {
        move |e| Error::Device(format!("{what}: {e}"))
    }

    fn r<'a, X>(s: &Span<'a, CudaSlice<X>>) -> CudaView<'a, X> {
        s.buf.slice(s.range.clone())
    }

    fn w<'a, X>(s: SpanMut<'a, CudaSlice<X>>) -> CudaViewMut<'a, X> {
        s.buf.slice_mut(s.range)
    }

    /// Runs `f` on two disjoint ranges of `g` at once.
    fn with_two<R>(
        g: &mut CudaSlice<f32>,
        a: Range<usize>,
        b: Range<usize>,
        f: impl FnOnce(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>) -> Result<R>,
    ) -> Result<R> {
        assert!(a.end <= b.start || b.end <= a.start, "ranges {a:?} and {b:?} overlap");
        let shift = |r: Range<usize>, by: usize| r.start - by..r.end - by;
        if a.start < b.start {
            let (mut lo, mut hi) = g.split_at_mut(b.start);
            let (mut av, mut bv) = (lo.slice_mut(a), hi.slice_mut(shift(b.clone(), b.start)));
            f(&mut av, &mut bv)
        } else {
            let (mut lo, mut hi) = g.split_at_mut(a.start);
            let (mut bv, mut av) = (lo.slice_mut(b), hi.slice_mut(shift(a.clone(), a.start)));
            f(&mut av, &mut bv)
        }
    }

    impl<T: Storage> Backend for Cuda<T>
    where
        CudaBlasLT: Matmul<T>,
    {
        type Act = CudaSlice<T>;
        type F32 = CudaSlice<f32>;
        type ActBuf = CudaSlice<T>;
        type F32Buf = CudaSlice<f32>;
        type Tokens = CudaSlice<u32>;
        type Rope = GpuRopeTable;
        type Losses = CudaSlice<f32>;

        /// 64 M elements (256 MiB of f32-sized logits): a GPU's weight-gradient GEMM wants
        /// thousands of rows, and the memory is there.
        const HEAD_BLOCK_FLOATS: usize = 1 << 26;

        fn describe(&self) -> String {
            let name = self.gpu.context().name().unwrap_or_else(|_| "unknown GPU".into());
            format!("cuda:{} ({name}, {})", self.gpu.context().ordinal(), T::SUFFIX)
        }

        fn alloc(&self, len: usize) -> Result<CudaSlice<T>> {
            self.gpu.stream().alloc_zeros::<T>(len.max(1)).map_err(dev("allocating activations on the GPU"))
        }

        fn alloc_f32(&self, len: usize) -> Result<CudaSlice<f32>> {
            self.gpu.stream().alloc_zeros::<f32>(len.max(1)).map_err(dev("allocating f32 buffers on the GPU"))
        }

        fn alloc_tokens(&self, len: usize) -> Result<CudaSlice<u32>> {
            self.gpu.stream().alloc_zeros::<u32>(len.max(1)).map_err(dev("allocating tokens on the GPU"))
        }

        fn load_tokens(&self, d: &mut CudaSlice<u32>, host: &[u32]) -> Result<()> {
            self.gpu.stream().memcpy_htod(host, &mut d.slice_mut(..host.len())).map_err(dev("copying tokens to the GPU"))
        }

        fn upload_rope(&self, table: &RopeTable) -> Result<GpuRopeTable> {
            Ok(GpuRopeTable::upload(&self.gpu, table)?)
        }

        fn losses(&self, rows: usize) -> Result<CudaSlice<f32>> {
            self.alloc_f32(rows)
        }

        fn loss_sum(&self, losses: &mut CudaSlice<f32>, rows: usize) -> Result<f64> {
            // One read of every row's loss (this waits for the pass), summed in row order in f64.
            let host = self.gpu.stream().clone_dtoh(&losses.slice(..rows)).map_err(dev("copying losses"))?;
            Ok(host.iter().map(|&l| l as f64).sum())
        }

        fn matmul(&self, c: MatMut<'_, CudaSlice<T>>, a: Mat<'_, CudaSlice<T>>, b: Mat<'_, CudaSlice<T>>, acc: Accumulate) -> Result<()> {
            let ((ta, lda), (tb, ldb)) = (a.blas(), b.blas());
            let (m, k, n) = (c.rows, a.cols, c.cols);
            let ld = Strides { a: lda, b: ldb, c: c.rs };
            let ext = c.extent();
            let mut cv = c.buf.slice_mut(ext);
            ops::matmul_strided(
                &self.gpu,
                &mut cv,
                &a.buf.slice(a.extent()),
                &b.buf.slice(b.extent()),
                m,
                k,
                n,
                ta,
                tb,
                ld,
                acc == Accumulate::Add,
            )?;
            Ok(())
        }

        fn matmul_grad(&self, g: MatMut<'_, CudaSlice<f32>>, a: Mat<'_, CudaSlice<T>>, b: Mat<'_, CudaSlice<T>>) -> Result<()> {
            if g.rs != g.cols {
                return Err(Error::Device(format!(
                    "a weight gradient of {}×{} with row stride {}: gradients are packed",
                    g.rows, g.cols, g.rs
                )));
            }
            let len = g.rows * g.cols;
            let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            if guard.as_ref().is_none_or(|s| s.len() < len) {
                *guard = Some(self.alloc(len)?);
            }
            let scratch = guard.as_mut().expect("allocated above");
            self.matmul(MatMut::new(scratch, 0, g.rows, g.cols), a, b, Accumulate::Overwrite)?;
            let ext = g.extent();
            ops::accumulate(&self.gpu, &mut g.buf.slice_mut(ext), &scratch.slice(..len))?;
            Ok(())
        }

        fn add_bias(&self, y: MatMut<'_, CudaSlice<T>>, bias: Span<'_, CudaSlice<f32>>, acc: Accumulate) -> Result<()> {
            let (rows, rs, ext) = (y.rows, y.rs, y.extent());
            ops::add_bias(&self.gpu, &mut y.buf.slice_mut(ext), &r(&bias), rows, rs, acc == Accumulate::Overwrite)?;
            Ok(())
        }

        fn bias_grad(&self, db: SpanMut<'_, CudaSlice<f32>>, dy: Mat<'_, CudaSlice<T>>) -> Result<()> {
            ops::add_col_sums(&self.gpu, &mut w(db), &dy.buf.slice(dy.extent()), dy.rows, dy.cols, dy.rs)?;
            Ok(())
        }

        fn layernorm_forward(
            &self,
            out: SpanMut<'_, CudaSlice<T>>,
            mean: SpanMut<'_, CudaSlice<f32>>,
            rstd: SpanMut<'_, CudaSlice<f32>>,
            x: Span<'_, CudaSlice<T>>,
            wt: Span<'_, CudaSlice<f32>>,
            b: Span<'_, CudaSlice<f32>>,
            eps: f32,
        ) -> Result<()> {
            ops::layernorm_forward(&self.gpu, &mut w(out), &mut w(mean), &mut w(rstd), &r(&x), &r(&wt), &r(&b), eps)?;
            Ok(())
        }

        fn layernorm_backward(
            &self,
            dx: SpanMut<'_, CudaSlice<T>>,
            g: &mut CudaSlice<f32>,
            dw: Range<usize>,
            db: Range<usize>,
            dout: Span<'_, CudaSlice<T>>,
            x: Span<'_, CudaSlice<T>>,
            mean: Span<'_, CudaSlice<f32>>,
            rstd: Span<'_, CudaSlice<f32>>,
            wt: Span<'_, CudaSlice<f32>>,
        ) -> Result<()> {
            let mut dx = w(dx);
            with_two(g, dw, db, |dw, db| {
                Ok(ops::layernorm_backward(&self.gpu, &mut dx, dw, db, &r(&dout), &r(&x), &r(&mean), &r(&rstd), &r(&wt))?)
            })
        }

        fn rmsnorm_forward(
            &self,
            out: SpanMut<'_, CudaSlice<T>>,
            rstd: SpanMut<'_, CudaSlice<f32>>,
            x: Span<'_, CudaSlice<T>>,
            wt: Span<'_, CudaSlice<f32>>,
            eps: f32,
        ) -> Result<()> {
            ops::rmsnorm_forward(&self.gpu, &mut w(out), &mut w(rstd), &r(&x), &r(&wt), eps)?;
            Ok(())
        }

        fn rmsnorm_backward(
            &self,
            dx: SpanMut<'_, CudaSlice<T>>,
            dw: SpanMut<'_, CudaSlice<f32>>,
            dout: Span<'_, CudaSlice<T>>,
            x: Span<'_, CudaSlice<T>>,
            rstd: Span<'_, CudaSlice<f32>>,
            wt: Span<'_, CudaSlice<f32>>,
        ) -> Result<()> {
            ops::rmsnorm_backward(&self.gpu, &mut w(dx), &mut w(dw), &r(&dout), &r(&x), &r(&rstd), &r(&wt))?;
            Ok(())
        }

        fn attention_forward(
            &self,
            s: AttnShape,
            qkv: Span<'_, CudaSlice<T>>,
            out: SpanMut<'_, CudaSlice<T>>,
            lse: SpanMut<'_, CudaSlice<f32>>,
        ) -> Result<()> {
            if s.dim > ops::ATTENTION_MAX_DIM {
                return Err(Error::Unsupported {
                    field: "model.head_dim".into(),
                    message: format!("{} exceeds the CUDA attention kernels' {}", s.dim, ops::ATTENTION_MAX_DIM),
                });
            }
            ops::attention_forward(&self.gpu, s, &r(&qkv), &mut w(out), &mut w(lse))?;
            Ok(())
        }

        fn attention_backward(
            &self,
            s: AttnShape,
            qkv: Span<'_, CudaSlice<T>>,
            out: Span<'_, CudaSlice<T>>,
            lse: Span<'_, CudaSlice<f32>>,
            dout: Span<'_, CudaSlice<T>>,
            dqkv: SpanMut<'_, CudaSlice<T>>,
        ) -> Result<()> {
            ops::attention_backward(&self.gpu, s, &r(&qkv), &r(&out), &r(&lse), &r(&dout), &mut w(dqkv))?;
            Ok(())
        }

        fn rope_apply(
            &self,
            x: SpanMut<'_, CudaSlice<T>>,
            stride: usize,
            heads: usize,
            seq: usize,
            pos0: usize,
            _: &RopeTable,
            table: &GpuRopeTable,
            inverse: bool,
        ) -> Result<()> {
            ops::rope_apply(&self.gpu, &mut w(x), stride, heads, seq, pos0, table, inverse)?;
            Ok(())
        }

        fn gelu_forward(&self, out: SpanMut<'_, CudaSlice<T>>, x: Span<'_, CudaSlice<T>>) -> Result<()> {
            ops::gelu_forward(&self.gpu, &mut w(out), &r(&x))?;
            Ok(())
        }

        fn gelu_backward_inplace(&self, d: SpanMut<'_, CudaSlice<T>>, x: Span<'_, CudaSlice<T>>) -> Result<()> {
            ops::gelu_backward_inplace(&self.gpu, &mut w(d), &r(&x))?;
            Ok(())
        }

        fn swiglu_forward(&self, out: SpanMut<'_, CudaSlice<T>>, gate: Span<'_, CudaSlice<T>>, up: Span<'_, CudaSlice<T>>) -> Result<()> {
            ops::swiglu_forward(&self.gpu, &mut w(out), &r(&gate), &r(&up))?;
            Ok(())
        }

        fn swiglu_backward(
            &self,
            d_gate: SpanMut<'_, CudaSlice<T>>,
            d_up: SpanMut<'_, CudaSlice<T>>,
            gate: Span<'_, CudaSlice<T>>,
            up: Span<'_, CudaSlice<T>>,
        ) -> Result<()> {
            ops::swiglu_backward(&self.gpu, &mut w(d_gate), &mut w(d_up), &r(&gate), &r(&up))?;
            Ok(())
        }

        fn copy(&self, dst: SpanMut<'_, CudaSlice<T>>, src: Span<'_, CudaSlice<T>>) -> Result<()> {
            ops::copy(&self.gpu, &mut w(dst), &r(&src))?;
            Ok(())
        }

        fn zero(&self, dst: SpanMut<'_, CudaSlice<T>>) -> Result<()> {
            ops::zero(&self.gpu, &mut w(dst))?;
            Ok(())
        }

        fn embedding_forward(
            &self,
            out: SpanMut<'_, CudaSlice<T>>,
            tokens: Ids<'_, Self>,
            wte: Span<'_, CudaSlice<f32>>,
            wpe: Option<Span<'_, CudaSlice<f32>>>,
            seq: usize,
            c: usize,
        ) -> Result<()> {
            let ids = tokens.dev.slice(tokens.at..tokens.at + tokens.host.len());
            let wpe = wpe.as_ref().map(r);
            ops::embedding_forward(&self.gpu, &mut w(out), &ids, &r(&wte), wpe.as_ref(), seq, c)?;
            Ok(())
        }

        fn embedding_rows(
            &self,
            out: SpanMut<'_, CudaSlice<T>>,
            tokens: Ids<'_, Self>,
            table: Span<'_, CudaSlice<f32>>,
            first: usize,
            c: usize,
        ) -> Result<()> {
            let ids = tokens.dev.slice(tokens.at..tokens.at + tokens.host.len());
            ops::embedding_rows(&self.gpu, &mut w(out), &ids, &r(&table), first, c)?;
            Ok(())
        }

        fn add_positions(&self, out: SpanMut<'_, CudaSlice<T>>, wpe: Span<'_, CudaSlice<f32>>, seq: usize, c: usize) -> Result<()> {
            ops::add_positions(&self.gpu, &mut w(out), &r(&wpe), seq, c)?;
            Ok(())
        }

        fn embedding_backward(
            &self,
            g: &mut CudaSlice<f32>,
            wte: Range<usize>,
            first: usize,
            wpe: Option<Range<usize>>,
            dout: Span<'_, CudaSlice<T>>,
            tokens: Ids<'_, Self>,
            seq: usize,
            c: usize,
        ) -> Result<()> {
            let dout = r(&dout);
            match wpe {
                Some(wpe) => with_two(g, wte, wpe, |dwte, dwpe| {
                    Ok(ops::embedding_backward(&self.gpu, dwte, Some(dwpe), &dout, tokens.host, first, seq, c)?)
                }),
                None => Ok(ops::embedding_backward(&self.gpu, &mut g.slice_mut(wte), None, &dout, tokens.host, first, seq, c)?),
            }
        }

        fn xent_stats(
            &self,
            logits: MatMut<'_, CudaSlice<T>>,
            targets: Ids<'_, Self>,
            first: usize,
            stats: SpanMut<'_, CudaSlice<f32>>,
        ) -> Result<()> {
            let (vocab, ext) = (logits.cols, logits.extent());
            let rows = targets.at..targets.at + targets.host.len();
            ops::xent_stats(&self.gpu, &mut logits.buf.slice_mut(ext), &targets.dev.slice(rows), &mut w(stats), vocab, first)?;
            Ok(())
        }

        fn xent_finish(
            &self,
            logits: MatMut<'_, CudaSlice<T>>,
            targets: Ids<'_, Self>,
            first: usize,
            local: Span<'_, CudaSlice<f32>>,
            global: Span<'_, CudaSlice<f32>>,
            grad_scale: Option<f32>,
            losses: &mut CudaSlice<f32>,
        ) -> Result<()> {
            let (vocab, ext) = (logits.cols, logits.extent());
            let rows = targets.at..targets.at + targets.host.len();
            ops::xent_finish(
                &self.gpu,
                &mut logits.buf.slice_mut(ext),
                &targets.dev.slice(rows.clone()),
                &r(&local),
                &r(&global),
                &mut losses.slice_mut(rows),
                vocab,
                first,
                grad_scale,
            )?;
            Ok(())
        }

        fn softmax_xent(
            &self,
            logits: MatMut<'_, CudaSlice<T>>,
            targets: Ids<'_, Self>,
            grad_scale: Option<f32>,
            losses: &mut CudaSlice<f32>,
        ) -> Result<()> {
            let (vocab, ext) = (logits.cols, logits.extent());
            let rows = targets.at..targets.at + targets.host.len();
            ops::softmax_xent_rows(
                &self.gpu,
                &mut logits.buf.slice_mut(ext),
                &targets.dev.slice(rows.clone()),
                &mut losses.slice_mut(rows),
                vocab,
                grad_scale,
            )?;
            Ok(())
        }

        fn sum_squares(&self, x: &CudaSlice<f32>, pieces: &[Range<usize>]) -> Result<f64> {
            Ok(ops::sum_squares_pieces(&self.gpu, x, pieces)?)
        }

        fn scale(&self, x: SpanMut<'_, CudaSlice<f32>>, s: f32) -> Result<()> {
            ops::scale(&self.gpu, &mut w(x), s)?;
            Ok(())
        }

        fn zero_f32(&self, x: SpanMut<'_, CudaSlice<f32>>) -> Result<()> {
            ops::zero(&self.gpu, &mut w(x))?;
            Ok(())
        }

        fn f32_as_act<'a>(&self, x: &'a CudaSlice<f32>) -> Option<&'a CudaSlice<T>> {
            (x as &dyn std::any::Any).downcast_ref::<CudaSlice<T>>()
        }

        fn unscale_check(&self, g: &mut CudaSlice<f32>, pieces: &[Range<usize>], inv_scale: f32) -> Result<bool> {
            Ok(ops::unscale_check_pieces(&self.gpu, g, pieces, inv_scale)?)
        }

        fn adamw(
            &self,
            p: SpanMut<'_, CudaSlice<f32>>,
            work: Option<SpanMut<'_, CudaSlice<T>>>,
            g: Span<'_, CudaSlice<f32>>,
            m: SpanMut<'_, CudaSlice<f32>>,
            v: SpanMut<'_, CudaSlice<f32>>,
            hp: &AdamWStep,
            decay: bool,
        ) -> Result<()> {
            match work {
                Some(wk) => ops::adamw_update_copy(&self.gpu, &mut w(p), &mut w(wk), &r(&g), &mut w(m), &mut w(v), hp, decay)?,
                None => ops::adamw_update(&self.gpu, &mut w(p), &r(&g), &mut w(m), &mut w(v), hp, decay)?,
            }
            Ok(())
        }
    }
}
