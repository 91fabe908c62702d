//! JPEG re-compression (Guo et al. 2018, "Countering adversarial images using input
//! transformations"): encode each frame as a baseline JPEG at `quality` and decode it again.
//! Encoder: `jpeg-encoder` (standard IJG tables scaled by quality; 4:2:0 chroma below quality
//! 90 for colour frames, as libjpeg/PIL do); decoder: `zune-jpeg`.
//!
//! Mapping to 8 bits: a frame whose stored range spans at most 256 values (8-bit data) is coded
//! directly. A deeper frame goes through its reference interval (window, else stored range):
//! `u = clamp((x − lo) / (hi − lo) · 255, 0, 255)`, `e = round(u)` is encoded, `d` decoded, and
//! the written value is `x + (d − u) · (hi − lo) / 255`. Inside the window that is exactly
//! `lo + d·(hi − lo)/255` (the frame sees what the 8-bit JPEG kept, no sub-8-bit residue an
//! attacker could hide in survives); outside it, where `u` saturates, the original value moves
//! only by the JPEG's change at the window's edge, so out-of-window anatomy is not flattened to
//! the window's edges. For 8-bit data the same formula is `x' = d`.
//!
//! JPEG has no GPU path here: on the GPU backend the batch is downloaded, coded on the CPU and
//! uploaded again.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Error, FrameMeta, Host, PluginInfo, Purifier, Result, Tensor};
use jpeg_encoder::{ColorType, Encoder};
use zune_jpeg::JpegDecoder;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

use crate::{audit_change, finish, metas, nchw, reference_span, rounds, stored_range};

fn seventy_five() -> u8 {
    75
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct JpegParams {
    #[serde(default = "seventy_five")]
    pub quality: u8,
}

/// JPEG encode/decode of every frame.
#[derive(Debug)]
pub struct Jpeg {
    quality: u8,
}

impl PluginInfo for Jpeg {
    const NAME: &'static str = "jpeg";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "JPEG re-compression at a quality (deeper than 8-bit frames through their window)";
    type Params = JpegParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"quality":{"type":"integer","minimum":1,"maximum":100,"default":75,"description":"JPEG quality (1..100)"}},"additionalProperties":false}"#
    }
    fn create(p: JpegParams, _host: &Host<'_>) -> Result<Self> {
        if !(1..=100).contains(&p.quality) {
            return Err(Error::new(format!(
                "jpeg: quality must be in 1..=100, got {}",
                p.quality
            )));
        }
        Ok(Jpeg { quality: p.quality })
    }
}

/// Encodes interleaved 8-bit samples (`channels` 1 or 3) as a baseline JPEG.
pub fn encode(
    data: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    quality: u8,
) -> Result<Vec<u8>> {
    let color = match channels {
        1 => ColorType::Luma,
        3 => ColorType::Rgb,
        c => {
            return Err(Error::new(format!(
                "jpeg: frames of {c} samples per pixel cannot be JPEG coded (1 or 3)"
            )));
        }
    };
    let (w, h) = match (u16::try_from(width), u16::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => {
            return Err(Error::new(format!(
                "jpeg: {width}x{height} exceeds JPEG's 65535-pixel side"
            )));
        }
    };
    let mut out = Vec::new();
    Encoder::new(&mut out, quality)
        .encode(data, w, h, color)
        .map_err(|e| Error::new(format!("jpeg: encoding failed: {e}")))?;
    Ok(out)
}

/// Decodes a JPEG into interleaved 8-bit samples with `channels` components.
pub fn decode(bytes: &[u8], channels: usize) -> Result<Vec<u8>> {
    let space = if channels == 3 {
        ColorSpace::RGB
    } else {
        ColorSpace::Luma
    };
    let opts = DecoderOptions::default().jpeg_set_out_colorspace(space);
    let mut d = JpegDecoder::new_with_options(std::io::Cursor::new(bytes), opts);
    d.decode()
        .map_err(|e| Error::new(format!("jpeg: decoding failed: {e:?}")))
}

/// The 8-bit mapping of a frame: `(lo, scale)` with `u = (x - lo) / scale`.
pub fn mapping(m: &FrameMeta) -> Result<(f64, f64)> {
    let (rlo, rhi) = stored_range(m)?;
    let (lo, hi) = if rhi - rlo <= 255.0 {
        (rlo, rlo + 255.0)
    } else {
        reference_span(m)?
    };
    Ok((lo, (hi - lo) / 255.0))
}

/// JPEG round trip of one frame `x` (`[C, H, W]` planar stored values).
pub fn round_trip(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    m: &FrameMeta,
    quality: u8,
) -> Result<Vec<f32>> {
    let (lo, scale) = mapping(m)?;
    let (rlo, rhi) = stored_range(m)?;
    let hw = h * w;
    let mut u = vec![0f64; c * hw];
    let mut inter = vec![0u8; c * hw];
    for ch in 0..c {
        for k in 0..hw {
            let v = ((f64::from(x[ch * hw + k]) - lo) / scale).clamp(0.0, 255.0);
            u[ch * hw + k] = v;
            inter[k * c + ch] = (v + 0.5).floor() as u8;
        }
    }
    let bytes = encode(&inter, w, h, c, quality)?;
    let dec = decode(&bytes, c)?;
    if dec.len() != c * hw {
        return Err(Error::new(format!(
            "jpeg: decoder returned {} samples for a {w}x{h}x{c} frame",
            dec.len()
        )));
    }
    let round = rounds(m);
    let mut y = vec![0f32; c * hw];
    for ch in 0..c {
        for k in 0..hw {
            let d = f64::from(dec[k * c + ch]);
            let v = f64::from(x[ch * hw + k]) + (d - u[ch * hw + k]) * scale;
            y[ch * hw + k] = finish(v as f32, rlo as f32, rhi as f32, round);
        }
    }
    Ok(y)
}

impl Purifier for Jpeg {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let h = batch.host();
        let x = batch.input();
        let (n, c, hh, w) = nchw(batch, x)?;
        let ms = metas(batch, n)?;
        let data = h.download(x)?;
        let per = c * hh * w;
        let mut out = Vec::with_capacity(data.len());
        for (i, m) in ms.iter().enumerate().take(n) {
            let y = round_trip(&data[i * per..(i + 1) * per], c, hh, w, m, self.quality)
                .map_err(|e| Error::new(format!("frame {i}: {e}")))?;
            out.extend_from_slice(&y);
        }
        let y = h.upload(&out, &[n, c, hh, w])?;
        audit_change(batch, x, y)?;
        Ok(y)
    }
}
