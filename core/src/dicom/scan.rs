//! A header-only walk over the encoded data set that rejects any element whose declared length
//! runs past the end of the file, before dicom-rs parses it. dicom-rs reserves and zero-fills a
//! buffer of the declared length before reading; without this walk a 200-byte file declaring a
//! 4 GiB element would cost 4 GiB of memory.

use dicom_core::dictionary::DataDictionary;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

const UNDEFINED: u32 = 0xFFFF_FFFF;

/// How the data set after the file meta group is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Encoding {
    pub explicit: bool,
    pub big_endian: bool,
}

pub(crate) const EXPLICIT_LE: Encoding = Encoding {
    explicit: true,
    big_endian: false,
};

/// Walk `data` from its start as a sequence of elements in `enc`. Returns a description of the
/// first element that cannot fit, or Ok. Elements of group 0002 are always read as explicit VR
/// little endian, as the file meta group is.
pub(crate) fn check(data: &[u8], enc: Encoding) -> Result<(), String> {
    let mut pos = 0usize;
    // Depth of undefined-length pixel sequences we are in: their items hold raw fragments.
    let mut in_pixel_seq = false;
    while pos < data.len() {
        let rest = &data[pos..];
        if rest.len() < 8 {
            // Trailing padding of fewer than 8 bytes is tolerated by readers; dicom-rs reports it.
            return Err(format!("truncated element header at byte {pos}"));
        }
        let meta = u16::from_le_bytes([rest[0], rest[1]]) == 0x0002;
        let enc = if meta { EXPLICIT_LE } else { enc };
        let rd16 = |b: &[u8]| {
            if enc.big_endian {
                u16::from_be_bytes([b[0], b[1]])
            } else {
                u16::from_le_bytes([b[0], b[1]])
            }
        };
        let rd32 = |b: &[u8]| {
            if enc.big_endian {
                u32::from_be_bytes([b[0], b[1], b[2], b[3]])
            } else {
                u32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
        };
        let tag = Tag(rd16(&rest[0..2]), rd16(&rest[2..4]));
        let (header, len, vr) = if tag.group() == 0xFFFE {
            (8usize, rd32(&rest[4..8]), None)
        } else if enc.explicit {
            let vr = VR::from_binary([rest[4], rest[5]]);
            let long = matches!(
                vr,
                Some(
                    VR::OB
                        | VR::OD
                        | VR::OF
                        | VR::OL
                        | VR::OV
                        | VR::OW
                        | VR::SQ
                        | VR::UC
                        | VR::UR
                        | VR::UT
                        | VR::UN
                        | VR::SV
                        | VR::UV
                )
            );
            if vr.is_none() {
                return Err(format!(
                    "unknown VR {:?} for {tag} at byte {pos}",
                    &rest[4..6]
                ));
            }
            if long {
                if rest.len() < 12 {
                    return Err(format!("truncated element header of {tag} at byte {pos}"));
                }
                (12, rd32(&rest[8..12]), vr)
            } else {
                (8, rd16(&rest[6..8]) as u32, vr)
            }
        } else {
            let vr = StandardDataDictionary.by_tag(tag).map(|e| e.vr.relaxed());
            (8, rd32(&rest[4..8]), vr)
        };
        pos += header;
        match tag {
            // Item: in a pixel sequence it holds a fragment (skip it); in a sequence its
            // content is elements (walk into it).
            Tag(0xFFFE, 0xE000) => {
                if in_pixel_seq {
                    if len == UNDEFINED || len as usize > data.len() - pos {
                        return Err(format!("fragment at byte {pos} runs past the end"));
                    }
                    pos += len as usize;
                } else if len != UNDEFINED && len as usize > data.len() - pos {
                    return Err(format!("item at byte {pos} runs past the end"));
                }
            }
            Tag(0xFFFE, 0xE00D) => {}
            Tag(0xFFFE, 0xE0DD) => in_pixel_seq = false,
            _ if len == UNDEFINED => {
                if tag == Tag(0x7FE0, 0x0010) {
                    in_pixel_seq = true;
                }
            }
            _ => {
                if len as usize > data.len() - pos {
                    return Err(format!(
                        "element {tag} declares {len} bytes at byte {pos}, only {} remain",
                        data.len() - pos
                    ));
                }
                // Defined-length sequences hold elements: walk into them.
                if vr != Some(VR::SQ) {
                    pos += len as usize;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(tag.0.to_le_bytes());
        v.extend(tag.1.to_le_bytes());
        v.extend(vr);
        v.extend((value.len() as u16).to_le_bytes());
        v.extend(value);
        v
    }

    #[test]
    fn rejects_lengths_past_the_end_and_accepts_consistent_data() {
        let mut ok = el((0x0008, 0x0060), b"CS", b"CT");
        ok.extend(el((0x0028, 0x0010), b"US", &[2, 0]));
        assert_eq!(check(&ok, EXPLICIT_LE), Ok(()));

        let mut bad = ok.clone();
        // OB element claiming 4 GiB - 2.
        bad.extend([
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFE, 0xFF, 0xFF, 0xFF,
        ]);
        bad.extend([0u8; 16]);
        let err = check(&bad, EXPLICIT_LE).unwrap_err();
        assert!(err.contains("(7FE0,0010)"), "{err}");

        let mut truncated = ok.clone();
        truncated.truncate(ok.len() - 1);
        assert!(check(&truncated, EXPLICIT_LE).is_err());
    }
}
