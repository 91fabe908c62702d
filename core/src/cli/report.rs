//! `adverse report DIR`: the HTML report of an evaluation folder.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::exit;
use crate::report::{self, ReportError};

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// An evaluation's output folder (holding `evaluation.json`).
    pub dir: PathBuf,
}

pub fn run(a: ReportArgs) -> anyhow::Result<ExitCode> {
    match report::write(&a.dir) {
        Ok(p) => {
            println!("{}", p.display());
            Ok(ExitCode::from(exit::OK))
        }
        Err(e @ ReportError::Format { .. }) => {
            eprintln!("adverse report: {e}");
            Ok(ExitCode::from(exit::USAGE))
        }
        Err(e @ ReportError::Io { .. }) => {
            eprintln!("adverse report: {e}");
            Ok(ExitCode::from(exit::USAGE))
        }
    }
}
