//! The command-line interface: argument parsing and dispatch to the library. Each subcommand
//! returns an [`ExitCode`]; per-file failures are counted and reported, never fatal.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod audit;
pub mod detector;
pub mod evaluate;
pub mod inspect;
pub mod model;
pub mod plugins;
pub mod report;
pub mod run;
pub mod train;
pub mod validate;
pub mod watch;

/// Exit codes shared by every subcommand.
pub mod exit {
    /// Everything processed.
    pub const OK: u8 = 0;
    /// Some inputs failed (each reported); the run went on.
    pub const SOME_FAILED: u8 = 1;
    /// Usage, configuration or pipeline error: nothing was processed.
    pub const USAGE: u8 = 2;
    /// The run was interrupted.
    pub const INTERRUPTED: u8 = 3;
}

#[derive(Parser, Debug)]
#[command(
    name = "adverse",
    version,
    about = "Red-team and protect medical-imaging AI on DICOM data"
)]
pub struct Cli {
    /// More log detail on stderr (-v: info, -vv: debug). `ADVERSE_LOG` (tracing filter syntax)
    /// overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Logs go to stderr so stdout stays machine-readable (`--json`, `.npy` paths); warnings are
/// always shown because they carry things a user must act on (a skipped GPU, a fallback).
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("ADVERSE_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| {
            EnvFilter::new(match verbose {
                0 => "warn",
                1 => "warn,adverse=info",
                _ => "info,adverse=debug",
            })
        });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe DICOM files (syntax, geometry, bits, rescale, window) and check they decode.
    Inspect(inspect::InspectArgs),
    /// Run a pipeline (YAML) over a DICOM file or folder: stages, derived DICOM, results, audit.
    Run(run::RunArgs),
    /// Inspect and run ONNX models.
    Model(model::ModelArgs),
    /// List, inspect and run plugins.
    Plugins(plugins::PluginsArgs),
    /// Create a new plugin crate.
    Plugin(plugins::PluginArgs),
    /// Train a classifier from a YAML config, evaluate it and export ONNX + model card.
    Train(train::TrainArgs),
    /// Check a tamper-evident audit log.
    Audit(audit::AuditArgs),
    /// Check a pipeline file and report every problem at once (exit 2 if any).
    Validate(validate::ValidateArgs),
    /// Run a robustness evaluation: attacks x budgets x defenses, with sanity checks.
    Evaluate(evaluate::EvaluateArgs),
    /// Write the self-contained HTML report of an evaluation folder.
    Report(report::ReportArgs),
    /// Watch a folder: screen or purify every DICOM file dropped into it (exactly once).
    Watch(watch::WatchArgs),
    /// Fit feature-space detectors (mahalanobis, lid, kde-bu) on clean frames.
    Detector(detector::DetectorArgs),
}

/// Parse arguments and run. Usage errors exit with [`exit::USAGE`].
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return Ok(ExitCode::from(code));
        }
    };
    init_logging(cli.verbose);
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Run(a) => run::run(a),
        Command::Model(a) => model::run(a),
        Command::Plugins(a) => plugins::run(a),
        Command::Plugin(a) => plugins::run_new(a),
        Command::Train(a) => train::run(a),
        Command::Audit(a) => audit::run(a),
        Command::Validate(a) => validate::run(a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::Report(a) => report::run(a),
        Command::Watch(a) => watch::run(a),
        Command::Detector(a) => detector::run(a),
    }
}
