//! Projected gradient descent (Madry et al. 2018), written once against the backend primitives
//! and shared by adversarial training and the PGD attack plugin.
//!
//! The loop ascends an objective supplied as a gradient callback, so the same code crafts
//! cross-entropy examples (Madry training, the attack), KL examples (TRADES) or any other
//! [`LossSpec`]. Each step is `x <- clamp(project(x + step(g)))`: the projection keeps the
//! perturbation inside the eps ball around the clean input, the clamp keeps every value inside
//! the per-sample range the input can actually take (the stored-value range mapped to model
//! units), so a crafted example is always a valid image.

use super::backend::{Backend, LossTargets, Norm, Tensor};
use super::exec::{ExecError, Model};
use super::loss::LossSpec;

#[derive(Debug, thiserror::Error)]
pub enum PgdError {
    #[error("pgd: {0}")]
    Invalid(String),
    #[error("pgd: {0:?} is not supported (use linf or l2)")]
    Norm(Norm),
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// PGD settings, in the units of the tensor being perturbed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PgdParams {
    /// Radius of the perturbation ball.
    pub eps: f32,
    pub steps: usize,
    /// Per-step size (L∞: per element; L2: per-sample norm of the step).
    pub step_size: f32,
    pub norm: Norm,
    /// Start from a uniform point of the L∞ ball / a point on the L2 sphere (Madry's random
    /// restart) instead of the clean input.
    pub random_start: bool,
    /// Seed of the counter RNG for the random start (same seed, same start, on every backend).
    pub seed: u64,
}

impl PgdParams {
    fn validate(&self) -> Result<(), PgdError> {
        if self.norm == Norm::L1 {
            return Err(PgdError::Norm(Norm::L1));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(PgdError::Invalid(format!(
                "eps must be finite and >= 0, got {}",
                self.eps
            )));
        }
        if !(self.step_size.is_finite() && self.step_size > 0.0) {
            return Err(PgdError::Invalid(format!(
                "step size must be finite and > 0, got {}",
                self.step_size
            )));
        }
        Ok(())
    }
}

/// Run PGD from `x0` (axis 0 = samples). `lo`/`hi` bound each sample's values; `grad(x)` returns
/// the gradient of the objective to *ascend* at `x` (same shape). Returns the final iterate.
pub fn pgd<B: Backend>(
    b: &B,
    x0: &Tensor<B>,
    lo: &[f32],
    hi: &[f32],
    p: &PgdParams,
    mut grad: impl FnMut(&Tensor<B>) -> Result<Tensor<B>, ExecError>,
) -> Result<Tensor<B>, PgdError> {
    p.validate()?;
    let n = x0.shape.first().copied().unwrap_or(0);
    if n == 0 {
        return Err(PgdError::Exec(ExecError::EmptyBatch));
    }
    if lo.len() != n || hi.len() != n {
        return Err(PgdError::Invalid(format!(
            "{} / {} range bounds for {n} samples",
            lo.len(),
            hi.len()
        )));
    }
    if let Some(i) = (0..n).find(|&i| lo[i].is_nan() || hi[i].is_nan() || lo[i] > hi[i]) {
        return Err(PgdError::Invalid(format!(
            "sample {i}: range [{}, {}] is empty",
            lo[i], hi[i]
        )));
    }
    let mut x = x0.clone();
    if p.random_start && p.eps > 0.0 {
        let delta = match p.norm {
            Norm::Linf => b.random_uniform(&x0.shape, p.seed, -p.eps, p.eps),
            _ => {
                let dir = b.random_normal(&x0.shape, p.seed, 1.0);
                b.l2_step(&b.zeros(&x0.shape), &dir, p.eps)
            }
        };
        x = b.binary(super::backend::Binary::Add, x0, &delta);
        x = b.clamp_per_sample(&b.project(&x, x0, p.eps, p.norm), lo, hi);
    }
    for _ in 0..p.steps {
        let g = grad(&x)?;
        x = match p.norm {
            Norm::Linf => b.sign_step(&x, &g, p.step_size),
            _ => b.l2_step(&x, &g, p.step_size),
        };
        x = b.clamp_per_sample(&b.project(&x, x0, p.eps, p.norm), lo, hi);
    }
    Ok(x)
}

/// PGD on a model's loss w.r.t. its (first) input: untargeted by default, the objective of
/// `spec` (see [`LossSpec`] for the sign convention).
pub fn pgd_model<B: Backend>(
    b: &B,
    model: &Model<B>,
    x0: &Tensor<B>,
    targets: &LossTargets<'_, B>,
    spec: LossSpec,
    lo: &[f32],
    hi: &[f32],
    p: &PgdParams,
) -> Result<Tensor<B>, PgdError> {
    pgd(b, x0, lo, hi, p, |x| {
        let (_, g, _) = model.loss_and_input_grad(b, x, spec, targets)?;
        Ok(g)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::cpu::CpuBackend;
    use crate::runtime::ir::{Graph, Op};

    /// logits = x W^T: a linear 2-class model whose CE gradient direction is known.
    fn linear_model(b: &CpuBackend) -> Model<CpuBackend> {
        let mut g = Graph::default();
        let x = g.add_input("x", vec![1, 4]);
        let w = g.add_param(
            "w",
            vec![2, 4],
            vec![1.0, -1.0, 0.5, 0.0, -1.0, 1.0, -0.5, 0.0],
        );
        let y = g
            .add_node(
                "logits",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                },
                vec![x, w],
            )
            .unwrap();
        g.outputs.push(y);
        Model::new(b, g)
    }

    #[test]
    fn linf_pgd_stays_in_ball_and_range_and_raises_loss() {
        let b = CpuBackend::new(Some(1));
        let m = linear_model(&b);
        let x0v = vec![0.5f32, 0.5, 0.5, 0.95, 0.2, 0.9, 0.1, 0.5];
        let x0 = b.upload(&x0v, &[2, 4]);
        let labels = [0u32, 1];
        let t = LossTargets::Classes(&labels);
        let spec = LossSpec::CrossEntropy { targeted: false };
        let p = PgdParams {
            eps: 0.1,
            steps: 5,
            step_size: 0.03,
            norm: Norm::Linf,
            random_start: true,
            seed: 3,
        };
        let lo = [0.0, 0.0];
        let hi = [1.0, 1.0];
        let xa = pgd_model(&b, &m, &x0, &t, spec, &lo, &hi, &p).unwrap();
        let xav = b.download(&xa);
        for (a, o) in xav.iter().zip(&x0v) {
            assert!(
                (a - o).abs() <= 0.1 + 1e-6 && (0.0..=1.0).contains(a),
                "{a} vs {o}"
            );
        }
        // Sample 0's 4th feature has zero weight: its random start stays but the range clamp
        // caps it at 1.
        let (l0, _, _) = m.loss_and_input_grad(&b, &x0, spec, &t).unwrap();
        let (l1, _, _) = m.loss_and_input_grad(&b, &xa, spec, &t).unwrap();
        assert!(l1[0] > l0[0] && l1[1] > l0[1], "{l0:?} -> {l1:?}");
        // For a linear model the optimal L∞ move on features 0..3 is the full eps: x0 -/+ eps.
        assert!(
            (xav[0] - 0.4).abs() < 1e-6 && (xav[1] - 0.6).abs() < 1e-6,
            "{xav:?}"
        );
        // Same seed: identical result.
        let again = b.download(&pgd_model(&b, &m, &x0, &t, spec, &lo, &hi, &p).unwrap());
        assert_eq!(xav, again);
    }

    #[test]
    fn l2_pgd_respects_the_radius() {
        let b = CpuBackend::new(Some(1));
        let m = linear_model(&b);
        let x0 = b.upload(&[0.5f32; 8], &[2, 4]);
        let labels = [0u32, 1];
        let p = PgdParams {
            eps: 0.2,
            steps: 4,
            step_size: 0.1,
            norm: Norm::L2,
            random_start: false,
            seed: 0,
        };
        let xa = pgd_model(
            &b,
            &m,
            &x0,
            &LossTargets::Classes(&labels),
            LossSpec::CrossEntropy { targeted: false },
            &[0.0; 2],
            &[1.0; 2],
            &p,
        )
        .unwrap();
        let v = b.download(&xa);
        for s in 0..2 {
            let n: f32 = v[s * 4..s * 4 + 4]
                .iter()
                .map(|a| (a - 0.5) * (a - 0.5))
                .sum::<f32>()
                .sqrt();
            assert!((n - 0.2).abs() < 1e-4, "sample {s}: norm {n}");
        }
    }

    #[test]
    fn bad_settings_are_errors() {
        let b = CpuBackend::new(Some(1));
        let m = linear_model(&b);
        let x0 = b.upload(&[0.5f32; 4], &[1, 4]);
        let labels = [0u32];
        let t = LossTargets::Classes(&labels);
        let spec = LossSpec::CrossEntropy { targeted: false };
        let ok = PgdParams {
            eps: 0.1,
            steps: 1,
            step_size: 0.1,
            norm: Norm::Linf,
            random_start: false,
            seed: 0,
        };
        let run =
            |p: PgdParams, lo: &[f32], hi: &[f32]| pgd_model(&b, &m, &x0, &t, spec, lo, hi, &p);
        assert!(run(ok, &[0.0], &[1.0]).is_ok());
        assert!(matches!(
            run(
                PgdParams {
                    norm: Norm::L1,
                    ..ok
                },
                &[0.0],
                &[1.0]
            ),
            Err(PgdError::Norm(_))
        ));
        assert!(
            run(
                PgdParams {
                    eps: f32::NAN,
                    ..ok
                },
                &[0.0],
                &[1.0]
            )
            .is_err()
        );
        assert!(
            run(
                PgdParams {
                    step_size: 0.0,
                    ..ok
                },
                &[0.0],
                &[1.0]
            )
            .is_err()
        );
        assert!(run(ok, &[0.0, 0.0], &[1.0]).is_err());
        assert!(run(ok, &[1.0], &[0.0]).is_err());
    }
}
