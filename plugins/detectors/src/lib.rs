//! Built-in detector plugins, written against the plugin SDK only (the host loads them like any
//! third-party library). Detectors never change the frame: they write audit values.
//!
//! - `feature-squeezing` ([`squeeze`]): Xu et al. 2018; audits `score`, `flag`, `pred` and one
//!   `score_<squeezer>` per squeezer.
//! - `smoothing` ([`smoothing`]): Cohen et al. 2019 randomized smoothing, `predict` and
//!   `certify`; audits the class (−1 = abstain), `abstain`, the probability bound or p-value,
//!   the certified radius in model-input units, stored units and (CT) HU, and `correct` when a
//!   label is known.
//! - Feature-space detectors, fitted on clean frames (`mode: fit`, state file) before they
//!   detect ([`feature`] has what they share): `mahalanobis` ([`mahalanobis`], Lee 2018),
//!   `lid` ([`lid`], Ma 2018) and `kde-bu` ([`kde`], Feinman 2017). They audit `score` and
//!   `flag` (score above the threshold fitted at a target false-positive rate).
//!
//! [`stats`] holds the exact binomial bounds and ROC summaries they and their evaluation use.

pub mod feature;
pub mod kde;
pub mod lid;
pub mod mahalanobis;
pub mod smoothing;
pub mod squeeze;
pub mod stats;

use adverse_plugin_sdk::export_plugins;

pub use kde::KdeBu;
pub use lid::Lid;
pub use mahalanobis::Mahalanobis;
pub use smoothing::Smoothing;
pub use squeeze::FeatureSqueezing;

export_plugins!(
    detector: FeatureSqueezing,
    detector: Smoothing,
    detector: Mahalanobis,
    detector: Lid,
    detector: KdeBu
);

#[cfg(test)]
mod feature_tests;
#[cfg(test)]
mod tests;
