//! The `llmroute` command line: `crd`, `render`, `run` and `gateway` (the commands run inside a
//! gateway Pod). Each command's flags and start-up live in its own file; this one parses and hands
//! over.

mod gateway;
mod render;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "llmroute",
    version,
    about = "Route in-cluster LLM traffic across providers, with failover"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every CustomResourceDefinition llmroute serves, as YAML (what `crds/` holds).
    Crd,
    /// Render LLMRoute files offline: print the objects the operator would apply (Secret values
    /// redacted), or with --out-dir write the gateway's Envoy files for a local Envoy.
    Render(render::RenderArgs),
    /// Run the operator: reconcile LLMRoutes into per-namespace gateways (uses KUBECONFIG or the
    /// in-cluster service account).
    Run(Box<run::RunArgs>),
    /// Commands run inside a gateway Pod (its shutdown-manager sidecar).
    #[command(subcommand)]
    Gateway(gateway::GatewayCommand),
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", llmroute::api::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Render(args) => render::run(args),
        Command::Run(args) => run::run(*args),
        Command::Gateway(command) => gateway::run(command),
    }
}

pub(crate) fn duration_arg(flag: &str, value: &str) -> Result<std::time::Duration, ExitCode> {
    llmroute::api::duration_ms(value)
        .map(std::time::Duration::from_millis)
        .map_err(|e| {
            eprintln!("error: --{flag} {e}");
            ExitCode::from(2)
        })
}

pub(crate) fn init_logging(format: &str, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
