//! Total-variation denoising (the TV-minimisation purifier of Guo et al. 2018, without their
//! random pixel dropping): `argmin_z ½‖z − x‖² + λ·TV(z)` per channel plane, solved with
//! Chambolle's projection algorithm (Chambolle 2004) exactly as scikit-image's
//! `denoise_tv_chambolle` runs it (τ = 1/4, isotropic TV, Neumann borders), for a fixed number
//! of iterations (no early stop: a data-dependent stop would need a global reduction per
//! iteration on the GPU and makes the result depend on the batch).
//!
//! λ (`weight`) is in stored units, or (default) relative to the frame's reference interval
//! (window or stored range), so `weight: 0.1` means what scikit-image's 0.1 means on an image
//! scaled to [0, 1] through the window.
//!
//! GPU: one workgroup per plane iterates in a single dispatch (the dual field lives in the
//! output buffer's tail, phases separated by storage barriers), then `take_prefix` keeps the
//! result: two kernel launches per batch whatever the iteration count.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{
    Batch, CpuInput, Error, Host, PluginInfo, Purifier, Result, Shader, Tensor,
};

use crate::{
    WGSL, audit_change, check_indexable, check_len, finish, grid, groups_1d, metas, nchw, param,
    reference_span, rounds, stored_range, uparam,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", crate = "adverse_plugin_sdk::serde")]
pub enum WeightUnits {
    /// A fraction of the reference interval (window width in stored units, else stored range).
    Relative,
    /// Stored units.
    Stored,
}

fn relative() -> WeightUnits {
    WeightUnits::Relative
}

fn hundred() -> u32 {
    100
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct TvParams {
    pub weight: f64,
    #[serde(default = "relative")]
    pub units: WeightUnits,
    #[serde(default = "hundred")]
    pub iterations: u32,
}

/// Chambolle TV denoising of every channel plane.
#[derive(Debug)]
pub struct Tv {
    weight: f64,
    units: WeightUnits,
    iterations: u32,
}

impl PluginInfo for Tv {
    const NAME: &'static str = "tv";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Total-variation denoising (Chambolle's projection algorithm, scikit-image's form), weight relative to the window or in stored units";
    type Params = TvParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"weight":{"type":"number","exclusiveMinimum":0,"description":"TV weight lambda: a fraction of the window (units: relative) or stored units"},"units":{"enum":["relative","stored"],"default":"relative"},"iterations":{"type":"integer","minimum":1,"maximum":2000,"default":100,"description":"Chambolle iterations"}},"required":["weight"],"additionalProperties":false}"#
    }
    fn create(p: TvParams, _host: &Host<'_>) -> Result<Self> {
        if !(p.weight.is_finite() && p.weight > 0.0) {
            return Err(Error::new(format!(
                "tv: weight must be a positive number, got {}",
                p.weight
            )));
        }
        if !(1..=2000).contains(&p.iterations) {
            return Err(Error::new(format!(
                "tv: iterations must be in 1..=2000, got {}",
                p.iterations
            )));
        }
        Ok(Tv {
            weight: p.weight,
            units: p.units,
            iterations: p.iterations,
        })
    }
}

impl Tv {
    /// λ in stored units for frame `m`.
    pub fn stored_weight(&self, m: &adverse_plugin_sdk::FrameMeta) -> Result<f64> {
        Ok(match self.units {
            WeightUnits::Stored => self.weight,
            WeightUnits::Relative => {
                let (a, z) = reference_span(m)?;
                self.weight * (z - a)
            }
        })
    }
}

/// The CPU twin of `tv_chambolle` (see shaders/purify.wgsl): the same phases, sequentially.
pub fn tv_cpu(ins: &[CpuInput<'_>], p: &[f32], out: &mut [f32]) -> Result<()> {
    let x = ins.first().ok_or("tv_chambolle: no input")?.data;
    let h = uparam(p, 0)?;
    let w = uparam(p, 1)?;
    let c = uparam(p, 2)?.max(1);
    let np = uparam(p, 3)?;
    let iters = uparam(p, 4)?;
    let hw = h * w;
    let total = np * hw;
    check_len("tv params", p.len(), 5 + np.div_ceil(c) * 4)?;
    check_len("tv input", x.len(), total)?;
    check_len("tv output", out.len(), 3 * total)?;
    out.fill(0.0);
    let (res, dual) = out.split_at_mut(total);
    let (p0, p1) = dual.split_at_mut(total);
    let tau = 0.25f32;
    for plane in 0..np {
        let fb = 5 + (plane / c) * 4;
        let weight = param(p, fb)?;
        let scale = tau / weight;
        let base = plane * hw;
        let xs = &x[base..base + hw];
        let o = &mut res[base..base + hw];
        let q0 = &mut p0[base..base + hw];
        let q1 = &mut p1[base..base + hw];
        for it in 0..iters {
            for k in 0..hw {
                let (r, col) = (k / w, k % w);
                let mut d = -q0[k] - q1[k];
                if r > 0 {
                    d += q0[k - w];
                }
                if col > 0 {
                    d += q1[k - 1];
                }
                o[k] = xs[k] + d;
            }
            if it + 1 < iters {
                for k in 0..hw {
                    let (r, col) = (k / w, k % w);
                    let v = o[k];
                    let g0 = if r + 1 < h { o[k + w] - v } else { 0.0 };
                    let g1 = if col + 1 < w { o[k + 1] - v } else { 0.0 };
                    let norm = (g0 * g0 + g1 * g1).sqrt() * scale + 1.0;
                    q0[k] = (q0[k] - tau * g0) / norm;
                    q1[k] = (q1[k] - tau * g1) / norm;
                }
            }
        }
        for v in o.iter_mut() {
            *v = finish(*v, p[fb + 1], p[fb + 2], p[fb + 3]);
        }
    }
    Ok(())
}

/// The CPU twin of `take_prefix`.
pub fn take_prefix_cpu(ins: &[CpuInput<'_>], p: &[f32], out: &mut [f32]) -> Result<()> {
    let src = ins.first().ok_or("take_prefix: no input")?.data;
    let n = uparam(p, 0)?;
    check_len("take_prefix input", src.len(), n)?;
    check_len("take_prefix output", out.len(), n)?;
    out[..n].copy_from_slice(&src[..n]);
    Ok(())
}

impl Purifier for Tv {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let h = batch.host();
        let x = batch.input();
        let (n, c, hh, w) = nchw(batch, x)?;
        let total = n * c * hh * w;
        check_indexable(3 * total)?;
        let ms = metas(batch, n)?;
        let mut params = vec![
            hh as f32,
            w as f32,
            c as f32,
            (n * c) as f32,
            self.iterations as f32,
        ];
        for (i, m) in ms.iter().enumerate() {
            let lambda = self.stored_weight(m)?;
            if !(lambda.is_finite() && lambda > 0.0) {
                return Err(Error::new(format!(
                    "tv: frame {i}: weight {lambda} in stored units is not positive"
                )));
            }
            batch.audit_number(i, "weight_stored", lambda)?;
            let (lo, hi) = stored_range(m)?;
            params.extend_from_slice(&[lambda as f32, lo as f32, hi as f32, rounds(m)]);
        }
        let big = h.run_shader(&Shader {
            wgsl: WGSL,
            entry: "tv_chambolle",
            inputs: &[x],
            out_shape: &[3 * total],
            params: &params,
            workgroups: grid(n * c)?,
            cpu: Some(&tv_cpu),
        })?;
        let shape = [n, c, hh, w];
        let y = h.run_shader(&Shader {
            wgsl: WGSL,
            entry: "take_prefix",
            inputs: &[big],
            out_shape: &shape,
            params: &[total as f32],
            workgroups: groups_1d(total)?,
            cpu: Some(&take_prefix_cpu),
        });
        h.free(big)?;
        let y = y?;
        audit_change(batch, x, y)?;
        Ok(y)
    }
}
