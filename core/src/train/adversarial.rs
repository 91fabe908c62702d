//! Adversarial training steps: Madry (train on PGD examples of the cross-entropy) and TRADES
//! (CE on clean inputs + beta * KL(clean || adversarial), examples maximising the KL). Both
//! craft their examples with the runtime's one PGD loop ([`crate::runtime::pgd`]).

use crate::runtime::autodiff;
use crate::runtime::backend::{Backend, LossTargets, Norm, Tensor};
use crate::runtime::exec::{ExecError, Model};
use crate::runtime::loss::LossSpec;
use crate::runtime::pgd::{self, PgdError, PgdParams};

use super::config::AdversarialCfg;
use super::metrics::softmax_rows;

fn params_for(cfg: &AdversarialCfg, seed: u64) -> PgdParams {
    PgdParams {
        eps: cfg.eps.0,
        steps: cfg.steps,
        step_size: cfg.step_size.0,
        norm: Norm::Linf,
        random_start: true,
        seed,
    }
}

/// PGD examples of the untargeted cross-entropy for a batch (Madry's inner maximisation).
pub fn craft_ce<B: Backend>(
    b: &B,
    model: &Model<B>,
    x: &Tensor<B>,
    labels: &[u32],
    p: &PgdParams,
    range: [f32; 2],
) -> Result<Tensor<B>, PgdError> {
    let n = labels.len();
    pgd::pgd_model(
        b,
        model,
        x,
        &LossTargets::Classes(labels),
        LossSpec::CrossEntropy { targeted: false },
        &vec![range[0]; n],
        &vec![range[1]; n],
        p,
    )
}

/// Madry: the batch's PGD examples (seeded per batch).
pub fn madry_batch<B: Backend>(
    b: &B,
    model: &Model<B>,
    x: &Tensor<B>,
    labels: &[u32],
    cfg: &AdversarialCfg,
    range: [f32; 2],
    seed: u64,
) -> Result<Tensor<B>, PgdError> {
    craft_ce(b, model, x, labels, &params_for(cfg, seed), range)
}

/// Logits of one forward pass, kept on the tape for a backward pass.
fn taped<B: Backend>(
    b: &B,
    model: &Model<B>,
    x: &Tensor<B>,
) -> Result<(crate::runtime::exec::Tape<B>, Vec<f32>, usize), ExecError> {
    let tape = model.run(b, &[x], true)?;
    let out = model.graph.outputs[model.logits_output];
    let z = b.download(tape.get(out));
    Ok((tape, z, out))
}

/// One TRADES step's objective: returns (per-sample loss, parameter gradients of the batch
/// *mean*, clean logits). Gradients flow through both the clean and the adversarial branch.
pub fn trades_grads<B: Backend>(
    b: &B,
    model: &Model<B>,
    x: &Tensor<B>,
    labels: &[u32],
    cfg: &AdversarialCfg,
    range: [f32; 2],
    seed: u64,
) -> Result<(Vec<f32>, Vec<Tensor<B>>, Vec<f32>), PgdError> {
    let n = labels.len();
    let all: Vec<usize> = (0..model.params().len()).collect();
    let (_, z, out) = taped(b, model, x)?;
    let k = z.len() / n;
    let p = softmax_rows(&z, k);
    // Inner maximisation of KL(p || softmax(f(x'))): d/dz' = q - p.
    let x_adv = pgd::pgd(
        b,
        x,
        &vec![range[0]; n],
        &vec![range[1]; n],
        &params_for(cfg, seed),
        |xa| {
            let (tape, za, out) = taped(b, model, xa)?;
            let q = softmax_rows(&za, k);
            let g: Vec<f32> = q.iter().zip(&p).map(|(q, p)| (q - p) as f32).collect();
            let seed = b.upload(&g, &[n, k]);
            let mut gr = autodiff::backward(b, &model.graph, &tape, &[(out, seed)], &[0], &[])?;
            Ok(gr.inputs.swap_remove(0))
        },
    )?;
    let (tape_c, _, _) = taped(b, model, x)?;
    let (tape_a, za, _) = taped(b, model, &x_adv)?;
    let q = softmax_rows(&za, k);
    let inv_n = 1.0 / n as f64;
    let beta = cfg.beta as f64;
    let mut gc = vec![0f32; n * k];
    let mut ga = vec![0f32; n * k];
    let mut losses = vec![0f32; n];
    for s in 0..n {
        let (ps, qs) = (&p[s * k..(s + 1) * k], &q[s * k..(s + 1) * k]);
        let t = labels[s] as usize;
        let kl: f64 = ps
            .iter()
            .zip(qs)
            .map(|(&a, &c)| {
                if a > 0.0 {
                    a * (a.max(1e-300).ln() - c.max(1e-300).ln())
                } else {
                    0.0
                }
            })
            .sum();
        losses[s] = (-(ps[t].max(1e-300)).ln() + beta * kl) as f32;
        for j in 0..k {
            let onehot = if j == t { 1.0 } else { 0.0 };
            let dkl_dz = ps[j] * ((ps[j].max(1e-300).ln() - qs[j].max(1e-300).ln()) - kl);
            gc[s * k + j] = (((ps[j] - onehot) + beta * dkl_dz) * inv_n) as f32;
            ga[s * k + j] = (beta * (qs[j] - ps[j]) * inv_n) as f32;
        }
    }
    let g1 = autodiff::backward(
        b,
        &model.graph,
        &tape_c,
        &[(out, b.upload(&gc, &[n, k]))],
        &[],
        &all,
    )?;
    let g2 = autodiff::backward(
        b,
        &model.graph,
        &tape_a,
        &[(out, b.upload(&ga, &[n, k]))],
        &[],
        &all,
    )?;
    let grads = g1
        .params
        .iter()
        .zip(&g2.params)
        .map(|(a, c)| b.binary(crate::runtime::backend::Binary::Add, a, c))
        .collect();
    Ok((losses, grads, z))
}
