//! Row-major matmuls through cuBLASLt.

use super::*;

/// Leading dimensions (row strides, in elements) of the three matrices of a row-major product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strides {
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

impl Strides {
    /// Packed matrices: each row stride is its stored width.
    pub fn packed(m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Self {
        Strides { a: if ta { m } else { k }, b: if tb { k } else { n }, c: n }
    }
}

/// Row-major `c = op(a) · op(b)` (`c` is `[m, n]`; `a` is `[m, k]`, or `[k, m]` when `ta`; `b` is
/// `[k, n]`, or `[n, k]` when `tb`), through cuBLASLt with f32 accumulation; `accumulate` adds to
/// `c` instead of overwriting it. f32 inputs use TF32 tensor cores (cuBLASLt's fast-TF32 compute
/// type), as PyTorch does with `allow_tf32`; bf16 and f16 inputs accumulate in f32.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Storage>(
    gpu: &Gpu,
    c: &mut impl Out<T>,
    a: &impl In<T>,
    b: &impl In<T>,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
) -> Result<()>
where
    cudarc::cublaslt::CudaBlasLT: Matmul<T>,
{
    matmul_strided(gpu, c, a, b, m, k, n, ta, tb, Strides::packed(m, k, n, ta, tb), accumulate)
}

/// As [`matmul`], with row strides: each matrix may be a column block of a wider buffer (LLaMA's
/// q, k and v projections write into one fused buffer).
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided<T: Storage>(
    gpu: &Gpu,
    c: &mut impl Out<T>,
    a: &impl In<T>,
    b: &impl In<T>,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    ld: Strides,
    accumulate: bool,
) -> Result<()>
where
    cudarc::cublaslt::CudaBlasLT: Matmul<T>,
{
    let mut c = c.view_mut();
    let a = a.view();
    let b = b.view();
    let stored = |rows: usize, cols: usize, stride: usize| if rows == 0 { 0 } else { (rows - 1) * stride + cols };
    let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
    if ld.a < a_cols || ld.b < b_cols || ld.c < n {
        return Err(Error::Shape(format!("matmul: row strides {ld:?} narrower than the matrices")));
    }
    check_len("matmul a", a.len(), stored(a_rows, a_cols, ld.a))?;
    check_len("matmul b", b.len(), stored(b_rows, b_cols, ld.b))?;
    check_len("matmul c", c.len(), stored(m, n, ld.c))?;
    let blas = gpu.blas()?;
    // cuBLASLt is column-major: a row-major [r, c] matrix is a column-major [c, r] one, so the
    // row-major product C = A·B is computed as the column-major Cᵀ = Bᵀ·Aᵀ.
    let cfg = MatmulConfig {
        transa: tb,
        transb: ta,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: ld.b as i64,
        ldb: ld.a as i64,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: ld.c as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: the three buffers hold the sizes checked above for these dimensions.
    unsafe { blas.matmul(cfg, &b, &a, &mut c, None, None) }.map_err(|e| Error::cuda("cuBLASLt matmul", format!("{e:?}")))
}
