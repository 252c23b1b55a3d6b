//! The `llmroute` command: parses the command line and hands over to the command (see [`cli`]).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
