//! Purifier plugins (input transformations that try to remove adversarial perturbations),
//! written against the plugin SDK only:
//! - `bit-depth`: quantise to `bits` bits relative to the frame's window (feature squeezing,
//!   Xu 2018);
//! - `jpeg`: JPEG re-compression at a quality (Guo 2018);
//! - `tv`: total-variation denoising, Chambolle's projection algorithm (Guo 2018 uses TV
//!   minimisation);
//! - `lgs`: local gradient smoothing (Naseer 2019);
//! - `median-2x2`: the 2x2 median squeezer of feature squeezing;
//! - `random-noise`: random Gaussian noise injection, a randomised defense (attack it with EOT).
//!
//! `bit-depth`, `tv` and `lgs` run their own WGSL kernels (`shaders/purify.wgsl`) through
//! `run_shader` on the GPU backend; the CPU twin handed to the same call performs the same f32
//! operations in the same order, so both backends agree. `jpeg` is CPU work by nature: it
//! downloads, encodes/decodes and uploads on either backend.
//!
//! Every output is rounded to the stored integer grid (not for floating-point frames) and
//! clamped to the frame's stored range inside the kernels, so what the audit records
//! (`l2_change`, `linf_change` in stored units, like `median`) is exactly what is written.

pub mod bitdepth;
pub mod jpeg;
pub mod lgs;
pub mod median2;
pub mod noise;
pub mod tv;

#[cfg(test)]
mod tests;

use adverse_plugin_sdk::{Batch, Error, FrameMeta, Norm, Result, Tensor, export_plugins};

pub use bitdepth::BitDepth;
pub use jpeg::Jpeg;
pub use lgs::Lgs;
pub use median2::Median2;
pub use noise::Noise;
pub use tv::Tv;

/// All kernels of this crate (one WGSL module, several entry points).
pub const WGSL: &str = include_str!("../../../shaders/purify.wgsl");

/// Writes the per-frame L2 and L∞ distance between `before` and `after` (stored units).
pub(crate) fn audit_change(batch: &Batch<'_>, before: Tensor, after: Tensor) -> Result<()> {
    let h = batch.host();
    let d = h.axpby(1.0, after, -1.0, before)?;
    let l2 = h.norm_per_sample(d, Norm::L2)?;
    let li = h.norm_per_sample(d, Norm::Linf)?;
    for (i, (a, b)) in l2.iter().zip(&li).enumerate() {
        batch.audit_number(i, "l2_change", f64::from(*a))?;
        batch.audit_number(i, "linf_change", f64::from(*b))?;
    }
    h.free(d)
}

/// The batch's input shape as `(N, C, H, W)`.
pub(crate) fn nchw(batch: &Batch<'_>, x: Tensor) -> Result<(usize, usize, usize, usize)> {
    match batch.host().shape(x)?[..] {
        [n, c, h, w] if n > 0 && c > 0 && h > 0 && w > 0 => Ok((n, c, h, w)),
        ref s => Err(Error::new(format!(
            "expected a non-empty [N, C, H, W] batch, got shape {s:?}"
        ))),
    }
}

/// Every frame's metadata, in batch order; one per input frame.
pub(crate) fn metas(batch: &Batch<'_>, n: usize) -> Result<Vec<FrameMeta>> {
    if batch.len() != n {
        return Err(Error::new(format!(
            "the batch describes {} frames but its tensor holds {n}",
            batch.len()
        )));
    }
    (0..n).map(|i| batch.meta(i)).collect()
}

/// The stored-value range a written frame must stay in.
pub fn stored_range(m: &FrameMeta) -> Result<(f64, f64)> {
    let (lo, hi) = m.value_range;
    if lo.is_finite() && hi.is_finite() && lo < hi {
        Ok((lo, hi))
    } else {
        Err(Error::new(format!(
            "frame {}: invalid stored value range [{lo}, {hi}]",
            m.frame_index
        )))
    }
}

/// The interval of stored values the display (and a windowing model) maps to black..white: the
/// first VOI window converted through the rescale (`stored = (v - intercept) / slope`), or the
/// stored range when the frame has no usable window. Bit depth, TV weight and LGS are relative
/// to it, so 12/16-bit data is treated the way 8-bit data is treated over its full range.
pub fn reference_span(m: &FrameMeta) -> Result<(f64, f64)> {
    if let Some((c, w)) = m.window {
        let s = m.rescale_slope;
        let b = m.rescale_intercept;
        if w > 0.0 && c.is_finite() && w.is_finite() && s != 0.0 && s.is_finite() && b.is_finite() {
            let a = (c - w / 2.0 - b) / s;
            let z = (c + w / 2.0 - b) / s;
            return Ok((a.min(z), a.max(z)));
        }
    }
    stored_range(m)
}

/// Whether written values must be integers (everything but floating-point pixel data).
pub(crate) fn rounds(m: &FrameMeta) -> f32 {
    if m.float { 0.0 } else { 1.0 }
}

/// The CPU twin of the kernels' `finish`: round half up (integer frames), clamp to the range.
pub(crate) fn finish(v: f32, lo: f32, hi: f32, round: f32) -> f32 {
    let r = if round > 0.5 { (v + 0.5).floor() } else { v };
    r.clamp(lo, hi)
}

/// Workgroups for a 1-D kernel of workgroup size 64 over `n` items (rows of at most 65535).
pub(crate) fn groups_1d(n: usize) -> Result<[u32; 3]> {
    grid(n.div_ceil(64).max(1))
}

/// Workgroups for `n` independent workgroups (planes or frames).
pub(crate) fn grid(n: usize) -> Result<[u32; 3]> {
    const MAX: usize = 65535;
    let x = n.clamp(1, MAX);
    let y = n.div_ceil(MAX).max(1);
    if y > MAX {
        return Err(Error::new(format!(
            "{n} workgroups exceed the dispatch limit"
        )));
    }
    Ok([x as u32, y as u32, 1])
}

/// Reads `params[i]` for the CPU twins, which must fail, not panic, on a short parameter array.
pub(crate) fn param(params: &[f32], i: usize) -> Result<f32> {
    params
        .get(i)
        .copied()
        .ok_or_else(|| Error::new(format!("kernel parameter {i} missing")))
}

/// Reads `params[i]` as a count or size (kernels carry integers as f32).
pub(crate) fn uparam(params: &[f32], i: usize) -> Result<usize> {
    Ok(param(params, i)? as usize)
}

/// Checks that a CPU twin got the buffer sizes its kernel assumes.
pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        Err(Error::new(format!(
            "{what}: buffer of {got} values, kernel needs {want}"
        )))
    } else {
        Ok(())
    }
}

/// Checks that a tensor of `n` values fits the f32 integer range the kernels index with.
pub(crate) fn check_indexable(n: usize) -> Result<()> {
    if n >= 1 << 24 {
        Err(Error::new(format!(
            "batch of {n} values is too large for the kernels (at most 2^24 per call)"
        )))
    } else {
        Ok(())
    }
}

export_plugins!(
    purifier: BitDepth,
    purifier: Jpeg,
    purifier: Tv,
    purifier: Lgs,
    purifier: Median2,
    purifier: Noise,
);
