//! RLE Lossless (PS3.5 Annex G) for any bits allocated, including 1-bit data (one segment of
//! packed bits per frame, as GDCM writes it). Output is the native little-endian interleaved
//! layout of one frame. Every read is bounds-checked: corrupt segments are errors, not panics,
//! and a segment never expands past its plane size.

/// Decode one RLE frame to native bytes.
pub(crate) fn decode_frame(
    frame: &[u8],
    rows: usize,
    cols: usize,
    spp: usize,
    bits_allocated: usize,
) -> Result<Vec<u8>, String> {
    let header = frame.get(..64).ok_or("RLE header shorter than 64 bytes")?;
    let word = |i: usize| {
        u32::from_le_bytes([
            header[4 * i],
            header[4 * i + 1],
            header[4 * i + 2],
            header[4 * i + 3],
        ]) as usize
    };
    let nseg = word(0);
    let npix = rows * cols;
    let (expected_segments, plane_len) = if bits_allocated == 1 {
        (spp, (npix).div_ceil(8))
    } else {
        (spp * bits_allocated / 8, npix)
    };
    if nseg != expected_segments || nseg > 15 {
        return Err(format!("{nseg} RLE segments, expected {expected_segments}"));
    }
    let mut offsets: Vec<usize> = (1..=nseg).map(word).collect();
    offsets.push(frame.len());
    let mut planes = Vec::with_capacity(nseg);
    for s in 0..nseg {
        let (a, b) = (offsets[s], offsets[s + 1]);
        let seg = frame
            .get(a..b.max(a))
            .ok_or_else(|| format!("RLE segment {s} offset {a} outside the fragment"))?;
        planes.push(packbits(seg, plane_len).map_err(|e| format!("segment {s}: {e}"))?);
    }
    if bits_allocated == 1 {
        if spp != 1 {
            return Err("1-bit RLE with more than one sample per pixel".into());
        }
        return Ok(planes.swap_remove(0));
    }
    // Segments are ordered sample by sample, most significant byte first.
    let bps = bits_allocated / 8;
    let mut out = vec![0u8; npix * spp * bps];
    for c in 0..spp {
        for byte in 0..bps {
            let plane = &planes[c * bps + byte];
            let le_pos = bps - 1 - byte;
            for p in 0..npix {
                out[(p * spp + c) * bps + le_pos] = plane[p];
            }
        }
    }
    Ok(out)
}

/// PackBits decode of one segment to exactly `len` bytes (short segments are an error; a
/// trailing pad past `len` is ignored).
fn packbits(seg: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0;
    while i < seg.len() && out.len() < len {
        let n = seg[i] as i8;
        i += 1;
        if n >= 0 {
            let count = n as usize + 1;
            let lit = seg
                .get(i..i + count)
                .ok_or("literal run past the end of the segment")?;
            out.extend_from_slice(lit);
            i += count;
        } else if n != -128 {
            let count = 1 - n as isize;
            let b = *seg
                .get(i)
                .ok_or("replicate run past the end of the segment")?;
            out.extend(std::iter::repeat_n(b, count as usize));
            i += 1;
        }
    }
    if out.len() < len {
        return Err(format!("decoded {} bytes, expected {len}", out.len()));
    }
    out.truncate(len);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packbits_literal_and_replicate_runs() {
        // 3 literal bytes, then 4 copies of 9, then a no-op (-128), then 1 literal.
        let seg = [2u8, 1, 2, 3, (-3i8) as u8, 9, 0x80, 0, 7];
        assert_eq!(packbits(&seg, 8).unwrap(), vec![1, 2, 3, 9, 9, 9, 9, 7]);
        assert!(packbits(&seg, 9).is_err());
        assert!(packbits(&[5, 1], 6).is_err());
    }

    #[test]
    fn sixteen_bit_segments_are_reordered_to_little_endian() {
        let mut frame = vec![0u8; 64];
        frame[0] = 2;
        frame[4] = 64;
        frame[8] = 64 + 3;
        // MSB plane: 0x01 0x02 ; LSB plane: 0xAA 0xBB (2 pixels)
        frame.extend([1, 0x01, 0x02]);
        frame.extend([1, 0xAA, 0xBB]);
        assert_eq!(
            decode_frame(&frame, 1, 2, 1, 16).unwrap(),
            vec![0xAA, 0x01, 0xBB, 0x02]
        );
        assert!(decode_frame(&frame, 1, 2, 3, 16).is_err());
        assert!(decode_frame(&frame[..40], 1, 2, 1, 16).is_err());
    }
}
