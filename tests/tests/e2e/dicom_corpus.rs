//! Every file of the pydicom-data corpus: the exact decode outcome, and the stored values against
//! pydicom's `pixel_array` (scripts/oracle/pydicom_pixels.py).
//!
//! Colour convention: both sides give stored values without colour conversion (pydicom with
//! `as_rgb=False`); where a codec converts by itself (JPEG 2000 with MCT: YBR_ICT/YBR_RCT come
//! out as RGB) both sides see the codec's output.

use std::collections::BTreeMap;
use std::path::Path;

use adverse::dicom::{DecodeLimits, DecodedImage, DicomFile, ErrorKind};

/// (file, Ok((frames, rows, cols, samples per pixel, bits allocated)) or the error kind).
type Expected = (&'static str, Result<(u32, u32, u32, u16, u16), ErrorKind>);

const EXPECTED: &[Expected] = &[
    ("693_J2KR.dcm", Ok((1, 512, 512, 1, 16))),
    ("693_UNCI.dcm", Ok((1, 512, 512, 1, 16))),
    ("693_UNCR.dcm", Ok((1, 512, 512, 1, 16))),
    ("HTJ2KLossless_08_RGB.dcm", Ok((1, 480, 640, 3, 8))),
    ("HTJ2K_08_RGB.dcm", Ok((1, 480, 640, 3, 8))),
    ("JLSL_08_07_0_1F.dcm", Ok((1, 128, 128, 1, 8))),
    ("JLSL_16_15_1_1F.dcm", Ok((1, 128, 128, 1, 16))),
    ("JLSL_RGB_ILV0.dcm", Ok((1, 256, 256, 3, 8))),
    ("JLSL_RGB_ILV1.dcm", Ok((1, 256, 256, 3, 8))),
    ("JLSL_RGB_ILV2.dcm", Ok((1, 256, 256, 3, 8))),
    ("JLSN_RGB_ILV0.dcm", Ok((1, 256, 256, 3, 8))),
    ("JPEG-LL.dcm", Ok((1, 1024, 256, 1, 16))),
    ("JPEG2000_UNC.dcm", Ok((1, 1024, 256, 1, 16))),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", Ok((1, 768, 1024, 1, 8))),
    (
        "MR-SIEMENS-DICOM-WithOverlays.dcm",
        Ok((1, 484, 484, 1, 16)),
    ),
    ("MR2_J2KI.dcm", Ok((1, 1024, 1024, 1, 16))),
    ("MR2_J2KR.dcm", Ok((1, 1024, 1024, 1, 16))),
    ("MR2_UNCI.dcm", Ok((1, 1024, 1024, 1, 16))),
    ("MR2_UNCR.dcm", Ok((1, 1024, 1024, 1, 16))),
    ("OBXXXX1A.dcm", Ok((1, 600, 800, 1, 8))),
    ("OBXXXX1A_2frame.dcm", Ok((2, 600, 800, 1, 8))),
    ("OBXXXX1A_expb.dcm", Ok((1, 600, 800, 1, 8))),
    ("OBXXXX1A_expb_2frame.dcm", Ok((2, 600, 800, 1, 8))),
    ("OBXXXX1A_rle.dcm", Ok((1, 600, 800, 1, 8))),
    ("OBXXXX1A_rle_2frame.dcm", Ok((2, 600, 800, 1, 8))),
    ("OT-PAL-8-face.dcm", Ok((1, 480, 640, 1, 8))),
    ("RG1_J2KI.dcm", Ok((1, 1955, 1841, 1, 16))),
    ("RG3_J2KI.dcm", Ok((1, 1760, 1760, 1, 16))),
    ("RG3_J2KR.dcm", Ok((1, 1760, 1760, 1, 16))),
    ("SC_rgb.dcm", Ok((1, 100, 100, 3, 8))),
    ("SC_rgb_16bit.dcm", Ok((1, 100, 100, 3, 16))),
    ("SC_rgb_16bit_2frame.dcm", Ok((2, 100, 100, 3, 16))),
    ("SC_rgb_2frame.dcm", Ok((2, 100, 100, 3, 8))),
    ("SC_rgb_32bit.dcm", Ok((1, 100, 100, 3, 32))),
    ("SC_rgb_32bit_2frame.dcm", Ok((2, 100, 100, 3, 32))),
    ("SC_rgb_dcmtk_ebcr_dcmd.dcm", Ok((1, 100, 100, 3, 8))),
    ("SC_rgb_dcmtk_ebcyn1_dcmd.dcm", Ok((1, 100, 100, 3, 8))),
    ("SC_rgb_dcmtk_ebcyn2_dcmd.dcm", Ok((1, 100, 100, 3, 8))),
    ("SC_rgb_dcmtk_ebcynp_dcmd.dcm", Ok((1, 100, 100, 3, 8))),
    ("SC_rgb_dcmtk_ebcys2_dcmd.dcm", Ok((1, 100, 100, 3, 8))),
    ("SC_rgb_dcmtk_ebcys4_dcmd.dcm", Ok((1, 100, 100, 3, 8))),
    ("SC_rgb_expb.dcm", Ok((1, 100, 100, 3, 8))),
    ("SC_rgb_expb_16bit.dcm", Ok((1, 100, 100, 3, 16))),
    ("SC_rgb_expb_16bit_2frame.dcm", Ok((2, 100, 100, 3, 16))),
    ("SC_rgb_expb_2frame.dcm", Ok((2, 100, 100, 3, 8))),
    ("SC_rgb_expb_32bit.dcm", Ok((1, 100, 100, 3, 32))),
    ("SC_rgb_expb_32bit_2frame.dcm", Ok((2, 100, 100, 3, 32))),
    ("SC_rgb_gdcm2k_uncompressed.dcm", Ok((1, 100, 100, 3, 8))),
    ("SC_ybr_full_uncompressed.dcm", Ok((1, 100, 100, 3, 8))),
    ("US1_J2KI.dcm", Ok((1, 480, 640, 3, 8))),
    ("US1_J2KR.dcm", Ok((1, 480, 640, 3, 8))),
    ("US1_UNCI.dcm", Ok((1, 480, 640, 3, 8))),
    ("US1_UNCR.dcm", Ok((1, 480, 640, 3, 8))),
    ("bad_sequence.dcm", Ok((1, 512, 512, 1, 16))),
    ("color-pl.dcm", Ok((1, 120, 256, 3, 8))),
    ("color-px.dcm", Ok((1, 120, 256, 3, 8))),
    ("eCT_Supplemental.dcm", Ok((2, 512, 512, 1, 16))),
    ("emri_small.dcm", Ok((10, 64, 64, 1, 16))),
    ("emri_small_RLE.dcm", Ok((10, 64, 64, 1, 16))),
    ("emri_small_big_endian.dcm", Ok((10, 64, 64, 1, 16))),
    ("emri_small_jpeg_2k_lossless.dcm", Ok((10, 64, 64, 1, 16))),
    // Only the final sequence delimiter is missing: every frame is there.
    (
        "emri_small_jpeg_2k_lossless_too_short.dcm",
        Ok((10, 64, 64, 1, 16)),
    ),
    ("emri_small_jpeg_ls_lossless.dcm", Ok((10, 64, 64, 1, 16))),
    ("explicit_VR-UN.dcm", Ok((1, 512, 512, 1, 16))),
    ("gdcm-US-ALOKA-16.dcm", Ok((1, 480, 640, 1, 16))),
    ("gdcm-US-ALOKA-16_big.dcm", Ok((1, 480, 640, 1, 16))),
    ("liver.dcm", Ok((3, 512, 512, 1, 1))),
    ("liver_deflate.dcm", Ok((3, 512, 512, 1, 1))),
    ("liver_expb.dcm", Ok((3, 512, 512, 1, 1))),
    ("liver_j2k.dcm", Ok((3, 512, 512, 1, 1))),
    ("liver_nonbyte_aligned.dcm", Ok((3, 510, 510, 1, 1))),
    ("liver_nonbyte_aligned_deflate.dcm", Ok((3, 510, 510, 1, 1))),
    ("liver_nonbyte_aligned_j2k.dcm", Ok((3, 510, 510, 1, 1))),
    ("liver_nonbyte_aligned_rle.dcm", Ok((3, 510, 510, 1, 1))),
    ("liver_rle.dcm", Ok((3, 512, 512, 1, 1))),
    ("mlut_18.dcm", Ok((1, 512, 512, 1, 16))),
    ("parametric_map_double_float.dcm", Ok((1, 128, 128, 1, 64))),
    ("parametric_map_float.dcm", Ok((1, 128, 128, 1, 32))),
    ("vlut_04.dcm", Ok((1, 512, 512, 1, 8))),
];

/// Files whose pixel data went through lossy compression: compared within 1 grey level.
const LOSSY: &[&str] = &[
    "JLSN_RGB_ILV0.dcm",
    "HTJ2K_08_RGB.dcm",
    "MR2_J2KI.dcm",
    "RG1_J2KI.dcm",
    "RG3_J2KI.dcm",
    "US1_J2KI.dcm",
];

/// Files in native or lossless syntaxes whose Lossy Image Compression says "01" (decompressed
/// from a lossy original): the lossy flag must survive.
const LOSSY_BY_ATTRIBUTE: &[&str] = &[
    "693_UNCI.dcm",
    "JPEG2000_UNC.dcm",
    "MR2_UNCI.dcm",
    "SC_rgb_dcmtk_ebcr_dcmd.dcm",
    "SC_rgb_dcmtk_ebcyn1_dcmd.dcm",
    "SC_rgb_dcmtk_ebcyn2_dcmd.dcm",
    "SC_rgb_dcmtk_ebcynp_dcmd.dcm",
    "SC_rgb_dcmtk_ebcys2_dcmd.dcm",
    "SC_rgb_dcmtk_ebcys4_dcmd.dcm",
    "SC_rgb_gdcm2k_uncompressed.dcm",
    "SC_ybr_full_uncompressed.dcm",
    "US1_UNCI.dcm",
];

/// Files pydicom cannot decode, and the file with the same image that it can.
const TWINS: &[(&str, &str)] = &[
    ("liver_deflate.dcm", "liver.dcm"),
    ("liver_rle.dcm", "liver.dcm"),
    (
        "liver_nonbyte_aligned_deflate.dcm",
        "liver_nonbyte_aligned.dcm",
    ),
    ("liver_nonbyte_aligned_rle.dcm", "liver_nonbyte_aligned.dcm"),
    (
        "emri_small_jpeg_2k_lossless_too_short.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
    ),
];

fn decode(path: &Path) -> Result<DecodedImage, adverse::dicom::DicomError> {
    let limits = DecodeLimits::default();
    DicomFile::open(path, &limits).and_then(|f| f.decode(&limits))
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn values(img: &DecodedImage) -> Vec<f64> {
    (0..img.pixels.len())
        .map(|i| img.pixels.get_f64(i).unwrap())
        .collect()
}

#[test]
fn every_corpus_file_has_its_expected_outcome() {
    let files = adverse_tests::pydicom_files();
    let table: BTreeMap<&str, _> = EXPECTED.iter().map(|(f, r)| (*f, *r)).collect();
    assert_eq!(
        files.len(),
        EXPECTED.len(),
        "corpus and table differ in size"
    );
    let mut failures = Vec::new();
    for p in &files {
        let n = name(p);
        let expected = table
            .get(n.as_str())
            .unwrap_or_else(|| panic!("{n} is not in the table"));
        let got = decode(p).map(|img| {
            assert_eq!(
                img.pixels.len(),
                img.meta.frame_samples() * img.meta.frames as usize,
                "{n}"
            );
            let m = &img.meta;
            (
                m.frames,
                m.rows,
                m.cols,
                m.samples_per_pixel,
                m.bits_allocated,
            )
        });
        let got = got.map_err(|e| e.kind());
        if &got != expected {
            failures.push(format!("{n}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn stored_values_match_pydicom() {
    let files = adverse_tests::pydicom_files();
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["pixels".into(), dir.path().as_os_str().to_owned()];
    args.extend(files.iter().map(|p| p.as_os_str().to_owned()));
    adverse_tests::run_oracle("pydicom_pixels.py", args);

    let mut compared = 0;
    let mut failures = Vec::new();
    for (i, p) in files.iter().enumerate() {
        let n = name(p);
        let info: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("{i}.json"))).unwrap(),
        )
        .unwrap();
        let ours = decode(p);
        if info["ok"] != true {
            assert!(
                TWINS.iter().any(|(f, _)| *f == n),
                "pydicom failed on {n} ({}), which is not a known twin case",
                info["error"]
            );
            continue;
        }
        let img = ours.unwrap_or_else(|e| panic!("{n}: pydicom decodes it, we fail: {e}"));
        let raw = std::fs::read(dir.path().join(format!("{i}.bin"))).unwrap();
        let theirs = oracle_values(&raw, info["dtype"].as_str().unwrap());
        let ours = values(&img);
        let shape: Vec<u64> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        if shape.iter().product::<u64>() as usize != ours.len() || theirs.len() != ours.len() {
            failures.push(format!(
                "{n}: pydicom shape {shape:?}, we have {} samples",
                ours.len()
            ));
            continue;
        }
        let tol = if LOSSY.contains(&n.as_str()) {
            1.0
        } else {
            0.0
        };
        assert_eq!(
            img.meta.source_lossy,
            LOSSY.contains(&n.as_str()) || LOSSY_BY_ATTRIBUTE.contains(&n.as_str()),
            "{n}: lossy detection"
        );
        let bad = ours
            .iter()
            .zip(&theirs)
            .position(|(a, b)| (a - b).abs() > tol && !(a.is_nan() && b.is_nan()));
        if let Some(k) = bad {
            failures.push(format!(
                "{n}: sample {k}: ours {} pydicom {}",
                ours[k], theirs[k]
            ));
        }
        compared += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(compared, files.len() - TWINS.len());
}

/// Files pydicom cannot decode decode to the same values as their twin in another syntax.
#[test]
fn undecodable_by_pydicom_files_equal_their_twins() {
    let dir = adverse_tests::pydicom_data();
    for (f, twin) in TWINS {
        let a = decode(&dir.join(f)).unwrap_or_else(|e| panic!("{e}"));
        let b = decode(&dir.join(twin)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.pixels, b.pixels, "{f} vs {twin}");
        assert_eq!(a.meta.frames, b.meta.frames);
    }
}

fn oracle_values(raw: &[u8], dtype: &str) -> Vec<f64> {
    macro_rules! conv {
        ($t:ty) => {
            raw.chunks_exact(std::mem::size_of::<$t>())
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect()
        };
    }
    match dtype {
        "|u1" | "<u1" => raw.iter().map(|&b| b as f64).collect(),
        "|i1" | "<i1" => raw.iter().map(|&b| b as i8 as f64).collect(),
        "<u2" => conv!(u16),
        "<i2" => conv!(i16),
        "<u4" => conv!(u32),
        "<i4" => conv!(i32),
        "<f4" => conv!(f32),
        "<f8" => conv!(f64),
        other => panic!("unexpected dtype {other}"),
    }
}
