//! Opening a DICOM file within memory limits, including files without a preamble, without the
//! "DICM" magic, or without any file meta group (old ACR-NEMA style data sets).

use std::io::Read;
use std::path::{Path, PathBuf};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::error::DicomError;
use super::image::DecodedImage;
use super::scan::{self, Encoding};

/// Caps that keep a hostile or broken header from sizing an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest file accepted, in bytes (the whole file is read into memory).
    pub max_file_bytes: u64,
    /// Largest decoded pixel buffer, in bytes, summed over all frames.
    pub max_decoded_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_file_bytes: 2 << 30,
            max_decoded_bytes: 1 << 31,
        }
    }
}

pub(crate) const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub(crate) const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

/// A parsed DICOM file and where it came from.
#[derive(Debug, Clone)]
pub struct DicomFile {
    pub path: PathBuf,
    pub obj: DefaultDicomObject,
    pub file_size: u64,
    /// False when the file had no file meta group and one was synthesized (implicit VR little
    /// endian, the DICOM default, or explicit VR if the data set showed VR letters).
    pub had_file_meta: bool,
}

impl DicomFile {
    /// Read and parse `path`, refusing files over `limits.max_file_bytes`.
    pub fn open(path: &Path, limits: &DecodeLimits) -> Result<Self, DicomError> {
        let io_err = |source| DicomError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_err)?;
        let size = file.metadata().map_err(io_err)?.len();
        if size > limits.max_file_bytes {
            return Err(DicomError::FileTooLarge {
                path: path.to_path_buf(),
                size,
                limit: limits.max_file_bytes,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        // take(): the file may grow between metadata() and read.
        file.take(limits.max_file_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        if bytes.len() as u64 > limits.max_file_bytes {
            return Err(DicomError::FileTooLarge {
                path: path.to_path_buf(),
                size: bytes.len() as u64,
                limit: limits.max_file_bytes,
            });
        }
        Self::from_bytes(path, &bytes)
    }

    /// Parse an in-memory file; `path` is only used in messages.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, DicomError> {
        let not_dicom = |reason: &str| DicomError::NotDicom {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let malformed = |reason: String| DicomError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.is_empty() {
            return Err(not_dicom("empty file"));
        }
        let with_magic: Option<&[u8]> = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
            Some(&bytes[132..])
        } else if bytes.len() >= 4 && &bytes[0..4] == b"DICM" {
            Some(&bytes[4..])
        } else {
            None
        };
        let after_magic = match with_magic {
            Some(rest) => rest,
            // A file meta group without preamble and magic (some old writers): dicom-rs wants
            // the magic and a complete group, so read the group's transfer syntax and parse the
            // data set after it directly.
            None if bytes.len() >= 8 && bytes[0..2] == [0x02, 0x00] => {
                let (ts, end) = meta_transfer_syntax(bytes).ok_or_else(|| {
                    malformed("file meta group has no readable Transfer Syntax UID".into())
                })?;
                return Self::from_dataset(path, &bytes[end..], &ts, bytes.len() as u64, true);
            }
            None => return Self::from_raw_dataset(path, bytes),
        };
        let (ts, _) = meta_transfer_syntax(after_magic).ok_or_else(|| {
            malformed("file meta group has no readable Transfer Syntax UID".into())
        })?;
        if ts != DEFLATED_EXPLICIT_VR_LE {
            scan::check(after_magic, encoding_of(&ts)).map_err(malformed)?;
        }
        let source = std::io::Read::chain(&b"DICM"[..], after_magic);
        let obj = OpenFileOptions::new()
            .read_preamble(ReadPreamble::Never)
            .from_reader(source)
            .map_err(|e| malformed(error_chain(&e)))?;
        Ok(DicomFile {
            path: path.to_path_buf(),
            obj,
            file_size: bytes.len() as u64,
            had_file_meta: true,
        })
    }

    fn from_raw_dataset(path: &Path, bytes: &[u8]) -> Result<Self, DicomError> {
        let not_dicom = |reason: &str| DicomError::NotDicom {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        // A raw data set almost always opens with group 0008 (identifying information).
        if bytes.len() < 8 || bytes[0..2] != [0x08, 0x00] {
            return Err(not_dicom(
                "no DICM magic, no file meta group and no group-0008 data set at the start",
            ));
        }
        let explicit = bytes[4].is_ascii_uppercase()
            && bytes[5].is_ascii_uppercase()
            && dicom_core::VR::from_binary([bytes[4], bytes[5]]).is_some();
        let ts_uid = if explicit {
            EXPLICIT_VR_LE
        } else {
            IMPLICIT_VR_LE
        };
        Self::from_dataset(path, bytes, ts_uid, bytes.len() as u64, false)
    }

    /// Parse a bare data set in `ts_uid` and give it a synthesized file meta group.
    fn from_dataset(
        path: &Path,
        bytes: &[u8],
        ts_uid: &str,
        file_size: u64,
        had_file_meta: bool,
    ) -> Result<Self, DicomError> {
        let malformed = |reason: String| DicomError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let ts = TransferSyntaxRegistry.get(ts_uid).ok_or_else(|| {
            DicomError::UnsupportedTransferSyntax {
                path: path.to_path_buf(),
                uid: ts_uid.to_string(),
                name: "unknown".into(),
                reason: "unknown transfer syntax".into(),
            }
        })?;
        if ts_uid == DEFLATED_EXPLICIT_VR_LE {
            return Err(DicomError::UnsupportedTransferSyntax {
                path: path.to_path_buf(),
                uid: ts_uid.to_string(),
                name: ts.name().to_string(),
                reason: "deflated data set without a DICM file meta group".into(),
            });
        }
        scan::check(bytes, encoding_of(ts_uid)).map_err(malformed)?;
        let obj = InMemDicomObject::read_dataset_with_ts(bytes, ts)
            .map_err(|e| malformed(error_chain(&e)))?;
        let text = |tag: Tag| {
            obj.get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        };
        // The Media Storage UIDs are mandatory in a file meta group; an empty value keeps the
        // group well formed when the data set lacks them.
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax(ts_uid)
            .media_storage_sop_class_uid(text(tags::SOP_CLASS_UID).unwrap_or_default())
            .media_storage_sop_instance_uid(text(tags::SOP_INSTANCE_UID).unwrap_or_default())
            .implementation_class_uid(super::write::implementation_class_uid())
            .build()
            .map_err(|e| malformed(error_chain(&e)))?;
        Ok(DicomFile {
            path: path.to_path_buf(),
            obj: obj.with_exact_meta(meta),
            file_size,
            had_file_meta,
        })
    }

    pub fn transfer_syntax(&self) -> &str {
        self.obj.meta().transfer_syntax()
    }

    /// The registry's name of the transfer syntax, or the UID when unknown.
    pub fn transfer_syntax_name(&self) -> String {
        let uid = self.transfer_syntax();
        TransferSyntaxRegistry
            .get(uid)
            .map(|ts| ts.name().to_string())
            .unwrap_or_else(|| format!("unknown transfer syntax {uid}"))
    }

    /// Trimmed string value of a top-level attribute.
    pub fn string(&self, tag: Tag) -> Option<String> {
        self.obj
            .get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_matches(['\0', ' ']).to_string())
            .filter(|s| !s.is_empty())
    }

    pub fn decode(&self, limits: &DecodeLimits) -> Result<DecodedImage, DicomError> {
        super::decode::decode_image(self, limits)
    }
}

/// The transfer syntax UID from an explicit-VR-LE file meta group at the start of `data`, and
/// the offset where the group ends.
fn meta_transfer_syntax(data: &[u8]) -> Option<(String, usize)> {
    let mut pos = 0usize;
    let mut ts = None;
    while pos + 8 <= data.len() {
        let group = u16::from_le_bytes([data[pos], data[pos + 1]]);
        if group != 0x0002 {
            break;
        }
        let elem = u16::from_le_bytes([data[pos + 2], data[pos + 3]]);
        let vr = [data[pos + 4], data[pos + 5]];
        let (hdr, len) = if matches!(&vr, b"OB" | b"OW" | b"UN" | b"UT" | b"SQ" | b"UC" | b"UR") {
            let b = data.get(pos + 8..pos + 12)?;
            (12, u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        } else {
            (
                8,
                u16::from_le_bytes([data[pos + 6], data[pos + 7]]) as usize,
            )
        };
        let value = data.get(pos + hdr..pos.checked_add(hdr)?.checked_add(len)?)?;
        if elem == 0x0010 {
            let s = std::str::from_utf8(value).ok()?;
            ts = Some(s.trim_end_matches(['\0', ' ']).to_string());
        }
        pos += hdr + len;
    }
    ts.map(|t| (t, pos))
}

pub(crate) fn encoding_of(ts: &str) -> Encoding {
    match ts {
        IMPLICIT_VR_LE => Encoding {
            explicit: false,
            big_endian: false,
        },
        EXPLICIT_VR_BE => Encoding {
            explicit: true,
            big_endian: true,
        },
        _ => scan::EXPLICIT_LE,
    }
}

/// An error with its causes, on one line (dicom-rs nests the useful part).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
