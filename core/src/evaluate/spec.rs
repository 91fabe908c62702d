//! Evaluation files: which attacks, at which budgets, against which defenses.
//!
//! An evaluation is YAML beside the pipelines it resembles (same `input`, `model`, `labels`,
//! `plugins`, `run` sections) so a team can keep its robustness protocol in version control and
//! re-run it on every new model. Unknown keys are errors; relative paths resolve against the
//! file's directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pipeline::config::{InputSpec, LabelsSpec, ModelSpec, PluginsSpec, RunSpec, resolve};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What an attack is for in the sanity checks of Carlini et al. 2019 (arXiv 1902.06705).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// One gradient step (FGSM): an iterative attack must do at least as well.
    SingleStep,
    /// Multi-step white-box (PGD, BIM, APGD...): the reference attack.
    Iterative,
    /// Multi-step white-box under an L2 budget (`norm: l2`): its ε is an L2 radius, so it is
    /// compared with the minimum-norm attacks at equal success, not with the L∞ attacks.
    IterativeL2,
    /// Predictions only (Square): must not beat white-box.
    BlackBox,
    /// Random noise of the same budget: must be far below white-box.
    Noise,
    /// Minimum-norm attacks without a budget (C&W, DeepFool): success and mean distance only.
    Minimal,
    /// Crafted on a surrogate model, evaluated on the target.
    Transfer,
}

impl Role {
    /// The role a built-in attack plays unless the file says otherwise.
    pub fn of(plugin: &str) -> Role {
        match plugin {
            "fgsm" => Role::SingleStep,
            "square" => Role::BlackBox,
            "noise" => Role::Noise,
            "cw-l2" | "deepfool" => Role::Minimal,
            _ => Role::Iterative,
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Role::SingleStep => "single-step",
            Role::Iterative => "iterative",
            Role::IterativeL2 => "iterative-l2",
            Role::BlackBox => "black-box",
            Role::Noise => "noise",
            Role::Minimal => "minimal",
            Role::Transfer => "transfer",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttackEntry {
    /// The attack plugin.
    pub attack: String,
    /// Parameters passed to every run; `eps` and `unit` come from the grid.
    #[serde(default = "empty_object")]
    pub params: Value,
    /// This attack's own budget grid (default: the file's `eps`).
    #[serde(default)]
    pub eps: Option<Vec<f64>>,
    /// Label in tables (default: the plugin name); must be unique.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub role: Option<Role>,
    /// Craft on this model instead of the evaluated one (a transfer attack).
    #[serde(default)]
    pub surrogate: Option<ModelSpec>,
}

impl AttackEntry {
    pub fn label(&self) -> String {
        self.id.clone().unwrap_or_else(|| self.attack.clone())
    }

    pub fn role(&self) -> Role {
        self.role.unwrap_or(if self.surrogate.is_some() {
            Role::Transfer
        } else {
            match Role::of(&self.attack) {
                Role::Iterative
                    if self.params.get("norm").and_then(Value::as_str) == Some("l2") =>
                {
                    Role::IterativeL2
                }
                r => r,
            }
        })
    }

    /// Whether the attack's ε is an L∞ budget (the file's grid and the large-ε check).
    pub fn linf_budget(&self) -> bool {
        !matches!(self.role(), Role::Minimal | Role::IterativeL2)
    }
}

/// A defense the attacks are run against: nothing, a purifier after the attack, another model,
/// or both.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DefenseEntry {
    pub name: String,
    #[serde(default)]
    pub purifier: Option<String>,
    #[serde(default = "empty_object")]
    pub params: Value,
    /// Evaluate this model instead of the file's `model` (e.g. an adversarially trained one).
    #[serde(default)]
    pub model: Option<ModelSpec>,
    /// Attack through the purifier (BPDA: the purifier runs in the attack's forward pass, the
    /// identity in its backward pass). Default true: a purifier evaluated only against attacks
    /// that ignore it is not evaluated.
    #[serde(default = "yes")]
    pub adaptive: bool,
    /// A randomised purifier: average the adaptive attack's gradient over this many draws (EOT).
    #[serde(default)]
    pub eot: Option<u32>,
}

/// A detector evaluated against the attacks: its score on clean images (negatives) and on
/// successful adversarial ones (positives) gives a ROC curve.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DetectorEntry {
    pub detector: String,
    #[serde(default = "empty_object")]
    pub params: Value,
    #[serde(default)]
    pub id: Option<String>,
    /// The audited number that grows with suspicion.
    #[serde(default = "score")]
    pub score: String,
    /// Attack labels to detect (default: every iterative attack).
    #[serde(default)]
    pub against: Option<Vec<String>>,
    /// The detector's squeezers as purifiers: when given, the same attacks also run adaptively,
    /// optimising the model's loss with and without each of them (shadow purifiers, BPDA), so
    /// the images fool every squeezed view alike and the detector's disagreement score is
    /// attacked too.
    #[serde(default)]
    pub adaptive: Vec<AdaptivePurifier>,
    /// For a detector whose score is a differentiable function of the model's features (ABI
    /// 1.3 `score_grad`: mahalanobis): the same attacks also run adaptively, descending this
    /// weight times the detector's score once an image fools the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_weight: Option<f32>,
}

/// A purifier standing in for one of a detector's input transformations.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptivePurifier {
    pub purifier: String,
    #[serde(default = "empty_object")]
    pub params: Value,
    /// The weight of this squeezer's disagreement (the detector's score) in the adaptive
    /// attack's loss; absent: the attack only fools the model with and without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_weight: Option<f32>,
}

impl DetectorEntry {
    pub fn label(&self) -> String {
        self.id.clone().unwrap_or_else(|| self.detector.clone())
    }
}

/// Randomized-smoothing certification (Cohen et al. 2019) on the clean images: a plugin that
/// audits, per frame, the smoothed class and the certified L2 radius (abstentions: no class or a
/// negative radius).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertifyEntry {
    #[serde(default = "smoothing")]
    pub plugin: String,
    #[serde(default = "empty_object")]
    pub params: Value,
    #[serde(default)]
    pub id: Option<String>,
    /// Audit keys of the smoothed class and of the radius in model-input units.
    #[serde(default = "class_key")]
    pub class: String,
    #[serde(default = "radius_key")]
    pub radius: String,
    /// Radii at which certified accuracy is tabulated.
    #[serde(default = "radii")]
    pub radii: Vec<f64>,
    /// The base classifier to smooth, when not the file's `model`: smoothing certifies only
    /// what its base model gets right under the noise, so it is usually a model trained under
    /// that noise.
    #[serde(default)]
    pub model: Option<ModelSpec>,
}

impl CertifyEntry {
    pub fn label(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| match self.params.get("sigma").and_then(Value::as_f64) {
                Some(s) => format!("{}-sigma-{s}", self.plugin),
                None => self.plugin.clone(),
            })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SanitySpec {
    /// The budget at which an iterative attack on the undefended model must reach (almost)
    /// every image (default: 16 times the largest ε of the grid).
    #[serde(default)]
    pub large_eps: Option<f64>,
    /// Images by which a comparison may go the "wrong" way before it is flagged (sampling noise
    /// and integer rounding make exact inequalities flaky on small sets).
    #[serde(default = "one")]
    pub tolerance_images: usize,
    /// Noise success must stay at or below this fraction of the iterative attack's success.
    #[serde(default = "half")]
    pub noise_fraction: f64,
    /// Success the large-ε run must reach (fraction of correctly classified images).
    #[serde(default = "almost_all")]
    pub large_eps_success: f64,
}

impl Default for SanitySpec {
    fn default() -> Self {
        SanitySpec {
            large_eps: None,
            tolerance_images: 1,
            noise_fraction: 0.5,
            large_eps_success: 0.99,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalOutput {
    pub dir: PathBuf,
    /// PNG previews per attacked frame (for the report's example grid).
    #[serde(default = "yes")]
    pub previews: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub name: String,
    pub input: InputSpec,
    pub model: ModelSpec,
    #[serde(default)]
    pub labels: Option<LabelsSpec>,
    /// The default budget grid, in `unit`.
    #[serde(default)]
    pub eps: Vec<f64>,
    /// `stored`, `hu` (CT) or `window` (fraction of the frame's window).
    #[serde(default = "stored")]
    pub unit: String,
    pub attacks: Vec<AttackEntry>,
    #[serde(default = "no_defense")]
    pub defenses: Vec<DefenseEntry>,
    #[serde(default)]
    pub detectors: Vec<DetectorEntry>,
    #[serde(default)]
    pub certify: Vec<CertifyEntry>,
    #[serde(default)]
    pub sanity: SanitySpec,
    pub output: EvalOutput,
    #[serde(default)]
    pub plugins: PluginsSpec,
    #[serde(default)]
    pub run: RunSpec,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn half() -> f64 {
    0.5
}
fn almost_all() -> f64 {
    0.99
}
fn score() -> String {
    "score".into()
}
fn smoothing() -> String {
    "smoothing".into()
}
fn class_key() -> String {
    "class".into()
}
fn radius_key() -> String {
    "radius_input".into()
}
fn radii() -> Vec<f64> {
    vec![0.25, 0.5, 1.0]
}
fn stored() -> String {
    "stored".into()
}
fn no_defense() -> Vec<DefenseEntry> {
    vec![DefenseEntry {
        name: "none".into(),
        purifier: None,
        params: empty_object(),
        model: None,
        adaptive: true,
        eot: None,
    }]
}

/// A loaded evaluation: the spec with every path made absolute.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub file: PathBuf,
    pub spec: EvalSpec,
    pub output: PathBuf,
}

impl Evaluation {
    pub fn load(path: &Path) -> Result<Evaluation, SpecError> {
        let bytes = std::fs::read(path).map_err(|source| SpecError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &bytes)
    }

    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Evaluation, SpecError> {
        let invalid = |message: String| SpecError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut spec: EvalSpec =
            serde_yaml::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        let abs = |p: &mut PathBuf| *p = resolve(&base, p);
        abs(&mut spec.input.path);
        let abs_model = |m: &mut ModelSpec| {
            m.onnx = resolve(&base, &m.onnx);
            if let Some(c) = &mut m.card {
                *c = resolve(&base, c);
            }
        };
        abs_model(&mut spec.model);
        if let Some(l) = &mut spec.labels
            && let Some(c) = &mut l.csv
        {
            abs(c);
        }
        for d in &mut spec.plugins.dirs {
            abs(d);
        }
        abs(&mut spec.output.dir);
        for a in &mut spec.attacks {
            if let Some(m) = &mut a.surrogate {
                abs_model(m);
            }
        }
        for c in &mut spec.certify {
            if let Some(m) = &mut c.model {
                abs_model(m);
            }
        }
        for d in &mut spec.defenses {
            if let Some(m) = &mut d.model {
                abs_model(m);
            }
        }
        check(&spec).map_err(invalid)?;
        Ok(Evaluation {
            file: path.to_path_buf(),
            output: spec.output.dir.clone(),
            spec,
        })
    }
}

/// Semantic checks that need no plugin or file (those fail in the first run that uses them,
/// with the engine's message).
fn check(s: &EvalSpec) -> Result<(), String> {
    if !["stored", "hu", "window"].contains(&s.unit.as_str()) {
        return Err(format!(
            "unit: `{}` is not one of stored, hu, window",
            s.unit
        ));
    }
    if s.attacks.is_empty() {
        return Err("attacks: list at least one attack".into());
    }
    let mut labels = std::collections::BTreeSet::new();
    for (i, a) in s.attacks.iter().enumerate() {
        if !labels.insert(a.label()) {
            return Err(format!(
                "attacks[{i}]: `{}` appears twice; give one an `id`",
                a.label()
            ));
        }
        if !a.params.is_object() {
            return Err(format!("attacks[{i}].params: must be a mapping"));
        }
        if a.params.get("eps").is_some() || a.params.get("unit").is_some() {
            return Err(format!(
                "attacks[{i}].params: `eps` and `unit` come from the grid (`eps:` and `unit:`)"
            ));
        }
        let grid = a.eps.as_ref().unwrap_or(&s.eps);
        if a.role() != Role::Minimal && grid.is_empty() {
            return Err(format!(
                "attacks[{i}] (`{}`): no budgets; set `eps:` for the file or the attack",
                a.label()
            ));
        }
        if let Some(e) = grid.iter().find(|e| !(e.is_finite() && **e >= 0.0)) {
            return Err(format!("attacks[{i}]: eps {e} must be finite and >= 0"));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, d) in s.defenses.iter().enumerate() {
        if !names.insert(d.name.as_str()) {
            return Err(format!("defenses[{i}]: `{}` appears twice", d.name));
        }
        if d.name.is_empty() || d.name.contains(['/', '\\']) || d.name.starts_with('.') {
            return Err(format!(
                "defenses[{i}]: `{}` must be a plain name (it names a folder)",
                d.name
            ));
        }
    }
    if s.defenses.is_empty() {
        return Err("defenses: list at least one (`- name: none` for the model alone)".into());
    }
    let mut det = std::collections::BTreeSet::new();
    for (i, d) in s.detectors.iter().enumerate() {
        if !det.insert(d.label()) {
            return Err(format!(
                "detectors[{i}]: `{}` appears twice; give one an `id`",
                d.label()
            ));
        }
        for a in d.against.iter().flatten() {
            if !labels.contains(a) {
                return Err(format!(
                    "detectors[{i}].against: no attack `{a}` in `attacks`"
                ));
            }
        }
        let max = crate::pipeline::config::MAX_SCORE_WEIGHT;
        if let Some(w) = d
            .score_weight
            .filter(|w| !(w.is_finite() && *w > 0.0 && *w <= max))
        {
            return Err(format!(
                "detectors[{i}].score_weight: {w}; must be in (0, {max}]"
            ));
        }
        for (j, p) in d.adaptive.iter().enumerate() {
            if let Some(w) = p
                .score_weight
                .filter(|w| !(w.is_finite() && (0.0..=max).contains(w)))
            {
                return Err(format!(
                    "detectors[{i}].adaptive[{j}].score_weight: {w}; must be in 0..={max}"
                ));
            }
        }
    }
    let mut cert = std::collections::BTreeSet::new();
    for (i, c) in s.certify.iter().enumerate() {
        if !cert.insert(c.label()) {
            return Err(format!(
                "certify[{i}]: `{}` appears twice; give one an `id`",
                c.label()
            ));
        }
        if c.radii.iter().any(|r| !(r.is_finite() && *r >= 0.0)) {
            return Err(format!("certify[{i}].radii: radii are finite and >= 0"));
        }
    }
    let sp = &s.sanity;
    if !(0.0..=1.0).contains(&sp.noise_fraction) || !(0.0..=1.0).contains(&sp.large_eps_success) {
        return Err("sanity: noise_fraction and large_eps_success are fractions in [0, 1]".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Evaluation, SpecError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.yaml");
        Evaluation::parse(&p, text.as_bytes())
    }

    const BASE: &str = "name: t\ninput: {path: in}\nmodel: {onnx: m.onnx}\noutput: {dir: out}\n";

    #[test]
    fn a_detector_score_weight_out_of_range_is_refused() {
        let det = |w: &str| {
            parse(&format!(
                "{BASE}eps: [1]\nattacks:\n  - attack: pgd\ndetectors:\n  - detector: feature-squeezing\n    adaptive: [{{ purifier: median-2x2, score_weight: {w} }}]\n"
            ))
        };
        assert!(det("10").is_ok());
        let e = det("-1").unwrap_err().to_string();
        assert!(
            e.contains("detectors[0].adaptive[0].score_weight: -1"),
            "{e}"
        );
        assert!(det("1e9").is_err());
    }

    #[test]
    fn roles_default_from_the_catalogue_and_paths_resolve() {
        let e = parse(&format!(
            "{BASE}eps: [1, 2]\nattacks:\n  - attack: fgsm\n  - attack: pgd\n    params: {{steps: 10}}\n  - attack: square\n  - attack: noise\n  - attack: cw-l2\n  - attack: pgd\n    id: pgd-transfer\n    surrogate: {{onnx: s.onnx}}\n  - attack: pgd\n    id: pgd-l2\n    params: {{norm: l2}}\n    eps: [50]\n"
        ))
        .unwrap();
        let roles: Vec<Role> = e.spec.attacks.iter().map(AttackEntry::role).collect();
        assert_eq!(
            roles,
            [
                Role::SingleStep,
                Role::Iterative,
                Role::BlackBox,
                Role::Noise,
                Role::Minimal,
                Role::Transfer,
                Role::IterativeL2
            ]
        );
        assert!(e.spec.model.onnx.is_absolute());
        let e = parse(&format!(
            "{BASE}attacks: [{{attack: cw-l2}}]\ncertify:\n  - {{model: {{onnx: noise.onnx}}}}\n"
        ))
        .unwrap();
        let m = e.spec.certify[0].model.as_ref().unwrap();
        assert!(m.onnx.is_absolute() && m.onnx.ends_with("noise.onnx"));
        assert!(e.output.is_absolute() && e.output.ends_with("out"));
        assert_eq!(e.spec.defenses.len(), 1);
        assert_eq!(e.spec.defenses[0].name, "none");
    }

    #[test]
    fn mistakes_are_named() {
        let err = |t: &str| parse(&format!("{BASE}{t}")).unwrap_err().to_string();
        assert!(err("attacks: []\n").contains("at least one attack"));
        assert!(err("attacks: [{attack: pgd}]\n").contains("no budgets"));
        assert!(err("eps: [1]\nattacks: [{attack: pgd}, {attack: pgd}]\n").contains("twice"));
        assert!(
            err("eps: [1]\nattacks: [{attack: pgd, params: {eps: 3}}]\n").contains("from the grid")
        );
        assert!(err("eps: [-1]\nattacks: [{attack: pgd}]\n").contains(">= 0"));
        assert!(err("eps: [1]\nunit: hz\nattacks: [{attack: pgd}]\n").contains("unit"));
        assert!(err("eps: [1]\nattacks: [{attack: pgd}]\ntypo: 1\n").contains("typo"));
        assert!(
            err("eps: [1]\nattacks: [{attack: pgd}]\ndefenses: [{name: ../x}]\n")
                .contains("plain name")
        );
        // Minimal-norm attacks need no grid.
        assert!(parse(&format!("{BASE}attacks: [{{attack: cw-l2}}]\n")).is_ok());
    }
}
