//! Configuration propagation on the real node: how long after a change every gateway replica serves
//! it. The operator runs as Pods (the kustomize install, two replicas), the gateway as its two Pods,
//! providers as simulator Pods; requests go from inside the node's network to each gateway Pod's IP.
//! Prints figures (min / median / max of several trials); asserts nothing.
//!
//! - a new route: from its creation until the gateway answers it (first replica, and every replica);
//! - a route's reorder (a spec edit moving another backend first), a provider key's rotation, a
//!   route's deletion: from the API write until every replica serves the change;
//! - a probe result (a region block): from the fault until every replica routes around the provider;
//! - a new namespace: from its first route until its gateway Pods answer (they start);
//! - the operator's own measure of publish → every replica acknowledged (`llmroute_xds_propagation_seconds`),
//!   its API writes in a 60 s steady state (counted by the API server's audit log), and its memory.
//!
//!   cargo bench --bench propagation        (needs root: the real node; builds the images)

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

mod common;

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use llmroute::api::LLMRoute;
use support::cluster::{TestNamespace, eventually};
use support::node;
use support::realnode::{self, OPENAI_ADMIN, OPENAI_KEY, Sims, ZHIPU_ADMIN, ZHIPU_KEY, key_secret};

const TRIALS: usize = 5;

fn summary(name: &str, samples: &mut [Duration], target: &str) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  {name}: min {:.0} ms, median {:.0} ms, max {:.0} ms ({} trials){target}",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

/// Polls `check` every 10 ms (bounded) and returns the time since `t0` when it first holds.
async fn until<F, Fut>(t0: Instant, limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    while t0.elapsed() < limit {
        if check().await {
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {limit:?}: {what}");
}

/// A route with one backend, `zhipu` (so a failure is not hidden by a failover).
fn single_route(name: &str, ns: &str) -> LLMRoute {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "llmroute.io/v1alpha1", "kind": "LLMRoute",
        "metadata": { "name": name },
        "spec": {
            "policy": { "healthCheck": { "enabled": false } },
            "backends": [{
                "name": "zhipu", "provider": "zhipu",
                "endpoint": format!("https://zhipu-sim.{ns}.svc/api/paas/v4"),
                "credentialsSecretRef": { "name": "zhipu-key", "key": "api-key" },
                "models": { "gpt-4o": "glm-4-flash" },
            }],
        },
    }))
    .unwrap()
}

/// Whether every replica in `addrs` answers `route` with `status` (and, when given, from `backend`).
async fn all_answer(
    addrs: &[String],
    route: &str,
    key: &str,
    status: u16,
    backend: Option<&str>,
) -> bool {
    for addr in addrs {
        let (s, b) = realnode::chat_via(addr, route, key).await;
        if s != status || backend.is_some_and(|want| want != b) {
            return false;
        }
    }
    true
}

async fn first_answer(addrs: &[String], route: &str, key: &str) -> bool {
    for addr in addrs {
        if realnode::chat_via(addr, route, key).await.0 == 200 {
            return true;
        }
    }
    false
}

#[tokio::main]
async fn main() {
    let (c, client, overlay) = realnode::bench_start(&[]).await;
    println!("machine: {}", common::machine());
    c.kubectl_ok(&["apply", "-k", overlay.to_str().unwrap()]);
    let leader = realnode::operator_ready(&client, "llmroute-system", 2).await;

    let ns = TestNamespace::new("prop").await;
    let sims = Sims::start(&ns, &client).await;
    ns.apply(&key_secret("openai-key", OPENAI_KEY));
    ns.apply(&key_secret("zhipu-key", ZHIPU_KEY));
    ns.apply(&realnode::chat_route(&ns.name));
    let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);
    eventually(Duration::from_secs(120), "chat Programmed 2/2", || {
        let routes = routes.clone();
        async move {
            let (s, _, m) = realnode::condition(&routes, "chat", "Programmed").await?;
            (s == "True" && m.starts_with("2/2")).then_some(())
        }
    })
    .await;
    let gateways: Vec<String> = node::ready_pods(
        &client,
        &ns.name,
        "app.kubernetes.io/name=llmroute-gateway",
        2,
    )
    .await
    .into_iter()
    .map(|(_, ip)| format!("{ip}:8080"))
    .collect();
    let chat_key = realnode::route_key(&client, &ns.name, "chat").await;
    println!(
        "gateway: 2 replicas (Pods) in one namespace; operator: 2 replicas (one leads); {} route(s) per change below",
        1
    );

    // A new route, in a namespace whose gateway runs.
    let (mut first, mut every) = (Vec::new(), Vec::new());
    for i in 0..TRIALS {
        let name = format!("new-{i}");
        let t0 = Instant::now();
        routes
            .create(&PostParams::default(), &single_route(&name, &ns.name))
            .await
            .unwrap();
        let key = realnode::route_key(&client, &ns.name, &name).await;
        first.push(
            until(t0, Duration::from_secs(30), "a new route answered", || {
                first_answer(&gateways, &name, &key)
            })
            .await,
        );
        every.push(
            until(
                t0,
                Duration::from_secs(30),
                "a new route answered by every replica",
                || all_answer(&gateways, &name, &key, 200, None),
            )
            .await,
        );
    }
    println!("configuration changes reaching the gateway replicas:");
    summary(
        "route created -> first answer",
        &mut first,
        " (target <= 3 s)",
    );
    summary("route created -> every replica answers", &mut every, "");

    // A reorder by a spec edit (zhipu first, then openai first, and so on), ending with openai first.
    let order = |zhipu_first: bool| {
        let (p_openai, p_zhipu) = if zhipu_first { (1, 0) } else { (0, 1) };
        serde_json::json!({ "spec": { "backends": [
            { "name": "openai", "provider": "openai", "priority": p_openai, "endpoint": format!("https://openai-sim.{}.svc/v1", ns.name),
              "credentialsSecretRef": { "name": "openai-key", "key": "api-key" }, "models": { "gpt-4o": "gpt-4o-mini" } },
            { "name": "zhipu", "provider": "zhipu", "priority": p_zhipu, "endpoint": format!("https://zhipu-sim.{}.svc/api/paas/v4", ns.name),
              "credentialsSecretRef": { "name": "zhipu-key", "key": "api-key" }, "models": { "gpt-4o": "glm-4-flash" } },
        ] } })
    };
    let mut reorder = Vec::new();
    for i in 0..TRIALS.next_multiple_of(2) {
        let zhipu_first = i % 2 == 0;
        let head = if zhipu_first { "zhipu" } else { "openai" };
        let t0 = Instant::now();
        routes
            .patch(
                "chat",
                &PatchParams::default(),
                &Patch::Merge(&order(zhipu_first)),
            )
            .await
            .unwrap();
        reorder.push(
            until(
                t0,
                Duration::from_secs(30),
                "the reorder on every replica",
                || all_answer(&gateways, "chat", &chat_key, 200, Some(head)),
            )
            .await,
        );
    }
    summary(
        "policy reorder (spec edit) -> every replica",
        &mut reorder,
        " (target <= 2 s)",
    );

    // A probe result: OpenAI blocks the region; every replica stops sending to it.
    let mut probe = Vec::new();
    for _ in 0..3 {
        sims.set_fault(OPENAI_ADMIN, "none").await;
        eventually(Duration::from_secs(60), "openai back in front", || {
            let gateways = gateways.clone();
            let key = chat_key.clone();
            async move {
                all_answer(&gateways, "chat", &key, 200, Some("openai"))
                    .await
                    .then_some(())
            }
        })
        .await;
        let before = sims.admin(OPENAI_ADMIN, "GET", "/info", None).await["request_count"]
            .as_u64()
            .unwrap_or(0);
        let t0 = Instant::now();
        sims.set_fault(OPENAI_ADMIN, "region-blocked").await;
        // Routed around: answered by zhipu on every replica and openai no longer tried at all.
        probe.push(
            until(
                t0,
                Duration::from_secs(60),
                "every replica off openai",
                || {
                    let (gateways, key, sims) = (gateways.clone(), chat_key.clone(), &sims);
                    async move {
                        if !all_answer(&gateways, "chat", &key, 200, Some("zhipu")).await {
                            return false;
                        }
                        let n0 =
                            sims.admin(OPENAI_ADMIN, "GET", "/info", None).await["request_count"]
                                .as_u64()
                                .unwrap_or(0);
                        let _ = all_answer(&gateways, "chat", &key, 200, Some("zhipu")).await;
                        let n1 =
                            sims.admin(OPENAI_ADMIN, "GET", "/info", None).await["request_count"]
                                .as_u64()
                                .unwrap_or(0);
                        // Probes keep reaching it (interval 1 s); requests do not: at most a probe between.
                        n1 - n0 <= 1 && n1 > before
                    }
                },
            )
            .await,
        );
    }
    sims.set_fault(OPENAI_ADMIN, "none").await;
    summary(
        "probe result (region block; probe interval 1 s, threshold 1) -> every replica routes around it",
        &mut probe,
        "",
    );

    // Key rotation of a single-backend route: the provider accepts only the new key from the moment
    // the Secret changes; every replica answers again once it has it.
    let rot = "rot";
    routes
        .create(&PostParams::default(), &single_route(rot, &ns.name))
        .await
        .unwrap();
    let rot_key = realnode::route_key(&client, &ns.name, rot).await;
    until(
        Instant::now(),
        Duration::from_secs(30),
        "the rotation route served",
        || all_answer(&gateways, rot, &rot_key, 200, None),
    )
    .await;
    let mut rotation = Vec::new();
    for i in 0..TRIALS {
        let new = format!("zk-bench-{i}");
        sims.set_keys(ZHIPU_ADMIN, &[&new]).await;
        let t0 = Instant::now();
        ns.apply(&key_secret("zhipu-key", &new));
        rotation.push(
            until(
                t0,
                Duration::from_secs(30),
                "the rotated key on every replica",
                || all_answer(&gateways, rot, &rot_key, 200, None),
            )
            .await,
        );
    }
    summary(
        "provider key rotated (Secret applied) -> every replica uses it",
        &mut rotation,
        " (target <= 2 s)",
    );

    // Route deletion.
    let mut deletion = Vec::new();
    for i in 0..TRIALS {
        let name = format!("new-{i}");
        let key = realnode::route_key(&client, &ns.name, &name).await;
        let t0 = Instant::now();
        routes
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
        deletion.push(
            until(
                t0,
                Duration::from_secs(30),
                "the route gone from every replica",
                || all_answer(&gateways, &name, &key, 404, None),
            )
            .await,
        );
    }
    summary(
        "route deleted -> every replica answers 404",
        &mut deletion,
        " (target <= 2 s)",
    );

    // A namespace's first route: its gateway Pods start.
    let mut cold = Vec::new();
    for _ in 0..3 {
        let fresh = TestNamespace::new("prop-cold").await;
        fresh.apply(&key_secret(
            "zhipu-key",
            &format!("zk-bench-{}", TRIALS - 1),
        ));
        let fresh_routes: Api<LLMRoute> = Api::namespaced(client.clone(), &fresh.name);
        let t0 = Instant::now();
        fresh_routes
            .create(&PostParams::default(), &single_route("first", &ns.name))
            .await
            .unwrap();
        let key = realnode::route_key(&client, &fresh.name, "first").await;
        let client2 = client.clone();
        let fresh_name = fresh.name.clone();
        cold.push(
            until(
                t0,
                Duration::from_secs(120),
                "a new namespace's gateway answering",
                || {
                    let (client, ns, key) = (client2.clone(), fresh_name.clone(), key.clone());
                    async move {
                        let pods: Api<k8s_openapi::api::core::v1::Pod> =
                            Api::namespaced(client, &ns);
                        let ips: Vec<String> = pods
                            .list(
                                &kube::api::ListParams::default()
                                    .labels("app.kubernetes.io/name=llmroute-gateway"),
                            )
                            .await
                            .map(|l| {
                                l.items
                                    .into_iter()
                                    .filter_map(|p| p.status?.pod_ip)
                                    .map(|ip| format!("{ip}:8080"))
                                    .collect()
                            })
                            .unwrap_or_default();
                        !ips.is_empty() && first_answer(&ips, "first", &key).await
                    }
                },
            )
            .await,
        );
    }
    summary(
        "first route of a new namespace -> its new gateway Pods answer",
        &mut cold,
        "",
    );

    // The operator's own figure, its memory, and a steady state.
    let metrics = realnode::operator_metrics(&client, &leader).await;
    let value = |name: &str| realnode::metric(&metrics, name);
    let (count, sum) = (
        value("llmroute_xds_propagation_seconds_count"),
        value("llmroute_xds_propagation_seconds_sum"),
    );
    println!(
        "  operator: publish -> every connected replica acknowledged: mean {:.1} ms over {count} changes",
        if count > 0.0 { sum / count * 1e3 } else { 0.0 }
    );
    // Steady state once the trials' after-effects are over: the new namespaces gone, the chat
    // route back on OpenAI (its failback delay).
    eventually(Duration::from_secs(180), "the trials settled", || {
        let (client, ns) = (client.clone(), ns.name.clone());
        async move {
            let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
            let list = namespaces.list(&Default::default()).await.ok()?;
            let cold = list.items.iter().any(|n| {
                n.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("t-prop-cold-"))
            });
            let chat = Api::<LLMRoute>::namespaced(client, &ns)
                .get("chat")
                .await
                .ok()?;
            let back = chat.status?.active_backend.as_deref() == Some("openai");
            (!cold && back).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mark = c.audit_mark();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let steady = realnode::operator_writes(c, &mark);
    let memory = realnode::operator_memory();
    let rss = memory.iter().map(|m| m.rss_kib).max().unwrap_or(0);
    let hwm = memory.iter().map(|m| m.peak_kib).max().unwrap_or(0);
    println!(
        "  steady state, 60 s: {} API writes by the operator (audit log; target 0){}",
        steady.len(),
        steady
            .iter()
            .map(|w| format!("\n    {w}"))
            .collect::<String>()
    );
    println!(
        "  operator memory: RSS {:.1} MiB, peak {:.1} MiB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    drop(ns);
    realnode::uninstall_kustomize(c, &overlay).await;
}
