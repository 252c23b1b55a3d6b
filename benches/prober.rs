//! Prober benchmark: 1,000 backend accounts probed every 5 s against one local simulator (a
//! one-token chat completion each), for three intervals. Prints probes/s, latency, peak RSS and the
//! most connections open to the provider at once (no pass/fail): `cargo bench --bench prober`.
//!
//! The probe-result → configuration-published latency needs the API server and the operator: it is
//! printed by `tests/policy_e2e.rs` (see docs/benchmarks.md).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmroute::metrics::Metrics;
use llmroute::probe::{ProbeTarget, Prober, ProberOptions};
use llmroute_devkit::sim::{Sim, SimConfig, SimProvider};

const TARGETS: usize = 1_000;
const INTERVAL: Duration = Duration::from_secs(5);
const INTERVALS: u32 = 3;

/// Established TCP connections to 127.0.0.1:`port` from this process (client side), from
/// /proc/net/tcp.
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == remote && f[3] == "01"
        })
        .count()
}

fn sum_of(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main]
async fn main() {
    llmroute_devkit::tls::install_default_provider();
    let sim = Sim::start(
        SimConfig::new(SimProvider::OpenAICompatible)
            .any_model()
            .record(false),
    )
    .await
    .expect("simulator");
    let body = serde_json::json!({ "model": "m", "max_tokens": 1, "messages": [{ "role": "user", "content": "ping" }] }).to_string();
    let targets: Vec<ProbeTarget> = (0..TARGETS)
        .map(|i| ProbeTarget {
            key: format!("account-{i}"),
            provider: "openai-compatible".into(),
            url: format!("{}/chat/completions", sim.base_url()),
            body: Some(body.clone()),
            headers: vec![("authorization".into(), format!("Bearer key-{i}"))],
            interval: INTERVAL,
            timeout: Duration::from_secs(5),
            secret: Some(format!("key-{i}")),
            unhealthy_max: 1,
            healthy_max: 2,
        })
        .collect();
    let metrics = Arc::new(Metrics::new());
    let (prober, mut changes) =
        Prober::new(&ProberOptions::default(), metrics.clone()).expect("prober");
    let rss_before = common::peak_rss_kib();
    let started = Instant::now();
    prober.sync_namespace("bench", targets);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let prober = prober.clone();
        tokio::spawn(async move {
            prober
                .run(async move {
                    let _ = stop_rx.await;
                })
                .await
        })
    };
    tokio::spawn(async move { while changes.recv().await.is_some() {} });
    let mut max_conns = 0;
    let deadline = started + INTERVAL * INTERVALS;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        max_conns = max_conns.max(connections_to(sim.port()));
    }
    let elapsed = started.elapsed();
    let _ = stop_tx.send(());
    let _ = runner.await;
    let text = metrics.encode();
    let probes = sum_of(&text, "llmroute_probes_total{");
    let healthy = sum_of(
        &text,
        "llmroute_probes_total{provider=\"openai-compatible\",result=\"Healthy\"}",
    );
    let latency_sum = sum_of(&text, "llmroute_probe_duration_seconds_sum{");
    let health = prober.health("bench");
    println!("machine: {}", common::machine());
    println!(
        "prober: {TARGETS} backend accounts, interval {:?}, {} intervals, concurrency {}",
        INTERVAL,
        INTERVALS,
        ProberOptions::default().concurrency
    );
    println!(
        "  probes: {probes:.0} in {:.1} s = {:.0} probes/s ({healthy:.0} healthy); targets with a result: {}",
        elapsed.as_secs_f64(),
        probes / elapsed.as_secs_f64(),
        health.values().filter(|v| v.last.is_some()).count()
    );
    println!(
        "  mean probe latency {:.1} ms (recorded in whole ms); most connections open to the provider at once: {max_conns}",
        latency_sum / probes.max(1.0) * 1000.0
    );
    println!(
        "  peak RSS (prober + simulator in one process): {:.1} MiB (before probing {:.1} MiB)",
        common::peak_rss_kib() as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
}
