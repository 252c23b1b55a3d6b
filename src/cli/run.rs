//! `llmroute run`: the operator's flags and start-up.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use llmroute::gateway::envoy::{EnvoyOptions, XdsClient};
use llmroute::gateway::objects::GatewayDeploymentOptions;
use llmroute::operator::clock::Clock;

use super::{duration_arg, init_logging, shutdown_signal};

#[derive(Args)]
pub struct RunArgs {
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
    /// Namespace the operator runs in: its xDS CA Secret, its xDS Service, the usage ledgers of
    /// budgets and (by default) its leader Lease are there.
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
    /// Tests only: the instant (RFC 3339) the calendar of budget periods reads at start; it then
    /// advances with the wall clock. Lets a test cross a period's end (a local midnight) in seconds.
    #[arg(long, hide = true, value_parser = parse_instant_ms)]
    test_clock_start: Option<u64>,
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

/// The operator's CA bundle for providers: the system's with the extra certificates, when some
/// are given.
fn upstream_ca(args: &RunArgs) -> Result<Option<String>, ExitCode> {
    let Some(extra) = &args.upstream_ca_file else {
        return Ok(None);
    };
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
    };
    match (read(&args.system_ca_file), read(extra)) {
        (Ok(system), Ok(extra)) => Ok(Some(format!("{}\n{}", system.trim_end(), extra))),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: --upstream-ca-file: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// The Secret holding the xDS CA: (namespace, name).
fn ca_secret(args: &RunArgs) -> Result<(String, String), ExitCode> {
    match args.xds_ca_secret.as_deref().map(|s| s.split_once('/')) {
        None => Ok((
            args.operator_namespace.clone(),
            "llmroute-xds-ca".to_string(),
        )),
        Some(Some((ns, name))) if !ns.is_empty() && !name.is_empty() => {
            Ok((ns.into(), name.into()))
        }
        Some(_) => {
            eprintln!("error: --xds-ca-secret must be NAMESPACE/NAME");
            Err(ExitCode::from(2))
        }
    }
}

/// The xDS server's options: where it listens, what gateways dial.
fn xds_options(args: &RunArgs) -> Result<llmroute::operator::xds::XdsOptions, ExitCode> {
    let upstream_ca = upstream_ca(args)?;
    let client = XdsClient {
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
    Ok(llmroute::operator::xds::XdsOptions {
        listen: args.xds_listen,
        client,
        ca_secret: ca_secret(args)?,
        upstream_ca,
    })
}

/// An RFC 3339 instant, in milliseconds since the Unix epoch.
fn parse_instant_ms(text: &str) -> Result<u64, String> {
    let at: jiff::Timestamp = text
        .parse()
        .map_err(|e| format!("not an RFC 3339 instant: {e}"))?;
    u64::try_from(at.as_millisecond()).map_err(|_| "before 1970".to_string())
}

/// The operator's options from its flags.
fn operator_options(
    args: &RunArgs,
    usage_interval: std::time::Duration,
) -> llmroute::operator::Options {
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("llmroute-{}", std::process::id()));
    llmroute::operator::Options {
        namespace: None,
        default_region: args.default_region.clone(),
        gateway: GatewayDeploymentOptions {
            image: args.envoy_image.clone(),
            replicas: args.gateway_replicas,
            shutdown_manager_image: args.shutdown_manager_image.clone(),
        },
        envoy: EnvoyOptions {
            port: args.gateway_port,
            address: args.gateway_address.clone(),
            admin_port: args.gateway_admin_port,
            health_port: args.gateway_health_port,
            trusted_ca: args.gateway_trusted_ca.clone(),
            usage_log: args.gateway_usage_log.clone(),
            usage_module: args.gateway_usage_module.clone(),
        },
        identity,
        ledger_namespace: args.operator_namespace.clone(),
        reconcile_concurrency: args.reconcile_concurrency,
        usage_interval,
        clock: args
            .test_clock_start
            .map_or_else(Clock::system, Clock::starting_at),
        prober: llmroute::probe::ProberOptions {
            concurrency: args.probe_concurrency,
            extra_ca: args.upstream_ca_file.clone(),
        },
        ..Default::default()
    }
}

/// Runs the operator until SIGTERM.
pub fn run(args: RunArgs) -> ExitCode {
    init_logging(&args.log_format, &args.log_level);
    let xds_opts = match xds_options(&args) {
        Ok(o) => o,
        Err(code) => return code,
    };
    let usage_interval = match duration_arg("usage-interval", &args.usage_interval) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let opts = operator_options(&args, usage_interval);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(operate(args, opts, xds_opts))
}

/// Serves /metrics, /healthz and /readyz, starts the xDS server, then runs the controllers (as the
/// leader, with leader election).
async fn operate(
    args: RunArgs,
    opts: llmroute::operator::Options,
    xds_opts: llmroute::operator::xds::XdsOptions,
) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Kubernetes client (KUBECONFIG or in-cluster config)");
            return ExitCode::from(1);
        }
    };
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
    let namespaces = args.namespaces.clone();
    tracing::info!(namespaces = ?namespaces, region = %opts.default_region, "starting llmroute operator");
    let writes = std::sync::Arc::new(llmroute::operator::apply::WriteCounter::default());
    if !args.leader_elect {
        llmroute::operator::run_scoped(client, opts, xds, namespaces, writes, shutdown_signal())
            .await;
        return ExitCode::SUCCESS;
    }
    let lease = llmroute::operator::leader::LeaseConfig {
        namespace: args
            .leader_election_namespace
            .clone()
            .unwrap_or_else(|| args.operator_namespace.clone()),
        name: args.leader_election_name.clone(),
        identity: opts.identity.clone(),
        duration: std::time::Duration::from_secs(15),
        renew_every: std::time::Duration::from_secs(5),
    };
    let runtime = opts.runtime.clone();
    let work_client = client.clone();
    let endpoint = std::env::var("POD_IP")
        .ok()
        .filter(|ip| !ip.is_empty() && !args.xds_service.is_empty())
        .map(|ip| {
            (
                args.operator_namespace.clone(),
                args.xds_service.clone(),
                ip,
                args.xds_listen.port(),
            )
        });
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
}
