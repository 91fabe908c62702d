//! Twin of `shaders/perturbation.wgsl`: per-sample norms, sign / L2 steps, projections,
//! per-sample clamps and the counter-based RNG.
//!
//! Bindings (0 = params):
//! - `norm_sample` (OP = 0 L1, 1 L2, 2 Linf; one workgroup per sample): 1 x, 2 x0 (read; x
//!   again when `diff` = 0), 3 norms `[N]` (write); params `{samples, per, diff}`.
//! - `sign_step`: 1 x, 2 g (read), 3 y (write); params `{n, per, alpha, mode}`.
//! - `normed_step`: 1 x, 2 g or x0, 3 norms (read), 4 y (write); same params, `mode` 0 L2 step,
//!   1 L2 projection, 2 Linf projection, `alpha` = eps for projections.
//! - `clamp_sample`: 1 x, 2 bounds `[lo.., hi..]` (read), 3 y (write); params `{n, per, samples}`.
//! - `random_uniform` / `random_normal`: 1 y (write); params `{n, seed_lo, seed_hi, _, lo, hi,
//!   std}`.

use super::context::{Access, Buf, Ctx, Kernel, Params};
use super::elementwise::groups;
use crate::runtime::backend::Norm;

const SRC: &str = include_str!("../../../../shaders/perturbation.wgsl");

const NORM: Kernel = Kernel {
    family: "perturbation",
    source: SRC,
    entry: "norm_sample",
    storage: &[Access::Read, Access::Read, Access::ReadWrite],
};
const SIGN_STEP: Kernel = Kernel {
    family: "perturbation",
    source: SRC,
    entry: "sign_step",
    storage: &[Access::Read, Access::Read, Access::ReadWrite],
};
const NORMED_STEP: Kernel = Kernel {
    family: "perturbation",
    source: SRC,
    entry: "normed_step",
    storage: &[Access::Read, Access::Read, Access::Read, Access::ReadWrite],
};
const CLAMP: Kernel = Kernel {
    family: "perturbation",
    source: SRC,
    entry: "clamp_sample",
    storage: &[Access::Read, Access::Read, Access::ReadWrite],
};
const UNIFORM: Kernel = Kernel {
    family: "perturbation",
    source: SRC,
    entry: "random_uniform",
    storage: &[Access::ReadWrite],
};
const NORMAL: Kernel = Kernel {
    family: "perturbation",
    source: SRC,
    entry: "random_normal",
    storage: &[Access::ReadWrite],
};

/// (samples, elements per sample): samples are the first axis.
pub(crate) fn per_sample(shape: &[usize]) -> (usize, usize) {
    let n = shape.first().copied().unwrap_or(1);
    let total: usize = shape.iter().product();
    (n, total.checked_div(n).unwrap_or(0))
}

fn norm_code(norm: Norm) -> f64 {
    match norm {
        Norm::L1 => 0.0,
        Norm::L2 => 1.0,
        Norm::Linf => 2.0,
    }
}

/// Per-sample norm of x (or of x - x0 when `x0` is given).
pub(crate) fn norms(ctx: &Ctx, x: &Buf, x0: Option<&Buf>, shape: &[usize], norm: Norm) -> Buf {
    let (n, per) = per_sample(shape);
    let out = ctx.alloc(n);
    if per == 0 {
        ctx.clear(&out);
        return out;
    }
    let params = Params::new().u(n).u(per).raw(u32::from(x0.is_some()));
    let spec = [("OP", norm_code(norm))];
    ctx.dispatch(&NORM, &spec, params, &[x, x0.unwrap_or(x), &out], n as u64);
    out
}

pub(crate) fn sign_step(ctx: &Ctx, x: &Buf, g: &Buf, len: usize, alpha: f32) -> Buf {
    let y = ctx.alloc(len);
    let params = Params::new().u(len).u(1).f(alpha).raw(0);
    ctx.dispatch(&SIGN_STEP, &[], params, &[x, g, &y], groups(len));
    y
}

fn normed_step(
    ctx: &Ctx,
    x: &Buf,
    other: &Buf,
    nrm: &Buf,
    shape: &[usize],
    a: f32,
    mode: u32,
) -> Buf {
    let (_, per) = per_sample(shape);
    let len: usize = shape.iter().product();
    let y = ctx.alloc(len);
    let params = Params::new().u(len).u(per.max(1)).f(a).raw(mode);
    ctx.dispatch(&NORMED_STEP, &[], params, &[x, other, nrm, &y], groups(len));
    y
}

pub(crate) fn l2_step(ctx: &Ctx, x: &Buf, g: &Buf, shape: &[usize], alpha: f32) -> Buf {
    let nrm = norms(ctx, g, None, shape, Norm::L2);
    normed_step(ctx, x, g, &nrm, shape, alpha, 0)
}

pub(crate) fn project(ctx: &Ctx, x: &Buf, x0: &Buf, shape: &[usize], eps: f32, norm: Norm) -> Buf {
    match norm {
        Norm::L2 => {
            let nrm = norms(ctx, x, Some(x0), shape, Norm::L2);
            normed_step(ctx, x, x0, &nrm, shape, eps, 1)
        }
        // The norms binding is unused in Linf mode; x stands in for it.
        Norm::Linf => normed_step(ctx, x, x0, x, shape, eps, 2),
        Norm::L1 => panic!("L1 projection is not supported"),
    }
}

pub(crate) fn clamp_per_sample(ctx: &Ctx, x: &Buf, shape: &[usize], lo: &[f32], hi: &[f32]) -> Buf {
    let (n, per) = per_sample(shape);
    assert!(
        lo.len() == n && hi.len() == n,
        "clamp_per_sample needs one bound per sample"
    );
    let len: usize = shape.iter().product();
    let y = ctx.alloc(len);
    if len == 0 {
        return y;
    }
    let bounds: Vec<u32> = lo.iter().chain(hi).map(|v| v.to_bits()).collect();
    let b = ctx.upload_words(&bounds);
    let params = Params::new().u(len).u(per).u(n);
    ctx.dispatch(&CLAMP, &[], params, &[x, &b, &y], groups(len));
    y
}

fn rand_params(len: usize, seed: u64, lo: f32, hi: f32, std: f32) -> Params {
    assert!(
        u32::try_from(len).is_ok(),
        "random tensor exceeds the 2^32-element counter"
    );
    Params::new()
        .u(len)
        .raw(seed as u32)
        .raw((seed >> 32) as u32)
        .raw(0)
        .f(lo)
        .f(hi)
        .f(std)
}

pub(crate) fn random_uniform(ctx: &Ctx, len: usize, seed: u64, lo: f32, hi: f32) -> Buf {
    let y = ctx.alloc(len);
    ctx.dispatch(
        &UNIFORM,
        &[],
        rand_params(len, seed, lo, hi, 0.0),
        &[&y],
        groups(len),
    );
    y
}

pub(crate) fn random_normal(ctx: &Ctx, len: usize, seed: u64, std: f32) -> Buf {
    let y = ctx.alloc(len);
    ctx.dispatch(
        &NORMAL,
        &[],
        rand_params(len, seed, 0.0, 0.0, std),
        &[&y],
        groups(len),
    );
    y
}
