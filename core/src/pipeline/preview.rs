//! PNG previews for a person checking a run: original | result | amplified difference, side by
//! side in one 8-bit image, so the three can be compared at a glance in any image viewer.
//!
//! Display choices (a preview is for looking, not measuring; the numbers are in the results):
//! - Grey frames are shown the way a viewer would first show them: through the frame's first
//!   VOI window (centre/width apply to *rescaled* values, the DICOM linear VOI function of
//!   PS3.3 C.11.2.1.2), or, without a usable window, the original frame's min..max stretched to
//!   0..255. Original and result share that mapping, so a change in brightness stays visible.
//!   MONOCHROME1 is inverted (low values white) as it is meant to be displayed.
//! - RGB frames keep their colours: integer samples map their representable stored range to
//!   0..255 (8-bit RGB is shown unchanged), float samples the frame's min..max.
//! - The difference panel shows result - original in stored units around a mid grey (128 for
//!   no change): by default amplified so that the largest |difference| reaches full scale
//!   (white for +max, black for -max), because perturbations of a few stored units would
//!   otherwise be invisible; or with a fixed gain (grey levels per stored unit) so previews of
//!   different images can be compared.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::dicom::{ImageMeta, PixelKind};

/// Why a preview could not be written.
#[derive(Debug, Error)]
pub enum PreviewError {
    #[error(
        "preview {path}: frame size mismatch: {expected} samples expected, original has {orig}, result has {new}"
    )]
    Shape {
        path: PathBuf,
        expected: usize,
        orig: usize,
        new: usize,
    },
    #[error("preview {path}: {rows}x{cols} is too large or empty for a PNG preview")]
    Size { path: PathBuf, rows: u32, cols: u32 },
    #[error(
        "preview {path}: {samples} samples per pixel ({photometric}) cannot be previewed; grey and RGB can"
    )]
    Unsupported {
        path: PathBuf,
        samples: u16,
        photometric: String,
    },
    #[error("preview {path}: amplification {gain} must be a finite positive number")]
    Amplify { path: PathBuf, gain: f32 },
    #[error("preview {path}: PNG encoding failed: {source}")]
    Encode {
        path: PathBuf,
        source: png::EncodingError,
    },
    #[error("preview {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Write the three-panel preview of one frame (interleaved stored values, as
/// `DecodedImage::frame_f32` gives them) to `path`.
///
/// `amplify`: None scales the difference so its largest magnitude is full scale; `Some(g)` shows
/// `g` grey levels per stored unit of difference (clipped).
///
/// The PNG is written to a temporary file beside `path`, synced and renamed over it, so a reader
/// (or a resumed run) never sees a partial preview.
pub fn write_preview(
    path: &Path,
    orig: &[f32],
    new: &[f32],
    meta: &ImageMeta,
    amplify: Option<f32>,
) -> Result<(), PreviewError> {
    let png = render_png(path, orig, new, meta, amplify)?;
    let io = |source| PreviewError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".preview-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(&png).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// The encoded PNG bytes of [`write_preview`]; `path` only names the preview in errors.
fn render_png(
    path: &Path,
    orig: &[f32],
    new: &[f32],
    meta: &ImageMeta,
    amplify: Option<f32>,
) -> Result<Vec<u8>, PreviewError> {
    let path_buf = || path.to_path_buf();
    let spp = meta.samples_per_pixel as usize;
    let color = match spp {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        _ => {
            return Err(PreviewError::Unsupported {
                path: path_buf(),
                samples: meta.samples_per_pixel,
                photometric: meta.photometric.clone(),
            });
        }
    };
    let (rows, cols) = (meta.rows as usize, meta.cols as usize);
    let width = meta.cols.checked_mul(3).filter(|_| rows > 0 && cols > 0);
    let Some(width) = width else {
        return Err(PreviewError::Size {
            path: path_buf(),
            rows: meta.rows,
            cols: meta.cols,
        });
    };
    let expected = rows * cols * spp;
    if orig.len() != expected || new.len() != expected {
        return Err(PreviewError::Shape {
            path: path_buf(),
            expected,
            orig: orig.len(),
            new: new.len(),
        });
    }
    let gain = match amplify {
        Some(g) if !(g.is_finite() && g > 0.0) => {
            return Err(PreviewError::Amplify {
                path: path_buf(),
                gain: g,
            });
        }
        Some(g) => g as f64,
        None => {
            let max = orig
                .iter()
                .zip(new)
                .map(|(&a, &b)| (b as f64 - a as f64).abs())
                .filter(|d| d.is_finite())
                .fold(0.0, f64::max);
            if max > 0.0 { 127.5 / max } else { 0.0 }
        }
    };

    let display = Display::new(orig, meta);
    let row_len = width as usize * spp;
    let mut buf = vec![0u8; rows * row_len];
    for (r, out) in buf.chunks_exact_mut(row_len).enumerate() {
        let src = r * cols * spp..(r + 1) * cols * spp;
        let (o, n) = (&orig[src.clone()], &new[src]);
        let (p1, rest) = out.split_at_mut(cols * spp);
        let (p2, p3) = rest.split_at_mut(cols * spp);
        for i in 0..cols * spp {
            p1[i] = display.map(o[i]);
            p2[i] = display.map(n[i]);
            p3[i] = to_u8(127.5 + gain * (n[i] as f64 - o[i] as f64));
        }
    }

    let mut png_bytes = Vec::new();
    let enc_err = |source| PreviewError::Encode {
        path: path_buf(),
        source,
    };
    let mut enc = png::Encoder::new(&mut png_bytes, width, meta.rows);
    enc.set_color(color);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut w = enc.write_header().map_err(enc_err)?;
    w.write_image_data(&buf).map_err(enc_err)?;
    w.finish().map_err(enc_err)?;
    Ok(png_bytes)
}

/// Rounds half up to the grey level (127.5, no change, becomes 128) and clips; NaN is black.
fn to_u8(v: f64) -> u8 {
    (v + 0.5).floor().clamp(0.0, 255.0) as u8
}

/// Stored value -> display grey level (per sample, also for RGB).
enum Display {
    /// DICOM linear VOI on rescaled values.
    Window {
        slope: f64,
        intercept: f64,
        center: f64,
        width: f64,
        invert: bool,
    },
    /// Linear from stored `lo..=hi` to 0..=255 (`hi > lo`), or mid grey when flat.
    Linear { lo: f64, hi: f64, invert: bool },
}

impl Display {
    fn new(orig: &[f32], meta: &ImageMeta) -> Self {
        let grey = meta.samples_per_pixel == 1;
        let invert = grey && meta.photometric.trim() == "MONOCHROME1";
        let (slope, intercept) = (meta.rescale_slope, meta.rescale_intercept);
        if grey
            && let (Some(&center), Some(&width)) =
                (meta.window_center.first(), meta.window_width.first())
            && center.is_finite()
            && width.is_finite()
            && width >= 1.0
            && slope.is_finite()
            && slope != 0.0
            && intercept.is_finite()
        {
            return Display::Window {
                slope,
                intercept,
                center,
                width,
                invert,
            };
        }
        if !grey && meta.kind == PixelKind::Integer {
            let (lo, hi) = meta.value_range();
            return Display::Linear { lo, hi, invert };
        }
        // Min-max of the stored values is min-max of the rescaled ones (rescale is linear; a
        // negative slope only swaps the ends, which the display then follows).
        let mut it = orig.iter().map(|&x| x as f64).filter(|x| x.is_finite());
        let (lo, hi) = match it.next() {
            Some(f) => it.fold((f, f), |(lo, hi), x| (lo.min(x), hi.max(x))),
            None => (0.0, 0.0),
        };
        let flip = grey && slope < 0.0;
        Display::Linear {
            lo,
            hi,
            invert: invert != flip,
        }
    }

    fn map(&self, v: f32) -> u8 {
        let v = v as f64;
        let (g, invert) = match *self {
            Display::Window {
                slope,
                intercept,
                center,
                width,
                invert,
            } => {
                let x = v * slope + intercept;
                let lo = center - 0.5 - (width - 1.0) / 2.0;
                let hi = center - 0.5 + (width - 1.0) / 2.0;
                let g = if x <= lo {
                    0.0
                } else if x > hi {
                    255.0
                } else if width > 1.0 {
                    ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
                } else {
                    // Width 1 is a threshold: lo == hi, both branches above cover every x.
                    255.0
                };
                (g, invert)
            }
            Display::Linear { lo, hi, invert } => {
                let g = if hi > lo {
                    (v - lo) / (hi - lo) * 255.0
                } else {
                    127.5
                };
                (g, invert)
            }
        };
        let g = to_u8(g);
        if invert { 255 - g } else { g }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(rows: u32, cols: u32, spp: u16) -> ImageMeta {
        ImageMeta {
            rows,
            cols,
            samples_per_pixel: spp,
            bits_allocated: if spp == 3 { 8 } else { 16 },
            bits_stored: if spp == 3 { 8 } else { 12 },
            high_bit: if spp == 3 { 7 } else { 11 },
            pixel_representation: 0,
            photometric: if spp == 3 { "RGB" } else { "MONOCHROME2" }.into(),
            planar_configuration: 0,
            rescale_slope: 1.0,
            rescale_intercept: 0.0,
            rescale_type: None,
            window_center: vec![],
            window_width: vec![],
            modality: Some("OT".into()),
            sop_class_uid: None,
            sop_instance_uid: None,
            series_instance_uid: None,
            study_instance_uid: None,
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            transfer_syntax_name: "Explicit VR Little Endian".into(),
            frames: 1,
            kind: PixelKind::Integer,
            source_photometric: "MONOCHROME2".into(),
            source_planar_configuration: 0,
            source_lossy: false,
            compressed_bytes: None,
        }
    }

    /// Decoded preview: (width, height, color, pixels).
    fn decode(path: &Path) -> (u32, u32, png::ColorType, Vec<u8>) {
        let f = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let mut r = png::Decoder::new(f).read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, info.color_type, buf)
    }

    #[test]
    fn grey_panels_geometry_and_difference_levels() {
        let (rows, cols) = (5u32, 4u32);
        // Original ramps 0..=1900 (min-max display), result moves two pixels by +10 and -5.
        let orig: Vec<f32> = (0..20).map(|i| i as f32 * 100.0).collect();
        let mut new = orig.clone();
        new[6] += 10.0; // row 1, col 2
        new[13] -= 5.0; // row 3, col 1
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.png");
        write_preview(&p, &orig, &new, &meta(rows, cols, 1), None).unwrap();
        let (w, h, color, px) = decode(&p);
        assert_eq!((w, h, color), (12, 5, png::ColorType::Grayscale));
        let at = |r: usize, panel: usize, c: usize| px[r * 12 + panel * 4 + c];
        // Panel 1: min-max of the original: 0 -> 0, 1900 -> 255, 1000 -> 134.2 -> 134.
        assert_eq!(at(0, 0, 0), 0);
        assert_eq!(at(4, 0, 3), 255);
        assert_eq!(at(2, 0, 2), 134);
        // Panel 2 uses the same mapping: 610 -> 81.9 -> 82 (original 600 -> 80.5 -> 81).
        assert_eq!(at(1, 0, 2), 81);
        assert_eq!(at(1, 1, 2), 82);
        assert_eq!(at(0, 1, 1), at(0, 0, 1));
        // Panel 3: max |diff| 10 -> full scale: +10 white, -5 -> 127.5 - 63.75 -> 64, else 128.
        assert_eq!(at(1, 2, 2), 255);
        assert_eq!(at(3, 2, 1), 64);
        assert_eq!(at(0, 2, 0), 128);
        assert_eq!(
            px.iter().skip(8).step_by(12).filter(|&&g| g != 128).count(),
            0
        );
    }

    #[test]
    fn fixed_gain_and_identical_frames() {
        let m = meta(2, 3, 1);
        let orig = vec![50f32; 6];
        let mut new = orig.clone();
        new[4] = 60.0;
        new[5] = 1000.0;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.png");
        write_preview(&p, &orig, &new, &m, Some(2.0)).unwrap();
        let (_, _, _, px) = decode(&p);
        // 2 grey levels per stored unit: +10 -> 147.5 -> 148; +950 clips at 255.
        assert_eq!(px[9 + 6 + 1], 148);
        assert_eq!(px[9 + 6 + 2], 255);
        assert_eq!(px[6], 128);
        // Identical frames: a flat mid-grey difference, no division by zero.
        write_preview(&p, &orig, &orig, &m, None).unwrap();
        let (_, _, _, px) = decode(&p);
        assert!([6, 7, 8, 15, 16, 17].iter().all(|&i| px[i] == 128));
    }

    #[test]
    fn window_on_rescaled_values_and_monochrome1() {
        // CT-like: HU = stored - 1024, window 40/400.
        let mut m = meta(1, 3, 1);
        m.rescale_intercept = -1024.0;
        m.window_center = vec![40.0, 500.0];
        m.window_width = vec![400.0, 2000.0];
        let orig = vec![0.0, 1064.0, 4000.0];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.png");
        write_preview(&p, &orig, &orig, &m, None).unwrap();
        let (w, _, _, px) = decode(&p);
        assert_eq!(w, 9);
        // 40 HU at the centre: ((40 - 39.5) / 399 + 0.5) * 255 = 127.8 -> 128.
        assert_eq!(&px[0..3], &[0, 128, 255]);
        m.photometric = "MONOCHROME1".into();
        write_preview(&p, &orig, &orig, &m, None).unwrap();
        let (_, _, _, px) = decode(&p);
        assert_eq!(&px[0..3], &[255, 127, 0]);
    }

    #[test]
    fn rgb_keeps_colours() {
        let m = meta(1, 2, 3);
        let orig = vec![10.0, 200.0, 30.0, 0.0, 0.0, 255.0];
        let mut new = orig.clone();
        new[1] = 190.0;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rgb.png");
        write_preview(&p, &orig, &new, &m, None).unwrap();
        let (w, h, color, px) = decode(&p);
        assert_eq!((w, h, color), (6, 1, png::ColorType::Rgb));
        assert_eq!(&px[0..6], &[10, 200, 30, 0, 0, 255]);
        assert_eq!(&px[6..12], &[10, 190, 30, 0, 0, 255]);
        assert_eq!(&px[12..18], &[128, 0, 128, 128, 128, 128]);
    }

    #[test]
    fn atomic_replace_and_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        std::fs::write(&p, b"old").unwrap();
        let m = meta(2, 2, 1);
        let x = [1.0f32, 2.0, 3.0, 4.0];
        write_preview(&p, &x, &x, &m, None).unwrap();
        assert_eq!(decode(&p).0, 6);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary file left behind");

        let err = write_preview(&p, &x, &x[..3], &m, None).unwrap_err();
        assert!(matches!(err, PreviewError::Shape { new: 3, .. }), "{err}");
        let err = write_preview(&p, &x, &x, &m, Some(f32::NAN)).unwrap_err();
        assert!(matches!(err, PreviewError::Amplify { .. }), "{err}");
        let err = write_preview(&p, &x, &x, &meta(2, 2, 2), None).unwrap_err();
        assert!(matches!(err, PreviewError::Unsupported { .. }), "{err}");
        let err = write_preview(&p, &[], &[], &meta(0, 2, 1), None).unwrap_err();
        assert!(matches!(err, PreviewError::Size { .. }), "{err}");
        let missing = dir.path().join("no/such/dir/a.png");
        let err = write_preview(&missing, &x, &x, &m, None).unwrap_err();
        assert!(matches!(err, PreviewError::Io { .. }), "{err}");
        assert!(err.to_string().contains("no/such/dir"), "{err}");
        // Failed writes left the earlier preview intact.
        assert_eq!(decode(&p).0, 6);
    }
}
