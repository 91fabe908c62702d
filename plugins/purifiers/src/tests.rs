//! Each purifier against a reference on known images (direct implementations written here in
//! f64 and in a different shape from the kernels, scikit-image for TV, PIL/libjpeg for JPEG),
//! CPU (the SDK test host and the real host's CPU backend) against GPU (the real host on
//! lavapipe) for 8-bit and 16-bit frames, and parameter errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use adverse::plugin::PluginLibrary;
use adverse::plugin::host::{BatchInput, Instance, PluginBackend};
use adverse::runtime::cpu::CpuBackend;
use adverse::runtime::gpu::{AdapterPolicy, GpuBackend, GpuOptions};
use adverse_plugin_sdk::FrameMeta;
use adverse_plugin_sdk::testing::{self, TestHost};
use serde_json::{Value, json};

use super::adverse_plugin_library;

type Audit = Vec<BTreeMap<String, Value>>;

fn gpu() -> &'static GpuBackend {
    static DEV: OnceLock<GpuBackend> = OnceLock::new();
    DEV.get_or_init(|| {
        GpuBackend::new(GpuOptions {
            adapter: AdapterPolicy::SoftwareOnly,
        })
        .expect("the software GPU adapter (lavapipe) must be installed")
    })
}

/// Runs plugin `name` on the real host with backend `b`.
fn run_on<B: PluginBackend>(
    b: &B,
    name: &str,
    params: &Value,
    frames: Vec<FrameMeta>,
    data: &[f32],
    shape: [usize; 4],
) -> Result<(Vec<f32>, Audit), String> {
    let handle = PluginLibrary::in_process("purifiers", adverse_plugin_library())
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(|| format!("no plugin {name}"))?;
    let mut inst = Instance::create(Arc::new(handle), params, b).map_err(|e| e.to_string())?;
    let input = b.upload(data, &shape);
    let out = inst
        .process(BatchInput {
            backend: b,
            frames,
            input,
            model: None,
            seed: 7,
        })
        .map_err(|e| e.to_string())?;
    let y = out.output.map(|t| b.download(&t)).ok_or("no output")?;
    Ok((y, out.audit))
}

/// Runs plugin `name` on the SDK's in-process CPU test host.
fn run_sdk(
    name: &str,
    params: &Value,
    frames: Vec<FrameMeta>,
    data: &[f32],
    shape: [usize; 4],
) -> Result<(Vec<f32>, Audit), String> {
    let mut host = TestHost::new(frames);
    let out = testing::run(
        adverse_plugin_library(),
        name,
        params,
        &mut host,
        data,
        shape,
    )
    .map_err(|e| e.to_string())?;
    Ok((out.output.ok_or("no output")?, out.audit))
}

fn frame8(rows: u32, cols: u32) -> FrameMeta {
    FrameMeta {
        bits_allocated: 8,
        bits_stored: 8,
        value_range: (0.0, 255.0),
        ..TestHost::frame(rows, cols)
    }
}

fn rgb8(rows: u32, cols: u32) -> FrameMeta {
    FrameMeta {
        samples_per_pixel: 3,
        ..frame8(rows, cols)
    }
}

/// A 16-bit signed CT-like frame: rescale −1024 + stored, window (40, 400) HU.
fn ct16(rows: u32, cols: u32) -> FrameMeta {
    FrameMeta {
        bits_allocated: 16,
        bits_stored: 16,
        signed: true,
        rescale_slope: 1.0,
        rescale_intercept: -1024.0,
        window: Some((40.0, 400.0)),
        value_range: (-32768.0, 32767.0),
        modality: "CT".into(),
        ..TestHost::frame(rows, cols)
    }
}

/// Deterministic pseudo-random numbers in [0, 1).
fn lcg(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// A known image: smooth ramp + a bright disk + noise, integer values in `[lo, hi]`.
fn phantom(h: usize, w: usize, lo: f64, hi: f64, noise: f64, seed: u64) -> Vec<f32> {
    let r = lcg(seed, h * w);
    (0..h * w)
        .map(|k| {
            let (y, x) = ((k / w) as f64, (k % w) as f64);
            let ramp = 0.2 + 0.4 * x / w as f64;
            let dy = y - h as f64 * 0.5;
            let dx = x - w as f64 * 0.55;
            let disk = if dy * dy + dx * dx < (h.min(w) as f64 * 0.25).powi(2) {
                0.3
            } else {
                0.0
            };
            let v = ramp + disk + noise * (r[k] - 0.5);
            (lo + v.clamp(0.0, 1.0) * (hi - lo)).round() as f32
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn assert_integers_in(v: &[f32], lo: f32, hi: f32) {
    for &x in v {
        assert!(
            x.fract() == 0.0 && x >= lo && x <= hi,
            "value {x} off the stored grid"
        );
    }
}

/// The linf/l2 audit values match the actual change.
fn assert_audit_matches(audit: &Audit, x: &[f32], y: &[f32], frames: usize) {
    let per = x.len() / frames;
    for f in 0..frames {
        let d: Vec<f64> = (f * per..(f + 1) * per)
            .map(|i| f64::from(y[i]) - f64::from(x[i]))
            .collect();
        let linf = d.iter().fold(0f64, |m, v| m.max(v.abs()));
        let l2 = d.iter().map(|v| v * v).sum::<f64>().sqrt();
        let a_inf = audit[f]["linf_change"].as_f64().unwrap();
        let a_l2 = audit[f]["l2_change"].as_f64().unwrap();
        assert!((a_inf - linf).abs() < 1e-3, "linf {a_inf} vs {linf}");
        assert!((a_l2 - l2).abs() < 1e-3 * l2.max(1.0), "l2 {a_l2} vs {l2}");
    }
}

/// CPU (SDK host, real CPU backend) and GPU (lavapipe) give the same stored values.
fn assert_backends_agree(
    name: &str,
    params: &Value,
    frames: Vec<FrameMeta>,
    data: &[f32],
    shape: [usize; 4],
) -> Vec<f32> {
    let (sdk, _) = run_sdk(name, params, frames.clone(), data, shape).unwrap();
    let (cpu, _) = run_on(
        &CpuBackend::new(Some(1)),
        name,
        params,
        frames.clone(),
        data,
        shape,
    )
    .unwrap();
    let (gpu, _) = run_on(gpu(), name, params, frames, data, shape).unwrap();
    assert_eq!(sdk, cpu, "{name}: SDK test host vs real CPU backend");
    let diff = max_abs_diff(&cpu, &gpu);
    let mismatched = cpu.iter().zip(&gpu).filter(|(a, b)| a != b).count();
    // Both run the same f32 operations; the GPU may fuse a multiply-add, which can move a value
    // sitting on a rounding tie by one stored unit. Anything more is a kernel bug.
    assert!(
        diff <= 1.0 && mismatched * 200 <= cpu.len(),
        "{name}: CPU vs GPU differ by up to {diff} at {mismatched} of {} values",
        cpu.len()
    );
    assert_ne!(
        &cpu[..],
        data,
        "{name} changed nothing: the comparison is vacuous"
    );
    cpu
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ADVERSE_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python oracle: set ADVERSE_PYTHON or create {} (pip install -r scripts/requirements-oracle.txt)",
        p.display()
    );
    p
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn oracle(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("scripts/oracle/purifiers.py"))
        .args(args)
        .output()
        .expect("run the Python oracle");
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// bit-depth

/// Direct reference: levels `a + k·step` of the reference interval, rounded and clamped (ties
/// round up, the kernels' documented rule).
fn bit_depth_ref(x: &[f32], bits: u32, span: (f64, f64), range: (f64, f64)) -> Vec<f32> {
    let step = (span.1 - span.0) / f64::from((1u32 << bits) - 1);
    x.iter()
        .map(|&v| {
            let k = ((f64::from(v) - span.0) / step + 0.5).floor();
            (span.0 + k * step + 0.5).floor().clamp(range.0, range.1) as f32
        })
        .collect()
}

#[test]
fn bit_depth_matches_the_direct_quantiser_on_8_bit_data() {
    let (h, w) = (12, 10);
    let x = phantom(h, w, 0.0, 255.0, 0.3, 1);
    let (y, audit) = run_sdk(
        "bit-depth",
        &json!({"bits": 3}),
        vec![frame8(h as u32, w as u32)],
        &x,
        [1, 1, h, w],
    )
    .unwrap();
    assert_eq!(y, bit_depth_ref(&x, 3, (0.0, 255.0), (0.0, 255.0)));
    // 3 bits over 0..255: at most 8 distinct levels, multiples of 255/7 rounded.
    let mut levels: Vec<i64> = y.iter().map(|&v| v as i64).collect();
    levels.sort();
    levels.dedup();
    assert!(levels.len() <= 8 && levels.len() >= 4, "{levels:?}");
    for l in &levels {
        assert!([0, 36, 73, 109, 146, 182, 219, 255].contains(l), "{l}");
    }
    assert!((audit[0]["step"].as_f64().unwrap() - 255.0 / 7.0).abs() < 1e-4);
    assert_audit_matches(&audit, &x, &y, 1);
}

#[test]
fn bit_depth_on_16_bit_ct_quantises_relative_to_the_window() {
    let (h, w) = (9, 11);
    // Stored values spanning well beyond the window (stored 864..1264 = HU −160..240).
    let x = phantom(h, w, 200.0, 2400.0, 0.2, 2);
    let (y, audit) = run_sdk(
        "bit-depth",
        &json!({"bits": 4}),
        vec![ct16(h as u32, w as u32)],
        &x,
        [1, 1, h, w],
    )
    .unwrap();
    let want = bit_depth_ref(&x, 4, (864.0, 1264.0), (-32768.0, 32767.0));
    assert_eq!(y, want);
    assert!((audit[0]["step"].as_f64().unwrap() - 400.0 / 15.0).abs() < 1e-3);
    // Values outside the window are coarsened, not saturated to its edges.
    assert!(y.iter().any(|&v| v > 1300.0) && y.iter().any(|&v| v < 800.0));
    assert_audit_matches(&audit, &x, &y, 1);
}

#[test]
fn bit_depth_cpu_and_gpu_agree() {
    let (h, w) = (20, 23);
    let mut x = phantom(h, w, 0.0, 255.0, 0.5, 3);
    x.extend(phantom(h, w, 0.0, 255.0, 0.5, 4));
    assert_backends_agree(
        "bit-depth",
        &json!({"bits": 2}),
        vec![frame8(h as u32, w as u32); 2],
        &x,
        [2, 1, h, w],
    );
    let x16 = phantom(h, w, 0.0, 3000.0, 0.5, 5);
    assert_backends_agree(
        "bit-depth",
        &json!({"bits": 5}),
        vec![ct16(h as u32, w as u32)],
        &x16,
        [1, 1, h, w],
    );
}

// ---------------------------------------------------------------------------------------------
// tv

/// scikit-image's denoise_tv_chambolle on one plane (f64), then rounded and clamped.
fn tv_skimage(
    x: &[f32],
    h: usize,
    w: usize,
    weight: f64,
    iters: u32,
    range: (f64, f64),
) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("x.f64");
    let dst = dir.path().join("y.f64");
    let bytes: Vec<u8> = x.iter().flat_map(|&v| f64::from(v).to_le_bytes()).collect();
    std::fs::write(&src, bytes).unwrap();
    oracle(&[
        "tv",
        src.to_str().unwrap(),
        &h.to_string(),
        &w.to_string(),
        &weight.to_string(),
        &iters.to_string(),
        dst.to_str().unwrap(),
    ]);
    std::fs::read(&dst)
        .unwrap()
        .chunks_exact(8)
        .map(|c| {
            let v = f64::from_le_bytes(c.try_into().unwrap());
            (v + 0.5).floor().clamp(range.0, range.1) as f32
        })
        .collect()
}

#[test]
fn tv_matches_scikit_image_on_8_and_16_bit_frames() {
    let (h, w) = (24, 20);
    let x = phantom(h, w, 0.0, 255.0, 0.4, 6);
    let (y, audit) = run_sdk(
        "tv",
        &json!({"weight": 0.1, "iterations": 60}),
        vec![frame8(h as u32, w as u32)],
        &x,
        [1, 1, h, w],
    )
    .unwrap();
    let want = tv_skimage(&x, h, w, 25.5, 60, (0.0, 255.0));
    assert!((audit[0]["weight_stored"].as_f64().unwrap() - 25.5).abs() < 1e-9);
    let diff = max_abs_diff(&y, &want);
    let off = y.iter().zip(&want).filter(|(a, b)| a != b).count();
    // f32 against f64 after 60 iterations: only values on a rounding tie may differ, by 1.
    assert!(
        diff <= 1.0 && off * 50 <= y.len(),
        "diff {diff} at {off} pixels"
    );
    // Denoising flattens the noise: total variation drops a lot.
    let tv = |v: &[f32]| -> f64 {
        (0..h * w)
            .map(|k| {
                let dx = if k % w + 1 < w { v[k + 1] - v[k] } else { 0.0 };
                let dy = if k / w + 1 < h { v[k + w] - v[k] } else { 0.0 };
                f64::from((dx * dx + dy * dy).sqrt())
            })
            .sum()
    };
    assert!(tv(&y) < 0.5 * tv(&x), "{} vs {}", tv(&y), tv(&x));
    assert_audit_matches(&audit, &x, &y, 1);

    // 16-bit CT, weight in stored units.
    let x16 = phantom(h, w, 700.0, 1500.0, 0.3, 7);
    let (y16, _) = run_sdk(
        "tv",
        &json!({"weight": 40.0, "units": "stored", "iterations": 30}),
        vec![ct16(h as u32, w as u32)],
        &x16,
        [1, 1, h, w],
    )
    .unwrap();
    let want16 = tv_skimage(&x16, h, w, 40.0, 30, (-32768.0, 32767.0));
    let diff = max_abs_diff(&y16, &want16);
    let off = y16.iter().zip(&want16).filter(|(a, b)| a != b).count();
    assert!(
        diff <= 1.0 && off * 50 <= y16.len(),
        "diff {diff} at {off} pixels"
    );
}

#[test]
fn tv_cpu_and_gpu_agree_per_plane_and_frame() {
    let (h, w) = (17, 21);
    // Two RGB 8-bit frames: six planes, each its own workgroup on the GPU.
    let mut x = Vec::new();
    for s in 0..6 {
        x.extend(phantom(h, w, 0.0, 255.0, 0.5, 10 + s));
    }
    assert_backends_agree(
        "tv",
        &json!({"weight": 0.08, "iterations": 25}),
        vec![rgb8(h as u32, w as u32); 2],
        &x,
        [2, 3, h, w],
    );
    let x16 = phantom(h, w, 0.0, 2000.0, 0.5, 20);
    assert_backends_agree(
        "tv",
        &json!({"weight": 0.05, "iterations": 40}),
        vec![ct16(h as u32, w as u32)],
        &x16,
        [1, 1, h, w],
    );
}

// ---------------------------------------------------------------------------------------------
// lgs

/// Direct LGS in f64, written the way the authors' code reads: enumerate blocks, paint the
/// selected ones into a mask, then scale.
fn lgs_ref(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    span: (f64, f64),
    range: (f64, f64),
    (k, overlap, thr, lambda): (usize, usize, f64, f64),
) -> Vec<f32> {
    let s = k - overlap;
    let hw = h * w;
    let grey = |k: usize| -> f64 {
        (0..c)
            .map(|ch| {
                (f64::from(x[ch * hw + k]).clamp(span.0, span.1) - span.0) / (span.1 - span.0)
            })
            .sum::<f64>()
            / c as f64
    };
    let mut g = vec![0f64; hw];
    for r in 0..h {
        for q in 0..w {
            let v = grey(r * w + q);
            let gx = if q + 1 < w {
                v - grey(r * w + q + 1)
            } else {
                0.0
            };
            let gy = if r + 1 < h {
                v - grey((r + 1) * w + q)
            } else {
                0.0
            };
            g[r * w + q] = (gx * gx + gy * gy).sqrt();
        }
    }
    let (mn, mx) = g
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let gn: Vec<f64> = g.iter().map(|v| (v - mn) / (mx - mn + 1e-7)).collect();
    let origins = |len: usize| -> Vec<usize> {
        if len <= k {
            return vec![0];
        }
        let mut o: Vec<usize> = (0..).map(|j| j * s).take_while(|&o| o + k < len).collect();
        o.push(len - k);
        o
    };
    let mut mask = vec![false; hw];
    for &oy in &origins(h) {
        for &ox in &origins(w) {
            let (ey, ex) = (k.min(h), k.min(w));
            let mean = (0..ey)
                .flat_map(|y| (0..ex).map(move |q| (y, q)))
                .map(|(y, q)| gn[(oy + y) * w + ox + q])
                .sum::<f64>()
                / (ey * ex) as f64;
            if mean > thr {
                for y in 0..ey {
                    for q in 0..ex {
                        mask[(oy + y) * w + ox + q] = true;
                    }
                }
            }
        }
    }
    (0..c * hw)
        .map(|i| {
            let px = i % hw;
            let m = if mask[px] {
                (lambda * gn[px]).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let v = span.0 + (f64::from(x[i]) - span.0) * (1.0 - m);
            v.round().clamp(range.0, range.1) as f32
        })
        .collect()
}

/// A smooth 8-bit image with a high-frequency checkerboard "patch" in its top-left corner.
fn patched(h: usize, w: usize) -> Vec<f32> {
    let mut x = phantom(h, w, 30.0, 200.0, 0.0, 30);
    for r in 0..10 {
        for q in 0..10 {
            x[r * w + q] = if (r + q) % 2 == 0 { 255.0 } else { 0.0 };
        }
    }
    x
}

#[test]
fn lgs_matches_the_direct_implementation_and_suppresses_a_patch() {
    let (h, w) = (40, 36);
    let x = patched(h, w);
    let (y, audit) = run_sdk(
        "lgs",
        &json!({}),
        vec![frame8(h as u32, w as u32)],
        &x,
        [1, 1, h, w],
    )
    .unwrap();
    let want = lgs_ref(&x, 1, h, w, (0.0, 255.0), (0.0, 255.0), (15, 5, 0.1, 2.3));
    assert!(
        max_abs_diff(&y, &want) <= 1.0,
        "{}",
        max_abs_diff(&y, &want)
    );
    assert_integers_in(&y, 0.0, 255.0);
    // The patch's bright squares are driven to black; the smooth far corner is untouched.
    let patch_bright: f32 = (0..10 * 10)
        .map(|i| (i / 10, i % 10))
        .filter(|(r, q)| (r + q) % 2 == 0 && *r < 9 && *q < 9)
        .map(|(r, q)| y[r * w + q])
        .sum();
    assert_eq!(patch_bright, 0.0);
    for r in 25..h {
        for q in 25..w {
            assert_eq!(y[r * w + q], x[r * w + q], "({r}, {q})");
        }
    }
    // 40x36 with blocks of 15, stride 10: origins 0, 10, 20, 25 down and 0, 10, 20, 21 across.
    assert_eq!(audit[0]["windows"], json!(16.0));
    let smoothed = audit[0]["windows_smoothed"].as_f64().unwrap();
    assert!((1.0..16.0).contains(&smoothed), "{smoothed}");
    assert_audit_matches(&audit, &x, &y, 1);

    // RGB and a 16-bit window, other parameters.
    let mut rgb = Vec::new();
    for s in 0..3 {
        rgb.extend(phantom(h, w, 0.0, 255.0, 0.6, 40 + s));
    }
    let p = json!({"window": 8, "overlap": 3, "threshold": 0.2, "smoothing": 1.5});
    let (y, _) = run_sdk(
        "lgs",
        &p,
        vec![rgb8(h as u32, w as u32)],
        &rgb,
        [1, 3, h, w],
    )
    .unwrap();
    let want = lgs_ref(&rgb, 3, h, w, (0.0, 255.0), (0.0, 255.0), (8, 3, 0.2, 1.5));
    assert!(max_abs_diff(&y, &want) <= 1.0);
    assert_ne!(y, rgb);
    let x16 = phantom(h, w, 600.0, 1600.0, 0.5, 50);
    let (y, _) = run_sdk(
        "lgs",
        &p,
        vec![ct16(h as u32, w as u32)],
        &x16,
        [1, 1, h, w],
    )
    .unwrap();
    let want = lgs_ref(
        &x16,
        1,
        h,
        w,
        (864.0, 1264.0),
        (-32768.0, 32767.0),
        (8, 3, 0.2, 1.5),
    );
    assert!(max_abs_diff(&y, &want) <= 1.0);
    assert_ne!(y, x16);
}

#[test]
fn lgs_cpu_and_gpu_agree() {
    let (h, w) = (33, 30);
    let mut x = patched(h, w);
    x.extend(phantom(h, w, 0.0, 255.0, 0.7, 60));
    assert_backends_agree(
        "lgs",
        &json!({"window": 10, "overlap": 4, "threshold": 0.15}),
        vec![frame8(h as u32, w as u32); 2],
        &x,
        [2, 1, h, w],
    );
    let x16 = phantom(h, w, 500.0, 1700.0, 0.6, 61);
    assert_backends_agree(
        "lgs",
        &json!({}),
        vec![ct16(h as u32, w as u32)],
        &x16,
        [1, 1, h, w],
    );
}

// ---------------------------------------------------------------------------------------------
// jpeg

/// PIL's decode of `bytes`: interleaved samples.
fn pil_decode(bytes: &[u8]) -> (Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("x.jpg");
    let dst = dir.path().join("y.u8");
    std::fs::write(&src, bytes).unwrap();
    let info = oracle(&["jpeg-decode", src.to_str().unwrap(), dst.to_str().unwrap()]);
    (std::fs::read(&dst).unwrap(), info.trim().to_string())
}

#[test]
fn jpeg_output_is_what_libjpeg_decodes_from_the_same_stream() {
    let (h, w) = (24, 40);
    let x = phantom(h, w, 0.0, 255.0, 0.4, 70);
    let (y, audit) = run_sdk(
        "jpeg",
        &json!({"quality": 50}),
        vec![frame8(h as u32, w as u32)],
        &x,
        [1, 1, h, w],
    )
    .unwrap();
    // The stream the plugin wrote (the encoder is deterministic), decoded by PIL/libjpeg.
    let bytes8: Vec<u8> = x.iter().map(|&v| v as u8).collect();
    let stream = crate::jpeg::encode(&bytes8, w, h, 1, 50).unwrap();
    let (pil, info) = pil_decode(&stream);
    assert_eq!(info, format!("{w} {h} 1"));
    let pil: Vec<f32> = pil.iter().map(|&v| f32::from(v)).collect();
    // Two IDCT implementations: equal to within one level.
    assert!(max_abs_diff(&y, &pil) <= 1.0, "{}", max_abs_diff(&y, &pil));
    assert!(y != x, "quality 50 changed nothing");
    assert_audit_matches(&audit, &x, &y, 1);
    // Lower quality loses more.
    let err = |q: u8| -> f32 {
        let (y, _) = run_sdk(
            "jpeg",
            &json!({ "quality": q }),
            vec![frame8(h as u32, w as u32)],
            &x,
            [1, 1, h, w],
        )
        .unwrap();
        x.iter().zip(&y).map(|(a, b)| (a - b).abs()).sum()
    };
    assert!(err(10) > err(50) && err(50) > err(95));

    // RGB (4:2:0 chroma): upsampling differs between decoders, so a looser bound.
    let mut rgb = Vec::new();
    for s in 0..3 {
        rgb.extend(phantom(h, w, 0.0, 255.0, 0.2, 71 + s));
    }
    let (y, _) = run_sdk(
        "jpeg",
        &json!({}),
        vec![rgb8(h as u32, w as u32)],
        &rgb,
        [1, 3, h, w],
    )
    .unwrap();
    let hw = h * w;
    let inter: Vec<u8> = (0..3 * hw)
        .map(|i| rgb[(i % 3) * hw + i / 3] as u8)
        .collect();
    let (pil, info) = pil_decode(&crate::jpeg::encode(&inter, w, h, 3, 75).unwrap());
    assert_eq!(info, format!("{w} {h} 3"));
    let pil_planar: Vec<f32> = (0..3 * hw)
        .map(|i| f32::from(pil[(i % hw) * 3 + i / hw]))
        .collect();
    let mean = y
        .iter()
        .zip(&pil_planar)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / y.len() as f32;
    assert!(
        max_abs_diff(&y, &pil_planar) <= 8.0 && mean < 1.5,
        "mean {mean}"
    );
}

#[test]
fn jpeg_on_16_bit_ct_codes_the_window_and_keeps_values_outside_it() {
    let (h, w) = (16, 24);
    let mut x = phantom(h, w, 900.0, 1230.0, 0.3, 80);
    // A bone-like block far above the window (stored 3000 = HU 1976).
    for r in 0..4 {
        for q in 0..4 {
            x[r * w + q] = 3000.0;
        }
    }
    let m = ct16(h as u32, w as u32);
    let (y, audit) = run_sdk(
        "jpeg",
        &json!({"quality": 60}),
        vec![m.clone()],
        &x,
        [1, 1, h, w],
    )
    .unwrap();
    // Reference: window 864..1264 mapped to 0..255, coded, PIL-decoded, mapped back.
    let scale = 400.0 / 255.0;
    let u: Vec<f64> = x
        .iter()
        .map(|&v| ((f64::from(v) - 864.0) / scale).clamp(0.0, 255.0))
        .collect();
    let e: Vec<u8> = u.iter().map(|&v| (v + 0.5).floor() as u8).collect();
    let (d, _) = pil_decode(&crate::jpeg::encode(&e, w, h, 1, 60).unwrap());
    for i in 0..h * w {
        let want = (f64::from(x[i]) + (f64::from(d[i]) - u[i]) * scale).round();
        // One decoder level is 400/255 stored units.
        assert!(
            (f64::from(y[i]) - want).abs() <= scale + 1.0,
            "pixel {i}: {} vs {want}",
            y[i]
        );
    }
    // The block outside the window stays near 3000 instead of collapsing to the window edge.
    for r in 0..3 {
        for q in 0..3 {
            assert!((y[r * w + q] - 3000.0).abs() < 200.0, "{}", y[r * w + q]);
        }
    }
    assert_integers_in(&y, -32768.0, 32767.0);
    assert_audit_matches(&audit, &x, &y, 1);
}

#[test]
fn jpeg_cpu_and_gpu_agree() {
    let (h, w) = (16, 16);
    let mut x = phantom(h, w, 0.0, 255.0, 0.4, 90);
    x.extend(phantom(h, w, 0.0, 255.0, 0.4, 91));
    assert_backends_agree(
        "jpeg",
        &json!({"quality": 40}),
        vec![frame8(h as u32, w as u32); 2],
        &x,
        [2, 1, h, w],
    );
    let x16 = phantom(h, w, 700.0, 1400.0, 0.4, 92);
    assert_backends_agree(
        "jpeg",
        &json!({"quality": 40}),
        vec![ct16(h as u32, w as u32)],
        &x16,
        [1, 1, h, w],
    );
}

// ---------------------------------------------------------------------------------------------
// parameters

#[test]
fn bad_parameters_fail_create_with_a_clear_message() {
    let cases: [(&str, Value, &str); 10] = [
        ("bit-depth", json!({}), "bits"),
        ("bit-depth", json!({"bits": 0}), "bits must be in 1..=16"),
        ("bit-depth", json!({"bits": 17}), "bits must be in 1..=16"),
        ("jpeg", json!({"quality": 0}), "quality must be in 1..=100"),
        ("jpeg", json!({"quality": "high"}), "invalid parameters"),
        (
            "tv",
            json!({"weight": -1.0}),
            "weight must be a positive number",
        ),
        (
            "tv",
            json!({"weight": 0.1, "units": "hu"}),
            "expected `relative` or `stored`",
        ),
        (
            "tv",
            json!({"weight": 0.1, "iterations": 0}),
            "iterations must be in 1..=2000",
        ),
        (
            "lgs",
            json!({"window": 10, "overlap": 10}),
            "overlap (10) must be smaller than window (10)",
        ),
        (
            "lgs",
            json!({"threshold": 1.5}),
            "threshold must be in [0, 1]",
        ),
    ];
    for (name, params, want) in cases {
        let err = run_sdk(name, &params, vec![frame8(4, 4)], &[0.0; 16], [1, 1, 4, 4]).unwrap_err();
        assert!(err.contains(want), "{name} {params}: {err}");
    }
    // The real host validates against the schema first and names the parameter.
    let err = run_on(
        &CpuBackend::new(Some(1)),
        "lgs",
        &json!({"smoothing": 0}),
        vec![frame8(4, 4)],
        &[0.0; 16],
        [1, 1, 4, 4],
    )
    .unwrap_err();
    assert!(err.contains("smoothing"), "{err}");
}

#[test]
fn unusable_frames_fail_with_a_reason() {
    // JPEG cannot code 2 samples per pixel.
    let m = FrameMeta {
        samples_per_pixel: 2,
        ..frame8(4, 4)
    };
    let err = run_sdk("jpeg", &json!({}), vec![m], &[0.0; 32], [1, 2, 4, 4]).unwrap_err();
    assert!(err.contains("2 samples per pixel"), "{err}");
    // An empty stored range.
    let m = FrameMeta {
        value_range: (5.0, 5.0),
        ..frame8(4, 4)
    };
    let err = run_sdk(
        "bit-depth",
        &json!({"bits": 4}),
        vec![m],
        &[5.0; 16],
        [1, 1, 4, 4],
    )
    .unwrap_err();
    assert!(err.contains("invalid stored value range"), "{err}");
}

#[test]
fn noise_has_the_requested_spread_stays_on_the_grid_and_backends_agree() {
    let (h, w) = (64, 64);
    let x = vec![128f32; h * w];
    let frames = vec![frame8(h as u32, w as u32)];
    let p = json!({"sigma": 8.0});
    let cpu_b = CpuBackend::new(Some(1));
    let (y, audit) = run_on(&cpu_b, "random-noise", &p, frames.clone(), &x, [1, 1, h, w]).unwrap();
    assert_integers_in(&y, 0.0, 255.0);
    assert_audit_matches(&audit, &x, &y, 1);
    let d: Vec<f64> = y.iter().map(|v| f64::from(*v) - 128.0).collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let sd = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    // Rounding adds variance 1/12: sd = sqrt(64 + 1/12) = 8.005; standard error of sd ~0.09.
    assert!(mean.abs() < 0.5, "mean {mean}");
    assert!((sd - 8.0).abs() < 0.4, "sd {sd}");
    // The host's counter-based generator: the GPU draws the same noise (a value on a rounding
    // tie may move by one unit).
    let (g, _) = run_on(gpu(), "random-noise", &p, frames.clone(), &x, [1, 1, h, w]).unwrap();
    assert!(max_abs_diff(&y, &g) <= 1.0);
    assert!(y.iter().zip(&g).filter(|(a, b)| a != b).count() * 100 <= y.len());
    // Clamped at the range: a black frame stays in [0, 255].
    let black = vec![0f32; h * w];
    let (b, _) = run_on(&cpu_b, "random-noise", &p, frames, &black, [1, 1, h, w]).unwrap();
    assert_integers_in(&b, 0.0, 255.0);
    assert!(b.iter().any(|v| *v > 0.0));
    // `unit: window` on CT: 0.02 of the 400 HU window = 8 stored units.
    let ct = vec![1064f32; h * w];
    let (c, _) = run_on(
        &cpu_b,
        "random-noise",
        &json!({"sigma": 0.02, "unit": "window"}),
        vec![ct16(h as u32, w as u32)],
        &ct,
        [1, 1, h, w],
    )
    .unwrap();
    let sd_ct = (c
        .iter()
        .map(|v| (f64::from(*v) - 1064.0).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!((sd_ct - 8.0).abs() < 0.4, "CT sd {sd_ct}");
    assert!(
        run_on(
            &cpu_b,
            "random-noise",
            &json!({"sigma": 0}),
            vec![frame8(2, 2)],
            &[0.0; 4],
            [1, 1, 2, 2]
        )
        .is_err()
    );
}

/// The 2x2 median against a direct count on a hand-checked 3x3 plane, on both backends.
#[test]
fn median_2x2_takes_the_upper_middle_of_the_reflected_window() {
    // Plane:      Output (window rows {i-1,i}, cols {j-1,j}, -1 -> 0, upper middle of 4):
    // 1 9 2       1 9 9
    // 8 3 7       8 8 7
    // 4 6 5       8 6 6
    let x = [1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0];
    let want = [1.0, 9.0, 9.0, 8.0, 8.0, 7.0, 8.0, 6.0, 6.0];
    let frames = vec![frame8(3, 3)];
    let cpu_b = CpuBackend::new(Some(1));
    let (y, audit) = run_on(
        &cpu_b,
        "median-2x2",
        &json!({}),
        frames.clone(),
        &x,
        [1, 1, 3, 3],
    )
    .unwrap();
    assert_eq!(y, want);
    assert_audit_matches(&audit, &x, &y, 1);
    let (g, _) = run_on(gpu(), "median-2x2", &json!({}), frames, &x, [1, 1, 3, 3]).unwrap();
    assert_eq!(g, want);
    // Planes are filtered separately (RGB): a constant plane stays constant.
    let mut rgb = vec![50f32; 3 * 9];
    rgb[..9].copy_from_slice(&x);
    let (y, _) = run_on(
        &cpu_b,
        "median-2x2",
        &json!({}),
        vec![rgb8(3, 3)],
        &rgb,
        [1, 3, 3, 3],
    )
    .unwrap();
    assert_eq!(&y[..9], &want);
    assert!(y[9..].iter().all(|v| *v == 50.0));
}
