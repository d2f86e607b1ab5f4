//! `gantry`: train, evaluate and benchmark models; run the job service (`gantry daemon`), its
//! workers, and its command-line client.

mod cli;
mod commands;
mod config;
mod error;
mod grpc;
mod http;
mod metrics;
mod progress;
mod service;
mod store;
mod supervisor;
#[cfg(test)]
mod testing;
mod worker;

use clap::Parser;

fn main() -> std::process::ExitCode {
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
