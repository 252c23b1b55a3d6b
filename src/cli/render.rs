//! `llmroute render`: LLMRoute files rendered offline (see `llmroute::render`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use llmroute::gateway::envoy::{EnvoyOptions, XdsClient};
use llmroute::gateway::objects::GatewayDeploymentOptions;
use llmroute::render::{self, RenderOptions};

#[derive(Args)]
pub struct RenderArgs {
    /// LLMRoute YAML files (multi-document streams allowed; other kinds are ignored).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Namespace of routes whose metadata has none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Region of routes whose spec has none (lower-case ISO 3166-1 alpha-2).
    #[arg(long, default_value = "us", env = "LLMROUTE_DEFAULT_REGION")]
    default_region: String,
    /// Namespace the operator runs in (the gateways' NetworkPolicy lets its Pods read usage).
    #[arg(long, default_value = "llmroute-system")]
    operator_namespace: String,
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

/// Renders the files.
pub fn run(args: RenderArgs) -> ExitCode {
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
        operator_namespace: args.operator_namespace,
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
