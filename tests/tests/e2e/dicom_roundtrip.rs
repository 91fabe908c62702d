//! Derived-instance round trip: decode, perturb (+3 on every 7th stored value, clamped), write,
//! read back with pydicom. Pixels must equal the expected values exactly, the derived-image
//! attributes must be as PS3.3 C.7.6.1 asks, and every other attribute must equal the source's.

use std::path::PathBuf;

use adverse::dicom::{
    DecodeLimits, DecodedImage, DerivedOptions, DicomFile, derived_uid, write_derived,
};
use serde_json::Value;

/// Syntaxes and layouts covered: implicit / explicit / big endian, RLE, JPEG lossless,
/// JPEG-LS, JPEG 2000 (reversible with colour transform, irreversible), deflated frames, RGB
/// (interleaved, planar, 16- and 32-bit), multi-frame, signed CT, 1-bit, float.
const FILES: &[&str] = &[
    "gdcm-US-ALOKA-16.dcm",
    "emri_small.dcm",
    "emri_small_big_endian.dcm",
    "emri_small_RLE.dcm",
    "JPEG-LL.dcm",
    "JLSL_16_15_1_1F.dcm",
    "US1_J2KR.dcm",
    "MR2_J2KI.dcm",
    "liver_deflate.dcm",
    "liver_nonbyte_aligned.dcm",
    "SC_rgb.dcm",
    "color-pl.dcm",
    "SC_rgb_expb_16bit_2frame.dcm",
    "SC_rgb_32bit.dcm",
    "693_UNCR.dcm",
    "parametric_map_float.dcm",
    "OT-PAL-8-face.dcm",
];

const PIPELINE: &str = "roundtrip-test/v1";

/// Top-level attributes the writer must (or may, when decoding changed them) change.
const CHANGED: &[&str] = &[
    "00080018", // SOP Instance UID
    "0020000E", // Series Instance UID
    "00080008", // Image Type
    "00082111", // Derivation Description
    "00082112", // Source Image Sequence
    "00280004", // Photometric Interpretation
    "00280006", // Planar Configuration
    "00282110", // Lossy Image Compression
    "00282112", // Lossy Image Compression Ratio
    "00282114", // Lossy Image Compression Method
    "00280106", // Smallest Image Pixel Value (recomputed)
    "00280107", // Largest Image Pixel Value (recomputed)
];

fn perturb(img: &mut DecodedImage) -> Vec<f64> {
    for f in 0..img.frame_count() {
        let mut v = img.frame_f32(f).unwrap();
        let n = v.len();
        for (i, x) in v.iter_mut().enumerate() {
            if (f * n + i).is_multiple_of(7) {
                *x += 3.0;
            }
        }
        assert!(img.set_frame_f32(f, &v));
    }
    (0..img.pixels.len())
        .map(|i| img.pixels.get_f64(i).unwrap())
        .collect()
}

struct Case {
    name: &'static str,
    src: DicomFile,
    img: DecodedImage,
    expected: Vec<f64>,
    out: PathBuf,
}

#[test]
fn derived_instances_read_back_exactly_with_pydicom() {
    let limits = DecodeLimits::default();
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for name in FILES {
        let path = adverse_tests::pydicom_data().join(name);
        let src = DicomFile::open(&path, &limits).unwrap();
        let mut img = src.decode(&limits).unwrap();
        let expected = perturb(&mut img);
        let out = dir.path().join(format!("derived_{name}"));
        let opts = DerivedOptions {
            pipeline_id: PIPELINE.into(),
            derivation_description: format!("adverse test: +3 on every 7th value of {name}"),
        };
        let info = write_derived(&src, &img, &opts, &out).unwrap();
        let src_sop = img.meta.sop_instance_uid.clone().unwrap();
        assert_eq!(
            info.sop_instance_uid,
            derived_uid("sop-instance", &src_sop, PIPELINE)
        );
        // Deterministic: a second write gives the same bytes.
        let again = write_derived(&src, &img, &opts, &dir.path().join("again.dcm")).unwrap();
        assert_eq!(
            again.sha256, info.sha256,
            "{name}: non-deterministic output"
        );
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(
            hex_sha256(&bytes),
            info.sha256,
            "{name}: reported hash is not the file's"
        );
        cases.push(Case {
            name,
            src,
            img,
            expected,
            out,
        });
    }

    // Pixels, through pydicom.
    let pix = tempfile::tempdir().unwrap();
    let mut args = vec!["pixels".into(), pix.path().as_os_str().to_owned()];
    args.extend(cases.iter().map(|c| c.out.as_os_str().to_owned()));
    adverse_tests::run_oracle("pydicom_pixels.py", args);
    for (i, c) in cases.iter().enumerate() {
        let info: Value = serde_json::from_str(
            &std::fs::read_to_string(pix.path().join(format!("{i}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            info["ok"], true,
            "{}: pydicom cannot decode: {}",
            c.name, info["error"]
        );
        let raw = std::fs::read(pix.path().join(format!("{i}.bin"))).unwrap();
        let theirs = decode_raw(&raw, info["dtype"].as_str().unwrap());
        assert_eq!(theirs.len(), c.expected.len(), "{}", c.name);
        let bad = theirs.iter().zip(&c.expected).position(|(a, b)| a != b);
        assert!(
            bad.is_none(),
            "{}: sample {:?}: pydicom {} expected {}",
            c.name,
            bad,
            theirs[bad.unwrap()],
            c.expected[bad.unwrap()]
        );
    }

    // Attributes.
    let mut args: Vec<std::ffi::OsString> = vec!["elements".into()];
    for c in &cases {
        args.push(c.src.path.clone().into_os_string());
        args.push(c.out.clone().into_os_string());
    }
    let out = adverse_tests::run_oracle("pydicom_pixels.py", args);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2 * cases.len());
    for (k, c) in cases.iter().enumerate() {
        check_attributes(c, &lines[2 * k], &lines[2 * k + 1]);
    }
}

fn check_attributes(c: &Case, src: &Value, dst: &Value) {
    let n = c.name;
    let (s, d) = (&src["dataset"], &dst["dataset"]);
    let m = &c.img.meta;
    let src_sop = m.sop_instance_uid.clone().unwrap();
    let sop = derived_uid("sop-instance", &src_sop, PIPELINE);
    assert_eq!(d["00080018"], sop.as_str(), "{n}");
    assert_eq!(dst["meta"]["00020003"], sop.as_str(), "{n}");
    assert_eq!(dst["meta"]["00020010"], "1.2.840.10008.1.2.1", "{n}");
    // Without a source series, the source instance identifies the derived series.
    let series = m
        .series_instance_uid
        .clone()
        .unwrap_or_else(|| src_sop.clone());
    assert_eq!(
        d["0020000E"],
        derived_uid("series", &series, PIPELINE).as_str(),
        "{n}"
    );
    assert_ne!(d["0020000E"], s["0020000E"], "{n}");
    assert_eq!(d["0020000D"], s["0020000D"], "{n}: study UID kept");
    // Image Type: DERIVED\SECONDARY, other values kept.
    let it_src: Vec<Value> = match &s["00080008"] {
        Value::Array(v) => v.clone(),
        Value::String(x) => vec![Value::String(x.clone())],
        _ => vec![],
    };
    let it_dst = d["00080008"]
        .as_array()
        .unwrap_or_else(|| panic!("{n}: {}", d["00080008"]));
    assert_eq!(it_dst[0], "DERIVED", "{n}");
    assert_eq!(it_dst[1], "SECONDARY", "{n}");
    if it_src.len() > 2 {
        assert_eq!(&it_dst[2..], &it_src[2..], "{n}");
    }
    assert!(
        d["00082111"].as_str().unwrap().contains(n),
        "{n}: derivation description"
    );
    let item = &d["00082112"][0];
    assert_eq!(item["00081155"], src_sop.as_str(), "{n}");
    assert_eq!(item["00081150"], s["00080016"], "{n}");
    assert_eq!(d["00280004"], m.photometric.as_str(), "{n}");
    if m.samples_per_pixel > 1 {
        assert_eq!(d["00280006"], "0", "{n}");
    }
    // Lossy flags: never reset; a lossy source sets 01.
    if m.source_lossy {
        assert_eq!(d["00282110"], "01", "{n}");
    } else if s.get("00282110").is_some() {
        assert_eq!(d["00282110"], s["00282110"], "{n}");
    }
    if s["00282110"] == "01" {
        assert_eq!(d["00282112"], s["00282112"], "{n}: ratio kept");
        assert_eq!(d["00282114"], s["00282114"], "{n}: method kept");
    }
    // Everything else identical.
    let (so, dobj) = (s.as_object().unwrap(), d.as_object().unwrap());
    for (tag, v) in so {
        if CHANGED.contains(&tag.as_str()) {
            continue;
        }
        assert_eq!(dobj.get(tag), Some(v), "{n}: attribute {tag} changed");
    }
    for tag in dobj.keys() {
        assert!(
            so.contains_key(tag) || CHANGED.contains(&tag.as_str()),
            "{n}: attribute {tag} added"
        );
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write;
            ch.stdin.take().unwrap().write_all(bytes)?;
            ch.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn decode_raw(raw: &[u8], dtype: &str) -> Vec<f64> {
    macro_rules! conv {
        ($t:ty) => {
            raw.chunks_exact(std::mem::size_of::<$t>())
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect()
        };
    }
    match dtype {
        "|u1" => raw.iter().map(|&b| b as f64).collect(),
        "|i1" => raw.iter().map(|&b| b as i8 as f64).collect(),
        "<u2" => conv!(u16),
        "<i2" => conv!(i16),
        "<u4" => conv!(u32),
        "<i4" => conv!(i32),
        "<f4" => conv!(f32),
        "<f8" => conv!(f64),
        other => panic!("unexpected dtype {other}"),
    }
}

/// Uncompressed YBR_FULL_422 (made from the corpus YBR_FULL image by keeping the chroma of
/// every even pixel): decoded to full YBR_FULL, equal to pydicom's reading, written back as
/// YBR_FULL.
#[test]
fn uncompressed_ybr_full_422_is_upsampled() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let limits = DecodeLimits::default();
    let src_path = adverse_tests::pydicom_data().join("SC_ybr_full_uncompressed.dcm");
    let mut src = DicomFile::open(&src_path, &limits).unwrap();
    let full = src.decode(&limits).unwrap();
    let adverse::dicom::PixelStore::U8(ybr) = &full.pixels else {
        panic!("8-bit expected")
    };
    let (rows, cols) = (full.meta.rows as usize, full.meta.cols as usize);
    let mut packed = Vec::new();
    let mut expected = Vec::new();
    for r in 0..rows {
        for c in (0..cols).step_by(2) {
            let p = (r * cols + c) * 3;
            let (y1, y2, cb, cr) = (ybr[p], ybr[p + 3], ybr[p + 1], ybr[p + 2]);
            packed.extend([y1, y2, cb, cr]);
            expected.extend([y1, cb, cr, y2, cb, cr]);
        }
    }
    src.obj
        .put_str(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "YBR_FULL_422");
    src.obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(packed.into()),
    ));
    let dir = tempfile::tempdir().unwrap();
    let p422 = dir.path().join("ybr422.dcm");
    src.obj.write_to_file(&p422).unwrap();

    let f = DicomFile::open(&p422, &limits).unwrap();
    let img = f.decode(&limits).unwrap();
    assert_eq!(img.meta.photometric, "YBR_FULL");
    assert_eq!(img.meta.source_photometric, "YBR_FULL_422");
    assert_eq!(img.pixels, adverse::dicom::PixelStore::U8(expected.clone()));

    let out = dir.path().join("derived.dcm");
    let opts = DerivedOptions {
        pipeline_id: PIPELINE.into(),
        derivation_description: "ybr422".into(),
    };
    write_derived(&f, &img, &opts, &out).unwrap();
    let pix = tempfile::tempdir().unwrap();
    adverse_tests::run_oracle(
        "pydicom_pixels.py",
        [
            "pixels".as_ref(),
            pix.path().as_os_str(),
            p422.as_os_str(),
            out.as_os_str(),
        ],
    );
    for i in 0..2 {
        let info: Value = serde_json::from_str(
            &std::fs::read_to_string(pix.path().join(format!("{i}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(info["ok"], true, "{info}");
        let raw = std::fs::read(pix.path().join(format!("{i}.bin"))).unwrap();
        assert_eq!(raw, expected, "file {i}");
    }
}
