//! The `skiff` binary: parses the command line and hands over to a command.
#![forbid(unsafe_code)]

mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The sandbox helper must start before anything else: no threads, no
    // runtime, nothing that a fork could inherit half-done.
    if std::env::args_os().nth(1).as_deref() == Some(skiff_sandbox::INIT_ARG.as_ref()) {
        skiff_sandbox::init_main();
    }
    let cli = commands::Cli::parse();
    commands::init_tracing();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
