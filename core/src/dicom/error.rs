//! The error type of the DICOM module. Every variant names the file, so a batch run can report
//! each failure on its own line without extra context.

use std::path::PathBuf;

/// What went wrong, without the details: stable across messages, used by tests and `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Io,
    FileTooLarge,
    NotDicom,
    Malformed,
    MissingAttribute,
    InvalidAttribute,
    NoPixelData,
    DecodedTooLarge,
    PixelDataTooShort,
    UnsupportedTransferSyntax,
    UnsupportedPixelFormat,
    Decode,
    DecoderPanic,
    Write,
}

#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: file is {size} bytes, over the {limit}-byte limit", path.display())]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{}: not a DICOM file: {reason}", path.display())]
    NotDicom { path: PathBuf, reason: String },
    #[error("{}: malformed DICOM data: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("{}: missing attribute {name} {tag}", path.display())]
    MissingAttribute {
        path: PathBuf,
        tag: String,
        name: &'static str,
    },
    #[error("{}: invalid {name} {tag} = {value:?}: {reason}", path.display())]
    InvalidAttribute {
        path: PathBuf,
        tag: String,
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("{}: no pixel data element (7FE0,0010/0008/0009)", path.display())]
    NoPixelData { path: PathBuf },
    #[error("{}: decoded pixel data would take {needed} bytes, over the {limit}-byte limit", path.display())]
    DecodedTooLarge {
        path: PathBuf,
        needed: u64,
        limit: u64,
    },
    #[error("{}: pixel data is {actual} bytes, shorter than the {expected} bytes the header declares", path.display())]
    PixelDataTooShort {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: transfer syntax {uid} ({name}) cannot be decoded: {reason}", path.display())]
    UnsupportedTransferSyntax {
        path: PathBuf,
        uid: String,
        name: String,
        reason: String,
    },
    #[error("{}: unsupported pixel format in transfer syntax {uid} ({name}): {reason}", path.display())]
    UnsupportedPixelFormat {
        path: PathBuf,
        uid: String,
        name: String,
        reason: String,
    },
    #[error("{}: decoding transfer syntax {uid} ({name}) failed: {reason}", path.display())]
    Decode {
        path: PathBuf,
        uid: String,
        name: String,
        reason: String,
    },
    #[error("{}: the decoder for transfer syntax {uid} ({name}) panicked: {reason}", path.display())]
    DecoderPanic {
        path: PathBuf,
        uid: String,
        name: String,
        reason: String,
    },
    #[error("{}: cannot write derived instance: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
}

impl DicomError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DicomError::Io { .. } => ErrorKind::Io,
            DicomError::FileTooLarge { .. } => ErrorKind::FileTooLarge,
            DicomError::NotDicom { .. } => ErrorKind::NotDicom,
            DicomError::Malformed { .. } => ErrorKind::Malformed,
            DicomError::MissingAttribute { .. } => ErrorKind::MissingAttribute,
            DicomError::InvalidAttribute { .. } => ErrorKind::InvalidAttribute,
            DicomError::NoPixelData { .. } => ErrorKind::NoPixelData,
            DicomError::DecodedTooLarge { .. } => ErrorKind::DecodedTooLarge,
            DicomError::PixelDataTooShort { .. } => ErrorKind::PixelDataTooShort,
            DicomError::UnsupportedTransferSyntax { .. } => ErrorKind::UnsupportedTransferSyntax,
            DicomError::UnsupportedPixelFormat { .. } => ErrorKind::UnsupportedPixelFormat,
            DicomError::Decode { .. } => ErrorKind::Decode,
            DicomError::DecoderPanic { .. } => ErrorKind::DecoderPanic,
            DicomError::Write { .. } => ErrorKind::Write,
        }
    }
}
