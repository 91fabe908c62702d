//! Pipeline files: what to read, which model, which stages, where to write.
//!
//! A pipeline is YAML (`serde_yaml`) so it can live in version control next to the model and be
//! reviewed like code. Unknown keys are errors (a typo must not silently turn a stage off).
//! Relative paths resolve against the pipeline file's directory, never the working directory,
//! so a pipeline runs the same from anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::runtime::select::BackendChoice;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The pipeline as written (paths unresolved).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    pub input: InputSpec,
    #[serde(default)]
    pub model: Option<ModelSpec>,
    #[serde(default)]
    pub labels: Option<LabelsSpec>,
    #[serde(default)]
    pub stages: Vec<StageSpec>,
    pub output: OutputSpec,
    #[serde(default)]
    pub plugins: PluginsSpec,
    #[serde(default)]
    pub run: RunSpec,
    /// Settings of `adverse watch` (ignored by `adverse run`).
    #[serde(default)]
    pub watch: Option<WatchSpec>,
}

/// What happens to an input once its outcome is durable in the audit log.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DoneAction {
    /// Into `done_dir` (default `<watch>/.adverse/done/`), under its relative path.
    #[default]
    Move,
    Delete,
    /// Back where it was; this instance ignores it until it changes.
    Keep,
}

/// Whether a flagged image goes to the flagged folder as well as, or instead of, the output.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FlaggedMode {
    #[default]
    Also,
    Instead,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FlaggedSpec {
    pub dir: PathBuf,
    #[serde(default)]
    pub mode: FlaggedMode,
}

/// The `watch:` section. Every field has a default, so `watch: {}` is valid.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WatchSpec {
    /// Folder to watch (default: `input.path`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Watch subfolders too (default: `input.recursive`).
    #[serde(default)]
    pub recursive: Option<bool>,
    /// How long size and mtime must stay unchanged before a file is taken (default 500 ms).
    #[serde(default)]
    pub settle_ms: Option<u64>,
    /// Poll the folder every this many ms instead of native events (network shares).
    #[serde(default)]
    pub poll_ms: Option<u64>,
    /// Full rescan period in seconds, for events the OS dropped (default 60; 0: never).
    #[serde(default)]
    pub rescan_s: Option<u64>,
    /// How long a stable file that does not parse as complete DICOM is retried before it is
    /// processed anyway (and so quarantined with the parse error). Default 30 000 ms.
    #[serde(default)]
    pub incomplete_timeout_ms: Option<u64>,
    #[serde(default)]
    pub done: DoneAction,
    #[serde(default)]
    pub done_dir: Option<PathBuf>,
    /// Default `<watch>/.adverse/quarantine`.
    #[serde(default)]
    pub quarantine: Option<PathBuf>,
    /// A claim whose owner's heartbeat is older than this is taken over (default 60 s).
    #[serde(default)]
    pub lease_s: Option<u64>,
    /// Route images a detector flagged.
    #[serde(default)]
    pub flagged: Option<FlaggedSpec>,
    /// Status line period on stderr in seconds (default 30; 0: none).
    #[serde(default)]
    pub status_every_s: Option<u64>,
    /// Status JSON file, rewritten atomically with every status line and at stop.
    #[serde(default)]
    pub status_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub path: PathBuf,
    #[serde(default = "yes")]
    pub recursive: bool,
    /// Glob patterns on the path relative to `path`; a file must match one (default: all).
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub onnx: PathBuf,
    /// Default: `<model>.card.yaml` beside the ONNX file.
    #[serde(default)]
    pub card: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelsSpec {
    /// CSV with a header: `label` plus `SOPInstanceUID` and/or `file` (relative to the CSV).
    #[serde(default)]
    pub csv: Option<PathBuf>,
    /// One class for every input (e.g. an archive of known-positive cases).
    #[serde(default)]
    pub all: Option<u32>,
    /// Target class for targeted attacks, for every input.
    #[serde(default)]
    pub target: Option<u32>,
}

/// One stage: exactly one of `attack`, `purifier`, `detector`, `stage` names the plugin.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    #[serde(default)]
    pub attack: Option<String>,
    #[serde(default)]
    pub purifier: Option<String>,
    #[serde(default)]
    pub detector: Option<String>,
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default = "empty_object")]
    pub params: Value,
    /// Label for result columns (default: the plugin name; must be unique in the pipeline).
    #[serde(default)]
    pub id: Option<String>,
    /// Purifiers: attack stages before this one see the model through this purifier, run
    /// for real in their forward pass and taken as the identity in their backward pass (BPDA,
    /// Athalye et al. 2018), so the attack adapts to the defense. Detectors (with
    /// `score_weight`): attack stages before this one also descend the detector's score.
    #[serde(default, skip_serializing_if = "is_false")]
    pub adaptive: bool,
    /// Adaptive purifiers only: Expectation over Transformation (Athalye et al. 2018). The
    /// attack's loss, gradient and logits are averaged over this many draws of the purifier's
    /// randomness per model call, so a randomised defense is attacked in expectation rather than
    /// through one draw it will not see again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eot: Option<u32>,
    /// Adaptive purifiers only: the purifier exists only inside the attacks before it, not on
    /// the written output, and those attacks optimise the mean loss over the unpurified image
    /// and each shadow purifier's version of it. This is the adaptive attack on a detector
    /// that compares a model's outputs on squeezed inputs (feature squeezing): the image must
    /// fool the model with and without each squeezer, so the squeezers no longer disagree.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
    /// Adaptive detectors: the attacks before it also descend this weight times the
    /// detector's score (its ABI 1.3 `score_grad`), once an image fools the model (see
    /// `DetectorScore`).
    ///
    /// Shadow purifiers: the attacks before it also descend this weight times the L1
    /// distance between the model's softmax outputs with and without this purifier: the score
    /// feature squeezing thresholds, so the attack targets the detector itself and not only
    /// the model, once an image fools the model (see `Bpda::loss_grad_scored`). 0 or absent:
    /// the plain ensemble.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_weight: Option<f32>,
}

/// The most draws EOT may average per model call (each draw is a full forward and backward).
pub const MAX_EOT: u32 = 1024;

/// The largest detector-score weight (the score is at most 2; larger weights only drown the
/// attack's own loss).
pub const MAX_SCORE_WEIGHT: f32 = 1000.0;

fn is_false(v: &bool) -> bool {
    !*v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StageRole {
    Attack,
    Purifier,
    Detector,
    Other,
}

impl StageRole {
    pub fn key(self) -> &'static str {
        match self {
            StageRole::Attack => "attack",
            StageRole::Purifier => "purifier",
            StageRole::Detector => "detector",
            StageRole::Other => "stage",
        }
    }
}

impl StageSpec {
    /// The role and plugin name, or why the stage is not well formed.
    pub fn role(&self) -> Result<(StageRole, &str), String> {
        let named: Vec<(StageRole, &str)> = [
            (StageRole::Attack, &self.attack),
            (StageRole::Purifier, &self.purifier),
            (StageRole::Detector, &self.detector),
            (StageRole::Other, &self.stage),
        ]
        .into_iter()
        .filter_map(|(r, n)| n.as_deref().map(|n| (r, n)))
        .collect();
        match named.as_slice() {
            [one] => Ok(*one),
            [] => Err("a stage needs one of `attack`, `purifier`, `detector`, `stage`".into()),
            _ => Err(
                "a stage names more than one of `attack`, `purifier`, `detector`, `stage`".into(),
            ),
        }
    }

    pub fn label(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| self.role().map(|(_, n)| n.to_string()).unwrap_or_default())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub dir: PathBuf,
    /// Write derived DICOM for instances a stage changed.
    #[serde(default = "yes")]
    pub dicom: bool,
    /// PNG previews (original | result | amplified difference) per changed frame.
    #[serde(default)]
    pub previews: bool,
    /// fsync every written file and its folder (durable against power loss, slower).
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Audit log path (default: `<dir>/audit.jsonl`).
    #[serde(default)]
    pub audit: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginsSpec {
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// name -> "sha256:HEX" (or bare HEX).
    #[serde(default)]
    pub pins: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub jobs: Option<usize>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
}

fn yes() -> bool {
    true
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// A loaded pipeline: the spec, its text's hash and every path resolved.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub spec: PipelineSpec,
    /// SHA-256 of the pipeline file's bytes (audit identity).
    pub sha256: String,
    pub input: PathBuf,
    pub model: Option<PathBuf>,
    pub card: Option<PathBuf>,
    pub labels_csv: Option<PathBuf>,
    pub output: PathBuf,
    pub audit: PathBuf,
    pub plugin_dirs: Vec<PathBuf>,
    pub pins: Vec<String>,
    pub backend: Option<BackendChoice>,
    /// The `watch:` section with its paths resolved (None when absent).
    pub watch: Option<WatchSpec>,
}

/// `base.join(p)` unless `p` is absolute, then lexically normalised (no symlink resolution:
/// the path need not exist yet).
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

impl Pipeline {
    pub fn load(path: &Path) -> Result<Pipeline, ConfigError> {
        let text = std::fs::read(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and resolves; semantic checks against plugins and files are `validate`'s job.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Pipeline, ConfigError> {
        let spec: PipelineSpec = serde_yaml::from_slice(bytes).map_err(|e| ConfigError::Yaml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        if spec.stages.iter().any(|s| s.shadow)
            && spec.stages.iter().any(|s| s.adaptive && !s.shadow)
        {
            return Err(invalid(
                "stages: shadow purifiers (an ensemble inside the attack) and applied adaptive purifiers (a chain) cannot be combined in one pipeline".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in spec.stages.iter().enumerate() {
            s.role().map_err(|m| invalid(format!("stages[{i}]: {m}")))?;
            if !s.params.is_object() {
                return Err(invalid(format!("stages[{i}].params: must be a mapping")));
            }
            if s.adaptive && s.purifier.is_none() && s.detector.is_none() {
                return Err(invalid(format!(
                    "stages[{i}].adaptive: only a `purifier` or `detector` stage can be adaptive (attacks before it see it)"
                )));
            }
            if s.detector.is_some() && s.adaptive && s.score_weight.is_none_or(|w| w <= 0.0) {
                return Err(invalid(format!(
                    "stages[{i}].adaptive: an adaptive detector needs `score_weight` > 0 (the weight of its score in the attack's loss)"
                )));
            }
            if s.shadow && s.purifier.is_none() {
                return Err(invalid(format!(
                    "stages[{i}].shadow: only a `purifier` stage can be a shadow"
                )));
            }
            if s.shadow && !s.adaptive {
                return Err(invalid(format!(
                    "stages[{i}].shadow: needs `adaptive: true` (a shadow purifier exists only inside the attacks before it)"
                )));
            }
            if let Some(w) = s.score_weight {
                let adaptive_detector = s.detector.is_some() && s.adaptive;
                if !(s.shadow || adaptive_detector) {
                    return Err(invalid(format!(
                        "stages[{i}].score_weight: needs `shadow: true` on a purifier (the weight of a squeezer's disagreement in the attack's loss) or `adaptive: true` on a detector (the weight of its score)"
                    )));
                }
                if !(w.is_finite() && (0.0..=MAX_SCORE_WEIGHT).contains(&w)) {
                    return Err(invalid(format!(
                        "stages[{i}].score_weight: {w}; must be in 0..={MAX_SCORE_WEIGHT}"
                    )));
                }
            }
            if let Some(k) = s.eot {
                if !s.adaptive {
                    return Err(invalid(format!(
                        "stages[{i}].eot: needs `adaptive: true` (EOT averages the attack's gradient through this purifier)"
                    )));
                }
                if !(1..=MAX_EOT).contains(&k) {
                    return Err(invalid(format!(
                        "stages[{i}].eot: {k} draws; must be in 1..={MAX_EOT}"
                    )));
                }
            }
            if !seen.insert(s.label()) {
                return Err(invalid(format!(
                    "stages[{i}]: stage `{}` appears twice; give one an `id`",
                    s.label()
                )));
            }
        }
        let backend = match &spec.run.backend {
            None => None,
            Some(b) => Some(
                b.parse::<BackendChoice>()
                    .map_err(|e| invalid(format!("run.backend: {e}")))?,
            ),
        };
        let model = spec.model.as_ref().map(|m| resolve(&base, &m.onnx));
        let card = spec.model.as_ref().map(|m| match &m.card {
            Some(c) => resolve(&base, c),
            None => crate::runtime::card::card_path(&resolve(&base, &m.onnx)),
        });
        let output = resolve(&base, &spec.output.dir);
        let audit = spec
            .output
            .audit
            .as_ref()
            .map(|a| resolve(&base, a))
            .unwrap_or_else(|| output.join("audit.jsonl"));
        let pins = spec
            .plugins
            .pins
            .iter()
            .map(|(k, v)| format!("{k}={}", v.strip_prefix("sha256:").unwrap_or(v)))
            .collect();
        let watch = spec.watch.clone().map(|mut w| {
            w.path = w.path.map(|p| resolve(&base, &p));
            w.done_dir = w.done_dir.map(|p| resolve(&base, &p));
            w.quarantine = w.quarantine.map(|p| resolve(&base, &p));
            w.status_file = w.status_file.map(|p| resolve(&base, &p));
            if let Some(f) = &mut w.flagged {
                f.dir = resolve(&base, &f.dir);
            }
            w
        });
        if let Some(w) = &watch {
            if w.settle_ms == Some(0) {
                return Err(invalid("watch.settle_ms: must be at least 1".into()));
            }
            if w.poll_ms == Some(0) {
                return Err(invalid("watch.poll_ms: must be at least 1".into()));
            }
            if w.lease_s == Some(0) {
                return Err(invalid("watch.lease_s: must be at least 1".into()));
            }
        }
        Ok(Pipeline {
            watch,
            file: path.to_path_buf(),
            sha256: hex::encode(Sha256::digest(bytes)),
            input: resolve(&base, &spec.input.path),
            model,
            card,
            labels_csv: spec
                .labels
                .as_ref()
                .and_then(|l| l.csv.as_ref())
                .map(|c| resolve(&base, c)),
            output,
            audit,
            plugin_dirs: spec
                .plugins
                .dirs
                .iter()
                .map(|d| resolve(&base, d))
                .collect(),
            pins,
            backend,
            spec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name: pgd-audit
input: { path: ../samples, recursive: true, include: ["*.dcm"] }
model: { onnx: models/pneumonia-cnn.onnx }
labels: { csv: ../samples/labels.csv }
stages:
  - attack: pgd
    params: { eps: 4, steps: 10 }
  - detector: squeeze
    params: { threshold: 0.2 }
output: { dir: out/pgd-audit, previews: true }
plugins: { dirs: [../target/release], pins: { pgd: "sha256:00" } }
"#;

    #[test]
    fn parses_and_resolves_against_the_file() {
        let p = Pipeline::parse(Path::new("/repo/pipelines/x.yaml"), EXAMPLE.as_bytes()).unwrap();
        assert_eq!(p.input, PathBuf::from("/repo/samples"));
        assert_eq!(
            p.model.as_deref(),
            Some(Path::new("/repo/pipelines/models/pneumonia-cnn.onnx"))
        );
        assert_eq!(
            p.card.as_deref(),
            Some(Path::new("/repo/pipelines/models/pneumonia-cnn.card.yaml"))
        );
        assert_eq!(p.output, PathBuf::from("/repo/pipelines/out/pgd-audit"));
        assert_eq!(
            p.audit,
            PathBuf::from("/repo/pipelines/out/pgd-audit/audit.jsonl")
        );
        assert_eq!(p.plugin_dirs, vec![PathBuf::from("/repo/target/release")]);
        assert_eq!(p.pins, vec!["pgd=00".to_string()]);
        assert_eq!(p.spec.stages.len(), 2);
        assert_eq!(p.spec.stages[0].role().unwrap(), (StageRole::Attack, "pgd"));
        assert!(p.spec.output.dicom && p.spec.output.previews);
        assert_eq!(p.sha256.len(), 64);
    }

    #[test]
    fn refuses_unknown_keys_bad_stages_and_duplicates() {
        let typo = EXAMPLE.replace("previews", "preview");
        let e = Pipeline::parse(Path::new("/x.yaml"), typo.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("unknown field `preview`"), "{e}");
        let two = "name: a\ninput: {path: .}\noutput: {dir: o}\nstages: [{attack: a, purifier: b}]";
        let e = Pipeline::parse(Path::new("/x.yaml"), two.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("more than one"), "{e}");
        let dup =
            "name: a\ninput: {path: .}\noutput: {dir: o}\nstages: [{purifier: m}, {purifier: m}]";
        let e = Pipeline::parse(Path::new("/x.yaml"), dup.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        let ok = "name: a\ninput: {path: .}\noutput: {dir: o}\nstages: [{purifier: m}, {purifier: m, id: m2}]";
        assert!(Pipeline::parse(Path::new("/x.yaml"), ok.as_bytes()).is_ok());
    }

    #[test]
    fn watch_section_resolves_paths_and_refuses_zero_periods() {
        let y = "name: a\ninput: {path: in}\noutput: {dir: o}\nwatch: {path: drop, settle_ms: 200, done: delete, quarantine: q, flagged: {dir: f, mode: instead}}";
        let p = Pipeline::parse(Path::new("/r/p.yaml"), y.as_bytes()).unwrap();
        let w = p.watch.unwrap();
        assert_eq!(w.path.as_deref(), Some(Path::new("/r/drop")));
        assert_eq!(w.quarantine.as_deref(), Some(Path::new("/r/q")));
        assert_eq!(w.done, DoneAction::Delete);
        let f = w.flagged.unwrap();
        assert_eq!(
            (f.dir.as_path(), f.mode),
            (Path::new("/r/f"), FlaggedMode::Instead)
        );
        for bad in ["settle_ms: 0", "poll_ms: 0", "lease_s: 0"] {
            let y = format!("name: a\ninput: {{path: in}}\noutput: {{dir: o}}\nwatch: {{{bad}}}");
            let e = Pipeline::parse(Path::new("/r/p.yaml"), y.as_bytes()).unwrap_err();
            assert!(e.to_string().contains("at least 1"), "{e}");
        }
        let typo = "name: a\ninput: {path: in}\noutput: {dir: o}\nwatch: {done: archive}";
        assert!(Pipeline::parse(Path::new("/r/p.yaml"), typo.as_bytes()).is_err());
    }
}
