//! The `llmroute` command: `crd`, `render` and (later) `run`.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "llmroute", version, about = "Route in-cluster LLM traffic across providers, with failover")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every CustomResourceDefinition llmroute serves, as YAML (what `crds/` holds).
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", llmroute::api::crds_yaml());
            ExitCode::SUCCESS
        }
    }
}
