//! LayerNorm and RMSNorm launchers, and the column sums of bias and norm-weight gradients (per
//! row-group partials added in a fixed order).

use super::*;

/// `out = (x - mean) * rstd * w + b` over rows of `w.len()`, saving `mean` and `rstd` per row.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<T: Storage>(
    gpu: &Gpu,
    out: &mut impl Out<T>,
    mean: &mut impl Out<f32>,
    rstd: &mut impl Out<f32>,
    x: &impl In<T>,
    w: &impl In<f32>,
    bias: &impl In<f32>,
    eps: f32,
) -> Result<()> {
    let mut out = out.view_mut();
    let mut mean = mean.view_mut();
    let mut rstd = rstd.view_mut();
    let x = x.view();
    let w = w.view();
    let bias = bias.view();
    let c = w.len();
    let rows = x.len() / c;
    check_len("layernorm out", out.len(), rows * c)?;
    check_len("layernorm mean", mean.len(), rows)?;
    check_len("layernorm rstd", rstd.len(), rows)?;
    check_len("layernorm bias", bias.len(), c)?;
    let name = format!("layernorm_fwd_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let c32 = u32_of("layernorm width", c)?;
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (row_block(c), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&mut mean).arg(&mut rstd).arg(&x).arg(&w).arg(&bias).arg(&c32).arg(&eps);
    // SAFETY: one block per row of c; buffer sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

/// Column sums of per-row-group partials into `out` (accumulating).
fn reduce_parts(gpu: &Gpu, out: &mut impl Out<f32>, parts: &impl In<f32>, nparts: usize, c: usize) -> Result<()> {
    let mut out = out.view_mut();
    let parts = parts.view();
    let f = gpu.function("norm", "col_sum_parts_f32")?;
    let (np, c32) = (nparts as u32, c as u32);
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(THREADS as usize) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&parts).arg(&np).arg(&c32);
    // SAFETY: parts holds nparts*c, out c.
    launched("col_sum_parts_f32", unsafe { b.launch(cfg) }.map(|_| ()))
}

fn parts_grid(rows: usize, c: usize) -> (usize, LaunchConfig) {
    let nparts = rows.div_ceil(ROWS_PER_PART).max(1);
    (
        nparts,
        LaunchConfig { grid_dim: (c.div_ceil(THREADS as usize) as u32, nparts as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 },
    )
}

/// Accumulates `dx += ∂L/∂x`, `dw += ∂L/∂w`, `db += ∂L/∂b`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Storage>(
    gpu: &Gpu,
    dx: &mut impl Out<T>,
    dw: &mut impl Out<f32>,
    db: &mut impl Out<f32>,
    dout: &impl In<T>,
    x: &impl In<T>,
    mean: &impl In<f32>,
    rstd: &impl In<f32>,
    w: &impl In<f32>,
) -> Result<()> {
    let mut dx = dx.view_mut();
    let mut dw = dw.view_mut();
    let mut db = db.view_mut();
    let dout = dout.view();
    let x = x.view();
    let mean = mean.view();
    let rstd = rstd.view();
    let w = w.view();
    let c = w.len();
    let rows = x.len() / c;
    for (what, len, want) in [
        ("layernorm dx", dx.len(), rows * c),
        ("layernorm dout", dout.len(), rows * c),
        ("layernorm dw", dw.len(), c),
        ("layernorm db", db.len(), c),
        ("layernorm mean", mean.len(), rows),
        ("layernorm rstd", rstd.len(), rows),
    ] {
        check_len(what, len, want)?;
    }
    let c32 = u32_of("layernorm width", c)?;
    let name = format!("layernorm_bwd_dx_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (row_block(c), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut dx).arg(&dout).arg(&x).arg(&mean).arg(&rstd).arg(&w).arg(&c32);
    // SAFETY: one block per row; sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;

    let (nparts, cfg) = parts_grid(rows, c);
    let stream = gpu.stream();
    let mut part_dw = stream.alloc_zeros::<f32>(nparts * c).map_err(|e| Error::cuda("allocating partials", e))?;
    let mut part_db = stream.alloc_zeros::<f32>(nparts * c).map_err(|e| Error::cuda("allocating partials", e))?;
    let name = format!("layernorm_bwd_dwdb_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let (rows32, rpp) = (rows as u32, ROWS_PER_PART as u32);
    let mut b = stream.launch_builder(&f);
    b.arg(&mut part_dw).arg(&mut part_db).arg(&dout).arg(&x).arg(&mean).arg(&rstd).arg(&rows32).arg(&c32).arg(&rpp);
    // SAFETY: nparts*c partials; rows*c inputs.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;
    reduce_parts(gpu, &mut dw, &part_dw, nparts, c)?;
    reduce_parts(gpu, &mut db, &part_db, nparts, c)
}

/// `out = x * rstd * w`, saving `rstd` per row.
pub fn rmsnorm_forward<T: Storage>(
    gpu: &Gpu,
    out: &mut impl Out<T>,
    rstd: &mut impl Out<f32>,
    x: &impl In<T>,
    w: &impl In<f32>,
    eps: f32,
) -> Result<()> {
    let mut out = out.view_mut();
    let mut rstd = rstd.view_mut();
    let x = x.view();
    let w = w.view();
    let c = w.len();
    let rows = x.len() / c;
    check_len("rmsnorm out", out.len(), rows * c)?;
    check_len("rmsnorm rstd", rstd.len(), rows)?;
    let name = format!("rmsnorm_fwd_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let c32 = u32_of("rmsnorm width", c)?;
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (row_block(c), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&mut rstd).arg(&x).arg(&w).arg(&c32).arg(&eps);
    // SAFETY: one block per row of c; sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

/// Accumulates `dx += ∂L/∂x` and `dw += ∂L/∂w`.
pub fn rmsnorm_backward<T: Storage>(
    gpu: &Gpu,
    dx: &mut impl Out<T>,
    dw: &mut impl Out<f32>,
    dout: &impl In<T>,
    x: &impl In<T>,
    rstd: &impl In<f32>,
    w: &impl In<f32>,
) -> Result<()> {
    let mut dx = dx.view_mut();
    let mut dw = dw.view_mut();
    let dout = dout.view();
    let x = x.view();
    let rstd = rstd.view();
    let w = w.view();
    let c = w.len();
    let rows = x.len() / c;
    for (what, len, want) in [
        ("rmsnorm dx", dx.len(), rows * c),
        ("rmsnorm dout", dout.len(), rows * c),
        ("rmsnorm dw", dw.len(), c),
        ("rmsnorm rstd", rstd.len(), rows),
    ] {
        check_len(what, len, want)?;
    }
    let c32 = u32_of("rmsnorm width", c)?;
    let name = format!("rmsnorm_bwd_dx_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (row_block(c), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut dx).arg(&dout).arg(&x).arg(&rstd).arg(&w).arg(&c32);
    // SAFETY: one block per row; sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;

    let (nparts, cfg) = parts_grid(rows, c);
    let mut part_dw = gpu.stream().alloc_zeros::<f32>(nparts * c).map_err(|e| Error::cuda("allocating partials", e))?;
    let name = format!("rmsnorm_bwd_dw_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let (rows32, rpp) = (rows as u32, ROWS_PER_PART as u32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut part_dw).arg(&dout).arg(&x).arg(&rstd).arg(&rows32).arg(&c32).arg(&rpp);
    // SAFETY: nparts*c partials; rows*c inputs.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;
    reduce_parts(gpu, &mut dw, &part_dw, nparts, c)
}

/// Accumulates the column sums of the `[rows, c]` matrix at the start of each `row_stride`-wide
/// row of `x` into `out` (a bias gradient).
pub fn add_col_sums<T: Storage>(
    gpu: &Gpu,
    out: &mut impl Out<f32>,
    x: &impl In<T>,
    rows: usize,
    c: usize,
    row_stride: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let x = x.view();
    check_len("col sums out", out.len(), c)?;
    if rows > 0 {
        check_len("col sums input", x.len(), (rows - 1) * row_stride + c)?;
    }
    let (nparts, cfg) = parts_grid(rows, c);
    let mut parts = gpu.stream().alloc_zeros::<f32>(nparts * c).map_err(|e| Error::cuda("allocating partials", e))?;
    let name = format!("col_sums_partial_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let (rows32, c32, stride32, rpp) =
        (u32_of("rows", rows)?, u32_of("columns", c)?, u32_of("row stride", row_stride)?, ROWS_PER_PART as u32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut parts).arg(&x).arg(&rows32).arg(&c32).arg(&stride32).arg(&rpp);
    // SAFETY: reads rows strided rows of c; writes nparts*c partials.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;
    reduce_parts(gpu, &mut out, &parts, nparts, c)
}
