//! DICOM reading, decoding to exact stored values, and derived-instance writing.
//!
//! Attacks and defenses operate on *stored* values (the integers in the file, before the
//! modality rescale), so decoding keeps the integer storage exact and the writer can put a
//! perturbation of "k stored units" back into the file bit for bit. dicom-rs parses the data set
//! and runs the JPEG / JPEG-LS codecs; this module fills what it leaves out (1-bit and
//! non-byte-aligned data, planar configuration 1, YBR_FULL_422, 32-bit and float pixel data,
//! RLE of any bit depth, JPEG 2000 at any bit depth, files without a file meta group) and guards
//! every allocation that a header value could size.

mod decode;
mod error;
mod image;
mod read;
mod rle;
mod scan;
mod write;

pub use decode::decode_image;
pub use error::{DicomError, ErrorKind};
pub use image::{DecodedImage, ImageMeta, PixelKind, PixelSlice, PixelStore};
pub use read::{DecodeLimits, DicomFile};
pub use write::{DerivedInfo, DerivedOptions, derived_uid, write_derived, write_derived_sync};
