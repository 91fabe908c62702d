//! `adverse audit verify FILE [--json]`: checks an audit log's hash chain, for a compliance
//! officer or a script.
//!
//! Exit codes: 0 the chain verifies (`OK: N records, head <hash>`); 1 it is broken (the first
//! broken record, its line and why, e.g. `BROKEN: record 7 (line 8): hash mismatch: content
//! edited`); 2 usage error or unreadable file (the path is named on stderr).

use std::path::PathBuf;
use std::process::ExitCode;

use super::exit;
use crate::audit;

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify an audit log's hash chain.
    ///
    /// Exit 0: intact (`OK: N records, head HASH`); 1: broken (the first broken record, its
    /// line and why); 2: unreadable file or bad usage. Whole records cut off the end leave a
    /// shorter chain that still verifies: compare the printed head with one kept elsewhere.
    Verify {
        /// The audit log (`audit.jsonl`).
        file: PathBuf,
        /// One JSON object instead of text: {"ok", "records", "head", "broken": null or
        /// {"line", "seq", "kind", "reason"}}.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AuditCommand::Verify { file, json } => verify(&file, json),
    }
}

fn verify(file: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let report = match audit::verify(file) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("adverse audit verify: {e}");
            return Ok(ExitCode::from(exit::USAGE));
        }
    };
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["ok"] = report.is_ok().into();
        println!("{v}");
    } else {
        match &report.broken {
            None => println!("OK: {} records, head {}", report.records, report.head),
            Some(b) => {
                println!("BROKEN: {b}");
                println!(
                    "{} records verify before it, head {}",
                    report.records, report.head
                );
            }
        }
    }
    Ok(ExitCode::from(if report.is_ok() {
        exit::OK
    } else {
        exit::SOME_FAILED
    }))
}
