//! The decoded image: exact stored values plus everything needed to interpret and rewrite them.

use serde::Serialize;

/// Which element the pixels came from, which decides how they are stored and written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelKind {
    /// (7FE0,0010) Pixel Data: integers of BitsStored bits.
    Integer,
    /// (7FE0,0008) Float Pixel Data.
    Float,
    /// (7FE0,0009) Double Float Pixel Data.
    Double,
}

/// Everything about an image that the pipeline needs to interpret stored values and that the
/// writer needs to produce a consistent derived instance. Values describe the *decoded* pixels
/// (e.g. photometric interpretation after a codec converted YBR to RGB, planar configuration 0);
/// the `source_*` fields keep what the file said.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageMeta {
    pub rows: u32,
    pub cols: u32,
    pub samples_per_pixel: u16,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub high_bit: u16,
    /// 0 unsigned, 1 two's complement.
    pub pixel_representation: u16,
    pub photometric: String,
    /// Always 0 (interleaved) for decoded frames.
    pub planar_configuration: u16,
    pub rescale_slope: f64,
    pub rescale_intercept: f64,
    pub rescale_type: Option<String>,
    pub window_center: Vec<f64>,
    pub window_width: Vec<f64>,
    pub modality: Option<String>,
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    pub series_instance_uid: Option<String>,
    pub study_instance_uid: Option<String>,
    pub transfer_syntax_uid: String,
    pub transfer_syntax_name: String,
    pub frames: u32,
    pub kind: PixelKind,
    pub source_photometric: String,
    pub source_planar_configuration: u16,
    /// True when the source pixel data went through lossy compression (by its transfer syntax
    /// and codestream, or by its Lossy Image Compression attribute).
    pub source_lossy: bool,
    /// Bytes of the compressed pixel data (fragments), for the compression ratio; None if native.
    pub compressed_bytes: Option<u64>,
}

impl ImageMeta {
    pub fn is_signed(&self) -> bool {
        self.pixel_representation == 1
    }

    /// Samples in one frame (rows x cols x samples per pixel).
    pub fn frame_samples(&self) -> usize {
        self.rows as usize * self.cols as usize * self.samples_per_pixel as usize
    }

    /// The representable stored-value range: BitsStored bits, signed or not. Float data is
    /// unbounded.
    pub fn value_range(&self) -> (f64, f64) {
        match self.kind {
            PixelKind::Float => (f32::MIN as f64, f32::MAX as f64),
            PixelKind::Double => (f64::MIN, f64::MAX),
            PixelKind::Integer => {
                let bits = self.bits_stored.clamp(1, 32) as i32;
                if self.is_signed() {
                    let half = 2f64.powi(bits - 1);
                    (-half, half - 1.0)
                } else {
                    (0.0, 2f64.powi(bits) - 1.0)
                }
            }
        }
    }
}

/// Stored values of all frames, frames contiguous, samples interleaved (R G B R G B ...).
#[derive(Debug, Clone, PartialEq)]
pub enum PixelStore {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// A borrowed view of some stored values (one frame, typically).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PixelSlice<'a> {
    U8(&'a [u8]),
    I8(&'a [i8]),
    U16(&'a [u16]),
    I16(&'a [i16]),
    U32(&'a [u32]),
    I32(&'a [i32]),
    F32(&'a [f32]),
    F64(&'a [f64]),
}

macro_rules! each_store {
    ($v:expr, $x:ident => $body:expr) => {
        match $v {
            PixelStore::U8($x) => $body,
            PixelStore::I8($x) => $body,
            PixelStore::U16($x) => $body,
            PixelStore::I16($x) => $body,
            PixelStore::U32($x) => $body,
            PixelStore::I32($x) => $body,
            PixelStore::F32($x) => $body,
            PixelStore::F64($x) => $body,
        }
    };
}

macro_rules! each_slice {
    ($v:expr, $x:ident => $body:expr) => {
        match $v {
            PixelSlice::U8($x) => $body,
            PixelSlice::I8($x) => $body,
            PixelSlice::U16($x) => $body,
            PixelSlice::I16($x) => $body,
            PixelSlice::U32($x) => $body,
            PixelSlice::I32($x) => $body,
            PixelSlice::F32($x) => $body,
            PixelSlice::F64($x) => $body,
        }
    };
}

impl PixelStore {
    pub fn len(&self) -> usize {
        each_store!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn slice(&self, start: usize, end: usize) -> Option<PixelSlice<'_>> {
        Some(match self {
            PixelStore::U8(v) => PixelSlice::U8(v.get(start..end)?),
            PixelStore::I8(v) => PixelSlice::I8(v.get(start..end)?),
            PixelStore::U16(v) => PixelSlice::U16(v.get(start..end)?),
            PixelStore::I16(v) => PixelSlice::I16(v.get(start..end)?),
            PixelStore::U32(v) => PixelSlice::U32(v.get(start..end)?),
            PixelStore::I32(v) => PixelSlice::I32(v.get(start..end)?),
            PixelStore::F32(v) => PixelSlice::F32(v.get(start..end)?),
            PixelStore::F64(v) => PixelSlice::F64(v.get(start..end)?),
        })
    }

    pub fn as_slice(&self) -> PixelSlice<'_> {
        match self {
            PixelStore::U8(v) => PixelSlice::U8(v),
            PixelStore::I8(v) => PixelSlice::I8(v),
            PixelStore::U16(v) => PixelSlice::U16(v),
            PixelStore::I16(v) => PixelSlice::I16(v),
            PixelStore::U32(v) => PixelSlice::U32(v),
            PixelStore::I32(v) => PixelSlice::I32(v),
            PixelStore::F32(v) => PixelSlice::F32(v),
            PixelStore::F64(v) => PixelSlice::F64(v),
        }
    }

    /// Every value as f64 (exact for every stored type).
    // The macro expands once per stored type; the cast is a no-op for one of them.
    #[allow(clippy::unnecessary_cast)]
    pub fn get_f64(&self, i: usize) -> Option<f64> {
        each_store!(self, v => v.get(i).map(|&x| x as f64))
    }

    /// Whether both hold the same number of samples with equal values (as f64: exact for every
    /// stored type; NaN equals nothing). Stores of the same type compare as slices.
    pub fn same_values(&self, other: &PixelStore) -> bool {
        use PixelStore as P;
        match (self, other) {
            (P::U8(a), P::U8(b)) => a == b,
            (P::I8(a), P::I8(b)) => a == b,
            (P::U16(a), P::U16(b)) => a == b,
            (P::I16(a), P::I16(b)) => a == b,
            (P::U32(a), P::U32(b)) => a == b,
            (P::I32(a), P::I32(b)) => a == b,
            (P::F32(a), P::F32(b)) => a == b,
            (P::F64(a), P::F64(b)) => a == b,
            _ => {
                self.len() == other.len()
                    && (0..self.len()).all(|i| self.get_f64(i) == other.get_f64(i))
            }
        }
    }

    /// Minimum and maximum stored values (ignoring NaN); None when empty.
    // The macro expands once per stored type; the cast is a no-op for one of them.
    #[allow(clippy::unnecessary_cast)]
    pub fn min_max(&self) -> Option<(f64, f64)> {
        each_store!(self, v => {
            let mut it = v.iter().map(|&x| x as f64).filter(|x| !x.is_nan());
            let first = it.next()?;
            Some(it.fold((first, first), |(lo, hi), x| (lo.min(x), hi.max(x))))
        })
    }
}

impl PixelSlice<'_> {
    pub fn len(&self) -> usize {
        each_slice!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stored values as f32, the runtime's working type. Exact for integers of up to 24 bits;
    /// 32-bit integers and doubles are rounded to the nearest f32.
    // The macro expands once per stored type; the cast is a no-op for one of them.
    #[allow(clippy::unnecessary_cast)]
    pub fn to_f32(&self) -> Vec<f32> {
        each_slice!(self, v => v.iter().map(|&x| x as f32).collect())
    }

    /// [`Self::to_f32`], appended to `out` (no intermediate vector).
    // The macro expands once per stored type; the cast is a no-op for one of them.
    #[allow(clippy::unnecessary_cast)]
    pub fn extend_f32(&self, out: &mut Vec<f32>) {
        each_slice!(self, v => out.extend(v.iter().map(|&x| x as f32)))
    }
}

/// `x.round()` (to the nearest integer, ties away from zero) without the libm call that
/// `f64::round` is on baseline x86-64: the same value for every finite `x` and infinity (up to
/// the sign of a zero result), which matters to the per-sample loop of
/// [`DecodedImage::set_frame_f32`].
#[inline(always)]
fn round_half_away(x: f64) -> f64 {
    // From 2^52 on every f64 is an integer; below it the truncation and `x - t` are exact.
    if x.abs() < 4_503_599_627_370_496.0 {
        let t = x as i64 as f64;
        let d = x - t;
        if d >= 0.5 {
            t + 1.0
        } else if d <= -0.5 {
            t - 1.0
        } else {
            t
        }
    } else {
        x
    }
}

/// A decoded image: stored values of every frame plus their description.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedImage {
    pub meta: ImageMeta,
    pub pixels: PixelStore,
}

impl DecodedImage {
    pub fn frame_count(&self) -> usize {
        self.meta.frames as usize
    }

    /// Stored values of frame `i` (interleaved samples), or None if out of range.
    pub fn frame(&self, i: usize) -> Option<PixelSlice<'_>> {
        let n = self.meta.frame_samples();
        if i >= self.frame_count() {
            return None;
        }
        self.pixels.slice(i * n, (i + 1) * n)
    }

    /// Frame `i` as f32 stored values, for the model.
    pub fn frame_f32(&self, i: usize) -> Option<Vec<f32>> {
        self.frame(i).map(|f| f.to_f32())
    }

    /// Replace frame `i` from f32 values: rounded to the nearest integer (ties away from zero)
    /// and clamped to the BitsStored range and signedness, so any model output maps to a
    /// representable stored value. Returns false (and changes nothing) if `i` is out of range
    /// or `values` has the wrong length.
    pub fn set_frame_f32(&mut self, i: usize, values: &[f32]) -> bool {
        let n = self.meta.frame_samples();
        if i >= self.frame_count() || values.len() != n {
            return false;
        }
        let (lo, hi) = self.meta.value_range();
        let range = i * n..(i + 1) * n;
        fn conv<T: Copy>(dst: &mut [T], src: &[f32], lo: f64, hi: f64, f: impl Fn(f64) -> T) {
            for (d, &s) in dst.iter_mut().zip(src) {
                let x = s as f64;
                let x = if x.is_nan() {
                    0.0
                } else {
                    round_half_away(x).clamp(lo, hi)
                };
                *d = f(x);
            }
        }
        /// `conv` when the range fits the stored type of at most 16 bits (`lo`, `hi` and every
        /// value between are exact in f32 and i32): clamp then round (equal to round then clamp
        /// for integer bounds), both in f32, where rounding an f32 gives the same integer as in
        /// f64; the conversions are exact. f32 lanes and a truncating conversion vectorise.
        fn conv_small<T: Copy>(dst: &mut [T], src: &[f32], lo: f64, hi: f64, f: impl Fn(i32) -> T) {
            let (lo, hi) = (lo as f32, hi as f32);
            for (d, &s) in dst.iter_mut().zip(src) {
                let x = if s.is_nan() { 0.0 } else { s.clamp(lo, hi) };
                let t = x as i32;
                let frac = x - t as f32;
                *d = f(t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5));
            }
        }
        let fits = |min: f64, max: f64| lo >= min && hi <= max && lo <= hi;
        match &mut self.pixels {
            PixelStore::U8(v) if fits(0.0, 255.0) => {
                conv_small(&mut v[range], values, lo, hi, |x| x as u8)
            }
            PixelStore::I8(v) if fits(-128.0, 127.0) => {
                conv_small(&mut v[range], values, lo, hi, |x| x as i8)
            }
            PixelStore::U16(v) if fits(0.0, 65535.0) => {
                conv_small(&mut v[range], values, lo, hi, |x| x as u16)
            }
            PixelStore::I16(v) if fits(-32768.0, 32767.0) => {
                conv_small(&mut v[range], values, lo, hi, |x| x as i16)
            }
            PixelStore::U8(v) => conv(&mut v[range], values, lo, hi, |x| x as u8),
            PixelStore::I8(v) => conv(&mut v[range], values, lo, hi, |x| x as i8),
            PixelStore::U16(v) => conv(&mut v[range], values, lo, hi, |x| x as u16),
            PixelStore::I16(v) => conv(&mut v[range], values, lo, hi, |x| x as i16),
            PixelStore::U32(v) => conv(&mut v[range], values, lo, hi, |x| x as u32),
            PixelStore::I32(v) => conv(&mut v[range], values, lo, hi, |x| x as i32),
            PixelStore::F32(v) => v[range].copy_from_slice(values),
            PixelStore::F64(v) => {
                for (d, &s) in v[range].iter_mut().zip(values) {
                    *d = s as f64;
                }
            }
        }
        true
    }

    /// Whether every stored value lies in the BitsStored range (the writer's precondition).
    pub fn values_in_range(&self) -> bool {
        let (lo, hi) = self.meta.value_range();
        match self.pixels.min_max() {
            Some((a, b)) => a >= lo && b <= hi,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(bits: u16, signed: bool) -> ImageMeta {
        ImageMeta {
            rows: 2,
            cols: 2,
            samples_per_pixel: 1,
            bits_allocated: 16,
            bits_stored: bits,
            high_bit: bits - 1,
            pixel_representation: signed as u16,
            photometric: "MONOCHROME2".into(),
            planar_configuration: 0,
            rescale_slope: 1.0,
            rescale_intercept: 0.0,
            rescale_type: None,
            window_center: vec![],
            window_width: vec![],
            modality: None,
            sop_class_uid: None,
            sop_instance_uid: None,
            series_instance_uid: None,
            study_instance_uid: None,
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            transfer_syntax_name: "Explicit VR Little Endian".into(),
            frames: 2,
            kind: PixelKind::Integer,
            source_photometric: "MONOCHROME2".into(),
            source_planar_configuration: 0,
            source_lossy: false,
            compressed_bytes: None,
        }
    }

    #[test]
    fn set_frame_f32_fast_path_rounds_and_clamps_like_f64() {
        // Halves both ways, out of range both ways, NaN, infinities, f32 fractions.
        let mut vals: Vec<f32> = vec![
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            4094.5,
            4095.4,
            4095.5,
            -2048.5,
            -2049.5,
            2047.5,
            1e9,
            -1e9,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.49999997,
            -0.49999997,
            -0.0,
        ];
        let mut state = 0x9e37_79b9u32;
        while vals.len() < 4096 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            vals.push((state % 200_000) as f32 / 16.0 - 6000.0);
        }
        for (bits, signed) in [(12, false), (12, true), (16, false), (16, true)] {
            let mut m = meta(bits, signed);
            m.rows = 64;
            m.cols = 64;
            let (lo, hi) = m.value_range();
            let mut img = DecodedImage {
                meta: m,
                pixels: if signed {
                    PixelStore::I16(vec![0; 4096])
                } else {
                    PixelStore::U16(vec![0; 4096])
                },
            };
            assert!(img.set_frame_f32(0, &vals));
            for (i, &v) in vals.iter().enumerate() {
                let x = v as f64;
                let want = if x.is_nan() {
                    0.0
                } else {
                    x.round().clamp(lo, hi)
                };
                assert_eq!(
                    img.pixels.get_f64(i),
                    Some(want),
                    "{v} ({bits} bits, {signed})"
                );
            }
        }
    }

    #[test]
    fn round_half_away_equals_f64_round() {
        let mut xs = vec![
            0.0,
            0.49999999999999994,
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            -0.49999999999999994,
            4095.5,
            -32768.5,
            4_503_599_627_370_495.5,
            4_503_599_627_370_496.0,
            -4_503_599_627_370_497.0,
            1e300,
            -1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // f32 inputs, as the caller has: fractions, halves and large magnitudes.
            let v = f32::from_bits((state >> 32) as u32);
            if v.is_finite() {
                xs.push(v as f64);
                xs.push((v as f64 * 2.0).round() / 2.0);
            }
        }
        for x in xs {
            let (got, want) = (round_half_away(x), x.round());
            assert!(got == want, "{x:e}: {got:e} != {want:e}");
        }
    }

    #[test]
    fn same_values_compares_values_across_and_within_types() {
        let a = PixelStore::U16(vec![0, 7, 4095]);
        assert!(a.same_values(&PixelStore::U16(vec![0, 7, 4095])));
        assert!(!a.same_values(&PixelStore::U16(vec![0, 8, 4095])));
        assert!(!a.same_values(&PixelStore::U16(vec![0, 7])));
        // Other types compare by value.
        assert!(a.same_values(&PixelStore::I32(vec![0, 7, 4095])));
        assert!(!a.same_values(&PixelStore::I32(vec![0, -7, 4095])));
        assert!(!a.same_values(&PixelStore::F32(vec![0.0, 7.0])));
        // NaN equals nothing, not even itself; -0 equals 0.
        let f = PixelStore::F32(vec![1.0, f32::NAN]);
        assert!(!f.same_values(&f.clone()));
        assert!(PixelStore::F32(vec![-0.0]).same_values(&PixelStore::F64(vec![0.0])));
        assert!(PixelStore::F32(vec![-0.0]).same_values(&PixelStore::F32(vec![0.0])));
    }

    #[test]
    fn set_frame_rounds_and_clamps_to_bits_stored() {
        let mut img = DecodedImage {
            meta: meta(12, false),
            pixels: PixelStore::U16(vec![0; 8]),
        };
        assert!(img.set_frame_f32(1, &[-5.0, 4095.6, 2.5, f32::NAN]));
        assert_eq!(img.pixels, PixelStore::U16(vec![0, 0, 0, 0, 0, 4095, 3, 0]));
        assert_eq!(img.frame_f32(1).unwrap(), vec![0.0, 4095.0, 3.0, 0.0]);
        assert!(!img.set_frame_f32(2, &[0.0; 4]));
        assert!(!img.set_frame_f32(0, &[0.0; 3]));

        let mut img = DecodedImage {
            meta: meta(12, true),
            pixels: PixelStore::I16(vec![0; 8]),
        };
        assert!(img.set_frame_f32(0, &[-3000.0, 3000.0, -2048.4, 2047.0]));
        assert_eq!(
            img.frame(0),
            Some(PixelSlice::I16(&[-2048, 2047, -2048, 2047]))
        );
        assert!(img.values_in_range());
        img.pixels = PixelStore::I16(vec![0, 0, 0, 0, 0, 0, 0, 4000]);
        assert!(!img.values_in_range());
    }
}
