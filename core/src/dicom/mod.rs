//! DICOM reading, decoding to exact stored values, and derived-instance writing.
