//! `adverse watch PIPELINE`: screen or purify every DICOM file dropped into a folder.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Args, ValueEnum};

use super::exit;
use crate::pipeline::config::{DoneAction, Pipeline};
use crate::pipeline::engine::EngineError;
use crate::runtime::select::BackendChoice;
use crate::watch::{self, WatchError, WatchOptions};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DoneArg {
    Move,
    Delete,
    Keep,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The pipeline YAML file (its `watch:` section, if any, sets the defaults below).
    pub pipeline: PathBuf,
    /// Folder to watch (default: `watch.path`, else `input.path`).
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Output folder (default: `output.dir`).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Poll every MS milliseconds instead of using native file events (network shares:
    /// inotify does not see writes made by other hosts).
    #[arg(long, value_name = "MS")]
    pub poll: Option<u64>,
    /// How long size and mtime must stay unchanged before a file is taken (default 500).
    #[arg(long, value_name = "MS")]
    pub settle_ms: Option<u64>,
    /// How long a stable file that is not complete DICOM is waited for before it is processed
    /// anyway and so quarantined (default 30000).
    #[arg(long, value_name = "MS")]
    pub incomplete_timeout_ms: Option<u64>,
    /// Claims of an instance whose heartbeat is older than this are taken over (default 60).
    #[arg(long, value_name = "S")]
    pub lease_s: Option<u64>,
    /// Instance name: stable across restarts (a restart re-queues its unfinished claims); two
    /// running processes cannot share one. Default: host name + hash of pipeline and folders.
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
    /// What happens to an input once its outcome is in the audit log.
    #[arg(long, value_enum)]
    pub done: Option<DoneArg>,
    /// Quarantine folder for inputs that fail (default `<watch>/.adverse/quarantine`).
    #[arg(long)]
    pub quarantine: Option<PathBuf>,
    /// Print a status line every S seconds (default 30; 0: never).
    #[arg(long, value_name = "S")]
    pub status_every: Option<u64>,
    /// Keep a status JSON file (processed, failed, in flight, rate, last error) up to date.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// auto, cpu, gpu or gpu-software.
    #[arg(long)]
    pub backend: Option<BackendChoice>,
    /// Decode and write workers.
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// SIGINT/SIGTERM: stop claiming, finish what is claimed, sync the audit log, exit 0.
fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        s.store(true, std::sync::atomic::Ordering::SeqCst);
    }) {
        tracing::warn!("cannot install the Ctrl-C handler: {e}");
    }
    stop
}

pub fn run(a: WatchArgs) -> anyhow::Result<ExitCode> {
    let pipeline = match Pipeline::load(&a.pipeline) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("adverse watch: {e}");
            return Ok(ExitCode::from(exit::USAGE));
        }
    };
    let opts = WatchOptions {
        path: a.path,
        output: a.output,
        backend: a.backend,
        jobs: a.jobs,
        poll_ms: a.poll,
        settle_ms: a.settle_ms,
        incomplete_timeout_ms: a.incomplete_timeout_ms,
        lease_s: a.lease_s,
        instance: a.instance,
        done: a.done.map(|d| match d {
            DoneArg::Move => DoneAction::Move,
            DoneArg::Delete => DoneAction::Delete,
            DoneArg::Keep => DoneAction::Keep,
        }),
        quarantine: a.quarantine,
        status_every_s: a.status_every,
        status_file: a.status_file,
    };
    match watch::run(&pipeline, &opts, stop_flag()) {
        Ok(s) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let st = &s.status;
                println!(
                    "adverse watch [{}]: stopped; {} processed, {} skipped (done before), {} \
                     failed (quarantined), {} flagged; audit head {} ({} records)",
                    st.instance,
                    st.processed,
                    st.skipped,
                    st.failed,
                    st.flagged,
                    s.engine.audit_head,
                    s.engine.audit_records
                );
            }
            Ok(ExitCode::from(exit::OK))
        }
        Err(
            e @ (WatchError::Setup(_)
            | WatchError::InstanceRunning { .. }
            | WatchError::Notify { .. }
            | WatchError::Engine(EngineError::Setup(_))),
        ) => {
            eprintln!("adverse watch: {}: {e}", a.pipeline.display());
            Ok(ExitCode::from(exit::USAGE))
        }
        Err(e) => Err(e.into()),
    }
}
