//! Keeps ConfigMaps and Secrets of one namespace materialised in directories the way a kubelet does
//! (timestamped directory, atomic `..data` swap, visible symlinks) until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use llmroute_devkit::kubelet::{Mount, Source, Volumes};

#[derive(Parser, Debug)]
#[command(name = "llmroute-kubelet")]
struct Args {
    /// Kubeconfig file (default: the usual kube client resolution, KUBECONFIG or in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the objects.
    #[arg(long, short = 'n')]
    namespace: String,
    /// NAME:DIR, repeatable.
    #[arg(long = "configmap", value_name = "NAME:DIR")]
    config_maps: Vec<String>,
    /// NAME:DIR, repeatable.
    #[arg(long = "secret", value_name = "NAME:DIR")]
    secrets: Vec<String>,
    /// Poll interval in milliseconds.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
}

fn split(spec: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, dir) = spec
        .split_once(':')
        .with_context(|| format!("expected NAME:DIR, got {spec:?}"))?;
    Ok((name.to_string(), PathBuf::from(dir)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(config)?;
    let mut mounts = Vec::new();
    // Secrets first, as in `Volumes::start`.
    for spec in &args.secrets {
        let (name, dir) = split(spec)?;
        mounts.push(Mount {
            source: Source::Secret(name),
            dir,
        });
    }
    for spec in &args.config_maps {
        let (name, dir) = split(spec)?;
        mounts.push(Mount {
            source: Source::ConfigMap(name),
            dir,
        });
    }
    anyhow::ensure!(
        !mounts.is_empty(),
        "give --configmap NAME:DIR and/or --secret NAME:DIR"
    );
    for m in &mounts {
        eprintln!(
            "kubelet: {}/{:?} -> {}",
            args.namespace,
            m.source,
            m.dir.display()
        );
    }
    let volumes = Volumes::sync(
        client,
        &args.namespace,
        mounts,
        Duration::from_millis(args.interval_ms),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(volumes);
    Ok(())
}
