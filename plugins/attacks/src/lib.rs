//! The built-in attack catalogue, written against the plugin SDK only (the host loads it like
//! any third-party library), following the project's methods catalogue:
//!
//! - sign-gradient family: `fgsm`, `bim`, `pgd` (L∞ / L2, random start, restarts), `mifgsm`,
//!   `tifgsm`, `difgsm` (composable with MI and TI) — [`gradient`];
//! - minimal-perturbation: `cw-l2` ([`cw`]), `deepfool` (L2 / L∞, [`deepfool`]);
//! - `apgd-ce`, `apgd-dlr` ([`apgd`]);
//! - universal: `uap-fit`, `uap-apply` ([`uap`]);
//! - black box: `square` ([`square`]);
//! - baseline: `noise`, random ±ε of the same budget ([`noise`]).
//!
//! Every attack works on stored values, takes ε in stored units, HU (CT) or a fraction of the
//! window, untargeted (true label, else the model's own prediction) or targeted
//! (`FrameMeta.target`), and ends in [`common::finalize`]: the adversarial frame is rounded to
//! stored integers inside the budget, re-checked with the model, and repaired on the integer
//! lattice when rounding lost the success, so what the host writes is what was measured. Audit
//! values per frame: `success`, `linf`, `l2` (stored units, of the written perturbation),
//! `pred_before`, `pred_after`, `loss_before`, `eps_stored`, `rounding_repaired`, and
//! `iterations` or `queries`.
//!
//! A transfer attack is a pipeline, not a plugin: the SDK gives a plugin one model service, so
//! crafting on a surrogate and evaluating on the target is an attack stage run with model A
//! followed by an evaluation with model B.

pub mod apgd;
pub mod common;
pub mod cw;
pub mod deepfool;
pub mod gradient;
pub mod noise;
pub mod square;
pub mod uap;

use adverse_plugin_sdk::export_plugins;

pub use apgd::{ApgdCe, ApgdDlr};
pub use cw::CwL2;
pub use deepfool::DeepFool;
pub use gradient::{Bim, DiFgsm, Fgsm, MiFgsm, Pgd, TiFgsm};
pub use noise::Noise;
pub use square::Square;
pub use uap::{UapApply, UapFit};

export_plugins!(
    attack: Fgsm,
    attack: Bim,
    attack: Pgd,
    attack: MiFgsm,
    attack: TiFgsm,
    attack: DiFgsm,
    attack: CwL2,
    attack: DeepFool,
    attack: ApgdCe,
    attack: ApgdDlr,
    attack: UapFit,
    attack: UapApply,
    attack: Square,
    attack: Noise,
);

#[cfg(test)]
mod tests;
