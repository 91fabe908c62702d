//! Autodiff vs float64 central finite differences, through the same executor on the float64
//! reference backend. Every model (so every operator the importer emits) is covered, for the
//! input gradient and for a few parameter gradients; losses are checked separately against an
//! independent float64 implementation of each objective.

use super::refbackend::{RT, RefBackend, data64, tensor64};
use super::*;
use crate::runtime::autodiff;
use crate::runtime::backend::LossTargets;
use crate::runtime::exec::Model;
use crate::runtime::loss::LossSpec;
use crate::runtime::onnx;

const H: f64 = 1e-5;
const TOL: f64 = 1e-4;

fn x64(shape: &[usize], seed: u64) -> RT {
    let n = shape.iter().product();
    tensor64(
        input_data(n, seed, -1.0, 1.0)
            .into_iter()
            .map(f64::from)
            .collect(),
        shape,
    )
}

/// Objective sum_o <w_o, out_o> in f64.
fn objective(model: &Model<RefBackend>, x: &RT, ws: &[Vec<f64>]) -> f64 {
    let outs = model.forward(&RefBackend, x).expect("forward");
    outs.iter()
        .zip(ws)
        .map(|(o, w)| data64(o).iter().zip(w).map(|(a, b)| a * b).sum::<f64>())
        .sum()
}

fn check(what: &str, got: f64, fd: f64, scale: f64) {
    let err = (got - fd).abs() / fd.abs().max(scale).max(1e-9);
    assert!(
        err < TOL,
        "{what}: autodiff {got:.9e} vs finite difference {fd:.9e} (rel err {err:.2e})"
    );
}

/// Sample indices spread over a tensor (deterministic).
fn picks(len: usize, k: usize, seed: u64) -> Vec<usize> {
    (0..k)
        .map(|i| ((counter_uniform(seed, i as u32) as f64) * len as f64) as usize % len)
        .collect()
}

#[test]
fn input_and_param_gradients_match_finite_differences_for_every_model() {
    let (_, list) = models();
    let b = RefBackend;
    for (k, m) in list.iter().enumerate() {
        let g = onnx::load(&m.path).unwrap_or_else(|e| panic!("{}: {e}", m.name));
        let mut model = Model::new(&b, g);
        let mut shape = m.input_shape.clone();
        shape[0] = 2;
        let x = x64(&shape, 500 + k as u64);
        let tape = model.run(&b, &[&x], true).expect("forward");
        let outs: Vec<_> = model
            .graph
            .outputs
            .iter()
            .map(|&o| tape.values[o].clone().expect("output"))
            .collect();
        let ws: Vec<Vec<f64>> = outs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                input_data(o.len(), 900 + i as u64, -1.0, 1.0)
                    .into_iter()
                    .map(f64::from)
                    .collect()
            })
            .collect();
        let seeds: Vec<_> = model
            .graph
            .outputs
            .iter()
            .zip(&ws)
            .zip(&outs)
            .map(|((&v, w), o)| (v, tensor64(w.clone(), &o.shape)))
            .collect();
        let np = model.graph.params.len();
        // Every parameter (two entries each), so every operand rule of every op is exercised.
        let chosen: Vec<usize> = (0..np).collect();
        let grads =
            autodiff::backward(&b, &model.graph, &tape, &seeds, &[0], &chosen).expect("backward");
        // Input gradient.
        let gx = data64(&grads.inputs[0]);
        let gscale = gx.iter().fold(0f64, |a, v| a.max(v.abs())) * 1e-3;
        assert!(gscale > 0.0, "{}: zero input gradient", m.name);
        let xd = data64(&x);
        for i in picks(xd.len(), 8, 31 + k as u64) {
            let mut p = xd.clone();
            p[i] += H;
            let up = objective(&model, &tensor64(p.clone(), &shape), &ws);
            p[i] -= 2.0 * H;
            let dn = objective(&model, &tensor64(p, &shape), &ws);
            check(
                &format!("{} d/dx[{i}]", m.name),
                gx[i],
                (up - dn) / (2.0 * H),
                gscale,
            );
        }
        // Parameter gradients.
        for (j, &pi) in chosen.iter().enumerate() {
            let gp = data64(&grads.params[j]);
            let pscale = gp.iter().fold(0f64, |a, v| a.max(v.abs())) * 1e-3;
            let orig = model.params()[pi].clone();
            let od = data64(&orig);
            let name = model.graph.params[pi].name.clone();
            for i in picks(od.len(), 2, 77 + pi as u64) {
                let mut p = od.clone();
                p[i] += H;
                model
                    .set_param(pi, tensor64(p.clone(), &orig.shape))
                    .expect("set");
                let up = objective(&model, &x, &ws);
                p[i] -= 2.0 * H;
                model.set_param(pi, tensor64(p, &orig.shape)).expect("set");
                let dn = objective(&model, &x, &ws);
                model.set_param(pi, orig.clone()).expect("restore");
                check(
                    &format!("{} d/d{name}[{i}]", m.name),
                    gp[i],
                    (up - dn) / (2.0 * H),
                    pscale,
                );
            }
        }
    }
}

/// Independent float64 objectives on logits rows, per the `LossSpec` docs.
fn obj64(spec: LossSpec, z: &[f64], k: usize, labels: &[u32], dense: &[f64]) -> Vec<f64> {
    z.chunks(k)
        .enumerate()
        .map(|(s, row)| {
            let t = labels.get(s).copied().unwrap_or(0) as usize;
            let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            let other = row
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != t)
                .map(|(_, v)| *v)
                .fold(f64::NEG_INFINITY, f64::max);
            match spec {
                LossSpec::CrossEntropy { targeted: false } => lse - row[t],
                LossSpec::CrossEntropy { targeted: true } => row[t] - lse,
                LossSpec::CwMargin {
                    kappa,
                    targeted: false,
                } => -(row[t] - other).max(-kappa as f64),
                LossSpec::CwMargin {
                    kappa,
                    targeted: true,
                } => -(other - row[t]).max(-kappa as f64),
                LossSpec::Dlr => {
                    let mut srt = row.to_vec();
                    srt.sort_by(|a, b| b.total_cmp(a));
                    -(row[t] - other) / (srt[0] - srt[2] + 1e-12)
                }
                LossSpec::Mse => {
                    row.iter()
                        .zip(&dense[s * k..(s + 1) * k])
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f64>()
                        / k as f64
                }
                LossSpec::Dense => row
                    .iter()
                    .zip(&dense[s * k..(s + 1) * k])
                    .map(|(a, b)| a * b)
                    .sum(),
            }
        })
        .collect()
}

#[test]
fn loss_objectives_and_their_input_gradients_match_finite_differences() {
    let (_, list) = models();
    let m = list
        .iter()
        .find(|m| m.name == "plain_cnn")
        .expect("plain_cnn");
    let b = RefBackend;
    let model = Model::new(&b, onnx::load(&m.path).expect("import"));
    let shape = [3, 1, 12, 12];
    let x = x64(&shape, 4242);
    let labels = [1u32, 4, 0];
    let k = 5;
    let dense_v: Vec<f64> = input_data(3 * k, 5, -1.0, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    let dense = tensor64(dense_v.clone(), &[3, k]);
    let specs = [
        LossSpec::CrossEntropy { targeted: false },
        LossSpec::CrossEntropy { targeted: true },
        LossSpec::CwMargin {
            kappa: 50.0,
            targeted: false,
        },
        LossSpec::CwMargin {
            kappa: 50.0,
            targeted: true,
        },
        LossSpec::Dlr,
        LossSpec::Mse,
        LossSpec::Dense,
    ];
    let xd = data64(&x);
    for spec in specs {
        let targets = if matches!(spec, LossSpec::Mse | LossSpec::Dense) {
            LossTargets::Dense(&dense)
        } else {
            LossTargets::Classes(&labels)
        };
        let (losses, grad, logits) = model
            .loss_and_input_grad(&b, &x, spec, &targets)
            .expect("loss");
        let want = obj64(spec, &data64(&logits), k, &labels, &dense_v);
        for (s, (&l, &w)) in losses.iter().zip(&want).enumerate() {
            assert!(
                (l as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{spec:?} sample {s}: loss {l} vs {w}"
            );
        }
        let total = |xv: Vec<f64>| -> f64 {
            let outs = model.forward(&b, &tensor64(xv, &shape)).expect("forward");
            obj64(spec, &data64(&outs[0]), k, &labels, &dense_v)
                .iter()
                .sum()
        };
        let g = data64(&grad);
        let gscale = g.iter().fold(0f64, |a, v| a.max(v.abs())) * 1e-3;
        assert!(gscale > 0.0, "{spec:?}: zero gradient");
        for i in picks(xd.len(), 6, 3) {
            let mut p = xd.clone();
            p[i] += H;
            let up = total(p.clone());
            p[i] -= 2.0 * H;
            let dn = total(p);
            check(
                &format!("{spec:?} d/dx[{i}]"),
                g[i],
                (up - dn) / (2.0 * H),
                gscale,
            );
        }
    }
    // Labels out of range and wrong target kinds are errors, not panics.
    assert!(
        model
            .loss_and_input_grad(
                &b,
                &x,
                LossSpec::CrossEntropy { targeted: false },
                &LossTargets::Classes(&[9, 0, 0])
            )
            .is_err()
    );
    assert!(
        model
            .loss_and_input_grad(&b, &x, LossSpec::Mse, &LossTargets::Classes(&labels))
            .is_err()
    );
    let bad = x64(&[3, 1, 10, 12], 1);
    assert!(model.forward(&b, &bad).is_err());
}

#[test]
fn param_grads_api_matches_backward() {
    let (_, list) = models();
    let m = list
        .iter()
        .find(|m| m.name == "resnet_block")
        .expect("resnet_block");
    let b = RefBackend;
    let model = Model::new(&b, onnx::load(&m.path).expect("import"));
    let x = x64(&[2, 3, 8, 8], 9);
    let labels = [2u32, 3];
    let all: Vec<usize> = (0..model.graph.params.len()).collect();
    let spec = LossSpec::CrossEntropy { targeted: false };
    let (losses, pg, _) = model
        .loss_and_param_grads(&b, &x, spec, &LossTargets::Classes(&labels), &all)
        .expect("param grads");
    assert_eq!(pg.len(), all.len());
    // Finite difference on one conv weight entry through the reported losses (f32 sums, so a
    // coarser step and tolerance).
    let pi = all
        .iter()
        .copied()
        .find(|&i| model.graph.params[i].shape.len() == 4)
        .expect("a conv weight");
    let mut model2 = Model::new(&b, model.graph.clone());
    let mut p = data64(&model.params()[pi]);
    let h = 1e-3;
    p[0] += h;
    model2
        .set_param(pi, tensor64(p.clone(), &model.graph.params[pi].shape))
        .expect("set");
    let (up, _, _) = model2
        .loss_and_param_grads(&b, &x, spec, &LossTargets::Classes(&labels), &[])
        .expect("up");
    p[0] -= 2.0 * h;
    model2
        .set_param(pi, tensor64(p, &model.graph.params[pi].shape))
        .expect("set");
    let (dn, _, _) = model2
        .loss_and_param_grads(&b, &x, spec, &LossTargets::Classes(&labels), &[])
        .expect("dn");
    let fd = (up.iter().sum::<f32>() as f64 - dn.iter().sum::<f32>() as f64) / (2.0 * h);
    let got = data64(&pg[pi])[0];
    assert!(
        (got - fd).abs() <= 2e-3 * got.abs().max(1e-2),
        "param grad {got} vs fd {fd}"
    );
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0));
}
