//! Attack and training objectives on a model output, composed from the backend's raw per-sample
//! loss kernels.
//!
//! Sign convention: every [`LossSpec`] is an objective an attack *ascends* (its gradient points
//! towards success). Untargeted cross-entropy is CE of the true label (ascend = move away from
//! it); targeted is -CE of the target (ascend = move towards it). The untargeted specs equal the
//! usual training losses, so training descends the same values.

use super::backend::{Backend, Loss, LossTargets, Tensor, Unary};
use super::exec::ExecError;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossSpec {
    /// Untargeted: CE(z, y). Targeted: -CE(z, t).
    CrossEntropy { targeted: bool },
    /// Carlini-Wagner margin. Untargeted: -max(z_y - max_{i!=y} z_i, -kappa).
    /// Targeted: -max(max_{i!=t} z_i - z_t, -kappa).
    CwMargin { kappa: f32, targeted: bool },
    /// Croce & Hein's DLR (untargeted), as ascended by APGD-DLR.
    Dlr,
    /// Mean squared error against a dense target (per sample).
    Mse,
    /// Per-pixel hook: the caller supplies dObjective/dOutput densely (`LossTargets::Dense`);
    /// the per-sample value reported is the linearisation sum(g * output).
    Dense,
}

fn flat2<B: Backend>(t: &Tensor<B>) -> Tensor<B> {
    let n = t.shape.first().copied().unwrap_or(1);
    t.reshape(&[n, t.len() / n.max(1)])
}

/// Per-sample objective values (`[N]`, left on the device so that a caller can record the
/// backward pass before reading them) and d(sum of objectives)/d(output), in the output's shape.
pub fn objective<B: Backend>(
    b: &B,
    spec: LossSpec,
    out: &Tensor<B>,
    targets: &LossTargets<'_, B>,
) -> Result<(Tensor<B>, Tensor<B>), ExecError> {
    let n = out.shape.first().copied().unwrap_or(0);
    let logits = flat2(out);
    let k = logits.shape[1];
    match targets {
        LossTargets::Classes(c) => {
            if c.len() != n {
                return Err(ExecError::Loss(format!(
                    "{} labels for a batch of {n}",
                    c.len()
                )));
            }
            if let Some(&bad) = c.iter().find(|&&t| t as usize >= k) {
                return Err(ExecError::Loss(format!(
                    "label {bad} out of range for {k} classes"
                )));
            }
            if matches!(spec, LossSpec::Mse | LossSpec::Dense) {
                return Err(ExecError::Loss(format!(
                    "{spec:?} needs a dense target, not class labels"
                )));
            }
        }
        LossTargets::Dense(t) => {
            if t.shape != out.shape {
                return Err(ExecError::Loss(format!(
                    "dense target shape {:?} differs from the output's {:?}",
                    t.shape, out.shape
                )));
            }
            if !matches!(spec, LossSpec::Mse | LossSpec::Dense) {
                return Err(ExecError::Loss(format!(
                    "{spec:?} needs class labels, not a dense target"
                )));
            }
        }
    }
    let neg = |t: &Tensor<B>| b.unary(Unary::Neg, t);
    let (l, g) = match spec {
        LossSpec::CrossEntropy { targeted } => {
            let (l, g) = b.loss(Loss::CrossEntropy, &logits, targets);
            if targeted { (neg(&l), neg(&g)) } else { (l, g) }
        }
        LossSpec::CwMargin {
            kappa,
            targeted: false,
        } => {
            let (l, g) = b.loss(Loss::CwMargin { kappa }, &logits, targets);
            (neg(&l), neg(&g))
        }
        LossSpec::CwMargin {
            kappa,
            targeted: true,
        } => {
            // -max(max_{i!=t} z_i - z_t, -kappa): not a signed copy of the raw kernel, and the
            // logits are tiny ([N, K]), so it is computed on the host.
            let LossTargets::Classes(c) = targets else {
                return Err(internal());
            };
            if k < 2 {
                return Err(ExecError::Loss("CW margin needs at least 2 classes".into()));
            }
            let z = b.download(&logits);
            let mut ls = vec![0f32; n];
            let mut gs = vec![0f32; n * k];
            for s in 0..n {
                let row = &z[s * k..(s + 1) * k];
                let t = c[s] as usize;
                let (mut best, mut bi) = (f32::NEG_INFINITY, 0);
                for (i, &v) in row.iter().enumerate() {
                    if i != t && v > best {
                        best = v;
                        bi = i;
                    }
                }
                let m = best - row[t];
                if m > -kappa {
                    ls[s] = -m;
                    gs[s * k + bi] = -1.0;
                    gs[s * k + t] = 1.0;
                } else {
                    ls[s] = kappa;
                }
            }
            (b.upload(&ls, &[n]), b.upload(&gs, &[n, k]))
        }
        LossSpec::Dlr => {
            if k < 3 {
                return Err(ExecError::Loss("DLR needs at least 3 classes".into()));
            }
            b.loss(Loss::Dlr, &logits, targets)
        }
        LossSpec::Mse => {
            let LossTargets::Dense(t) = targets else {
                return Err(internal());
            };
            let tf = flat2(t);
            b.loss(Loss::Mse, &logits, &LossTargets::Dense(&tf))
        }
        LossSpec::Dense => {
            let LossTargets::Dense(gd) = targets else {
                return Err(internal());
            };
            let prod = b.binary(super::backend::Binary::Mul, &flat2(gd), &logits);
            let l = b.reduce(&prod, &[1], super::backend::ReduceOp::Sum, false);
            (l, flat2(gd))
        }
    };
    Ok((l, g.reshape(&out.shape)))
}

fn internal() -> ExecError {
    ExecError::Loss("internal: target kind checked above".into())
}
