//! Every GPU primitive, forward and backward, against the float64 reference on small random
//! inputs (lavapipe in CI: `AdapterPolicy::Any` picks it when no GPU exists). One device per test
//! process. Tolerances: relative 1e-4 forward, 1e-3 backward (see `reference::assert_close`).

use std::sync::OnceLock;

use super::*;
use crate::runtime::backend::{
    CoordTransform, NearestMode, PoolKind, ResizeMode, counter_normal, counter_uniform,
};
use crate::runtime::reference::{self as r, RefLossTargets, RefTensor, assert_close};

const FWD: f64 = 1e-4;
const BWD: f64 = 1e-3;

fn gpu() -> &'static GpuBackend {
    static DEV: OnceLock<GpuBackend> = OnceLock::new();
    DEV.get_or_init(|| {
        GpuBackend::new(GpuOptions {
            adapter: AdapterPolicy::Any,
        })
        .unwrap_or_else(|e| panic!("GPU tests need an adapter (lavapipe is fine): {e}"))
    })
}

fn up(t: &RefTensor) -> Tensor<GpuBackend> {
    gpu().upload(&t.to_f32(), &t.shape)
}

fn check(got: &Tensor<GpuBackend>, want: &RefTensor, tol: f64, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    assert_close(&gpu().download(got), want, tol, what);
}

/// Random values in [lo, hi) (exactly representable in f32).
fn rand_in(shape: &[usize], seed: u64, lo: f64, hi: f64) -> RefTensor {
    let t = RefTensor::random(shape, seed);
    RefTensor::new(
        t.data
            .iter()
            .map(|v| lo + (v + 1.0) * 0.5 * (hi - lo))
            .collect(),
        shape,
    )
    .reshape(shape)
}

// ---- device ---------------------------------------------------------------------------------

#[test]
fn describe_names_adapter_and_api() {
    let d = gpu().describe();
    assert!(d.starts_with("gpu (") && d.ends_with(')'), "{d}");
    assert!(
        ["Vulkan", "Metal", "DX12"]
            .iter()
            .any(|api| d.contains(api)),
        "{d}"
    );
}

#[test]
fn adapter_policies_pick_matching_devices_or_say_why() {
    match GpuBackend::new(GpuOptions {
        adapter: AdapterPolicy::HardwareOnly,
    }) {
        Ok(b) => assert!(!b.is_software(), "HardwareOnly returned {}", b.describe()),
        Err(e @ GpuError::OnlySoftware { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("hardware GPU is required"), "{msg}");
            // This machine has only software: the default device must be that one.
            assert!(gpu().is_software());
        }
        Err(e) => panic!("unexpected error for HardwareOnly: {e}"),
    }
    if gpu().is_software() {
        let sw = GpuBackend::new(GpuOptions {
            adapter: AdapterPolicy::SoftwareOnly,
        })
        .expect("a software adapter exists when the default device is software");
        assert!(sw.is_software());
    }
    assert!(
        GpuError::NoAdapter
            .to_string()
            .contains("apt-get install mesa-vulkan-drivers")
    );
    let e = GpuError::NoSoftware {
        found: "X (DiscreteGpu)".into(),
    };
    assert!(e.to_string().contains("mesa-vulkan-drivers") && e.to_string().contains("X ("));
}

// ---- data movement ---------------------------------------------------------------------------

#[test]
fn upload_download_fill_zeros_roundtrip() {
    let x = RefTensor::random(&[2, 3, 4], 7);
    check(&up(&x), &x, 0.0, "roundtrip");
    check(
        &gpu().fill(&[3, 5], -2.5),
        &r::fill(&[3, 5], -2.5),
        0.0,
        "fill",
    );
    check(
        &gpu().zeros(&[4, 1, 3]),
        &r::zeros(&[4, 1, 3]),
        0.0,
        "zeros",
    );
    let e = gpu().upload(&[], &[0, 3]);
    assert!(gpu().download(&e).is_empty());
}

#[test]
fn transpose_matches_reference() {
    for (shape, perm) in [
        (vec![3, 4], vec![1, 0]),
        (vec![2, 3, 4, 5], vec![0, 2, 3, 1]),
        (vec![2, 3, 4, 5], vec![3, 1, 0, 2]),
        (
            vec![2, 1, 3, 1, 2, 2, 1, 2, 3],
            vec![8, 7, 6, 5, 4, 3, 2, 1, 0],
        ),
    ] {
        let x = RefTensor::random(&shape, 11);
        check(
            &gpu().transpose(&up(&x), &perm),
            &r::transpose(&x, &perm),
            0.0,
            "transpose",
        );
    }
}

#[test]
fn concat_slice_broadcast_match_reference() {
    let a = RefTensor::random(&[2, 3, 4], 1);
    let b = RefTensor::random(&[2, 1, 4], 2);
    let c = RefTensor::random(&[2, 5, 4], 3);
    let (ga, gb, gc) = (up(&a), up(&b), up(&c));
    check(
        &gpu().concat(&[&ga, &gb, &gc], 1),
        &r::concat(&[&a, &b, &c], 1),
        0.0,
        "concat 1",
    );
    let d = RefTensor::random(&[3, 3, 4], 4);
    check(
        &gpu().concat(&[&ga, &up(&d)], 0),
        &r::concat(&[&a, &d], 0),
        0.0,
        "concat 0",
    );
    let e = RefTensor::random(&[2, 3, 2], 5);
    check(
        &gpu().concat(&[&up(&e), &ga], 2),
        &r::concat(&[&e, &a], 2),
        0.0,
        "concat 2",
    );
    for (axis, s, t) in [(0, 1, 2), (1, 1, 3), (2, 0, 3), (2, 2, 2)] {
        check(
            &gpu().slice(&ga, axis, s, t),
            &r::slice(&a, axis, s, t),
            0.0,
            "slice",
        );
    }
    let x = RefTensor::random(&[3, 1], 6);
    check(
        &gpu().broadcast_to(&up(&x), &[2, 3, 4]),
        &r::broadcast_to(&x, &[2, 3, 4]),
        0.0,
        "bc",
    );
    let y = RefTensor::random(&[1, 4, 1, 2], 8);
    let to = [3, 4, 5, 2];
    check(
        &gpu().broadcast_to(&up(&y), &to),
        &r::broadcast_to(&y, &to),
        0.0,
        "bc 4d",
    );
}

#[test]
fn pad_and_adjoint_match_reference_in_every_mode() {
    let x = RefTensor::random(&[2, 3, 4, 5], 9);
    let cases: [Vec<(usize, usize)>; 3] = [
        vec![(0, 0), (0, 0), (1, 2), (2, 1)],
        vec![(1, 0), (0, 1), (3, 0), (0, 0)],
        // Reflect pads longer than n - 1 bounce back and forth.
        vec![(0, 0), (0, 0), (7, 5), (9, 4)],
    ];
    for pads in &cases {
        for mode in [PadMode::Constant, PadMode::Reflect, PadMode::Edge] {
            let want = r::pad(&x, pads, mode, 0.75);
            let what = format!("pad {mode:?} {pads:?}");
            check(&gpu().pad(&up(&x), pads, mode, 0.75), &want, 0.0, &what);
            let dy = RefTensor::random(&want.shape, 10);
            let dx = gpu().pad_backward(&up(&dy), &x.shape, pads, mode);
            check(
                &dx,
                &r::pad_backward(&dy, &x.shape, pads, mode),
                FWD,
                &format!("{what} bwd"),
            );
        }
    }
}

// ---- conv ----------------------------------------------------------------------------------

struct ConvCase {
    x: [usize; 4],
    w: [usize; 4],
    p: Conv2dParams,
}

fn conv_cases() -> Vec<ConvCase> {
    let p = |s: [usize; 2], pad: [usize; 4], d: [usize; 2], g: usize| Conv2dParams {
        stride: s,
        pad,
        dilation: d,
        groups: g,
    };
    vec![
        ConvCase {
            x: [1, 3, 7, 7],
            w: [4, 3, 3, 3],
            p: p([1, 1], [1; 4], [1, 1], 1),
        },
        ConvCase {
            x: [3, 4, 9, 8],
            w: [6, 2, 3, 2],
            p: p([2, 2], [1, 0, 2, 1], [1, 1], 2),
        },
        ConvCase {
            x: [1, 2, 10, 10],
            w: [2, 2, 3, 3],
            p: p([1, 1], [2; 4], [2, 2], 1),
        },
        ConvCase {
            x: [3, 4, 11, 9],
            w: [4, 2, 3, 3],
            p: p([2, 1], [1, 2, 0, 1], [2, 1], 2),
        },
        // Depthwise.
        ConvCase {
            x: [2, 4, 6, 6],
            w: [4, 1, 3, 3],
            p: p([1, 1], [1; 4], [1, 1], 4),
        },
        // Several 64-wide tiles in every GEMM dimension, K not a multiple of 16.
        ConvCase {
            x: [1, 5, 12, 12],
            w: [70, 5, 3, 3],
            p: p([1, 1], [1; 4], [1, 1], 1),
        },
        // Long weight-gradient reduction (N*oh*ow = 800): split-K with a fixed-order final sum.
        ConvCase {
            x: [2, 3, 20, 20],
            w: [4, 3, 3, 3],
            p: p([1, 1], [1; 4], [1, 1], 1),
        },
        // 1x1 conv with stride 2 (strided gather of dy in the adjoint skips most inputs).
        ConvCase {
            x: [2, 3, 5, 6],
            w: [5, 3, 1, 1],
            p: p([2, 2], [0; 4], [1, 1], 1),
        },
        // One tile per group and a forward reduction of 288: split-K forward (bias once).
        ConvCase {
            x: [2, 64, 5, 5],
            w: [8, 32, 3, 3],
            p: p([1, 1], [1; 4], [1, 1], 2),
        },
        // An input-gradient reduction of 576 over one tile: split-K input gradient, strided.
        ConvCase {
            x: [1, 8, 6, 5],
            w: [64, 8, 3, 3],
            p: p([2, 2], [1; 4], [1, 1], 1),
        },
    ]
}

#[test]
fn conv2d_forward_matches_reference() {
    for (i, c) in conv_cases().iter().enumerate() {
        let x = RefTensor::random(&c.x, 100 + i as u64);
        let w = RefTensor::random(&c.w, 200 + i as u64);
        let b = RefTensor::random(&[c.w[0]], 300 + i as u64);
        let y = gpu().conv2d(&up(&x), &up(&w), Some(&up(&b)), &c.p);
        check(
            &y,
            &r::conv2d(&x, &w, Some(&b), &c.p),
            FWD,
            &format!("conv {i} {:?}", c.p),
        );
        let y = gpu().conv2d(&up(&x), &up(&w), None, &c.p);
        check(
            &y,
            &r::conv2d(&x, &w, None, &c.p),
            FWD,
            &format!("conv {i} no bias"),
        );
    }
}

#[test]
fn conv2d_backward_matches_reference() {
    for (i, c) in conv_cases().iter().enumerate() {
        let x = RefTensor::random(&c.x, 400 + i as u64);
        let w = RefTensor::random(&c.w, 500 + i as u64);
        let [oh, ow] = r::conv2d_out_hw(c.x[2], c.x[3], c.w[2], c.w[3], &c.p);
        let dy = RefTensor::random(&[c.x[0], c.w[0], oh, ow], 600 + i as u64);
        let dx = gpu().conv2d_backward_input(&up(&dy), &up(&w), &c.p, c.x);
        let want = r::conv2d_backward_input(&dy, &w, &c.p, c.x);
        check(&dx, &want, BWD, &format!("conv {i} dx {:?}", c.p));
        let dw = gpu().conv2d_backward_weight(&up(&dy), &up(&x), &c.p, c.w);
        let want = r::conv2d_backward_weight(&dy, &x, &c.p, c.w);
        check(&dw, &want, BWD, &format!("conv {i} dw {:?}", c.p));
    }
}

#[test]
fn split_k_covers_the_reduction_exactly() {
    for (k, tiles) in [
        (1, 1),
        (15, 1),
        (800, 1),
        (401_408, 9),
        (1000, 300),
        (5000, 3),
    ] {
        let (chunk, splits) = conv::split_k(k, tiles);
        assert!(
            chunk % 16 == 0 && splits >= 1,
            "{k} {tiles}: {chunk} x {splits}"
        );
        assert!(
            chunk * splits >= k && chunk * (splits - 1) < k,
            "{k} {tiles}: {chunk} x {splits}"
        );
    }
    assert!(
        conv::split_k(401_408, 9).1 > 1,
        "large reductions must split"
    );
    assert_eq!(conv::split_k(1000, 300).1, 1, "enough tiles: no split");
    // The new cases of `conv_cases` really take the split paths they are there for.
    assert_eq!(conv::split_k(32 * 9, 2).1, 2, "split-K forward case");
    assert_eq!(conv::split_k(64 * 9, 1).1, 3, "split-K input-gradient case");
}

#[test]
fn results_are_bit_reproducible() {
    let c = &conv_cases()[1];
    let x = up(&RefTensor::random(&c.x, 1));
    let w = up(&RefTensor::random(&c.w, 2));
    let a = gpu().download(&gpu().conv2d(&x, &w, None, &c.p));
    let b = gpu().download(&gpu().conv2d(&x, &w, None, &c.p));
    assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    let s1 = gpu().download(&gpu().reduce(&x, &[1, 2, 3], ReduceOp::Sum, false));
    let s2 = gpu().download(&gpu().reduce(&x, &[1, 2, 3], ReduceOp::Sum, false));
    assert_eq!(s1, s2);
}

// ---- matmul --------------------------------------------------------------------------------

#[test]
fn matmul_matches_reference_with_transposes_and_batch_broadcast() {
    let cases: [(Vec<usize>, Vec<usize>, bool, bool); 7] = [
        (vec![5, 7], vec![7, 3], false, false),
        (vec![7, 5], vec![7, 3], true, false),
        (vec![5, 7], vec![3, 7], false, true),
        (vec![7, 5], vec![3, 7], true, true),
        // Multiple tiles in M and N, K spanning several 16-slices with a remainder.
        (vec![70, 37], vec![37, 81], false, false),
        (vec![2, 1, 5, 7], vec![3, 7, 4], false, false),
        (vec![4, 6, 9], vec![1, 4, 6], true, true),
    ];
    for (i, (sa, sb, ta, tb)) in cases.iter().enumerate() {
        let a = RefTensor::random(sa, 700 + i as u64);
        let b = RefTensor::random(sb, 800 + i as u64);
        let got = gpu().matmul(&up(&a), &up(&b), *ta, *tb);
        check(
            &got,
            &r::matmul(&a, &b, *ta, *tb),
            FWD,
            &format!("matmul {sa:?} x {sb:?}"),
        );
    }
}

// ---- pool ----------------------------------------------------------------------------------

fn pool_out(n: usize, k: usize, s: usize, p0: usize, p1: usize, d: usize, ceil: bool) -> usize {
    let span = d * (k - 1) + 1;
    let span_room = n + p0 + p1 - span;
    if ceil {
        span_room.div_ceil(s) + 1
    } else {
        span_room / s + 1
    }
}

#[test]
fn pool2d_forward_and_backward_match_reference() {
    let kinds = [
        PoolKind::Max,
        PoolKind::Avg {
            count_include_pad: true,
        },
        PoolKind::Avg {
            count_include_pad: false,
        },
    ];
    // (x shape, kernel, stride, pad, dilation, ceil_mode)
    let geoms = [
        ([1, 2, 6, 6], [2, 2], [2, 2], [0; 4], [1, 1], false),
        ([3, 2, 7, 8], [3, 3], [2, 2], [1, 1, 1, 1], [1, 1], false),
        ([2, 3, 8, 8], [3, 2], [2, 3], [1, 0, 0, 1], [1, 1], true),
        ([1, 2, 9, 9], [3, 3], [1, 2], [2, 2, 2, 2], [2, 2], false),
    ];
    for (gi, (xs, k, s, pad, d, ceil)) in geoms.iter().enumerate() {
        let oh = pool_out(xs[2], k[0], s[0], pad[0], pad[2], d[0], *ceil);
        let ow = pool_out(xs[3], k[1], s[1], pad[1], pad[3], d[1], *ceil);
        for kind in kinds {
            let p = Pool2dParams {
                kind,
                kernel: *k,
                stride: *s,
                pad: *pad,
                dilation: *d,
                out_hw: [oh, ow],
            };
            let x = RefTensor::random(xs, 900 + gi as u64);
            let what = format!("pool {gi} {kind:?}");
            check(&gpu().pool2d(&up(&x), &p), &r::pool2d(&x, &p), FWD, &what);
            let dy = RefTensor::random(&[xs[0], xs[1], oh, ow], 950 + gi as u64);
            let dx = gpu().pool2d_backward(&up(&dy), &up(&x), &p);
            check(
                &dx,
                &r::pool2d_backward(&dy, &x, &p),
                BWD,
                &format!("{what} bwd"),
            );
        }
    }
}

// ---- elementwise ---------------------------------------------------------------------------

#[test]
fn unary_forward_and_backward_match_reference() {
    let shape = [3, 4, 5];
    let ops: [(Unary, f64, f64); 16] = [
        (Unary::Relu, -2.0, 2.0),
        (Unary::LeakyRelu { alpha: 0.1 }, -2.0, 2.0),
        (Unary::Sigmoid, -8.0, 8.0),
        (Unary::Tanh, -3.0, 3.0),
        (Unary::Tanh, -0.2, 0.2),
        (
            Unary::Clip {
                min: -0.5,
                max: 0.25,
            },
            -1.0,
            1.0,
        ),
        (Unary::Neg, -2.0, 2.0),
        (Unary::Exp, -4.0, 4.0),
        (Unary::Log, 0.01, 5.0),
        (Unary::Sqrt, 0.01, 5.0),
        (Unary::Abs, -2.0, 2.0),
        (Unary::Affine { a: -1.5, b: 0.25 }, -2.0, 2.0),
        (Unary::Powf { p: 3.0 }, -2.0, 2.0),
        (Unary::Powf { p: 0.5 }, 0.01, 4.0),
        (Unary::Powf { p: -1.5 }, 0.1, 3.0),
        (Unary::Sign, -2.0, 2.0),
    ];
    for (i, (op, lo, hi)) in ops.iter().enumerate() {
        let x = rand_in(&shape, 1000 + i as u64, *lo, *hi);
        let y_ref = r::unary(*op, &x);
        let y = gpu().unary(*op, &up(&x));
        check(&y, &y_ref, FWD, &format!("{op:?}"));
        let dy = RefTensor::random(&shape, 1100 + i as u64);
        // Backward from the reference's own y (rounded to f32), as the executor would pass it.
        let yr = RefTensor::from_f32(&y_ref.to_f32(), &shape);
        let dx = gpu().unary_backward(*op, &up(&x), &up(&yr), &up(&dy));
        check(
            &dx,
            &r::unary_backward(*op, &x, &yr, &dy),
            BWD,
            &format!("{op:?} bwd"),
        );
    }
}

#[test]
fn binary_broadcasts_like_numpy() {
    let shapes: [(Vec<usize>, Vec<usize>); 5] = [
        (vec![2, 3, 4], vec![2, 3, 4]),
        (vec![2, 3, 4], vec![3, 1]),
        (vec![1], vec![2, 3]),
        (vec![4, 1, 5], vec![1, 3, 1]),
        (vec![2, 1, 3, 1, 2], vec![5, 1, 2, 1]),
    ];
    for (i, (sa, sb)) in shapes.iter().enumerate() {
        let a = RefTensor::random(sa, 1200 + i as u64);
        // Keep divisors away from 0.
        let b = rand_in(sb, 1300 + i as u64, 0.5, 2.0);
        for op in [
            Binary::Add,
            Binary::Sub,
            Binary::Mul,
            Binary::Div,
            Binary::Max,
            Binary::Min,
        ] {
            let got = gpu().binary(op, &up(&a), &up(&b));
            check(
                &got,
                &r::binary(op, &a, &b),
                FWD,
                &format!("{op:?} {sa:?} {sb:?}"),
            );
        }
    }
}

#[test]
fn reduce_sum_to_is_the_adjoint_of_broadcast() {
    let x = RefTensor::random(&[2, 3, 4, 5], 1400);
    for shape in [
        vec![3, 1, 5],
        vec![1],
        vec![2, 1, 4, 1],
        vec![2, 3, 4, 5],
        vec![5],
    ] {
        let got = gpu().reduce_sum_to(&up(&x), &shape);
        check(
            &got,
            &r::reduce_sum_to(&x, &shape),
            FWD,
            &format!("sum_to {shape:?}"),
        );
    }
    // A long reduction (one workgroup per output).
    let y = RefTensor::random(&[300, 7], 1401);
    check(
        &gpu().reduce_sum_to(&up(&y), &[7]),
        &r::reduce_sum_to(&y, &[7]),
        FWD,
        "sum_to long",
    );
}

// ---- reduce / softmax / loss ---------------------------------------------------------------

#[test]
fn reduce_matches_reference() {
    let x = RefTensor::random(&[3, 4, 5, 6], 1500);
    let axes_list: [&[usize]; 6] = [&[0], &[1, 3], &[2], &[0, 1, 2, 3], &[], &[1, 2, 3]];
    for axes in axes_list {
        for op in [ReduceOp::Sum, ReduceOp::Mean] {
            for keep in [false, true] {
                let got = gpu().reduce(&up(&x), axes, op, keep);
                let what = format!("reduce {axes:?} {op:?} keep={keep}");
                check(&got, &r::reduce(&x, axes, op, keep), FWD, &what);
            }
        }
    }
}

#[test]
fn softmax_forward_and_backward_match_reference() {
    let x = rand_in(&[3, 5, 4], 1600, -6.0, 6.0);
    for axis in 0..3 {
        for log in [false, true] {
            let y_ref = r::softmax(&x, axis, log);
            let what = format!("softmax axis {axis} log={log}");
            check(&gpu().softmax(&up(&x), axis, log), &y_ref, FWD, &what);
            let yr = RefTensor::from_f32(&y_ref.to_f32(), &x.shape);
            let dy = RefTensor::random(&x.shape, 1601);
            let dx = gpu().softmax_backward(&up(&yr), &up(&dy), axis, log);
            check(
                &dx,
                &r::softmax_backward(&yr, &dy, axis, log),
                BWD,
                &format!("{what} bwd"),
            );
        }
    }
}

#[test]
fn losses_match_reference() {
    let logits = rand_in(&[3, 7], 1700, -4.0, 4.0);
    let classes = [2u32, 0, 6];
    for kind in [
        Loss::CrossEntropy,
        Loss::CwMargin { kappa: 0.0 },
        Loss::CwMargin { kappa: 50.0 },
        Loss::CwMargin { kappa: -0.5 },
        Loss::Dlr,
    ] {
        let (l, g) = gpu().loss(kind, &up(&logits), &LossTargets::Classes(&classes));
        let (wl, wg) = r::loss(kind, &logits, &RefLossTargets::Classes(&classes));
        check(&l, &wl, FWD, &format!("{kind:?} loss"));
        check(&g, &wg, BWD, &format!("{kind:?} grad"));
    }
    // MSE over a dense per-pixel target, with more elements per sample than one workgroup.
    let z = RefTensor::random(&[2, 3, 10, 11], 1701);
    let t = RefTensor::random(&[2, 3, 10, 11], 1702);
    let (l, g) = gpu().loss(Loss::Mse, &up(&z), &LossTargets::Dense(&up(&t)));
    let (wl, wg) = r::loss(Loss::Mse, &z, &RefLossTargets::Dense(&t));
    check(&l, &wl, FWD, "mse loss");
    check(&g, &wg, BWD, "mse grad");
}

// ---- resize --------------------------------------------------------------------------------

#[test]
fn resize_forward_and_backward_match_reference() {
    let coords = [
        CoordTransform::HalfPixel,
        CoordTransform::PytorchHalfPixel,
        CoordTransform::AlignCorners,
        CoordTransform::Asymmetric,
    ];
    let mut modes = vec![ResizeMode::Linear, ResizeMode::Area];
    for nm in [
        NearestMode::RoundPreferFloor,
        NearestMode::RoundPreferCeil,
        NearestMode::Floor,
        NearestMode::Ceil,
    ] {
        modes.push(ResizeMode::Nearest(nm));
    }
    let x = RefTensor::random(&[2, 3, 6, 7], 1800);
    for (mi, mode) in modes.iter().enumerate() {
        for (ci, coord) in coords.iter().enumerate() {
            for out_hw in [[9, 12], [4, 3], [1, 5]] {
                let p = ResizeParams {
                    mode: *mode,
                    coord: *coord,
                    out_hw,
                };
                let what = format!("resize {mode:?} {coord:?} {out_hw:?}");
                check(&gpu().resize(&up(&x), &p), &r::resize(&x, &p), FWD, &what);
                let dy = RefTensor::random(&[2, 3, out_hw[0], out_hw[1]], (mi * 10 + ci) as u64);
                let dx = gpu().resize_backward(&up(&dy), [2, 3, 6, 7], &p);
                let want = r::resize_backward(&dy, [2, 3, 6, 7], &p);
                check(&dx, &want, BWD, &format!("{what} bwd"));
            }
        }
    }
}

// ---- perturbation --------------------------------------------------------------------------

#[test]
fn steps_and_projections_match_reference() {
    let shape = [3, 2, 5, 4];
    let x = RefTensor::random(&shape, 1900);
    let mut g = RefTensor::random(&shape, 1901);
    // A zero gradient sample (l2_step must leave it alone) and exact zeros for sign.
    for v in &mut g.data[40..80] {
        *v = 0.0;
    }
    g.data[0] = 0.0;
    let (gx, gg) = (up(&x), up(&g));
    check(
        &gpu().sign_step(&gx, &gg, 0.03),
        &r::sign_step(&x, &g, 0.03),
        FWD,
        "sign_step",
    );
    check(
        &gpu().l2_step(&gx, &gg, 0.5),
        &r::l2_step(&x, &g, 0.5),
        FWD,
        "l2_step",
    );
    let x0 = RefTensor::random(&shape, 1902);
    for (eps, norm) in [(0.1, Norm::Linf), (1.0, Norm::L2), (100.0, Norm::L2)] {
        let got = gpu().project(&gx, &up(&x0), eps, norm);
        check(
            &got,
            &r::project(&x, &x0, eps, norm),
            FWD,
            &format!("project {norm:?} {eps}"),
        );
    }
    for norm in [Norm::L1, Norm::L2, Norm::Linf] {
        let got = gpu().norm_per_sample(&gx, norm);
        check(
            &got,
            &r::norm_per_sample(&x, norm),
            FWD,
            &format!("norm {norm:?}"),
        );
    }
    let (lo, hi) = ([-0.5f32, 0.0, -1.0], [0.5f32, 0.25, 1.0]);
    let got = gpu().clamp_per_sample(&gx, &lo, &hi);
    check(
        &got,
        &r::clamp_per_sample(&x, &lo, &hi),
        0.0,
        "clamp_per_sample",
    );
}

#[test]
fn random_uniform_is_bit_exact_with_the_cpu_generator() {
    for seed in [0u64, 1, 0xdead_beef_0123_4567, u64::MAX] {
        let n = 1000;
        let got = gpu().download(&gpu().random_uniform(&[n], seed, 0.0, 1.0));
        for (i, &v) in got.iter().enumerate() {
            let want = counter_uniform(seed, i as u32);
            assert_eq!(v.to_bits(), want.to_bits(), "seed {seed} element {i}");
        }
        // lo + (hi - lo) * u: bit-exact on lavapipe; a GPU compiler may fuse it into an FMA
        // (WGSL cannot forbid contraction), hence a tolerance here.
        let shifted = gpu().random_uniform(&[10, 10], seed, -2.0, 3.0);
        check(
            &shifted,
            &r::random_uniform(&[10, 10], seed, -2.0, 3.0),
            FWD,
            "uniform lo/hi",
        );
    }
    let normal = gpu().download(&gpu().random_normal(&[4096], 42, 1.0));
    for (i, &v) in normal.iter().enumerate() {
        let want = counter_normal(42, i as u32);
        assert!(
            (v - want).abs() <= 1e-3 * want.abs().max(1.0),
            "normal {i}: {v} vs {want}"
        );
    }
    let mean = normal.iter().sum::<f32>() / normal.len() as f32;
    assert!(mean.abs() < 0.1, "normal mean {mean}");
    let scaled = gpu().random_normal(&[7, 3], 5, 0.5);
    check(
        &scaled,
        &r::random_normal(&[7, 3], 5, 0.5),
        1e-3,
        "normal std",
    );
}

// ---- infrastructure ------------------------------------------------------------------------

#[test]
fn long_op_chains_reuse_pooled_buffers_correctly() {
    // Far more ops than one batch, every intermediate dropped at once: pooled buffers are reused
    // while earlier work may still be unsubmitted.
    let one = gpu().fill(&[33, 17], 1.0);
    let mut acc = gpu().zeros(&[33, 17]);
    for _ in 0..300 {
        let tmp = gpu().unary(Unary::Affine { a: 1.0, b: 0.5 }, &acc);
        acc = gpu().binary(Binary::Add, &tmp, &one);
        acc = gpu().binary(Binary::Sub, &acc, &gpu().fill(&[1], 0.5));
    }
    let got = gpu().download(&acc);
    assert!(got.iter().all(|&v| v == 300.0), "{:?}", &got[..4]);
}

#[test]
fn dispatches_beyond_one_grid_row_fold_into_two_dimensions() {
    // 70_000 outputs of a long reduction = 70_000 workgroups > 65_535 per grid dimension.
    let (rows, cols) = (70_000usize, 64usize);
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| ((i % 7) as f32) - 3.0 + (i / cols) as f32)
        .collect();
    let x = gpu().upload(&data, &[rows, cols]);
    let s = gpu().download(&gpu().reduce(&x, &[1], ReduceOp::Sum, false));
    for (rw, &v) in s.iter().enumerate() {
        let want: f64 = (0..cols).map(|c| data[rw * cols + c] as f64).sum();
        assert!(
            (v as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
            "row {rw}: {v} vs {want}"
        );
    }
}
