//! Pixel data to exact stored values. Native data is unpacked here (any of 1/8/16/32/64 bits
//! allocated, planar or interleaved, YBR_FULL_422, float and double); RLE and JPEG 2000 are
//! decoded here too (dicom-rs's adapters stop at 8/16 bits and can panic on corrupt input); the
//! JPEG and JPEG-LS codecs of dicom-rs run on one frame at a time after the codestream's own
//! frame header was checked against the DICOM header and the memory caps.

use std::borrow::Cow;
use std::io::Read;
use std::panic::{AssertUnwindSafe, catch_unwind};

use dicom_core::Tag;
use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_encoding::adapters::{PixelDataObject, RawPixelData};
use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::error::DicomError;
use super::image::{DecodedImage, ImageMeta, PixelKind, PixelStore};
use super::read::{DecodeLimits, DicomFile, error_chain};
use super::rle;

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
const DEFLATED_FRAMES: &str = "1.2.840.10008.1.2.8.1";
const ENCAPSULATED_UNCOMPRESSED: &str = "1.2.840.10008.1.2.1.98";

fn is_j2k(ts: &str) -> bool {
    matches!(
        ts,
        "1.2.840.10008.1.2.4.90"
            | "1.2.840.10008.1.2.4.91"
            | "1.2.840.10008.1.2.4.92"
            | "1.2.840.10008.1.2.4.93"
            | "1.2.840.10008.1.2.4.201"
            | "1.2.840.10008.1.2.4.202"
            | "1.2.840.10008.1.2.4.203"
    )
}

fn is_jpeg_ls(ts: &str) -> bool {
    matches!(ts, "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81")
}

fn is_jpeg(ts: &str) -> bool {
    matches!(
        ts,
        "1.2.840.10008.1.2.4.50"
            | "1.2.840.10008.1.2.4.51"
            | "1.2.840.10008.1.2.4.57"
            | "1.2.840.10008.1.2.4.70"
    )
}

/// How the stored values of one frame are laid out in bytes.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rows: usize,
    cols: usize,
    spp: usize,
    ba: u16,
    bs: u16,
    hb: u16,
    signed: bool,
    kind: PixelKind,
}

impl Layout {
    fn frame_samples(&self) -> usize {
        self.rows * self.cols * self.spp
    }
}

/// Decode every frame of `file` to stored values.
pub fn decode_image(file: &DicomFile, limits: &DecodeLimits) -> Result<DecodedImage, DicomError> {
    match catch_unwind(AssertUnwindSafe(|| decode_inner(file, limits))) {
        Ok(r) => r,
        Err(payload) => {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(DicomError::DecoderPanic {
                path: file.path.clone(),
                uid: file.transfer_syntax().to_string(),
                name: file.transfer_syntax_name(),
                reason,
            })
        }
    }
}

struct Ctx<'a> {
    file: &'a DicomFile,
}

impl Ctx<'_> {
    fn missing(&self, tag: Tag, name: &'static str) -> DicomError {
        DicomError::MissingAttribute {
            path: self.file.path.clone(),
            tag: tag.to_string(),
            name,
        }
    }

    fn invalid(
        &self,
        tag: Tag,
        name: &'static str,
        value: impl ToString,
        reason: &str,
    ) -> DicomError {
        DicomError::InvalidAttribute {
            path: self.file.path.clone(),
            tag: tag.to_string(),
            name,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    fn ts_err(
        &self,
        make: fn(std::path::PathBuf, String, String, String) -> DicomError,
        reason: impl Into<String>,
    ) -> DicomError {
        make(
            self.file.path.clone(),
            self.file.transfer_syntax().to_string(),
            self.file.transfer_syntax_name(),
            reason.into(),
        )
    }

    fn decode_err(&self, reason: impl Into<String>) -> DicomError {
        self.ts_err(
            |path, uid, name, reason| DicomError::Decode {
                path,
                uid,
                name,
                reason,
            },
            reason,
        )
    }

    fn unsupported_format(&self, reason: impl Into<String>) -> DicomError {
        self.ts_err(
            |path, uid, name, reason| DicomError::UnsupportedPixelFormat {
                path,
                uid,
                name,
                reason,
            },
            reason,
        )
    }

    fn unsupported_ts(&self, reason: impl Into<String>) -> DicomError {
        self.ts_err(
            |path, uid, name, reason| DicomError::UnsupportedTransferSyntax {
                path,
                uid,
                name,
                reason,
            },
            reason,
        )
    }

    fn uint(&self, tag: Tag, name: &'static str) -> Result<Option<u32>, DicomError> {
        match self.file.obj.get(tag) {
            None => Ok(None),
            Some(e) if e.value().multiplicity() == 0 => Ok(None),
            Some(e) => e.to_int::<u32>().map(Some).map_err(|_| {
                self.invalid(
                    tag,
                    name,
                    e.to_str().unwrap_or_default(),
                    "not an unsigned integer",
                )
            }),
        }
    }

    fn required_uint(&self, tag: Tag, name: &'static str) -> Result<u32, DicomError> {
        self.uint(tag, name)?.ok_or_else(|| self.missing(tag, name))
    }

    fn floats(&self, tag: Tag) -> Vec<f64> {
        self.file
            .obj
            .get(tag)
            .and_then(|e| e.to_multi_float64().ok())
            .unwrap_or_default()
    }
}

fn decode_inner(file: &DicomFile, limits: &DecodeLimits) -> Result<DecodedImage, DicomError> {
    let cx = Ctx { file };
    let obj = &file.obj;
    let (pixel_tag, kind) = [
        (tags::PIXEL_DATA, PixelKind::Integer),
        (tags::FLOAT_PIXEL_DATA, PixelKind::Float),
        (tags::DOUBLE_FLOAT_PIXEL_DATA, PixelKind::Double),
    ]
    .into_iter()
    .find(|(t, _)| obj.get(*t).is_some())
    .ok_or_else(|| DicomError::NoPixelData {
        path: file.path.clone(),
    })?;

    let rows = cx.required_uint(tags::ROWS, "Rows")?;
    let cols = cx.required_uint(tags::COLUMNS, "Columns")?;
    let spp = cx
        .uint(tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?
        .unwrap_or(1);
    let ba = cx.required_uint(tags::BITS_ALLOCATED, "BitsAllocated")?;
    let bs = match kind {
        PixelKind::Integer => cx.required_uint(tags::BITS_STORED, "BitsStored")?,
        _ => cx.uint(tags::BITS_STORED, "BitsStored")?.unwrap_or(ba),
    };
    let hb = cx
        .uint(tags::HIGH_BIT, "HighBit")?
        .unwrap_or(bs.saturating_sub(1));
    let pr = cx
        .uint(tags::PIXEL_REPRESENTATION, "PixelRepresentation")?
        .unwrap_or(0);
    let planar = cx
        .uint(tags::PLANAR_CONFIGURATION, "PlanarConfiguration")?
        .unwrap_or(0);
    let frames = match file.obj.get(tags::NUMBER_OF_FRAMES) {
        None => 1,
        Some(e) => {
            let s = e.to_str().unwrap_or_default();
            let n: i64 = s.trim_matches(['\0', ' ']).parse().map_err(|_| {
                cx.invalid(
                    tags::NUMBER_OF_FRAMES,
                    "NumberOfFrames",
                    &s,
                    "not an integer",
                )
            })?;
            if n < 1 || n > u32::MAX as i64 {
                return Err(cx.invalid(
                    tags::NUMBER_OF_FRAMES,
                    "NumberOfFrames",
                    n,
                    "must be at least 1",
                ));
            }
            n as u32
        }
    };
    let photometric = file
        .string(tags::PHOTOMETRIC_INTERPRETATION)
        .ok_or_else(|| {
            cx.missing(
                tags::PHOTOMETRIC_INTERPRETATION,
                "PhotometricInterpretation",
            )
        })?;

    if rows == 0 || cols == 0 {
        return Err(cx.invalid(
            tags::ROWS,
            "Rows/Columns",
            format!("{rows}x{cols}"),
            "must be positive",
        ));
    }
    if !(1..=4).contains(&spp) {
        return Err(cx.invalid(
            tags::SAMPLES_PER_PIXEL,
            "SamplesPerPixel",
            spp,
            "must be 1 to 4",
        ));
    }
    if pr > 1 {
        return Err(cx.invalid(
            tags::PIXEL_REPRESENTATION,
            "PixelRepresentation",
            pr,
            "must be 0 or 1",
        ));
    }
    match kind {
        PixelKind::Integer if !matches!(ba, 1 | 8 | 16 | 32) => {
            return Err(
                cx.unsupported_format(format!("BitsAllocated {ba} (supported: 1, 8, 16, 32)"))
            );
        }
        PixelKind::Float if ba != 32 => {
            return Err(cx.invalid(
                tags::BITS_ALLOCATED,
                "BitsAllocated",
                ba,
                "Float Pixel Data needs 32",
            ));
        }
        PixelKind::Double if ba != 64 => {
            return Err(cx.invalid(
                tags::BITS_ALLOCATED,
                "BitsAllocated",
                ba,
                "Double Float Pixel Data needs 64",
            ));
        }
        _ => {}
    }
    if kind == PixelKind::Integer && (bs == 0 || bs > ba || hb >= ba || hb + 1 < bs) {
        return Err(cx.invalid(
            tags::BITS_STORED,
            "BitsStored/HighBit",
            format!("BitsAllocated {ba}, BitsStored {bs}, HighBit {hb}"),
            "inconsistent",
        ));
    }
    if ba == 1 && pr == 1 {
        return Err(cx.unsupported_format("signed 1-bit data"));
    }

    let layout = Layout {
        rows: rows as usize,
        cols: cols as usize,
        spp: spp as usize,
        ba: ba as u16,
        bs: bs as u16,
        hb: hb as u16,
        signed: pr == 1,
        kind,
    };
    // Decoded size check, before any decoder runs or any buffer is sized.
    let store_bytes: u64 = match ba {
        1 | 8 => 1,
        16 => 2,
        32 => 4,
        _ => 8,
    };
    let total_samples = rows as u128 * cols as u128 * spp as u128 * frames as u128;
    let needed = total_samples * store_bytes as u128;
    if needed > limits.max_decoded_bytes as u128 || total_samples > usize::MAX as u128 / 8 {
        return Err(DicomError::DecodedTooLarge {
            path: file.path.clone(),
            needed: needed.min(u64::MAX as u128) as u64,
            limit: limits.max_decoded_bytes,
        });
    }
    let total_samples = total_samples as usize;

    let ts = file.transfer_syntax().to_string();
    let registry_ts = TransferSyntaxRegistry
        .get(&ts)
        .ok_or_else(|| cx.unsupported_ts("unknown transfer syntax"))?;

    let element = obj.get(pixel_tag).ok_or_else(|| DicomError::NoPixelData {
        path: file.path.clone(),
    })?;
    let mut out_photometric = photometric.clone();
    let mut compressed_bytes = None;
    let mut lossy_stream = false;
    let pixels = match element.value() {
        Value::Primitive(p) => {
            let bytes = le_bytes(p);
            let ybr422 = photometric == "YBR_FULL_422" && spp == 3;
            if ybr422 {
                if ba != 8 || cols % 2 != 0 {
                    return Err(cx.unsupported_format(
                        "YBR_FULL_422 needs 8 bits allocated and even columns",
                    ));
                }
                out_photometric = "YBR_FULL".into();
            }
            // Bits of stored data the header promises, all frames.
            let frame_src_samples = if ybr422 {
                layout.rows * layout.cols * 2
            } else {
                layout.frame_samples()
            };
            let needed_bits = frame_src_samples as u128 * frames as u128 * ba as u128;
            let needed_bytes = needed_bits.div_ceil(8);
            if (bytes.len() as u128) < needed_bytes {
                return Err(DicomError::PixelDataTooShort {
                    path: file.path.clone(),
                    expected: needed_bytes as u64,
                    actual: bytes.len() as u64,
                });
            }
            let mut store = new_store(&layout, total_samples);
            let frame_bits = frame_src_samples * ba as usize;
            for f in 0..frames as usize {
                let src = Source {
                    bytes: &bytes,
                    bit_offset: f * frame_bits,
                    planar: planar == 1 && spp > 1,
                    ybr422,
                };
                append_frame(&mut store, &src, &layout);
            }
            store
        }
        Value::PixelSequence(seq) => {
            if kind != PixelKind::Integer {
                return Err(cx.unsupported_format("encapsulated float pixel data"));
            }
            let fragments = seq.fragments();
            compressed_bytes = Some(fragments.iter().map(|f| f.len() as u64).sum());
            let frame_data =
                frame_fragments(&cx, fragments, seq.offset_table(), frames as usize, &ts)?;
            let mut store = new_store(&layout, total_samples);
            let frame_native_bytes = (layout.frame_samples() * ba as usize).div_ceil(8);
            for (f, data) in frame_data.iter().enumerate() {
                let decoded: Cow<[u8]>;
                let mut planar_out = false;
                if ts == RLE_LOSSLESS {
                    decoded = Cow::Owned(
                        rle::decode_frame(data, layout.rows, layout.cols, layout.spp, ba as usize)
                            .map_err(|e| cx.decode_err(format!("frame {f}: {e}")))?,
                    );
                } else if is_j2k(&ts) {
                    if f == 0 {
                        lossy_stream = j2k_irreversible(data);
                    }
                    append_j2k_frame(&cx, &mut store, data, &layout, f)?;
                    if spp == 3 && photometric.starts_with("YBR_") {
                        // openjpeg applied the inverse colour transform.
                        out_photometric = "RGB".into();
                    }
                    continue;
                } else if ts == DEFLATED_FRAMES {
                    decoded = Cow::Owned(inflate_frame(&cx, data, frame_native_bytes, f)?);
                } else if ts == ENCAPSULATED_UNCOMPRESSED {
                    decoded = Cow::Borrowed(&data[..]);
                } else if let Codec::EncapsulatedPixelData(Some(decoder), _) = registry_ts.codec() {
                    if is_jpeg_ls(&ts) || is_jpeg(&ts) {
                        let hdr = jpeg_frame_header(data).ok_or_else(|| {
                            cx.decode_err(format!("frame {f}: no JPEG frame header"))
                        })?;
                        if hdr.width as usize != layout.cols
                            || hdr.height as usize != layout.rows
                            || hdr.components as usize != layout.spp
                        {
                            return Err(cx.decode_err(format!(
                                "frame {f}: codestream is {}x{} with {} components, header says {}x{} with {}",
                                hdr.height, hdr.width, hdr.components, layout.rows, layout.cols, layout.spp
                            )));
                        }
                        if is_jpeg_ls(&ts) {
                            planar_out = hdr.jls_ilv == Some(0) && spp > 1;
                            if f == 0 {
                                lossy_stream = hdr.jls_near.unwrap_or(0) > 0;
                            }
                        }
                        if is_jpeg(&ts) && hdr.precision > 8 && !hdr.lossless {
                            return Err(cx.unsupported_ts(format!(
                                "{}-bit lossy JPEG is not supported by the JPEG decoder",
                                hdr.precision
                            )));
                        }
                    }
                    let one = OneFrame {
                        ts: &ts,
                        layout: &layout,
                        photometric: &photometric,
                        data,
                    };
                    let mut buf = Vec::new();
                    decoder
                        .decode_frame(&one, 0, &mut buf)
                        .map_err(|e| cx.decode_err(format!("frame {f}: {}", error_chain(&e))))?;
                    decoded = Cow::Owned(buf);
                    if is_jpeg(&ts) && spp == 3 {
                        // The JPEG decoder outputs RGB whatever the stream's colour space.
                        out_photometric = "RGB".into();
                    }
                } else {
                    return Err(
                        cx.unsupported_ts("no decoder for this transfer syntax in this build")
                    );
                }
                if decoded.len() < frame_native_bytes {
                    return Err(cx.decode_err(format!(
                        "frame {f}: decoder produced {} bytes, expected {frame_native_bytes}",
                        decoded.len()
                    )));
                }
                let src = Source {
                    bytes: &decoded,
                    bit_offset: 0,
                    planar: planar_out,
                    ybr422: false,
                };
                append_frame(&mut store, &src, &layout);
            }
            store
        }
        Value::Sequence(_) => {
            return Err(cx.invalid(
                pixel_tag,
                "PixelData",
                "sequence",
                "pixel data is a sequence",
            ));
        }
    };
    if pixels.len() != total_samples {
        return Err(cx.decode_err(format!(
            "decoded {} samples, expected {total_samples}",
            pixels.len()
        )));
    }

    let source_lossy = file.string(tags::LOSSY_IMAGE_COMPRESSION).as_deref() == Some("01")
        || lossy_stream
        || matches!(
            ts.as_str(),
            "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51" | "1.2.840.10008.1.2.4.52"
        );
    let slope = cx
        .floats(tags::RESCALE_SLOPE)
        .first()
        .copied()
        .unwrap_or(1.0);
    let intercept = cx
        .floats(tags::RESCALE_INTERCEPT)
        .first()
        .copied()
        .unwrap_or(0.0);
    let meta = ImageMeta {
        rows,
        cols,
        samples_per_pixel: spp as u16,
        bits_allocated: ba as u16,
        bits_stored: bs as u16,
        high_bit: hb as u16,
        pixel_representation: pr as u16,
        photometric: out_photometric,
        planar_configuration: 0,
        rescale_slope: slope,
        rescale_intercept: intercept,
        rescale_type: file.string(tags::RESCALE_TYPE),
        window_center: cx.floats(tags::WINDOW_CENTER),
        window_width: cx.floats(tags::WINDOW_WIDTH),
        modality: file.string(tags::MODALITY),
        sop_class_uid: file.string(tags::SOP_CLASS_UID),
        sop_instance_uid: file.string(tags::SOP_INSTANCE_UID),
        series_instance_uid: file.string(tags::SERIES_INSTANCE_UID),
        study_instance_uid: file.string(tags::STUDY_INSTANCE_UID),
        transfer_syntax_uid: ts.clone(),
        transfer_syntax_name: file.transfer_syntax_name(),
        frames,
        kind,
        source_photometric: photometric,
        source_planar_configuration: planar as u16,
        source_lossy,
        compressed_bytes,
    };
    Ok(DecodedImage { meta, pixels })
}

/// The bytes of a primitive value in little-endian order, whatever the source byte order was
/// (dicom-rs holds OW/OF/OD values as native numbers).
fn le_bytes(p: &PrimitiveValue) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        return p.to_bytes();
    }
    match p {
        PrimitiveValue::U16(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        PrimitiveValue::I16(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        PrimitiveValue::U32(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        PrimitiveValue::I32(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        PrimitiveValue::F32(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        PrimitiveValue::F64(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        other => other.to_bytes(),
    }
}

fn new_store(layout: &Layout, n: usize) -> PixelStore {
    match (layout.kind, layout.ba, layout.signed) {
        (PixelKind::Float, _, _) => PixelStore::F32(Vec::with_capacity(n)),
        (PixelKind::Double, _, _) => PixelStore::F64(Vec::with_capacity(n)),
        (_, 1, _) | (_, 8, false) => PixelStore::U8(Vec::with_capacity(n)),
        (_, 8, true) => PixelStore::I8(Vec::with_capacity(n)),
        (_, 16, false) => PixelStore::U16(Vec::with_capacity(n)),
        (_, 16, true) => PixelStore::I16(Vec::with_capacity(n)),
        (_, _, false) => PixelStore::U32(Vec::with_capacity(n)),
        (_, _, true) => PixelStore::I32(Vec::with_capacity(n)),
    }
}

/// Where one frame's encoded samples are.
struct Source<'a> {
    bytes: &'a [u8],
    bit_offset: usize,
    planar: bool,
    ybr422: bool,
}

/// Append one frame's stored values to `store` in interleaved order. The caller checked that
/// `src.bytes` holds the whole frame.
fn append_frame(store: &mut PixelStore, src: &Source, l: &Layout) {
    let npix = l.rows * l.cols;
    let spp = l.spp;
    let n = npix * spp;
    // Output sample o = pixel p, channel c -> index of the encoded sample.
    let index = |o: usize| -> usize {
        let (p, c) = (o / spp, o % spp);
        if src.ybr422 {
            let (pair, within) = (p / 2, p % 2);
            pair * 4 + if c == 0 { within } else { 1 + c }
        } else if src.planar {
            c * npix + p
        } else {
            o
        }
    };
    let b = src.bytes;
    let byte0 = src.bit_offset / 8;
    let raw = |i: usize| -> u64 {
        match l.ba {
            1 => {
                let bit = src.bit_offset + i;
                ((b[bit / 8] >> (bit % 8)) & 1) as u64
            }
            8 => b[byte0 + i] as u64,
            16 => {
                let k = byte0 + 2 * i;
                u16::from_le_bytes([b[k], b[k + 1]]) as u64
            }
            32 => {
                let k = byte0 + 4 * i;
                u32::from_le_bytes([b[k], b[k + 1], b[k + 2], b[k + 3]]) as u64
            }
            _ => {
                let k = byte0 + 8 * i;
                u64::from_le_bytes([
                    b[k],
                    b[k + 1],
                    b[k + 2],
                    b[k + 3],
                    b[k + 4],
                    b[k + 5],
                    b[k + 6],
                    b[k + 7],
                ])
            }
        }
    };
    let shift = (l.hb + 1 - l.bs) as u32;
    let mask: u64 = if l.bs >= 64 {
        u64::MAX
    } else {
        (1u64 << l.bs) - 1
    };
    let sign_bit: u64 = 1u64 << (l.bs.max(1) - 1);
    // Stored value as i64 of a raw sample: the BitsStored field, sign-extended when signed.
    let field = |raw: u64| -> i64 {
        let v = (raw >> shift) & mask;
        if l.signed && v & sign_bit != 0 {
            v as i64 - (mask as i64) - 1
        } else {
            v as i64
        }
    };
    let value = |i: usize| field(raw(index(i)));
    // The common layouts (byte-aligned 8- or 16-bit samples in file order: one sample per
    // pixel, or interleaved) straight from the bytes, without the per-sample index arithmetic
    // and width dispatch of the general path; the same `field` gives the same values.
    if !src.ybr422 && (!src.planar || spp == 1) && src.bit_offset.is_multiple_of(8) {
        let words = || {
            b[byte0..byte0 + 2 * n]
                .chunks_exact(2)
                .map(|c| field(u16::from_le_bytes([c[0], c[1]]) as u64))
        };
        let bytes = || b[byte0..byte0 + n].iter().map(|&x| field(x as u64));
        match (l.ba, &mut *store) {
            // Unsigned 16-bit (the usual CT/MR/CR storage): `field` is a shift and a mask.
            (16, PixelStore::U16(v)) if !l.signed && l.bs <= 16 && shift < 16 => {
                // Copies in the closure (`move`), so that they stay in registers and the loop
                // vectorises.
                let (sh, m) = (shift, mask as u16);
                v.extend(
                    b[byte0..byte0 + 2 * n]
                        .chunks_exact(2)
                        .map(move |c| (u16::from_le_bytes([c[0], c[1]]) >> sh) & m),
                )
            }
            (16, PixelStore::U16(v)) => v.extend(words().map(|x| x as u16)),
            (16, PixelStore::I16(v)) => v.extend(words().map(|x| x as i16)),
            (8, PixelStore::U8(v)) => v.extend(bytes().map(|x| x as u8)),
            (8, PixelStore::I8(v)) => v.extend(bytes().map(|x| x as i8)),
            _ => append_general(store, n, value, |i| raw(index(i))),
        }
    } else {
        append_general(store, n, value, |i| raw(index(i)))
    }
}

/// [`append_frame`]'s general path: `value` is output sample `i` as a stored integer, `raw` its
/// encoded bits (for float and double data).
fn append_general(
    store: &mut PixelStore,
    n: usize,
    value: impl Fn(usize) -> i64,
    raw: impl Fn(usize) -> u64,
) {
    match store {
        PixelStore::U8(v) => v.extend((0..n).map(|i| value(i) as u8)),
        PixelStore::I8(v) => v.extend((0..n).map(|i| value(i) as i8)),
        PixelStore::U16(v) => v.extend((0..n).map(|i| value(i) as u16)),
        PixelStore::I16(v) => v.extend((0..n).map(|i| value(i) as i16)),
        PixelStore::U32(v) => v.extend((0..n).map(|i| value(i) as u32)),
        PixelStore::I32(v) => v.extend((0..n).map(|i| value(i) as i32)),
        PixelStore::F32(v) => v.extend((0..n).map(|i| f32::from_bits(raw(i) as u32))),
        PixelStore::F64(v) => v.extend((0..n).map(|i| f64::from_bits(raw(i)))),
    }
}

/// The encoded bytes of each frame. One fragment per frame, all fragments for a single frame,
/// the Basic Offset Table when present, else a split at codestream start markers (what pydicom
/// does for multi-fragment frames without an offset table).
fn frame_fragments<'a>(
    cx: &Ctx,
    fragments: &'a [Vec<u8>],
    bot: &[u32],
    frames: usize,
    ts: &str,
) -> Result<Vec<Cow<'a, [u8]>>, DicomError> {
    if fragments.is_empty() {
        return Err(cx.decode_err("encapsulated pixel data has no fragments"));
    }
    if fragments.len() == frames {
        return Ok(fragments.iter().map(|f| Cow::Borrowed(&f[..])).collect());
    }
    if frames == 1 {
        return Ok(vec![Cow::Owned(fragments.concat())]);
    }
    if fragments.len() < frames {
        return Err(cx.decode_err(format!("{} fragments for {frames} frames", fragments.len())));
    }
    let mut groups: Vec<Vec<&Vec<u8>>> = Vec::new();
    if bot.len() == frames {
        // Offsets count item headers (8 bytes each) from the first fragment's item.
        let mut offset = 0u64;
        let mut next = 1;
        for frag in fragments {
            if next < frames && offset >= bot[next] as u64 {
                next += 1;
                groups.push(Vec::new());
            }
            if groups.is_empty() {
                groups.push(Vec::new());
            }
            if let Some(g) = groups.last_mut() {
                g.push(frag);
            }
            offset += frag.len() as u64 + 8;
        }
    } else {
        let starts = |f: &[u8]| {
            if is_j2k(ts) {
                f.starts_with(&[0xFF, 0x4F, 0xFF, 0x51])
                    || f.starts_with(&[0, 0, 0, 0x0C, 0x6A, 0x50])
            } else {
                f.starts_with(&[0xFF, 0xD8])
            }
        };
        for frag in fragments {
            if groups.is_empty() || starts(frag) {
                groups.push(Vec::new());
            }
            if let Some(g) = groups.last_mut() {
                g.push(frag);
            }
        }
    }
    if groups.len() != frames {
        return Err(cx.decode_err(format!(
            "cannot split {} fragments into {frames} frames",
            fragments.len()
        )));
    }
    Ok(groups
        .into_iter()
        .map(|g| {
            if g.len() == 1 {
                Cow::Borrowed(&g[0][..])
            } else {
                Cow::Owned(g.into_iter().flatten().copied().collect())
            }
        })
        .collect())
}

fn inflate_frame(cx: &Ctx, data: &[u8], expected: usize, f: usize) -> Result<Vec<u8>, DicomError> {
    let mut out = Vec::with_capacity(expected);
    flate2::read::DeflateDecoder::new(data)
        .take(expected as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| cx.decode_err(format!("frame {f}: inflate: {e}")))?;
    if out.len() > expected {
        // Trailing pad byte only; anything more is a corrupt or hostile stream.
        if out.len() > expected + 1 {
            return Err(cx.decode_err(format!("frame {f}: inflated data is longer than the frame")));
        }
    }
    Ok(out)
}

/// Decode one JPEG 2000 frame with openjpeg and append its samples, after checking the
/// codestream's size against the header.
fn append_j2k_frame(
    cx: &Ctx,
    store: &mut PixelStore,
    data: &[u8],
    l: &Layout,
    f: usize,
) -> Result<(), DicomError> {
    let (w, h, comps) = j2k_size(data)
        .ok_or_else(|| cx.decode_err(format!("frame {f}: no JPEG 2000 SIZ marker")))?;
    if w as usize != l.cols || h as usize != l.rows || (comps as usize) < l.spp {
        return Err(cx.decode_err(format!(
            "frame {f}: codestream is {h}x{w} with {comps} components, header says {}x{} with {}",
            l.rows, l.cols, l.spp
        )));
    }
    let image =
        jpeg2k::Image::from_bytes(data).map_err(|e| cx.decode_err(format!("frame {f}: {e}")))?;
    let components = image.components();
    let npix = l.rows * l.cols;
    if components.len() < l.spp {
        return Err(cx.decode_err(format!(
            "frame {f}: {} components decoded",
            components.len()
        )));
    }
    for c in &components[..l.spp] {
        if c.width() as usize != l.cols || c.height() as usize != l.rows || c.data().len() != npix {
            return Err(cx.decode_err(format!(
                "frame {f}: component is {}x{}, expected {}x{} (subsampled components are not supported)",
                c.height(),
                c.width(),
                l.rows,
                l.cols
            )));
        }
    }
    // pydicom's convention: a signed DICOM image whose codestream says unsigned holds the two's
    // complement bit pattern of precision bits.
    let fix = |c: &jpeg2k::ImageComponent, v: i32| -> i64 {
        let prec = c.precision().clamp(1, 32);
        if l.signed && !c.is_signed() && prec < 32 && (v as i64) >= (1i64 << (prec - 1)) {
            v as i64 - (1i64 << prec)
        } else {
            v as i64
        }
    };
    let value = |i: usize| -> i64 {
        let c = &components[i % l.spp];
        fix(c, c.data()[i / l.spp])
    };
    let n = npix * l.spp;
    match store {
        PixelStore::U8(v) => v.extend((0..n).map(|i| value(i) as u8)),
        PixelStore::I8(v) => v.extend((0..n).map(|i| value(i) as i8)),
        PixelStore::U16(v) => v.extend((0..n).map(|i| value(i) as u16)),
        PixelStore::I16(v) => v.extend((0..n).map(|i| value(i) as i16)),
        PixelStore::U32(v) => v.extend((0..n).map(|i| value(i) as u32)),
        PixelStore::I32(v) => v.extend((0..n).map(|i| value(i) as i32)),
        PixelStore::F32(_) | PixelStore::F64(_) => {
            return Err(cx.unsupported_format("JPEG 2000 float data"));
        }
    }
    Ok(())
}

/// Start of the JPEG 2000 codestream (a JP2 file wraps it in boxes).
fn j2k_codestream(data: &[u8]) -> Option<&[u8]> {
    if data.starts_with(&[0xFF, 0x4F]) {
        return Some(data);
    }
    let pos = data
        .windows(4)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])?;
    Some(&data[pos..])
}

/// Image width, height and component count from the SIZ marker.
fn j2k_size(data: &[u8]) -> Option<(u32, u32, u16)> {
    let cs = j2k_codestream(data)?;
    let siz = cs.get(2..)?;
    if siz.get(0..2)? != [0xFF, 0x51] {
        return None;
    }
    let u32_at = |k: usize| -> Option<u32> {
        let b = siz.get(k..k + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let (xsiz, ysiz, xo, yo) = (u32_at(6)?, u32_at(10)?, u32_at(14)?, u32_at(18)?);
    let c = siz.get(38..40)?;
    Some((
        xsiz.checked_sub(xo)?,
        ysiz.checked_sub(yo)?,
        u16::from_be_bytes([c[0], c[1]]),
    ))
}

/// Whether the codestream uses the irreversible 9-7 wavelet (lossy).
fn j2k_irreversible(data: &[u8]) -> bool {
    let Some(cs) = j2k_codestream(data) else {
        return false;
    };
    let mut p = 2;
    while let Some(m) = cs.get(p..p + 4) {
        if m[0] != 0xFF {
            return false;
        }
        if m[1] == 0x52 {
            return cs.get(p + 13) == Some(&0);
        }
        if m[1] == 0x90 || m[1] == 0x93 {
            return false;
        }
        p += 2 + u16::from_be_bytes([m[2], m[3]]) as usize;
    }
    false
}

#[derive(Debug, Clone, Copy, Default)]
struct JpegHeader {
    width: u16,
    height: u16,
    components: u8,
    precision: u8,
    lossless: bool,
    jls_near: Option<u8>,
    jls_ilv: Option<u8>,
}

/// Walk JPEG / JPEG-LS markers up to the first scan: frame size, precision, and for JPEG-LS
/// the NEAR and interleave parameters.
fn jpeg_frame_header(data: &[u8]) -> Option<JpegHeader> {
    if data.get(0..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut h = JpegHeader::default();
    let mut have_sof = false;
    let mut p = 2;
    loop {
        let m = data.get(p..p + 4)?;
        if m[0] != 0xFF {
            return None;
        }
        if m[1] == 0xFF {
            p += 1;
            continue;
        }
        let len = u16::from_be_bytes([m[2], m[3]]) as usize;
        let seg = data.get(p + 4..p + 2 + len)?;
        match m[1] {
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF | 0xF7 => {
                h.precision = *seg.first()?;
                h.height = u16::from_be_bytes([*seg.get(1)?, *seg.get(2)?]);
                h.width = u16::from_be_bytes([*seg.get(3)?, *seg.get(4)?]);
                h.components = *seg.get(5)?;
                h.lossless = matches!(m[1], 0xC3 | 0xC7 | 0xCB | 0xCF | 0xF7);
                have_sof = true;
            }
            0xDA => {
                let ns = *seg.first()? as usize;
                h.jls_near = seg.get(1 + 2 * ns).copied();
                h.jls_ilv = seg.get(2 + 2 * ns).copied();
                return have_sof.then_some(h);
            }
            _ => {}
        }
        p += 2 + len;
    }
}

/// A single encoded frame presented to a dicom-rs codec, so that the codec never sees (or
/// sizes buffers from) more than the frame we checked.
struct OneFrame<'a> {
    ts: &'a str,
    layout: &'a Layout,
    photometric: &'a str,
    data: &'a [u8],
}

impl PixelDataObject for OneFrame<'_> {
    fn transfer_syntax_uid(&self) -> &str {
        self.ts
    }
    fn rows(&self) -> Option<u16> {
        u16::try_from(self.layout.rows).ok()
    }
    fn cols(&self) -> Option<u16> {
        u16::try_from(self.layout.cols).ok()
    }
    fn samples_per_pixel(&self) -> Option<u16> {
        Some(self.layout.spp as u16)
    }
    fn bits_allocated(&self) -> Option<u16> {
        Some(self.layout.ba)
    }
    fn bits_stored(&self) -> Option<u16> {
        Some(self.layout.bs)
    }
    fn photometric_interpretation(&self) -> Option<&str> {
        Some(self.photometric)
    }
    fn number_of_frames(&self) -> Option<u32> {
        Some(1)
    }
    fn number_of_fragments(&self) -> Option<u32> {
        Some(1)
    }
    fn fragment(&self, fragment: usize) -> Option<Cow<'_, [u8]>> {
        (fragment == 0).then_some(Cow::Borrowed(self.data))
    }
    fn offset_table(&self) -> Option<Cow<'_, [u32]>> {
        Some(Cow::Borrowed(&[]))
    }
    fn raw_pixel_data(&self) -> Option<RawPixelData> {
        Some(RawPixelData {
            fragments: vec![self.data.to_vec()].into(),
            offset_table: Default::default(),
        })
    }
}
