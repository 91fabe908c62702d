//! Bit-depth reduction (feature squeezing, Xu et al. 2018).
//!
//! What is quantised: the stored values, on a uniform grid whose step is the frame's reference
//! interval (VOI window in stored units, else the stored range; see [`crate::reference_span`])
//! divided into `2^bits - 1` steps and anchored at the interval's lower edge. Inside the window
//! this gives exactly `2^bits` levels, as Xu's `round(x * (2^b - 1)) / (2^b - 1)` does on
//! [0, 1] images (an 8-bit frame without a window at 4 bits keeps multiples of 17). Values
//! outside the window keep the same step instead of being saturated, so bone in a lung-windowed
//! CT is coarsened, not erased. The level is then rounded to the stored integer grid and clamped
//! to the stored range.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{
    Batch, CpuInput, Error, Host, PluginInfo, Purifier, Result, Shader, Tensor,
};

use crate::{
    WGSL, audit_change, check_indexable, check_len, finish, groups_1d, metas, nchw, param,
    reference_span, rounds, stored_range, uparam,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct BitDepthParams {
    pub bits: u32,
}

/// Quantises every frame to `bits` bits of its reference interval.
#[derive(Debug)]
pub struct BitDepth {
    bits: u32,
}

impl PluginInfo for BitDepth {
    const NAME: &'static str = "bit-depth";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Bit-depth reduction (feature squeezing): 2^bits levels over the frame's window (stored range without one)";
    type Params = BitDepthParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"bits":{"type":"integer","minimum":1,"maximum":16,"description":"bits kept over the window (2^bits levels)"}},"required":["bits"],"additionalProperties":false}"#
    }
    fn create(p: BitDepthParams, _host: &Host<'_>) -> Result<Self> {
        if !(1..=16).contains(&p.bits) {
            return Err(Error::new(format!(
                "bit-depth: bits must be in 1..=16, got {}",
                p.bits
            )));
        }
        Ok(BitDepth { bits: p.bits })
    }
}

/// Per-frame kernel parameters: anchor, step, 1/step, range lo, range hi, round.
pub fn frame_params(bits: u32, m: &adverse_plugin_sdk::FrameMeta) -> Result<[f32; 6]> {
    let (a, z) = reference_span(m)?;
    let (lo, hi) = stored_range(m)?;
    let step = (z - a) / (2f64.powi(bits as i32) - 1.0);
    Ok([
        a as f32,
        step as f32,
        (1.0 / step) as f32,
        lo as f32,
        hi as f32,
        rounds(m),
    ])
}

/// The CPU twin of `bit_depth` (see shaders/purify.wgsl).
pub fn bit_depth_cpu(ins: &[CpuInput<'_>], p: &[f32], out: &mut [f32]) -> Result<()> {
    let x = ins.first().ok_or("bit_depth: no input")?.data;
    let nf = uparam(p, 0)?;
    let per = uparam(p, 1)?;
    check_len("bit_depth params", p.len(), 2 + nf * 6)?;
    check_len("bit_depth input", x.len(), nf * per)?;
    check_len("bit_depth output", out.len(), nf * per)?;
    for (i, o) in out.iter_mut().enumerate().take(nf * per) {
        let b = 2 + (i / per) * 6;
        let anchor = param(p, b)?;
        let step = p[b + 1];
        let t = (x[i] - anchor) * p[b + 2];
        let q = anchor + (t + 0.5).floor() * step;
        *o = finish(q, p[b + 3], p[b + 4], p[b + 5]);
    }
    Ok(())
}

impl Purifier for BitDepth {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let h = batch.host();
        let x = batch.input();
        let (n, c, hh, w) = nchw(batch, x)?;
        let total = n * c * hh * w;
        check_indexable(total)?;
        let ms = metas(batch, n)?;
        let mut params = vec![n as f32, (c * hh * w) as f32];
        for (i, m) in ms.iter().enumerate() {
            let fp = frame_params(self.bits, m)?;
            batch.audit_number(i, "step", f64::from(fp[1]))?;
            params.extend_from_slice(&fp);
        }
        let shape = [n, c, hh, w];
        let y = h.run_shader(&Shader {
            wgsl: WGSL,
            entry: "bit_depth",
            inputs: &[x],
            out_shape: &shape,
            params: &params,
            workgroups: groups_1d(total)?,
            cpu: Some(&bit_depth_cpu),
        })?;
        audit_change(batch, x, y)?;
        Ok(y)
    }
}
