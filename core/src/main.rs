//! The `adverse` binary: a thin shell over the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    match adverse::cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("adverse: error: {err:#}");
            ExitCode::from(adverse::cli::exit::USAGE)
        }
    }
}
