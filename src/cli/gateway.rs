//! `llmroute gateway ...`: the commands run inside a gateway Pod (see `llmroute::agent`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{duration_arg, init_logging, shutdown_signal};

#[derive(Subcommand)]
pub enum GatewayCommand {
    /// Serve GET /shutdown/ready, which answers once a drain by `llmroute gateway shutdown` is done
    /// (or after --ready-timeout): the preStop hook of the Envoy container. Exits on SIGTERM.
    ShutdownManager(ShutdownManagerArgs),
    /// Drain the gateway's Envoy gracefully, wait until no request is in flight (between
    /// --min-drain and --max-drain), then tell the manager: the sidecar's preStop command.
    Shutdown(ShutdownArgs),
    /// Copy llmroute's Envoy dynamic modules from this image into a directory the Envoy container
    /// mounts: the gateway Pod's init container.
    InstallModules(InstallModulesArgs),
}

#[derive(Args)]
pub struct InstallModulesArgs {
    /// Directory the modules are copied from.
    #[arg(long, default_value = llmroute::agent::modules::IMAGE_MODULES_DIR)]
    from: PathBuf,
    /// Directory (a volume shared with Envoy) the modules are copied to.
    #[arg(long, default_value = llmroute::gateway::objects::MODULES_DIR)]
    to: PathBuf,
}

#[derive(Args)]
pub struct ShutdownManagerArgs {
    /// Address to serve on.
    #[arg(long, default_value = "0.0.0.0")]
    address: std::net::IpAddr,
    /// Port to serve on.
    #[arg(long, default_value_t = llmroute::agent::drain::DEFAULT_MANAGER_PORT)]
    port: u16,
    /// Directory shared with `shutdown` (where it marks the drain done).
    #[arg(long, default_value = llmroute::agent::drain::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Longest hold of GET /shutdown/ready (Go-style duration; the gateway Deployment passes the
    /// maximum drain plus 10 s).
    #[arg(long, default_value = "310s")]
    ready_timeout: String,
    /// Envoy's access log (a file in a volume shared with Envoy): followed to count token usage
    /// (served at /metrics and /usage) and printed to stdout; empty: none.
    #[arg(long, default_value = llmroute::gateway::objects::USAGE_LOG_FILE)]
    usage_log: PathBuf,
    /// The gateway's namespace, a label of the usage metrics.
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    namespace: String,
    /// Port of the usage endpoint (`/usage`, `/usage/ack`: mutual TLS, the operator only).
    #[arg(long, default_value_t = llmroute::gateway::objects::USAGE_PORT)]
    usage_port: u16,
    /// Directory of the gateway's certificate (`tls.crt`, `tls.key`, `ca.crt`: the xDS Secret)
    /// the usage endpoint serves with; empty: no usage endpoint (counts only in /metrics).
    #[arg(long, default_value = llmroute::gateway::objects::XDS_CERT_DIR)]
    tls_dir: String,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "info", env = "LLMROUTE_LOG")]
    log_level: String,
}

#[derive(Args)]
pub struct ShutdownArgs {
    /// Port of Envoy's admin interface on 127.0.0.1.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// Drain at least this long (Go-style duration): time for endpoint removal to propagate. The
    /// gateway Deployment passes its timings explicitly.
    #[arg(long, default_value = "10s")]
    min_drain: String,
    /// Drain at most this long, requests in flight or not (Go-style duration).
    #[arg(long, default_value = "300s")]
    max_drain: String,
    /// Pause between two reads of the active requests (Go-style duration).
    #[arg(long, default_value = "500ms")]
    poll: String,
    /// Directory shared with the manager.
    #[arg(long, default_value = llmroute::agent::drain::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "info", env = "LLMROUTE_LOG")]
    log_level: String,
}

/// Runs a gateway Pod command.
pub fn run(command: GatewayCommand) -> ExitCode {
    use llmroute::agent::{drain, server};
    match command {
        GatewayCommand::ShutdownManager(args) => {
            init_logging("text", &args.log_level);
            let ready_timeout = match duration_arg("ready-timeout", &args.ready_timeout) {
                Ok(d) => d,
                Err(code) => return code,
            };
            let opts = server::ManagerOptions {
                addr: std::net::SocketAddr::new(args.address, args.port),
                state_dir: args.state_dir,
                ready_timeout,
                usage_log: (!args.usage_log.as_os_str().is_empty()).then_some(args.usage_log),
                namespace: args.namespace,
                usage_endpoint: (!args.tls_dir.is_empty()).then(|| server::UsageEndpoint {
                    addr: std::net::SocketAddr::new(args.address, args.usage_port),
                    cert_dir: args.tls_dir.into(),
                }),
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(server::serve_manager(opts, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "shutdown manager failed");
                    ExitCode::from(1)
                }
            }
        }
        GatewayCommand::InstallModules(args) => {
            match llmroute::agent::modules::install(&args.from, &args.to) {
                Ok(files) => {
                    for f in files {
                        println!("installed {}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        GatewayCommand::Shutdown(args) => {
            init_logging("text", &args.log_level);
            let parse = || -> Result<_, ExitCode> {
                Ok((
                    duration_arg("min-drain", &args.min_drain)?,
                    duration_arg("max-drain", &args.max_drain)?,
                    duration_arg("poll", &args.poll)?,
                ))
            };
            let (min_drain, max_drain, poll) = match parse() {
                Ok(t) => t,
                Err(code) => return code,
            };
            let opts = drain::DrainOptions {
                admin_port: args.admin_port,
                min_drain,
                max_drain,
                poll,
                state_dir: args.state_dir,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(drain::drain(&opts)) {
                drain::DrainOutcome::AdminUnreachable(_) => ExitCode::from(1),
                drain::DrainOutcome::Drained | drain::DrainOutcome::TimedOut { .. } => {
                    ExitCode::SUCCESS
                }
            }
        }
    }
}
