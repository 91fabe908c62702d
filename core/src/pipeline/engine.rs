//! The streaming engine behind `adverse run`.
//!
//! ```text
//! discovery ──paths──▶ decode workers ──instances──▶ compute (owns the backend, batches
//!   (walk, or any         (read, hash,                 equal-geometry frames, runs the model
//!    input stream)         resume check, decode)       and every stage) ──▶ write workers
//!                                │                           ▲              (derived DICOM,
//!                                │ failed / skipped          │ re-read       re-read check,
//!                                ▼                           │ frames        metrics, previews)
//!                         result + audit writer ◀────────────┴──────────────────────┘
//! ```
//! Every arrow is a bounded crossbeam channel except the re-verification path back into the
//! compute stage: its items are already counted against the bounded channels before it (an
//! instance is in at most one place), so it cannot grow without bound, and making it unbounded
//! removes the one cycle that could deadlock. Memory is therefore bounded by the channel
//! capacities times the largest decodable instance ([`DecodeLimits`]), whatever the archive size.
//!
//! Results: the row of an instance is appended to `results.jsonl` before its audit record, and
//! the audit record is what a resumed run trusts; so a kill between the two only means the
//! instance is redone, and compaction at the end keeps its newest row.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::config::{Pipeline, StageRole};
use super::labels::Labels;
use super::metrics::{FrameMetrics, frame_metrics};
use super::preview::write_preview;
use super::results::{Totals, compact};
use crate::audit::{AuditLog, GroupCommit, Record};
use crate::dicom::{DecodeLimits, DecodedImage, DerivedOptions, DicomFile, write_derived_sync};
use crate::plugin::bpda::{Bpda, DetectorScore};
use crate::plugin::host::{BatchInput, BatchModel, Instance, PluginBackend};
use crate::plugin::loader::Pins;
use crate::plugin::runner::{
    ModelCache, ModelService, RunModel, batch_seed, frame_meta, to_interleaved, to_planar,
};
use crate::plugin::{Kind, PluginHandle, Registry, SearchPath};
use crate::runtime::card::ModelCard;
use crate::runtime::select::{self, BackendChoice};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Setup(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("internal error in the {0} stage (a bug; the run stopped, finished work is kept)")]
    Panic(&'static str),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One input handed to the engine by an outside [`RunOptions::source`] (watch mode): the file to
/// read and the name it is recorded and written under (relative to the output folder).
#[derive(Debug, Clone)]
pub struct Job {
    pub path: PathBuf,
    pub rel: String,
}

/// How one input ended, sent on [`RunOptions::completions`] only once its audit record is
/// synced to disk: the caller may then delete or move the input without losing the evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub rel: String,
    pub outcome: Completed,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Completed {
    /// Processed; `output` is the written derived file (relative to the output folder), if the
    /// stages changed the image. `flagged`: a detector flagged at least one frame; `scores`
    /// holds the detectors' per-frame values.
    Ok {
        output: Option<String>,
        flagged: bool,
        scores: Value,
    },
    /// Done by an earlier run with the same processing identity (nothing new was written).
    Skipped,
    Failed {
        stage: String,
        plugin: Option<String>,
        error: String,
    },
}

/// Command-line overrides of the pipeline file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub input: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub backend: Option<BackendChoice>,
    pub jobs: Option<usize>,
    /// Redo instances a previous run already finished.
    pub force: bool,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Take inputs from this channel instead of walking the input folder; the run ends when
    /// every sender is dropped and the work in flight is finished.
    pub source: Option<Receiver<Job>>,
    /// Where each input's [`Completion`] goes, after its audit record is durable.
    pub completions: Option<Sender<Completion>>,
    /// Instance name of a watcher: its audit log is `<output>/audit/<name>.jsonl` and its
    /// results `<output>/results/<name>.{jsonl,csv,summary.json}`, so several watchers can
    /// share one output folder (the audit log is locked by its writer). Temporary files are
    /// then removed at start only when older than [`STALE_TEMP_AGE`]: a younger one may be a
    /// neighbour's write in progress.
    pub instance: Option<String>,
}

/// Age after which a temporary output file is certainly abandoned (no write takes that long).
pub const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// What a run did (this run's work; `totals` cover the whole output folder after compaction).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub pipeline: String,
    pub backend: String,
    pub processed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub frames: usize,
    pub seconds: f64,
    pub files_per_second: f64,
    pub frames_per_second: f64,
    pub peak_rss_bytes: Option<u64>,
    pub interrupted: bool,
    /// Hash of the audit log's last record: keep it elsewhere to detect a log rewritten or cut
    /// short as a whole (`adverse audit verify` prints the head it finds).
    pub audit_head: String,
    pub audit_records: u64,
    pub totals: Totals,
    /// Failed inputs of this run with their reasons (at most 100 listed).
    pub failures: Vec<(String, String)>,
}

/// One stage, loaded.
struct Stage {
    label: String,
    role: StageRole,
    handle: Arc<PluginHandle>,
    params: Value,
    /// A purifier that earlier attack stages see (BPDA).
    adaptive: bool,
    /// Draws averaged per attack model call through this purifier (EOT); 1 without.
    eot: u32,
    /// Runs only inside earlier attacks (an ensemble member), never on the output.
    shadow: bool,
    /// Shadow only: weight of this squeezer's disagreement in the attack's loss.
    score_weight: f32,
}

/// Everything fixed before the first file is read.
struct Setup {
    input: PathBuf,
    output: PathBuf,
    model: Option<RunModel>,
    stages: Vec<Stage>,
    labels: Labels,
    pipeline_id: String,
    batch_size: usize,
    seed: u64,
    jobs: usize,
    run_info: Value,
}

struct Decoded {
    rel: String,
    input_sha: String,
    src: DicomFile,
    orig: DecodedImage,
    label: Option<u32>,
    decode_ms: f64,
}

/// Frames batch together only with frames of the same samples per pixel, rows and columns.
type GroupKey = (u16, u32, u32);

impl Decoded {
    fn group_key(&self) -> GroupKey {
        let m = &self.orig.meta;
        (m.samples_per_pixel, m.rows, m.cols)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
struct StageFrame {
    #[serde(skip_serializing_if = "Option::is_none")]
    pred: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conf: Option<f32>,
    #[serde(flatten)]
    values: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default)]
struct FrameResult {
    before: Option<(u32, f32)>,
    stages: Vec<StageFrame>,
    written: Option<(u32, f32)>,
    metrics: Option<FrameMetrics>,
    model_note: Option<String>,
}

/// An instance on its way through compute, write and re-verification.
struct Work {
    d: Decoded,
    image: DecodedImage,
    frames: Vec<FrameResult>,
    changed: bool,
    compute_ms: f64,
    write_ms: f64,
    output: Option<(String, String, String)>,
    reread: Option<DecodedImage>,
}

enum Outcome {
    /// Done before (same input bytes, same processing identity, outputs present).
    Skipped(String),
    Failed {
        rel: String,
        input_sha: Option<String>,
        sop_in: Option<String>,
        stage: &'static str,
        /// The stage label when a plugin failed.
        plugin: Option<String>,
        error: String,
    },
    Done(Box<Work>),
}

/// Peak resident set size of this process (Linux), for the summary and benchmarks.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn prepare(p: &Pipeline, o: &RunOptions) -> Result<Setup, EngineError> {
    let setup = |m: String| EngineError::Setup(m);
    let input = o.input.clone().unwrap_or_else(|| p.input.clone());
    if !input.exists() {
        return Err(setup(format!("input {} does not exist", input.display())));
    }
    let output = o.output.clone().unwrap_or_else(|| p.output.clone());
    let (model, model_sha) = match (&p.model, &p.card) {
        (Some(m), Some(c)) => {
            let bytes = std::fs::read(m).map_err(io_err(m))?;
            let graph = crate::runtime::onnx::load(m).map_err(|e| setup(e.to_string()))?;
            let card = ModelCard::load(c).map_err(|e| setup(e.to_string()))?;
            let logits_output = card
                .logits_index(&graph)
                .map_err(|e| setup(e.to_string()))?;
            (
                Some(RunModel {
                    graph,
                    card,
                    logits_output,
                }),
                Some(sha256_hex(&bytes)),
            )
        }
        _ => (None, None),
    };
    let search = SearchPath::new(&p.plugin_dirs, &[], true).map_err(|e| setup(e.to_string()))?;
    let registry = Registry::discover(&search).map_err(|e| setup(e.to_string()))?;
    let pins = Pins::parse(&p.pins).map_err(|e| setup(e.to_string()))?;
    let mut stages = Vec::new();
    for (i, s) in p.spec.stages.iter().enumerate() {
        let (role, name) = s.role().map_err(|m| setup(format!("stages[{i}]: {m}")))?;
        let handle = registry
            .get(name, &pins)
            .map_err(|e| setup(format!("stages[{i}]: {e}")))?;
        let want = match role {
            StageRole::Attack => Some(Kind::Attack),
            StageRole::Purifier => Some(Kind::Purifier),
            StageRole::Detector => Some(Kind::Detector),
            StageRole::Other => None,
        };
        if want.is_some_and(|k| k != handle.kind) {
            return Err(setup(format!(
                "stages[{i}]: `{name}` is a {} plugin, not a {}",
                handle.kind,
                role.key()
            )));
        }
        handle
            .validate_params(&s.params)
            .map_err(|e| setup(format!("stages[{i}]: {e}")))?;
        stages.push(Stage {
            label: s.label(),
            role,
            handle,
            params: s.params.clone(),
            adaptive: s.adaptive,
            eot: s.eot.unwrap_or(1),
            shadow: s.shadow,
            score_weight: s.score_weight.unwrap_or(0.0),
        });
    }
    if stages
        .iter()
        .any(|s| s.role == StageRole::Attack || s.role == StageRole::Detector)
        && model.is_none()
    {
        return Err(setup(
            "attack and detector stages need a model: add `model: { onnx: ... }`".into(),
        ));
    }
    let lspec = p.spec.labels.clone().unwrap_or(super::config::LabelsSpec {
        csv: None,
        all: None,
        target: None,
    });
    let labels = Labels::new(p.labels_csv.as_deref(), lspec.all, lspec.target)
        .map_err(|e| setup(e.to_string()))?;
    // Identity of the processing, for derived UIDs: the same stages, parameters and model give
    // the same UIDs on every run, whatever else changes in the pipeline file.
    let identity = json!({
        "name": p.spec.name,
        "stages": stages.iter().map(|s| if s.shadow && s.score_weight > 0.0 {
            json!([s.handle.name, s.handle.version, s.params, "shadow", {"score_weight": s.score_weight}])
        } else if s.shadow {
            json!([s.handle.name, s.handle.version, s.params, "shadow"])
        } else if s.adaptive && s.eot > 1 {
            json!([s.handle.name, s.handle.version, s.params, "adaptive", {"eot": s.eot}])
        } else if s.adaptive && s.score_weight > 0.0 {
            json!([s.handle.name, s.handle.version, s.params, "adaptive", {"score_weight": s.score_weight}])
        } else if s.adaptive {
            json!([s.handle.name, s.handle.version, s.params, "adaptive"])
        } else {
            json!([s.handle.name, s.handle.version, s.params])
        }).collect::<Vec<_>>(),
        "model": model_sha,
    });
    let pipeline_id = sha256_hex(identity.to_string().as_bytes());
    let jobs = o
        .jobs
        .or(p.spec.run.jobs)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .clamp(1, 64);
    let run_info = json!({
        "tool": concat!("adverse ", env!("CARGO_PKG_VERSION")),
        "pipeline": p.spec.name,
        "pipeline_sha256": p.sha256,
        "model": p.model.as_ref().map(|m| m.display().to_string()),
        "model_sha256": model_sha,
        "stages": stages.iter().map(|s| json!({
            "stage": s.label, "role": s.role.key(), "plugin": s.handle.name,
            "version": s.handle.version, "library_sha256": s.handle.library.sha256,
            "params": s.params,
        })).collect::<Vec<_>>(),
    });
    Ok(Setup {
        input,
        output,
        model,
        stages,
        labels,
        pipeline_id,
        batch_size: p.spec.run.batch_size.unwrap_or(8).clamp(1, 4096),
        seed: p.spec.run.seed.unwrap_or(0),
        jobs,
        run_info,
    })
}

/// Files under `root` that match the input filters, in a stable order, sent as they are found.
/// The output folder (and any `.adverse` folder) is never an input.
fn discover(
    root: &Path,
    recursive: bool,
    include: &globset::GlobSet,
    exclude: &globset::GlobSet,
    skip: &[PathBuf],
    tx: &Sender<PathBuf>,
    stop: &AtomicBool,
    errors: &Sender<Outcome>,
) {
    if root.is_file() {
        let _ = tx.send(root.to_path_buf());
        return;
    }
    let walk = walkdir::WalkDir::new(root)
        .max_depth(if recursive { usize::MAX } else { 1 })
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let name = e.file_name().to_string_lossy();
            let hidden_dir = e.depth() > 0 && e.file_type().is_dir() && name.starts_with('.');
            !hidden_dir && !skip.iter().any(|s| e.path() == s)
        });
    for entry in walk {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match entry {
            Err(e) => {
                let rel = e
                    .path()
                    .map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string())
                    .unwrap_or_default();
                let _ = errors.send(Outcome::Failed {
                    rel,
                    input_sha: None,
                    sop_in: None,
                    stage: "discover",
                    plugin: None,
                    error: e.to_string(),
                });
            }
            Ok(e) if e.file_type().is_file() => {
                let rel = e.path().strip_prefix(root).unwrap_or(e.path());
                let name = e.file_name().to_string_lossy();
                if name.starts_with('.') {
                    continue;
                }
                if !include.is_empty() && !include.is_match(rel) && !include.is_match(&*name) {
                    continue;
                }
                if exclude.is_match(rel) || exclude.is_match(&*name) {
                    continue;
                }
                if tx.send(e.path().to_path_buf()).is_err() {
                    return;
                }
            }
            Ok(_) => {}
        }
    }
}

fn globs(patterns: &[String]) -> Result<globset::GlobSet, EngineError> {
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns {
        b.add(
            globset::Glob::new(p)
                .map_err(|e| EngineError::Setup(format!("input pattern `{p}`: {e}")))?,
        );
    }
    b.build()
        .map_err(|e| EngineError::Setup(format!("input patterns: {e}")))
}

/// Instances a previous run finished: input (relative path) -> (input SHA-256, outputs).
/// Only records of the same processing identity count: re-running with other stages,
/// parameters or model into the same folder redoes every instance.
fn finished(records: &[Record], pipeline_id: &str) -> HashMap<String, (String, Vec<String>)> {
    let mut m = HashMap::new();
    for r in records {
        if r.kind != "instance" {
            continue;
        }
        let b = &r.body;
        let get = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_string);
        if get("pipeline_id").as_deref() != Some(pipeline_id) {
            continue;
        }
        let (Some(input), Some(sha)) = (get("input"), get("input_sha256")) else {
            continue;
        };
        if get("outcome").as_deref() == Some("ok") {
            let outs = get("output").into_iter().collect();
            m.insert(input, (sha, outs));
        } else {
            m.remove(&input);
        }
    }
    m
}

/// Removes temporary files a killed run left in the output folder (never complete outputs:
/// those are renamed into place atomically).
fn remove_stale_temps(dir: &Path, min_age: Option<std::time::Duration>) {
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        let n = e.file_name().to_string_lossy();
        if e.file_type().is_file() && n.starts_with(".adverse-") && n.ends_with(".tmp") {
            let old_enough = min_age.is_none_or(|age| {
                e.metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|el| el >= age)
            });
            if old_enough {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn rel_string(root: &Path, path: &Path) -> String {
    if root.is_file() {
        return path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Runs the pipeline. Per-file problems are rows and audit records, not errors; an error here
/// means nothing (more) could be processed.
pub fn run(p: &Pipeline, o: &RunOptions, stop: Arc<AtomicBool>) -> Result<Summary, EngineError> {
    let started = Instant::now();
    let setup = prepare(p, o)?;
    std::fs::create_dir_all(&setup.output).map_err(io_err(&setup.output))?;
    remove_stale_temps(&setup.output, o.instance.as_ref().map(|_| STALE_TEMP_AGE));
    let audit_path = if let Some(id) = &o.instance {
        setup.output.join("audit").join(format!("{id}.jsonl"))
    } else if o.output.is_some() && p.spec.output.audit.is_none() {
        setup.output.join("audit.jsonl")
    } else {
        p.audit.clone()
    };
    let (results_path, csv_path, summary_path) = match &o.instance {
        Some(id) => {
            let dir = setup.output.join("results");
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            (
                dir.join(format!("{id}.jsonl")),
                dir.join(format!("{id}.csv")),
                dir.join(format!("{id}.summary.json")),
            )
        }
        None => (
            setup.output.join("results.jsonl"),
            setup.output.join("results.csv"),
            setup.output.join("summary.json"),
        ),
    };
    if let Some(parent) = audit_path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let (mut audit, records) = AuditLog::open(&audit_path, GroupCommit::default())?;
    let done_before = if o.force {
        HashMap::new()
    } else {
        finished(&records, &setup.pipeline_id)
    };
    drop(records);
    let backend = select::select(
        select::resolve_choice(o.backend.or(p.backend))
            .map_err(|e| EngineError::Setup(e.to_string()))?,
    )
    .map_err(|e| EngineError::Setup(e.to_string()))?;
    let backend_name = backend.describe();
    let mut start = Map::new();
    start.insert("run".into(), setup.run_info.clone());
    start.insert("backend".into(), json!(backend_name));
    start.insert("input".into(), json!(setup.input.display().to_string()));
    start.insert("output".into(), json!(setup.output.display().to_string()));
    start.insert("force".into(), json!(o.force));
    audit.append("run_start", start)?;
    audit.sync()?;

    let include = globs(&p.spec.input.include)?;
    let exclude = globs(&p.spec.input.exclude)?;
    let mut results = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&results_path)
        .map_err(io_err(&results_path))?;
    // A killed run may have left a torn last row; start ours on a fresh line.
    if results.metadata().map(|m| m.len() > 0).unwrap_or(false) {
        results.write_all(b"\n").map_err(io_err(&results_path))?;
    }

    let cap = setup.jobs * 2;
    let (tx_path, rx_path) = channel::bounded::<(u64, Job)>(1024);
    let (tx_dec, rx_dec) = channel::bounded::<(u64, Option<Decoded>)>(cap.max(setup.batch_size));
    // Batch runs form batches in input order (see `Reorder`); a window of tokens bounds how far
    // decoding may run ahead of the oldest file not yet batched. A watch source is unordered.
    let ordered = o.source.is_none();
    let window = 2 * setup.batch_size + 2 * setup.jobs;
    let (tx_token, rx_token) = channel::bounded::<()>(window);
    for _ in 0..window {
        let _ = tx_token.try_send(());
    }
    // The compute stage holds the only sender: when it ends, discovery stops waiting.
    let mut tx_token = Some(tx_token);
    let (tx_write, rx_write) = channel::bounded::<Box<Work>>(cap);
    let (tx_verify, rx_verify) = channel::unbounded::<Box<Work>>();
    let (tx_out, rx_out) = channel::bounded::<Outcome>(1024);
    let found = AtomicUsize::new(0);
    let limits = DecodeLimits::default();
    let panicked: std::sync::Mutex<Option<&'static str>> = std::sync::Mutex::new(None);
    let guard = |name: &'static str, f: &mut dyn FnMut()| {
        if catch_unwind(AssertUnwindSafe(&mut *f)).is_err() {
            stop.store(true, Ordering::SeqCst);
            if let Ok(mut g) = panicked.lock() {
                g.get_or_insert(name);
            }
        }
    };
    let progress = o.progress.then(|| {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} files  {per_sec}  ETA {eta}  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });

    let mut summary = Summary {
        pipeline: p.spec.name.clone(),
        backend: backend_name.clone(),
        processed: 0,
        failed: 0,
        skipped: 0,
        frames: 0,
        seconds: 0.0,
        files_per_second: 0.0,
        frames_per_second: 0.0,
        peak_rss_bytes: None,
        interrupted: false,
        audit_head: String::new(),
        audit_records: 0,
        totals: Totals::default(),
        failures: Vec::new(),
    };
    let mut audit_error: Option<EngineError> = None;

    std::thread::scope(|s| {
        // Discovery.
        {
            let tx_out = tx_out.clone();
            let (input, output, skip_audit) = (&setup.input, &setup.output, audit_path.clone());
            let (include, exclude, found, stop) = (&include, &exclude, &found, &stop);
            let progress = progress.clone();
            let guard = &guard;
            let source = o.source.clone();
            s.spawn(move || {
                guard("discovery", &mut || {
                    if let Some(source) = &source {
                        for (seq, job) in (0u64..).zip(source.iter()) {
                            found.fetch_add(1, Ordering::Relaxed);
                            if tx_path.send((seq, job)).is_err() {
                                break;
                            }
                        }
                        return;
                    }
                    let (tx2, rx2) = channel::bounded::<PathBuf>(64);
                    std::thread::scope(|s2| {
                        s2.spawn(|| {
                            discover(
                                input,
                                p.spec.input.recursive,
                                include,
                                exclude,
                                &[output.clone(), skip_audit.clone()],
                                &tx2,
                                stop,
                                &tx_out,
                            );
                            drop(tx2);
                        });
                        for (seq, path) in (0u64..).zip(rx2.iter()) {
                            found.fetch_add(1, Ordering::Relaxed);
                            if let Some(pb) = &progress {
                                pb.inc_length(1);
                            }
                            let rel = rel_string(input, &path);
                            // Wait until the file `window` places earlier has been batched
                            // (polling the stop flag: a stopped run drains nothing more).
                            let token = loop {
                                match rx_token.recv_timeout(Duration::from_millis(50)) {
                                    Ok(()) => break true,
                                    Err(channel::RecvTimeoutError::Timeout)
                                        if !stop.load(Ordering::Relaxed) => {}
                                    Err(_) => break false,
                                }
                            };
                            if !token || tx_path.send((seq, Job { path, rel })).is_err() {
                                break;
                            }
                        }
                    });
                });
            });
        }
        // Decode workers.
        for _ in 0..setup.jobs {
            let (rx_path, tx_dec, tx_out) = (rx_path.clone(), tx_dec.clone(), tx_out.clone());
            let (setup, limits, stop, done_before) = (&setup, &limits, &stop, &done_before);
            let guard = &guard;
            s.spawn(move || {
                guard("decode", &mut || {
                    for (seq, job) in rx_path.iter() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let out = decode_one(&job.path, &job.rel, setup, limits, done_before);
                        // A file that ends here (failed, done before) still takes its place in
                        // the order, as a hole.
                        let sent = match out {
                            Ok(d) => tx_dec.send((seq, Some(d))).is_ok(),
                            Err(o) => tx_out.send(o).is_ok() && tx_dec.send((seq, None)).is_ok(),
                        };
                        if !sent {
                            break;
                        }
                    }
                });
            });
        }
        drop(rx_path);
        drop(tx_dec);
        // Write workers.
        for _ in 0..setup.jobs {
            let (rx_write, tx_verify, tx_out) =
                (rx_write.clone(), tx_verify.clone(), tx_out.clone());
            let setup = &setup;
            let previews = p.spec.output.previews;
            let dicom = p.spec.output.dicom;
            let fsync = p.spec.output.fsync;
            let guard = &guard;
            s.spawn(move || {
                guard("write", &mut || {
                    for w in rx_write.iter() {
                        match write_one(w, setup, dicom, previews, fsync) {
                            Ok(w) if w.reread.is_some() && setup.model.is_some() => {
                                let _ = tx_verify.send(w);
                            }
                            Ok(w) => {
                                let _ = tx_out.send(Outcome::Done(w));
                            }
                            Err(o) => {
                                let _ = tx_out.send(o);
                            }
                        }
                    }
                });
            });
        }
        drop(rx_write);
        drop(tx_verify);
        // Result + audit writer.
        {
            let tx_done = &mut summary;
            let audit = &mut audit;
            let results = &mut results;
            let run_info = &setup.run_info;
            let (backend_name, progress, audit_error) =
                (&backend_name, progress.clone(), &mut audit_error);
            let setup = &setup;
            let guard = &guard;
            let completions = o.completions.clone();
            let results_path = &results_path;
            s.spawn(move || {
                guard("results", &mut || {
                    // Completions wait for the audit sync; one sync covers every record that
                    // arrived together (at most 64), so a burst costs one fsync, not one each.
                    let mut pending: Vec<Completion> = Vec::new();
                    for o in rx_out.iter() {
                        match record(
                            o,
                            setup,
                            run_info,
                            backend_name,
                            audit,
                            results,
                            results_path,
                            tx_done,
                        ) {
                            Ok(c) => pending.extend(c),
                            Err(e) => {
                                audit_error.get_or_insert(e);
                            }
                        }
                        if let Some(tx) = &completions
                            && !pending.is_empty()
                            && (rx_out.is_empty() || pending.len() >= 64)
                        {
                            match audit.sync() {
                                Ok(()) => {
                                    for c in pending.drain(..) {
                                        let _ = tx.send(c);
                                    }
                                }
                                Err(e) => {
                                    // Not durable: the inputs stay claimed and are redone
                                    // by the next start (which skips what did reach disk).
                                    pending.clear();
                                    audit_error.get_or_insert(e.into());
                                }
                            }
                        }
                        if let Some(pb) = &progress {
                            pb.set_position(
                                (tx_done.processed + tx_done.failed + tx_done.skipped) as u64,
                            );
                            pb.set_message(format!("{} failed", tx_done.failed));
                        }
                    }
                });
            });
        }
        // Compute on this thread: it owns the backend and the plugin instances.
        let tx_out_c = tx_out.clone();
        drop(tx_out);
        // The compute stage holds the only sender to the writers, so they finish when it does.
        let mut tx_write = Some(tx_write);
        let mut compute = || {
            if let Some(tx) = tx_write.take() {
                let order = Reorder {
                    ordered,
                    next: 0,
                    held: BTreeMap::new(),
                    tokens: tx_token.take().unwrap_or_else(|| channel::bounded(1).0),
                };
                crate::with_backend!(&backend, |b| compute_loop(
                    b, &setup, &rx_dec, order, tx, &rx_verify, &tx_out_c
                ))
            }
        };
        guard("compute", &mut compute);
        drop(tx_write);
        // Whatever is left (on a panic) must not block the other stages.
        for w in rx_verify.iter() {
            let _ = tx_out_c.send(Outcome::Done(w));
        }
        drop(tx_out_c);
    });
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    let interrupted = stop.load(Ordering::SeqCst);
    let mut end = Map::new();
    end.insert("processed".into(), json!(summary.processed));
    end.insert("failed".into(), json!(summary.failed));
    end.insert("skipped".into(), json!(summary.skipped));
    end.insert("discovered".into(), json!(found.load(Ordering::Relaxed)));
    end.insert("interrupted".into(), json!(interrupted));
    audit.append("run_end", end)?;
    audit.sync()?;
    (summary.audit_records, summary.audit_head) = audit.head();
    if let Some(name) = panicked.lock().ok().and_then(|g| *g) {
        return Err(EngineError::Panic(name));
    }
    if let Some(e) = audit_error {
        return Err(e);
    }
    drop(results);
    summary.totals = compact(&results_path, &csv_path).map_err(io_err(&results_path))?;
    let secs = started.elapsed().as_secs_f64();
    summary.seconds = secs;
    summary.files_per_second = (summary.processed + summary.failed) as f64 / secs.max(1e-9);
    summary.frames_per_second = summary.frames as f64 / secs.max(1e-9);
    summary.peak_rss_bytes = peak_rss_bytes();
    summary.interrupted = interrupted;
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    std::fs::write(&summary_path, text + "\n").map_err(io_err(&summary_path))?;
    Ok(summary)
}

// The error is the file's failed outcome, built once per failure and moved on as is.
#[allow(clippy::result_large_err)]
fn decode_one(
    path: &Path,
    rel: &str,
    setup: &Setup,
    limits: &DecodeLimits,
    done_before: &HashMap<String, (String, Vec<String>)>,
) -> Result<Decoded, Outcome> {
    let t = Instant::now();
    let fail = |stage, error: String, sha: Option<String>| Outcome::Failed {
        rel: rel.to_string(),
        input_sha: sha,
        sop_in: None,
        stage,
        plugin: None,
        error,
    };
    let bytes = match std::fs::metadata(path) {
        Ok(m) if m.len() > limits.max_file_bytes => {
            return Err(fail(
                "read",
                format!(
                    "{}: {} bytes, over the {} byte limit",
                    path.display(),
                    m.len(),
                    limits.max_file_bytes
                ),
                None,
            ));
        }
        Ok(_) => std::fs::read(path)
            .map_err(|e| fail("read", format!("{}: {e}", path.display()), None))?,
        Err(e) => return Err(fail("read", format!("{}: {e}", path.display()), None)),
    };
    let sha = sha256_hex(&bytes);
    if let Some((prev_sha, outs)) = done_before.get(rel)
        && *prev_sha == sha
        && outs.iter().all(|o| setup.output.join(o).is_file())
    {
        return Err(Outcome::Skipped(rel.to_string()));
    }
    let parsed = DicomFile::from_bytes(path, &bytes).and_then(|f| {
        let img = f.decode(limits)?;
        Ok((f, img))
    });
    drop(bytes);
    match parsed {
        Err(e) => Err(fail("decode", e.to_string(), Some(sha))),
        Ok((src, orig)) => {
            let label = setup
                .labels
                .lookup(path, orig.meta.sop_instance_uid.as_deref());
            Ok(Decoded {
                rel: rel.to_string(),
                input_sha: sha,
                src,
                orig,
                label,
                decode_ms: t.elapsed().as_secs_f64() * 1e3,
            })
        }
    }
}

/// Softmax top-1 of each row of `[n, k]` logits.
fn top1(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let k = logits.len() / n.max(1);
    (0..n)
        .map(|i| {
            let row = &logits[i * k..(i + 1) * k];
            let (arg, max) =
                row.iter()
                    .enumerate()
                    .fold((0usize, f32::NEG_INFINITY), |a, (j, &v)| {
                        if v > a.1 { (j, v) } else { a }
                    });
            let z: f32 = row.iter().map(|v| (v - max).exp()).sum();
            (arg as u32, 1.0 / z)
        })
        .collect()
}

/// Puts decoded files back in input order before they are batched.
///
/// Random draws (PGD's random start, a noise purifier, smoothing) are keyed by the batch seed,
/// which depends on the batch's index and members. Batching files as decode workers happen to
/// finish them made a run's outputs differ from run to run; batching in input order, and only
/// full batches until the input ends, makes the same pipeline, seed and input give the same
/// files on every run. A watch source has no fixed order and keeps the arrival-order batching
/// (with partial batches flushed when the input idles, for latency).
struct Reorder {
    ordered: bool,
    next: u64,
    held: BTreeMap<u64, Option<Decoded>>,
    /// One token back to discovery per file taken off the front of the order.
    tokens: Sender<()>,
}

impl Reorder {
    /// The files that are now next in order (all of them, unordered).
    fn push(&mut self, seq: u64, d: Option<Decoded>) -> Vec<Decoded> {
        if !self.ordered {
            return d.into_iter().collect();
        }
        self.held.insert(seq, d);
        let mut out = Vec::new();
        while let Some(d) = self.held.remove(&self.next) {
            self.next += 1;
            let _ = self.tokens.try_send(());
            out.extend(d);
        }
        out
    }

    /// What is left when the input ends (only after a stop can there be gaps), in order.
    fn drain(&mut self) -> Vec<Decoded> {
        std::mem::take(&mut self.held)
            .into_values()
            .flatten()
            .collect()
    }
}

fn compute_loop<B: PluginBackend>(
    b: &B,
    setup: &Setup,
    rx_dec: &Receiver<(u64, Option<Decoded>)>,
    mut order: Reorder,
    tx_write: Sender<Box<Work>>,
    rx_verify: &Receiver<Box<Work>>,
    tx_out: &Sender<Outcome>,
) {
    let mut cache = setup.model.as_ref().map(ModelCache::new);
    // Instances are created lazily: a plugin whose create fails fails every instance, with
    // its reason, instead of the run.
    let mut instances: Vec<Result<Instance, String>> = setup
        .stages
        .iter()
        .map(|st| Instance::create(st.handle.clone(), &st.params, b).map_err(|e| e.to_string()))
        .collect();
    let mut batch_index = 0u64;
    // Per group: its frame count (a multi-frame instance counts each frame) and its instances.
    let mut pending: BTreeMap<GroupKey, (usize, Vec<Decoded>)> = BTreeMap::new();
    let mut input_open = true;
    let mut tx_write = Some(tx_write);
    loop {
        // Re-verification first: it finishes instances and frees memory.
        while let Ok(w) = rx_verify.try_recv() {
            let w = verify_one(b, &mut cache, w);
            let _ = tx_out.send(Outcome::Done(w));
        }
        if input_open {
            // In input order, only full batches run before the input ends: never wait-and-flush.
            let got = if pending.is_empty() || order.ordered {
                channel::select! {
                    recv(rx_dec) -> d => d.ok().map(Some).unwrap_or(None).map_or(Err(()), |d| Ok(Some(d))),
                    recv(rx_verify) -> w => {
                        if let Ok(w) = w {
                            let w = verify_one(b, &mut cache, w);
                            let _ = tx_out.send(Outcome::Done(w));
                        }
                        Ok(None)
                    }
                }
            } else {
                match rx_dec.try_recv() {
                    Ok(d) => Ok(Some(d)),
                    Err(channel::TryRecvError::Empty) => Ok(None),
                    Err(channel::TryRecvError::Disconnected) => Err(()),
                }
            };
            match got {
                Ok(Some((seq, d))) => {
                    for d in order.push(seq, d) {
                        let key = d.group_key();
                        let (frames, group) = pending.entry(key).or_default();
                        *frames += d.orig.frame_count();
                        group.push(d);
                        // Flush a full group now; otherwise keep gathering.
                        if *frames < setup.batch_size {
                            continue;
                        }
                        let (_, group) = pending.remove(&key).unwrap_or_default();
                        if let Some(tx) = &tx_write {
                            run_group(
                                b,
                                setup,
                                &mut cache,
                                &mut instances,
                                &mut batch_index,
                                group,
                                tx,
                                tx_out,
                            );
                        }
                    }
                    continue;
                }
                Ok(None) if !pending.is_empty() && !order.ordered => {}
                Ok(None) => continue,
                Err(()) => {
                    input_open = false;
                    for d in order.drain() {
                        let (frames, group) = pending.entry(d.group_key()).or_default();
                        *frames += d.orig.frame_count();
                        group.push(d);
                    }
                }
            }
        }
        // Input is idle (or finished): flush every partial group.
        let groups = std::mem::take(&mut pending);
        for (_, (_, group)) in groups {
            if let Some(tx) = &tx_write {
                run_group(
                    b,
                    setup,
                    &mut cache,
                    &mut instances,
                    &mut batch_index,
                    group,
                    tx,
                    tx_out,
                );
            }
        }
        if !input_open {
            // No more input: let the writers finish, serving their re-verification requests.
            drop(tx_write.take());
            for w in rx_verify.iter() {
                let w = verify_one(b, &mut cache, w);
                let _ = tx_out.send(Outcome::Done(w));
            }
            return;
        }
    }
}

/// Forward pass on `[n, c, h, w]` stored values; None without a model or when the model cannot
/// take these frames (the reason is in the log).
fn predict<B: PluginBackend>(
    b: &B,
    cache: &mut Option<ModelCache<'_, B>>,
    chw: [usize; 3],
    data: &[f32],
    metas: &[adverse_plugin_sdk::FrameMeta],
) -> Result<Option<Vec<(u32, f32)>>, Unfit> {
    let Some(cache) = cache.as_mut() else {
        return Ok(None);
    };
    let n = metas.len();
    let [c, h, w] = chw;
    let svc = cache.service(b, chw, data, metas);
    if let ModelService::Broken(reason) = &svc {
        return Err(Unfit::Frames(reason.clone()));
    }
    let x = b.upload(data, &[n, c, h, w]);
    let logits = svc.forward(b, &x).map_err(Unfit::Failed)?;
    Ok(Some(top1(&b.download(&logits), n)))
}

/// Why there is no prediction.
enum Unfit {
    /// The model cannot take these frames (channels, size): a fact about the input, reported
    /// in the row; stages that need the model fail on their own.
    Frames(String),
    /// The forward pass failed.
    Failed(String),
}

#[allow(clippy::too_many_arguments)]
fn run_group<B: PluginBackend>(
    b: &B,
    setup: &Setup,
    cache: &mut Option<ModelCache<'_, B>>,
    instances: &mut [Result<Instance, String>],
    batch_index: &mut u64,
    group: Vec<Decoded>,
    tx_write: &Sender<Box<Work>>,
    tx_out: &Sender<Outcome>,
) {
    let t0 = Instant::now();
    let mut works: Vec<Option<Box<Work>>> = group
        .into_iter()
        .map(|d| {
            let n = d.orig.frame_count();
            Some(Box::new(Work {
                image: d.orig.clone(),
                d,
                frames: vec![FrameResult::default(); n],
                changed: false,
                compute_ms: 0.0,
                write_ms: 0.0,
                output: None,
                reread: None,
            }))
        })
        .collect();
    let mut errors: Vec<Option<(&'static str, String, Option<String>)>> = vec![None; works.len()];
    let frames: Vec<(usize, usize)> = works
        .iter()
        .enumerate()
        .flat_map(|(i, w)| (0..w.as_ref().map_or(0, |w| w.frames.len())).map(move |k| (i, k)))
        .collect();
    let Some(first) = works.first().and_then(|w| w.as_ref()) else {
        return;
    };
    let m0 = &first.d.orig.meta;
    let (c, h, w) = (
        m0.samples_per_pixel as usize,
        m0.rows as usize,
        m0.cols as usize,
    );
    let per = c * h * w;
    for chunk in frames.chunks(setup.batch_size) {
        let n = chunk.len();
        let mut data = Vec::with_capacity(n * per);
        let mut metas = Vec::with_capacity(n);
        for &(i, k) in chunk {
            let wk = works[i].as_ref().expect("present");
            // Planar is interleaved for one sample per pixel: no intermediate copies then.
            match (c, wk.d.orig.frame(k)) {
                (1, Some(f)) => f.extend_f32(&mut data),
                (_, f) => data.extend(to_planar(&f.map(|f| f.to_f32()).unwrap_or_default(), c)),
            }
            metas.push(frame_meta(
                &wk.d.orig.meta,
                k as u32,
                wk.d.label,
                setup.labels.target,
            ));
        }
        let fail_chunk = |errors: &mut Vec<Option<(&'static str, String, Option<String>)>>,
                          stage: &'static str,
                          plugin: Option<&str>,
                          msg: String| {
            for &(i, _) in chunk {
                errors[i].get_or_insert((stage, msg.clone(), plugin.map(str::to_string)));
            }
        };
        match predict(b, cache, [c, h, w], &data, &metas) {
            Ok(Some(p)) => {
                for (j, &(i, k)) in chunk.iter().enumerate() {
                    works[i].as_mut().expect("present").frames[k].before = Some(p[j]);
                }
            }
            Ok(None) => {}
            Err(Unfit::Frames(why)) => {
                for &(i, k) in chunk {
                    works[i].as_mut().expect("present").frames[k].model_note = Some(why.clone());
                }
            }
            Err(Unfit::Failed(e)) => {
                fail_chunk(&mut errors, "model", None, format!("model: {e}"));
                continue;
            }
        }
        let mut cur = data;
        for (si, st) in setup.stages.iter().enumerate() {
            if st.shadow {
                // Only the attacks before it run it (see `Bpda`).
                continue;
            }
            let (head, tail) = instances.split_at_mut(si + 1);
            let inst = match &mut head[si] {
                Ok(inst) => inst,
                Err(e) => {
                    fail_chunk(
                        &mut errors,
                        "stage",
                        Some(&st.label),
                        format!("stage `{}`: {e}", st.label),
                    );
                    break;
                }
            };
            let input = b.upload(&cur, &[n, c, h, w]);
            let svc = cache
                .as_mut()
                .map(|m| m.service(b, [c, h, w], &cur, &metas));
            let seed = batch_seed(setup.seed, &st.label, *batch_index);
            // An attack before adaptive purifiers attacks the model through them (BPDA).
            // Shadow purifiers make an ensemble with the unpurified path; applied adaptive
            // purifiers chain (`Bpda::ensemble`).
            let ensemble = setup.stages[si + 1..].iter().any(|s| s.shadow);
            // Adaptive detectors after it add their score to the attack's objective
            // (`DetectorScore`).
            let mut fronts: Vec<&mut Instance> = Vec::new();
            let mut score_weights = Vec::new();
            let mut detectors: Vec<(&mut Instance, f32)> = Vec::new();
            let mut eot = 1;
            if st.role == StageRole::Attack {
                for (i, s) in tail.iter_mut().zip(&setup.stages[si + 1..]) {
                    let Ok(i) = i.as_mut() else { continue };
                    if !s.adaptive {
                        continue;
                    }
                    if s.role == StageRole::Purifier && s.shadow == ensemble {
                        eot = eot.max(s.eot);
                        fronts.push(i);
                        score_weights.push(s.score_weight);
                    } else if s.role == StageRole::Detector {
                        detectors.push((i, s.score_weight));
                    }
                }
            }
            let bpda = match (&svc, fronts.is_empty()) {
                (Some(inner), false) => Some(Bpda {
                    inner: inner as &dyn BatchModel<B>,
                    purifiers: std::cell::RefCell::new(fronts),
                    frames: metas.clone(),
                    seed: batch_seed(setup.seed, "bpda", *batch_index),
                    eot,
                    calls: std::cell::Cell::new(0),
                    ensemble,
                    score_weights,
                }),
                _ => None,
            };
            let model: Option<&dyn BatchModel<B>> = match &bpda {
                Some(m) => Some(m),
                None => svc.as_ref().map(|s| s as &dyn BatchModel<B>),
            };
            let scored = match (model, detectors.is_empty()) {
                (Some(inner), false) => Some(DetectorScore {
                    inner,
                    backend: b,
                    detectors: std::cell::RefCell::new(detectors),
                }),
                _ => None,
            };
            let model: Option<&dyn BatchModel<B>> = match &scored {
                Some(m) => Some(m),
                None => model,
            };
            let res = inst.process(BatchInput {
                backend: b,
                frames: metas.clone(),
                input,
                model,
                seed,
            });
            drop(scored);
            drop(bpda);
            drop(svc);
            let out = match res {
                Err(e) => {
                    fail_chunk(
                        &mut errors,
                        "stage",
                        Some(&st.label),
                        format!("stage `{}`: {e}", st.label),
                    );
                    break;
                }
                Ok(out) => out,
            };
            let changed = out.output.is_some();
            if let Some(t) = &out.output {
                cur = b.download(t);
            }
            let preds = if changed {
                match predict(b, cache, [c, h, w], &cur, &metas) {
                    Ok(p) => p,
                    Err(Unfit::Frames(_)) => None,
                    Err(Unfit::Failed(e)) => {
                        fail_chunk(
                            &mut errors,
                            "model",
                            Some(&st.label),
                            format!("model after `{}`: {e}", st.label),
                        );
                        break;
                    }
                }
            } else {
                None
            };
            for (j, &(i, k)) in chunk.iter().enumerate() {
                let fr = &mut works[i].as_mut().expect("present").frames[k];
                let prev = fr.stages.last().map_or(fr.before, |s| s.pred.zip(s.conf));
                let (pred, conf) = match &preds {
                    Some(p) => (Some(p[j].0), Some(p[j].1)),
                    None => prev.map_or((None, None), |(a, b)| (Some(a), Some(b))),
                };
                fr.stages.push(StageFrame {
                    pred,
                    conf,
                    values: out.audit.get(j).cloned().unwrap_or_default(),
                });
            }
        }
        // The final values go back into the image (rounded and clamped to the stored range).
        for (j, &(i, k)) in chunk.iter().enumerate() {
            if errors[i].is_some() {
                continue;
            }
            let wk = works[i].as_mut().expect("present");
            let planar = &cur[j * per..(j + 1) * per];
            let frame = if c == 1 {
                std::borrow::Cow::Borrowed(planar)
            } else {
                std::borrow::Cow::Owned(to_interleaved(planar, c))
            };
            if wk.image.set_frame_f32(k, &frame) {
                wk.changed = true;
            }
        }
        *batch_index += 1;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / works.len().max(1) as f64;
    for (i, slot) in works.iter_mut().enumerate() {
        let Some(mut w) = slot.take() else { continue };
        w.compute_ms = ms;
        if let Some((stage, error, plugin)) = errors[i].take() {
            let _ = tx_out.send(Outcome::Failed {
                rel: w.d.rel.clone(),
                input_sha: Some(w.d.input_sha.clone()),
                sop_in: w.d.orig.meta.sop_instance_uid.clone(),
                stage,
                plugin,
                error,
            });
        } else if tx_write.send(w).is_err() {
            return;
        }
    }
}

// The error is the file's failed outcome, built once per failure and moved on as is.
#[allow(clippy::result_large_err)]
fn write_one(
    mut w: Box<Work>,
    setup: &Setup,
    dicom: bool,
    previews: bool,
    fsync: bool,
) -> Result<Box<Work>, Outcome> {
    let t = Instant::now();
    let fail = |w: &Work, stage, error: String| Outcome::Failed {
        rel: w.d.rel.clone(),
        input_sha: Some(w.d.input_sha.clone()),
        sop_in: w.d.orig.meta.sop_instance_uid.clone(),
        stage,
        plugin: None,
        error,
    };
    let n = w.frames.len();
    if w.changed && dicom {
        let out = setup.output.join(&w.d.rel);
        if let Some(parent) = out.parent()
            && let Err(e) = std::fs::create_dir_all(parent)
        {
            return Err(fail(&w, "write", format!("{}: {e}", parent.display())));
        }
        let opts = DerivedOptions {
            pipeline_id: setup.pipeline_id.clone(),
            derivation_description: format!(
                "adverse {}: {}",
                env!("CARGO_PKG_VERSION"),
                setup
                    .stages
                    .iter()
                    .map(|s| format!("{} {} {}", s.handle.name, s.handle.version, s.params))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
        let info = match write_derived_sync(&w.d.src, &w.image, &opts, &out, fsync) {
            Ok(i) => i,
            Err(e) => return Err(fail(&w, "write", e.to_string())),
        };
        // Success must hold for the file as written: read it back through the normal path.
        let reread = DicomFile::open(&out, &DecodeLimits::default())
            .and_then(|f| f.decode(&DecodeLimits::default()));
        match reread {
            Err(e) => {
                return Err(fail(
                    &w,
                    "verify",
                    format!("the written file does not read back: {e}"),
                ));
            }
            Ok(r) => {
                if !r.pixels.same_values(&w.image.pixels) {
                    return Err(fail(
                        &w,
                        "verify",
                        format!(
                            "{}: the written pixels differ from the result",
                            out.display()
                        ),
                    ));
                }
                w.reread = Some(r);
            }
        }
        w.output = Some((w.d.rel.clone(), info.sha256, info.sop_instance_uid));
    }
    // One pass over the frames: metrics for every frame, previews for written ones.
    let previews = previews && w.output.is_some();
    for k in 0..n {
        let (Some(a), Some(b)) = (w.d.orig.frame_f32(k), w.image.frame_f32(k)) else {
            continue;
        };
        w.frames[k].metrics = Some(frame_metrics(&a, &b, &w.d.orig.meta));
        if previews {
            let pp = setup
                .output
                .join("previews")
                .join(format!("{}.f{k}.png", w.d.rel));
            if let Some(parent) = pp.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            if let Err(e) = write_preview(&pp, &a, &b, &w.d.orig.meta, None) {
                tracing::warn!("{}: preview: {e}", w.d.rel);
            }
        }
    }
    w.write_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(w)
}

/// Re-runs the model on the frames read back from the written file.
fn verify_one<B: PluginBackend>(
    b: &B,
    cache: &mut Option<ModelCache<'_, B>>,
    mut w: Box<Work>,
) -> Box<Work> {
    let Some(r) = w.reread.take() else { return w };
    let m = &r.meta;
    let (c, h, wd) = (
        m.samples_per_pixel as usize,
        m.rows as usize,
        m.cols as usize,
    );
    for k0 in (0..r.frame_count()).step_by(64) {
        let k1 = (k0 + 64).min(r.frame_count());
        let mut data = Vec::new();
        let mut metas = Vec::new();
        for k in k0..k1 {
            data.extend(to_planar(&r.frame_f32(k).unwrap_or_default(), c));
            metas.push(frame_meta(m, k as u32, w.d.label, None));
        }
        match predict(b, cache, [c, h, wd], &data, &metas) {
            Ok(Some(p)) => {
                for (j, k) in (k0..k1).enumerate() {
                    w.frames[k].written = Some(p[j]);
                }
            }
            Ok(None) | Err(Unfit::Frames(_)) => {}
            Err(Unfit::Failed(e)) => tracing::warn!("{}: re-verification: {e}", w.d.rel),
        }
    }
    w
}

fn round4(v: f64) -> Value {
    if v.is_finite() {
        json!((v * 1e4).round() / 1e4)
    } else {
        Value::Null
    }
}

/// Appends the rows and then the audit record of one outcome; returns its completion (for a
/// caller that wants one) on success.
fn record(
    o: Outcome,
    setup: &Setup,
    run_info: &Value,
    backend: &str,
    audit: &mut AuditLog,
    results: &mut std::fs::File,
    results_path: &Path,
    summary: &mut Summary,
) -> Result<Option<Completion>, EngineError> {
    let mut body = Map::new();
    body.insert("run".into(), run_info.clone());
    body.insert("pipeline_id".into(), json!(setup.pipeline_id));
    body.insert("backend".into(), json!(backend));
    let mut lines = String::new();
    #[allow(clippy::needless_late_init)] // set in every arm but the early returns
    let completion;
    match o {
        Outcome::Skipped(rel) => {
            summary.skipped += 1;
            return Ok(Some(Completion {
                rel,
                outcome: Completed::Skipped,
            }));
        }
        Outcome::Failed {
            rel,
            input_sha,
            sop_in,
            stage,
            plugin,
            error,
        } => {
            summary.failed += 1;
            if summary.failures.len() < 100 {
                summary.failures.push((rel.clone(), error.clone()));
            }
            eprintln!("adverse run: {rel}: {error}");
            let row = json!({
                "input": rel, "frame": null, "status": "failed", "error": error,
                "failed_stage": stage, "sop_instance_uid": sop_in,
            });
            lines.push_str(&row.to_string());
            lines.push('\n');
            body.insert("input".into(), json!(rel));
            body.insert("input_sha256".into(), json!(input_sha));
            body.insert("sop_instance_uid".into(), json!(sop_in));
            body.insert("outcome".into(), json!("failed"));
            body.insert("failed_stage".into(), json!(stage));
            if let Some(pl) = &plugin {
                body.insert("failed_plugin".into(), json!(pl));
            }
            body.insert("error".into(), json!(error));
            completion = Some(Completion {
                rel,
                outcome: Completed::Failed {
                    stage: stage.to_string(),
                    plugin,
                    error,
                },
            });
        }
        Outcome::Done(w) => {
            summary.processed += 1;
            summary.frames += w.frames.len();
            let has_attack = setup.stages.iter().any(|s| s.role == StageRole::Attack);
            let mut frames_audit = Vec::new();
            for (k, fr) in w.frames.iter().enumerate() {
                let fin = fr
                    .stages
                    .last()
                    .and_then(|s| s.pred.zip(s.conf))
                    .or(fr.before);
                let reference = w.d.label.or(fr.before.map(|p| p.0));
                let after = fr.written.or(if w.output.is_none() { fin } else { None });
                let success = (has_attack && reference.is_some() && after.is_some())
                    .then(|| after.map(|a| a.0) != reference);
                let flagged = fr.stages.iter().any(|s| {
                    s.values.iter().any(|(k, v)| {
                        (k == "flag" || k == "flagged" || k == "adversarial") && v == &json!(true)
                    })
                });
                let mt = fr.metrics;
                let mut stages = Map::new();
                for (st, sf) in setup.stages.iter().filter(|s| !s.shadow).zip(&fr.stages) {
                    stages.insert(
                        st.label.clone(),
                        serde_json::to_value(sf).unwrap_or_default(),
                    );
                }
                let row = json!({
                    "input": w.d.rel, "frame": k, "status": "ok",
                    "sop_instance_uid": w.d.orig.meta.sop_instance_uid,
                    "output": w.output.as_ref().map(|o| &o.0),
                    "output_sop_instance_uid": w.output.as_ref().map(|o| &o.2),
                    "output_sha256": w.output.as_ref().map(|o| &o.1),
                    "label": w.d.label,
                    "pred_before": fr.before.map(|p| p.0), "conf_before": fr.before.map(|p| round4(f64::from(p.1))),
                    "pred_final": fin.map(|p| p.0),
                    "pred_written": after.map(|p| p.0), "conf_written": after.map(|p| round4(f64::from(p.1))),
                    "attack_success": success, "flagged": flagged,
                    "linf_stored": mt.map(|m| round4(m.linf_stored)), "l2_stored": mt.map(|m| round4(m.l2_stored)),
                    "linf_hu": mt.and_then(|m| m.linf_hu).map(round4), "l2_hu": mt.and_then(|m| m.l2_hu).map(round4),
                    "psnr_db": mt.and_then(|m| m.psnr_db).map(round4), "ssim": mt.map(|m| round4(m.ssim)),
                    "decode_ms": round4(w.d.decode_ms), "compute_ms": round4(w.compute_ms), "write_ms": round4(w.write_ms),
                    "stages": stages,
                    "model_note": fr.model_note,
                });
                lines.push_str(&row.to_string());
                lines.push('\n');
                frames_audit.push(json!({
                    "frame": k, "label": w.d.label,
                    "pred_before": fr.before.map(|p| p.0), "pred_written": after.map(|p| p.0),
                    "attack_success": success, "flagged": flagged,
                    "linf_stored": mt.map(|m| round4(m.linf_stored)), "l2_stored": mt.map(|m| round4(m.l2_stored)),
                    "stages": Value::Object(stages.clone()),
                }));
            }
            body.insert("input".into(), json!(w.d.rel));
            body.insert("input_sha256".into(), json!(w.d.input_sha));
            body.insert(
                "sop_instance_uid".into(),
                json!(w.d.orig.meta.sop_instance_uid),
            );
            body.insert("outcome".into(), json!("ok"));
            body.insert("output".into(), json!(w.output.as_ref().map(|o| &o.0)));
            body.insert(
                "output_sha256".into(),
                json!(w.output.as_ref().map(|o| &o.1)),
            );
            body.insert(
                "output_sop_instance_uid".into(),
                json!(w.output.as_ref().map(|o| &o.2)),
            );
            let any_flag = frames_audit
                .iter()
                .any(|f| f.get("flagged") == Some(&json!(true)));
            let scores: Vec<Value> = w
                .frames
                .iter()
                .map(|fr| {
                    let mut m = Map::new();
                    for (st, sf) in setup.stages.iter().filter(|s| !s.shadow).zip(&fr.stages) {
                        if st.role == StageRole::Detector {
                            m.insert(st.label.clone(), json!(sf.values));
                        }
                    }
                    Value::Object(m)
                })
                .collect();
            body.insert("frames".into(), Value::Array(frames_audit));
            completion = Some(Completion {
                rel: w.d.rel.clone(),
                outcome: Completed::Ok {
                    output: w.output.as_ref().map(|o| o.0.clone()),
                    flagged: any_flag,
                    scores: Value::Array(scores),
                },
            });
        }
    }
    results
        .write_all(lines.as_bytes())
        .map_err(io_err(results_path))?;
    audit.append("instance", body)?;
    Ok(completion)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_is_softmax_argmax() {
        let p = top1(&[0.0, 2.0, 1.0, -1.0], 2);
        assert_eq!(p[0].0, 1);
        assert!((p[0].1 - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
        assert_eq!(p[1].0, 0);
        assert!((p[1].1 - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn finished_keeps_the_last_outcome_per_input() {
        let rec = |kind: &str, input: &str, outcome: &str| Record {
            seq: 0,
            kind: kind.into(),
            time: String::new(),
            body: serde_json::from_value(
                json!({"input": input, "input_sha256": "ab", "outcome": outcome, "output": input,
                       "pipeline_id": if input == "d" { "other" } else { "p1" }}),
            )
            .unwrap(),
            hash: String::new(),
        };
        let m = finished(
            &[
                rec("instance", "a", "ok"),
                rec("instance", "b", "ok"),
                rec("instance", "b", "failed"),
                rec("run_end", "c", "ok"),
                rec("instance", "d", "ok"),
            ],
            "p1",
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m["a"], ("ab".to_string(), vec!["a".to_string()]));
    }
}
