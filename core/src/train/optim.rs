//! Optimisers and learning-rate schedules, on host copies of the parameters.
//!
//! The models adverse trains are small (the demo CNN has ~100k weights), so the update runs on
//! the host in f32 with a fixed order of operations: identical on every backend and trivially
//! bit-reproducible, which the same-seed-same-weights guarantee relies on. Only the gradients
//! come from the backend.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerKind {
    /// SGD with (heavy-ball or Nesterov) momentum; weight decay is added to the gradient (L2).
    Sgd {
        #[serde(default)]
        momentum: f32,
        #[serde(default)]
        nesterov: bool,
    },
    /// Adam; weight decay is decoupled (AdamW: `w -= lr * wd * w`), which is what makes it a
    /// regulariser with adaptive steps.
    Adam {
        #[serde(default = "beta1")]
        beta1: f32,
        #[serde(default = "beta2")]
        beta2: f32,
        #[serde(default = "adam_eps")]
        eps: f32,
    },
}

fn beta1() -> f32 {
    0.9
}
fn beta2() -> f32 {
    0.999
}
fn adam_eps() -> f32 {
    1e-8
}

/// Learning rate as a function of the epoch (0-based), applied for the whole epoch.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    #[default]
    Constant,
    /// `lr * gamma^(epoch / every)`.
    Step { every: usize, gamma: f32 },
    /// Cosine from `lr` at epoch 0 to `min_lr` at the last epoch.
    Cosine {
        #[serde(default)]
        min_lr: f32,
    },
}

impl Schedule {
    pub fn lr(&self, base: f32, epoch: usize, epochs: usize) -> f32 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => {
                base * gamma.powi((epoch / every.max(1)).min(i32::MAX as usize) as i32)
            }
            Schedule::Cosine { min_lr } => {
                let t = if epochs <= 1 {
                    0.0
                } else {
                    epoch as f64 / (epochs - 1) as f64
                };
                let c = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                (min_lr as f64 + (base - min_lr) as f64 * c) as f32
            }
        }
    }
}

/// Optimiser state: one (or two) moment buffers per parameter tensor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub weight_decay: f32,
    /// Steps taken (Adam's bias correction).
    pub t: u64,
    /// SGD: velocity; Adam: first moment.
    pub m: Vec<Vec<f32>>,
    /// Adam: second moment (empty for SGD).
    pub v: Vec<Vec<f32>>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f32, sizes: &[usize]) -> Self {
        let zeros = || sizes.iter().map(|&n| vec![0f32; n]).collect::<Vec<_>>();
        let v = match kind {
            OptimizerKind::Adam { .. } => zeros(),
            OptimizerKind::Sgd { .. } => Vec::new(),
        };
        Optimizer {
            kind,
            weight_decay,
            t: 0,
            m: zeros(),
            v,
        }
    }

    /// One update of every parameter with its gradient (already averaged over the batch).
    /// Panics only on a caller bug (mismatched lengths); the trainer builds both from one model.
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f32) {
        assert_eq!(params.len(), grads.len(), "one gradient per parameter");
        self.t += 1;
        let wd = self.weight_decay;
        match self.kind {
            OptimizerKind::Sgd { momentum, nesterov } => {
                for ((w, g), m) in params.iter_mut().zip(grads).zip(&mut self.m) {
                    for i in 0..w.len() {
                        let gi = g[i] + wd * w[i];
                        m[i] = momentum * m[i] + gi;
                        let d = if nesterov { gi + momentum * m[i] } else { m[i] };
                        w[i] -= lr * d;
                    }
                }
            }
            OptimizerKind::Adam { beta1, beta2, eps } => {
                let bc1 = 1.0 - beta1.powf(self.t as f32);
                let bc2 = 1.0 - beta2.powf(self.t as f32);
                for (((w, g), m), v) in params
                    .iter_mut()
                    .zip(grads)
                    .zip(&mut self.m)
                    .zip(&mut self.v)
                {
                    for i in 0..w.len() {
                        m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
                        v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
                        let mh = m[i] / bc1;
                        let vh = v[i] / bc2;
                        w[i] -= lr * (mh / (vh.sqrt() + eps) + wd * w[i]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_momentum_matches_hand_computation() {
        let mut o = Optimizer::new(
            OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            0.1,
            &[1],
        );
        let mut w = vec![vec![1.0f32]];
        o.step(&mut w, &[vec![0.5]], 0.1);
        // g = 0.5 + 0.1 * 1 = 0.6; m = 0.6; w = 1 - 0.06
        assert!((w[0][0] - 0.94).abs() < 1e-6);
        o.step(&mut w, &[vec![0.5]], 0.1);
        // g = 0.5 + 0.094 = 0.594; m = 0.54 + 0.594 = 1.134; w = 0.94 - 0.1134
        assert!((w[0][0] - 0.8266).abs() < 1e-6, "{}", w[0][0]);
    }

    #[test]
    fn adam_first_step_is_lr_times_sign() {
        let mut o = Optimizer::new(
            OptimizerKind::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            0.0,
            &[2],
        );
        let mut w = vec![vec![0.0f32, 0.0]];
        o.step(&mut w, &[vec![3.0, -0.01]], 0.01);
        assert!(
            (w[0][0] + 0.01).abs() < 1e-6 && (w[0][1] - 0.01).abs() < 1e-5,
            "{w:?}"
        );
    }

    #[test]
    fn schedules() {
        let s = Schedule::Step {
            every: 2,
            gamma: 0.5,
        };
        assert_eq!(
            (0..5).map(|e| s.lr(1.0, e, 5)).collect::<Vec<_>>(),
            vec![1.0, 1.0, 0.5, 0.5, 0.25]
        );
        let c = Schedule::Cosine { min_lr: 0.1 };
        assert!((c.lr(1.0, 0, 5) - 1.0).abs() < 1e-6);
        assert!((c.lr(1.0, 4, 5) - 0.1).abs() < 1e-6);
        assert!((c.lr(1.0, 2, 5) - 0.55).abs() < 1e-6);
        assert_eq!(Schedule::Constant.lr(0.3, 9, 10), 0.3);
    }
}
