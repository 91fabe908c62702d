//! Malformed inputs give typed errors, never a panic, with bounded memory. Each bad file is made
//! in a tempdir from a good corpus file.

use std::path::{Path, PathBuf};

use adverse::dicom::{DecodeLimits, DecodedImage, DicomError, DicomFile, ErrorKind};
use dicom_core::value::{PixelFragmentSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;

fn decode(path: &Path, limits: &DecodeLimits) -> Result<DecodedImage, DicomError> {
    DicomFile::open(path, limits).and_then(|f| f.decode(limits))
}

fn corpus(name: &str) -> PathBuf {
    adverse_tests::pydicom_data().join(name)
}

fn expect_kind(path: &Path, limits: &DecodeLimits, kind: ErrorKind) -> DicomError {
    match decode(path, limits) {
        Ok(_) => panic!("{} decoded, expected {kind:?}", path.display()),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            assert!(
                e.to_string().contains(&path.display().to_string()),
                "error does not name the file: {e}"
            );
            e
        }
    }
}

/// Write `name` from the corpus after `edit`, into `dir`.
fn edited(dir: &Path, name: &str, edit: impl FnOnce(&mut DicomFile)) -> PathBuf {
    let mut f = DicomFile::open(&corpus(name), &DecodeLimits::default()).unwrap();
    edit(&mut f);
    let out = dir.join(format!("edited_{name}"));
    f.obj.write_to_file(&out).unwrap();
    out
}

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn empty_and_non_dicom_files() {
    let dir = tempfile::tempdir().unwrap();
    let limits = DecodeLimits::default();
    let empty = dir.path().join("empty.dcm");
    std::fs::write(&empty, b"").unwrap();
    expect_kind(&empty, &limits, ErrorKind::NotDicom);
    let text = dir.path().join("notes.dcm");
    std::fs::write(&text, "this is a text file, not an image\n".repeat(20)).unwrap();
    expect_kind(&text, &limits, ErrorKind::NotDicom);
    let missing = dir.path().join("missing.dcm");
    expect_kind(&missing, &limits, ErrorKind::Io);
}

#[test]
fn truncated_files_are_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let limits = DecodeLimits::default();
    for name in [
        "emri_small.dcm",
        "emri_small_RLE.dcm",
        "emri_small_big_endian.dcm",
        "OT-PAL-8-face.dcm",
    ] {
        let bytes = std::fs::read(corpus(name)).unwrap();
        for cut in [bytes.len() / 2, bytes.len() - 3, 140, 300] {
            let p = dir.path().join(format!("cut_{cut}_{name}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = decode(&p, &limits).expect_err(&format!("{name} cut at {cut}"));
            if cut > bytes.len() / 4 {
                // Inside the pixel data.
                assert_eq!(e.kind(), ErrorKind::Malformed, "{name} cut at {cut}: {e}");
            } else {
                // Inside the header: a cut between two elements leaves a valid data set
                // without pixel data.
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::Malformed | ErrorKind::NotDicom | ErrorKind::NoPixelData
                    ),
                    "{name} cut at {cut}: {e}"
                );
            }
        }
    }
}

#[test]
fn huge_declared_element_length_is_rejected_before_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(corpus("emri_small.dcm")).unwrap();
    // Find the Pixel Data header (explicit VR LE, OW) and claim ~4 GiB.
    let pos = bytes
        .windows(6)
        .position(|w| w == [0xE0, 0x7F, 0x10, 0x00, b'O', b'W'])
        .unwrap();
    bytes[pos + 8..pos + 12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let p = dir.path().join("huge_length.dcm");
    std::fs::write(&p, &bytes).unwrap();
    let before = peak_rss_kib();
    let e = expect_kind(&p, &DecodeLimits::default(), ErrorKind::Malformed);
    let grown_mib = (peak_rss_kib() - before) / 1024;
    assert!(grown_mib < 256, "peak RSS grew by {grown_mib} MiB: {e}");
}

#[test]
fn huge_rows_columns_frames_are_capped_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited(dir.path(), "emri_small.dcm", |f| {
        f.obj.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(65535u16),
        ));
        f.obj.put(DataElement::new(
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from(65535u16),
        ));
        f.obj.put_str(tags::NUMBER_OF_FRAMES, VR::IS, "2000000000");
    });
    let before = peak_rss_kib();
    expect_kind(&p, &DecodeLimits::default(), ErrorKind::DecodedTooLarge);
    assert!((peak_rss_kib() - before) / 1024 < 256);

    // The cap is configurable: the untouched file is over a 10 kB cap.
    let tight = DecodeLimits {
        max_decoded_bytes: 10_000,
        ..DecodeLimits::default()
    };
    expect_kind(
        &corpus("emri_small.dcm"),
        &tight,
        ErrorKind::DecodedTooLarge,
    );
    let tiny_file = DecodeLimits {
        max_file_bytes: 1000,
        ..DecodeLimits::default()
    };
    expect_kind(
        &corpus("emri_small.dcm"),
        &tiny_file,
        ErrorKind::FileTooLarge,
    );
}

#[test]
fn pixel_data_shorter_than_declared() {
    let dir = tempfile::tempdir().unwrap();
    let limits = DecodeLimits::default();
    // Native: more rows than the pixel data holds.
    let p = edited(dir.path(), "emri_small.dcm", |f| {
        f.obj.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(65u16),
        ));
    });
    let e = expect_kind(&p, &limits, ErrorKind::PixelDataTooShort);
    assert!(e.to_string().contains("81920"), "{e}");
    // 1-bit data: one more frame than stored.
    let p = edited(dir.path(), "liver.dcm", |f| {
        f.obj.put_str(tags::NUMBER_OF_FRAMES, VR::IS, "4");
    });
    expect_kind(&p, &limits, ErrorKind::PixelDataTooShort);
    // Encapsulated: the codestream is smaller than the header says.
    let p = edited(dir.path(), "emri_small_jpeg_2k_lossless.dcm", |f| {
        f.obj.put(DataElement::new(
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from(128u16),
        ));
    });
    let e = expect_kind(&p, &limits, ErrorKind::Decode);
    assert!(e.to_string().contains("1.2.840.10008.1.2.4.90"), "{e}");
    // More frames than fragments.
    let p = edited(dir.path(), "emri_small_RLE.dcm", |f| {
        f.obj.put_str(tags::NUMBER_OF_FRAMES, VR::IS, "11");
    });
    expect_kind(&p, &limits, ErrorKind::Decode);
}

#[test]
fn corrupt_codestreams_are_decode_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let limits = DecodeLimits::default();
    for name in [
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "JPEG-LL.dcm",
        "liver_deflate.dcm",
    ] {
        for mode in 0..3 {
            let p = edited(dir.path(), name, |f| {
                let e = f.obj.get(tags::PIXEL_DATA).unwrap();
                let Value::PixelSequence(seq) = e.value() else {
                    panic!("{name} is not encapsulated")
                };
                let frags: Vec<Vec<u8>> = seq
                    .fragments()
                    .iter()
                    .map(|fr| match mode {
                        // Keep headers, scramble the entropy-coded data.
                        0 => fr
                            .iter()
                            .enumerate()
                            .map(|(i, &b)| if i > 64 { b ^ 0x5A } else { b })
                            .collect(),
                        // Cut every fragment short.
                        1 => fr[..fr.len() / 3].to_vec(),
                        // Garbage.
                        _ => vec![0xFF; 10],
                    })
                    .collect();
                f.obj.put(DataElement::new(
                    tags::PIXEL_DATA,
                    VR::OB,
                    PixelFragmentSequence::new(vec![], frags),
                ));
            });
            // A scrambled entropy stream may still decode to (wrong) pixels; it must not panic.
            match decode(&p, &limits) {
                Ok(img) => assert_eq!(mode, 0, "{name} mode {mode} decoded: {:?}", img.meta.frames),
                Err(e) => assert!(
                    matches!(e.kind(), ErrorKind::Decode | ErrorKind::DecoderPanic),
                    "{name} mode {mode}: {e}"
                ),
            }
        }
    }
}
