//! Local gradient smoothing (Naseer, Khan & Porikli, "Local Gradients Smoothing: Defense
//! against localized adversarial attacks", WACV 2019).
//!
//! 1. `g` = first-order gradient magnitude (forward differences, 0 past the last row/column) of
//!    the frame's grey level, taken through the reference interval (window or stored range:
//!    `(clamp(x, lo, hi) - lo) / (hi - lo)`, channel mean), then min-max normalised per frame
//!    (`(g - min) / (max - min + 1e-7)`, as the authors' code).
//! 2. Overlapping `window`×`window` blocks with stride `window - overlap`; a block is selected
//!    when its mean normalised gradient exceeds `threshold`; `g` is kept where a selected block
//!    covers the pixel and zeroed elsewhere. Unlike an unfold that drops the remainder, the last
//!    block of each side is moved to touch the border so no pixel escapes (a patch in a corner
//!    is exactly what LGS is for).
//! 3. `x' = lo + (x − lo) ⊙ (1 − clamp(λ·g, 0, 1))`: the paper's `x ⊙ (1 − λ g(x))` with the
//!    black level `lo` of the reference interval as zero (it is 0 for 8-bit data), so high
//!    gradient regions are pulled to black in any stored unit. Rounded and clamped to the stored
//!    range.
//!
//! Defaults are the paper's: window 15, overlap 5, threshold 0.1, smoothing factor λ 2.3.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{
    Batch, CpuInput, Error, Host, PluginInfo, Purifier, Result, Shader, Tensor,
};

use crate::{
    WGSL, audit_change, check_indexable, check_len, finish, grid, groups_1d, metas, nchw, param,
    reference_span, rounds, stored_range, uparam,
};

fn d_window() -> u32 {
    15
}
fn d_overlap() -> u32 {
    5
}
fn d_threshold() -> f64 {
    0.1
}
fn d_smoothing() -> f64 {
    2.3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct LgsParams {
    #[serde(default = "d_window")]
    pub window: u32,
    #[serde(default = "d_overlap")]
    pub overlap: u32,
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    #[serde(default = "d_smoothing")]
    pub smoothing: f64,
}

/// Local gradient smoothing of every frame.
#[derive(Debug)]
pub struct Lgs {
    window: u32,
    stride: u32,
    threshold: f64,
    smoothing: f64,
}

impl PluginInfo for Lgs {
    const NAME: &'static str = "lgs";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Local gradient smoothing (Naseer 2019): suppress high-gradient windows, x' = x * (1 - lambda * g)";
    type Params = LgsParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"window":{"type":"integer","minimum":2,"maximum":256,"default":15,"description":"block side in pixels"},"overlap":{"type":"integer","minimum":0,"maximum":255,"default":5,"description":"overlap of neighbouring blocks in pixels (< window)"},"threshold":{"type":"number","minimum":0,"maximum":1,"default":0.1,"description":"a block is smoothed when its mean normalised gradient exceeds this"},"smoothing":{"type":"number","exclusiveMinimum":0,"maximum":100,"default":2.3,"description":"smoothing factor lambda"}},"additionalProperties":false}"#
    }
    fn create(p: LgsParams, _host: &Host<'_>) -> Result<Self> {
        if !(2..=256).contains(&p.window) {
            return Err(Error::new(format!(
                "lgs: window must be in 2..=256 pixels, got {}",
                p.window
            )));
        }
        if p.overlap >= p.window {
            return Err(Error::new(format!(
                "lgs: overlap ({}) must be smaller than window ({})",
                p.overlap, p.window
            )));
        }
        if !(p.threshold.is_finite() && (0.0..=1.0).contains(&p.threshold)) {
            return Err(Error::new(format!(
                "lgs: threshold must be in [0, 1] (the gradient is normalised), got {}",
                p.threshold
            )));
        }
        if !(p.smoothing.is_finite() && p.smoothing > 0.0 && p.smoothing <= 100.0) {
            return Err(Error::new(format!(
                "lgs: smoothing must be in (0, 100], got {}",
                p.smoothing
            )));
        }
        Ok(Lgs {
            window: p.window,
            stride: p.window - p.overlap,
            threshold: p.threshold,
            smoothing: p.smoothing,
        })
    }
}

/// Number of blocks along a side of `len` pixels (see the module docs for their placement).
pub fn window_count(len: usize, k: usize, s: usize) -> usize {
    if len <= k {
        1
    } else {
        (len - k).div_ceil(s) + 1
    }
}

/// Origin of block `j` of `n` along a side of `len` pixels.
pub fn window_origin(j: usize, n: usize, len: usize, k: usize, s: usize) -> usize {
    if len <= k {
        0
    } else if j + 1 == n {
        len - k
    } else {
        j * s
    }
}

/// The CPU twin of `lgs_grad`.
pub fn lgs_grad_cpu(ins: &[CpuInput<'_>], p: &[f32], out: &mut [f32]) -> Result<()> {
    let x = ins.first().ok_or("lgs_grad: no input")?.data;
    let (h, w, c, n) = (uparam(p, 0)?, uparam(p, 1)?, uparam(p, 2)?, uparam(p, 3)?);
    let hw = h * w;
    check_len("lgs_grad params", p.len(), 4 + 2 * n)?;
    check_len("lgs_grad input", x.len(), n * c * hw)?;
    check_len("lgs_grad output", out.len(), n * hw)?;
    for (i, o) in out.iter_mut().enumerate().take(n * hw) {
        let (f, k) = (i / hw, i % hw);
        let (r, col) = (k / w, k % w);
        let lo = p[4 + f * 2];
        let hi = p[5 + f * 2];
        let inv = 1.0 / (hi - lo);
        let fbase = f * c * hw;
        let (mut v, mut vr, mut vd) = (0f32, 0f32, 0f32);
        for ch in 0..c {
            let pb = fbase + ch * hw;
            v += (x[pb + k].clamp(lo, hi) - lo) * inv;
            if col + 1 < w {
                vr += (x[pb + k + 1].clamp(lo, hi) - lo) * inv;
            }
            if r + 1 < h {
                vd += (x[pb + k + w].clamp(lo, hi) - lo) * inv;
            }
        }
        let cf = c as f32;
        let gx = if col + 1 < w { (v - vr) / cf } else { 0.0 };
        let gy = if r + 1 < h { (v - vd) / cf } else { 0.0 };
        *o = (gx * gx + gy * gy).sqrt();
    }
    Ok(())
}

/// The CPU twin of `lgs_windows`.
pub fn lgs_windows_cpu(ins: &[CpuInput<'_>], p: &[f32], out: &mut [f32]) -> Result<()> {
    let g = ins.first().ok_or("lgs_windows: no input")?.data;
    let (h, w, n) = (uparam(p, 0)?, uparam(p, 1)?, uparam(p, 2)?);
    let (k, s, ny, nx) = (uparam(p, 3)?, uparam(p, 4)?, uparam(p, 5)?, uparam(p, 6)?);
    let thr = param(p, 7)?;
    let hw = h * w;
    let per = 2 + ny * nx;
    check_len("lgs_windows input", g.len(), n * hw)?;
    check_len("lgs_windows output", out.len(), n * per)?;
    let (ey, ex) = (k.min(h), k.min(w));
    for f in 0..n {
        let gf = &g[f * hw..(f + 1) * hw];
        let gmin = gf.iter().copied().fold(3.0e38f32, f32::min);
        let gmax = gf.iter().copied().fold(-3.0e38f32, f32::max);
        let o = &mut out[f * per..(f + 1) * per];
        o[0] = gmin;
        o[1] = gmax;
        let inv = 1.0 / (gmax - gmin + 1e-7);
        for j in 0..ny * nx {
            let oy = window_origin(j / nx, ny, h, k, s);
            let ox = window_origin(j % nx, nx, w, k, s);
            let mut sum = 0f32;
            for y in 0..ey {
                for xx in 0..ex {
                    sum += (gf[(oy + y) * w + ox + xx] - gmin) * inv;
                }
            }
            o[2 + j] = if sum / (ey * ex) as f32 > thr {
                1.0
            } else {
                0.0
            };
        }
    }
    Ok(())
}

/// The CPU twin of `lgs_apply`.
pub fn lgs_apply_cpu(ins: &[CpuInput<'_>], p: &[f32], out: &mut [f32]) -> Result<()> {
    let [x, g, win] = ins else {
        return Err(Error::new("lgs_apply: needs three inputs"));
    };
    let (x, g, win) = (x.data, g.data, win.data);
    let (h, w, c, n) = (uparam(p, 0)?, uparam(p, 1)?, uparam(p, 2)?, uparam(p, 3)?);
    let (k, s, ny, nx) = (uparam(p, 4)?, uparam(p, 5)?, uparam(p, 6)?, uparam(p, 7)?);
    let lambda = param(p, 8)?;
    let hw = h * w;
    let per = 2 + ny * nx;
    check_len("lgs_apply params", p.len(), 9 + 4 * n)?;
    check_len("lgs_apply input", x.len(), n * c * hw)?;
    check_len("lgs_apply gradient", g.len(), n * hw)?;
    check_len("lgs_apply windows", win.len(), n * per)?;
    check_len("lgs_apply output", out.len(), n * c * hw)?;
    let (ey, ex) = (k.min(h), k.min(w));
    for (i, o) in out.iter_mut().enumerate().take(n * c * hw) {
        let f = i / (c * hw);
        let px = i % hw;
        let (r, col) = (px / w, px % w);
        let ob = f * per;
        let (gmin, gmax) = (win[ob], win[ob + 1]);
        let mut covered = 0f32;
        'rows: for jy in 0..ny {
            let oy = window_origin(jy, ny, h, k, s);
            if oy > r {
                break 'rows;
            }
            if oy + ey <= r {
                continue;
            }
            for jx in 0..nx {
                let ox = window_origin(jx, nx, w, k, s);
                if ox > col {
                    break;
                }
                if ox + ex > col && win[ob + 2 + jy * nx + jx] > 0.5 {
                    covered = 1.0;
                }
            }
        }
        let gn = (g[f * hw + px] - gmin) * (1.0 / (gmax - gmin + 1e-7));
        let m = (lambda * gn * covered).clamp(0.0, 1.0);
        let fb = 9 + f * 4;
        let lo = p[fb];
        let v = lo + (x[i] - lo) * (1.0 - m);
        *o = finish(v, p[fb + 1], p[fb + 2], p[fb + 3]);
    }
    Ok(())
}

impl Purifier for Lgs {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let h = batch.host();
        let x = batch.input();
        let (n, c, hh, w) = nchw(batch, x)?;
        let total = n * c * hh * w;
        check_indexable(total)?;
        let ms = metas(batch, n)?;
        let (k, s) = (self.window as usize, self.stride as usize);
        let (ny, nx) = (window_count(hh, k, s), window_count(w, k, s));
        let mut grad_params = vec![hh as f32, w as f32, c as f32, n as f32];
        let mut apply_params = vec![
            hh as f32,
            w as f32,
            c as f32,
            n as f32,
            k as f32,
            s as f32,
            ny as f32,
            nx as f32,
            self.smoothing as f32,
        ];
        for m in &ms {
            let (a, z) = reference_span(m)?;
            let (lo, hi) = stored_range(m)?;
            grad_params.extend_from_slice(&[a as f32, z as f32]);
            apply_params.extend_from_slice(&[a as f32, lo as f32, hi as f32, rounds(m)]);
        }
        let g = h.run_shader(&Shader {
            wgsl: WGSL,
            entry: "lgs_grad",
            inputs: &[x],
            out_shape: &[n, hh * w],
            params: &grad_params,
            workgroups: groups_1d(n * hh * w)?,
            cpu: Some(&lgs_grad_cpu),
        })?;
        let win = h.run_shader(&Shader {
            wgsl: WGSL,
            entry: "lgs_windows",
            inputs: &[g],
            out_shape: &[n, 2 + ny * nx],
            params: &[
                hh as f32,
                w as f32,
                n as f32,
                k as f32,
                s as f32,
                ny as f32,
                nx as f32,
                self.threshold as f32,
            ],
            workgroups: grid(n)?,
            cpu: Some(&lgs_windows_cpu),
        })?;
        let shape = [n, c, hh, w];
        let y = h.run_shader(&Shader {
            wgsl: WGSL,
            entry: "lgs_apply",
            inputs: &[x, g, win],
            out_shape: &shape,
            params: &apply_params,
            workgroups: groups_1d(total)?,
            cpu: Some(&lgs_apply_cpu),
        });
        let flags = h.download(win);
        h.free(g)?;
        h.free(win)?;
        let y = y?;
        let flags = flags?;
        let per = 2 + ny * nx;
        for i in 0..n {
            let selected = flags[i * per + 2..(i + 1) * per]
                .iter()
                .filter(|&&v| v > 0.5)
                .count();
            batch.audit_number(i, "windows_smoothed", selected as f64)?;
            batch.audit_number(i, "windows", (ny * nx) as f64)?;
        }
        audit_change(batch, x, y)?;
        Ok(y)
    }
}
