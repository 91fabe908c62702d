//! `adverse evaluate`: a robustness evaluation as a grid of pipeline runs.
//!
//! Every cell (defense × attack × ε, plus each defense's clean run) is an ordinary pipeline run
//! through the streaming engine, so each number is measured on files as written (integer
//! pixels, re-read from disk), each cell leaves a pipeline file, derived DICOM, results and an
//! audit log that can be inspected or re-run alone, and a re-run of the evaluation resumes the
//! cells that finished. The grid is then reduced to tables and to the sanity checks of Carlini
//! et al. 2019 ([`analysis`]), written as `evaluation.json` (the report's input) and
//! `evaluation.md`.

pub mod analysis;
pub mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde_json::{Value, json};

use crate::pipeline::config::{
    LabelsSpec, ModelSpec, OutputSpec, Pipeline, PipelineSpec, StageSpec,
};
use crate::pipeline::engine::{self, EngineError, RunOptions};
use crate::pipeline::results;
use crate::runtime::select::{self, BackendChoice};
use analysis::{Cell, CellStats, Check, FrameOutcome, Verdict, WorstCase};
use spec::{AttackEntry, DefenseEntry, EvalSpec, Evaluation, Role};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{cell}: {source}")]
    Engine {
        cell: String,
        #[source]
        source: EngineError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    pub backend: Option<BackendChoice>,
    pub jobs: Option<usize>,
    /// Redo cells a previous evaluation into the same folder finished.
    pub force: bool,
    /// Progress lines on stderr.
    pub verbose: bool,
}

/// Everything an evaluation measured (`evaluation.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub name: String,
    pub tool: String,
    pub evaluation_file: String,
    pub spec: EvalSpec,
    pub model_card: Option<Value>,
    pub backend: String,
    pub clean: Vec<CellStats>,
    pub cells: Vec<CellStats>,
    pub large_eps: Vec<CellStats>,
    pub worst_case: Vec<WorstCase>,
    pub checks: Vec<Check>,
    /// Minimum-norm attacks against L2-budgeted ones at equal success.
    pub norm_comparisons: Vec<analysis::NormComparison>,
    /// Per detector and attack budget: ROC, AUC and TPR at 5% FPR.
    pub detection: Vec<Detection>,
    /// Per certification entry: certified accuracy against the radius.
    pub certification: Vec<Certification>,
    /// Per-run folders (relative to the output folder), for the report's example images.
    pub runs: Vec<RunInfo>,
    pub interrupted: bool,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// grid, large, detect or certify.
    pub purpose: &'static str,
    pub defense: String,
    pub attack: String,
    pub eps: Option<f64>,
    pub dir: String,
    pub failed: usize,
}

impl Report {
    pub fn checks_failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .count()
    }
}

/// Why a run is in the plan.
#[derive(Debug, Clone, PartialEq)]
enum Purpose {
    /// A cell of the accuracy table (or a defense's clean run).
    Grid,
    /// The iterative attack at the large budget, for the 100% check.
    Large,
    /// Detector scores (clean run or one attack): the detector at `.0`.
    Detect(usize),
    /// Detector scores under the attack that also targets the detector `.0`.
    DetectAdaptive(usize),
    /// Randomized-smoothing certification `.0` on the clean images.
    Certify(usize),
}

/// One planned run.
struct Plan {
    defense: DefenseEntry,
    attack: Option<AttackEntry>,
    eps: Option<f64>,
    purpose: Purpose,
    /// Stages after the attack and the defense's purifier (a detector, the smoothing plugin).
    extra: Vec<StageSpec>,
    dir: String,
}

fn eps_dir(e: f64) -> String {
    format!("eps-{e}").replace('.', "_")
}

fn plans(s: &EvalSpec) -> Vec<Plan> {
    let mut out = Vec::new();
    let max_eps = s
        .attacks
        .iter()
        .filter(|a| a.linf_budget())
        .flat_map(|a| a.eps.clone().unwrap_or_else(|| s.eps.clone()))
        .fold(0f64, f64::max);
    let large_eps = s.sanity.large_eps.unwrap_or(16.0 * max_eps);
    for d in &s.defenses {
        out.push(Plan {
            defense: d.clone(),
            attack: None,
            eps: None,
            purpose: Purpose::Grid,
            extra: Vec::new(),
            dir: format!("{}/clean", d.name),
        });
        for a in &s.attacks {
            let dir = |e: Option<f64>| {
                format!(
                    "{}/{}/{}",
                    d.name,
                    a.label(),
                    e.map_or("minimal".into(), eps_dir)
                )
            };
            if a.role() == Role::Minimal {
                out.push(Plan {
                    defense: d.clone(),
                    attack: Some(a.clone()),
                    eps: None,
                    purpose: Purpose::Grid,
                    extra: Vec::new(),
                    dir: dir(None),
                });
                continue;
            }
            for &e in a.eps.as_ref().unwrap_or(&s.eps) {
                out.push(Plan {
                    defense: d.clone(),
                    attack: Some(a.clone()),
                    eps: Some(e),
                    purpose: Purpose::Grid,
                    extra: Vec::new(),
                    dir: dir(Some(e)),
                });
            }
        }
        // The 100% check: the first iterative attack at a large budget, undefended model only.
        if d.name == "none"
            && d.purifier.is_none()
            && d.model.is_none()
            && large_eps > 0.0
            && let Some(a) = s.attacks.iter().find(|a| a.role() == Role::Iterative)
        {
            out.push(Plan {
                defense: d.clone(),
                attack: Some(a.clone()),
                eps: Some(large_eps),
                purpose: Purpose::Large,
                extra: Vec::new(),
                dir: format!("{}/{}/large-{}", d.name, a.label(), eps_dir(large_eps)),
            });
        }
    }
    // Detectors and certification on the undefended model (the first defense entry's model is
    // the file's `model`).
    let none = DefenseEntry {
        name: "none".into(),
        purifier: None,
        params: Value::Object(Default::default()),
        model: None,
        adaptive: true,
        eot: None,
    };
    for (k, d) in s.detectors.iter().enumerate() {
        let stage = StageSpec {
            attack: None,
            purifier: None,
            detector: Some(d.detector.clone()),
            stage: None,
            params: d.params.clone(),
            id: d.id.clone(),
            adaptive: false,
            eot: None,
            shadow: false,
            score_weight: None,
        };
        let base = format!("detect/{}", d.label());
        out.push(Plan {
            defense: none.clone(),
            attack: None,
            eps: None,
            purpose: Purpose::Detect(k),
            extra: vec![stage.clone()],
            dir: format!("{base}/clean"),
        });
        for a in &s.attacks {
            let chosen = match &d.against {
                Some(list) => list.contains(&a.label()),
                None => a.role() == Role::Iterative,
            };
            if !chosen || a.surrogate.is_some() || a.role() == Role::Minimal {
                continue;
            }
            for &e in a.eps.as_ref().unwrap_or(&s.eps) {
                out.push(Plan {
                    defense: none.clone(),
                    attack: Some(a.clone()),
                    eps: Some(e),
                    purpose: Purpose::Detect(k),
                    extra: vec![stage.clone()],
                    dir: format!("{base}/{}/{}", a.label(), eps_dir(e)),
                });
                if d.adaptive.is_empty() && d.score_weight.is_none() {
                    continue;
                }
                let mut extra: Vec<StageSpec> = d
                    .adaptive
                    .iter()
                    .enumerate()
                    .map(|(i, p)| StageSpec {
                        attack: None,
                        purifier: Some(p.purifier.clone()),
                        detector: None,
                        stage: None,
                        params: p.params.clone(),
                        id: Some(format!("shadow-{i}-{}", p.purifier)),
                        adaptive: true,
                        eot: None,
                        shadow: true,
                        score_weight: p.score_weight,
                    })
                    .collect();
                // A detector with a differentiable score is itself adaptive: the attack
                // descends its score (`DetectorScore`).
                extra.push(StageSpec {
                    adaptive: d.score_weight.is_some(),
                    score_weight: d.score_weight,
                    ..stage.clone()
                });
                out.push(Plan {
                    defense: none.clone(),
                    attack: Some(a.clone()),
                    eps: Some(e),
                    purpose: Purpose::DetectAdaptive(k),
                    extra,
                    dir: format!("{base}/adaptive/{}/{}", a.label(), eps_dir(e)),
                });
            }
        }
    }
    for (k, c) in s.certify.iter().enumerate() {
        out.push(Plan {
            defense: DefenseEntry {
                model: c.model.clone(),
                ..none.clone()
            },
            attack: None,
            eps: None,
            purpose: Purpose::Certify(k),
            extra: vec![StageSpec {
                attack: None,
                purifier: None,
                detector: None,
                stage: Some(c.plugin.clone()),
                params: c.params.clone(),
                id: c.id.clone(),
                adaptive: false,
                eot: None,
                shadow: false,
                score_weight: None,
            }],
            dir: format!("certify/{}", c.label()),
        });
    }
    out
}

/// The pipeline one cell runs. Transfer attacks run twice: crafted on the surrogate here, then
/// the written files are classified by the evaluated model in a second, stage-less run.
fn pipeline_spec(
    s: &EvalSpec,
    plan: &Plan,
    out: &Path,
    crafting: bool,
    judging: bool,
) -> PipelineSpec {
    // Transfer attacks craft on the surrogate; every other run (and a transfer's judging run)
    // uses the defense's model.
    let model = match plan.attack.as_ref().and_then(|a| a.surrogate.clone()) {
        Some(m) if crafting => m,
        _ => plan
            .defense
            .model
            .clone()
            .unwrap_or_else(|| s.model.clone()),
    };
    let mut stages = Vec::new();
    if let Some(a) = &plan.attack {
        let mut params = a.params.clone();
        if let (Some(e), Value::Object(m)) = (plan.eps, &mut params) {
            m.insert("eps".into(), json!(e));
            m.insert("unit".into(), json!(s.unit));
        }
        stages.push(StageSpec {
            attack: Some(a.attack.clone()),
            purifier: None,
            detector: None,
            stage: None,
            params,
            id: None,
            adaptive: false,
            eot: None,
            shadow: false,
            score_weight: None,
        });
    }
    // A transfer attack's purifier runs in the judging run, on the crafted files.
    if let Some(p) = &plan.defense.purifier
        && !crafting
    {
        stages.push(StageSpec {
            attack: None,
            purifier: Some(p.clone()),
            detector: None,
            stage: None,
            params: plan.defense.params.clone(),
            id: None,
            adaptive: plan.defense.adaptive,
            eot: plan.defense.eot.filter(|_| plan.defense.adaptive),
            shadow: false,
            score_weight: None,
        });
    }
    stages.extend(plan.extra.iter().cloned());
    let mut input = s.input.clone();
    if judging {
        // The crafted folder also holds the crafting run's results, log and previews.
        input
            .exclude
            .extend(["*.jsonl", "*.csv", "*.json", "*.png", "*.yaml"].map(String::from));
    }
    PipelineSpec {
        name: format!("{}:{}", s.name, plan.dir),
        input,
        model: Some(ModelSpec {
            onnx: model.onnx,
            card: model.card,
        }),
        labels: s.labels.clone().or(Some(LabelsSpec {
            csv: None,
            all: None,
            target: None,
        })),
        stages,
        output: OutputSpec {
            dir: out.to_path_buf(),
            dicom: true,
            previews: s.output.previews && plan.attack.is_some() && plan.purpose == Purpose::Grid,
            fsync: false,
            audit: None,
        },
        plugins: s.plugins.clone(),
        run: s.run.clone(),
        watch: None,
    }
}

/// Reads a finished run's rows (the last row per input and frame) as outcomes.
fn outcomes(dir: &Path, stage: Option<&str>) -> Result<Vec<FrameOutcome>, EvalError> {
    let path = dir.join("results.jsonl");
    let mut rows: BTreeMap<(String, u32), FrameOutcome> = BTreeMap::new();
    results::read_rows(&path, |_, m| {
        let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
        let u = |k: &str| m.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let (Some(input), Some(frame)) = (s("input"), u("frame")) else {
            return;
        };
        let ok = s("status").as_deref() == Some("ok");
        let st = stage.and_then(|st| m.get("stages").and_then(|v| v.get(st)));
        let num = |k: &str| st.and_then(|v| v.get(k)).and_then(Value::as_f64);
        let pred = if ok {
            u("pred_written").or(u("pred_final")).or(u("pred_before"))
        } else {
            None
        };
        rows.insert(
            (input.clone(), frame),
            FrameOutcome {
                input,
                frame,
                label: u("label"),
                pred,
                linf: num("linf").or_else(|| m.get("linf_stored").and_then(Value::as_f64)),
                l2: num("l2").or_else(|| m.get("l2_stored").and_then(Value::as_f64)),
                stages: m.get("stages").cloned().unwrap_or(Value::Null),
            },
        );
    })
    .map_err(io_err(&path))?;
    Ok(rows.into_values().collect())
}

fn run_cell(
    spec: &PipelineSpec,
    dir: &Path,
    o: &EvalOptions,
    stop: &Arc<AtomicBool>,
    input: Option<PathBuf>,
) -> Result<(usize, f64, String), EvalError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let file = dir.join("pipeline.yaml");
    let text = serde_yaml::to_string(spec).map_err(|e| EvalError::Setup(e.to_string()))?;
    std::fs::write(&file, text).map_err(io_err(&file))?;
    let p = Pipeline::load(&file).map_err(|e| EvalError::Setup(e.to_string()))?;
    let opts = RunOptions {
        input,
        output: None,
        backend: o.backend,
        jobs: o.jobs,
        force: o.force,
        progress: false,
        ..RunOptions::default()
    };
    let s = engine::run(&p, &opts, stop.clone()).map_err(|source| EvalError::Engine {
        cell: dir.display().to_string(),
        source,
    })?;
    Ok((s.failed, s.seconds, s.backend))
}

/// Runs every cell and reduces them. Per-file failures are counted in the cells (and in their
/// results); an error here means a cell could not run at all (a missing plugin, a bad model).
pub fn run(e: &Evaluation, o: &EvalOptions, stop: Arc<AtomicBool>) -> Result<Report, EvalError> {
    let started = std::time::Instant::now();
    let s = &e.spec;
    std::fs::create_dir_all(&e.output).map_err(io_err(&e.output))?;
    let plans = plans(s);
    // Resolve `auto` once: every cell then runs on the same backend without probing the GPU
    // adapters again (and repeating the driver's messages) for each of dozens of runs.
    let mut o = o.clone();
    let spec_backend = match &s.run.backend {
        Some(b) => Some(
            b.parse::<BackendChoice>()
                .map_err(|e| EvalError::Setup(format!("run.backend: {e}")))?,
        ),
        None => None,
    };
    let choice = select::resolve_choice(o.backend.or(spec_backend))
        .map_err(|e| EvalError::Setup(e.to_string()))?;
    o.backend = Some(match choice {
        BackendChoice::Auto => match select::select(BackendChoice::Auto) {
            Ok(select::AnyBackend::Gpu(_)) => BackendChoice::Gpu,
            _ => BackendChoice::Cpu,
        },
        c => c,
    });
    let o = &o;
    let mut cells: Vec<(Cell, Purpose)> = Vec::new();
    let mut backend = String::new();
    let total = plans.len();
    for (i, plan) in plans.into_iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let dir = e.output.join(&plan.dir);
        let label = plan
            .attack
            .as_ref()
            .map_or("clean".to_string(), |a| a.label());
        if o.verbose {
            eprintln!(
                "[{}/{total}] {} / {label}{}",
                i + 1,
                plan.defense.name,
                plan.eps.map_or(String::new(), |e| format!(" eps {e}"))
            );
        }
        let transfer = plan.attack.as_ref().is_some_and(|a| a.surrogate.is_some());
        let (failed, seconds, be, frames) = if transfer {
            // Craft on the surrogate, then classify the written files with the target model
            // (and its defense).
            let craft = dir.join("crafted");
            let ps = pipeline_spec(s, &plan, &craft, true, false);
            let (f1, t1, _) = run_cell(&ps, &craft, o, &stop, None)?;
            let crafted = outcomes(&craft, plan.attack.as_ref().map(|a| a.attack.as_str()))?;
            let mut target = plan_without_attack(&plan);
            target.dir = plan.dir.clone();
            let ts = pipeline_spec(s, &target, &dir, false, true);
            let (f2, t2, be) = run_cell(&ts, &dir, o, &stop, Some(craft.clone()))?;
            let mut judged = outcomes(&dir, None)?;
            // Crafted files keep their input's relative name but not its SOP Instance UID:
            // labels and distances come from the crafting run's rows.
            let by_name: BTreeMap<(String, u32), &FrameOutcome> = crafted
                .iter()
                .map(|f| ((f.input.clone(), f.frame), f))
                .collect();
            for f in &mut judged {
                let c = by_name.get(&(f.input.clone(), f.frame));
                f.label = c.and_then(|c| c.label);
                f.linf = c.and_then(|c| c.linf);
                f.l2 = c.and_then(|c| c.l2);
            }
            (f1 + f2, t1 + t2, be, judged)
        } else {
            let ps = pipeline_spec(s, &plan, &dir, false, false);
            let (f, t, be) = run_cell(&ps, &dir, o, &stop, None)?;
            let frames = outcomes(&dir, plan.attack.as_ref().map(|a| a.attack.as_str()))?;
            (f, t, be, frames)
        };
        backend = be;
        cells.push((
            Cell {
                defense: plan.defense.name.clone(),
                attack: label,
                plugin: plan
                    .attack
                    .as_ref()
                    .map_or(String::new(), |a| a.attack.clone()),
                role: plan.attack.as_ref().map(AttackEntry::role),
                eps: plan.eps,
                frames,
                failed,
                seconds,
                dir: plan.dir.clone(),
            },
            plan.purpose.clone(),
        ));
    }
    let clean_of: BTreeMap<String, Cell> = cells
        .iter()
        .filter(|(c, p)| c.role.is_none() && *p == Purpose::Grid)
        .map(|(c, _)| (c.defense.clone(), c.clone()))
        .collect();
    let mut clean = Vec::new();
    let mut table = Vec::new();
    let mut large = Vec::new();
    for (c, purpose) in &cells {
        let st = analysis::stats(c, clean_of.get(&c.defense));
        match purpose {
            Purpose::Grid if c.role.is_none() => clean.push(st),
            Purpose::Grid => table.push(st),
            Purpose::Large => large.push(st),
            Purpose::Detect(_) | Purpose::DetectAdaptive(_) | Purpose::Certify(_) => {}
        }
    }
    let grid: Vec<Cell> = cells
        .iter()
        .filter(|(c, p)| *p == Purpose::Grid && c.role.is_some())
        .map(|(c, _)| c.clone())
        .collect();
    let detection = detection(s, &cells);
    let certification = certification(s, &cells);
    let worst = analysis::worst_case(&grid);
    let checks = analysis::sanity(&table, &large, &s.sanity);
    let norm_comparisons = analysis::norm_comparisons(&table, &s.sanity);
    let card = crate::runtime::card::card_path(&s.model.onnx);
    let model_card = std::fs::read(s.model.card.as_ref().unwrap_or(&card))
        .ok()
        .and_then(|b| serde_yaml::from_slice::<Value>(&b).ok());
    let report = Report {
        name: s.name.clone(),
        tool: concat!("adverse ", env!("CARGO_PKG_VERSION")).to_string(),
        evaluation_file: e.file.display().to_string(),
        spec: s.clone(),
        model_card,
        backend,
        clean,
        cells: table,
        large_eps: large,
        worst_case: worst,
        checks,
        norm_comparisons,
        detection,
        certification,
        runs: cells
            .iter()
            .map(|(c, p)| RunInfo {
                purpose: match p {
                    Purpose::Grid => "grid",
                    Purpose::Large => "large",
                    Purpose::Detect(_) | Purpose::DetectAdaptive(_) => "detect",
                    Purpose::Certify(_) => "certify",
                },
                defense: c.defense.clone(),
                attack: c.attack.clone(),
                eps: c.eps,
                dir: c.dir.clone(),
                failed: c.failed,
            })
            .collect(),
        interrupted: stop.load(Ordering::SeqCst),
        seconds: started.elapsed().as_secs_f64(),
    };
    let json_path = e.output.join("evaluation.json");
    let text = serde_json::to_vec_pretty(&report).map_err(|e| EvalError::Setup(e.to_string()))?;
    std::fs::write(&json_path, text).map_err(io_err(&json_path))?;
    let md_path = e.output.join("evaluation.md");
    std::fs::write(&md_path, markdown(&report)).map_err(io_err(&md_path))?;
    Ok(report)
}

#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    pub detector: String,
    pub attack: String,
    pub eps: Option<f64>,
    /// Whether the attack also targeted the detector (through its squeezers as shadow
    /// purifiers).
    pub adaptive: bool,
    pub auc: Option<f64>,
    pub tpr_at_5_fpr: Option<f64>,
    /// Successful adversarial images scored (positives) and correctly classified clean ones
    /// (negatives).
    pub positives: usize,
    pub negatives: usize,
    pub roc: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Certification {
    pub id: String,
    pub plugin: String,
    /// File name of the smoothed base model.
    pub model: Option<String>,
    pub sigma: Option<f64>,
    pub images: usize,
    pub abstained: usize,
    /// (radius, certified accuracy) from 0 to past the largest certified radius.
    pub curve: Vec<(f64, f64)>,
    /// At the file's `radii`.
    pub at: Vec<(f64, f64)>,
}

fn stage_num(f: &FrameOutcome, stage: &str, key: &str) -> Option<f64> {
    f.stages.get(stage)?.get(key)?.as_f64()
}

fn detection(s: &EvalSpec, cells: &[(Cell, Purpose)]) -> Vec<Detection> {
    let mut out = Vec::new();
    for (k, d) in s.detectors.iter().enumerate() {
        let label = d.label();
        let mine: Vec<&Cell> = cells
            .iter()
            .filter(|(_, p)| *p == Purpose::Detect(k))
            .map(|(c, _)| c)
            .collect();
        let Some(clean) = mine.iter().find(|c| c.role.is_none()) else {
            continue;
        };
        let right: std::collections::BTreeSet<(String, u32)> = clean
            .frames
            .iter()
            .filter(|f| f.label.is_some() && f.label == f.pred)
            .map(|f| (f.input.clone(), f.frame))
            .collect();
        let negatives: Vec<f64> = clean
            .frames
            .iter()
            .filter(|f| right.contains(&(f.input.clone(), f.frame)))
            .filter_map(|f| stage_num(f, &label, &d.score))
            .collect();
        let adaptive: Vec<&Cell> = cells
            .iter()
            .filter(|(_, p)| *p == Purpose::DetectAdaptive(k))
            .map(|(c, _)| c)
            .collect();
        let attacked = mine
            .iter()
            .filter(|c| c.role.is_some())
            .map(|c| (c, false))
            .chain(adaptive.iter().map(|c| (c, true)));
        for (c, adaptive) in attacked {
            let positives: Vec<f64> = c
                .frames
                .iter()
                .filter(|f| {
                    right.contains(&(f.input.clone(), f.frame))
                        && f.label.is_some()
                        && f.pred != f.label
                })
                .filter_map(|f| stage_num(f, &label, &d.score))
                .collect();
            let r = analysis::roc(&negatives, &positives, 0.05);
            out.push(Detection {
                detector: label.clone(),
                attack: c.attack.clone(),
                eps: c.eps,
                adaptive,
                auc: r.auc,
                tpr_at_5_fpr: r.tpr_at_fpr,
                positives: positives.len(),
                negatives: negatives.len(),
                roc: r.points,
            });
        }
    }
    out
}

fn certification(s: &EvalSpec, cells: &[(Cell, Purpose)]) -> Vec<Certification> {
    let mut out = Vec::new();
    for (k, c) in s.certify.iter().enumerate() {
        let Some((cell, _)) = cells.iter().find(|(_, p)| *p == Purpose::Certify(k)) else {
            continue;
        };
        let label = c.id.clone().unwrap_or_else(|| c.plugin.clone());
        let frames: Vec<(Option<u32>, Option<u32>, Option<f64>)> = cell
            .frames
            .iter()
            .map(|f| {
                let class = stage_num(f, &label, &c.class)
                    .filter(|v| *v >= 0.0)
                    .map(|v| v as u32);
                let radius = stage_num(f, &label, &c.radius).filter(|r| *r >= 0.0);
                (f.label, class, radius.filter(|_| class.is_some()))
            })
            .collect();
        let max_r = frames
            .iter()
            .filter_map(|f| f.2)
            .fold(c.radii.iter().copied().fold(0.0, f64::max), f64::max);
        let curve = (0..=100)
            .map(|i| max_r * 1.1 * f64::from(i) / 100.0)
            .filter_map(|r| Some((r, analysis::certified_accuracy(&frames, r)?)))
            .collect();
        out.push(Certification {
            id: c.label(),
            plugin: c.plugin.clone(),
            model: c
                .model
                .as_ref()
                .unwrap_or(&s.model)
                .onnx
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
            sigma: c.params.get("sigma").and_then(Value::as_f64),
            images: frames.iter().filter(|f| f.0.is_some()).count(),
            abstained: frames.iter().filter(|f| f.1.is_none()).count(),
            curve,
            at: c
                .radii
                .iter()
                .filter_map(|&r| Some((r, analysis::certified_accuracy(&frames, r)?)))
                .collect(),
        });
    }
    out
}

fn plan_without_attack(p: &Plan) -> Plan {
    Plan {
        defense: p.defense.clone(),
        attack: None,
        eps: p.eps,
        purpose: p.purpose.clone(),
        extra: p.extra.clone(),
        dir: p.dir.clone(),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

fn num(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

fn fmt_eps(e: f64) -> String {
    if e.fract() == 0.0 {
        format!("{e:.0}")
    } else {
        format!("{e}")
    }
}

/// Markdown tables: accuracy under attack per defense and budget, success and distances, the
/// worst case, and the sanity verdicts. The README's robustness table is this file.
pub fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let unit = &r.spec.unit;
    let _ = writeln!(s, "## Robustness evaluation `{}` ({})\n", r.name, r.backend);
    let linf = |c: &&CellStats| c.role != Some(Role::IterativeL2);
    let mut eps: Vec<f64> = r.cells.iter().filter(linf).filter_map(|c| c.eps).collect();
    eps.sort_by(f64::total_cmp);
    eps.dedup();
    let _ = writeln!(
        s,
        "Accuracy after write-back and re-read (ε in {unit} units; clean = no attack):\n"
    );
    let _ = write!(s, "| defense | attack | clean |");
    for e in &eps {
        let _ = write!(s, " ε={} |", fmt_eps(*e));
    }
    let _ = write!(s, "\n|---|---|---|");
    for _ in &eps {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    let defenses: Vec<&str> = r.clean.iter().map(|c| c.defense.as_str()).collect();
    for d in &defenses {
        let clean = r
            .clean
            .iter()
            .find(|c| c.defense == *d)
            .and_then(|c| c.accuracy);
        let mut attacks: Vec<&str> = Vec::new();
        for c in r
            .cells
            .iter()
            .filter(linf)
            .filter(|c| c.defense == *d && c.eps.is_some())
        {
            if !attacks.contains(&c.attack.as_str()) {
                attacks.push(&c.attack);
            }
        }
        for a in attacks {
            let _ = write!(s, "| {d} | {a} | {} |", pct(clean));
            for e in &eps {
                let v = r
                    .cells
                    .iter()
                    .find(|c| c.defense == *d && c.attack == a && c.eps == Some(*e))
                    .and_then(|c| c.accuracy);
                let _ = write!(s, " {} |", pct(v));
            }
            s.push('\n');
        }
        let _ = write!(s, "| {d} | **worst case** | {} |", pct(clean));
        for e in &eps {
            let v = r
                .worst_case
                .iter()
                .find(|w| w.defense == *d && w.eps == *e)
                .and_then(|w| w.accuracy);
            let _ = write!(s, " **{}** |", pct(v));
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\nSuccess rate (fooled / correctly classified before the attack) and mean distances of \
         the successful perturbations (stored units):\n"
    );
    let _ = writeln!(
        s,
        "| defense | attack | role | ε | success | mean L∞ | mean L2 | seconds |\n|---|---|---|---|---|---|---|---|"
    );
    for c in r.cells.iter().chain(&r.large_eps) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} ({}/{}) | {} | {} | {:.1} |",
            c.defense,
            c.attack,
            c.role.map_or("-", |r| r.key()),
            c.eps.map_or("min-norm".into(), fmt_eps),
            pct(c.success_rate),
            c.fooled,
            c.clean_correct,
            num(c.mean_linf),
            num(c.mean_l2),
            c.seconds
        );
    }
    if !r.norm_comparisons.is_empty() {
        let _ = writeln!(
            s,
            "\nMinimum-norm attacks against an L2-budgeted attack at equal success (the smallest \
             L2 budget of the grid whose success reaches the minimum-norm attack's, within one \
             image; mean L2 of the successful perturbations, stored units):\n\n| defense | \
             minimum-norm | success | mean L2 | budgeted | ε (L2) | success | mean L2 |\n\
             |---|---|---|---|---|---|---|---|"
        );
        for c in &r.norm_comparisons {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                c.defense,
                c.minimal,
                pct(c.minimal_success),
                num(c.minimal_mean_l2),
                c.budgeted,
                c.eps
                    .map_or(format!("> {}", fmt_eps(c.largest_eps)), fmt_eps),
                pct(c.budgeted_success),
                num(c.budgeted_mean_l2)
            );
        }
    }
    if !r.detection.is_empty() {
        let _ = writeln!(
            s,
            "\nDetectors (negatives: correctly classified clean images; positives: successful \
             adversarial ones; adaptive: the attack also fools the model through each of the \
             detector's squeezers and, where a squeezer has a `score_weight`, descends the \
             detector's score):\n\n| detector | attack | ε | adaptive | AUC | TPR at 5% FPR | positives | negatives |\n|---|---|---|---|---|---|---|---|"
        );
        for d in &r.detection {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                d.detector,
                d.attack,
                d.eps.map_or("-".into(), fmt_eps),
                if d.adaptive { "yes" } else { "no" },
                num(d.auc),
                pct(d.tpr_at_5_fpr),
                d.positives,
                d.negatives
            );
        }
    }
    if !r.certification.is_empty() {
        let _ = writeln!(
            s,
            "\nCertified accuracy (randomized smoothing; radius in model-input units):\n"
        );
        for c in &r.certification {
            let _ = write!(
                s,
                "| {} (σ = {}, base model {}) | images | abstained |",
                c.id,
                num(c.sigma),
                c.model.as_deref().unwrap_or("-")
            );
            for (radius, _) in &c.at {
                let _ = write!(s, " r = {radius} |");
            }
            let _ = write!(s, "\n|---|---|---|");
            for _ in &c.at {
                let _ = write!(s, "---|");
            }
            let _ = write!(s, "\n| | {} | {} |", c.images, c.abstained);
            for (_, a) in &c.at {
                let _ = write!(s, " {} |", pct(Some(*a)));
            }
            s.push('\n');
        }
    }
    let _ = writeln!(
        s,
        "\nSanity checks (Carlini et al. 2019):\n\n| defense | check | verdict | detail |\n|---|---|---|---|"
    );
    for c in &r.checks {
        let v = match c.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "**FAIL**",
            Verdict::NotApplicable => "n/a",
        };
        let _ = writeln!(s, "| {} | {} | {v} | {} |", c.defense, c.check, c.detail);
    }
    s
}
