//! CPU reference kernels shared by every host: the adverse host runs its Gaussian and median
//! filter services through these (over downloaded data) and the in-process test host runs all of
//! its services through them, so a plugin tested in-process sees the same filters as in a run.
//!
//! Images are `[N, C, H, W]` f32, row-major; filters work on each `[H, W]` plane. Borders use
//! SciPy's `reflect` mode (`d c b a | a b c d | d c b a`), the `scipy.ndimage` default.

/// Index into `0..n` for a possibly out-of-range `i` under half-sample symmetric reflection.
pub fn reflect_index(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * n;
    let mut m = i.rem_euclid(period);
    if m >= n {
        m = period - 1 - m;
    }
    m as usize
}

/// Normalised 1-D Gaussian taps with SciPy's radius `floor(4 * sigma + 0.5)` (`truncate = 4`).
pub fn gaussian_taps(sigma: f32) -> Vec<f32> {
    let sigma = sigma as f64;
    let radius = (4.0 * sigma + 0.5).floor() as isize;
    let mut taps: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 * (x as f64 / sigma).powi(2)).exp())
        .collect();
    let sum: f64 = taps.iter().sum();
    for t in &mut taps {
        *t /= sum;
    }
    taps.into_iter().map(|t| t as f32).collect()
}

fn planes(shape: &[usize]) -> Option<(usize, usize, usize)> {
    match *shape {
        [n, c, h, w] if h > 0 && w > 0 => Some((n * c, h, w)),
        _ => None,
    }
}

/// Separable Gaussian blur of every plane; `None` when the shape is not `[N, C, H, W]`, the data
/// length does not match, or `sigma` is not finite and positive.
pub fn gaussian_filter(data: &[f32], shape: &[usize], sigma: f32) -> Option<Vec<f32>> {
    let (p, h, w) = planes(shape)?;
    if data.len() != p * h * w || !(sigma.is_finite() && sigma > 0.0) || sigma > 1000.0 {
        return None;
    }
    let taps = gaussian_taps(sigma);
    let r = (taps.len() / 2) as isize;
    let mut tmp = vec![0f32; data.len()];
    let mut out = vec![0f32; data.len()];
    for pi in 0..p {
        let src = &data[pi * h * w..(pi + 1) * h * w];
        let t = &mut tmp[pi * h * w..(pi + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0f64;
                for (k, &tap) in taps.iter().enumerate() {
                    let xx = reflect_index(x as isize + k as isize - r, w);
                    acc += tap as f64 * src[y * w + xx] as f64;
                }
                t[y * w + x] = acc as f32;
            }
        }
        let o = &mut out[pi * h * w..(pi + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0f64;
                for (k, &tap) in taps.iter().enumerate() {
                    let yy = reflect_index(y as isize + k as isize - r, h);
                    acc += tap as f64 * t[yy * w + x] as f64;
                }
                o[y * w + x] = acc as f32;
            }
        }
    }
    Some(out)
}

/// Median over the `(2 radius + 1)^2` window of every plane; `None` on a bad shape or length,
/// or a radius over 64.
pub fn median_filter(data: &[f32], shape: &[usize], radius: u32) -> Option<Vec<f32>> {
    let (p, h, w) = planes(shape)?;
    if data.len() != p * h * w || radius > 64 {
        return None;
    }
    let r = radius as isize;
    let mut out = vec![0f32; data.len()];
    let mut win = Vec::with_capacity(((2 * r + 1) * (2 * r + 1)) as usize);
    for pi in 0..p {
        let src = &data[pi * h * w..(pi + 1) * h * w];
        // The common 3x3 case through sorted columns (see `median3x3`), far faster than
        // selection. Its comparisons order NaN differently from `total_cmp`, so planes holding
        // NaN take the general path and both give the same result.
        if radius == 1 && !src.iter().fold(false, |nan, v| nan | v.is_nan()) {
            median3x3(src, h, w, &mut out[pi * h * w..(pi + 1) * h * w]);
            continue;
        }
        for y in 0..h {
            for x in 0..w {
                win.clear();
                for dy in -r..=r {
                    let yy = reflect_index(y as isize + dy, h);
                    for dx in -r..=r {
                        win.push(src[yy * w + reflect_index(x as isize + dx, w)]);
                    }
                }
                let mid = win.len() / 2;
                let (_, m, _) = win.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
                out[pi * h * w + y * w + x] = *m;
            }
        }
    }
    Some(out)
}

/// 3x3 median of one NaN-free `h x w` plane with reflected borders.
///
/// Sorted columns: for an output row, every column of its three input rows is sorted once into
/// `lo <= mid <= hi` (three compare-exchanges, shared by the three windows that hold the
/// column); the median of a 3x3 window is then `med3(max of its lo, med3 of its mid, min of its
/// hi)` (the classic sorted-column 3x3 median; it holds for any values, ties included, and the
/// equivalence test below checks it against selection). Every step is a min or max over whole
/// rows, which the compiler turns into SIMD min/max: about 20 operations per pixel instead of
/// the 38 scalar ones of a 9-value network with gathered, bounds-checked loads.
fn median3x3(src: &[f32], h: usize, w: usize, out: &mut [f32]) {
    // NaN-free input: plain comparisons (one SIMD min/max each), no NaN fix-ups.
    #[inline(always)]
    fn mn(a: f32, b: f32) -> f32 {
        if b < a { b } else { a }
    }
    #[inline(always)]
    fn mx(a: f32, b: f32) -> f32 {
        if b > a { b } else { a }
    }
    #[inline(always)]
    fn med3(a: f32, b: f32, c: f32) -> f32 {
        mx(mn(a, b), mn(mx(a, b), c))
    }
    // Sorted columns of the current output row, with one reflected column on each side:
    // index 1 + x holds column x.
    let mut lo = vec![0f32; w + 2];
    let mut mid = vec![0f32; w + 2];
    let mut hi = vec![0f32; w + 2];
    let (left, right) = (1 + reflect_index(-1, w), 1 + reflect_index(w as isize, w));
    for y in 0..h {
        let row = |r: usize| &src[r * w..(r + 1) * w];
        let (a, b, c) = (
            row(reflect_index(y as isize - 1, h)),
            row(y),
            row(reflect_index(y as isize + 1, h)),
        );
        let (l, m, u) = (&mut lo[1..=w], &mut mid[1..=w], &mut hi[1..=w]);
        for x in 0..w {
            let (p, q) = (mn(a[x], b[x]), mx(a[x], b[x]));
            let (q, r) = (mn(q, c[x]), mx(q, c[x]));
            l[x] = mn(p, q);
            m[x] = mx(p, q);
            u[x] = r;
        }
        for v in [&mut lo, &mut mid, &mut hi] {
            v[0] = v[left];
            v[w + 1] = v[right];
        }
        let o = &mut out[y * w..(y + 1) * w];
        let (l0, l1, l2) = (&lo[..w], &lo[1..=w], &lo[2..w + 2]);
        let (m0, m1, m2) = (&mid[..w], &mid[1..=w], &mid[2..w + 2]);
        let (u0, u1, u2) = (&hi[..w], &hi[1..=w], &hi[2..w + 2]);
        for x in 0..w {
            let low = mx(mx(l0[x], l1[x]), l2[x]);
            let high = mn(mn(u0[x], u1[x]), u2[x]);
            o[x] = med3(low, med3(m0[x], m1[x], m2[x]), high);
        }
    }
}

/// 2x2 median of one `[h, w]` plane: window rows {i-1, i} and columns {j-1, j}, index -1
/// reflected to 0, and the upper of the two middle values (scipy's
/// `median_filter(size=2, mode="reflect")`, rank `size // 2`). Feature squeezing's squeezer for
/// small images; shared by the `feature-squeezing` detector and the `median-2x2` purifier so the
/// adaptive attack squeezes exactly as the detector does.
pub fn median2x2(plane: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; plane.len()];
    for i in 0..h {
        let i0 = i.saturating_sub(1);
        for j in 0..w {
            let j0 = j.saturating_sub(1);
            let mut v = [
                plane[i0 * w + j0],
                plane[i0 * w + j],
                plane[i * w + j0],
                plane[i * w + j],
            ];
            v.sort_by(f32::total_cmp);
            out[i * w + j] = v[2];
        }
    }
    out
}

/// The PCG output hash of the runtime's counter-based generator (same constants as the host's
/// backends, so the test host draws the same numbers as a real run).
pub fn pcg_hash(v: u32) -> u32 {
    let state = v.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28).wrapping_add(4))) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// Uniform in [0, 1) for element `i` of stream `seed`.
pub fn counter_uniform(seed: u64, i: u32) -> f32 {
    let k = pcg_hash((seed as u32) ^ pcg_hash((seed >> 32) as u32));
    let h = pcg_hash(i ^ k);
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Standard normal for element `i` (Box-Muller on uniforms 2i and 2i + 1).
pub fn counter_normal(seed: u64, i: u32) -> f32 {
    let u1 = counter_uniform(seed, i.wrapping_mul(2)).max(1.0 / 16_777_216.0);
    let u2 = counter_uniform(seed, i.wrapping_mul(2).wrapping_add(1));
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// The seed the random services use for `stream` of a batch seeded `seed` (SplitMix64 mix, so
/// neighbouring streams are unrelated).
pub fn stream_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_matches_scipy_reflect_mode() {
        // scipy 'reflect' on [a b c]: ... c b a | a b c | c b a ...
        let got: Vec<usize> = (-4..7).map(|i| reflect_index(i, 3)).collect();
        assert_eq!(got, vec![2, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0]);
        assert_eq!(reflect_index(-3, 1), 0);
    }

    #[test]
    fn median_removes_salt_and_keeps_flat_regions() {
        let mut img = vec![10f32; 25];
        img[12] = 1000.0; // one hot pixel in a flat 5x5
        let out = median_filter(&img, &[1, 1, 5, 5], 1).unwrap();
        assert!(out.iter().all(|&v| v == 10.0), "{out:?}");
        // A step edge survives a 3x3 median unchanged.
        let step: Vec<f32> = (0..25).map(|i| if i % 5 < 2 { 0.0 } else { 9.0 }).collect();
        assert_eq!(median_filter(&step, &[1, 1, 5, 5], 1).unwrap(), step);
        assert!(median_filter(&img, &[1, 5, 5], 1).is_none());
        assert!(median_filter(&img[..24], &[1, 1, 5, 5], 1).is_none());
    }

    #[test]
    fn the_3x3_fast_path_equals_selection_on_random_planes() {
        // Few distinct values (many ties), many, and shapes around the SIMD widths.
        let shapes = [
            (1, 1),
            (1, 7),
            (2, 3),
            (5, 1),
            (9, 13),
            (2, 2),
            (3, 64),
            (17, 33),
        ];
        for ((h, w), levels) in shapes.iter().flat_map(|&s| [(s, 3.0), (s, 50.0), (s, 1e6)]) {
            let src: Vec<f32> = (0..h * w)
                .map(|i| (counter_uniform(11 + h as u64, i as u32) * levels).floor() - 20.0)
                .collect();
            let mut fast = vec![0f32; h * w];
            median3x3(&src, h, w, &mut fast);
            // The general path: a NaN-free plane forced through selection.
            let mut slow = vec![0f32; h * w];
            for y in 0..h {
                for x in 0..w {
                    let mut win: Vec<f32> = (-1..=1)
                        .flat_map(|dy| {
                            let yy = reflect_index(y as isize + dy, h);
                            let src = &src;
                            (-1..=1).map(move |dx| src[yy * w + reflect_index(x as isize + dx, w)])
                        })
                        .collect();
                    win.sort_by(|a, b| a.total_cmp(b));
                    slow[y * w + x] = win[4];
                }
            }
            assert_eq!(fast, slow, "{h}x{w}, {levels} levels");
        }
        // A NaN plane takes the general path and still gives a result.
        let mut img = vec![1f32; 9];
        img[0] = f32::NAN;
        assert_eq!(median_filter(&img, &[1, 1, 3, 3], 1).unwrap()[4], 1.0);
    }

    #[test]
    fn gaussian_preserves_mean_and_smooths() {
        let img: Vec<f32> = (0..64)
            .map(|i| if i % 2 == 0 { 100.0 } else { 0.0 })
            .collect();
        let out = gaussian_filter(&img, &[1, 1, 8, 8], 1.0).unwrap();
        let mean_in: f32 = img.iter().sum::<f32>() / 64.0;
        let mean_out: f32 = out.iter().sum::<f32>() / 64.0;
        assert!((mean_in - mean_out).abs() < 1e-3, "{mean_in} {mean_out}");
        // Away from the border, alternating columns blur to (almost) their mean.
        for y in 0..8 {
            for x in 3..5 {
                assert!(
                    (out[y * 8 + x] - 50.0).abs() < 2.0,
                    "({y},{x}) = {}",
                    out[y * 8 + x]
                );
            }
        }
        let taps = gaussian_taps(1.0);
        assert_eq!(taps.len(), 9);
        assert!((taps.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(gaussian_filter(&img, &[1, 1, 8, 8], 0.0).is_none());
        assert!(gaussian_filter(&img, &[1, 1, 8, 8], f32::NAN).is_none());
    }

    #[test]
    fn counter_rng_is_deterministic_and_in_range() {
        let a: Vec<f32> = (0..1000).map(|i| counter_uniform(7, i)).collect();
        let b: Vec<f32> = (0..1000).map(|i| counter_uniform(7, i)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mean = a.iter().sum::<f32>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        assert_ne!(stream_seed(1, 0), stream_seed(1, 1));
        let z: Vec<f32> = (0..2000).map(|i| counter_normal(3, i)).collect();
        let m = z.iter().sum::<f32>() / 2000.0;
        let var = z.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / 2000.0;
        assert!(m.abs() < 0.1 && (var - 1.0).abs() < 0.15, "{m} {var}");
    }
}
