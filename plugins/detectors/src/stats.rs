//! The statistics the detectors and their evaluation need: exact binomial bounds and tests for
//! randomized smoothing (Cohen et al. 2019), and ROC summaries for detectors (the methods
//! catalogue asks for ROC AUC and the TPR at a fixed false-positive rate on clean data).

use statrs::distribution::{Beta, Binomial, ContinuousCDF, DiscreteCDF, Normal};

/// One-sided lower Clopper-Pearson bound at confidence `1 - alpha` on a binomial proportion
/// from `k` successes in `n` trials: the `alpha` quantile of Beta(k, n - k + 1), which is what
/// Cohen et al.'s `proportion_confint(k, n, alpha=2*alpha, method="beta")[0]` computes.
/// `None` when the arguments are out of range (`k > n`, `n == 0`, `alpha` outside (0, 1)).
pub fn clopper_pearson_lower(k: u64, n: u64, alpha: f64) -> Option<f64> {
    if n == 0 || k > n || !(alpha > 0.0 && alpha < 1.0) {
        return None;
    }
    if k == 0 {
        return Some(0.0);
    }
    let beta = Beta::new(k as f64, (n - k + 1) as f64).ok()?;
    Some(beta.inverse_cdf(alpha))
}

/// The standard normal quantile Φ⁻¹(p); `None` outside (0, 1).
pub fn normal_quantile(p: f64) -> Option<f64> {
    if !(p > 0.0 && p < 1.0) {
        return None;
    }
    Some(Normal::standard().inverse_cdf(p))
}

/// Cohen et al.'s certified L2 radius `sigma * Φ⁻¹(p_lower)`; `None` (abstain) when the
/// bound does not exceed 1/2, where no radius is certified.
pub fn certified_radius(sigma: f64, p_lower: f64) -> Option<f64> {
    if p_lower <= 0.5 {
        return None;
    }
    // p_lower can be 1 only for alpha -> 0; cap it so the radius stays finite.
    let p = p_lower.min(1.0 - 1e-15);
    normal_quantile(p).map(|z| sigma * z)
}

/// Two-sided exact binomial test of `k` successes in `m` trials against p = 1/2 (Cohen et al.'s
/// PREDICT: the top class count against the runner-up's). 1 when `m == 0`.
pub fn binomial_test_half(k: u64, m: u64) -> f64 {
    if m == 0 {
        return 1.0;
    }
    let Ok(b) = Binomial::new(0.5, m) else {
        return 1.0;
    };
    // The distribution is symmetric: the two-sided p-value doubles the tail beyond k.
    let hi = k.max(m - k.min(m));
    let tail = if hi == 0 { 1.0 } else { b.sf(hi - 1) };
    (2.0 * tail).min(1.0)
}

/// ROC AUC of scores where higher means "adversarial": the probability that a positive outscores
/// a negative, ties counting one half (Mann-Whitney U / (n_pos n_neg)). `None` when a class is
/// empty or a score is NaN.
pub fn roc_auc(negatives: &[f64], positives: &[f64]) -> Option<f64> {
    if negatives.is_empty()
        || positives.is_empty()
        || negatives.iter().chain(positives).any(|v| v.is_nan())
    {
        return None;
    }
    let mut all: Vec<(f64, bool)> = negatives
        .iter()
        .map(|&v| (v, false))
        .chain(positives.iter().map(|&v| (v, true)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of positive ranks with ties given their average rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += avg * all[i..=j].iter().filter(|p| p.1).count() as f64;
        i = j + 1;
    }
    let (np, nn) = (positives.len() as f64, negatives.len() as f64);
    Some((rank_sum - np * (np + 1.0) / 2.0) / (np * nn))
}

/// The threshold `t` for the rule "flag when score > t" whose false-positive rate on the clean
/// scores `negatives` is at most `fpr` (and is the largest such rate the data allow). `None`
/// for no data or `fpr` outside [0, 1].
pub fn threshold_at_fpr(negatives: &[f64], fpr: f64) -> Option<f64> {
    if negatives.is_empty() || !(0.0..=1.0).contains(&fpr) || negatives.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut s = negatives.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let k = ((fpr * s.len() as f64).floor() as usize).min(s.len() - 1);
    Some(s[k])
}

/// Fraction of `scores` strictly above `t`.
pub fn rate_above(scores: &[f64], t: f64) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    scores.iter().filter(|&&v| v > t).count() as f64 / scores.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clopper_pearson_all_successes_has_a_closed_form() {
        // Beta(n, 1) has CDF p^n, so its alpha quantile is alpha^(1/n).
        for (n, alpha) in [(1000u64, 0.001), (100, 0.05), (7, 0.2)] {
            let got = clopper_pearson_lower(n, n, alpha).unwrap();
            let want = alpha.powf(1.0 / n as f64);
            assert!((got - want).abs() < 1e-12, "n {n}: {got} vs {want}");
        }
        assert_eq!(clopper_pearson_lower(0, 10, 0.01), Some(0.0));
        assert_eq!(clopper_pearson_lower(11, 10, 0.01), None);
        assert_eq!(clopper_pearson_lower(5, 10, 0.0), None);
    }

    #[test]
    fn radius_is_sigma_times_the_normal_quantile_and_abstains_at_one_half() {
        // Φ(1) = 0.841344746...
        let r = certified_radius(0.25, 0.841_344_746_068_542_9).unwrap();
        assert!((r - 0.25).abs() < 1e-9, "{r}");
        let r2 = certified_radius(0.5, 0.977_249_868_051_820_8).unwrap();
        assert!((r2 - 1.0).abs() < 1e-9, "{r2}");
        assert_eq!(certified_radius(0.25, 0.5), None);
        assert_eq!(certified_radius(0.25, 0.3), None);
        assert!(certified_radius(0.25, 0.500_001).unwrap() > 0.0);
    }

    #[test]
    fn binomial_test_matches_hand_computed_tails() {
        // 10 of 10: 2 * 2^-10.
        assert!((binomial_test_half(10, 10) - 2.0 / 1024.0).abs() < 1e-15);
        // 8 of 10: 2 * (45 + 10 + 1) / 1024.
        assert!((binomial_test_half(8, 10) - 2.0 * 56.0 / 1024.0).abs() < 1e-12);
        assert_eq!(binomial_test_half(5, 10), 1.0);
        assert_eq!(binomial_test_half(0, 0), 1.0);
    }

    #[test]
    fn auc_counts_ties_as_half_and_orders_by_score() {
        assert_eq!(roc_auc(&[0.0, 0.1], &[0.5, 0.6]), Some(1.0));
        assert_eq!(roc_auc(&[0.5, 0.6], &[0.0, 0.1]), Some(0.0));
        assert_eq!(roc_auc(&[0.3], &[0.3]), Some(0.5));
        // pos {0.2, 0.4} vs neg {0.1, 0.3}: pairs won 1 + 2 = 3 of 4.
        assert_eq!(roc_auc(&[0.1, 0.3], &[0.2, 0.4]), Some(0.75));
        assert_eq!(roc_auc(&[], &[1.0]), None);
    }

    #[test]
    fn threshold_keeps_the_false_positive_rate() {
        let neg: Vec<f64> = (0..100).map(|i| i as f64).collect();
        let t = threshold_at_fpr(&neg, 0.05).unwrap();
        assert_eq!(t, 94.0);
        assert!((rate_above(&neg, t) - 0.05).abs() < 1e-12);
        assert_eq!(rate_above(&neg, threshold_at_fpr(&neg, 0.0).unwrap()), 0.0);
    }
}
