//! Runs provider simulators until SIGTERM or Ctrl-C. Prints one JSON line per simulator:
//! `{"provider":"zhipu","port":18002,"base_url":"http://127.0.0.1:18002/api/paas/v4"}`.
//! Drive them through their admin API (`/__sim/fault`, `/__sim/keys`, `/__sim/requests`).

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use llmroute_devkit::sim::{ALL_PROVIDERS, Sim, SimConfig, SimProvider};

/// LLM provider simulators (see `llmroute_devkit::sim`).
#[derive(Parser, Debug)]
#[command(
    name = "llmroute-sim",
    after_help = "Examples:\n  llmroute-sim --provider openai --key sk-a --port 18001\n  llmroute-sim --sim provider=openai,port=18001,key=sk-a --sim provider=zhipu,key=zk-1,key=zk-2,models=glm-4-plus"
)]
struct Args {
    /// One simulator: `provider=ID[,port=N][,admin-port=N][,key=K]...[,models=M1;M2][,any-model][,base-path=/p]
    /// [,lenient-paths][,stream-chunks=N][,stream-interval-ms=N][,record=false]`. Repeatable.
    #[arg(long = "sim", value_name = "SPEC")]
    sims: Vec<String>,
    /// Shorthand for one simulator (with --key, --port).
    #[arg(long)]
    provider: Option<SimProvider>,
    /// Accepted key of --provider (repeatable).
    #[arg(long = "key")]
    keys: Vec<String>,
    /// Port of --provider (default: any free port).
    #[arg(long)]
    port: Option<u16>,
    /// Serve every simulator over HTTPS (a TLS front per simulator, certificate for 127.0.0.1
    /// from a fresh test CA) and write that CA's certificate (PEM) to FILE.
    #[arg(long, value_name = "FILE")]
    tls_ca_out: Option<std::path::PathBuf>,
    /// Serve every simulator over HTTPS with this directory's `tls.crt` and `tls.key` (a
    /// `kubernetes.io/tls` Secret mounted in a Pod), instead of a fresh CA's.
    #[arg(long, value_name = "DIR", conflicts_with = "tls_ca_out")]
    tls_cert_dir: Option<std::path::PathBuf>,
    /// Address the simulators (and their TLS fronts) listen on; in a Pod, 0.0.0.0.
    #[arg(long, default_value = "127.0.0.1")]
    address: std::net::IpAddr,
    /// List the provider ids and exit.
    #[arg(long)]
    list_providers: bool,
}

fn parse_spec(spec: &str) -> anyhow::Result<SimConfig> {
    let mut provider = None;
    let mut cfg = SimConfig::default();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match k {
            "provider" => provider = Some(v.parse::<SimProvider>().map_err(anyhow::Error::msg)?),
            "port" => cfg.port = v.parse().context("port")?,
            "admin-port" => cfg.admin_port = v.parse().context("admin-port")?,
            "key" => cfg.keys.push(v.to_string()),
            "models" => cfg.models = Some(v.split(';').map(str::to_string).collect()),
            "any-model" => cfg.any_model = true,
            "base-path" => cfg.base_path = Some(v.trim_end_matches('/').to_string()),
            "lenient-paths" => cfg.strict_paths = false,
            "stream-chunks" => cfg.stream_chunks = v.parse().context("stream-chunks")?,
            "stream-interval-ms" => {
                cfg.stream_interval =
                    Duration::from_millis(v.parse().context("stream-interval-ms")?)
            }
            "record" => cfg.record = v.parse().context("record")?,
            other => bail!("unknown field {other:?} in --sim {spec:?}"),
        }
    }
    cfg.provider = provider.with_context(|| format!("--sim {spec:?} needs provider=ID"))?;
    Ok(cfg)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.list_providers {
        for p in ALL_PROVIDERS {
            println!("{p}\t{}\t{}", p.base_path(), p.catalog_models().join(","));
        }
        return Ok(());
    }
    let mut configs = Vec::new();
    if let Some(provider) = args.provider {
        let mut cfg = SimConfig::new(provider).keys(args.keys.clone());
        cfg.port = args.port.unwrap_or(0);
        configs.push(cfg);
    } else if !args.keys.is_empty() || args.port.is_some() {
        bail!("--key and --port go with --provider");
    }
    for spec in &args.sims {
        configs.push(parse_spec(spec)?);
    }
    if configs.is_empty() {
        bail!("nothing to run: give --provider ID or --sim provider=ID,... (see --help)");
    }
    let acceptor = match (&args.tls_ca_out, &args.tls_cert_dir) {
        (Some(path), _) => {
            let ca = llmroute_devkit::tls::TestCa::new();
            ca.write_ca(path)
                .with_context(|| format!("writing {}", path.display()))?;
            Some(ca.acceptor())
        }
        (None, Some(dir)) => {
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .with_context(|| format!("reading {}", dir.join(f).display()))
            };
            Some(llmroute_devkit::tls::acceptor_from_pem(
                &read("tls.crt")?,
                &read("tls.key")?,
            )?)
        }
        (None, None) => None,
    };
    let mut sims = Vec::new();
    for mut cfg in configs {
        cfg.address = args.address;
        let provider = cfg.provider;
        let sim = match &acceptor {
            Some(acceptor) => Sim::start_tls_with(cfg, acceptor.clone()).await,
            None => Sim::start(cfg).await,
        }
        .with_context(|| format!("starting the {provider} simulator"))?;
        // `port` is where clients connect; `admin_url` reaches /__sim/ over plain HTTP.
        println!(
            "{}",
            serde_json::json!({
                "provider": provider.id(),
                "port": sim.public_port(),
                "base_url": sim.base_url(),
                "admin_url": format!("http://127.0.0.1:{}/__sim", sim.port()),
            })
        );
        sims.push(sim);
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(sims);
    Ok(())
}
