//! Operator benchmark on the real node: 1,000 LLMRoutes (3 backends each) across 12 namespaces, then
//! the operator installed as a user does (`kubectl apply -k`, two replicas, this build's binary as
//! its image; one gateway replica per namespace, `--gateway-replicas=1`: 12 gateway Pods), until every
//! route is Ready, which now means its gateway Pod serves it. (12: what one 2-core node schedules
//! next to the operator and CoreDNS at the gateway's CPU request of 100m per Envoy.) Prints the time, the API writes the
//! operator made (the API server's audit log, and its own `llmroute_api_writes_total`), its peak
//! memory, and the writes of a 60 s steady state. Prints figures; asserts nothing.
//!
//!   cargo bench --bench operator         (root: the real node; builds the images from the release binary)

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use llmroute::api::LLMRoute;
use support::realnode;

const NAMESPACES: usize = 12;
const ROUTES: usize = 1000;

fn route(i: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "llmroute.io/v1alpha1", "kind": "LLMRoute",
        "metadata": { "name": format!("route-{i:04}") },
        "spec": {
            "region": "cn", "defaultModel": "chat",
            "backends": [
                { "name": "zhipu", "provider": "zhipu", "credentialsSecretRef": { "name": "zhipu", "key": "api-key" }, "models": { "chat": "glm-4-plus" } },
                { "name": "qianfan", "provider": "qianfan", "priority": 1, "credentialsSecretRef": { "name": "qianfan", "key": "api-key" }, "models": { "chat": "ernie-4.0-8k" } },
                { "name": "deepseek", "provider": "deepseek", "priority": 2, "credentialsSecretRef": { "name": "deepseek", "key": "api-key" }, "models": { "chat": "deepseek-chat" } },
            ],
        },
    })
}

mod common;

#[tokio::main]
async fn main() {
    let (c, client, overlay) = realnode::bench_start(&["--gateway-replicas=1"]).await;
    println!("machine: {}", common::machine());

    // Earlier runs' namespaces must be gone.
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let wait_start = Instant::now();
    while ns_api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .any(|n| {
            n.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("bench-"))
        })
    {
        assert!(
            wait_start.elapsed() < Duration::from_secs(600),
            "namespaces of an earlier run are still terminating"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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
    println!(
        "creating {NAMESPACES} namespaces, {} Secrets and {ROUTES} LLMRoutes ...",
        NAMESPACES * 3
    );
    for ns in &namespaces {
        ns_api
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(ns.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        for name in ["zhipu", "qianfan", "deepseek"] {
            let s = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([(
                    "api-key".to_string(),
                    format!("{name}-bench-key"),
                )])),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &s).await.unwrap();
        }
    }
    stream::iter(0..ROUTES)
        .map(|i| {
            let api: Api<LLMRoute> = Api::namespaced(client.clone(), &namespaces[i % NAMESPACES]);
            async move {
                let r: LLMRoute = serde_json::from_value(route(i)).unwrap();
                api.create(&PostParams::default(), &r).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;

    let mark = c.audit_mark();
    let start = Instant::now();
    c.kubectl_ok(&["apply", "-k", overlay.to_str().unwrap()]);
    // Each poll lists 1,000 routes; poll gently so the measurement does not load the API server.
    let ready = realnode::routes_ready(
        &client,
        &format!("bench-{run}-"),
        ROUTES,
        Duration::from_millis(500),
        Duration::from_secs(600),
    )
    .await;
    let elapsed = start.elapsed();
    let leader = realnode::operator_ready(&client, "llmroute-system", 2).await;
    let metrics = realnode::operator_metrics(&client, &leader).await;
    let writes = realnode::metric(&metrics, "llmroute_api_writes_total");
    let rss: Vec<u64> = realnode::operator_memory()
        .iter()
        .map(|m| m.peak_kib)
        .collect();
    println!(
        "{ROUTES} LLMRoutes x 3 backends in {NAMESPACES} namespaces (one gateway Pod each), operator as 2 Pods: \
         {ready} Ready=True (served by their gateway Pod) {:.1} s after kubectl apply -k (target <= 20 s before \
         Ready meant served)",
        elapsed.as_secs_f64()
    );
    let audited = realnode::operator_writes(c, &mark).len();
    println!(
        "  API writes by the operator: {audited} in the audit log, {writes} by its own count ({:.1} per route); \
         xDS resources pushed: {}",
        audited as f64 / ROUTES as f64,
        metrics
            .lines()
            .filter(|l| l.starts_with("llmroute_xds_pushes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    );
    println!(
        "  operator peak RSS: {:.1} MiB (the leader; the standby {:.1} MiB; target <= 100 MB)",
        rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
        rss.iter().copied().min().unwrap_or(0) as f64 / 1024.0
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mark = c.audit_mark();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let steady = realnode::operator_writes(c, &mark);
    let rss: Vec<u64> = realnode::operator_memory()
        .iter()
        .map(|m| m.peak_kib)
        .collect();
    println!(
        "  steady state, 60 s: {} writes (audit log; target 0); peak RSS now {:.1} MiB{}",
        steady.len(),
        rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
        steady
            .iter()
            .map(|w| format!("\n    {w}"))
            .collect::<String>()
    );

    for ns in &namespaces {
        let _ = ns_api.delete(ns, &Default::default()).await;
    }
    realnode::uninstall_kustomize(c, &overlay).await;
}
