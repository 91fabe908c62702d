//! Every CPU primitive against the float64 reference, on the sequential path (1 thread, and
//! small tensors) and the parallel path (2 threads, tensors above the threshold), plus
//! determinism.

use super::*;
use crate::runtime::backend::{
    CoordTransform, LossTargets, NearestMode, PoolKind, ResizeMode, counter_uniform,
};
use crate::runtime::reference::{self as r, RefLossTargets, RefTensor, assert_close};

const FWD: f64 = 1e-4;
const BWD: f64 = 1e-3;

fn backends() -> [CpuBackend; 2] {
    [CpuBackend::new(Some(1)), CpuBackend::new(Some(2))]
}

fn up(b: &CpuBackend, t: &RefTensor) -> Tensor<CpuBackend> {
    b.upload(&t.to_f32(), &t.shape)
}

fn check(b: &CpuBackend, got: &Tensor<CpuBackend>, want: &RefTensor, rel: f64, what: &str) {
    assert_eq!(got.shape, want.shape, "{what} [{}]: shape", b.describe());
    assert_close(
        &b.download(got),
        want,
        rel,
        &format!("{what} [{}]", b.describe()),
    );
}

fn conv(stride: usize, pad: [usize; 4], dil: usize, groups: usize) -> Conv2dParams {
    Conv2dParams {
        stride: [stride, stride],
        pad,
        dilation: [dil, dil],
        groups,
    }
}

#[test]
fn describe_names_threads() {
    assert_eq!(CpuBackend::new(Some(1)).describe(), "cpu (1 thread)");
    assert_eq!(CpuBackend::new(Some(3)).describe(), "cpu (3 threads)");
    assert!(CpuBackend::new(None).threads() >= 1);
}

#[test]
fn conv_matches_reference() {
    let cases: Vec<([usize; 4], [usize; 4], Conv2dParams)> = vec![
        ([1, 3, 7, 6], [4, 3, 3, 3], Conv2dParams::default()),
        ([3, 2, 9, 8], [5, 2, 3, 2], conv(2, [1, 0, 2, 1], 1, 1)),
        ([1, 4, 9, 9], [6, 2, 3, 3], conv(1, [2, 2, 2, 2], 2, 2)),
        ([3, 4, 5, 5], [8, 4, 1, 1], Conv2dParams::default()),
        ([3, 4, 6, 6], [4, 2, 1, 1], conv(2, [0; 4], 1, 2)),
        // depthwise, with stride, pads and dilation
        ([3, 5, 8, 7], [5, 1, 3, 3], conv(2, [1, 2, 1, 0], 2, 5)),
        ([1, 3, 6, 6], [6, 1, 3, 3], conv(1, [1; 4], 1, 3)),
        // big enough for the parallel path: 3 * 16 * 20 * 20 * 72 multiply-adds
        ([3, 8, 20, 20], [16, 8, 3, 3], conv(1, [1; 4], 1, 1)),
        ([1, 8, 24, 24], [16, 8, 3, 3], conv(2, [1; 4], 1, 1)),
        ([2, 16, 16, 16], [16, 1, 3, 3], conv(1, [1; 4], 1, 16)),
        ([1, 16, 20, 20], [32, 16, 1, 1], Conv2dParams::default()),
        // stride 1 with asymmetric pads (the input gradient as a flipped convolution), and a
        // pad beyond the kernel's reach (that adjoint crops: the col2im path)
        ([2, 3, 7, 9], [5, 3, 3, 2], conv(1, [0, 1, 2, 1], 1, 1)),
        ([1, 2, 5, 5], [3, 2, 3, 3], conv(1, [3, 0, 1, 1], 1, 1)),
        // more output channels than a register panel, several reduction blocks (k = 300)
        ([2, 12, 6, 7], [13, 12, 5, 5], conv(1, [2; 4], 1, 1)),
    ];
    for b in backends() {
        for (ci, (xs, ws, p)) in cases.iter().enumerate() {
            let x = RefTensor::random(xs, ci as u64);
            let w = RefTensor::random(ws, 100 + ci as u64);
            let bias = RefTensor::random(&[ws[0]], 200 + ci as u64);
            let want = r::conv2d(&x, &w, Some(&bias), p);
            let (xt, wt, bt) = (up(&b, &x), up(&b, &w), up(&b, &bias));
            let got = b.conv2d(&xt, &wt, Some(&bt), p);
            check(&b, &got, &want, FWD, &format!("conv2d case {ci}"));
            let got = b.conv2d(&xt, &wt, None, p);
            check(
                &b,
                &got,
                &r::conv2d(&x, &w, None, p),
                FWD,
                &format!("conv2d no bias {ci}"),
            );

            let dy = RefTensor::random(&want.shape, 300 + ci as u64);
            let dyt = up(&b, &dy);
            let got = b.conv2d_backward_input(&dyt, &wt, p, *xs);
            check(
                &b,
                &got,
                &r::conv2d_backward_input(&dy, &w, p, *xs),
                BWD,
                &format!("conv dx {ci}"),
            );
            let got = b.conv2d_backward_weight(&dyt, &xt, p, *ws);
            check(
                &b,
                &got,
                &r::conv2d_backward_weight(&dy, &x, p, *ws),
                BWD,
                &format!("conv dw {ci}"),
            );
        }
    }
}

#[test]
fn conv_transpose_output_padding_leaves_zeros() {
    // ConvTranspose with output_padding: x_shape one larger than the conv geometry needs; the
    // extra row/column gets no gradient.
    let b = CpuBackend::new(Some(1));
    let p = conv(2, [0; 4], 1, 1);
    let w = RefTensor::random(&[2, 3, 3, 3], 1);
    let dy = RefTensor::random(&[1, 2, 3, 3], 2);
    let want = r::conv2d_backward_input(&dy, &w, &p, [1, 3, 8, 8]);
    let got = b.conv2d_backward_input(&up(&b, &dy), &up(&b, &w), &p, [1, 3, 8, 8]);
    check(&b, &got, &want, BWD, "conv transpose");
    let v = b.download(&got);
    assert!(v[7] == 0.0 && v[63] == 0.0, "last column untouched");
}

#[test]
fn matmul_matches_reference() {
    // Shapes as stored (a is [.., K, M] when trans_a, b is [.., N, K] when trans_b).
    let cases: Vec<(Vec<usize>, Vec<usize>, bool, bool)> = vec![
        (vec![3, 5], vec![5, 4], false, false),
        (vec![5, 3], vec![5, 4], true, false),
        (vec![3, 5], vec![4, 5], false, true),
        (vec![5, 3], vec![4, 5], true, true),
        (vec![2, 1, 3, 5], vec![3, 5, 2], false, false),
        (vec![2, 1, 5, 3], vec![3, 2, 5], true, true),
        (vec![4, 6, 7], vec![7, 3], false, false),
        (vec![1, 7], vec![2, 3, 7, 2], false, false),
        // above the parallel threshold: batched (tasks) and single (gemm-internal threads)
        (vec![3, 70, 60], vec![3, 50, 60], false, true),
        (vec![90, 100], vec![90, 80], true, false),
        (vec![64, 300], vec![10, 300], false, true),
        // mid-size single products: plain (lane kernel, `b` read as stored; the second one a
        // Linear layer's input gradient with fewer rows than the panel kernel's block), both
        // transposed (gemm crate)
        (vec![50, 40], vec![40, 60], false, false),
        (vec![4, 128], vec![128, 300], false, false),
        (vec![60, 30], vec![50, 60], true, true),
        // a Linear layer's weights ([out, in], trans_b): transposed once and cached
        (vec![40, 300], vec![48, 300], false, true),
    ];
    for b in backends() {
        for (ci, (ash, bsh, ta, tb)) in cases.iter().enumerate() {
            let x = RefTensor::random(ash, ci as u64);
            let y = RefTensor::random(bsh, 50 + ci as u64);
            let want = r::matmul(&x, &y, *ta, *tb);
            let got = b.matmul(&up(&b, &x), &up(&b, &y), *ta, *tb);
            check(
                &b,
                &got,
                &want,
                FWD,
                &format!("matmul case {ci} {ash:?}x{bsh:?} t{ta}{tb}"),
            );
        }
    }
}

/// The small CNNs' 2x2 / stride-2 max pooling (floor mode) of an `oh x ow` plane.
fn max_pool_2x2(oh: usize, ow: usize) -> Pool2dParams {
    pool(
        PoolKind::Max,
        [2, 2],
        [2, 2],
        [0; 4],
        [1, 1],
        [oh / 2, ow / 2],
    )
}

fn pool(
    kind: PoolKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 4],
    dil: [usize; 2],
    out: [usize; 2],
) -> Pool2dParams {
    Pool2dParams {
        kind,
        kernel,
        stride,
        pad,
        dilation: dil,
        out_hw: out,
    }
}

#[test]
fn pool_matches_reference() {
    let avg_in = PoolKind::Avg {
        count_include_pad: true,
    };
    let avg_ex = PoolKind::Avg {
        count_include_pad: false,
    };
    let cases = [
        (
            [1, 2, 6, 6],
            pool(PoolKind::Max, [2, 2], [2, 2], [0; 4], [1, 1], [3, 3]),
        ),
        (
            [3, 2, 7, 6],
            pool(PoolKind::Max, [3, 2], [2, 2], [1, 0, 0, 1], [2, 1], [3, 4]),
        ),
        (
            [3, 1, 5, 5],
            pool(avg_in, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1], [3, 3]),
        ),
        (
            [1, 3, 5, 7],
            pool(avg_ex, [3, 2], [2, 3], [1, 0, 1, 1], [1, 1], [3, 3]),
        ),
        (
            [1, 2, 6, 5],
            pool(avg_in, [2, 2], [2, 2], [0, 1, 0, 0], [2, 1], [3, 3]),
        ),
        // global average pool and a large case (parallel path)
        (
            [3, 4, 7, 7],
            pool(avg_ex, [7, 7], [1, 1], [0; 4], [1, 1], [1, 1]),
        ),
        (
            [3, 16, 32, 32],
            pool(PoolKind::Max, [3, 3], [2, 2], [1; 4], [1, 1], [16, 16]),
        ),
        (
            [3, 16, 32, 32],
            pool(avg_in, [3, 3], [2, 2], [1; 4], [1, 1], [17, 17]),
        ),
        // padded max pooling with ceil-mode windows cut at the far edge, asymmetric pads
        (
            [2, 3, 7, 9],
            pool(PoolKind::Max, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1], [4, 5]),
        ),
        (
            [2, 3, 8, 7],
            pool(PoolKind::Max, [2, 3], [1, 2], [0, 2, 1, 0], [1, 1], [8, 4]),
        ),
    ];
    for b in backends() {
        for (ci, (xs, p)) in cases.iter().enumerate() {
            let mut x = RefTensor::random(xs, ci as u64);
            if p.kind == PoolKind::Max {
                // Quarter steps: many windows hold ties, which the first maximum must break.
                x.data
                    .iter_mut()
                    .for_each(|v| *v = (*v * 4.0).round() / 4.0);
            }
            let want = r::pool2d(&x, p);
            let xt = up(&b, &x);
            check(
                &b,
                &b.pool2d(&xt, p),
                &want,
                FWD,
                &format!("pool2d case {ci}"),
            );
            let dy = RefTensor::random(&want.shape, 10 + ci as u64);
            let got = b.pool2d_backward(&up(&b, &dy), &xt, p);
            check(
                &b,
                &got,
                &r::pool2d_backward(&dy, &x, p),
                BWD,
                &format!("pool2d backward {ci}"),
            );
            // The pooling of a ReLU's output (ties at zero in about half of each window):
            // the fused backward against the reference's two passes, and equal to the CPU's
            // own two passes to the bit.
            let rx = r::unary(Unary::Relu, &x);
            let rt = up(&b, &rx);
            let fused = b.relu_pool2d_backward(&up(&b, &dy), &rt, p);
            let pooled = r::pool2d_backward(&dy, &rx, p);
            check(
                &b,
                &fused,
                &r::unary_backward(Unary::Relu, &x, &rx, &pooled),
                BWD,
                &format!("relu + pool2d backward {ci}"),
            );
            let two = b.unary_backward(
                Unary::Relu,
                &rt,
                &rt,
                &b.pool2d_backward(&up(&b, &dy), &rt, p),
            );
            let bits = |t: &Tensor<CpuBackend>| {
                b.download(t)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&fused), bits(&two), "relu + pool2d backward {ci}");
            // Some gradient is masked: a window's winner that the ReLU clamped.
            let (f, p2) = (
                b.download(&fused),
                b.download(&b.pool2d_backward(&up(&b, &dy), &rt, p)),
            );
            assert!(
                f.iter().zip(&p2).any(|(a, b)| *a == 0.0 && *b != 0.0),
                "relu + pool2d backward {ci}: nothing masked"
            );
        }
    }
}

#[test]
fn elementwise_matches_reference() {
    let ops = [
        Unary::Relu,
        Unary::LeakyRelu { alpha: 0.2 },
        Unary::Sigmoid,
        Unary::Tanh,
        Unary::Clip {
            min: -0.3,
            max: 0.6,
        },
        Unary::Neg,
        Unary::Exp,
        Unary::Log,
        Unary::Sqrt,
        Unary::Abs,
        Unary::Affine { a: 2.5, b: -1.0 },
        Unary::Powf { p: 1.7 },
        Unary::Sign,
    ];
    for b in backends() {
        for shape in [vec![3, 5], vec![2, 3, 40, 300]] {
            for op in ops {
                let mut x = RefTensor::random(&shape, 3);
                if matches!(op, Unary::Log | Unary::Sqrt | Unary::Powf { .. }) {
                    x.data.iter_mut().for_each(|v| *v = v.abs() + 0.125);
                }
                let y = r::unary(op, &x);
                let xt = up(&b, &x);
                let yt = b.unary(op, &xt);
                check(&b, &yt, &y, FWD, &format!("{op:?}"));
                let dy = RefTensor::random(&shape, 4);
                let got = b.unary_backward(op, &xt, &yt, &up(&b, &dy));
                // The reference derivative is evaluated at the reference output; the backend uses
                // its own f32 output, as it will in graphs.
                check(
                    &b,
                    &got,
                    &r::unary_backward(op, &x, &y, &dy),
                    BWD,
                    &format!("{op:?} backward"),
                );
            }
        }
    }
}

#[test]
fn binary_and_broadcast_match_reference() {
    let pairs: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![3, 4], vec![3, 4]),
        (vec![2, 3, 4], vec![4]),
        (vec![2, 1, 4], vec![3, 1]),
        (vec![1], vec![2, 3]),
        (vec![5, 1, 1, 6], vec![1, 7, 3, 1]),
        (vec![3, 64, 1, 32], vec![64, 40, 1]),
    ];
    let ops = [
        Binary::Add,
        Binary::Sub,
        Binary::Mul,
        Binary::Div,
        Binary::Max,
        Binary::Min,
    ];
    for b in backends() {
        for (pi, (sa, sb)) in pairs.iter().enumerate() {
            let x = RefTensor::random(sa, pi as u64);
            let mut y = RefTensor::random(sb, 40 + pi as u64);
            y.data
                .iter_mut()
                .for_each(|v| *v = if *v >= 0.0 { *v + 0.5 } else { *v - 0.5 });
            let (xt, yt) = (up(&b, &x), up(&b, &y));
            for op in ops {
                check(
                    &b,
                    &b.binary(op, &xt, &yt),
                    &r::binary(op, &x, &y),
                    FWD,
                    &format!("{op:?} {sa:?} {sb:?}"),
                );
                check(
                    &b,
                    &b.binary(op, &yt, &xt),
                    &r::binary(op, &y, &x),
                    FWD,
                    &format!("{op:?} {sb:?} {sa:?}"),
                );
            }
            let out = r::broadcast_shape(sa, sb);
            check(
                &b,
                &b.broadcast_to(&xt, &out),
                &r::broadcast_to(&x, &out),
                FWD,
                "broadcast_to",
            );
            let big = RefTensor::random(&out, 7);
            let bt = up(&b, &big);
            check(
                &b,
                &b.reduce_sum_to(&bt, sa),
                &r::reduce_sum_to(&big, sa),
                BWD,
                "reduce_sum_to a",
            );
            check(
                &b,
                &b.reduce_sum_to(&bt, sb),
                &r::reduce_sum_to(&big, sb),
                BWD,
                "reduce_sum_to b",
            );
        }
    }
}

#[test]
fn reduce_and_softmax_match_reference() {
    let shape = [3, 4, 5, 6];
    let axes_list: [&[usize]; 6] = [&[], &[0], &[1, 3], &[3], &[0, 1, 2, 3], &[0, 2]];
    for b in backends() {
        for big in [false, true] {
            let sh: Vec<usize> = if big {
                vec![3, 40, 33, 20]
            } else {
                shape.to_vec()
            };
            let x = RefTensor::random(&sh, 5);
            let xt = up(&b, &x);
            for axes in axes_list {
                for op in [ReduceOp::Sum, ReduceOp::Mean] {
                    for keep in [false, true] {
                        let want = r::reduce(&x, axes, op, keep);
                        check(
                            &b,
                            &b.reduce(&xt, axes, op, keep),
                            &want,
                            FWD,
                            &format!("reduce {axes:?} {op:?} {keep}"),
                        );
                    }
                }
            }
            for axis in 0..4 {
                for log in [false, true] {
                    let y = r::softmax(&x, axis, log);
                    let yt = b.softmax(&xt, axis, log);
                    check(&b, &yt, &y, FWD, &format!("softmax axis {axis} log {log}"));
                    let dy = RefTensor::random(&sh, 6);
                    let got = b.softmax_backward(&yt, &up(&b, &dy), axis, log);
                    check(
                        &b,
                        &got,
                        &r::softmax_backward(&y, &dy, axis, log),
                        BWD,
                        "softmax backward",
                    );
                }
            }
        }
    }
}

#[test]
fn losses_match_reference() {
    let b = CpuBackend::new(Some(2));
    for (n, k, top) in [(1usize, 3usize, false), (3, 10, false), (3, 10, true)] {
        let z = RefTensor::random(&[n, k], 8);
        // Arbitrary classes, or each sample's top class (the DLR / CW branch where the target
        // is the maximum).
        let classes: Vec<u32> = (0..n)
            .map(|i| {
                let row = &z.data[i * k..(i + 1) * k];
                let best = (0..k).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                (if top { best } else { (i * 7 + 1) % k }) as u32
            })
            .collect();
        let target = RefTensor::random(&[n, k], 9);
        let (zt, tt) = (up(&b, &z), up(&b, &target));
        for kind in [
            Loss::CrossEntropy,
            Loss::CwMargin { kappa: 0.1 },
            Loss::CwMargin { kappa: 50.0 },
            Loss::Dlr,
            Loss::Mse,
        ] {
            let (want_l, want_g) = if kind == Loss::Mse {
                r::loss(kind, &z, &RefLossTargets::Dense(&target))
            } else {
                r::loss(kind, &z, &RefLossTargets::Classes(&classes))
            };
            let (l, g) = if kind == Loss::Mse {
                b.loss(kind, &zt, &LossTargets::Dense(&tt))
            } else {
                b.loss(kind, &zt, &LossTargets::Classes(&classes))
            };
            check(&b, &l, &want_l, FWD, &format!("{kind:?} loss"));
            check(&b, &g, &want_g, BWD, &format!("{kind:?} grad"));
        }
    }
    // MSE on image-shaped outputs (per-pixel targets).
    let z = RefTensor::random(&[3, 2, 4, 4], 1);
    let t = RefTensor::random(&[3, 2, 4, 4], 2);
    let (wl, wg) = r::loss(Loss::Mse, &z, &RefLossTargets::Dense(&t));
    let (l, g) = b.loss(Loss::Mse, &up(&b, &z), &LossTargets::Dense(&up(&b, &t)));
    check(&b, &l, &wl, FWD, "mse image");
    check(&b, &g, &wg, BWD, "mse image grad");
}

#[test]
fn resize_matches_reference() {
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
    let shapes = [
        ([1, 2, 3, 5], [7, 4]),
        ([3, 1, 6, 4], [3, 9]),
        ([1, 1, 4, 4], [1, 1]),
        ([2, 3, 64, 48], [28, 28]),
    ];
    for b in backends() {
        for mode in modes {
            for coord in coords {
                for (xs, out) in shapes {
                    let p = ResizeParams {
                        mode,
                        coord,
                        out_hw: out,
                    };
                    let x = RefTensor::random(&xs, 1);
                    let what = format!("{mode:?} {coord:?} {xs:?}->{out:?}");
                    check(
                        &b,
                        &b.resize(&up(&b, &x), &p),
                        &r::resize(&x, &p),
                        FWD,
                        &what,
                    );
                    let dy = RefTensor::random(&[xs[0], xs[1], out[0], out[1]], 2);
                    let got = b.resize_backward(&up(&b, &dy), xs, &p);
                    check(
                        &b,
                        &got,
                        &r::resize_backward(&dy, xs, &p),
                        BWD,
                        &format!("{what} backward"),
                    );
                }
            }
        }
    }
}

#[test]
fn movement_matches_reference() {
    for b in backends() {
        for big in [false, true] {
            let sh: Vec<usize> = if big {
                vec![3, 30, 40, 20]
            } else {
                vec![2, 3, 4, 5]
            };
            let x = RefTensor::random(&sh, 1);
            let xt = up(&b, &x);
            for perm in [[0, 1, 2, 3], [3, 2, 1, 0], [0, 2, 3, 1], [1, 0, 3, 2]] {
                check(
                    &b,
                    &b.transpose(&xt, &perm),
                    &r::transpose(&x, &perm),
                    0.0,
                    "transpose",
                );
            }
            for axis in 0..4 {
                let (s, e) = (1.min(sh[axis]), sh[axis] - 1);
                check(
                    &b,
                    &b.slice(&xt, axis, s, e),
                    &r::slice(&x, axis, s, e),
                    0.0,
                    "slice",
                );
                let mut osh = sh.clone();
                osh[axis] = 2;
                let o = RefTensor::random(&osh, 2);
                let ot = up(&b, &o);
                check(
                    &b,
                    &b.concat(&[&xt, &ot, &xt], axis),
                    &r::concat(&[&x, &o, &x], axis),
                    0.0,
                    "concat",
                );
            }
            for mode in [PadMode::Constant, PadMode::Reflect, PadMode::Edge] {
                let pads = [(0, 1), (2, 1), (3, 2), (1, 4)];
                let want = r::pad(&x, &pads, mode, 0.25);
                check(
                    &b,
                    &b.pad(&xt, &pads, mode, 0.25),
                    &want,
                    0.0,
                    &format!("pad {mode:?}"),
                );
                let dy = RefTensor::random(&want.shape, 3);
                let got = b.pad_backward(&up(&b, &dy), &sh, &pads, mode);
                check(
                    &b,
                    &got,
                    &r::pad_backward(&dy, &sh, &pads, mode),
                    BWD,
                    &format!("pad backward {mode:?}"),
                );
            }
        }
        // Reflect pads wider than the axis keep reflecting (as the reference documents).
        let x = RefTensor::random(&[1, 3], 4);
        let got = b.pad(&up(&b, &x), &[(0, 0), (5, 6)], PadMode::Reflect, 0.0);
        check(
            &b,
            &got,
            &r::pad(&x, &[(0, 0), (5, 6)], PadMode::Reflect, 0.0),
            0.0,
            "wide reflect",
        );
        let z = b.zeros(&[2, 3]);
        assert_eq!(b.download(&z), vec![0.0; 6]);
        assert_eq!(b.download(&b.fill(&[2], 1.5)), vec![1.5, 1.5]);
    }
}

#[test]
fn perturbation_matches_reference() {
    for b in backends() {
        for sh in [vec![1, 3, 4, 4], vec![3, 2, 5, 7], vec![3, 3, 64, 64]] {
            let x = RefTensor::random(&sh, 1);
            let mut g = RefTensor::random(&sh, 2);
            // One sample with a zero gradient takes no L2 step.
            let per = g.len() / sh[0];
            g.data[..per].iter_mut().for_each(|v| *v = 0.0);
            let x0 = RefTensor::random(&sh, 3);
            let (xt, gt, x0t) = (up(&b, &x), up(&b, &g), up(&b, &x0));
            check(
                &b,
                &b.sign_step(&xt, &gt, 0.03),
                &r::sign_step(&x, &g, 0.03),
                FWD,
                "sign_step",
            );
            check(
                &b,
                &b.l2_step(&xt, &gt, 0.5),
                &r::l2_step(&x, &g, 0.5),
                FWD,
                "l2_step",
            );
            for (eps, norm) in [(0.1, Norm::Linf), (0.5, Norm::L2), (1e3, Norm::L2)] {
                check(
                    &b,
                    &b.project(&xt, &x0t, eps, norm),
                    &r::project(&x, &x0, eps, norm),
                    FWD,
                    &format!("project {norm:?} {eps}"),
                );
            }
            let lo: Vec<f32> = (0..sh[0]).map(|i| -0.5 + 0.1 * i as f32).collect();
            let hi: Vec<f32> = (0..sh[0]).map(|i| 0.5 - 0.05 * i as f32).collect();
            check(
                &b,
                &b.clamp_per_sample(&xt, &lo, &hi),
                &r::clamp_per_sample(&x, &lo, &hi),
                FWD,
                "clamp",
            );
            for norm in [Norm::L1, Norm::L2, Norm::Linf] {
                check(
                    &b,
                    &b.norm_per_sample(&xt, norm),
                    &r::norm_per_sample(&x, norm),
                    FWD,
                    &format!("norm {norm:?}"),
                );
            }
        }
    }
}

#[test]
fn random_is_counter_based() {
    for b in backends() {
        let shape = [3, 50, 700];
        let u = b.download(&b.random_uniform(&shape, 42, -1.0, 3.0));
        // Bit-exact with the shared counter formula (the GPU implements the same).
        for i in [0usize, 1, 777, 104_999] {
            assert_eq!(u[i], -1.0 + 4.0 * counter_uniform(42, i as u32));
        }
        assert!(u.iter().all(|&v| (-1.0..3.0).contains(&v)));
        check(
            &b,
            &b.random_uniform(&shape, 42, -1.0, 3.0),
            &r::random_uniform(&shape, 42, -1.0, 3.0),
            FWD,
            "uniform",
        );
        check(
            &b,
            &b.random_normal(&shape, 9, 0.5),
            &r::random_normal(&shape, 9, 0.5),
            FWD,
            "normal",
        );
        assert_ne!(
            u,
            b.download(&b.random_uniform(&shape, 43, -1.0, 3.0)),
            "seed changes the stream"
        );
    }
}

#[test]
fn results_are_bit_identical_across_runs() {
    // The parallel path (2 threads, sizes above the threshold) must not depend on scheduling.
    let b = CpuBackend::new(Some(2));
    let x = up(&b, &RefTensor::random(&[4, 8, 24, 24], 1));
    let w = up(&b, &RefTensor::random(&[16, 8, 3, 3], 2));
    let p = conv(1, [1; 4], 1, 1);
    let run = || {
        let y = b.conv2d(&x, &w, None, &p);
        let dy = b.unary(Unary::Tanh, &y);
        let dx = b.conv2d_backward_input(&dy, &w, &p, [4, 8, 24, 24]);
        let dw = b.conv2d_backward_weight(&dy, &x, &p, [16, 8, 3, 3]);
        let s = b.reduce(&y, &[0, 2, 3], ReduceOp::Sum, false);
        let sm = b.softmax(&y.reshape(&[4, 16 * 24 * 24]), 1, true);
        let mm = b.matmul(
            &y.reshape(&[4 * 16, 576]),
            &y.reshape(&[4 * 16, 576]),
            false,
            true,
        );
        [y, dx, dw, s, sm, mm].map(|t| b.download(&t))
    };
    let first = run();
    for _ in 0..3 {
        let again = run();
        for (i, (a, c)) in first.iter().zip(&again).enumerate() {
            assert!(
                a.iter().zip(c).all(|(u, v)| u.to_bits() == v.to_bits()),
                "output {i} differs between runs"
            );
        }
    }
}

/// The speed paths (small-reduction conv kernel forward and backward, fused conv + activation,
/// full-window and 2x2 max pooling with ties, contiguous broadcast rows) against the reference.
#[test]
fn fast_paths_match_reference() {
    let convs: Vec<([usize; 4], [usize; 4], Conv2dParams)> = vec![
        // the demo CNN's first layer (K = 9), large enough for the parallel path
        ([3, 1, 28, 28], [16, 1, 3, 3], conv(1, [1; 4], 1, 1)),
        // K = 9 with dilation and asymmetric pads; K = 8 with groups and stride (mg = 2)
        ([2, 1, 9, 9], [3, 1, 3, 3], conv(1, [2, 0, 1, 2], 2, 1)),
        ([2, 4, 8, 8], [4, 2, 2, 2], conv(2, [1, 1, 0, 0], 1, 2)),
        // output width not a multiple of the kernel's 8-pixel blocks (K = 16)
        ([1, 4, 5, 7], [3, 4, 2, 2], Conv2dParams::default()),
        // GEMM path (K = 144) with the fused epilogue, and depthwise
        ([2, 16, 14, 14], [32, 16, 3, 3], conv(1, [1; 4], 1, 1)),
        ([2, 6, 7, 7], [6, 1, 3, 3], conv(1, [1; 4], 1, 6)),
        // the direct path's shared padding columns: unequal sides (two zero columns between
        // rows, two after the last plane), and padding past a 1x1 kernel's reach (rows of
        // w + pl + pr)
        ([2, 3, 6, 5], [4, 3, 1, 3], conv(1, [1, 2, 1, 3], 1, 1)),
        ([2, 2, 4, 4], [3, 2, 1, 1], conv(1, [1; 4], 1, 1)),
        // the lane kernel: 30 channels per group (two groups; a register and 14/16 of
        // another), odd output sizes for the pooling, and 15 channels (one register, pooled
        // only); 32 channels over more than one block of output rows
        ([2, 4, 9, 11], [60, 2, 3, 3], conv(1, [1; 4], 1, 2)),
        ([1, 3, 11, 13], [15, 3, 3, 3], conv(1, [1, 0, 1, 2], 1, 1)),
        ([1, 2, 40, 30], [32, 2, 3, 3], conv(1, [1; 4], 1, 1)),
        // the strided lane kernel (chunks of 48 or 64 channels, stride 2): a small ResNet
        // stem, and asymmetric pads with odd sizes
        ([1, 3, 30, 26], [64, 3, 7, 7], conv(2, [3; 4], 1, 1)),
        ([2, 2, 17, 19], [48, 2, 3, 3], conv(2, [1, 0, 2, 1], 1, 1)),
        // two chunks and two reduction blocks (k = 144), two samples' planes in one product
        ([2, 16, 15, 13], [128, 16, 3, 3], conv(2, [1; 4], 1, 1)),
        // no padding (the input read in place): a 2x2 / stride-2 downsampling, odd sizes; and
        // a 1x1 / stride-2 one (ResNet's), which the lane kernel leaves to the panel kernel
        ([3, 8, 11, 12], [64, 8, 2, 2], conv(2, [0; 4], 1, 1)),
        ([3, 8, 11, 12], [64, 8, 1, 1], conv(2, [0; 4], 1, 1)),
        // groups of 48-channel chunks (96 = two chunks per group) with dilation
        ([2, 4, 13, 11], [192, 2, 3, 3], conv(2, [2, 1, 2, 0], 2, 2)),
        // a plane of more positions than one product takes (35 x 34: rows 0-29, then 30-34),
        // and samples two to a product with a last one alone (20 x 20 each, five samples)
        ([1, 2, 70, 68], [64, 2, 3, 3], conv(2, [1; 4], 1, 1)),
        ([5, 2, 40, 40], [64, 2, 3, 3], conv(2, [1; 4], 1, 1)),
        // an im2col block too large to make in one piece (147 x 1600, stride 3): made and
        // multiplied a few output rows at a time, the last chunk short
        ([1, 3, 120, 120], [8, 3, 7, 7], conv(3, [3; 4], 1, 1)),
        // the stride-2 direct path on phase planes: odd sizes, asymmetric pads (an odd top and
        // left pad change which phase a row or column lands in), a 5x5 kernel with groups, a
        // 2x2 kernel without padding, and ResNet's 3x3 downsampling shape in small
        ([2, 5, 15, 17], [24, 5, 3, 3], conv(2, [1; 4], 1, 1)),
        ([1, 3, 16, 13], [20, 3, 3, 3], conv(2, [0, 1, 2, 0], 1, 1)),
        ([2, 6, 12, 11], [12, 3, 5, 5], conv(2, [2, 1, 2, 2], 1, 2)),
        ([1, 4, 10, 10], [16, 4, 2, 2], conv(2, [0; 4], 1, 1)),
        ([1, 16, 14, 14], [32, 16, 3, 3], conv(2, [1; 4], 1, 1)),
    ];
    let acts = [Unary::Relu, Unary::LeakyRelu { alpha: 0.1 }, Unary::Tanh];
    for b in backends() {
        for (ci, (xs, ws, p)) in convs.iter().enumerate() {
            let x = RefTensor::random(xs, 40 + ci as u64);
            let w = RefTensor::random(ws, 50 + ci as u64);
            let bias = RefTensor::random(&[ws[0]], 60 + ci as u64);
            let (xt, wt, bt) = (up(&b, &x), up(&b, &w), up(&b, &bias));
            let y = r::conv2d(&x, &w, Some(&bias), p);
            check(&b, &b.conv2d(&xt, &wt, Some(&bt), p), &y, FWD, "fast conv");
            for act in acts {
                let got = b.conv2d_act(&xt, &wt, Some(&bt), p, act);
                let what = format!("conv2d_act {act:?} case {ci}");
                // Tanh squashes the scale the f32 conv error is relative to: BWD tolerance.
                check(&b, &got, &r::unary(act, &y), BWD, &what);
                // Fused = unfused, bit for bit (same kernels, same order).
                let sep = b.unary(act, &b.conv2d(&xt, &wt, Some(&bt), p));
                assert_eq!(b.download(&got), b.download(&sep), "{what} vs unfused");
                // Conv + activation + pooling (fused in the copy-out for ReLU and 2x2 / 2 max
                // pooling where the direct path runs, else the steps): equal to the steps as
                // floats, and to the reference.
                let [oh, ow] = [y.shape[2], y.shape[3]];
                for pp in [
                    max_pool_2x2(oh, ow),
                    pool(
                        PoolKind::Max,
                        [3, 3],
                        [2, 2],
                        [1; 4],
                        [1, 1],
                        [oh.div_ceil(2), ow.div_ceil(2)],
                    ),
                ] {
                    let got = b.conv2d_act_pool(&xt, &wt, Some(&bt), p, act, &pp);
                    let what = format!("{what}, pool {:?}", pp.kernel);
                    check(&b, &got, &r::pool2d(&r::unary(act, &y), &pp), BWD, &what);
                    assert_eq!(
                        b.download(&got),
                        b.download(&b.pool2d(&sep, &pp)),
                        "{what} vs steps"
                    );
                    // The fused path runs where it should (cases 0 and 3 take the direct path
                    // on any CPU with the packed kernel) and nowhere else.
                    let fused = b
                        .conv2d_act_maxpool2(
                            &x.to_f32(),
                            *xs,
                            super::wcache::Weights::of(&wt.buf),
                            *ws,
                            None,
                            p,
                            act,
                            &pp,
                        )
                        .is_some();
                    // The 3x3 / stride-2 pooling fuses after a stride-2 convolution on the
                    // strided lane kernel (the cases above that take it, where the CPU has
                    // AVX2), always.
                    let strided = matches!(ci, 11..=14 | 16..=18) && super::sgemm::available();
                    let relu = act == Unary::Relu;
                    let pattern = relu && (pp.kernel == [2, 2] || strided);
                    assert!(fused <= pattern, "{what}: fused");
                    let direct2 = pp.kernel == [2, 2] && matches!(ci, 0 | 3);
                    if relu
                        && (direct2 && super::sgemm::available() || pp.kernel == [3, 3] && strided)
                    {
                        assert!(fused, "{what}: not fused");
                    }
                }
            }
            let dy = RefTensor::random(&y.shape, 70 + ci as u64);
            let got = b.conv2d_backward_input(&up(&b, &dy), &wt, p, *xs);
            let want = r::conv2d_backward_input(&dy, &w, p, *xs);
            check(&b, &got, &want, BWD, &format!("fast conv dx {ci}"));
        }

        // Max pooling with many ties (values on a coarse grid) and NaNs: the first strict
        // maximum in row-major order wins, forward and backward. 7x9 input: the last row and
        // column belong to no 2x2 window.
        // Also rows of 19 and 16 windows: the eight-window vector path, its scalar remainder,
        // and tiled planes (every dx element written, not accumulated); NaNs on each tap.
        for (xs, kernel, stride, out) in [
            ([2, 3, 7, 9], [2, 2], [2, 2], [3, 4]),
            ([2, 3, 7, 9], [3, 2], [1, 2], [5, 4]),
            ([2, 3, 9, 38], [2, 2], [2, 2], [4, 19]),
            ([1, 2, 16, 32], [2, 2], [2, 2], [8, 16]),
        ] {
            let mut x = RefTensor::random(&xs, 80);
            for v in &mut x.data {
                *v = (*v * 2.0).round() / 2.0;
            }
            x.data[0] = f64::NAN;
            x.data[12] = f64::NAN;
            let w = xs[3];
            for at in [2 * w + 1, 2 * w + 4, 3 * w + 6, 3 * w + 9, 5 * w + 17] {
                x.data[at] = f64::NAN;
            }
            {
                let p = pool(PoolKind::Max, kernel, stride, [0; 4], [1, 1], out);
                let xt = up(&b, &x);
                let got = b.download(&b.pool2d(&xt, &p));
                let want = r::pool2d(&x, &p);
                for (i, (&g, &w)) in got.iter().zip(&want.data).enumerate() {
                    assert!(
                        (g.is_nan() && w.is_nan()) || g as f64 == w,
                        "max pool {kernel:?} [{}] at {i}: {g} vs {w}",
                        b.describe()
                    );
                }
                let dy = RefTensor::random(&want.shape, 81);
                let got = b.pool2d_backward(&up(&b, &dy), &xt, &p);
                let want = r::pool2d_backward(&dy, &x, &p);
                check(
                    &b,
                    &got,
                    &want,
                    BWD,
                    &format!("max pool backward {xs:?} {kernel:?}"),
                );
            }
        }

        // Row broadcasts: [N, K] op [K] and [K] op [N, K], above the parallel threshold.
        let a = RefTensor::random(&[300, 260], 90);
        let v = RefTensor::random(&[260], 91);
        for op in [Binary::Add, Binary::Sub, Binary::Div] {
            let (at, vt) = (up(&b, &a), up(&b, &v));
            check(
                &b,
                &b.binary(op, &at, &vt),
                &r::binary(op, &a, &v),
                FWD,
                "row bcast",
            );
            check(
                &b,
                &b.binary(op, &vt, &at),
                &r::binary(op, &v, &a),
                FWD,
                "row bcast r",
            );
        }
    }
}

/// Blocks widen only where a range's transformed weights outweigh the cache-sized block, into
/// as few blocks of equal width (whole 16-column strips) as the cap allows.
#[test]
fn winograd_blocks_widen_for_heavy_weights() {
    use super::winograd::wide_block;
    // light weights (64 x 64 channels): the cache-sized block stays
    assert_eq!(wide_block(32, 16 * 64 * 64, 392), 32);
    // heavy weights (256 x 256): ResNet's 14x14 layer at batch 2, 98 tiles in one block
    assert_eq!(wide_block(32, 16 * 256 * 256, 98), 112);
    // at batch 4, 196 tiles in two blocks of 98 (not 128 and 68)
    assert_eq!(wide_block(32, 16 * 256 * 256, 196), 112);
    // a task no wider than the block keeps it
    assert_eq!(wide_block(32, 16 * 512 * 512, 32), 32);
    assert_eq!(wide_block(32, 16 * 512 * 512, 20), 32);
    // the case in `winograd_matches_reference`
    assert_eq!(wide_block(32, 16 * 200 * 64, 150), 80);
}

/// The Winograd F(2x2, 3x3) path against the f64 reference, forward (bias, fused ReLU and
/// another activation) and input gradient (the flipped convolution takes the same path), on
/// shapes that reach each of its branches: odd output sizes (partial tiles, masked last rows),
/// two 8-tile lane groups per row (the right-to-left spill order), several blocks per sample,
/// pads on one side only and pads beyond the kernel's reach, output-channel ranges (fewer
/// samples than threads) and sample chunks. Each case asserts that the path applies, so the
/// test cannot silently drift onto another path. Results must also not depend on the thread
/// count (the reduction order is per element).
#[test]
fn winograd_matches_reference() {
    let cases: Vec<([usize; 4], [usize; 4], Conv2dParams)> = vec![
        // the demo CNN's second convolution
        ([8, 16, 14, 14], [32, 16, 3, 3], conv(1, [1; 4], 1, 1)),
        // odd sizes, asymmetric pads: oh = 13, ow = 11
        ([10, 6, 13, 11], [9, 6, 3, 3], conv(1, [0, 1, 2, 1], 1, 1)),
        // no padding, 16 tiles per row (two lane groups)
        ([4, 8, 30, 34], [8, 8, 3, 3], conv(1, [0; 4], 1, 1)),
        // one sample: channel ranges on 3 threads; several blocks per sample
        ([1, 16, 40, 40], [24, 16, 3, 3], conv(1, [1; 4], 1, 1)),
        ([1, 64, 40, 40], [64, 64, 3, 3], conv(1, [1; 4], 1, 1)),
        // pads beyond the kernel's reach (all-padding border outputs)
        ([12, 5, 9, 9], [7, 5, 3, 3], conv(1, [2; 4], 1, 1)),
        // ResNet's last stage in small: 7x7 planes (4 x 4 tiles, the last row and column
        // half outside), 64 tiles in all, taken because the transformed weights are kept
        ([4, 32, 7, 7], [40, 32, 3, 3], conv(1, [1; 4], 1, 1)),
        // transformed weights past `WIDE_WEIGHT_FLOATS` (16 x 200 x 64): on one thread two
        // wide blocks of 80 tiles, each three samples' 25 tiles (rows of several samples in
        // one block); on three, a sample per task in one cache-sized block
        ([6, 64, 10, 10], [200, 64, 3, 3], conv(1, [1; 4], 1, 1)),
    ];
    let one = CpuBackend::new(Some(1));
    let three = CpuBackend::new(Some(3));
    // Where the AVX-512 GEMM runs, few channels go to the direct path; the demo CNN's
    // convolution then does, and the path itself is still tested on every case below.
    if super::sgemm::avx512() {
        let (xs, ws, p) = &cases[0];
        assert!(
            !super::conv::winograd_probe(*xs, *ws, p),
            "16 x 32 channels on AVX-512"
        );
    }
    super::winograd::FEW_PAIRS.with(|f| f.set(true));
    for (ci, (xs, ws, p)) in cases.iter().enumerate() {
        let gm = super::conv::winograd_probe(*xs, *ws, p);
        assert!(
            gm,
            "case {ci}: the Winograd path does not apply to {xs:?} * {ws:?}"
        );
        let x = RefTensor::random(xs, 500 + ci as u64);
        let w = RefTensor::random(ws, 600 + ci as u64);
        let bias = RefTensor::random(&[ws[0]], 700 + ci as u64);
        let y = r::conv2d(&x, &w, Some(&bias), p);
        let dy = RefTensor::random(&y.shape, 800 + ci as u64);
        let dx = r::conv2d_backward_input(&dy, &w, p, *xs);
        let mut runs = Vec::new();
        for b in [&one, &three] {
            let (xt, wt, bt) = (up(b, &x), up(b, &w), up(b, &bias));
            let got = b.conv2d(&xt, &wt, Some(&bt), p);
            check(b, &got, &y, FWD, &format!("winograd case {ci}"));
            for act in [Unary::Relu, Unary::Tanh] {
                let fused = b.conv2d_act(&xt, &wt, Some(&bt), p, act);
                check(
                    b,
                    &fused,
                    &r::unary(act, &y),
                    BWD,
                    &format!("winograd {act:?} {ci}"),
                );
            }
            // The ReLU and 2x2 pooling taken from the output tiles (odd output sizes: the cut
            // last tile row and column pool nothing): equal to the steps as floats, and to the
            // reference; and it is the fused path that ran.
            let [oh, ow] = [y.shape[2], y.shape[3]];
            let pp = max_pool_2x2(oh, ow);
            let pooled = b.conv2d_act_pool(&xt, &wt, Some(&bt), p, Unary::Relu, &pp);
            let steps = b.pool2d(&b.conv2d_act(&xt, &wt, Some(&bt), p, Unary::Relu), &pp);
            let what = format!("winograd pooled {ci}");
            check(
                b,
                &pooled,
                &r::pool2d(&r::unary(Unary::Relu, &y), &pp),
                BWD,
                &what,
            );
            assert_eq!(b.download(&pooled), b.download(&steps), "{what} vs steps");
            let fused = b.conv2d_act_maxpool2(
                &x.to_f32(),
                *xs,
                super::wcache::Weights::of(&wt.buf),
                *ws,
                Some(&bias.to_f32()),
                p,
                Unary::Relu,
                &pp,
            );
            let (fy, fs) = fused.unwrap_or_else(|| panic!("{what}: not fused"));
            assert_eq!(fs.to_vec(), pooled.shape, "{what}: shape");
            assert_eq!(fy, b.download(&pooled), "{what}: the fused call");
            let got_dx = b.conv2d_backward_input(&up(b, &dy), &wt, p, *xs);
            check(b, &got_dx, &dx, BWD, &format!("winograd dx {ci}"));
            runs.push([b.download(&got), b.download(&got_dx)]);
        }
        for (k, (a, c)) in runs[0].iter().zip(&runs[1]).enumerate() {
            assert!(
                a.iter().zip(c).all(|(u, v)| u.to_bits() == v.to_bits()),
                "case {ci} output {k}: 1 and 3 threads differ"
            );
        }
    }
}

/// The forms derived from a weight tensor (packed panels, Winograd-domain weights, flipped
/// weights, a transposed Linear matrix) are made on the first call and reused: later calls
/// give bit-identical results, equal to forms made afresh, and the cache lets go of a
/// tensor's forms once it is dropped.
#[test]
fn cached_weight_forms_give_the_same_results() {
    use super::wcache::Weights;
    let cases: Vec<([usize; 4], [usize; 4], Conv2dParams)> = vec![
        // direct (the demo CNN's second convolution)
        ([8, 16, 14, 14], [32, 16, 3, 3], conv(1, [1; 4], 1, 1)),
        // im2col with stride 2 and a 7x7 kernel (ResNet's stem, smaller)
        ([2, 3, 30, 30], [16, 3, 7, 7], conv(2, [3; 4], 1, 1)),
        // pointwise
        ([2, 32, 12, 12], [24, 32, 1, 1], Conv2dParams::default()),
        // Winograd, many channels
        ([4, 64, 12, 12], [64, 64, 3, 3], conv(1, [1; 4], 1, 1)),
    ];
    let b = CpuBackend::new(Some(1));
    for (ci, (xs, ws, p)) in cases.iter().enumerate() {
        let x = RefTensor::random(xs, 900 + ci as u64);
        let w = RefTensor::random(ws, 910 + ci as u64);
        let (xt, wt) = (up(&b, &x), up(&b, &w));
        let first = b.download(&b.conv2d(&xt, &wt, None, p));
        let cached = b.download(&b.conv2d(&xt, &wt, None, p));
        let (fresh, _) = b.conv2d_impl(
            &xt.buf,
            *xs,
            Weights::transient(&wt.buf),
            *ws,
            None,
            p,
            None,
        );
        let want = r::conv2d(&x, &w, None, p);
        assert_close(&first, &want, FWD, &format!("case {ci}"));
        for (what, v) in [("second call", &cached), ("fresh forms", &fresh)] {
            assert!(
                first
                    .iter()
                    .zip(v.iter())
                    .all(|(u, v)| u.to_bits() == v.to_bits()),
                "case {ci}: {what} differs from the first call"
            );
        }
        let dyr = RefTensor::random(&want.shape, 920 + ci as u64);
        let dy = up(&b, &dyr);
        let dx1 = b.download(&b.conv2d_backward_input(&dy, &wt, p, *xs));
        let dx2 = b.download(&b.conv2d_backward_input(&dy, &wt, p, *xs));
        assert!(
            dx1.iter()
                .zip(&dx2)
                .all(|(u, v)| u.to_bits() == v.to_bits()),
            "case {ci}: the input gradient's second call differs"
        );
        assert_close(
            &dx1,
            &r::conv2d_backward_input(&dyr, &w, p, *xs),
            BWD,
            &format!("case {ci} dx"),
        );
    }
    let held = b.weights.len();
    assert!(held > 0, "the forms of live tensors are kept");
    // A Linear layer over a batch: the transposed weights, then the same result again.
    let (x, w) = (
        RefTensor::random(&[32, 200], 930),
        RefTensor::random(&[64, 200], 931),
    );
    let (xt, wt) = (up(&b, &x), up(&b, &w));
    let y1 = b.download(&b.matmul(&xt, &wt, false, true));
    let y2 = b.download(&b.matmul(&xt, &wt, false, true));
    assert_close(&y1, &r::matmul(&x, &w, false, true), FWD, "linear");
    assert_eq!(y1, y2, "linear: second call");
    // The same buffer read as another shape (Reshape shares it) gets its own forms: a
    // 128 x 100 Linear matrix, and 64 x 64 x 3 x 3 convolution weights as 128 x 32 x 3 x 3 in
    // two groups (packed panels of another height and length).
    let w2 = w.reshape(&[128, 100]);
    let x2 = RefTensor::random(&[32, 100], 933);
    let y3 = b.matmul(&up(&b, &x2), &wt.reshape(&[128, 100]), false, true);
    assert_close(
        &b.download(&y3),
        &r::matmul(&x2, &w2, false, true),
        FWD,
        "reshaped linear",
    );
    let (xs, ws) = ([2, 64, 10, 10], [64, 64, 3, 3]);
    let (xc, wc) = (RefTensor::random(&xs, 934), RefTensor::random(&ws, 935));
    let (xct, wct) = (up(&b, &xc), up(&b, &wc));
    let p1 = conv(1, [1; 4], 1, 1);
    let p2 = conv(1, [1; 4], 1, 2);
    let wc2 = wc.reshape(&[128, 32, 3, 3]);
    for (wr, wt_r, p) in [
        (&wc, wct.clone(), &p1),
        (&wc2, wct.reshape(&[128, 32, 3, 3]), &p2),
    ] {
        let got = b.conv2d(&xct, &wt_r, None, p);
        assert_close(
            &b.download(&got),
            &r::conv2d(&xc, wr, None, p),
            FWD,
            "reshaped conv",
        );
    }
    // Every weight tensor above is dropped now but the last; the next insertion sweeps.
    drop((wt, wct));
    let w3 = up(&b, &RefTensor::random(&[64, 200], 932));
    b.matmul(&xt, &w3, false, true);
    assert_eq!(b.weights.len(), 1, "only the live tensor's form is kept");
}

/// Recycled buffers: outputs taken "dirty" are fully overwritten and accumulating kernels get
/// zeroed storage, whatever the buffers held before.
#[test]
fn recycled_buffers_do_not_leak_stale_values() {
    let b = CpuBackend::new(Some(2));
    let p = pool(PoolKind::Max, [2, 2], [2, 2], [0; 4], [1, 1], [8, 8]);
    let x = RefTensor::random(&[4, 8, 16, 16], 1);
    let dy = RefTensor::random(&[4, 8, 8, 8], 2);
    let want = r::pool2d_backward(&dy, &x, &p);
    // 2x2 windows that do not tile the plane (odd height): the last row gets no gradient.
    let p_odd = pool(PoolKind::Max, [2, 2], [2, 2], [0; 4], [1, 1], [7, 8]);
    let x_odd = RefTensor::random(&[4, 8, 15, 16], 3);
    let dy_odd = RefTensor::random(&[4, 8, 7, 8], 4);
    let want_odd = r::pool2d_backward(&dy_odd, &x_odd, &p_odd);
    for round in 0..3 {
        let junk: Vec<_> = (0..4).map(|_| b.fill(&[4 * 8 * 15 * 16], 1e30)).collect();
        drop(junk);
        let got = b.pool2d_backward(&up(&b, &dy_odd), &up(&b, &x_odd), &p_odd);
        check(
            &b,
            &got,
            &want_odd,
            BWD,
            &format!("odd pool backward round {round}"),
        );
        // Fill the free list with buffers of garbage of the sizes the ops below will ask for.
        let junk: Vec<_> = (0..4)
            .map(|_| b.fill(&[4 * 8 * 16 * 16], 1e30))
            .chain((0..4).map(|_| b.fill(&[4 * 8 * 8 * 8], -7.0)))
            .collect();
        drop(junk);
        let got = b.pool2d_backward(&up(&b, &dy), &up(&b, &x), &p);
        check(
            &b,
            &got,
            &want,
            BWD,
            &format!("pool backward round {round}"),
        );
        let got = b.unary(Unary::Relu, &up(&b, &x));
        check(
            &b,
            &got,
            &r::unary(Unary::Relu, &x),
            FWD,
            "relu on recycled",
        );
    }
}

/// A test model on `b` and an input of `batch` samples (values in [-1, 1] from `seed`).
fn model_and_input(
    b: &CpuBackend,
    m: &crate::runtime::graph_tests::ModelInfo,
    batch: usize,
    seed: u64,
) -> (crate::runtime::exec::Model<CpuBackend>, Tensor<CpuBackend>) {
    let graph = crate::runtime::onnx::load(&m.path).expect("import");
    let model = crate::runtime::exec::Model::new(b, graph);
    let mut shape = m.input_shape.clone();
    shape[0] = batch;
    let n: usize = shape.iter().product();
    let data = crate::runtime::graph_tests::input_data(n, seed, -1.0, 1.0);
    let x = b.upload(&data, &shape);
    (model, x)
}

/// The executor's inference-only Conv + activation (+ Pool) and Binary + activation fusions:
/// they fire on the test models that have the patterns, and the fused forward equals the
/// unfused (taped) run (as floats: a fused ReLU + max pooling may give a zero of the other
/// sign).
#[test]
fn fused_inference_equals_taped_forward() {
    use crate::runtime::exec::{binary_act_fusions, conv_act_fusions};
    let (_, models) = crate::runtime::graph_tests::models();
    let (mut fused_any, mut pooled_any, mut binary_any) = (false, false, false);
    for b in backends() {
        for m in models {
            let (model, x) = model_and_input(&b, m, 3, 5);
            let fusions = conv_act_fusions(&model.graph);
            fused_any |= fusions.iter().any(Option::is_some);
            pooled_any |= fusions.iter().flatten().any(|f| f.pool);
            binary_any |= binary_act_fusions(&model.graph).iter().any(Option::is_some);
            let fast = model.forward(&b, &x).expect("forward");
            let tape = model.run(&b, &[&x], true).expect("taped run");
            for (o, f) in model.graph.outputs.iter().zip(&fast) {
                assert_eq!(
                    b.download(f),
                    b.download(tape.get(*o)),
                    "{} [{}]",
                    m.name,
                    b.describe()
                );
            }
        }
    }
    assert!(fused_any, "no test model has a fusable Conv -> activation");
    assert!(
        pooled_any,
        "no test model has a fusable Conv -> activation -> Pool"
    );
    assert!(
        binary_any,
        "no test model has a fusable Binary -> activation (a residual Add -> ReLU)"
    );
}

/// Autodiff's fusions (a taped Conv with its ReLU, a ReLU's backward with its pooling's) give
/// the gradients of the unfused passes, input and weights, on every test model, and fire on
/// the models that have the patterns.
#[test]
fn fused_backward_equals_unfused() {
    use crate::runtime::autodiff::{self, NO_RELU_POOL};
    use crate::runtime::exec::{NO_TAPED_FUSION, taped_conv_relu_fusions};
    use crate::runtime::ir::{Op, ValueKind};
    use std::sync::atomic::Ordering;
    let (_, models) = crate::runtime::graph_tests::models();
    let (mut conv_relu, mut relu_pool) = (false, false);
    let b = CpuBackend::new(Some(1));
    for m in models {
        let (model, x) = model_and_input(&b, m, 2, 7);
        let graph = &model.graph;
        conv_relu |= taped_conv_relu_fusions(graph).iter().any(Option::is_some);
        relu_pool |= graph.nodes.iter().any(|n| {
            matches!(n.op, Op::Pool { .. })
                && matches!(graph.values[n.inputs[0]].kind,
                    ValueKind::Node(r) if matches!(graph.nodes[r].op, Op::Unary(Unary::Relu)))
        });
        let params: Vec<usize> = (0..model.graph.params.len()).collect();
        let grads = |unfused: bool| {
            NO_TAPED_FUSION.store(unfused, Ordering::Relaxed);
            NO_RELU_POOL.store(unfused, Ordering::Relaxed);
            let tape = model.run(&b, &[&x], true).expect("taped run");
            let seeds: Vec<_> = model
                .graph
                .outputs
                .iter()
                .enumerate()
                .map(|(i, &o)| {
                    let t = tape.get(o);
                    let w =
                        crate::runtime::graph_tests::input_data(t.len(), 30 + i as u64, -1.0, 1.0);
                    (o, b.upload(&w, &t.shape))
                })
                .collect();
            let g = autodiff::backward(&b, &model.graph, &tape, &seeds, &[0], &params)
                .expect("backward");
            NO_TAPED_FUSION.store(false, Ordering::Relaxed);
            NO_RELU_POOL.store(false, Ordering::Relaxed);
            g.inputs
                .iter()
                .chain(&g.params)
                .map(|t| b.download(t))
                .collect::<Vec<_>>()
        };
        let (fused, unfused) = (grads(false), grads(true));
        assert!(
            fused[0].iter().any(|v| *v != 0.0),
            "{}: zero gradient",
            m.name
        );
        assert_eq!(fused, unfused, "{}", m.name);
    }
    assert!(conv_relu, "no test model has a Conv -> ReLU");
    assert!(relu_pool, "no test model has a ReLU -> Pool");
}

/// Timing of the convolution paths, single-threaded (`ADVERSE_TIMING_THREADS=n` for more),
/// best of many repetitions: Winograd (where it applies), direct (no im2col) and im2col
/// (`cargo test --release -p adverse --lib conv_timing -- --ignored --nocapture`). Not a
/// benchmark claim: a tool for tuning on a shared machine.
#[test]
#[ignore]
fn conv_timing() {
    use std::sync::atomic::Ordering;
    let threads: usize = std::env::var("ADVERSE_TIMING_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let b = CpuBackend::new(Some(threads));
    // (x shape, w shape, pad, stride)
    let cases: [([usize; 4], [usize; 4], usize, usize); 18] = [
        ([64, 16, 14, 14], [32, 16, 3, 3], 1, 1),
        ([4, 16, 14, 14], [32, 16, 3, 3], 1, 1),
        ([2, 16, 14, 14], [32, 16, 3, 3], 1, 1),
        ([4, 64, 28, 28], [64, 64, 3, 3], 1, 1),
        ([64, 32, 14, 14], [16, 32, 3, 3], 1, 1),
        ([64, 1, 28, 28], [16, 1, 3, 3], 1, 1),
        ([1, 64, 56, 56], [64, 64, 3, 3], 1, 1),
        ([4, 256, 14, 14], [256, 256, 3, 3], 1, 1),
        ([1, 512, 7, 7], [512, 512, 3, 3], 1, 1),
        ([4, 512, 7, 7], [512, 512, 3, 3], 1, 1),
        ([2, 512, 7, 7], [512, 512, 3, 3], 1, 1),
        // ResNet-18's stem at batch 4
        ([4, 3, 224, 224], [64, 3, 7, 7], 3, 2),
        ([4, 64, 56, 56], [128, 64, 3, 3], 1, 2),
        ([4, 128, 28, 28], [256, 128, 3, 3], 1, 2),
        ([4, 256, 14, 14], [512, 256, 3, 3], 1, 2),
        // its 1x1 / stride-2 downsampling convolutions
        ([4, 64, 56, 56], [128, 64, 1, 1], 0, 2),
        ([4, 128, 28, 28], [256, 128, 1, 1], 0, 2),
        ([4, 256, 14, 14], [512, 256, 1, 1], 0, 2),
    ];
    let set = |mode: usize| {
        super::conv::FORCE_NO_WINOGRAD.store(mode == 1, Ordering::Relaxed);
        super::conv::FORCE_IM2COL.store(mode == 2, Ordering::Relaxed);
        super::lanes::NO_LANES.store(mode == 1, Ordering::Relaxed);
    };
    // `ADVERSE_TIMING_FLUSH=1`: evict the caches (a 64 MiB sweep) before every call, as a
    // model's other layers do between calls of one layer.
    let mut flush = std::env::var_os("ADVERSE_TIMING_FLUSH").map(|_| vec![0u32; 16 << 20]);
    // `ADVERSE_TIMING_CASE=k`: only case k (for profiling).
    let only: Option<usize> = std::env::var("ADVERSE_TIMING_CASE")
        .ok()
        .and_then(|s| s.parse().ok());
    for (ci, (xs, ws, pad, st)) in cases.into_iter().enumerate() {
        if only.is_some_and(|k| k != ci) {
            continue;
        }
        let x = b.upload(&RefTensor::random(&xs, 1).to_f32(), &xs);
        let w = b.upload(&RefTensor::random(&ws, 2).to_f32(), &ws);
        let p = Conv2dParams {
            stride: [st, st],
            pad: [pad; 4],
            dilation: [1, 1],
            groups: 1,
        };
        let flops =
            2.0 * (xs[0] * ws[0] * xs[2] * xs[3] * ws[1] * ws[2] * ws[3]) as f64 / (st * st) as f64;
        let mut best = [f64::INFINITY; 3];
        // `ADVERSE_TIMING_AUTO=1`: the auto path only (for profiling it).
        let modes = if std::env::var_os("ADVERSE_TIMING_AUTO").is_some() {
            1
        } else {
            3
        };
        for rep in 0..600 {
            let mode = rep % modes;
            set(mode);
            if let Some(f) = flush.as_mut() {
                for (i, v) in f.iter_mut().enumerate().step_by(16) {
                    *v = v.wrapping_add(i as u32);
                }
                std::hint::black_box(&f);
            }
            let t = std::time::Instant::now();
            let y = b.conv2d(&x, &w, None, &p);
            let dt = t.elapsed().as_secs_f64();
            std::hint::black_box(&y);
            best[mode] = best[mode].min(dt);
        }
        set(0);
        let g = |t: f64| flops / t / 1e9;
        println!(
            "{xs:?} * {ws:?}: auto {:.3} ms ({:.1} GFLOP/s direct-equivalent), direct on the panel kernel {:.3} ms ({:.1}), im2col {:.3} ms ({:.1})",
            best[0] * 1e3,
            g(best[0]),
            best[1] * 1e3,
            g(best[1]),
            best[2] * 1e3,
            g(best[2])
        );
    }
}

/// A whole model's forward (and forward + input gradient), best of many rounds, on the AVX-512
/// kernels (where the CPU has them) and on the AVX2 ones, alternating: `ADVERSE_TIMING_MODEL=
/// file.onnx` (input `[batch, ...]` from the file, batch `ADVERSE_TIMING_BATCH`, default 64),
/// `cargo test --release -p adverse --lib model_timing -- --ignored --nocapture`. A tuning
/// tool, not a benchmark claim.
#[test]
#[ignore]
fn model_timing() {
    use crate::runtime::exec::Model;
    use crate::runtime::loss::LossSpec;
    use std::sync::atomic::Ordering;
    let Some(path) = std::env::var_os("ADVERSE_TIMING_MODEL") else {
        eprintln!("set ADVERSE_TIMING_MODEL");
        return;
    };
    let batch: usize = std::env::var("ADVERSE_TIMING_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let threads: usize = std::env::var("ADVERSE_TIMING_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let grad = std::env::var_os("ADVERSE_TIMING_GRAD").is_some();
    let b = CpuBackend::new(Some(threads));
    let graph = crate::runtime::onnx::load(std::path::Path::new(&path)).expect("import");
    // The input's batch-1 shape, batch first.
    let mut shape = graph.values[graph.inputs[0]].shape.clone();
    shape[0] = batch;
    let model = Model::new(&b, graph);
    let len: usize = shape.iter().product();
    let x = b.upload(&RefTensor::random(&shape, 1).to_f32()[..len], &shape);
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 2).collect();
    let step = || {
        if grad {
            let (_, g, _) = model
                .loss_and_input_grad(
                    &b,
                    &x,
                    LossSpec::CrossEntropy { targeted: false },
                    &LossTargets::Classes(&labels),
                )
                .expect("grad");
            std::hint::black_box(b.download(&g));
        } else {
            let o = model.forward(&b, &x).expect("forward");
            std::hint::black_box(b.download(&o[0]));
        }
    };
    static NO_SWITCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // `ADVERSE_TIMING_AB=strip`: alternate the GEMM's strip copy instead of the instruction set.
    let ab = std::env::var("ADVERSE_TIMING_AB").unwrap_or_default();
    let flag: &std::sync::atomic::AtomicBool = match ab.as_str() {
        "strip" => &super::sgemm::NO_STRIP,
        "pool" => &super::conv::NO_FUSED_POOL,
        "kc" => &super::sgemm::LONG_K,
        "nowino" => &super::conv::FORCE_NO_WINOGRAD,
        "chunk" => &super::conv::NO_IM2COL_CHUNK,
        "skew" => &super::winograd::NO_SKEW,
        "fold" => &super::ops::SCALAR_FOLD,
        "lanes" => &super::lanes::NO_LANES,
        "lanegemm" => &super::lanes::NO_LANE_GEMM,
        "rowblocks" => &super::winograd::ROW_BLOCKS,
        "twochunks" => &super::conv::TWO_CHUNKS,
        "phases" => &super::conv::NO_PHASES,
        "mintiles" => &super::winograd::OLD_MIN_TILES,
        // Both sides the same: for profiling the default paths alone.
        "none" => &NO_SWITCH,
        "winorows" => &super::winograd::UNALIGNED_ROWS,
        "unaligned" => &super::sgemm::UNALIGNED_STRIP,
        "copynear" => &super::sgemm::COPY_NEAR,
        "binact" => &crate::runtime::exec::NO_BINARY_ACT,
        "strided" => &super::lanes::NO_STRIDED,
        "strided256" => &super::lanes::NO_STRIDED_AVX2,
        "slices" => &super::OLD_SLICES,
        "shortpanels" => &super::sgemm::NO_SHORT_PANELS,
        "crew" => &super::NO_CREW,
        "lanenn" => &super::lanes::NO_LANE_NN,
        "onerow" => &super::sgemm::NO_ONE_ROW,
        "relupool" => &crate::runtime::autodiff::NO_RELU_POOL,
        "tapefuse" => &crate::runtime::exec::NO_TAPED_FUSION,
        "wide" => &super::winograd::NO_WIDE_BLOCKS,
        "prefetch" => &super::sgemm::NO_PREFETCH_A,
        _ => &super::sgemm::FORCE_AVX2,
    };
    let reps: usize = std::env::var("ADVERSE_TIMING_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let mut times = [Vec::new(), Vec::new()];
    // `ADVERSE_TIMING_B_ONLY=1`: the B side on every call, for switches whose two sides
    // disturb each other within a process (the crew's helpers spin after a call).
    let b_only = std::env::var_os("ADVERSE_TIMING_B_ONLY").is_some();
    for rep in 0..reps {
        let b_side = rep % 2 == 1;
        flag.store(b_side || b_only, Ordering::Relaxed);
        let t = std::time::Instant::now();
        step();
        times[usize::from(b_side)].push(t.elapsed().as_secs_f64());
    }
    flag.store(false, Ordering::Relaxed);
    // Best and median of each side: the best is the kernels' speed, the median what a caller
    // sees on a noisy machine (and, with threads, how often one slice waits for the other).
    let [best, median] = [0.0, 0.5].map(|q: f64| {
        times.clone().map(|mut t| {
            t.sort_by(f64::total_cmp);
            t.get((t.len().saturating_sub(1) as f64 * q) as usize)
                .copied()
                .unwrap_or(f64::NAN)
        })
    });
    println!(
        "{shape:?} {}: A {:.3} ms ({:.0} images/s; median {:.3}), B ({}) {:.3} ms ({:.0}; median {:.3})",
        if grad { "forward+grad" } else { "forward" },
        best[0] * 1e3,
        batch as f64 / best[0],
        median[0] * 1e3,
        if ab.is_empty() { "avx2" } else { &ab },
        best[1] * 1e3,
        batch as f64 / best[1],
        median[1] * 1e3,
    );
}

/// `binary_act` is `unary(act, binary(op, a, b))` element for element: the one-pass Add + ReLU,
/// the generic one-pass body for other pairs, and the two-pass fallback under broadcasting
/// (bit-equal: each element goes through the same two float operations).
#[test]
fn binary_act_equals_binary_then_unary() {
    use crate::runtime::backend::Binary;
    let pairs = [
        (Binary::Add, Unary::Relu),
        (Binary::Sub, Unary::LeakyRelu { alpha: 0.1 }),
        (Binary::Mul, Unary::Sigmoid),
        (Binary::Max, Unary::Tanh),
    ];
    let shapes: [(&[usize], &[usize]); 3] = [
        (&[2, 3, 5, 7], &[2, 3, 5, 7]),
        (&[2, 3, 5, 7], &[1, 3, 1, 1]),
        (&[4, 9], &[1]),
    ];
    for b in backends() {
        for (ash, bsh) in shapes {
            let x = up(&b, &RefTensor::random(ash, 3));
            let y = up(&b, &RefTensor::random(bsh, 4));
            for (op, act) in pairs {
                let got = b.binary_act(op, &x, &y, act);
                let want = b.unary(act, &b.binary(op, &x, &y));
                assert_eq!(got.shape, want.shape, "{op:?} {act:?} {ash:?} {bsh:?}");
                assert_eq!(
                    b.download(&got),
                    b.download(&want),
                    "{op:?} {act:?} {ash:?} {bsh:?} [{}]",
                    b.describe()
                );
                // The ReLU clamps some of these sums, so the one-pass loop's clamp is
                // compared too.
                if op == Binary::Add && act == Unary::Relu && ash == bsh {
                    assert!(b.download(&got).contains(&0.0));
                }
            }
        }
    }
}
