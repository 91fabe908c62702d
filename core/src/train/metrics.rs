//! Classification metrics on host logits: accuracy, mean cross-entropy, ROC AUC.

/// Row-wise softmax of `[n, k]` logits, in f64.
pub fn softmax_rows(logits: &[f32], k: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(k) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = row.iter().map(|&z| (z as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| v / s));
    }
    out
}

/// Index of the first maximal logit of each row.
pub fn argmax_rows(logits: &[f32], k: usize) -> Vec<u32> {
    logits
        .chunks(k)
        .map(|r| {
            let mut bi = 0;
            for (i, &v) in r.iter().enumerate() {
                if v > r[bi] {
                    bi = i;
                }
            }
            bi as u32
        })
        .collect()
}

pub fn accuracy(logits: &[f32], k: usize, labels: &[u32]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let hits = argmax_rows(logits, k)
        .iter()
        .zip(labels)
        .filter(|(a, b)| a == b)
        .count();
    hits as f64 / labels.len() as f64
}

/// Area under the ROC curve of `scores` for `positive` (Mann-Whitney U, ties counted half).
/// None when one class is absent.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let np = positive.iter().filter(|&&p| p).count();
    let nn = positive.len() - np;
    if np == 0 || nn == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &t in &idx[i..=j] {
            if positive[t] {
                rank_sum_pos += avg;
            }
        }
        i = j + 1;
    }
    let u = rank_sum_pos - (np * (np + 1)) as f64 / 2.0;
    Some(u / (np as f64 * nn as f64))
}

/// Binary: AUC of P(class 1). Multi-class: the mean one-vs-rest AUC over classes present.
pub fn auc(logits: &[f32], k: usize, labels: &[u32]) -> Option<f64> {
    let p = softmax_rows(logits, k);
    let classes: Vec<usize> = if k == 2 { vec![1] } else { (0..k).collect() };
    let aucs: Vec<f64> = classes
        .iter()
        .filter_map(|&c| {
            let s: Vec<f64> = p.chunks(k).map(|r| r[c]).collect();
            let pos: Vec<bool> = labels.iter().map(|&l| l as usize == c).collect();
            roc_auc(&s, &pos)
        })
        .collect();
    (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_matches_pairwise_definition() {
        let s = [0.1, 0.4, 0.35, 0.8, 0.4];
        let p = [false, false, true, true, true];
        // Pairs (pos, neg): (0.35 vs 0.1 win, vs 0.4 loss), (0.8 wins both), (0.4 vs 0.1 win, vs 0.4 tie)
        assert!((roc_auc(&s, &p).unwrap() - 4.5 / 6.0).abs() < 1e-12);
        assert_eq!(roc_auc(&s, &[true; 5]), None);
        let logits = [2.0f32, 0.0, 0.0, 1.0, 0.5, 0.4];
        assert_eq!(argmax_rows(&logits, 2), vec![0, 1, 0]);
        assert!((accuracy(&logits, 2, &[0, 1, 1]) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(auc(&logits, 2, &[0, 1, 1]), Some(1.0));
    }
}
