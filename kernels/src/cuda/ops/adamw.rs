//! The fused AdamW launchers.

use super::*;

/// Updates `p`, `m`, `v` in place from `g`.
pub fn adamw_update(
    gpu: &Gpu,
    p: &mut impl Out<f32>,
    g: &impl In<f32>,
    m: &mut impl Out<f32>,
    v: &mut impl Out<f32>,
    hp: &AdamWStep,
    decay: bool,
) -> Result<()> {
    let mut p = p.view_mut();
    let mut m = m.view_mut();
    let mut v = v.view_mut();
    let g = g.view();
    let n = p.len();
    for (what, len) in [("adamw grad", g.len()), ("adamw m", m.len()), ("adamw v", v.len())] {
        check_len(what, len, n)?;
    }
    let sc = hp.scalars(decay);
    let f = gpu.function("adamw", "adamw_f32")?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut p)
        .arg(&g)
        .arg(&mut m)
        .arg(&mut v)
        .arg(&n64)
        .arg(&hp.beta1)
        .arg(&hp.beta2)
        .arg(&hp.eps)
        .arg(&sc.shrink)
        .arg(&sc.step_size)
        .arg(&sc.bc2_sqrt);
    // SAFETY: n elements of four buffers holding at least n.
    launched("adamw_f32", unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// As [`adamw_update`], also writing the updated parameters into the 16-bit working copy.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update_copy<T: Storage>(
    gpu: &Gpu,
    p: &mut impl Out<f32>,
    p_copy: &mut impl Out<T>,
    g: &impl In<f32>,
    m: &mut impl Out<f32>,
    v: &mut impl Out<f32>,
    hp: &AdamWStep,
    decay: bool,
) -> Result<()> {
    let mut p = p.view_mut();
    let mut p_copy = p_copy.view_mut();
    let mut m = m.view_mut();
    let mut v = v.view_mut();
    let g = g.view();
    let n = p.len();
    for (what, len) in [("adamw copy", p_copy.len()), ("adamw grad", g.len()), ("adamw m", m.len()), ("adamw v", v.len())] {
        check_len(what, len, n)?;
    }
    if T::SUFFIX == "f32" {
        return Err(Error::Shape("adamw_update_copy keeps a 16-bit copy; use adamw_update for f32".into()));
    }
    let sc = hp.scalars(decay);
    let name = format!("adamw_copy_{}", T::SUFFIX);
    let f = gpu.function("adamw", &name)?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut p)
        .arg(&mut p_copy)
        .arg(&g)
        .arg(&mut m)
        .arg(&mut v)
        .arg(&n64)
        .arg(&hp.beta1)
        .arg(&hp.beta2)
        .arg(&hp.eps)
        .arg(&sc.shrink)
        .arg(&sc.step_size)
        .arg(&sc.bc2_sqrt);
    // SAFETY: n elements of five buffers holding at least n.
    launched(&name, unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}
