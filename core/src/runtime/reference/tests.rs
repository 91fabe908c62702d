//! The reference checked against itself (backward = finite differences of forward) and against
//! hand-computed values.

use super::*;
use crate::runtime::backend::{Binary, Loss, PoolKind};

const H: f64 = 1e-6;

/// <dy, f(x)> — the scalar whose gradient every backward function computes.
fn dot(a: &RefTensor, b: &RefTensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    a.data.iter().zip(&b.data).map(|(x, y)| x * y).sum()
}

/// Central finite differences of `x -> <dy, f(x)>`.
fn fd_grad(x: &RefTensor, dy: &RefTensor, f: impl Fn(&RefTensor) -> RefTensor) -> RefTensor {
    let mut g = RefTensor::zeros(&x.shape);
    let mut xp = x.clone();
    for i in 0..x.len() {
        xp.data[i] = x.data[i] + H;
        let fp = dot(dy, &f(&xp));
        xp.data[i] = x.data[i] - H;
        let fm = dot(dy, &f(&xp));
        xp.data[i] = x.data[i];
        g.data[i] = (fp - fm) / (2.0 * H);
    }
    g
}

fn assert_grad(got: &RefTensor, want: &RefTensor, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shapes");
    let scale = want
        .data
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-3);
    for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * scale + 1e-6 * w.abs(),
            "{what}: element {i}: analytic {g} vs finite difference {w}"
        );
    }
    // The check must have something to check.
    assert!(
        want.data.iter().any(|v| v.abs() > 1e-6),
        "{what}: gradient is identically zero"
    );
}

fn approx(got: &RefTensor, want: &[f64], what: &str) {
    assert_eq!(got.data.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.data.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-9, "{what}: element {i}: {g} != {w}");
    }
}

fn conv_params(stride: usize, pad: [usize; 4], dil: usize, groups: usize) -> Conv2dParams {
    Conv2dParams {
        stride: [stride, stride],
        pad,
        dilation: [dil, dil],
        groups,
    }
}

// ---- hand-computed cases ---------------------------------------------------------------------

#[test]
fn conv_3x3_on_known_4x4() {
    // x = 0..16 row-major, w = all ones except centre 2 -> each output is its window sum + centre.
    let x = RefTensor::new((0..16).map(|v| v as f64).collect(), &[1, 1, 4, 4]);
    let mut wd = vec![1.0; 9];
    wd[4] = 2.0;
    let w = RefTensor::new(wd, &[1, 1, 3, 3]);
    let b = RefTensor::new(vec![0.5], &[1]);
    let y = conv2d(&x, &w, Some(&b), &Conv2dParams::default());
    assert_eq!(y.shape, [1, 1, 2, 2]);
    // Window at (0,0): 0+1+2+4+5+6+8+9+10 = 45, centre 5 -> 50 (+0.5 bias).
    approx(&y, &[50.5, 60.5, 90.5, 100.5], "conv 3x3");

    // Pad 1, stride 2: output (0,0) window covers x[0..2,0..2] = 0,1,4,5 with centre at x[0,0].
    let y = conv2d(&x, &w, None, &conv_params(2, [1, 1, 1, 1], 1, 1));
    assert_eq!(y.shape, [1, 1, 2, 2]);
    // (0,0): 0+1+4+5 + extra centre 0 = 10; (0,1): centre x[0,2]=2: 1+2+3+5+6+7 + 2 = 26
    // (1,0): centre x[2,0]=8: 4+5+8+9+12+13 + 8 = 59; (1,1): centre x[2,2]=10:
    // 5+6+7+9+10+11+13+14+15 + 10 = 100.
    approx(&y, &[10.0, 26.0, 59.0, 100.0], "conv pad1 stride2");

    // Dilation 2, 2x2 kernel of ones on 4x4: window (0,0) takes x[0,0],x[0,2],x[2,0],x[2,2].
    let w = RefTensor::new(vec![1.0; 4], &[1, 1, 2, 2]);
    let y = conv2d(&x, &w, None, &conv_params(1, [0; 4], 2, 1));
    approx(&y, &[20.0, 24.0, 36.0, 40.0], "conv dilation 2");
}

#[test]
fn grouped_conv_keeps_groups_apart() {
    // 2 groups of 1 channel: output 0 sees only channel 0, output 1 only channel 1.
    let x = RefTensor::new(
        vec![1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0],
        &[1, 2, 2, 2],
    );
    let w = RefTensor::new(vec![1.0; 8], &[2, 1, 2, 2]);
    let y = conv2d(&x, &w, None, &conv_params(1, [0; 4], 1, 2));
    approx(&y, &[10.0, 100.0], "grouped conv");
}

#[test]
fn matmul_known() {
    let a = RefTensor::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let b = RefTensor::new(vec![7.0, 8.0, 9.0, 10.0, 11.0, 12.0], &[3, 2]);
    approx(
        &matmul(&a, &b, false, false),
        &[58.0, 64.0, 139.0, 154.0],
        "matmul",
    );
    // a^T (3x2 viewed from a 2x3) times a (2x3) = 3x3 Gram matrix.
    let g = matmul(&a, &a, true, false);
    approx(
        &g,
        &[17.0, 22.0, 27.0, 22.0, 29.0, 36.0, 27.0, 36.0, 45.0],
        "matmul trans_a",
    );
    // a (2x3) times a^T = 2x2.
    approx(
        &matmul(&a, &a, false, true),
        &[14.0, 32.0, 32.0, 77.0],
        "matmul trans_b",
    );
    // Broadcast batch: [2,1,2,3] x [3,3,2] -> [2,3,2,2].
    let ab = RefTensor::random(&[2, 1, 2, 3], 1);
    let bb = RefTensor::random(&[3, 3, 2], 2);
    let y = matmul(&ab, &bb, false, false);
    assert_eq!(y.shape, [2, 3, 2, 2]);
    let a1 = slice(&ab, 0, 1, 2).reshape(&[2, 3]);
    let b2 = slice(&bb, 0, 2, 3).reshape(&[3, 2]);
    let want = matmul(&a1, &b2, false, false);
    approx(
        &slice(&slice(&y, 0, 1, 2), 1, 2, 3).reshape(&[2, 2]),
        &want.data,
        "batch broadcast",
    );
}

#[test]
fn pool_known() {
    let x = RefTensor::new((0..16).map(|v| v as f64).collect(), &[1, 1, 4, 4]);
    let max = Pool2dParams {
        kind: PoolKind::Max,
        kernel: [2, 2],
        stride: [2, 2],
        pad: [0; 4],
        dilation: [1, 1],
        out_hw: [2, 2],
    };
    approx(&pool2d(&x, &max), &[5.0, 7.0, 13.0, 15.0], "maxpool");
    // 3x3 avg, stride 2, pad 1 on every side: corner window covers 4 real cells (0,1,4,5).
    let avg = |cip| Pool2dParams {
        kind: PoolKind::Avg {
            count_include_pad: cip,
        },
        kernel: [3, 3],
        stride: [2, 2],
        pad: [1, 1, 1, 1],
        dilation: [1, 1],
        out_hw: [2, 2],
    };
    let y = pool2d(&x, &avg(false));
    approx(&y, &[2.5, 4.0, 8.5, 10.0], "avgpool exclude pad");
    let y = pool2d(&x, &avg(true));
    approx(
        &y,
        &[10.0 / 9.0, 24.0 / 9.0, 51.0 / 9.0, 90.0 / 9.0],
        "avgpool include pad",
    );
    // ceil_mode: 3 outputs from 4 columns with k=2,s=2 would be 2; with pad right 1 and
    // out_hw 3 the last window covers column 4 (padding) and column 5 (beyond): divisor counts
    // only the padded column.
    let x1 = RefTensor::new(vec![1.0, 2.0, 3.0, 4.0, 5.0], &[1, 1, 1, 5]);
    let p = Pool2dParams {
        kind: PoolKind::Avg {
            count_include_pad: true,
        },
        kernel: [1, 2],
        stride: [1, 2],
        pad: [0, 0, 0, 1],
        dilation: [1, 1],
        out_hw: [1, 3],
    };
    approx(
        &pool2d(&x1, &p),
        &[1.5, 3.5, 2.5],
        "avgpool ceil include pad",
    );
    let p = Pool2dParams { pad: [0; 4], ..p };
    approx(
        &pool2d(&x1, &p),
        &[1.5, 3.5, 5.0],
        "avgpool ceil beyond input",
    );
}

#[test]
fn resize_known() {
    let x = RefTensor::new(vec![1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2]);
    let nearest = ResizeParams {
        mode: ResizeMode::Nearest(NearestMode::RoundPreferFloor),
        coord: CoordTransform::Asymmetric,
        out_hw: [4, 4],
    };
    let y = resize(&x, &nearest);
    approx(
        &y,
        &[
            1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0,
        ],
        "nearest 2x",
    );
    // Linear half-pixel 1x4 -> 1x... on a single row: [0, 1] -> 4 columns:
    // coords -0.25(clamped 0), 0.25, 0.75, 1.25(clamped 1).
    let r = RefTensor::new(vec![0.0, 1.0], &[1, 1, 1, 2]);
    let lin = ResizeParams {
        mode: ResizeMode::Linear,
        coord: CoordTransform::HalfPixel,
        out_hw: [1, 4],
    };
    approx(
        &resize(&r, &lin),
        &[0.0, 0.25, 0.75, 1.0],
        "linear half pixel",
    );
    let ac = ResizeParams {
        coord: CoordTransform::AlignCorners,
        out_hw: [1, 3],
        ..lin
    };
    approx(&resize(&r, &ac), &[0.0, 0.5, 1.0], "linear align corners");
    // Area 5 -> 2: rows 0..3 and 2..5 (overlapping adaptive windows).
    let a = RefTensor::new(vec![1.0, 2.0, 3.0, 4.0, 5.0], &[1, 1, 1, 5]);
    let area = ResizeParams {
        mode: ResizeMode::Area,
        coord: CoordTransform::HalfPixel,
        out_hw: [1, 2],
    };
    approx(&resize(&a, &area), &[2.0, 4.0], "area");
    // Nearest tie rules: half-pixel 2 -> 4 hits coordinates -0.25, 0.25, 0.75, 1.25 (no ties);
    // asymmetric 4 -> 8 hits 0.5 exactly at o=1.
    let q = RefTensor::new(vec![10.0, 20.0, 30.0, 40.0], &[1, 1, 1, 4]);
    let tie = |nm| ResizeParams {
        mode: ResizeMode::Nearest(nm),
        coord: CoordTransform::Asymmetric,
        out_hw: [1, 8],
    };
    approx(
        &resize(&q, &tie(NearestMode::RoundPreferFloor)),
        &[10., 10., 20., 20., 30., 30., 40., 40.],
        "prefer floor",
    );
    approx(
        &resize(&q, &tie(NearestMode::RoundPreferCeil)),
        &[10., 20., 20., 30., 30., 40., 40., 40.],
        "prefer ceil",
    );
    approx(
        &resize(&q, &tie(NearestMode::Ceil)),
        &[10., 20., 20., 30., 30., 40., 40., 40.],
        "ceil",
    );
    approx(
        &resize(&q, &tie(NearestMode::Floor)),
        &[10., 10., 20., 20., 30., 30., 40., 40.],
        "floor",
    );
}

#[test]
fn pad_known() {
    let x = RefTensor::new(vec![1.0, 2.0, 3.0], &[3]);
    approx(
        &pad(&x, &[(2, 2)], PadMode::Reflect, 0.0),
        &[3., 2., 1., 2., 3., 2., 1.],
        "reflect",
    );
    approx(
        &pad(&x, &[(2, 1)], PadMode::Edge, 0.0),
        &[1., 1., 1., 2., 3., 3.],
        "edge",
    );
    approx(
        &pad(&x, &[(1, 0)], PadMode::Constant, 9.0),
        &[9., 1., 2., 3.],
        "constant",
    );
    let dy = RefTensor::new(vec![1.0; 7], &[7]);
    approx(
        &pad_backward(&dy, &[3], &[(2, 2)], PadMode::Reflect),
        &[2., 3., 2.],
        "reflect adjoint",
    );
}

#[test]
fn losses_known() {
    let z = RefTensor::new(vec![1.0, 3.0, 2.0, 0.0], &[1, 4]);
    let (l, g) = loss(Loss::CrossEntropy, &z, &RefLossTargets::Classes(&[1]));
    let lse = (1f64.exp() + 3f64.exp() + 2f64.exp() + 1.0).ln();
    approx(&l, &[lse - 3.0], "ce");
    assert!(
        (g.data.iter().sum::<f64>()).abs() < 1e-12,
        "softmax - onehot sums to 0"
    );
    // CW margin of class 2: z2 - z1 = -1.
    let (l, g) = loss(
        Loss::CwMargin { kappa: 5.0 },
        &z,
        &RefLossTargets::Classes(&[2]),
    );
    approx(&l, &[-1.0], "cw");
    approx(&g, &[0.0, -1.0, 1.0, 0.0], "cw grad");
    let (l, g) = loss(
        Loss::CwMargin { kappa: 0.5 },
        &z,
        &RefLossTargets::Classes(&[2]),
    );
    approx(&l, &[-0.5], "cw clamped");
    approx(&g, &[0.0; 4], "cw clamped grad");
    // DLR of class 1 (the top class): -(3 - 2) / (3 - 1) = -0.5.
    let (l, _) = loss(Loss::Dlr, &z, &RefLossTargets::Classes(&[1]));
    assert!((l.data[0] + 0.5).abs() < 1e-9, "dlr {}", l.data[0]);
    let t = RefTensor::new(vec![0.0, 1.0, 2.0, 3.0], &[1, 4]);
    let (l, _) = loss(Loss::Mse, &z, &RefLossTargets::Dense(&t));
    approx(&l, &[(1.0 + 4.0 + 0.0 + 9.0) / 4.0], "mse");
}

#[test]
fn elementwise_known() {
    let x = RefTensor::new(vec![-2.0, 0.0, 3.0], &[3]);
    approx(&unary(Unary::Relu, &x), &[0.0, 0.0, 3.0], "relu");
    approx(&unary(Unary::Sign, &x), &[-1.0, 0.0, 1.0], "sign");
    approx(
        &unary(
            Unary::Clip {
                min: -1.0,
                max: 1.0,
            },
            &x,
        ),
        &[-1.0, 0.0, 1.0],
        "clip",
    );
    let a = RefTensor::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let b = RefTensor::new(vec![10.0, 20.0], &[2, 1]);
    approx(
        &binary(Binary::Add, &a, &b),
        &[11., 12., 13., 24., 25., 26.],
        "broadcast add",
    );
    approx(&reduce_sum_to(&a, &[3]), &[5.0, 7.0, 9.0], "reduce_sum_to");
    approx(
        &reduce(&a, &[1], ReduceOp::Mean, false),
        &[2.0, 5.0],
        "reduce mean",
    );
    let sm = softmax(&RefTensor::new(vec![0.0, 0.0], &[2]), 0, false);
    approx(&sm, &[0.5, 0.5], "softmax");
    let t = transpose(&a, &[1, 0]);
    approx(&t, &[1., 4., 2., 5., 3., 6.], "transpose");
    approx(
        &concat(&[&a, &b], 1),
        &[1., 2., 3., 10., 4., 5., 6., 20.],
        "concat",
    );
}

#[test]
fn perturbation_known() {
    let x = RefTensor::new(vec![0.0, 0.0, 1.0, 1.0], &[2, 2]);
    let g = RefTensor::new(vec![3.0, 4.0, 0.0, 0.0], &[2, 2]);
    approx(
        &l2_step(&x, &g, 1.0),
        &[0.6, 0.8, 1.0, 1.0],
        "l2 step (zero grad no step)",
    );
    approx(&sign_step(&x, &g, 0.5), &[0.5, 0.5, 1.0, 1.0], "sign step");
    let x1 = RefTensor::new(vec![3.0, 4.0, 1.5, 0.5], &[2, 2]);
    let x0 = RefTensor::new(vec![0.0, 0.0, 1.0, 1.0], &[2, 2]);
    approx(
        &project(&x1, &x0, 1.0, Norm::L2),
        &[0.6, 0.8, 1.5, 0.5],
        "project l2",
    );
    approx(
        &project(&x1, &x0, 0.25, Norm::Linf),
        &[0.25, 0.25, 1.25, 0.75],
        "project linf",
    );
    approx(&norm_per_sample(&x1, Norm::L1), &[7.0, 2.0], "l1");
    approx(&norm_per_sample(&x1, Norm::Linf), &[4.0, 1.5], "linf");
    approx(
        &clamp_per_sample(&x1, &[0.0, 1.0], &[3.5, 2.0]),
        &[3.0, 3.5, 1.5, 1.0],
        "clamp",
    );
    let u = random_uniform(&[1000], 7, -2.0, 3.0);
    assert!(u.data.iter().all(|&v| (-2.0..3.0).contains(&v)));
    let mean = u.data.iter().sum::<f64>() / 1000.0;
    assert!((mean - 0.5).abs() < 0.2, "uniform mean {mean}");
    let nrm = random_normal(&[2000], 7, 2.0);
    let var = nrm.data.iter().map(|v| v * v).sum::<f64>() / 2000.0;
    assert!((var - 4.0).abs() < 0.5, "normal variance {var}");
}

#[test]
fn assert_close_catches_errors() {
    let want = RefTensor::new(vec![1.0, -2.0, 0.0], &[3]);
    assert_close(&[1.0, -2.0, 0.0], &want, 1e-6, "exact");
    assert_close(&[1.0, -2.00001, 1e-6], &want, 1e-4, "within floor");
    let r = std::panic::catch_unwind(|| assert_close(&[1.0, -2.1, 0.0], &want, 1e-3, "off"));
    assert!(r.is_err());
    let r = std::panic::catch_unwind(|| assert_close(&[f32::NAN, -2.0, 0.0], &want, 1e-3, "nan"));
    assert!(r.is_err());
}

// ---- finite-difference checks of every backward ----------------------------------------------

#[test]
fn conv_backward_matches_fd() {
    let cases: &[([usize; 4], [usize; 4], Conv2dParams)] = &[
        ([1, 2, 5, 5], [3, 2, 3, 3], Conv2dParams::default()),
        (
            [2, 2, 6, 5],
            [2, 2, 3, 2],
            conv_params(2, [1, 0, 1, 2], 1, 1),
        ),
        (
            [1, 4, 7, 7],
            [4, 2, 3, 3],
            conv_params(1, [2, 2, 2, 2], 2, 2),
        ),
        ([3, 2, 4, 4], [2, 1, 1, 1], conv_params(1, [0; 4], 1, 2)),
        (
            [1, 3, 6, 6],
            [3, 1, 3, 3],
            conv_params(2, [1, 1, 1, 1], 1, 3),
        ),
    ];
    for (ci, (xs, ws, p)) in cases.iter().enumerate() {
        let x = RefTensor::random(xs, 10 + ci as u64);
        let w = RefTensor::random(ws, 20 + ci as u64);
        let b = RefTensor::random(&[ws[0]], 30);
        let y = conv2d(&x, &w, Some(&b), p);
        let dy = RefTensor::random(&y.shape, 40 + ci as u64);
        let dx = conv2d_backward_input(&dy, &w, p, *xs);
        assert_grad(
            &dx,
            &fd_grad(&x, &dy, |x| conv2d(x, &w, Some(&b), p)),
            &format!("conv dx case {ci}"),
        );
        let dw = conv2d_backward_weight(&dy, &x, p, *ws);
        assert_grad(
            &dw,
            &fd_grad(&w, &dy, |w| conv2d(&x, w, Some(&b), p)),
            &format!("conv dw case {ci}"),
        );
    }
}

#[test]
fn matmul_grad_matches_fd() {
    // The backward of a matmul is two matmuls with transposes; check that composition, which
    // also exercises every transpose flag combination and batch broadcasting.
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let ash = if ta {
            vec![2, 1, 4, 3]
        } else {
            vec![2, 1, 3, 4]
        };
        let bsh = if tb { vec![3, 5, 4] } else { vec![3, 4, 5] };
        let a = RefTensor::random(&ash, 1);
        let b = RefTensor::random(&bsh, 2);
        let y = matmul(&a, &b, ta, tb);
        assert_eq!(y.shape, [2, 3, 3, 5]);
        let dy = RefTensor::random(&y.shape, 3);
        // dA = dY B^T (or B dY^T when trans_a), summed over broadcast batch axes.
        let da = if ta {
            matmul(&b, &dy, tb, true)
        } else {
            matmul(&dy, &b, false, !tb)
        };
        let da = reduce_sum_to(&da, &ash);
        assert_grad(
            &da,
            &fd_grad(&a, &dy, |a| matmul(a, &b, ta, tb)),
            "matmul da",
        );
        let db = if tb {
            matmul(&dy, &a, true, ta)
        } else {
            matmul(&a, &dy, !ta, false)
        };
        let db = reduce_sum_to(&db, &bsh);
        assert_grad(
            &db,
            &fd_grad(&b, &dy, |b| matmul(&a, b, ta, tb)),
            "matmul db",
        );
    }
}

#[test]
fn pool_backward_matches_fd() {
    let mk = |kind, kernel: [usize; 2], stride: [usize; 2], pad, dilation, out_hw| Pool2dParams {
        kind,
        kernel,
        stride,
        pad,
        dilation,
        out_hw,
    };
    let avg_in = PoolKind::Avg {
        count_include_pad: true,
    };
    let avg_ex = PoolKind::Avg {
        count_include_pad: false,
    };
    let cases = [
        (
            [2, 2, 6, 6],
            mk(PoolKind::Max, [2, 2], [2, 2], [0; 4], [1, 1], [3, 3]),
        ),
        // ceil mode with asymmetric pads and dilation 2.
        (
            [1, 2, 7, 6],
            mk(PoolKind::Max, [3, 2], [2, 2], [1, 0, 0, 1], [2, 1], [3, 4]),
        ),
        (
            [1, 1, 5, 5],
            mk(avg_in, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1], [3, 3]),
        ),
        (
            [3, 1, 5, 7],
            mk(avg_ex, [3, 2], [2, 3], [1, 0, 1, 1], [1, 1], [3, 3]),
        ),
        (
            [1, 2, 6, 5],
            mk(avg_in, [2, 2], [2, 2], [0, 1, 0, 0], [2, 1], [3, 3]),
        ),
    ];
    for (ci, (xs, p)) in cases.iter().enumerate() {
        // Distinct values spaced >> H apart: no ties, so max pool is differentiable.
        let n = numel(xs);
        let perm: Vec<f64> = (0..n).map(|i| ((i * 7919) % n) as f64 * 0.01).collect();
        let x = RefTensor::new(perm, xs);
        let y = pool2d(&x, p);
        assert_eq!(y.shape, [xs[0], xs[1], p.out_hw[0], p.out_hw[1]]);
        let dy = RefTensor::random(&y.shape, ci as u64);
        let dx = pool2d_backward(&dy, &x, p);
        assert_grad(
            &dx,
            &fd_grad(&x, &dy, |x| pool2d(x, p)),
            &format!("pool case {ci}"),
        );
    }
}

#[test]
fn unary_backward_matches_fd() {
    let ops = [
        Unary::Relu,
        Unary::LeakyRelu { alpha: 0.1 },
        Unary::Sigmoid,
        Unary::Tanh,
        Unary::Clip {
            min: -0.5,
            max: 0.4,
        },
        Unary::Neg,
        Unary::Exp,
        Unary::Log,
        Unary::Sqrt,
        Unary::Abs,
        Unary::Affine { a: -1.5, b: 0.25 },
        Unary::Powf { p: 2.5 },
    ];
    for op in ops {
        let mut x = RefTensor::random(&[3, 7], 5);
        // Keep away from kinks (0, clip bounds) and the domain edge of log/sqrt/powf.
        for v in &mut x.data {
            if v.abs() < 0.05 || (*v + 0.5).abs() < 0.05 || (*v - 0.4).abs() < 0.05 {
                *v += 0.13;
            }
            if matches!(op, Unary::Log | Unary::Sqrt | Unary::Powf { .. }) {
                *v = v.abs() + 0.1;
            }
        }
        let y = unary(op, &x);
        let dy = RefTensor::random(&x.shape, 6);
        let dx = unary_backward(op, &x, &y, &dy);
        assert_grad(&dx, &fd_grad(&x, &dy, |x| unary(op, x)), &format!("{op:?}"));
    }
    let x = RefTensor::random(&[5], 1);
    let dx = unary_backward(
        Unary::Sign,
        &x,
        &unary(Unary::Sign, &x),
        &RefTensor::random(&[5], 2),
    );
    assert!(dx.data.iter().all(|&v| v == 0.0));
}

#[test]
fn broadcast_and_reduce_are_adjoint() {
    for (xs, to) in [
        (vec![3, 1], vec![2, 3, 4]),
        (vec![4], vec![3, 4]),
        (vec![1, 2, 1], vec![3, 2, 5]),
    ] {
        let x = RefTensor::random(&xs, 1);
        let dy = RefTensor::random(&to, 2);
        let dx = reduce_sum_to(&dy, &xs);
        assert_grad(
            &dx,
            &fd_grad(&x, &dy, |x| broadcast_to(x, &to)),
            "broadcast",
        );
    }
    // Binary ops with broadcasting: gradient of <dy, a op b> w.r.t. a through reduce_sum_to.
    let a = RefTensor::random(&[2, 1, 4], 3);
    let b = RefTensor::random(&[3, 1], 4).reshape(&[3, 1]);
    let dy = RefTensor::random(&[2, 3, 4], 5);
    let da = reduce_sum_to(
        &binary(Binary::Mul, &dy, &broadcast_to(&b, &[2, 3, 4])),
        &a.shape,
    );
    assert_grad(
        &da,
        &fd_grad(&a, &dy, |a| binary(Binary::Mul, a, &b)),
        "binary mul da",
    );
    let db = reduce_sum_to(
        &binary(Binary::Mul, &dy, &broadcast_to(&a, &[2, 3, 4])),
        &b.shape,
    );
    assert_grad(
        &db,
        &fd_grad(&b, &dy, |b| binary(Binary::Mul, &a, b)),
        "binary mul db",
    );
    // Reduce mean's adjoint is a broadcast divided by the count.
    let x = RefTensor::random(&[2, 3, 4], 6);
    let dy = RefTensor::random(&[2, 4], 7);
    let dx = binary(
        Binary::Div,
        &broadcast_to(&dy.reshape(&[2, 1, 4]), &[2, 3, 4]),
        &fill(&[1], 3.0),
    );
    assert_grad(
        &dx,
        &fd_grad(&x, &dy, |x| reduce(x, &[1], ReduceOp::Mean, false)),
        "reduce mean",
    );
}

#[test]
fn softmax_backward_matches_fd() {
    for (shape, axis) in [(vec![3, 5], 1), (vec![2, 4, 3], 1), (vec![4, 2], 0)] {
        for log in [false, true] {
            let x = RefTensor::random(&shape, 1);
            let y = softmax(&x, axis, log);
            let dy = RefTensor::random(&shape, 2);
            let dx = softmax_backward(&y, &dy, axis, log);
            assert_grad(
                &dx,
                &fd_grad(&x, &dy, |x| softmax(x, axis, log)),
                &format!("softmax log={log}"),
            );
        }
    }
}

#[test]
fn loss_grad_matches_fd() {
    let z = RefTensor::random(&[3, 5], 9);
    // Each sample's top class (DLR's pi1 is then the target itself), then arbitrary classes.
    let top: Vec<u32> = (0..3)
        .map(|s| {
            let row = &z.data[s * 5..(s + 1) * 5];
            (0..5).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32
        })
        .collect();
    assert_ne!(top, [0, 3, 4]);
    let target = RefTensor::random(&[3, 5], 10);
    let kinds = [
        Loss::CrossEntropy,
        Loss::CwMargin { kappa: 10.0 },
        Loss::Dlr,
        Loss::Mse,
    ];
    let cases = kinds
        .iter()
        .flat_map(|&k| [(k, top.clone()), (k, vec![0u32, 3, 4])]);
    for (kind, classes) in cases {
        let t = if kind == Loss::Mse {
            RefLossTargets::Dense(&target)
        } else {
            RefLossTargets::Classes(&classes)
        };
        let (_, g) = loss(kind, &z, &t);
        let ones = RefTensor::new(vec![1.0; 3], &[3]);
        assert_grad(
            &g,
            &fd_grad(&z, &ones, |z| loss(kind, z, &t).0),
            &format!("{kind:?}"),
        );
    }
}

#[test]
fn resize_backward_matches_fd() {
    let modes = [
        ResizeMode::Nearest(NearestMode::RoundPreferFloor),
        ResizeMode::Nearest(NearestMode::RoundPreferCeil),
        ResizeMode::Nearest(NearestMode::Floor),
        ResizeMode::Nearest(NearestMode::Ceil),
        ResizeMode::Linear,
        ResizeMode::Area,
    ];
    let coords = [
        CoordTransform::HalfPixel,
        CoordTransform::PytorchHalfPixel,
        CoordTransform::AlignCorners,
        CoordTransform::Asymmetric,
    ];
    for mode in modes {
        for coord in coords {
            for (xs, out) in [
                ([1, 2, 3, 5], [7, 4]),
                ([2, 1, 6, 4], [3, 9]),
                ([1, 1, 4, 4], [1, 2]),
            ] {
                let p = ResizeParams {
                    mode,
                    coord,
                    out_hw: out,
                };
                let x = RefTensor::random(&xs, 1);
                let dy = RefTensor::random(&[xs[0], xs[1], out[0], out[1]], 2);
                let dx = resize_backward(&dy, xs, &p);
                assert_grad(
                    &dx,
                    &fd_grad(&x, &dy, |x| resize(x, &p)),
                    &format!("{mode:?} {coord:?} {xs:?}->{out:?}"),
                );
            }
        }
    }
}

#[test]
fn pad_and_movement_adjoints_match_fd() {
    for mode in [PadMode::Constant, PadMode::Reflect, PadMode::Edge] {
        let xs = [2, 3, 4];
        let pads = [(0, 1), (2, 1), (3, 2)];
        let x = RefTensor::random(&xs, 1);
        let y = pad(&x, &pads, mode, 0.7);
        assert_eq!(y.shape, [3, 6, 9]);
        let dy = RefTensor::random(&y.shape, 2);
        let dx = pad_backward(&dy, &xs, &pads, mode);
        assert_grad(
            &dx,
            &fd_grad(&x, &dy, |x| pad(x, &pads, mode, 0.7)),
            &format!("pad {mode:?}"),
        );
    }
    // transpose / slice / concat: adjoints are inverse transpose / pad with zeros / slices.
    let x = RefTensor::random(&[2, 3, 4], 3);
    let dy = RefTensor::random(&[4, 2, 3], 4);
    let dx = transpose(&dy, &[1, 2, 0]);
    assert_grad(
        &dx,
        &fd_grad(&x, &dy, |x| transpose(x, &[2, 0, 1])),
        "transpose",
    );
    let dy = RefTensor::random(&[2, 2, 4], 5);
    let dx = pad(&dy, &[(0, 0), (1, 0), (0, 0)], PadMode::Constant, 0.0);
    assert_grad(&dx, &fd_grad(&x, &dy, |x| slice(x, 1, 1, 3)), "slice");
    let other = RefTensor::random(&[2, 1, 4], 6);
    let dy = RefTensor::random(&[2, 4, 4], 7);
    assert_grad(
        &slice(&dy, 1, 0, 3),
        &fd_grad(&x, &dy, |x| concat(&[x, &other], 1)),
        "concat",
    );
}
