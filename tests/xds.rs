//! The xDS server with the real Envoy 1.40, without Kubernetes: a gateway started from the bootstrap
//! the operator writes (delta ADS over mutual TLS) gets its configuration, keys included, serves a
//! route with the provider's key injected, picks up a rotated key within milliseconds, reports a
//! configuration it rejects (NACK) with Envoy's error while it keeps serving the last good one,
//! reconnects to a restarted server without being sent anything again, gets the whole of snapshots
//! that follow each other closely, and is refused a namespace its certificate does not name.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmroute::gateway::envoy::{self, XdsClient};
use llmroute::gateway::keys::KeyMaterial;
use llmroute::render::{self, RenderOptions};
use llmroute::xds::delta::Serving;
use llmroute::xds::snapshot::Snapshot;
use llmroute_devkit::sim::{Sim, SimConfig, SimProvider};
use support::xds::Replica;

const NS: &str = "team-a";
const ROUTE_KEY: &str = "sk-llmroute-route-key";

/// The route `chat` → `sim` (OpenAI-compatible, plain HTTP) with `provider_key`, as a snapshot for
/// `replica`.
fn snapshot(
    replica: &Replica,
    sim: &Sim,
    provider_key: &str,
    previous: Option<&Snapshot>,
) -> Snapshot {
    snapshot_of(replica, sim, provider_key, "model-a", previous)
}

/// The same, with `gpt-4o` served as `provider_model`.
fn snapshot_of(
    replica: &Replica,
    sim: &Sim,
    provider_key: &str,
    provider_model: &str,
    previous: Option<&Snapshot>,
) -> Snapshot {
    let opts = &replica.opts;
    let route = replica.dir.path().join("route.yaml");
    std::fs::write(
        &route,
        format!(
            r#"apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: {{ name: chat, namespace: {NS} }}
spec:
  backends:
    - name: primary
      provider: openai-compatible
      endpoint: http://127.0.0.1:{}/v1
      credentialsSecretRef: {{ name: primary, key: key }}
      models: {{ gpt-4o: {provider_model} }}
"#,
            sim.port()
        ),
    )
    .unwrap();
    let routes = render::load_files(&[route]).unwrap_or_else(|e| panic!("{e:?}"));
    let renders = render::translate_offline(
        &routes,
        &RenderOptions {
            namespace: NS.into(),
            default_region: "us".into(),
            envoy: opts.clone(),
            xds: XdsClient::default(),
            deployment: Default::default(),
            operator_namespace: "llmroute-system".into(),
        },
    );
    let gw = &renders[0].translation.gateway;
    let keys = KeyMaterial {
        provider_keys: gw
            .provider_keys
            .iter()
            .map(|k| (k.entry.clone(), provider_key.as_bytes().to_vec()))
            .collect(),
        route_keys: [("chat".to_string(), ROUTE_KEY.to_string())].into(),
    };
    let mut ads = envoy::ads_config(gw, opts, &keys, None);
    for r in &mut ads.routes {
        r.generation = Some(1);
    }
    Snapshot::next(previous, ads.resources, ads.routes).unwrap()
}

/// A simulator that accepts `key-1` and serves any model.
async fn sim() -> Sim {
    Sim::start(SimConfig::new(SimProvider::OpenAI).key("key-1").any_model())
        .await
        .unwrap()
}

async fn chat(replica: &Replica) -> (u16, String) {
    let port = replica.opts.port;
    let r = llmroute_devkit::tls::http_client()
        .post(format!("http://127.0.0.1:{port}/chat/v1/chat/completions"))
        .bearer_auth(ROUTE_KEY)
        .json(&serde_json::json!({ "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

async fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether `gw-1` is the only replica serving `chat`, and serves its current configuration.
fn only_gw_1_current(gw: &Replica) -> bool {
    gw.serving("chat") == [("gw-1".to_string(), Serving::Current)]
}

/// Envoy's error, once the first replica serving `chat` reports a rejected configuration.
fn rejection(gw: &Replica) -> Option<String> {
    match gw.serving("chat").first().map(|(_, s)| s.clone()) {
        Some(Serving::Rejected(e)) => Some(e),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_is_configured_over_xds_and_reports_what_it_loaded() {
    let sim = sim().await;
    let gw = Replica::new(NS).await;
    let first = snapshot(&gw, &sim, "key-1", None);
    assert!(gw.publish(first.clone()));
    let envoy = gw.start("gw-1");

    // Served, with the provider key injected by Envoy from the SDS secret.
    let (status, body) = chat(&gw).await;
    assert_eq!(status, 200, "{body}\n{}", envoy.log_text());
    assert_eq!(
        sim.last_request().unwrap().header("authorization"),
        Some("Bearer key-1")
    );
    assert_eq!(gw.serving("chat"), [("gw-1".to_string(), Serving::Current)]);
    assert_eq!(gw.connected(), ["gw-1"]);

    // A rotated key is used as soon as the gateway acknowledged it.
    sim.set_keys(vec!["key-1".into(), "key-2".into()]);
    let rotated = snapshot(&gw, &sim, "key-2", Some(&first));
    assert!(rotated.number > first.number);
    let t0 = Instant::now();
    gw.publish(rotated.clone());
    wait_for(
        Duration::from_secs(5),
        "the rotated key acknowledged",
        || gw.all_current().then_some(()),
    )
    .await;
    let acked = t0.elapsed();
    let (status, _) = chat(&gw).await;
    assert_eq!(status, 200);
    assert_eq!(
        sim.last_request().unwrap().header("authorization"),
        Some("Bearer key-2")
    );
    println!("key rotation acknowledged by the gateway after {acked:?}");
    assert!(acked < Duration::from_secs(2), "{acked:?}");

    // A configuration Envoy rejects: the replica says so, with Envoy's error, and keeps serving.
    let mut bad = rotated.clone();
    {
        let listeners = bad.resources.get_mut(llmroute::xds::api::LISTENER).unwrap();
        let (name, entry) = listeners
            .iter_mut()
            .find(|(n, _)| n.starts_with("account:"))
            .unwrap();
        let mut json =
            llmroute::xds::api::decode(llmroute::xds::api::LISTENER, &entry.bytes).unwrap();
        let lua = &mut json["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
            ["default_source_code"]["inline_string"];
        *lua = serde_json::json!("this is not lua (");
        entry.bytes =
            Arc::new(llmroute::xds::api::encode(llmroute::xds::api::LISTENER, &json).unwrap());
        entry.version = "broken".into();
        entry.since = rotated.number + 1;
        bad.number = rotated.number + 1;
        let route = bad.routes.get_mut("chat").unwrap();
        route.since = bad.number;
        assert!(route.deps.iter().any(|(_, n)| n == name));
    }
    gw.publish(bad.clone());
    let error = wait_for(Duration::from_secs(5), "the rejection reported", || {
        rejection(&gw)
    })
    .await;
    assert!(
        error.contains("account:"),
        "Envoy's error names the listener: {error}"
    );
    let (status, _) = chat(&gw).await;
    assert_eq!(status, 200, "the last good configuration is still served");

    // Fixed: acknowledged, the rejection is gone.
    let fixed = snapshot(&gw, &sim, "key-2", Some(&bad));
    assert!(fixed.number > bad.number);
    gw.publish(fixed);
    wait_for(
        Duration::from_secs(5),
        "the fixed configuration served",
        || only_gw_1_current(&gw).then_some(()),
    )
    .await;
    drop(envoy);
    wait_for(Duration::from_secs(5), "the gateway gone", || {
        gw.connected().is_empty().then_some(())
    })
    .await;
}

/// A gateway replica that cannot bind its front port (something else holds it) rejects the front
/// listener: the route says so with Envoy's error (`ConfigurationRejected`), rather than waiting
/// for the replica as if it were only slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_port_in_use_is_reported_as_a_rejection() {
    let sim = sim().await;
    let gw = Replica::new(NS).await;
    let _taken = std::net::TcpListener::bind(("127.0.0.1", gw.opts.port)).unwrap();
    let first = snapshot(&gw, &sim, "key-1", None);
    assert!(
        first.routes["chat"]
            .deps
            .contains(&(llmroute::xds::api::LISTENER, "gateway".to_string()))
    );
    assert!(gw.publish(first));
    let envoy = gw.start("gw-1");
    let error = wait_for(Duration::from_secs(10), "the rejection reported", || {
        rejection(&gw)
    })
    .await;
    assert!(
        error.contains("gateway") && error.contains("in use"),
        "Envoy's error names the listener and the cause: {error}\n{}",
        envoy.log_text()
    );
}

/// Snapshots that follow each other closely, each changing two kinds of resources (the key's
/// secret and the backend's model mapping), published while the gateway is still answering the
/// previous push: the last one always reaches the gateway whole. (A gateway's request handled
/// between a snapshot's publication and the stream noticing it once marked that snapshot as seen
/// after pushing only the request's own type; the other types waited for the next snapshot, and
/// the route stayed "waiting for" the replica.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_published_while_the_gateway_answers_are_all_delivered() {
    const ROUNDS: usize = 500;
    let keys: Vec<String> = (0..ROUNDS)
        .flat_map(|r| [format!("key-{r}a"), format!("key-{r}b")])
        .chain(["key-1".to_string()])
        .collect();
    let sim = Sim::start(
        SimConfig::new(SimProvider::OpenAI)
            .keys(keys.clone())
            .any_model(),
    )
    .await
    .unwrap();
    let gw = Replica::new(NS).await;
    let mut previous = snapshot(&gw, &sim, "key-1", None);
    gw.publish(previous.clone());
    let envoy = gw.start("gw-1");
    assert_eq!(chat(&gw).await.0, 200, "{}", envoy.log_text());
    let mut slowest = Duration::ZERO;
    for round in 0..ROUNDS {
        let a = snapshot_of(
            &gw,
            &sim,
            &format!("key-{round}a"),
            &format!("model-{round}a"),
            Some(&previous),
        );
        let b = snapshot_of(
            &gw,
            &sim,
            &format!("key-{round}b"),
            &format!("model-{round}b"),
            Some(&a),
        );
        let t0 = Instant::now();
        gw.publish(a);
        // The gateway answers a push within about a millisecond here: publish the next snapshot
        // before, around and after that (spread over 0-2 ms, in steps of 7 µs).
        std::thread::sleep(Duration::from_micros((round as u64 * 7) % 2000));
        gw.publish(b.clone());
        wait_for(
            Duration::from_secs(5),
            &format!("round {round}: the last snapshot acknowledged whole"),
            || gw.all_current().then_some(()),
        )
        .await;
        slowest = slowest.max(t0.elapsed());
        previous = b;
    }
    // The gateway serves the last snapshot: its model and its key.
    let (status, body) = chat(&gw).await;
    assert_eq!(status, 200, "{body}");
    let last = sim.last_request().unwrap();
    let last_round = ROUNDS - 1;
    assert_eq!(last.body["model"], format!("model-{last_round}b"));
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer key-{last_round}b").as_str())
    );
    println!("{ROUNDS} rounds of two close snapshots; slowest round acknowledged in {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_sends_a_reconnecting_gateway_nothing_it_has() {
    let sim = sim().await;
    let mut gw = Replica::new(NS).await;
    let snap = snapshot(&gw, &sim, "key-1", None);
    gw.publish(snap.clone());
    let envoy = gw.start("gw-1");
    assert_eq!(chat(&gw).await.0, 200);
    let updates_before = envoy
        .stat("cluster_manager.cds.update_success")
        .unwrap_or(0);

    // The operator restarts: a new server (same CA, same port) with the same configuration built
    // afresh.
    gw.restart_server().await;
    let again = snapshot(&gw, &sim, "key-1", None);
    gw.publish(again);
    wait_for(
        Duration::from_secs(20),
        "the gateway reconnected and current",
        || only_gw_1_current(&gw).then_some(()),
    )
    .await;
    assert_eq!(chat(&gw).await.0, 200);
    let pushes = gw.connected();
    assert_eq!(pushes, ["gw-1"]);
    assert_eq!(
        envoy
            .stat("cluster_manager.cds.update_success")
            .unwrap_or(0),
        updates_before,
        "nothing was sent again: {}",
        envoy.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_namespace_gets_nothing() {
    let sim = sim().await;
    let gw = Replica::new(NS).await;
    gw.publish(snapshot(&gw, &sim, "key-1", None));
    // The bootstrap claims NS, the certificate names team-b.
    let _envoy = gw.spawn_with_certificate_of("team-b", "intruder");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(gw.connected().is_empty());
    assert!(
        support::envoy::http_get(gw.opts.health_port, "/ready").is_none_or(|b| !b.contains("LIVE")),
        "a gateway without configuration is not ready"
    );
}
