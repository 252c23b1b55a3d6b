//! Budgets at scale on the real node (issue 27's target): `BENCH_ROUTES` LLMRoutes (default
//! 10,000), each with a token budget, across 12 namespaces (one gateway Pod each, as the operator
//! benchmark), all served by one Zhipu simulator Pod; the operator installed as a user does
//! (`kubectl apply -k`, two replicas). Then three minutes: one without traffic, one with 1 % of the
//! routes spending at once (a request after another on each, from inside the node), one without
//! traffic again. Prints, for each, the operator's CPU (both processes, from /proc) and its API
//! writes (the API server's audit log, Lease renewals aside), and the leader's lease sends.
//! Prints figures; asserts nothing.
//!
//!   cargo bench --bench budgets                       (root: the real node)
//!   BENCH_ROUTES=1000 cargo bench --bench budgets     (a smaller run)

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use llmroute::api::LLMRoute;
use support::cluster::TestNamespace;
use support::realnode::{self, Sims, ZHIPU_KEY};

const NAMESPACES: usize = 12;

mod common;

fn route(i: usize, sims: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "llmroute.io/v1alpha1", "kind": "LLMRoute",
        "metadata": { "name": format!("route-{i:05}") },
        "spec": {
            "defaultModel": "chat",
            "policy": {
                "healthCheck": { "enabled": false },
                "budget": { "tokens": 1_000_000, "maxCompletionTokens": 16 },
            },
            "backends": [{
                "name": "zhipu", "provider": "zhipu",
                "endpoint": format!("https://zhipu-sim.{sims}.svc/api/paas/v4"),
                "credentialsSecretRef": { "name": "zhipu", "key": "api-key" },
                "models": { "chat": "glm-4-flash" },
            }],
        },
    })
}

/// What the operator did over `window` while `during` ran (or idled, when it is done before).
struct Minute {
    /// CPU seconds of the operator processes alive at both ends.
    cpu: f64,
    /// Operator processes that ended (a restart) or started meanwhile.
    restarted: usize,
    writes: usize,
    served: usize,
}

async fn measure<F: std::future::Future<Output = usize>>(
    c: &'static support::cluster::TestCluster,
    window: Duration,
    during: F,
) -> Minute {
    let mark = c.audit_mark();
    let before = realnode::operator_cpu_seconds();
    let started = Instant::now();
    let served = during.await;
    tokio::time::sleep(window.saturating_sub(started.elapsed())).await;
    let after = realnode::operator_cpu_seconds();
    let cpu = after
        .iter()
        .filter_map(|(pid, t)| Some(t - before.get(pid)?))
        .sum();
    let restarted = before.keys().filter(|p| !after.contains_key(p)).count()
        + after.keys().filter(|p| !before.contains_key(p)).count();
    Minute {
        cpu,
        restarted,
        writes: realnode::operator_writes(c, &mark).len(),
        served,
    }
}

#[tokio::main]
async fn main() {
    let routes_n: usize = std::env::var("BENCH_ROUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let (c, client, overlay) =
        realnode::bench_start(&["--gateway-replicas=1", "--usage-interval=10s"]).await;
    println!("machine: {}", common::machine());
    let sims_ns = TestNamespace::new("bsims").await;
    let _sims = Sims::start(&sims_ns, &client).await;

    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 0xfffff
    );
    let namespaces: Vec<String> = (0..NAMESPACES)
        .map(|i| format!("bench-{run}-{i:02}"))
        .collect();
    let ns_api: Api<Namespace> = Api::all(client.clone());
    println!("creating {NAMESPACES} namespaces and {routes_n} LLMRoutes with token budgets ...");
    for ns in &namespaces {
        let meta = ObjectMeta {
            name: Some(ns.clone()),
            ..Default::default()
        };
        let namespace = Namespace {
            metadata: meta,
            ..Default::default()
        };
        ns_api
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("zhipu".into()),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([(
                "api-key".to_string(),
                ZHIPU_KEY.to_string(),
            )])),
            ..Default::default()
        };
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    stream::iter(0..routes_n)
        .map(|i| {
            let api: Api<LLMRoute> = Api::namespaced(client.clone(), &namespaces[i % NAMESPACES]);
            let r: LLMRoute = serde_json::from_value(route(i, &sims_ns.name)).unwrap();
            async move { api.create(&PostParams::default(), &r).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;

    let start = Instant::now();
    c.kubectl_ok(&["apply", "-k", overlay.to_str().unwrap()]);
    let ready = realnode::routes_ready(
        &client,
        &format!("bench-{run}-"),
        routes_n,
        Duration::from_secs(5),
        Duration::from_secs(900),
    )
    .await;
    println!(
        "{ready} of {routes_n} routes Ready {:.0} s after kubectl apply -k",
        start.elapsed().as_secs_f64()
    );
    let leader = realnode::operator_ready(&client, "llmroute-system", 2).await;

    // The spenders: 1 % of the routes, spread over the namespaces, through their gateway Pod.
    let spenders: Vec<usize> = (0..routes_n).step_by(100).collect();
    let mut gateways = BTreeMap::new();
    for ns in &namespaces {
        let pods =
            support::node::ready_pods(&client, ns, "app.kubernetes.io/name=llmroute-gateway", 1)
                .await;
        gateways.insert(ns.clone(), format!("{}:8080", pods[0].1));
    }
    let mut targets = Vec::new();
    for &i in &spenders {
        let ns = &namespaces[i % NAMESPACES];
        let name = format!("route-{i:05}");
        let key = realnode::route_key(&client, ns, &name).await;
        targets.push((gateways[ns].clone(), name, key));
    }
    let body =
        serde_json::json!({ "model": "chat", "messages": [{ "role": "user", "content": "hi" }] });
    // Settle: the first leases and the routes' first usage status are written.
    tokio::time::sleep(Duration::from_secs(30)).await;

    let minute = Duration::from_secs(60);
    let quiet_before = measure(c, minute, async { 0 }).await;
    let spend = measure(c, minute, async {
        let until = Instant::now() + Duration::from_secs(55);
        let served = stream::iter(targets.clone())
            .map(|(addr, name, key)| {
                let body = body.clone();
                async move {
                    let mut served = 0;
                    while Instant::now() < until {
                        let answers = realnode::chats_via(
                            std::slice::from_ref(&addr),
                            &name,
                            &key,
                            body.clone(),
                            5,
                            1,
                        )
                        .await;
                        served += answers.iter().filter(|a| a.0 == 200).count();
                    }
                    served
                }
            })
            .buffer_unordered(targets.len())
            .collect::<Vec<usize>>()
            .await;
        served.iter().sum()
    })
    .await;
    // The last counts are read and written within an interval after the traffic ends.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let quiet_after = measure(c, minute, async { 0 }).await;
    let metrics = realnode::operator_metrics(&client, &leader).await;
    let rss: Vec<u64> = realnode::operator_memory()
        .iter()
        .map(|m| m.peak_kib)
        .collect();

    println!(
        "{routes_n} routes with token budgets in {NAMESPACES} namespaces; {} of them spending at once:",
        targets.len()
    );
    for (phase, m) in [
        ("no traffic, before", quiet_before),
        ("1 % spending", spend),
        ("no traffic, after (steady state)", quiet_after),
    ] {
        println!(
            "  {phase}: operator CPU {:.1} s per minute ({:.0} % of a core), {} API writes per minute, {} requests served{}",
            m.cpu,
            m.cpu / 60.0 * 100.0,
            m.writes,
            m.served,
            if m.restarted > 0 {
                format!(
                    " ({} operator processes ended or started meanwhile)",
                    m.restarted
                )
            } else {
                String::new()
            }
        );
    }
    println!(
        "  leader: llmroute_api_writes_total {}, operator peak RSS {:.1} MiB",
        realnode::metric(&metrics, "llmroute_api_writes_total"),
        rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0
    );

    for ns in &namespaces {
        let _ = ns_api.delete(ns, &Default::default()).await;
    }
    drop(sims_ns);
    realnode::uninstall_kustomize(c, &overlay).await;
}
