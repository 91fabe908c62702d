//! Demo DICOM inputs: images of an npz split written as Secondary Capture instances
//! (MONOCHROME2, 8-bit unsigned, explicit VR little endian) with deterministic UIDs under 2.25
//! and a placeholder identity, plus `labels.csv` (file, SOPInstanceUID, label). Same inputs give
//! byte-identical files, so the shipped samples can be checked against a regeneration.

use std::path::{Path, PathBuf};

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use super::data::{self, DataError};
use crate::dicom::derived_uid;

/// Secondary Capture Image Storage.
pub const SC_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.7";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{path}: samples must be 1-channel images, this split is {chw:?}")]
    Channels { path: String, chw: [usize; 3] },
    #[error("building {path}: {msg}")]
    Dicom { path: String, msg: String },
    #[error("cannot write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One written sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub file: String,
    pub sop_instance_uid: String,
    pub label: u32,
}

fn put_str(ds: &mut InMemDicomObject, tag: Tag, vr: VR, v: &str) {
    ds.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
}
fn put_u16(ds: &mut InMemDicomObject, tag: Tag, v: u16) {
    ds.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
}

/// Write the first `count` images of `split` of the npz at `npz` into `out_dir` as
/// `pneumoniamnist-<split>-NNNN.dcm` plus `labels.csv`; `classes` names labels in comments.
pub fn write_samples(
    npz: &Path,
    split: &str,
    count: usize,
    classes: &[&str],
    out_dir: &Path,
) -> Result<Vec<Sample>, SampleError> {
    let ds = data::load_npz(npz, split)?.truncate(count);
    let [c, h, w] = ds.chw;
    if c != 1 {
        return Err(SampleError::Channels {
            path: npz.display().to_string(),
            chw: ds.chw,
        });
    }
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| SampleError::Io { path, source }
    };
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let tag = "adverse demo samples: PneumoniaMNIST";
    let study = derived_uid("study", &format!("pneumoniamnist/{split}"), tag);
    let series = derived_uid("series", &format!("pneumoniamnist/{split}"), tag);
    let mut out = Vec::new();
    let mut csv = String::from("file,SOPInstanceUID,label\n");
    for i in 0..ds.len() {
        let name = format!("pneumoniamnist-{split}-{i:04}.dcm");
        let path: PathBuf = out_dir.join(&name);
        let sop = derived_uid("instance", &format!("pneumoniamnist/{split}/{i}"), tag);
        let label = ds.labels[i];
        let px: Vec<u8> = ds.images[i * h * w..(i + 1) * h * w]
            .iter()
            .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        let mut o = InMemDicomObject::new_empty();
        put_str(&mut o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100");
        o.put(DataElement::new(
            tags::IMAGE_TYPE,
            VR::CS,
            PrimitiveValue::Strs(["DERIVED".to_string(), "SECONDARY".to_string()].into()),
        ));
        put_str(&mut o, tags::SOP_CLASS_UID, VR::UI, SC_IMAGE_STORAGE);
        put_str(&mut o, tags::SOP_INSTANCE_UID, VR::UI, &sop);
        put_str(&mut o, tags::STUDY_DATE, VR::DA, "");
        put_str(&mut o, tags::STUDY_TIME, VR::TM, "");
        put_str(&mut o, tags::ACCESSION_NUMBER, VR::SH, "");
        put_str(&mut o, tags::MODALITY, VR::CS, "OT");
        put_str(&mut o, tags::CONVERSION_TYPE, VR::CS, "WSD");
        put_str(&mut o, tags::REFERRING_PHYSICIAN_NAME, VR::PN, "");
        put_str(
            &mut o,
            tags::SERIES_DESCRIPTION,
            VR::LO,
            &format!("PneumoniaMNIST {split} split (demo)"),
        );
        put_str(&mut o, tags::PATIENT_NAME, VR::PN, "ANONYMOUS^DEMO");
        put_str(
            &mut o,
            tags::PATIENT_ID,
            VR::LO,
            &format!("DEMO-{:04}", i + 1),
        );
        put_str(&mut o, tags::PATIENT_BIRTH_DATE, VR::DA, "");
        put_str(&mut o, tags::PATIENT_SEX, VR::CS, "");
        put_str(&mut o, tags::PATIENT_IDENTITY_REMOVED, VR::CS, "YES");
        put_str(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, &study);
        put_str(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, &series);
        put_str(&mut o, tags::STUDY_ID, VR::SH, "");
        put_str(&mut o, tags::SERIES_NUMBER, VR::IS, "1");
        put_str(&mut o, tags::INSTANCE_NUMBER, VR::IS, &(i + 1).to_string());
        put_str(&mut o, tags::PATIENT_ORIENTATION, VR::CS, "");
        let cls = classes.get(label as usize).copied().unwrap_or("?");
        put_str(
            &mut o,
            tags::IMAGE_COMMENTS,
            VR::LT,
            &format!(
                "PneumoniaMNIST (MedMNIST v2, CC BY 4.0) {split} image {i}, label {label} ({cls})"
            ),
        );
        put_u16(&mut o, tags::SAMPLES_PER_PIXEL, 1);
        put_str(
            &mut o,
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "MONOCHROME2",
        );
        put_u16(&mut o, tags::ROWS, h as u16);
        put_u16(&mut o, tags::COLUMNS, w as u16);
        put_u16(&mut o, tags::BITS_ALLOCATED, 8);
        put_u16(&mut o, tags::BITS_STORED, 8);
        put_u16(&mut o, tags::HIGH_BIT, 7);
        put_u16(&mut o, tags::PIXEL_REPRESENTATION, 0);
        o.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::U8(px.into()),
        ));
        let derr = |msg: String| SampleError::Dicom {
            path: path.display().to_string(),
            msg,
        };
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax(EXPLICIT_VR_LE)
            .media_storage_sop_class_uid(SC_IMAGE_STORAGE)
            .media_storage_sop_instance_uid(sop.clone())
            .implementation_class_uid(derived_uid("implementation", "adverse", ""))
            .implementation_version_name("ADVERSE_DEMO")
            .build()
            .map_err(|e| derr(e.to_string()))?;
        let mut bytes = Vec::new();
        o.with_exact_meta(meta)
            .write_all(&mut bytes)
            .map_err(|e| derr(e.to_string()))?;
        std::fs::write(&path, &bytes).map_err(io(&path))?;
        csv.push_str(&format!("{name},{sop},{label}\n"));
        out.push(Sample {
            file: name,
            sop_instance_uid: sop,
            label,
        });
    }
    let cp = out_dir.join("labels.csv");
    std::fs::write(&cp, csv).map_err(io(&cp))?;
    Ok(out)
}
