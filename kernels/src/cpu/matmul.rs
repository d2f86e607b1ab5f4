//! Matrix products through the `gemm` crate, on strided views, so that transposed operands (the
//! Hugging Face `[out, in]` weight layout in the backward pass, say) are read in place instead
//! of being copied.

/// A read-only strided matrix view: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `[rows, cols]` matrix stored contiguously.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit row and column strides (in elements).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let m = MatRef { data, rows, cols, rs, cs };
        assert!(m.fits(data.len()), "matrix view {rows}x{cols} (rs {rs}, cs {cs}) exceeds its {} elements", data.len());
        m
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn fits(&self, len: usize) -> bool {
        fits(self.rows, self.cols, self.rs, self.cs, len)
    }
}

/// Whether a `rows`×`cols` view with strides `rs`, `cs` stays inside `len` elements. Checked
/// arithmetic: a stride product that wrapped around would pass a plain comparison and send the
/// unsafe product outside the slice; strides also go to gemm as `isize`.
fn fits(rows: usize, cols: usize, rs: usize, cs: usize, len: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(rs).and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)));
    last.is_some_and(|l| l < len) && rs <= isize::MAX as usize && cs <= isize::MAX as usize
}

/// A mutable strided matrix view.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatMut<'a> {
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit strides. Row stride larger than `cols` selects a column block of a
    /// wider buffer (how LLaMA's q, k and v projections write into one fused qkv buffer).
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(fits(rows, cols, rs, cs, data.len()), "matrix view {rows}x{cols} (rs {rs}, cs {cs}) exceeds its {} elements", data.len());
        // Overlapping destination elements would make the product ill-defined.
        let row_major = cs == 1 && (rs >= cols || rows <= 1);
        let col_major = rs == 1 && (cs >= rows || cols <= 1);
        assert!(row_major || col_major, "destination view must not overlap itself");
        MatMut { data, rows, cols, rs, cs }
    }
}

/// How a product treats its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// `dst = a · b`
    Overwrite,
    /// `dst += a · b`
    Add,
}

/// How many threads a product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Run on the calling thread (inside an outer parallel loop: never nest parallel GEMMs).
    Single,
    /// Use the current rayon pool.
    Pool,
}

/// `dst (+)= a · b`.
///
/// Panics if the shapes disagree: shapes are fixed when a model is built, so a mismatch is a bug.
pub fn matmul(dst: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, acc: Accumulate, threads: Threads) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul inner dimensions: a is {}x{}, b is {}x{}", a.rows, a.cols, b.rows, b.cols);
    assert_eq!((dst.rows, dst.cols), (m, n), "matmul destination shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if acc == Accumulate::Overwrite {
            for r in 0..m {
                for c in 0..n {
                    dst.data[r * dst.rs + c * dst.cs] = 0.0;
                }
            }
        }
        return;
    }
    let parallelism = match threads {
        Threads::Single => gemm::Parallelism::None,
        Threads::Pool => match rayon::current_num_threads() {
            1 => gemm::Parallelism::None,
            n => gemm::Parallelism::Rayon(n),
        },
    };
    // SAFETY: the three views were bounds-checked on construction (every element (r, c) with
    // r < rows and c < cols lies inside its slice), the shapes were checked above, `dst` is a
    // unique borrow so it cannot alias `a` or `b`, and strides fit in isize because they index
    // into slices that exist.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            acc == Accumulate::Add,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;

    /// 2 × 2^63 wraps to 0 in unchecked arithmetic: the view must still be refused, or gemm
    /// would read and write at `i64::MIN` elements from the slice.
    #[test]
    #[should_panic(expected = "exceeds")]
    fn a_view_whose_stride_product_overflows_is_refused() {
        MatRef::strided(&[0.0; 4], 3, 1, 1 << 63, 1);
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn a_destination_whose_stride_product_overflows_is_refused() {
        MatMut::strided(&mut [0.0; 4], 3, 1, 1 << 63, 1);
    }

    fn fill(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn all_transpose_combinations_match_the_oracle() {
        let (m, k, n) = (37, 29, 41);
        for ta in [false, true] {
            for tb in [false, true] {
                for acc in [Accumulate::Overwrite, Accumulate::Add] {
                    let a = fill(m * k, 1);
                    let b = fill(k * n, 2);
                    let av = if ta { MatRef::new(&a, k, m).t() } else { MatRef::new(&a, m, k) };
                    let bv = if tb { MatRef::new(&b, n, k).t() } else { MatRef::new(&b, k, n) };
                    let mut got = fill(m * n, 3);
                    let mut want = got.clone();
                    reference::matmul(&mut want, &a, &b, m, k, n, ta, tb, acc == Accumulate::Add);
                    matmul(MatMut::new(&mut got, m, n), av, bv, acc, Threads::Pool);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "ta={ta} tb={tb} {acc:?}: {g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn writes_a_column_block_of_a_wider_buffer() {
        let (m, k, n, wide) = (5, 4, 3, 10);
        let a = fill(m * k, 4);
        let b = fill(k * n, 5);
        let mut buf = vec![7.0f32; m * wide];
        matmul(
            MatMut::strided(&mut buf[2..], m, n, wide, 1),
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            Accumulate::Overwrite,
            Threads::Single,
        );
        let mut want = vec![0.0; m * n];
        reference::matmul(&mut want, &a, &b, m, k, n, false, false, false);
        for r in 0..m {
            for c in 0..wide {
                let g = buf[r * wide + c];
                if (2..2 + n).contains(&c) {
                    assert!((g - want[r * n + c - 2]).abs() < 1e-5);
                } else {
                    assert_eq!(g, 7.0, "element outside the block was touched");
                }
            }
        }
    }
}
