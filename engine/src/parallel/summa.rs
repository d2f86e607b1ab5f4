//! The 2D tensor-parallel layer (`parallel.tp_mode = "2d"`, the `Linear2D` of ColossalAI's
//! Optimus paper): `tp = q²` ranks on a q × q grid, rank `(i, j)` at position `i·q + j` of the tp
//! group. A layer `Y = X·W` (`X: [m, k]`, `W: [k, n]`) keeps on rank `(i, j)` the blocks
//! `X_ij = X[rows i, cols j]`, `W_ij = W[rows i, cols j]` and `Y_ij`, each `1/q²` of the whole,
//! and computes them SUMMA-style: for `t` in `0..q`, `X_it` is broadcast along grid row `i`,
//! `W_tj` along grid column `j`, and every rank adds `X_it·W_tj` into `Y_ij`. Backward runs the
//! same broadcasts and sums the partial products back onto their owners:
//! `dX_it = Σ_j dY_ij·W_tjᵀ` (along the row), `dW_tj = Σ_i X_itᵀ·dY_ij` (along the column).
//!
//! What it buys: a rank sends `O((m·k + k·n) / q)` floats per layer and direction instead of 1D's
//! all-reduce of the whole `[m, n]` output, which does not shrink with the group
//! (`docs/parallel.md` has the numbers). The grid layer is built and tested here
//! (`a_grid_layer_is_the_whole_layer`); the models do not run on it yet (the norms, attention
//! and the head would need their 2D forms), so `tp_mode = "2d"` is refused at submission.

use std::sync::Arc;

use gantry_kernels::cpu::matmul::{matmul, Accumulate, MatMut, MatRef, Threads};

use crate::comm::{AsyncComm, Group, ReduceOp};
use crate::{Error, Result};

/// The side q of a grid of `n` = q² ranks (q ≥ 2); an error naming `parallel.tp` otherwise.
pub fn grid_side(n: usize) -> Result<usize> {
    let q = (n as f64).sqrt().round() as usize;
    if q < 2 || q * q != n {
        return Err(Error::Unsupported {
            field: "parallel.tp".into(),
            message: format!("the 2d layout puts tp ranks on a q × q grid: {n} ranks are not a square of 2 or more"),
        });
    }
    Ok(q)
}

/// A rank's place on the q × q grid of a tp group, with its row and column groups.
pub struct Grid2D {
    comm: Arc<AsyncComm>,
    pub q: usize,
    pub i: usize,
    pub j: usize,
    /// The ranks `(i, 0..q)` and `(0..q, j)`; position `t` in either is grid index `t`.
    row: Group,
    col: Group,
}

/// A block of a row-major matrix: `rows × cols` floats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub rows: usize,
    pub cols: usize,
}

impl Block {
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

impl Grid2D {
    /// The grid of `tp` (a group of q² ranks, row-major); an error naming `parallel.tp` unless
    /// its size is a square.
    pub fn new(comm: Arc<AsyncComm>, tp: &Group) -> Result<Grid2D> {
        let q = grid_side(tp.size())?;
        let (i, j) = (tp.me / q, tp.me % q);
        let row = Group { ranks: (0..q).map(|t| tp.ranks[i * q + t]).collect(), me: j };
        let col = Group { ranks: (0..q).map(|t| tp.ranks[t * q + j]).collect(), me: i };
        Ok(Grid2D { comm, q, i, j, row, col })
    }

    /// `data` from the member at position `root` of `g`, to every member.
    fn broadcast(&self, g: &Group, data: Vec<f32>, root: usize) -> Result<Vec<f32>> {
        let g = g.clone();
        self.comm.run(move |c| {
            let mut data = data;
            c.broadcast(&g, bytemuck::cast_slice_mut(&mut data), root)?;
            Ok(data)
        })
    }

    /// The sum of every member's `data` (every member gets it; the caller keeps it where it is
    /// the owner).
    fn sum(&self, g: &Group, data: Vec<f32>) -> Result<Vec<f32>> {
        let g = g.clone();
        self.comm.run(move |c| {
            let mut data = data;
            c.all_reduce(&g, &mut data, ReduceOp::Sum)?;
            Ok(data)
        })
    }

    fn check(&self, what: &str, data: &[f32], b: Block) -> Result<()> {
        if data.len() != b.len() {
            return Err(Error::Unsupported {
                field: "parallel.tp_mode".into(),
                message: format!("{what}: {} floats for a {}×{} block", data.len(), b.rows, b.cols),
            });
        }
        Ok(())
    }

    /// `Y_ij = Σ_t X_it·W_tj`: this rank's block of the output from its blocks of the input
    /// (`x`: `xb`, this rank's `[m/q, k/q]`) and the weight (`w`: `wb`, `[k/q, n/q]`).
    pub fn forward(&self, x: &[f32], xb: Block, w: &[f32], wb: Block) -> Result<Vec<f32>> {
        self.check("X", x, xb)?;
        self.check("W", w, wb)?;
        let mut y = vec![0.0f32; xb.rows * wb.cols];
        for t in 0..self.q {
            let a = self.broadcast(&self.row, if self.j == t { x.to_vec() } else { vec![0.0; xb.len()] }, t)?;
            let b = self.broadcast(&self.col, if self.i == t { w.to_vec() } else { vec![0.0; wb.len()] }, t)?;
            let (am, bm) = (MatRef::new(&a, xb.rows, xb.cols), MatRef::new(&b, wb.rows, wb.cols));
            matmul(MatMut::new(&mut y, xb.rows, wb.cols), am, bm, Accumulate::Add, Threads::Pool);
        }
        Ok(y)
    }

    /// The gradients of this rank's blocks of `X` and `W` from its block of `dY`
    /// (`[m/q, n/q]`).
    pub fn backward(&self, x: &[f32], xb: Block, w: &[f32], wb: Block, dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check("X", x, xb)?;
        self.check("W", w, wb)?;
        let yb = Block { rows: xb.rows, cols: wb.cols };
        self.check("dY", dy, yb)?;
        let (mut dx, mut dw) = (Vec::new(), Vec::new());
        let g = MatRef::new(dy, yb.rows, yb.cols);
        for t in 0..self.q {
            // dX_it = Σ_j dY_ij · W_tjᵀ: W_tj down the column, the partial products summed
            // along the row, kept by (i, t).
            let b = self.broadcast(&self.col, if self.i == t { w.to_vec() } else { vec![0.0; wb.len()] }, t)?;
            let mut p = vec![0.0f32; xb.len()];
            matmul(MatMut::new(&mut p, xb.rows, xb.cols), g, MatRef::new(&b, wb.rows, wb.cols).t(), Accumulate::Overwrite, Threads::Pool);
            let p = self.sum(&self.row, p)?;
            if self.j == t {
                dx = p;
            }
            // dW_tj = Σ_i X_itᵀ · dY_ij: X_it along the row, the partial products summed down
            // the column, kept by (t, j).
            let a = self.broadcast(&self.row, if self.j == t { x.to_vec() } else { vec![0.0; xb.len()] }, t)?;
            let mut p = vec![0.0f32; wb.len()];
            matmul(MatMut::new(&mut p, wb.rows, wb.cols), MatRef::new(&a, xb.rows, xb.cols).t(), g, Accumulate::Overwrite, Threads::Pool);
            let p = self.sum(&self.col, p)?;
            if self.i == t {
                dw = p;
            }
        }
        Ok((dx, dw))
    }

    /// Bytes this rank has sent so far.
    pub fn traffic(&self) -> Result<u64> {
        self.comm.run(|c| Ok(c.traffic().0))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::comm::Comm;

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed, 0);
        (0..n).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// Block `(bi, bj)` of a row-major `[rows, cols]` matrix cut into q × q blocks.
    fn block(m: &[f32], rows: usize, cols: usize, q: usize, bi: usize, bj: usize) -> Vec<f32> {
        let (br, bc) = (rows / q, cols / q);
        (0..br).flat_map(|r| m[(bi * br + r) * cols + bj * bc..][..bc].to_vec()).collect()
    }

    fn whole(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        let am = if ta { MatRef::new(a, k, m).t() } else { MatRef::new(a, m, k) };
        let bm = if tb { MatRef::new(b, n, k).t() } else { MatRef::new(b, k, n) };
        matmul(MatMut::new(&mut y, m, n), am, bm, Accumulate::Overwrite, Threads::Single);
        y
    }

    /// On a 2 × 2 grid of CPU ranks, every rank's blocks of `Y`, `dX` and `dW` are the whole
    /// layer's.
    #[test]
    fn a_grid_layer_is_the_whole_layer() {
        let (q, m, k, n) = (2usize, 8usize, 6usize, 10usize);
        let (x, w, dy) = (seeded(m * k, 1), seeded(k * n, 2), seeded(m * n, 3));
        let y = whole(&x, &w, m, k, n, false, false);
        let dx = whole(&dy, &w, m, n, k, false, true);
        let dw = whole(&x, &dy, k, m, n, true, false);
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let world = q * q;
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (addr, x, w, dy) = (addr.clone(), x.clone(), w.clone(), dy.clone());
                std::thread::spawn(move || {
                    let comm = Arc::new(AsyncComm::new(Comm::connect(rank, world, &addr, Duration::from_secs(60)).unwrap()).unwrap());
                    let grid = Grid2D::new(comm, &Group { ranks: (0..world).collect(), me: rank }).unwrap();
                    let (i, j) = (grid.i, grid.j);
                    let (xb, wb) = (Block { rows: m / q, cols: k / q }, Block { rows: k / q, cols: n / q });
                    let (xs, ws) = (block(&x, m, k, q, i, j), block(&w, k, n, q, i, j));
                    let y = grid.forward(&xs, xb, &ws, wb).unwrap();
                    let (dx, dw) = grid.backward(&xs, xb, &ws, wb, &block(&dy, m, n, q, i, j)).unwrap();
                    (i, j, y, dx, dw, grid.traffic().unwrap())
                })
            })
            .collect();
        for h in handles {
            let (i, j, got_y, got_dx, got_dw, sent) = h.join().unwrap();
            let close = |what: &str, got: &[f32], want: &[f32]| {
                let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(got.len() == want.len() && worst < 1e-5, "rank ({i}, {j}) {what}: off by {worst}");
            };
            close("Y", &got_y, &block(&y, m, n, q, i, j));
            close("dX", &got_dx, &block(&dx, m, k, q, i, j));
            close("dW", &got_dw, &block(&dw, k, n, q, i, j));
            // Per rank on a 2 × 2 grid: one X block and one W block broadcast forward and again
            // backward, and two sums of each block's size (each `(m·k + k·n) / 4` floats), so
            // `m·k + k·n` floats in all, plus the collectives' headers.
            let floats = (m * k + k * n) as u64;
            assert!((4 * floats..4 * floats + 2048).contains(&sent), "rank ({i}, {j}) sent {sent} bytes for {floats} floats");
        }
        assert_eq!((grid_side(4).unwrap(), grid_side(9).unwrap()), (2, 3));
        for n in [1, 2, 8] {
            assert!(grid_side(n).unwrap_err().to_string().contains("not a square"), "{n}");
        }
    }
}
