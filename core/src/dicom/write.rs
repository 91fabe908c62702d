//! Derived-instance writer (PS3.3 C.7.6.1): the source data set with new pixel data, new
//! instance and series UIDs, Image Type DERIVED\SECONDARY, a derivation description and a
//! reference to the source image, written uncompressed in explicit VR little endian. UIDs are
//! derived deterministically from the source UID and the pipeline identity, so a re-run writes
//! the same UIDs (and the same bytes).

use std::io::Write;
use std::path::{Path, PathBuf};

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use sha2::{Digest, Sha256};

use super::error::DicomError;
use super::image::{DecodedImage, PixelKind, PixelStore};
use super::read::{DicomFile, EXPLICIT_VR_LE, error_chain};

/// What the caller says about the processing that produced the new pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedOptions {
    /// Identity of the processing (pipeline name, version, parameters hash...). Same identity and
    /// same source give the same UIDs.
    pub pipeline_id: String,
    /// Derivation Description (0008,2111), e.g. "adverse 0.1.0: fgsm eps=4 (stored units)".
    /// Truncated to the 1024 characters an ST holds.
    pub derivation_description: String,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedInfo {
    pub sop_instance_uid: String,
    pub series_uid: String,
    /// SHA-256 of the written file, hex.
    pub sha256: String,
    pub path: PathBuf,
}

/// A UID under the 2.25 root from the first 128 bits of SHA-256 over (`role`, `source`,
/// `pipeline`): at most 44 characters, stable across runs.
pub fn derived_uid(role: &str, source: &str, pipeline: &str) -> String {
    let mut h = Sha256::new();
    for part in [role, source, pipeline] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    format!("2.25.{}", u128::from_be_bytes(b))
}

/// The Implementation Class UID of files written by adverse.
pub fn implementation_class_uid() -> String {
    derived_uid("implementation", "adverse", "")
}

const IMPLEMENTATION_VERSION: &str = concat!("ADVERSE_", env!("CARGO_PKG_VERSION"));

/// Write `image` (the decoded, possibly modified, pixels of `src`) as a derived instance at
/// `out`, atomically and durably (fsync of the file and its folder before returning).
pub fn write_derived(
    src: &DicomFile,
    image: &DecodedImage,
    opts: &DerivedOptions,
    out: &Path,
) -> Result<DerivedInfo, DicomError> {
    write_derived_sync(src, image, opts, out, true)
}

/// [`write_derived`], with the fsyncs optional: without them the rename is still atomic for
/// other processes and survives a crash of this one, but not a power loss. Bulk runs whose
/// inputs stay available can trade that for throughput (`output.fsync: false`).
pub fn write_derived_sync(
    src: &DicomFile,
    image: &DecodedImage,
    opts: &DerivedOptions,
    out: &Path,
    durable: bool,
) -> Result<DerivedInfo, DicomError> {
    let err = |reason: String| DicomError::Write {
        path: out.to_path_buf(),
        reason,
    };
    let m = &image.meta;
    let expected = m.frame_samples() * m.frames as usize;
    if image.pixels.len() != expected {
        return Err(err(format!(
            "image holds {} samples, its description needs {expected}",
            image.pixels.len()
        )));
    }
    let src_sop = src
        .string(tags::SOP_INSTANCE_UID)
        .ok_or_else(|| err("source has no SOP Instance UID to derive from".into()))?;
    let src_class = src
        .string(tags::SOP_CLASS_UID)
        .or_else(|| Some(src.obj.meta().media_storage_sop_class_uid().to_string()))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err("source has no SOP Class UID".into()))?;
    let src_series = src
        .string(tags::SERIES_INSTANCE_UID)
        .unwrap_or_else(|| src_sop.clone());
    let sop_uid = derived_uid("sop-instance", &src_sop, &opts.pipeline_id);
    let series_uid = derived_uid("series", &src_series, &opts.pipeline_id);

    // The source data set without its pixel data (not cloned only to be dropped), then the
    // new pixel data, native.
    let pixel_tags = [
        tags::PIXEL_DATA,
        tags::FLOAT_PIXEL_DATA,
        tags::DOUBLE_FLOAT_PIXEL_DATA,
    ];
    let mut ds = InMemDicomObject::from_element_iter(
        src.obj
            .iter()
            .filter(|e| !pixel_tags.contains(&e.header().tag))
            .cloned(),
    );
    ds.put(pixel_element(image));
    ds.put_str(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        m.photometric.clone(),
    );
    if m.samples_per_pixel > 1 {
        ds.put(DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ));
    }
    if m.kind == PixelKind::Integer {
        let vr = if m.is_signed() { VR::SS } else { VR::US };
        if let Some((lo, hi)) = image.pixels.min_max() {
            for (tag, v) in [
                (tags::SMALLEST_IMAGE_PIXEL_VALUE, lo),
                (tags::LARGEST_IMAGE_PIXEL_VALUE, hi),
            ] {
                if ds.get(tag).is_some() && m.bits_allocated <= 16 {
                    let value = if m.is_signed() {
                        PrimitiveValue::from(v as i16)
                    } else {
                        PrimitiveValue::from(v as u16)
                    };
                    ds.put(DataElement::new(tag, vr, value));
                }
            }
        }
    }

    // Identity.
    ds.put_str(tags::SOP_INSTANCE_UID, VR::UI, sop_uid.clone());
    ds.put_str(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.clone());
    let mut image_type: Vec<String> = ds
        .get(tags::IMAGE_TYPE)
        .and_then(|e| e.to_multi_str().ok())
        .map(|v| v.iter().map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    if image_type.is_empty() {
        image_type = vec!["DERIVED".into(), "SECONDARY".into()];
    } else {
        image_type[0] = "DERIVED".into();
        if image_type.len() < 2 {
            image_type.push("SECONDARY".into());
        } else {
            image_type[1] = "SECONDARY".into();
        }
    }
    ds.put(DataElement::new(
        tags::IMAGE_TYPE,
        VR::CS,
        PrimitiveValue::Strs(image_type.into()),
    ));
    let description: String = opts.derivation_description.chars().take(1024).collect();
    ds.put_str(tags::DERIVATION_DESCRIPTION, VR::ST, description);
    let reference = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::REFERENCED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(src_class.clone()),
        ),
        DataElement::new(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(src_sop.clone()),
        ),
    ]);
    ds.put(DataElement::new(
        tags::SOURCE_IMAGE_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![reference]),
    ));

    // Lossy compression history is never erased.
    let already_lossy = src.string(tags::LOSSY_IMAGE_COMPRESSION).as_deref() == Some("01");
    if m.source_lossy && !already_lossy {
        ds.put_str(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "01");
        let mut ratios = multi(&ds, tags::LOSSY_IMAGE_COMPRESSION_RATIO);
        let mut methods = multi(&ds, tags::LOSSY_IMAGE_COMPRESSION_METHOD);
        if let Some(c) = m.compressed_bytes.filter(|&c| c > 0) {
            let raw =
                (m.frame_samples() * m.frames as usize) as f64 * m.bits_allocated as f64 / 8.0;
            ratios.push(format!("{:.4}", raw / c as f64));
        }
        if let Some(method) = lossy_method(&m.transfer_syntax_uid) {
            methods.push(method.to_string());
        }
        if !ratios.is_empty() {
            ds.put(DataElement::new(
                tags::LOSSY_IMAGE_COMPRESSION_RATIO,
                VR::DS,
                PrimitiveValue::Strs(ratios.into()),
            ));
        }
        if !methods.is_empty() {
            ds.put(DataElement::new(
                tags::LOSSY_IMAGE_COMPRESSION_METHOD,
                VR::CS,
                PrimitiveValue::Strs(methods.into()),
            ));
        }
    }

    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(EXPLICIT_VR_LE)
        .media_storage_sop_class_uid(src_class)
        .media_storage_sop_instance_uid(sop_uid.clone())
        .implementation_class_uid(implementation_class_uid())
        .implementation_version_name(IMPLEMENTATION_VERSION)
        .build()
        .map_err(|e| err(error_chain(&e)))?;
    let file = ds.with_exact_meta(meta);
    // The pixels and a generous allowance for the rest: one allocation, no regrowth copies.
    let mut bytes = Vec::with_capacity(
        image.pixels.len() * usize::from(m.bits_allocated).div_ceil(8) + 64 * 1024,
    );
    file.write_all(&mut bytes)
        .map_err(|e| err(error_chain(&e)))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    atomic_write(out, &bytes, durable).map_err(|e| err(e.to_string()))?;
    Ok(DerivedInfo {
        sop_instance_uid: sop_uid,
        series_uid,
        sha256,
        path: out.to_path_buf(),
    })
}

fn multi(ds: &InMemDicomObject, tag: Tag) -> Vec<String> {
    ds.get(tag)
        .and_then(|e| e.to_multi_str().ok())
        .map(|v| {
            v.iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn lossy_method(ts: &str) -> Option<&'static str> {
    Some(match ts {
        "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51" => "ISO_10918_1",
        "1.2.840.10008.1.2.4.81" => "ISO_14495_1",
        "1.2.840.10008.1.2.4.91" | "1.2.840.10008.1.2.4.93" => "ISO_15444_1",
        "1.2.840.10008.1.2.4.203" => "ISO_15444_15",
        _ => return None,
    })
}

/// The native pixel data element for `image`: values clamped to the BitsStored range, placed at
/// HighBit, 1-bit data packed LSB first across frame boundaries, padded to even length.
fn pixel_element(image: &DecodedImage) -> DataElement<InMemDicomObject> {
    let m = &image.meta;
    match &image.pixels {
        PixelStore::F32(v) => {
            return DataElement::new(
                tags::FLOAT_PIXEL_DATA,
                VR::OF,
                PrimitiveValue::F32(v.clone().into()),
            );
        }
        PixelStore::F64(v) => {
            return DataElement::new(
                tags::DOUBLE_FLOAT_PIXEL_DATA,
                VR::OD,
                PrimitiveValue::F64(v.clone().into()),
            );
        }
        _ => {}
    }
    let (lo, hi) = m.value_range();
    let shift = (m.high_bit + 1).saturating_sub(m.bits_stored) as u32;
    let mask: u64 = if m.bits_stored >= 64 {
        u64::MAX
    } else {
        (1u64 << m.bits_stored) - 1
    };
    let n = image.pixels.len();
    // The common case, 16-bit samples held as 16-bit integers: the same clamp, mask and shift
    // as `word` below, on the integers themselves.
    if m.bits_allocated == 16 && m.kind == PixelKind::Integer && shift < 16 {
        let (mask16, lo, hi) = (mask as u16, lo as i64, hi as i64);
        let put = |v: i64| ((v.clamp(lo, hi) as u16) & mask16) << shift;
        // Little-endian bytes, not 16-bit values: the encoder writes a byte value in one call
        // instead of one call per sample, and the file holds the same bytes.
        let le = |words: &mut dyn Iterator<Item = u16>| {
            let mut bytes = vec![0u8; 2 * n];
            for (d, w) in bytes.chunks_exact_mut(2).zip(words) {
                d.copy_from_slice(&w.to_le_bytes());
            }
            bytes
        };
        let bytes: Option<Vec<u8>> = match &image.pixels {
            PixelStore::U16(v) => Some(le(&mut v.iter().map(|&x| put(x as i64)))),
            PixelStore::I16(v) => Some(le(&mut v.iter().map(|&x| put(x as i64)))),
            _ => None,
        };
        if let Some(bytes) = bytes {
            return DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U8(bytes.into()));
        }
    }
    let word = |i: usize| -> u64 {
        let v = image.pixels.get_f64(i).unwrap_or(0.0).clamp(lo, hi) as i64;
        ((v as u64) & mask) << shift
    };
    match m.bits_allocated {
        1 => {
            let mut bytes = vec![0u8; n.div_ceil(8)];
            for i in 0..n {
                if word(i) & 1 == 1 {
                    bytes[i / 8] |= 1 << (i % 8);
                }
            }
            if bytes.len() % 2 == 1 {
                bytes.push(0);
            }
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bytes.into()))
        }
        8 => {
            let mut bytes: Vec<u8> = (0..n).map(|i| word(i) as u8).collect();
            if bytes.len() % 2 == 1 {
                bytes.push(0);
            }
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bytes.into()))
        }
        16 => {
            let words: Vec<u16> = (0..n).map(|i| word(i) as u16).collect();
            DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(words.into()))
        }
        _ => {
            let words: Vec<u16> = (0..n)
                .flat_map(|i| {
                    let w = word(i) as u32;
                    [w as u16, (w >> 16) as u16]
                })
                .collect();
            DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(words.into()))
        }
    }
}

/// Temp file in the target folder, fsync, rename, fsync the folder: a reader never sees a
/// partial file, and a crash leaves either the old file or the new one.
///
/// On Linux, a new output (none at `out` yet, the common case) is written as an unnamed file in
/// the folder (`O_TMPFILE`) and linked into place once complete: one operation under the
/// folder's lock instead of two (create, rename), which the parallel writers of a run contend
/// on, and a killed run leaves nothing behind. Where that is not possible (another file system,
/// an old kernel, no /proc, or an existing output to replace atomically) it is the temp file and
/// rename.
fn atomic_write(out: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    #[cfg(target_os = "linux")]
    if link_new(&dir, out, bytes, durable) {
        if durable {
            std::fs::File::open(&dir)?.sync_all()?;
        }
        return Ok(());
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".adverse-")
        .suffix(".tmp")
        .tempfile_in(&dir)?;
    tmp.write_all(bytes)?;
    // Temporary files are private (0600); a derived instance is an ordinary output file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    if durable {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(out).map_err(|e| e.error)?;
    if durable {
        std::fs::File::open(&dir)?.sync_all()?;
    }
    Ok(())
}

/// [`atomic_write`]'s unnamed-file path: true when `out` now holds `bytes` (the folder not yet
/// synced), false when nothing was linked and the caller must write another way.
#[cfg(target_os = "linux")]
fn link_new(dir: &Path, out: &Path, bytes: &[u8], durable: bool) -> bool {
    use rustix::fs::{AtFlags, CWD, Mode, OFlags, fchmod, linkat, openat};
    use std::os::fd::AsRawFd;
    let Ok(fd) = openat(
        CWD,
        dir,
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) else {
        return false;
    };
    let mut f = std::fs::File::from(fd);
    // As the temp file path: an ordinary output file (0644), whatever the umask.
    let written = f.write_all(bytes).is_ok()
        && fchmod(&f, Mode::from_raw_mode(0o644)).is_ok()
        && (!durable || f.sync_all().is_ok());
    // Linking through /proc needs no capability (AT_EMPTY_PATH would); it fails with EEXIST
    // when `out` exists, which only a rename replaces atomically.
    written
        && linkat(
            CWD,
            format!("/proc/self/fd/{}", f.as_raw_fd()).as_str(),
            CWD,
            out,
            AtFlags::SYMLINK_FOLLOW,
        )
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uids_are_deterministic_valid_and_distinct() {
        let a = derived_uid("sop-instance", "1.2.3.4", "pipe-a");
        assert_eq!(a, derived_uid("sop-instance", "1.2.3.4", "pipe-a"));
        assert_ne!(a, derived_uid("sop-instance", "1.2.3.4", "pipe-b"));
        assert_ne!(a, derived_uid("series", "1.2.3.4", "pipe-a"));
        assert!(a.starts_with("2.25.") && a.len() <= 64, "{a}");
        let digits = &a[5..];
        assert!(digits.chars().all(|c| c.is_ascii_digit()) && !digits.starts_with('0'));
    }

    #[cfg(unix)]
    #[test]
    fn atomic_write_creates_and_replaces_leaving_no_temp_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.dcm");
        atomic_write(&out, b"first", false).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"first");
        // An existing output is replaced (the rename path on Linux).
        atomic_write(&out, b"second", true).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"second");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.dcm"]);
    }
}
