//! From per-frame outcomes to the numbers of an evaluation: accuracy, success, distances, the
//! per-image worst case, and the sanity checks of Carlini et al. 2019 ("On Evaluating
//! Adversarial Robustness", arXiv 1902.06705, section 5 and appendix): a robustness number is
//! only believable when the attacks behave as attacks must on an honest model.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::spec::{Role, SanitySpec};

/// One frame of one run, as written and re-read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameOutcome {
    pub input: String,
    pub frame: u32,
    pub label: Option<u32>,
    /// Prediction on the file as written (after every stage), re-read from disk.
    pub pred: Option<u32>,
    /// Distances of the attack stage's perturbation (stored units), when it ran.
    pub linf: Option<f64>,
    pub l2: Option<f64>,
    /// Every stage's audited values (`{stage: {key: value}}`), for detectors and certification.
    #[serde(skip)]
    pub stages: serde_json::Value,
}

/// One run: one defense, one attack (or the clean run), one budget.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub defense: String,
    /// `clean` for the defense's run without attack.
    pub attack: String,
    pub plugin: String,
    pub role: Option<Role>,
    pub eps: Option<f64>,
    pub frames: Vec<FrameOutcome>,
    pub failed: usize,
    pub seconds: f64,
    /// Folder of the run's outputs, relative to the evaluation's output folder.
    pub dir: String,
}

/// What a cell measured. Success counts images the defended model got right before the attack
/// and wrong after it (untargeted), so a model's clean mistakes are not credited to attacks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CellStats {
    pub defense: String,
    pub attack: String,
    pub role: Option<Role>,
    pub eps: Option<f64>,
    pub images: usize,
    pub accuracy: Option<f64>,
    pub clean_correct: usize,
    pub fooled: usize,
    pub success_rate: Option<f64>,
    /// Mean distances over the fooled images.
    pub mean_linf: Option<f64>,
    pub mean_l2: Option<f64>,
    pub seconds: f64,
    pub failed: usize,
}

type Key = (String, u32);

fn key(f: &FrameOutcome) -> Key {
    (f.input.clone(), f.frame)
}

/// Frames with a label and a prediction: the ones accuracy is defined on.
fn scored(frames: &[FrameOutcome]) -> impl Iterator<Item = &FrameOutcome> {
    frames
        .iter()
        .filter(|f| f.label.is_some() && f.pred.is_some())
}

fn correct(f: &FrameOutcome) -> bool {
    f.label.is_some() && f.label == f.pred
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Per-cell numbers; `clean` is the same defense's run without attack.
pub fn stats(cell: &Cell, clean: Option<&Cell>) -> CellStats {
    let clean_ok: Option<BTreeSet<Key>> =
        clean.map(|c| scored(&c.frames).filter(|f| correct(f)).map(key).collect());
    let frames: Vec<&FrameOutcome> = scored(&cell.frames).collect();
    let n = frames.len();
    let acc = (n > 0).then(|| frames.iter().filter(|f| correct(f)).count() as f64 / n as f64);
    let (mut clean_correct, mut fooled, mut linf, mut l2) = (0, 0, Vec::new(), Vec::new());
    if let Some(ok) = &clean_ok {
        for f in &frames {
            if ok.contains(&key(f)) {
                clean_correct += 1;
                if !correct(f) {
                    fooled += 1;
                    linf.extend(f.linf);
                    l2.extend(f.l2);
                }
            }
        }
    }
    CellStats {
        defense: cell.defense.clone(),
        attack: cell.attack.clone(),
        role: cell.role,
        eps: cell.eps,
        images: n,
        accuracy: acc,
        clean_correct,
        fooled,
        success_rate: (clean_ok.is_some() && clean_correct > 0)
            .then(|| fooled as f64 / clean_correct as f64),
        mean_linf: mean(&linf),
        mean_l2: mean(&l2),
        seconds: cell.seconds,
        failed: cell.failed,
    }
}

/// Accuracy when every attack run at budget `eps` on a defense counts: an image is robust only
/// if no attack fooled it (the per-image worst case of AutoAttack-style reporting).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorstCase {
    pub defense: String,
    pub eps: f64,
    pub attacks: Vec<String>,
    pub images: usize,
    pub accuracy: Option<f64>,
}

pub fn worst_case(cells: &[Cell]) -> Vec<WorstCase> {
    let mut groups: BTreeMap<(String, u64), Vec<&Cell>> = BTreeMap::new();
    for c in cells {
        if let (Some(e), Some(r)) = (c.eps, c.role)
            && !matches!(r, Role::Minimal | Role::IterativeL2)
        {
            groups
                .entry((c.defense.clone(), e.to_bits()))
                .or_default()
                .push(c);
        }
    }
    let mut out = Vec::new();
    for ((defense, bits), group) in groups {
        // Only images every attack of the group scored, so one failed file does not count as
        // robust.
        let mut robust: Option<BTreeMap<Key, bool>> = None;
        for c in &group {
            let here: BTreeMap<Key, bool> =
                scored(&c.frames).map(|f| (key(f), correct(f))).collect();
            robust = Some(match robust {
                None => here,
                Some(prev) => prev
                    .into_iter()
                    .filter_map(|(k, v)| here.get(&k).map(|w| (k, v && *w)))
                    .collect(),
            });
        }
        let robust = robust.unwrap_or_default();
        let n = robust.len();
        out.push(WorstCase {
            defense,
            eps: f64::from_bits(bits),
            attacks: group.iter().map(|c| c.attack.clone()).collect(),
            images: n,
            accuracy: (n > 0).then(|| robust.values().filter(|v| **v).count() as f64 / n as f64),
        });
    }
    out.sort_by(|a, b| a.defense.cmp(&b.defense).then(a.eps.total_cmp(&b.eps)));
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    Fail,
    /// The evaluation lacks what the check compares (say which in `detail`).
    NotApplicable,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub defense: String,
    pub verdict: Verdict,
    pub detail: String,
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

/// A minimum-norm attack (C&W, DeepFool) against an iterative attack with an L2 budget, at
/// equal success: the budgeted attack's smallest ε of the grid whose success reaches the minimal
/// one's. A minimum-norm attack that needs a larger mean L2 than a fixed budget for the same
/// success is under-optimised (too few steps, a bad constant search), so its distances would
/// overstate robustness.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NormComparison {
    pub defense: String,
    pub minimal: String,
    pub minimal_success: Option<f64>,
    pub minimal_mean_l2: Option<f64>,
    pub budgeted: String,
    /// `None` when no budget of the grid reaches the minimal attack's success.
    pub eps: Option<f64>,
    pub budgeted_success: Option<f64>,
    pub budgeted_mean_l2: Option<f64>,
    /// The budgeted attack's largest ε, for the message when no budget is enough.
    pub largest_eps: f64,
}

/// Every (minimal, L2-budgeted) pair of attacks run on the same defense; success is compared
/// with `tolerance_images` of slack, like the sanity checks.
pub fn norm_comparisons(stats: &[CellStats], sp: &SanitySpec) -> Vec<NormComparison> {
    let mut out = Vec::new();
    for m in stats.iter().filter(|s| s.role == Some(Role::Minimal)) {
        let mut budgeted: BTreeMap<&str, Vec<&CellStats>> = BTreeMap::new();
        for b in stats
            .iter()
            .filter(|b| b.defense == m.defense && b.role == Some(Role::IterativeL2))
        {
            budgeted.entry(b.attack.as_str()).or_default().push(b);
        }
        for (name, mut cells) in budgeted {
            cells.sort_by(|x, y| x.eps.unwrap_or(0.0).total_cmp(&y.eps.unwrap_or(0.0)));
            let n = m.clean_correct.max(1);
            let tol = sp.tolerance_images as f64 / n as f64;
            let target = m.success_rate.unwrap_or(0.0) - tol;
            let hit = cells
                .iter()
                .find(|c| c.success_rate.is_some_and(|r| r + 1e-9 >= target));
            out.push(NormComparison {
                defense: m.defense.clone(),
                minimal: m.attack.clone(),
                minimal_success: m.success_rate,
                minimal_mean_l2: m.mean_l2,
                budgeted: name.to_string(),
                eps: hit.and_then(|c| c.eps),
                budgeted_success: hit.and_then(|c| c.success_rate),
                budgeted_mean_l2: hit.and_then(|c| c.mean_l2),
                largest_eps: cells.last().and_then(|c| c.eps).unwrap_or(0.0),
            });
        }
    }
    out
}

/// The six checks, per defense. `large` holds the iterative attack's run at the large budget
/// (undefended model only: a defense may legitimately hold there).
pub fn sanity(stats: &[CellStats], large: &[CellStats], sp: &SanitySpec) -> Vec<Check> {
    let mut out = Vec::new();
    let defenses: BTreeSet<&str> = stats.iter().map(|s| s.defense.as_str()).collect();
    for d in defenses {
        let of = |role: Role| -> Vec<&CellStats> {
            stats
                .iter()
                .filter(|s| s.defense == d && s.role == Some(role) && s.eps.is_some())
                .collect()
        };
        let by_eps = |cells: &[&CellStats]| -> BTreeMap<u64, Option<f64>> {
            // Strongest attack of the role at each budget.
            let mut m: BTreeMap<u64, Option<f64>> = BTreeMap::new();
            for c in cells {
                let e = m.entry(c.eps.unwrap_or(0.0).to_bits()).or_insert(None);
                *e = match (*e, c.success_rate) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            m
        };
        let tol_of = |c: &[&CellStats]| {
            let n = c.iter().map(|s| s.clean_correct).max().unwrap_or(0).max(1);
            sp.tolerance_images as f64 / n as f64
        };
        let iterative = of(Role::Iterative);
        let iter_best = by_eps(&iterative);
        let mut push = |check: &'static str, verdict: Verdict, detail: String| {
            out.push(Check {
                check,
                defense: d.to_string(),
                verdict,
                detail,
            })
        };
        let compare = |others: &[&CellStats],
                       pass: &dyn Fn(f64, f64) -> bool,
                       what: &str|
         -> (Verdict, String) {
            let theirs = by_eps(others);
            let mut bad = Vec::new();
            let mut seen = 0;
            for (bits, their) in &theirs {
                let (Some(t), Some(Some(w))) = (their, iter_best.get(bits)) else {
                    continue;
                };
                seen += 1;
                if !pass(*t, *w) {
                    bad.push(format!(
                        "eps {}: {what} {} vs iterative {}",
                        f64::from_bits(*bits),
                        pct(Some(*t)),
                        pct(Some(*w))
                    ));
                }
            }
            if seen == 0 {
                (
                    Verdict::NotApplicable,
                    format!("needs a {what} attack and an iterative one at a common budget"),
                )
            } else if bad.is_empty() {
                (Verdict::Pass, format!("{seen} budgets compared"))
            } else {
                (Verdict::Fail, bad.join("; "))
            }
        };
        let single = of(Role::SingleStep);
        let tol = tol_of(&iterative);
        let (v, detail) = compare(&single, &|s, w| w + tol >= s, "single-step");
        push("iterative beats single-step", v, detail);

        // Success non-decreasing in ε, per attack.
        let mut by_attack: BTreeMap<&str, Vec<&CellStats>> = BTreeMap::new();
        for s in stats.iter().filter(|s| s.defense == d && s.eps.is_some()) {
            by_attack.entry(s.attack.as_str()).or_default().push(s);
        }
        let mut bad = Vec::new();
        let mut curves = 0;
        for (a, mut cells) in by_attack {
            cells.sort_by(|x, y| x.eps.unwrap_or(0.0).total_cmp(&y.eps.unwrap_or(0.0)));
            if cells.len() < 2 {
                continue;
            }
            curves += 1;
            let tol = tol_of(&cells);
            for w in cells.windows(2) {
                if let (Some(p), Some(q)) = (w[0].success_rate, w[1].success_rate)
                    && q + tol < p
                {
                    bad.push(format!(
                        "{a}: {} at eps {} but {} at eps {}",
                        pct(Some(p)),
                        w[0].eps.unwrap_or(0.0),
                        pct(Some(q)),
                        w[1].eps.unwrap_or(0.0)
                    ));
                }
            }
        }
        let (v, detail) = if curves == 0 {
            (
                Verdict::NotApplicable,
                "needs an attack run at two budgets or more".to_string(),
            )
        } else if bad.is_empty() {
            (
                Verdict::Pass,
                format!("{curves} attacks, every curve non-decreasing"),
            )
        } else {
            (Verdict::Fail, bad.join("; "))
        };
        push("success non-decreasing in eps", v, detail);

        if d == "none" {
            let l: Vec<&CellStats> = large.iter().filter(|s| s.defense == d).collect();
            let (v, detail) = match l
                .iter()
                .filter_map(|s| s.success_rate.map(|r| (s, r)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
            {
                None => (
                    Verdict::NotApplicable,
                    "needs an iterative attack (run at the large budget)".to_string(),
                ),
                Some((s, r)) => (
                    if r >= sp.large_eps_success {
                        Verdict::Pass
                    } else {
                        Verdict::Fail
                    },
                    format!(
                        "{} at eps {}: success {} ({} of {} correctly classified images; needs {})",
                        s.attack,
                        s.eps.unwrap_or(0.0),
                        pct(Some(r)),
                        s.fooled,
                        s.clean_correct,
                        pct(Some(sp.large_eps_success))
                    ),
                ),
            };
            push("unbounded attack reaches 100%", v, detail);
        }

        let black = of(Role::BlackBox);
        let tol = tol_of(&iterative);
        let (v, detail) = compare(&black, &|b, w| b <= w + tol, "black-box");
        push("black-box below white-box", v, detail);

        let noise = of(Role::Noise);
        let frac = sp.noise_fraction;
        let (v, detail) = compare(&noise, &|n, w| n <= (w * frac).max(tol), "random noise");
        push("random noise far below white-box", v, detail);

        let pairs: Vec<NormComparison> = norm_comparisons(stats, sp)
            .into_iter()
            .filter(|c| c.defense == d)
            .collect();
        let mut bad = Vec::new();
        let mut compared = Vec::new();
        let mut unreached = Vec::new();
        for c in &pairs {
            match (c.eps, c.minimal_mean_l2, c.budgeted_mean_l2) {
                (Some(e), Some(m), Some(b)) => {
                    let line = format!(
                        "{} mean L2 {m:.1} vs {} {b:.1} at eps {e} (success {} vs {})",
                        c.minimal,
                        c.budgeted,
                        pct(c.minimal_success),
                        pct(c.budgeted_success)
                    );
                    if m < b {
                        compared.push(line);
                    } else {
                        bad.push(line);
                    }
                }
                _ => unreached.push(format!(
                    "{} never reaches {}'s success {} up to eps {}",
                    c.budgeted,
                    c.minimal,
                    pct(c.minimal_success),
                    c.largest_eps
                )),
            }
        }
        let (v, detail) = if !bad.is_empty() {
            (Verdict::Fail, bad.join("; "))
        } else if !compared.is_empty() {
            (Verdict::Pass, compared.join("; "))
        } else if !unreached.is_empty() {
            (Verdict::NotApplicable, unreached.join("; "))
        } else {
            (
                Verdict::NotApplicable,
                "needs a minimum-norm attack and an iterative one with `norm: l2` and an eps grid"
                    .to_string(),
            )
        };
        push("minimal-norm beats budgeted L2 at equal success", v, detail);
    }
    out
}

/// A detector's ROC over scores (higher = more suspicious): points (FPR, TPR) from the
/// strictest threshold to the loosest, the area under it (the Mann-Whitney statistic, ties
/// counted half) and the TPR at the loosest threshold whose FPR stays at or below `fpr`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Roc {
    pub points: Vec<(f64, f64)>,
    pub auc: Option<f64>,
    pub tpr_at_fpr: Option<f64>,
}

pub fn roc(negatives: &[f64], positives: &[f64], fpr: f64) -> Roc {
    let (n, p) = (negatives.len(), positives.len());
    if n == 0 || p == 0 {
        return Roc {
            points: Vec::new(),
            auc: None,
            tpr_at_fpr: None,
        };
    }
    let mut all: Vec<(f64, bool)> = negatives
        .iter()
        .map(|v| (*v, false))
        .chain(positives.iter().map(|v| (*v, true)))
        .filter(|(v, _)| !v.is_nan())
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut best: f64 = 0.0;
    let mut i = 0;
    while i < all.len() {
        // One threshold per distinct score: ties move together.
        let v = all[i].0;
        while i < all.len() && all[i].0 == v {
            if all[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        let (x, y) = (fp as f64 / n as f64, tp as f64 / p as f64);
        points.push((x, y));
        if x <= fpr + 1e-12 {
            best = best.max(y);
        }
    }
    let mut wins = 0.0;
    for &pv in positives {
        for &nv in negatives {
            wins += if pv > nv {
                1.0
            } else if pv == nv {
                0.5
            } else {
                0.0
            };
        }
    }
    Roc {
        points,
        auc: Some(wins / (n * p) as f64),
        tpr_at_fpr: Some(best),
    }
}

/// Certified accuracy at radius `r`: the fraction of labelled images whose smoothed class is the
/// label with a certified radius of at least `r` (abstentions count as wrong).
pub fn certified_accuracy(
    frames: &[(Option<u32>, Option<u32>, Option<f64>)],
    r: f64,
) -> Option<f64> {
    let labelled: Vec<_> = frames.iter().filter(|f| f.0.is_some()).collect();
    if labelled.is_empty() {
        return None;
    }
    let ok = labelled
        .iter()
        .filter(|(label, class, radius)| {
            class.is_some() && class == label && radius.is_some_and(|x| x >= r)
        })
        .count();
    Some(ok as f64 / labelled.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(input: &str, label: u32, pred: u32) -> FrameOutcome {
        FrameOutcome {
            input: input.into(),
            frame: 0,
            label: Some(label),
            pred: Some(pred),
            linf: Some(4.0),
            l2: Some(10.0 * f64::from(pred)),
            stages: serde_json::Value::Null,
        }
    }

    fn cell(attack: &str, role: Option<Role>, eps: Option<f64>, preds: &[u32]) -> Cell {
        Cell {
            defense: "none".into(),
            attack: attack.into(),
            plugin: attack.into(),
            role,
            eps,
            frames: preds
                .iter()
                .enumerate()
                .map(|(i, p)| f(&format!("{i}.dcm"), 1, *p))
                .collect(),
            failed: 0,
            seconds: 1.0,
            dir: String::new(),
        }
    }

    #[test]
    fn success_counts_only_images_the_model_got_right() {
        // 4 images, label 1; clean gets 3 right (image 3 wrong); the attack flips images 0, 1
        // and leaves 3 wrong: success 2/3, accuracy 1/4.
        let clean = cell("clean", None, None, &[1, 1, 1, 0]);
        let atk = cell("pgd", Some(Role::Iterative), Some(4.0), &[0, 0, 1, 0]);
        let s = stats(&atk, Some(&clean));
        assert_eq!(s.images, 4);
        assert_eq!(s.accuracy, Some(0.25));
        assert_eq!((s.clean_correct, s.fooled), (3, 2));
        assert!((s.success_rate.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.mean_l2, Some(0.0));
        // Without a clean run there is no success rate, only accuracy.
        assert_eq!(stats(&atk, None).success_rate, None);
    }

    #[test]
    fn worst_case_is_per_image_over_attacks_at_one_budget() {
        // FGSM fools 0, PGD fools 1: each alone leaves 2 of 3 right, together only 1.
        let a = cell("fgsm", Some(Role::SingleStep), Some(4.0), &[0, 1, 1]);
        let b = cell("pgd", Some(Role::Iterative), Some(4.0), &[1, 0, 1]);
        let c = cell("pgd", Some(Role::Iterative), Some(8.0), &[0, 0, 0]);
        let m = cell("cw-l2", Some(Role::Minimal), None, &[0, 0, 0]);
        // An L2 budget of 4 is not an L∞ budget of 4: not part of the worst case.
        let l2 = cell("pgd-l2", Some(Role::IterativeL2), Some(4.0), &[0, 0, 0]);
        let w = worst_case(&[a, b, c, m, l2]);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].eps, 4.0);
        assert!((w[0].accuracy.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(w[0].attacks, ["fgsm", "pgd"]);
        assert_eq!(w[1].accuracy, Some(0.0));
    }

    fn verdicts(cells: &[Cell], large: &[Cell]) -> BTreeMap<&'static str, Verdict> {
        let clean = cell("clean", None, None, &[1; 10]);
        let s: Vec<CellStats> = cells.iter().map(|c| stats(c, Some(&clean))).collect();
        let l: Vec<CellStats> = large.iter().map(|c| stats(c, Some(&clean))).collect();
        sanity(&s, &l, &SanitySpec::default())
            .into_iter()
            .map(|c| (c.check, c.verdict))
            .collect()
    }

    fn with_l2(mut c: Cell, l2: f64) -> Cell {
        for f in &mut c.frames {
            f.l2 = Some(l2);
        }
        c
    }

    /// Predictions of 10 images (label 1) where the first `k` are fooled.
    fn fooled(k: usize) -> Vec<u32> {
        (0..10).map(|i| u32::from(i >= k)).collect()
    }

    #[test]
    fn an_honest_evaluation_passes_every_check() {
        let cells = [
            cell("fgsm", Some(Role::SingleStep), Some(2.0), &fooled(2)),
            cell("fgsm", Some(Role::SingleStep), Some(4.0), &fooled(4)),
            cell("pgd", Some(Role::Iterative), Some(2.0), &fooled(4)),
            cell("pgd", Some(Role::Iterative), Some(4.0), &fooled(8)),
            cell("square", Some(Role::BlackBox), Some(4.0), &fooled(6)),
            cell("noise", Some(Role::Noise), Some(4.0), &fooled(1)),
            with_l2(cell("cw-l2", Some(Role::Minimal), None, &fooled(10)), 30.0),
            with_l2(
                cell("pgd-l2", Some(Role::IterativeL2), Some(20.0), &fooled(6)),
                20.0,
            ),
            with_l2(
                cell("pgd-l2", Some(Role::IterativeL2), Some(50.0), &fooled(10)),
                50.0,
            ),
        ];
        let large = [cell("pgd", Some(Role::Iterative), Some(64.0), &fooled(10))];
        let v = verdicts(&cells, &large);
        assert_eq!(v.len(), 6);
        assert!(v.values().all(|v| *v == Verdict::Pass), "{v:?}");
    }

    #[test]
    fn each_symptom_of_gradient_masking_is_flagged() {
        // FGSM beats PGD by 3 images; success falls with eps; PGD stalls at 50% at large eps;
        // Square beats PGD; noise does as well as PGD.
        let cells = [
            cell("fgsm", Some(Role::SingleStep), Some(4.0), &fooled(7)),
            cell("pgd", Some(Role::Iterative), Some(2.0), &fooled(6)),
            cell("pgd", Some(Role::Iterative), Some(4.0), &fooled(4)),
            cell("square", Some(Role::BlackBox), Some(4.0), &fooled(8)),
            cell("noise", Some(Role::Noise), Some(4.0), &fooled(4)),
            // C&W needs more L2 than PGD-L2 spends for the same success: under-optimised.
            with_l2(cell("cw-l2", Some(Role::Minimal), None, &fooled(10)), 60.0),
            with_l2(
                cell("pgd-l2", Some(Role::IterativeL2), Some(50.0), &fooled(10)),
                50.0,
            ),
        ];
        let large = [cell("pgd", Some(Role::Iterative), Some(64.0), &fooled(5))];
        let v = verdicts(&cells, &large);
        assert_eq!(v.len(), 6);
        assert!(v.values().all(|v| *v == Verdict::Fail), "{v:?}");
        // One image the wrong way is within the default tolerance.
        let cells = [
            cell("fgsm", Some(Role::SingleStep), Some(4.0), &fooled(5)),
            cell("pgd", Some(Role::Iterative), Some(4.0), &fooled(4)),
        ];
        let v = verdicts(&cells, &[]);
        assert_eq!(v["iterative beats single-step"], Verdict::Pass);
        assert_eq!(v["unbounded attack reaches 100%"], Verdict::NotApplicable);
        assert_eq!(v["black-box below white-box"], Verdict::NotApplicable);
        assert_eq!(
            v["minimal-norm beats budgeted L2 at equal success"],
            Verdict::NotApplicable
        );
    }

    #[test]
    fn minimal_and_budgeted_l2_are_compared_at_the_first_budget_reaching_equal_success() {
        let clean = cell("clean", None, None, &[1; 10]);
        let cells = [
            with_l2(cell("cw-l2", Some(Role::Minimal), None, &fooled(8)), 30.0),
            with_l2(
                cell("pgd-l2", Some(Role::IterativeL2), Some(25.0), &fooled(5)),
                25.0,
            ),
            // 7 of 8: within one image of the minimal attack's success.
            with_l2(
                cell("pgd-l2", Some(Role::IterativeL2), Some(40.0), &fooled(7)),
                40.0,
            ),
            with_l2(
                cell("pgd-l2", Some(Role::IterativeL2), Some(80.0), &fooled(10)),
                80.0,
            ),
        ];
        let s: Vec<CellStats> = cells.iter().map(|c| stats(c, Some(&clean))).collect();
        let c = norm_comparisons(&s, &SanitySpec::default());
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].eps, c[0].budgeted_mean_l2), (Some(40.0), Some(40.0)));
        assert_eq!(c[0].minimal_mean_l2, Some(30.0));
        // Never reached within the grid: no comparison can be made.
        let c = norm_comparisons(&s[..2], &SanitySpec::default());
        assert_eq!((c[0].eps, c[0].largest_eps), (None, 25.0));
        let v = verdicts(&cells[..2], &[]);
        assert_eq!(
            v["minimal-norm beats budgeted L2 at equal success"],
            Verdict::NotApplicable
        );
    }

    #[test]
    fn roc_and_auc_follow_the_definitions() {
        // Perfect separation: AUC 1, TPR 1 at 0% FPR.
        let r = roc(&[0.1, 0.2, 0.3], &[0.5, 0.9], 0.05);
        assert_eq!(r.auc, Some(1.0));
        assert_eq!(r.tpr_at_fpr, Some(1.0));
        assert_eq!(r.points.first(), Some(&(0.0, 0.0)));
        assert_eq!(r.points.last(), Some(&(1.0, 1.0)));
        // Identical scores: a coin (ties count half), nothing detected at 5% FPR.
        let r = roc(&[1.0; 4], &[1.0; 4], 0.05);
        assert_eq!(r.auc, Some(0.5));
        assert_eq!(r.tpr_at_fpr, Some(0.0));
        assert_eq!(r.points, [(0.0, 0.0), (1.0, 1.0)]);
        // Hand-counted: positives {0.4, 0.8}, negatives {0.2, 0.6}: 3 of 4 pairs ordered right.
        let r = roc(&[0.2, 0.6], &[0.4, 0.8], 0.05);
        assert_eq!(r.auc, Some(0.75));
        assert_eq!(r.tpr_at_fpr, Some(0.5));
        assert_eq!(
            r.points,
            [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        assert_eq!(roc(&[], &[1.0], 0.05).auc, None);
    }

    #[test]
    fn certified_accuracy_needs_the_right_class_and_the_radius() {
        let f = [
            (Some(1), Some(1), Some(0.6)),
            (Some(1), Some(1), Some(0.3)),
            (Some(1), Some(0), Some(2.0)), // certified, but wrong
            (Some(0), None, None),         // abstained
            (None, Some(1), Some(9.0)),    // unlabelled: not counted
        ];
        assert_eq!(certified_accuracy(&f, 0.0), Some(0.5));
        assert_eq!(certified_accuracy(&f, 0.25), Some(0.5));
        assert_eq!(certified_accuracy(&f, 0.5), Some(0.25));
        assert_eq!(certified_accuracy(&f, 1.0), Some(0.0));
        assert_eq!(certified_accuracy(&[], 0.5), None);
    }
}
