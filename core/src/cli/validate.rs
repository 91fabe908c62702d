//! `adverse validate FILE [--json]`: every problem of a pipeline file at once.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::exit;
use crate::pipeline::validate::validate_file;

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// The pipeline YAML file.
    pub file: PathBuf,
    /// Print one JSON object (file, ok, problems, name, stages) on stdout instead of text on
    /// stderr.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let report = validate_file(&args.file);
    let n = report.problems.len();
    let (name, stages) = match &report.pipeline {
        Some(p) => (Some(p.spec.name.clone()), Some(p.spec.stages.len())),
        None => (None, None),
    };
    if args.json {
        let obj = json!({
            "file": report.file.display().to_string(),
            "ok": n == 0,
            "problems": report.problems,
            "name": name,
            "stages": stages,
        });
        println!("{obj}");
    } else if n == 0 {
        let k = stages.unwrap_or(0);
        eprintln!(
            "{}: OK ({}, {k} stage{})",
            report.file.display(),
            name.unwrap_or_default(),
            if k == 1 { "" } else { "s" }
        );
    } else {
        for p in &report.problems {
            eprintln!("{}", p.render(&report.file));
        }
        eprintln!("{n} problem{}", if n == 1 { "" } else { "s" });
    }
    Ok(ExitCode::from(if n == 0 { exit::OK } else { exit::USAGE }))
}
