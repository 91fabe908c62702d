//! `adverse watch`: drop-folder monitoring in front of a clinical model.
//!
//! ```text
//! notify (native | poll) ──hints──▶ readiness tracker ──ready──▶ claim (rename into
//!   + full rescans                   (settled size/mtime,        .adverse/processing/<id>/)
//!                                     complete DICOM)                    │ Job
//!                                                                        ▼
//!        done/ | delete | keep ◀──completion (audit synced)── pipeline engine (same as `run`)
//!        quarantine/ + reason.json ◀─┘   flagged/ copy or move ◀─┘
//! ```
//! Guarantees and how they are kept:
//! - *Never half-written*: a file is taken only when stable and complete ([`ready`]).
//! - *Never twice*: the claim is an atomic rename, so of several watchers (several hosts on a
//!   share included) one wins ([`claim`]); the input leaves the processing folder only after
//!   its audit record is synced, and an input re-queued after a crash is skipped by the engine
//!   when its audit log already has it done (same bytes, same processing identity), otherwise
//!   redone, which is harmless because outputs are deterministic and written atomically.
//! - *Never lost*: claimed files stay on disk until finished; a restart re-queues its own,
//!   neighbours take over a dead instance's after the lease; events are hints only and a
//!   periodic rescan catches what the OS dropped.
//!
//! Each instance writes its own audit log and results (`<output>/audit/<id>.jsonl`,
//! `<output>/results/<id>.*`): the audit log is single-writer (flock), and separate logs keep
//! every chain verifiable on its own.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam::channel;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::pipeline::config::{DoneAction, FlaggedMode, FlaggedSpec, Pipeline};
use crate::pipeline::engine::{self, Completed, Completion, Job, RunOptions, Summary};
use crate::runtime::select::BackendChoice;

pub mod claim;
pub mod ready;
pub mod source;

pub use source::Mode;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another `adverse watch` with instance name `{id}` is running (it holds {lock}); give \
         this one another name with --instance"
    )]
    InstanceRunning { id: String, lock: PathBuf },
    #[error("cannot watch {path}: {message}")]
    Notify { path: PathBuf, message: String },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
}

/// Default settle time: long enough for a local copy of a typical instance to show no change
/// for half a second, short enough to keep drop-to-output latency under a second.
pub const DEFAULT_SETTLE_MS: u64 = 500;
pub const DEFAULT_RESCAN_S: u64 = 60;
pub const DEFAULT_INCOMPLETE_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_LEASE_S: u64 = 60;
pub const DEFAULT_STATUS_EVERY_S: u64 = 30;
/// Claimed but unfinished inputs per instance: bounds memory and leaves work for neighbours.
const MAX_IN_FLIGHT: usize = 256;

/// Command-line overrides of the pipeline's `watch:` section.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    pub path: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub backend: Option<BackendChoice>,
    pub jobs: Option<usize>,
    pub poll_ms: Option<u64>,
    pub settle_ms: Option<u64>,
    pub incomplete_timeout_ms: Option<u64>,
    pub lease_s: Option<u64>,
    pub instance: Option<String>,
    pub done: Option<DoneAction>,
    pub quarantine: Option<PathBuf>,
    pub status_every_s: Option<u64>,
    pub status_file: Option<PathBuf>,
}

/// Everything resolved from the pipeline and the options.
#[derive(Debug, Clone)]
struct Settings {
    root: PathBuf,
    recursive: bool,
    output: PathBuf,
    mode: Mode,
    settle: Duration,
    rescan: Option<Duration>,
    incomplete_timeout: Duration,
    lease: Duration,
    done: DoneAction,
    flagged: Option<FlaggedSpec>,
    status_every: Option<Duration>,
    status_file: Option<PathBuf>,
    id: String,
    include: globset::GlobSet,
    exclude: globset::GlobSet,
    /// Folders inside the watched one that are never inputs (output, done, quarantine...).
    skip: Vec<PathBuf>,
    layout: claim::Layout,
}

/// Counters for the status line, the status file and the final summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub instance: String,
    pub mode: String,
    pub processed: u64,
    pub skipped: u64,
    pub failed: u64,
    pub flagged: u64,
    /// Claimed and not finished.
    pub in_flight: usize,
    /// Seen, not yet settled or complete.
    pub waiting: usize,
    /// Finished files per second over the last status period.
    pub rate: f64,
    pub last_error: Option<String>,
    pub time: String,
    pub stopping: bool,
}

/// What a watch session did.
#[derive(Debug, Clone, Serialize)]
pub struct WatchSummary {
    pub status: Status,
    pub engine: Summary,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// Default instance name: host name plus a hash of pipeline file, watched folder and output,
/// so a restart of the same service gets the same name (and recovers its claims) while two
/// different pipelines on one host never share one.
fn default_instance(p: &Pipeline, root: &Path, output: &Path) -> String {
    let pf = std::fs::canonicalize(&p.file).unwrap_or_else(|_| p.file.clone());
    let key = format!("{}\n{}\n{}", pf.display(), root.display(), output.display());
    let h = hex::encode(&Sha256::digest(key.as_bytes())[..4]);
    let host: String = host_name()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{host}-{h}")
}

fn check_instance_name(id: &str) -> Result<(), WatchError> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(WatchError::Setup(format!(
            "instance name `{id}`: use 1 to 100 letters, digits, `-`, `_` or `.` (not first)"
        )))
    }
}

fn globs(patterns: &[String]) -> Result<globset::GlobSet, WatchError> {
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns {
        b.add(
            globset::Glob::new(p)
                .map_err(|e| WatchError::Setup(format!("input pattern `{p}`: {e}")))?,
        );
    }
    b.build()
        .map_err(|e| WatchError::Setup(format!("input patterns: {e}")))
}

fn settings(p: &Pipeline, o: &WatchOptions) -> Result<Settings, WatchError> {
    let w = p.watch.clone().unwrap_or_default();
    let root = o
        .path
        .clone()
        .or(w.path.clone())
        .unwrap_or_else(|| p.input.clone());
    std::fs::create_dir_all(&root).map_err(|source| WatchError::Io {
        path: root.clone(),
        source,
    })?;
    if !root.is_dir() {
        return Err(WatchError::Setup(format!(
            "{} is not a folder: watch needs one",
            root.display()
        )));
    }
    let root = std::fs::canonicalize(&root).map_err(|source| WatchError::Io {
        path: root.clone(),
        source,
    })?;
    let output = o.output.clone().unwrap_or_else(|| p.output.clone());
    std::fs::create_dir_all(&output).map_err(|source| WatchError::Io {
        path: output.clone(),
        source,
    })?;
    let output = std::fs::canonicalize(&output).unwrap_or(output);
    let id = match &o.instance {
        Some(id) => id.clone(),
        None => default_instance(p, &root, &output),
    };
    check_instance_name(&id)?;
    let ms = Duration::from_millis;
    let mode = match o.poll_ms.or(w.poll_ms) {
        Some(0) => return Err(WatchError::Setup("--poll: must be at least 1 ms".into())),
        Some(n) => Mode::Poll(ms(n)),
        None => Mode::Native,
    };
    let settle = o
        .settle_ms
        .or(w.settle_ms)
        .unwrap_or(DEFAULT_SETTLE_MS)
        .max(1);
    let lease = o.lease_s.or(w.lease_s).unwrap_or(DEFAULT_LEASE_S).max(1);
    let abs = |q: &Path| {
        if q.is_absolute() {
            q.to_path_buf()
        } else {
            root.join(q)
        }
    };
    let quarantine = o
        .quarantine
        .clone()
        .or(w.quarantine.clone())
        .map(|q| abs(&q));
    let done_dir = w.done_dir.clone().map(|q| abs(&q));
    let layout = claim::Layout::new(&root, done_dir.as_deref(), quarantine.as_deref());
    let mut skip = vec![
        layout.state.clone(),
        output.clone(),
        layout.done.clone(),
        layout.quarantine.clone(),
    ];
    if let Some(f) = &w.flagged {
        skip.push(f.dir.clone());
    }
    Ok(Settings {
        recursive: w.recursive.unwrap_or(p.spec.input.recursive),
        output,
        mode,
        settle: ms(settle),
        rescan: Some(w.rescan_s.unwrap_or(DEFAULT_RESCAN_S))
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
        incomplete_timeout: ms(o
            .incomplete_timeout_ms
            .or(w.incomplete_timeout_ms)
            .unwrap_or(DEFAULT_INCOMPLETE_TIMEOUT_MS)),
        lease: Duration::from_secs(lease),
        done: o.done.unwrap_or(w.done),
        flagged: w.flagged.clone(),
        status_every: Some(
            o.status_every_s
                .or(w.status_every_s)
                .unwrap_or(DEFAULT_STATUS_EVERY_S),
        )
        .filter(|s| *s > 0)
        .map(Duration::from_secs),
        status_file: o.status_file.clone().or(w.status_file.clone()),
        id,
        include: globs(&p.spec.input.include)?,
        exclude: globs(&p.spec.input.exclude)?,
        skip,
        layout,
        root,
    })
}

impl Settings {
    /// Whether `path` (a file hint) may be an input: inside the root (at depth 1 unless
    /// recursive), not in a skipped folder or a hidden one, not a temporary name a copy tool
    /// renames when done, and matching the pipeline's include/exclude patterns.
    fn wants(&self, path: &Path) -> bool {
        let Ok(rel) = path.strip_prefix(&self.root) else {
            return false;
        };
        if self.skip.iter().any(|s| path.starts_with(s)) {
            return false;
        }
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.is_empty() || (!self.recursive && parts.len() > 1) {
            return false;
        }
        if parts.iter().any(|c| c.starts_with('.')) {
            return false;
        }
        let name = parts.last().map(String::as_str).unwrap_or_default();
        let lower = name.to_ascii_lowercase();
        if [".part", ".tmp", ".partial", ".crdownload"]
            .iter()
            .any(|s| lower.ends_with(s))
        {
            return false;
        }
        if !self.include.is_empty() && !self.include.is_match(rel) && !self.include.is_match(name) {
            return false;
        }
        !(self.exclude.is_match(rel) || self.exclude.is_match(name))
    }

    /// Every wanted file under `dir`.
    fn scan(&self, dir: &Path) -> Vec<PathBuf> {
        let depth = if self.recursive { usize::MAX } else { 1 };
        let max = depth.saturating_sub(
            dir.strip_prefix(&self.root)
                .map_or(0, |r| r.components().count()),
        );
        walkdir::WalkDir::new(dir)
            .max_depth(max)
            .into_iter()
            .filter_entry(|e| {
                e.depth() == 0
                    || !(e.file_type().is_dir()
                        && (e.file_name().to_string_lossy().starts_with('.')
                            || self.skip.iter().any(|s| e.path() == s)))
            })
            .flatten()
            .filter(|e| e.file_type().is_file() && self.wants(e.path()))
            .map(|e| e.into_path())
            .collect()
    }
}

/// Runs until `stop` is set (SIGINT/SIGTERM), then finishes every claimed input, syncs the
/// audit log and returns.
pub fn run(
    p: &Pipeline,
    o: &WatchOptions,
    stop: Arc<AtomicBool>,
) -> Result<WatchSummary, WatchError> {
    let s = settings(p, o)?;
    let claims = Arc::new(claim::Claims::open(s.layout.clone(), &s.id)?);
    tracing::info!(
        "watching {} ({}, settle {} ms) as instance {}",
        s.root.display(),
        s.mode,
        s.settle.as_millis(),
        s.id
    );

    // The heartbeat runs on its own thread so a long computation never lets the lease lapse.
    let hb_stop = Arc::new(AtomicBool::new(false));
    let heartbeat = {
        let (claims, hb_stop) = (claims.clone(), hb_stop.clone());
        let every = (s.lease / 4).max(Duration::from_millis(250));
        std::thread::spawn(move || {
            let mut last = Instant::now();
            while !hb_stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() >= every {
                    claims.beat();
                    last = Instant::now();
                }
            }
        })
    };

    let (tx_jobs, rx_jobs) = channel::unbounded::<Job>();
    let (tx_done, rx_done) = channel::unbounded::<Completion>();
    let ropts = RunOptions {
        input: Some(s.root.clone()),
        output: Some(s.output.clone()),
        backend: o.backend,
        jobs: o.jobs,
        force: false,
        progress: false,
        source: Some(rx_jobs),
        completions: Some(tx_done),
        instance: Some(s.id.clone()),
    };
    // The engine's own stop flag is never set from outside: on SIGINT the source closes instead,
    // so every claimed input is still finished.
    let engine_stop = Arc::new(AtomicBool::new(false));
    let pipeline = p.clone();
    let engine_thread = std::thread::spawn(move || engine::run(&pipeline, &ropts, engine_stop));

    let mut st = Status {
        instance: s.id.clone(),
        mode: String::new(),
        ..Status::default()
    };
    let mut in_flight: HashSet<String> = HashSet::new();
    let send = |rel: String, in_flight: &mut HashSet<String>| {
        let job = Job {
            path: claims.claimed_path(&rel),
            rel: rel.clone(),
        };
        in_flight.insert(rel);
        // The engine only drops its receiver when it ended: noticed by the loop below.
        let _ = tx_jobs.send(job);
    };
    // 1. What a previous run of this instance left claimed.
    let left = claims.leftovers();
    if !left.is_empty() {
        tracing::warn!(
            "instance {}: re-queueing {} input(s) left in processing by an earlier run",
            s.id,
            left.len()
        );
    }
    for rel in left {
        send(rel, &mut in_flight);
    }
    // 2. Events first, then the backlog: nothing can fall between the two.
    let events = source::start(s.mode, &s.root, s.recursive)?;
    st.mode = events.mode.to_string();
    let mut tracker = ready::Tracker::new(s.settle, s.incomplete_timeout);
    let started = Instant::now();
    for f in s.scan(&s.root) {
        tracker.note(f, started);
    }
    let tick = (s.settle / 4).clamp(Duration::from_millis(5), Duration::from_millis(50));
    let mut last_rescan = Instant::now();
    let mut last_takeover: Option<Instant> = None;
    let mut last_status = Instant::now();
    let mut finished_at_last_status = 0u64;
    let mut engine_gone = false;

    let handle = |c: Completion, st: &mut Status, tracker: &mut ready::Tracker| {
        let rel = c.rel.clone();
        match c.outcome {
            Completed::Ok {
                output,
                flagged,
                scores,
            } => {
                st.processed += 1;
                if flagged {
                    st.flagged += 1;
                    if let Some(f) = &s.flagged
                        && let Err(e) =
                            route_flagged(&claims, &s.output, f, &rel, output.as_deref())
                    {
                        tracing::warn!("{rel}: routing to the flagged folder: {e}");
                        st.last_error = Some(format!("{rel}: flagged routing: {e}"));
                    }
                    tracing::info!("{rel}: flagged by a detector ({scores})");
                }
                dispose(&claims, &s, &rel, tracker, st);
            }
            Completed::Skipped => {
                st.skipped += 1;
                dispose(&claims, &s, &rel, tracker, st);
            }
            Completed::Failed {
                stage,
                plugin,
                error,
            } => {
                st.failed += 1;
                st.last_error = Some(format!("{rel}: {error}"));
                let reason = json!({
                    "input": rel, "error": error, "stage": stage, "plugin": plugin,
                    "time": crate::audit::now_rfc3339_millis(), "instance": s.id,
                });
                if let Err(e) = claims.quarantine(&rel, &reason) {
                    tracing::warn!("{rel}: cannot quarantine: {e}");
                }
            }
        }
    };

    while !stop.load(Ordering::SeqCst) {
        // Hints.
        let mut rescan_why: Option<String> = None;
        let now = Instant::now();
        match events.rx.recv_timeout(tick) {
            Ok(h) => {
                for h in std::iter::once(h).chain(events.rx.try_iter()) {
                    match h {
                        source::Hint::Rescan(why) => rescan_why = Some(why),
                        source::Hint::Path(path) => {
                            if path.is_dir() {
                                if path.starts_with(&s.root)
                                    && !s.skip.iter().any(|k| path.starts_with(k))
                                {
                                    for f in s.scan(&path) {
                                        tracker.note(f, now);
                                    }
                                }
                            } else if s.wants(&path) {
                                tracker.note(path, now);
                            }
                        }
                    }
                }
            }
            Err(channel::RecvTimeoutError::Timeout) => {}
            Err(channel::RecvTimeoutError::Disconnected) => {
                rescan_why = Some("the event source stopped".into());
            }
        }
        if let Some(why) = &rescan_why {
            tracing::warn!("{}: {why}", s.root.display());
        }
        if rescan_why.is_some() || s.rescan.is_some_and(|r| last_rescan.elapsed() >= r) {
            let now = Instant::now();
            for f in s.scan(&s.root) {
                tracker.note(f, now);
            }
            last_rescan = now;
        }
        // Dead neighbours' claims.
        if last_takeover.is_none_or(|t| t.elapsed() >= (s.lease / 2).max(Duration::from_secs(1))) {
            for rel in claims.take_over_stale(s.lease) {
                if !in_flight.contains(&rel) {
                    send(rel, &mut in_flight);
                }
            }
            last_takeover = Some(Instant::now());
        }
        // Ready files.
        let room = MAX_IN_FLIGHT.saturating_sub(in_flight.len());
        if !engine_gone {
            for r in tracker.poll(Instant::now(), room) {
                match claims.claim(&r.path) {
                    Ok(Some(rel)) => send(rel, &mut in_flight),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("claim: {e}");
                        st.last_error = Some(format!("claim: {e}"));
                    }
                }
            }
        }
        // Finished ones.
        for c in rx_done.try_iter() {
            in_flight.remove(&c.rel);
            handle(c, &mut st, &mut tracker);
        }
        if engine_thread.is_finished() {
            engine_gone = true;
            break;
        }
        // Status.
        if let Some(every) = s.status_every
            && last_status.elapsed() >= every
        {
            let fin = st.processed + st.skipped + st.failed;
            st.rate = (fin - finished_at_last_status) as f64 / last_status.elapsed().as_secs_f64();
            finished_at_last_status = fin;
            last_status = Instant::now();
            st.in_flight = in_flight.len();
            st.waiting = tracker.len();
            report(&st, s.status_file.as_deref(), true);
        }
    }
    // Stop: no new claims; the engine finishes everything it was given.
    st.stopping = true;
    drop(events);
    drop(tx_jobs);
    if !engine_gone {
        eprintln!(
            "adverse watch: stopping; finishing {} input(s) in flight",
            in_flight.len()
        );
    }
    for c in rx_done.iter() {
        in_flight.remove(&c.rel);
        handle(c, &mut st, &mut tracker);
    }
    let result = engine_thread
        .join()
        .map_err(|_| WatchError::Setup("the pipeline engine thread panicked".into()))?;
    hb_stop.store(true, Ordering::Relaxed);
    let _ = heartbeat.join();
    st.in_flight = in_flight.len();
    st.waiting = tracker.len();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    st.rate = (st.processed + st.skipped + st.failed) as f64 / secs;
    report(&st, s.status_file.as_deref(), false);
    let engine = result?;
    if engine_gone && !stop.load(Ordering::SeqCst) {
        return Err(WatchError::Setup(
            "the pipeline engine stopped unexpectedly".into(),
        ));
    }
    Ok(WatchSummary { status: st, engine })
}

/// Copies (mode `also`) or moves (mode `instead`) what a detector flagged into the flagged
/// folder: the written output when the stages changed the image, else the input itself.
fn route_flagged(
    claims: &claim::Claims,
    output: &Path,
    f: &FlaggedSpec,
    rel: &str,
    written: Option<&str>,
) -> std::io::Result<()> {
    match written {
        Some(out) => {
            let from = output.join(out);
            let to = f.dir.join(out);
            claim::copy_atomic(&from, &to)?;
            if f.mode == FlaggedMode::Instead {
                std::fs::remove_file(&from)?;
            }
            Ok(())
        }
        None => claim::copy_atomic(&claims.claimed_path(rel), &f.dir.join(rel)),
    }
}

fn dispose(
    claims: &claim::Claims,
    s: &Settings,
    rel: &str,
    tracker: &mut ready::Tracker,
    st: &mut Status,
) {
    match claims.finish(rel, s.done) {
        Ok(Some(back)) => tracker.keep(back),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!("{rel}: cannot finish: {e}");
            st.last_error = Some(format!("{rel}: {e}"));
        }
    }
}

/// The status line on stderr and, when configured, the status file.
fn report(st: &Status, file: Option<&Path>, line: bool) {
    let mut st = st.clone();
    st.time = crate::audit::now_rfc3339_millis();
    if line {
        eprintln!(
            "adverse watch [{}]: {} processed, {} skipped, {} failed, {} in flight, {} waiting, \
             {:.1} files/s{}",
            st.instance,
            st.processed,
            st.skipped,
            st.failed,
            st.in_flight,
            st.waiting,
            st.rate,
            st.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(f) = file {
        let text = serde_json::to_string_pretty(&st).unwrap_or_default() + "\n";
        if let Err(e) = claim::write_atomic(f, text.as_bytes()) {
            tracing::warn!("status file {}: {e}", f.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(dir: &Path, extra: &str) -> Pipeline {
        let y = format!(
            "name: w\ninput: {{path: in, include: [\"*.dcm\"]}}\noutput: {{dir: in/out}}\n{extra}"
        );
        Pipeline::parse(&dir.join("p.yaml"), y.as_bytes()).unwrap()
    }

    #[test]
    fn wants_skips_state_output_temporaries_and_unmatched_names() {
        let d = tempfile::tempdir().unwrap();
        let p = pipeline(d.path(), "watch: {recursive: false}");
        let s = settings(&p, &WatchOptions::default()).unwrap();
        let r = &s.root;
        assert!(s.wants(&r.join("a.dcm")));
        for no in [
            "a.dcm.part",
            "a.DCM.tmp",
            "x.partial",
            ".hidden.dcm",
            "notes.txt",
            "sub/a.dcm",
            ".adverse/processing/i/a.dcm",
            "out/a.dcm",
        ] {
            assert!(!s.wants(&r.join(no)), "{no}");
        }
        let p = pipeline(d.path(), "watch: {}");
        let s = settings(&p, &WatchOptions::default()).unwrap();
        assert!(s.wants(&s.root.join("sub/a.dcm")));
        std::fs::create_dir_all(s.root.join("sub/.x")).unwrap();
        std::fs::create_dir_all(s.root.join("out")).unwrap();
        for f in ["sub/a.dcm", "sub/.x/b.dcm", "out/c.dcm", "d.dcm.part"] {
            std::fs::write(s.root.join(f), b"x").unwrap();
        }
        assert_eq!(s.scan(&s.root), vec![s.root.join("sub/a.dcm")]);
    }

    #[test]
    fn instance_names_are_stable_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = pipeline(d.path(), "");
        let a = settings(&p, &WatchOptions::default()).unwrap().id;
        let b = settings(&p, &WatchOptions::default()).unwrap().id;
        assert_eq!(a, b);
        let other = WatchOptions {
            output: Some(d.path().join("o2")),
            ..Default::default()
        };
        assert_ne!(a, settings(&p, &other).unwrap().id);
        for bad in ["", ".x", "a/b", "a b"] {
            let o = WatchOptions {
                instance: Some(bad.into()),
                ..Default::default()
            };
            assert!(settings(&p, &o).is_err(), "{bad:?}");
        }
    }
}
