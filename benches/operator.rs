//! Operator benchmark on the real test control plane: 1,000 LLMRoutes (3 backends each) across 50
//! namespaces, from operator start to every route Ready=True. Prints the time, the API writes the
//! operator made (from the API server's own request metrics), the operator's peak RSS, and the writes
//! of a 60 s steady state. Prints figures; asserts nothing.
//!
//!   cargo bench --bench operator                         # starts a control plane in target/testcluster-bench
//!   LLMROUTE_TEST_CLUSTER=DIR cargo bench --bench operator   # uses a running one

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use llmroute::api::LLMRoute;

const NAMESPACES: usize = 50;
const ROUTES: usize = 1000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

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
use common::{operator_writes, peak_rss_kib};

#[tokio::main]
async fn main() {
    let cluster = match std::env::var_os("LLMROUTE_TEST_CLUSTER") {
        Some(d) => PathBuf::from(d),
        None => {
            let dir = root().join("target/testcluster-bench");
            let ok = Command::new(root().join("scripts/testcluster"))
                .arg("up")
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "scripts/testcluster up failed");
            dir
        }
    };
    let kubeconfig = cluster.join("kubeconfig");
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = Client::try_from(config).unwrap();
    let kubectl = cluster.join("bin/kubectl");
    let crds = root().join("crds");
    assert!(
        Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["apply", "--server-side", "-f"])
            .arg(&crds)
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "wait",
                "--for=condition=established",
                "crd/llmroutes.llmroute.io"
            ])
            .status()
            .unwrap()
            .success()
    );

    // Earlier runs' namespaces must be gone: while they terminate, other clients write (garbage
    // collector, namespace controller) and an operator would reconcile their routes.
    let ns_list: Api<Namespace> = Api::all(client.clone());
    let wait_start = Instant::now();
    while ns_list
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
    let ns_api: Api<Namespace> = Api::all(client.clone());
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

    let writes_before = operator_writes(&client).await;
    let log = std::fs::File::create(root().join("target/bench-operator.log")).unwrap();
    let start = Instant::now();
    let mut op = Command::new(root().join("target/release/llmroute"))
        .args([
            "run",
            "--leader-elect=false",
            "--default-region",
            "cn",
            "--log-level",
            "warn",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start target/release/llmroute (build it with cargo build --release)");
    let pid = op.id();
    let routes: Api<LLMRoute> = Api::all(client.clone());
    let mut ready = 0;
    while start.elapsed() < Duration::from_secs(300) {
        let list = routes.list(&ListParams::default()).await.unwrap();
        ready = list
            .items
            .iter()
            .filter(|r| {
                r.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&format!("bench-{run}-")))
            })
            .filter(|r| {
                r.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == ROUTES {
            break;
        }
        // Each poll lists 1,000 routes; poll gently so the measurement does not load the API server.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = start.elapsed();
    let writes_converge = operator_writes(&client).await - writes_before;
    let rss_converge = peak_rss_kib(Some(pid));
    println!(
        "machine: {} cores; test control plane on the same machine",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{ROUTES} LLMRoutes x 3 backends in {NAMESPACES} namespaces: {ready} Ready=True after {:.1} s (target <= 20 s)",
        elapsed.as_secs_f64()
    );
    println!(
        "  API writes by the operator: {writes_converge} ({:.1} per route)",
        writes_converge as f64 / ROUTES as f64
    );
    println!(
        "  operator peak RSS: {:.1} MiB (target <= 100 MB)",
        rss_converge as f64 / 1024.0
    );

    let steady_start = operator_writes(&client).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let steady = operator_writes(&client).await - steady_start;
    println!(
        "  steady state, 60 s: {steady} writes (target 0); peak RSS now {:.1} MiB",
        peak_rss_kib(Some(pid)) as f64 / 1024.0
    );

    let _ = op.kill();
    let _ = op.wait();
    for ns in &namespaces {
        let _ = ns_api.delete(ns, &Default::default()).await;
    }
}
