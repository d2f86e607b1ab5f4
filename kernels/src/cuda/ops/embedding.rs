//! Rotary position embedding and token/position embedding launchers.

use super::*;

/// A rotary table on the device, uploaded from the CPU table so both paths rotate by the same
/// angles.
pub struct GpuRopeTable {
    pub half: usize,
    pub positions: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

impl GpuRopeTable {
    pub fn upload(gpu: &Gpu, table: &RopeTable) -> Result<Self> {
        let s = gpu.stream();
        Ok(GpuRopeTable {
            half: table.half,
            positions: table.positions(),
            cos: s.clone_htod(table.cos()).map_err(|e| Error::cuda("uploading the rope table", e))?,
            sin: s.clone_htod(table.sin()).map_err(|e| Error::cuda("uploading the rope table", e))?,
        })
    }
}

/// Rotates heads `0..heads` at the start of every `row_stride`-wide row of `x` (row r at
/// position r % seq); `inverse` is the backward pass.
#[allow(clippy::too_many_arguments)]
pub fn rope_apply<T: Storage>(
    gpu: &Gpu,
    x: &mut impl Out<T>,
    row_stride: usize,
    heads: usize,
    seq: usize,
    pos0: usize,
    table: &GpuRopeTable,
    inverse: bool,
) -> Result<()> {
    let mut x = x.view_mut();
    if heads * 2 * table.half > row_stride || pos0 + seq > table.positions {
        return Err(Error::Shape(format!(
            "rope: {heads} heads of {} at positions {pos0}..{} exceed a row of {row_stride} or the table's {} positions",
            2 * table.half,
            pos0 + seq,
            table.positions
        )));
    }
    let rows = x.len() / row_stride;
    let name = format!("rope_{}", T::SUFFIX);
    let f = gpu.function("rope", &name)?;
    let (rows32, stride32, heads32, seq32, half32, inv) =
        (u32_of("rows", rows)?, row_stride as u32, heads as u32, seq as u32, table.half as u32, inverse as i32);
    let pos32 = u32_of("pos0", pos0)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut x).arg(&table.cos).arg(&table.sin).arg(&rows32).arg(&stride32).arg(&heads32).arg(&seq32).arg(&pos32).arg(&half32).arg(&inv);
    // SAFETY: touches rows*heads*2*half elements inside rows of row_stride; table covers seq.
    launched(&name, unsafe { b.launch(elementwise(rows * heads * table.half)) }.map(|_| ()))
}

/// `out[r] = wte[tokens[r]] (+ wpe[r % seq])`, rows of width `c`.
pub fn embedding_forward<T: Storage>(
    gpu: &Gpu,
    out: &mut impl Out<T>,
    tokens: &impl In<u32>,
    wte: &impl In<f32>,
    wpe: Option<&CudaView<'_, f32>>,
    seq: usize,
    c: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let tokens = tokens.view();
    let wte = wte.view();
    let rows = tokens.len();
    check_len("embedding out", out.len(), rows * c)?;
    if let Some(wpe) = wpe {
        check_len("position table", wpe.len(), seq * c)?;
    }
    let name = format!("embedding_fwd_{}", T::SUFFIX);
    let f = gpu.function("embedding", &name)?;
    let (rows32, seq32, c32) = (u32_of("rows", rows)?, seq as u32, u32_of("width", c)?);
    let null: u64 = 0;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&tokens).arg(&wte);
    match wpe {
        Some(p) => b.arg(p),
        // A null `const float*`: the kernel then adds no positions.
        None => b.arg(&null),
    };
    b.arg(&rows32).arg(&seq32).arg(&c32);
    // SAFETY: rows*c outputs; tokens index rows of wte (the caller's tokens are < vocab, as on
    // CPU, where an out-of-range token panics on the slice index).
    launched(&name, unsafe { b.launch(elementwise(rows * c)) }.map(|_| ()))
}

/// Rows of a slice of the token table: `out[r] = table[tokens[r] - first]` for the rows whose
/// token lies in `first..first + table.len() / c`; the others are left as they are.
pub fn embedding_rows<T: Storage>(
    gpu: &Gpu,
    out: &mut impl Out<T>,
    tokens: &impl In<u32>,
    table: &impl In<f32>,
    first: usize,
    c: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let tokens = tokens.view();
    let table = table.view();
    let rows = tokens.len();
    check_len("embedding out", out.len(), rows * c)?;
    if c == 0 || !table.len().is_multiple_of(c) {
        return Err(Error::Shape(format!("a table slice of {} elements is not whole rows of {c}", table.len())));
    }
    let name = format!("embedding_rows_{}", T::SUFFIX);
    let f = gpu.function("embedding", &name)?;
    let (first32, table_rows32, rows32, c32) =
        (u32_of("first row", first)?, u32_of("table rows", table.len() / c)?, u32_of("rows", rows)?, u32_of("width", c)?);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&tokens).arg(&table).arg(&first32).arg(&table_rows32).arg(&rows32).arg(&c32);
    // SAFETY: rows*c outputs checked above; table rows read only for tokens inside the slice.
    launched(&name, unsafe { b.launch(elementwise(rows * c)) }.map(|_| ()))
}

/// `out[r] += wpe[r % seq]`, rows of width `c`.
pub fn add_positions<T: Storage>(gpu: &Gpu, out: &mut impl Out<T>, wpe: &impl In<f32>, seq: usize, c: usize) -> Result<()> {
    let mut out = out.view_mut();
    let wpe = wpe.view();
    if c == 0 || !out.len().is_multiple_of(c) {
        return Err(Error::Shape(format!("{} activations are not whole rows of {c}", out.len())));
    }
    let rows = out.len() / c;
    check_len("position table", wpe.len(), seq.min(rows) * c)?;
    let name = format!("add_positions_{}", T::SUFFIX);
    let f = gpu.function("embedding", &name)?;
    let (rows32, seq32, c32) = (u32_of("rows", rows)?, u32_of("sequence", seq)?, u32_of("width", c)?);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&wpe).arg(&rows32).arg(&seq32).arg(&c32);
    // SAFETY: rows*c elements of out; wpe rows below min(seq, rows), checked above.
    launched(&name, unsafe { b.launch(elementwise(rows * c)) }.map(|_| ()))
}

/// `dwte[tokens[r] - first] += dout[r]` for the tokens among `dwte`'s rows (vocabulary rows
/// `first..`; the others belong to another rank's slice of the table) and `dwpe[r % seq] +=
/// dout[r]`. `tokens` are the host copy: the rows are bucketed by token here (a counting sort) so
/// the device sums each vocabulary row in row order, with no atomics.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward<T: Storage>(
    gpu: &Gpu,
    dwte: &mut impl Out<f32>,
    dwpe: Option<&mut CudaViewMut<'_, f32>>,
    dout: &impl In<T>,
    tokens: &[u32],
    first: usize,
    seq: usize,
    c: usize,
) -> Result<()> {
    let mut dwte = dwte.view_mut();
    let dout = dout.view();
    let vocab = dwte.len() / c;
    let rows = tokens.len();
    check_len("embedding dout", dout.len(), rows * c)?;
    if first == 0 {
        // The whole table: a token past its end is a bug upstream, not another rank's row.
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Shape(format!("token {bad} is outside the vocabulary of {vocab}")));
        }
    }
    let (starts, order) = crate::cpu::embedding::bucket_by_token(tokens, first, vocab);
    let to_u32 = |v: Vec<usize>| -> Result<Vec<u32>> { v.into_iter().map(|x| u32_of("embedding rows", x)).collect() };
    let (starts, order) = (to_u32(starts)?, to_u32(order)?);
    let s = gpu.stream();
    let order_d = s.clone_htod(&order).map_err(|e| Error::cuda("uploading token order", e))?;
    let starts_d = s.clone_htod(&starts).map_err(|e| Error::cuda("uploading token order", e))?;
    let name = format!("embedding_bwd_wte_{}", T::SUFFIX);
    let f = gpu.function("embedding", &name)?;
    let c32 = u32_of("width", c)?;
    let cfg = LaunchConfig {
        grid_dim: (u32_of("vocab", vocab)?, c.div_ceil(THREADS as usize) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = s.launch_builder(&f);
    b.arg(&mut dwte).arg(&dout).arg(&order_d).arg(&starts_d).arg(&c32);
    // SAFETY: one thread per (vocab row, column); order/starts built above from valid tokens.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;
    if let Some(dwpe) = dwpe {
        check_len("position gradient", dwpe.len(), seq * c)?;
        let name = format!("embedding_bwd_wpe_{}", T::SUFFIX);
        let f = gpu.function("embedding", &name)?;
        let (rows32, seq32) = (u32_of("rows", rows)?, seq as u32);
        let mut b = s.launch_builder(&f);
        b.arg(dwpe).arg(&dout).arg(&rows32).arg(&seq32).arg(&c32);
        // SAFETY: seq*c outputs; rows*c elements of dout, checked above.
        launched(&name, unsafe { b.launch(elementwise(seq * c)) }.map(|_| ()))?;
    }
    Ok(())
}
