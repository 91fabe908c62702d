//! The command-line interface: argument parsing and dispatch to the library. Each subcommand
//! returns an [`ExitCode`]; per-file failures are counted and reported, never fatal.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod inspect;
pub mod model;
pub mod train;

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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe DICOM files (syntax, geometry, bits, rescale, window) and check they decode.
    Inspect(inspect::InspectArgs),
    /// Inspect and run ONNX models.
    Model(model::ModelArgs),
    /// Train a classifier from a YAML config, evaluate it and export ONNX + model card.
    Train(train::TrainArgs),
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
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Model(a) => model::run(a),
        Command::Train(a) => train::run(a),
    }
}
