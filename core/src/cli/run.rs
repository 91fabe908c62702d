//! `adverse run PIPELINE`: the batch engine over an input folder.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Args;

use super::exit;
use crate::pipeline::config::Pipeline;
use crate::pipeline::engine::{self, EngineError, RunOptions, Summary};
use crate::runtime::select::BackendChoice;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The pipeline YAML file.
    pub pipeline: PathBuf,
    /// Input file or folder (overrides the pipeline's `input.path`).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Output folder (overrides `output.dir`; the audit log goes there too unless the pipeline
    /// names one).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// auto, cpu, gpu or gpu-software (default: the pipeline's `run.backend`, then
    /// $ADVERSE_BACKEND, then auto).
    #[arg(long)]
    pub backend: Option<BackendChoice>,
    /// Decode and write workers (default: the pipeline's `run.jobs`, else the number of CPUs).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Redo instances that a previous run into the same output folder already finished.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Ctrl-C / SIGTERM set the stop flag: discovery stops, work in flight is finished and recorded,
/// and the run exits with [`exit::INTERRUPTED`].
pub(crate) fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        s.store(true, std::sync::atomic::Ordering::SeqCst);
    }) {
        tracing::warn!("cannot install the Ctrl-C handler: {e}");
    }
    stop
}

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let pipeline = match Pipeline::load(&a.pipeline) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("adverse run: {e}");
            return Ok(ExitCode::from(exit::USAGE));
        }
    };
    let opts = RunOptions {
        input: a.input,
        output: a.output,
        backend: a.backend,
        jobs: a.jobs,
        force: a.force,
        progress: !a.quiet,
        ..RunOptions::default()
    };
    let summary = match engine::run(&pipeline, &opts, stop_flag()) {
        Ok(s) => s,
        Err(e @ EngineError::Setup(_)) => {
            eprintln!("adverse run: {}: {e}", a.pipeline.display());
            return Ok(ExitCode::from(exit::USAGE));
        }
        Err(e) => return Err(e.into()),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_table(&summary);
    }
    Ok(ExitCode::from(if summary.interrupted {
        exit::INTERRUPTED
    } else if summary.failed > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    }))
}

fn print_table(s: &Summary) {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let t = &s.totals;
    println!("pipeline {} on {}", s.pipeline, s.backend);
    println!(
        "  this run     {} processed, {} failed, {} skipped (done before), {} frames in {:.2} s ({:.1} files/s, {:.1} frames/s{})",
        s.processed,
        s.failed,
        s.skipped,
        s.frames,
        s.seconds,
        s.files_per_second,
        s.frames_per_second,
        s.peak_rss_bytes
            .map(|b| format!(", peak RSS {:.1} MiB", b as f64 / 1048576.0))
            .unwrap_or_default()
    );
    println!(
        "  output       {} instances ({} ok, {} failed, {} written), {} frames",
        t.instances, t.instances_ok, t.instances_failed, t.instances_written, t.frames
    );
    println!(
        "  accuracy     before {}  after (re-read) {}  over {} labelled frames",
        pct(t.accuracy_before),
        pct(t.accuracy_after),
        t.labelled_frames
    );
    if t.attacked_frames > 0 {
        println!(
            "  attack       success {} of {} frames; mean L∞ {} L2 {} (stored units); PSNR {} dB, SSIM {}",
            pct(t.attack_success_rate),
            t.attacked_frames,
            num(t.mean_linf_stored),
            num(t.mean_l2_stored),
            num(t.mean_psnr_db),
            num(t.mean_ssim)
        );
    } else if t.mean_linf_stored.is_some() {
        println!(
            "  change       mean L∞ {} L2 {} (stored units); PSNR {} dB, SSIM {}",
            num(t.mean_linf_stored),
            num(t.mean_l2_stored),
            num(t.mean_psnr_db),
            num(t.mean_ssim)
        );
    }
    if t.flagged_frames > 0 {
        println!("  detectors    {} frames flagged", t.flagged_frames);
    }
    for (f, e) in &s.failures {
        println!("  failed       {f}: {e}");
    }
    if s.interrupted {
        println!(
            "  interrupted: re-run the same command to finish (finished instances are skipped)"
        );
    }
}
