//! `adverse evaluate EVALUATION.yaml`: attacks × budgets × defenses, measured on written files,
//! with the sanity checks that catch a broken evaluation.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::exit;
use crate::evaluate::spec::Evaluation;
use crate::evaluate::{self, EvalError, EvalOptions};
use crate::runtime::select::BackendChoice;

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The evaluation YAML file.
    pub evaluation: PathBuf,
    /// auto, cpu, gpu or gpu-software (default: the file's `run.backend`, then
    /// $ADVERSE_BACKEND, then auto).
    #[arg(long)]
    pub backend: Option<BackendChoice>,
    /// Decode and write workers per run.
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Redo runs a previous evaluation into the same folder finished.
    #[arg(long)]
    pub force: bool,
    /// Print `evaluation.json` on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// No progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Exit codes: 0 every run finished and every sanity check passed; 1 a check failed or files
/// failed (the tables say which); 2 the file is invalid or a run could not start; 3 interrupted.
pub fn run(a: EvaluateArgs) -> anyhow::Result<ExitCode> {
    let e = match Evaluation::load(&a.evaluation) {
        Ok(e) => e,
        Err(err) => {
            eprintln!("adverse evaluate: {err}");
            return Ok(ExitCode::from(exit::USAGE));
        }
    };
    let opts = EvalOptions {
        backend: a.backend,
        jobs: a.jobs,
        force: a.force,
        verbose: !a.quiet,
    };
    let report = match evaluate::run(&e, &opts, super::run::stop_flag()) {
        Ok(r) => r,
        Err(err @ (EvalError::Engine { .. } | EvalError::Setup(_))) => {
            eprintln!("adverse evaluate: {}: {err}", a.evaluation.display());
            return Ok(ExitCode::from(exit::USAGE));
        }
        Err(err) => return Err(err.into()),
    };
    let html = crate::report::write(&e.output);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", evaluate::markdown(&report));
        println!(
            "\nwritten: {}, evaluation.md and report.html ({:.1} s)",
            e.output.join("evaluation.json").display(),
            report.seconds
        );
    }
    if let Err(err) = html {
        eprintln!("adverse evaluate: the HTML report: {err}");
    }
    let failed_files: usize = report.runs.iter().map(|r| r.failed).sum();
    let failed_checks = report.checks_failed();
    if failed_checks > 0 {
        eprintln!("adverse evaluate: {failed_checks} sanity check(s) failed: see the table");
    }
    if failed_files > 0 {
        eprintln!(
            "adverse evaluate: {failed_files} file(s) failed in the runs: see their results.csv"
        );
    }
    Ok(ExitCode::from(if report.interrupted {
        exit::INTERRUPTED
    } else if failed_checks > 0 || failed_files > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    }))
}
