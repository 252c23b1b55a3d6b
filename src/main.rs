//! The `llmroute` command: `crd`, `render`, `run` and `gateway` (the gateway Pod's sidecar).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use llmroute::gateway::envoy::{EnvoyOptions, XdsClient};
use llmroute::gateway::objects::GatewayDeploymentOptions;
use llmroute::render::{self, RenderOptions};

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
    Render(RenderArgs),
    /// Run the operator: reconcile LLMRoutes into per-namespace gateways (uses KUBECONFIG or the
    /// in-cluster service account).
    Run(Box<RunArgs>),
    /// Commands run inside a gateway Pod (its shutdown-manager sidecar).
    #[command(subcommand)]
    Gateway(GatewayCommand),
}

#[derive(Subcommand)]
enum GatewayCommand {
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
struct InstallModulesArgs {
    /// Directory the modules are copied from.
    #[arg(long, default_value = llmroute::agent::modules::IMAGE_MODULES_DIR)]
    from: PathBuf,
    /// Directory (a volume shared with Envoy) the modules are copied to.
    #[arg(long, default_value = llmroute::gateway::objects::MODULES_DIR)]
    to: PathBuf,
}

#[derive(Args)]
struct ShutdownManagerArgs {
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
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "info", env = "LLMROUTE_LOG")]
    log_level: String,
}

#[derive(Args)]
struct ShutdownArgs {
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

fn duration_arg(flag: &str, value: &str) -> Result<std::time::Duration, ExitCode> {
    llmroute::api::duration_ms(value)
        .map(std::time::Duration::from_millis)
        .map_err(|e| {
            eprintln!("error: --{flag} {e}");
            ExitCode::from(2)
        })
}

fn run_gateway(command: GatewayCommand) -> ExitCode {
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

#[derive(Args)]
struct RunArgs {
    /// Watch only these namespaces (repeat the flag or separate with commas; default: all namespaces).
    #[arg(long = "namespace", env = "LLMROUTE_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Region of routes whose spec has none (lower-case ISO 3166-1 alpha-2).
    #[arg(long, default_value = "us", env = "LLMROUTE_DEFAULT_REGION")]
    default_region: String,
    /// Envoy image of the gateway Deployments.
    #[arg(long, default_value = llmroute::gateway::objects::DEFAULT_ENVOY_IMAGE, env = "LLMROUTE_ENVOY_IMAGE")]
    envoy_image: String,
    /// Image of the gateway Pods' shutdown-manager sidecar: this operator's own image (the manifests
    /// and the Helm chart pass the image they deploy the operator with).
    #[arg(long, default_value = llmroute::gateway::objects::DEFAULT_SHUTDOWN_MANAGER_IMAGE, env = "LLMROUTE_SHUTDOWN_MANAGER_IMAGE")]
    shutdown_manager_image: String,
    /// Replicas of each gateway Deployment.
    #[arg(long, default_value_t = 2, env = "LLMROUTE_GATEWAY_REPLICAS")]
    gateway_replicas: i32,
    /// Namespace the operator runs in: its xDS CA Secret, its xDS Service and (by default) its
    /// leader Lease are there.
    #[arg(long, default_value = "llmroute-system", env = "POD_NAMESPACE")]
    operator_namespace: String,
    /// Address the xDS server (the gateways' configuration) listens on.
    #[arg(long, default_value = "0.0.0.0:18000", env = "LLMROUTE_XDS_LISTEN")]
    xds_listen: std::net::SocketAddr,
    /// `host:port` gateways dial for their configuration (written in their bootstrap; the serving
    /// certificate names the host). Default: the xDS Service, llmroute-xds.<operator namespace>.svc:18000.
    #[arg(long, env = "LLMROUTE_XDS_ADDRESS")]
    xds_address: Option<String>,
    /// Name of the Service (without selector) gateways dial: the leader points it at itself with an
    /// EndpointSlice (needs POD_IP). Empty: no EndpointSlice is written.
    #[arg(long, default_value = "llmroute-xds")]
    xds_service: String,
    /// The Secret holding the xDS CA, as NAMESPACE/NAME (created when missing). Default:
    /// <operator namespace>/llmroute-xds-ca.
    #[arg(long)]
    xds_ca_secret: Option<String>,
    /// Where gateway Pods mount their xDS client certificate (written in their bootstrap).
    #[arg(long, default_value = llmroute::gateway::objects::XDS_CERT_DIR)]
    gateway_xds_cert_dir: String,
    /// Port of the gateway listener inside the Pod (the Service always exposes 8080).
    #[arg(long, default_value_t = 8080)]
    gateway_port: u16,
    /// Address the gateway's listeners bind inside the Pod.
    #[arg(long, default_value = "0.0.0.0")]
    gateway_address: String,
    /// Port of the gateway's readiness and metrics listener.
    #[arg(long, default_value_t = 19003)]
    gateway_health_port: u16,
    /// Port of the gateway's admin interface (bound to 127.0.0.1).
    #[arg(long, default_value_t = 9901)]
    gateway_admin_port: u16,
    /// File of the gateway's access log, which the Pod's sidecar follows to count token usage (a
    /// volume both share); empty: the access log goes to Envoy's stdout and no usage is counted.
    #[arg(long, default_value = llmroute::gateway::objects::USAGE_LOG_FILE)]
    gateway_usage_log: String,
    /// llmroute's Envoy dynamic module that reads streamed answers' usage, as the gateway's Envoy
    /// finds it (its init container copies it from the shutdown-manager image); empty: streams'
    /// usage is not read.
    #[arg(long, default_value = llmroute::gateway::objects::USAGE_MODULE_FILE)]
    gateway_usage_module: String,
    /// CA bundle (a file of the gateway's image) the gateway verifies providers' TLS certificates
    /// against, when --upstream-ca-file is not given.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    gateway_trusted_ca: String,
    /// Run the controller only while holding the leader Lease (for more than one replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "LLMROUTE_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease (default: the operator's namespace).
    #[arg(long)]
    leader_election_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, default_value = "llmroute-operator")]
    leader_election_name: String,
    /// Address of the operator's /metrics, /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:9090", env = "LLMROUTE_HTTP_ADDR")]
    http_addr: std::net::SocketAddr,
    /// Health probes in flight at most.
    #[arg(long, default_value_t = 32)]
    probe_concurrency: usize,
    /// Namespaces reconciled at once at most. Each reconcile holds its namespace's configuration
    /// while it waits on the API server: more overlap more waiting, and cost memory.
    #[arg(long, default_value_t = llmroute::operator::RECONCILE_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    reconcile_concurrency: u16,
    /// How often the leader reads every gateway replica's token and cost counts (Go-style
    /// duration): budgets are enforced and status usage is updated at this pace, so traffic can
    /// overshoot a budget by this much. `0s`: never (no budgets, no status usage).
    #[arg(long, default_value = "10s")]
    usage_interval: String,
    /// Extra CA certificates (PEM) trusted for providers' TLS besides the system's (private
    /// endpoints, a corporate CA): by the prober, and by the gateways (served to them over xDS with
    /// the system roots of --system-ca-file).
    #[arg(long, env = "LLMROUTE_UPSTREAM_CA_FILE", alias = "probe-ca-file")]
    upstream_ca_file: Option<PathBuf>,
    /// The system's CA bundle, served to gateways with --upstream-ca-file's certificates.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    system_ca_file: PathBuf,
    /// Log format: text or json.
    #[arg(long, default_value = "text", env = "LLMROUTE_LOG_FORMAT")]
    log_format: String,
    /// Log filter (tracing EnvFilter syntax), e.g. info or llmroute=debug.
    #[arg(long, default_value = "info", env = "LLMROUTE_LOG")]
    log_level: String,
}

fn init_logging(format: &str, level: &str) {
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

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn run_operator(args: RunArgs) -> ExitCode {
    init_logging(&args.log_format, &args.log_level);
    let upstream_ca = match &args.upstream_ca_file {
        None => None,
        Some(extra) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
            };
            match (read(&args.system_ca_file), read(extra)) {
                (Ok(system), Ok(extra)) => Some(format!("{}\n{}", system.trim_end(), extra)),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("error: --upstream-ca-file: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let ca_secret = match args.xds_ca_secret.as_deref().map(|s| s.split_once('/')) {
        None => (
            args.operator_namespace.clone(),
            "llmroute-xds-ca".to_string(),
        ),
        Some(Some((ns, name))) if !ns.is_empty() && !name.is_empty() => (ns.into(), name.into()),
        Some(_) => {
            eprintln!("error: --xds-ca-secret must be NAMESPACE/NAME");
            return ExitCode::from(2);
        }
    };
    let xds_client = XdsClient {
        address: args.xds_address.clone().unwrap_or_else(|| {
            format!(
                "{}.{}.svc:{}",
                args.xds_service,
                args.operator_namespace,
                args.xds_listen.port()
            )
        }),
        cert_dir: args.gateway_xds_cert_dir.clone(),
    };
    let usage_interval = match duration_arg("usage-interval", &args.usage_interval) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async move {
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build a Kubernetes client (KUBECONFIG or in-cluster config)");
                return ExitCode::from(1);
            }
        };
        let identity = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("llmroute-{}", std::process::id()));
        let opts = llmroute::operator::Options {
            namespace: None,
            default_region: args.default_region,
            gateway: GatewayDeploymentOptions {
                image: args.envoy_image,
                replicas: args.gateway_replicas,
                shutdown_manager_image: args.shutdown_manager_image,
            },
            envoy: EnvoyOptions {
                port: args.gateway_port,
                address: args.gateway_address,
                admin_port: args.gateway_admin_port,
                health_port: args.gateway_health_port,
                trusted_ca: args.gateway_trusted_ca,
                usage_log: args.gateway_usage_log,
                usage_module: args.gateway_usage_module,
            },
            identity,
            reconcile_concurrency: args.reconcile_concurrency,
            usage_interval,
            prober: llmroute::probe::ProberOptions {
                concurrency: args.probe_concurrency,
                extra_ca: args.upstream_ca_file,
            },
            ..Default::default()
        };
        let namespaces = args.namespaces;
        let http = tokio::spawn(llmroute::operator::http::serve(
            args.http_addr,
            opts.metrics.clone(),
            opts.runtime.clone(),
            args.leader_elect,
            shutdown_signal(),
        ));
        tokio::spawn(async move {
            if let Ok(Err(e)) = http.await {
                tracing::error!(error = %e, "the /metrics, /healthz and /readyz server stopped");
            }
        });
        // Streams are served by the leader only (or always, without leader election).
        let (serving_tx, serving) = tokio::sync::watch::channel(!args.leader_elect);
        let xds_opts = llmroute::operator::xds::XdsOptions {
            listen: args.xds_listen,
            client: xds_client,
            ca_secret,
            upstream_ca,
        };
        let xds = match llmroute::operator::xds::start(
            &client,
            &xds_opts,
            serving.clone(),
            opts.metrics.clone(),
            shutdown_signal(),
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the xDS server");
                return ExitCode::from(1);
            }
        };
        tracing::info!(namespaces = ?namespaces, region = %opts.default_region, "starting llmroute operator");
        let writes = std::sync::Arc::new(llmroute::operator::apply::WriteCounter::default());
        if !args.leader_elect {
            llmroute::operator::run_scoped(client, opts, xds, namespaces, writes, shutdown_signal()).await;
            return ExitCode::SUCCESS;
        }
        let lease = llmroute::operator::leader::LeaseConfig {
            namespace: args
                .leader_election_namespace
                .unwrap_or_else(|| args.operator_namespace.clone()),
            name: args.leader_election_name,
            identity: opts.identity.clone(),
            duration: std::time::Duration::from_secs(15),
            renew_every: std::time::Duration::from_secs(5),
        };
        let runtime = opts.runtime.clone();
        let work_client = client.clone();
        let endpoint = std::env::var("POD_IP")
            .ok()
            .filter(|ip| !ip.is_empty() && !args.xds_service.is_empty())
            .map(|ip| (args.operator_namespace.clone(), args.xds_service.clone(), ip, args.xds_listen.port()));
        let work = |stop: tokio::sync::oneshot::Receiver<()>| async move {
            use std::sync::atomic::Ordering::SeqCst;
            runtime.leading.store(true, SeqCst);
            serving_tx.send_replace(true);
            if let Some((ns, service, ip, port)) = endpoint {
                tokio::spawn(llmroute::operator::xds::publish_leader_endpoint(
                    work_client.clone(),
                    ns,
                    service,
                    ip,
                    port,
                    serving,
                ));
            }
            llmroute::operator::run_scoped(work_client, opts, xds, namespaces, writes, async move {
                let _ = stop.await;
            })
            .await;
            serving_tx.send_replace(false);
            runtime.leading.store(false, SeqCst);
        };
        match llmroute::operator::leader::lead(client.clone(), lease, shutdown_signal(), work).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "stepping down; exiting so that a fresh process rejoins as a follower");
                ExitCode::from(1)
            }
        }
    })
}

#[derive(Args)]
struct RenderArgs {
    /// LLMRoute YAML files (multi-document streams allowed; other kinds are ignored).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Namespace of routes whose metadata has none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Region of routes whose spec has none (lower-case ISO 3166-1 alpha-2).
    #[arg(long, default_value = "us", env = "LLMROUTE_DEFAULT_REGION")]
    default_region: String,
    /// Write the gateway's files into DIR (keys as placeholders in DIR/keys) instead of printing objects.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Port of the gateway listener (with --out-dir).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address of the gateway listener (with --out-dir).
    #[arg(long, default_value = "0.0.0.0")]
    address: String,
    /// Port of Envoy's admin interface, bound to 127.0.0.1.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// Port of the readiness and metrics listener.
    #[arg(long, default_value_t = 19003)]
    health_port: u16,
    /// File of the access log, which the gateway Pod's sidecar follows to count token usage;
    /// empty: the access log goes to stdout.
    #[arg(long, default_value = llmroute::gateway::objects::USAGE_LOG_FILE)]
    usage_log: String,
    /// llmroute's Envoy dynamic module reading streamed answers' usage (`sse-usage/`), as Envoy
    /// finds it; empty: streams' usage is not read.
    #[arg(long, default_value = llmroute::gateway::objects::USAGE_MODULE_FILE)]
    usage_module: String,
    /// CA bundle used to verify providers' TLS certificates.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    trusted_ca: String,
    /// Envoy image of the gateway Deployment.
    #[arg(long, default_value = llmroute::gateway::objects::DEFAULT_ENVOY_IMAGE)]
    envoy_image: String,
    /// Image of the gateway Deployment's shutdown-manager sidecar (the operator's image).
    #[arg(long, default_value = llmroute::gateway::objects::DEFAULT_SHUTDOWN_MANAGER_IMAGE)]
    shutdown_manager_image: String,
}

fn run_render(args: RenderArgs) -> ExitCode {
    let routes = match render::load_files(&args.files) {
        Ok(routes) => routes,
        Err(errors) => {
            for e in errors {
                eprintln!("error: {e}");
            }
            return ExitCode::from(1);
        }
    };
    if routes.is_empty() {
        eprintln!(
            "error: no LLMRoute found in {}",
            args.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return ExitCode::from(1);
    }
    let mut envoy = EnvoyOptions {
        port: args.port,
        address: args.address,
        admin_port: args.admin_port,
        health_port: args.health_port,
        trusted_ca: args.trusted_ca,
        usage_log: args.usage_log,
        usage_module: args.usage_module,
    };
    // Files for an Envoy on this machine: an access log in a directory that is not here (the Pod's
    // volume is the default) would fail Envoy's start, so the log goes to stdout instead, and a
    // module Envoy cannot load would reject the listener, so one that is not here is left out.
    // Both are said.
    let usage_log_dir = std::path::Path::new(&envoy.usage_log).parent();
    if args.out_dir.is_some()
        && !envoy.usage_log.is_empty()
        && !usage_log_dir.is_some_and(|d| d.as_os_str().is_empty() || d.is_dir())
    {
        eprintln!(
            "note: the access log goes to stdout: no directory for {} here (--usage-log FILE)",
            envoy.usage_log
        );
        envoy.usage_log.clear();
    }
    if args.out_dir.is_some()
        && !envoy.usage_module.is_empty()
        && !std::path::Path::new(&envoy.usage_module).is_file()
    {
        eprintln!(
            "note: streams' usage is not read: no usage module at {} (cargo build -p llmroute-sse-usage, then --usage-module target/debug/{})",
            envoy.usage_module,
            llmroute::gateway::envoy::SSE_USAGE_MODULE_FILE
        );
        envoy.usage_module.clear();
    }
    let opts = RenderOptions {
        namespace: args.namespace,
        default_region: args.default_region,
        envoy: envoy.clone(),
        xds: XdsClient::default(),
        deployment: GatewayDeploymentOptions {
            image: args.envoy_image,
            shutdown_manager_image: args.shutdown_manager_image,
            ..Default::default()
        },
    };
    let renders = render::translate_offline(&routes, &opts);
    for ns in &renders {
        for outcome in &ns.translation.routes {
            if let Err(p) = &outcome.programmed {
                eprintln!(
                    "warning: namespace {:?}: LLMRoute {:?} is not programmed: {}: {}",
                    ns.namespace, outcome.name, p.reason, p.message
                );
            }
        }
    }
    let Some(dir) = args.out_dir else {
        print!("{}", render::objects_yaml(&renders, &opts));
        return ExitCode::SUCCESS;
    };
    if renders.len() != 1 {
        eprintln!(
            "error: --out-dir renders one gateway: the routes given span {} namespaces",
            renders.len()
        );
        return ExitCode::from(2);
    }
    let dir = match std::fs::create_dir_all(&dir).and_then(|_| std::path::absolute(&dir)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    match render::write_gateway_dir(&renders[0], &dir, &envoy) {
        Ok(route_keys) => {
            eprintln!(
                "wrote {}/bootstrap.yaml; run: envoy -c {}/bootstrap.yaml",
                dir.display(),
                dir.display()
            );
            for (route, key) in route_keys {
                eprintln!(
                    "route {route}: http://127.0.0.1:{}/{route}/v1 with OPENAI_API_KEY={key}",
                    envoy.port
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: writing {}: {e}", dir.display());
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", llmroute::api::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Render(args) => run_render(args),
        Command::Run(args) => run_operator(*args),
        Command::Gateway(command) => run_gateway(command),
    }
}
