//! `gantry`: train, evaluate and benchmark models; run the job service (`gantry daemon`), its
//! workers, and its command-line client.

mod auth;
mod cli;
mod commands;
mod config;
mod datadir;
mod engine_config;
mod error;
mod grpc;
mod http;
mod listen;
mod metrics;
mod progress;
mod roots;
mod service;
mod step_record;
mod store;
mod supervisor;
#[cfg(test)]
mod testing;
mod text;
mod web;
mod worker;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // A write past a file-size limit should fail with an error we report (a checkpoint that
    // cannot be written is skipped and training goes on), not kill the process.
    // SAFETY: setting a signal to be ignored installs no handler code; this runs before any
    // thread is started.
    let _ = unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGXFSZ, nix::sys::signal::SigHandler::SigIgn) };
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
