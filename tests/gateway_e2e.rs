//! End to end: the operator on the real control plane serves the gateway's configuration over xDS;
//! the real Envoy 1.40 runs from the bootstrap and certificate a gateway Pod mounts; requests are
//! sent the way an OpenAI SDK sends them, with OPENAI_BASE_URL and OPENAI_API_KEY read from the
//! workload Secret (only the Service host is replaced by 127.0.0.1:<port>: the gateway runs on the
//! host here; tests/realnode.rs runs it as Pods).

mod support;

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use llmroute::api::LLMRoute;
use llmroute::gateway::envoy::EnvoyOptions;
use llmroute::gateway::objects::GatewayDeploymentOptions;
use llmroute::operator::{self, Options, apply::WriteCounter};
use support::cluster::{TestNamespace, eventually, wait_route_ready};
use support::gateway::GatewayPorts;
use support::sim::{Mode, Sim};

fn secret(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: {name} }}\nstringData: {{ api-key: \"{value}\" }}\n"
    )
}

fn route(name: &str, primary: &Sim, secondary: &Sim) -> String {
    format!(
        r#"
apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: {{ name: {name} }}
spec:
  defaultModel: gpt-4o
  # In-request failover and rotation only: probing is tested in policy_e2e.
  policy: {{ healthCheck: {{ enabled: false }} }}
  backends:
    - name: primary
      provider: openai-compatible
      endpoint: http://127.0.0.1:{}/v1
      credentialsSecretRef: {{ name: primary-key, key: api-key }}
      models: {{ gpt-4o: model-a }}
    - name: secondary
      provider: openai-compatible
      endpoint: http://127.0.0.1:{}/api/paas/v4
      priority: 1
      credentialsSecretRef: {{ name: secondary-key, key: api-key }}
      models: {{ gpt-4o: glm-4-plus }}
"#,
        primary.port, secondary.port
    )
}

/// The workload Secret's base URL (Service host replaced by the local Envoy) and key.
async fn workload_env(client: &kube::Client, ns: &str, route: &str, port: u16) -> (String, String) {
    let w = support::e2e::workload_of(client, ns, route, port).await;
    (w.base, w.key)
}

async fn chat(base: &str, key: &str) -> reqwest::Response {
    llmroute_devkit::tls::http_client()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({ "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .expect("request through the gateway")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_config_served_by_envoy_with_failover_rotation_and_new_routes() {
    let ns = TestNamespace::new("e2e").await;
    let c = ns.cluster();
    c.install_crds();
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    let ports = GatewayPorts::free();
    let envoy_opts = EnvoyOptions {
        port: ports.port,
        address: "127.0.0.1".into(),
        admin_port: ports.admin_port,
        health_port: ports.health_port,
        usage_module: support::envoy::sse_usage_module(),
        ..Default::default()
    };
    let writes = Arc::new(WriteCounter::default());
    let opts = Options {
        namespace: Some(ns.name.clone()),
        default_region: "us".into(),
        gateway: GatewayDeploymentOptions {
            replicas: 0,
            ..Default::default()
        },
        envoy: envoy_opts.clone(),
        identity: "e2e".into(),
        // The usage ledgers: in the test's namespace (the cluster has no llmroute-system here).
        ledger_namespace: ns.name.clone(),
        ..Default::default()
    };
    let xds = support::gateway::xds_setup(
        &client,
        &ns.name,
        &dir.path().join("xds"),
        0,
        std::future::pending(),
    )
    .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let op = tokio::spawn(operator::run(
        client.clone(),
        opts,
        xds,
        writes,
        async move {
            let _ = stop_rx.await;
        },
    ));

    let primary = Sim::start("primary-key-1").await;
    let secondary = Sim::start("secondary-key-1").await;
    ns.apply(&secret("primary-key", "primary-key-1"));
    ns.apply(&secret("secondary-key", "secondary-key-1"));
    ns.apply(&route("chat", &primary, &secondary));
    let envoy = support::gateway::start(&client, &ns.name, dir.path(), &ports, "gw-0").await;
    let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);
    wait_route_ready(&routes, "chat").await;
    let pid = envoy.pid();
    let (base, key) = workload_env(&client, &ns.name, "chat", envoy_opts.port).await;

    // Served by the primary with its key, path and model; the route key never reaches it.
    let resp = chat(&base, &key).await;
    assert_eq!(resp.status(), 200, "{}", envoy.log_text());
    assert_eq!(resp.headers()["x-llmroute-backend"], "primary");
    let got = primary.received().pop().unwrap();
    assert_eq!(got.path, "/v1/chat/completions");
    assert_eq!(got.body["model"], "model-a");
    assert!(!format!("{:?}", got.headers).contains(&key));

    // The gateway admits only the route key; an unknown model gets the route's list.
    assert_eq!(chat(&base, "sk-wrong").await.status(), 401);
    let resp = llmroute_devkit::tls::http_client()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({ "model": "gpt-9", "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("Models: gpt-4o."));

    // Region block on the primary: the same request is answered by the secondary.
    primary.set_mode(Mode::RegionBlocked);
    let resp = chat(&base, &key).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-llmroute-backend"], "secondary");
    assert_eq!(
        secondary.received().pop().unwrap().body["model"],
        "glm-4-plus"
    );
    primary.set_mode(Mode::Ok);

    // Key rotation: the provider starts accepting the new key only; no request fails, Envoy is not
    // restarted. Requests run continuously meanwhile.
    let load = {
        let (base, key) = (base.clone(), key.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::<String>::new());
            let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
            while tokio::time::Instant::now() < deadline {
                let sent = llmroute_devkit::tls::http_client()
                    .post(format!("{base}/chat/completions"))
                    .bearer_auth(&key)
                    .json(&serde_json::json!({ "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] }))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failed.push(format!("{e:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    ns.apply(&secret("primary-key", "primary-key-2"));
    eventually(
        Duration::from_secs(5),
        "the rotated key in the gateway",
        || {
            let p = primary.clone();
            async move {
                p.received()
                    .last()
                    .and_then(|r| r.header("authorization"))
                    .filter(|a| a == "Bearer primary-key-2")
                    .map(|_| ())
            }
        },
    )
    .await;
    primary.set_key("primary-key-2");
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} requests failed during key rotation ({ok} succeeded): {:?}\nEnvoy log (tail):\n{}",
        failed.len(),
        &failed[..failed.len().min(3)],
        envoy
            .log_text()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(ok > 50, "too few requests: {ok}");
    assert_eq!(envoy.pid(), pid);

    // A second route appears: served once published, the first one undisturbed.
    ns.apply(&route("chat-two", &primary, &secondary));
    let (base2, key2) = workload_env(&client, &ns.name, "chat-two", envoy_opts.port).await;
    assert_ne!(key2, key, "each route has its own key");
    eventually(Duration::from_secs(20), "chat-two served", || {
        let (base2, key2) = (base2.clone(), key2.clone());
        async move { (chat(&base2, &key2).await.status() == 200).then_some(()) }
    })
    .await;
    assert_eq!(chat(&base, &key).await.status(), 200);
    assert_eq!(
        chat(&base2, &key).await.status(),
        401,
        "a route's key does not open another route"
    );

    let rejected: Vec<(String, u64)> = envoy
        .stats_matching("update_rejected")
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .collect();
    assert!(
        rejected.is_empty(),
        "Envoy rejected configuration: {rejected:?}"
    );
    let log = envoy.log_text();
    for secret_value in [
        "primary-key-1",
        "primary-key-2",
        "secondary-key-1",
        key.as_str(),
        key2.as_str(),
    ] {
        assert!(!log.contains(secret_value), "Envoy's log holds a key");
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), op).await;
}
