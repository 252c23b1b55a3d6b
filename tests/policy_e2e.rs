//! Health probing and the policy engine end to end (real control plane, `llmroute run`, real
//! Envoy, HTTPS simulators): a region block moves the route off a backend and it fails back after
//! the delay; rate limits and empty balances cool down differently; a backend excluded by region is
//! never probed; a flapping backend does not flap the configuration; Direct mode restarts workloads.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::api::{Api, ListParams};
use llmroute::api::LLMRoute;
use llmroute_devkit::sim::{Fault, Sim, SimProvider};
use support::cluster::eventually;
use support::e2e::{Stack, Workload, backend, backend_of, route_of};

/// The route `name`: OpenAI (`primary`), then Zhipu (`backup`), with `policy` and `extra_spec`
/// lines.
fn route(name: &str, policy: &str, primary: &Sim, backup: &Sim, extra_spec: &str) -> String {
    route_of(
        name,
        extra_spec,
        policy,
        &[
            backend("primary", primary, "gpt-4o-mini", ""),
            backend("backup", backup, "glm-4-flash", "      priority: 1\n"),
        ],
    )
}

async fn two_providers(s: &Stack) -> (Sim, Sim) {
    let primary = s
        .provider("primary", SimProvider::OpenAI, "primary-key-0001")
        .await;
    let backup = s
        .provider("backup", SimProvider::Zhipu, "backup-key-0001")
        .await;
    (primary, backup)
}

async fn route_now(s: &Stack, name: &str) -> LLMRoute {
    s.routes().get(name).await.unwrap()
}

fn backend_state(r: &LLMRoute, name: &str) -> (String, String) {
    r.status
        .as_ref()
        .and_then(|st| st.backends.iter().find(|b| b.name == name))
        .map(|b| (b.state.clone(), b.reason.clone().unwrap_or_default()))
        .unwrap_or_default()
}

fn condition(r: &LLMRoute, t: &str) -> String {
    r.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == t))
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

fn active(r: &LLMRoute) -> String {
    r.status
        .as_ref()
        .and_then(|s| s.active_backend.clone())
        .unwrap_or_default()
}

/// Waits until the route satisfies `check`, returning it.
async fn until(
    s: &Stack,
    name: &str,
    limit: Duration,
    what: &str,
    check: impl Fn(&LLMRoute) -> bool,
) -> LLMRoute {
    eventually(limit, what, || {
        let api = s.routes();
        let name = name.to_string();
        let ok = &check;
        async move {
            let r = api.get(&name).await.ok()?;
            ok(&r).then_some(r)
        }
    })
    .await
}

/// The backends of the route's failover chain, in order, as the gateway's Envoy has loaded it.
fn published_chain(s: &Stack, route: &str) -> Vec<String> {
    let clusters = s.loaded("dynamic_active_clusters");
    let chain = clusters["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| &c["cluster"])
        .find(|c| c["name"] == format!("chain:{route}"))
        .cloned()
        .unwrap_or_default();
    chain["cluster_type"]["typed_config"]["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c.as_str().unwrap_or_default().to_string())
        .collect()
}

/// Load in the background: counts successes and keeps failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(w: &Workload, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (w, stop, ok, failed) = (w.clone(), stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match w.chat("chat").await {
                            Ok(r) if r.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => {
                                let line = format!(
                                    "{} {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                );
                                failed.lock().unwrap().push(line);
                            }
                            Err(e) => failed.lock().unwrap().push(e.to_string()),
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.lock().unwrap().clone(),
        )
    }
}

/// Milliseconds between the operator's log line matching `first` and the next one matching `then`.
fn log_gap_ms(log: &str, first: &str, then: &str) -> Option<i64> {
    let ts = |line: &str| -> Option<i64> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let t: k8s_openapi::jiff::Timestamp = v["timestamp"].as_str()?.parse().ok()?;
        Some(t.as_millisecond())
    };
    let mut start = None;
    for line in log.lines() {
        match start {
            None if line.contains(first) => start = ts(line),
            Some(t0) if line.contains(then) => return ts(line).map(|t| t - t0),
            _ => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_block_moves_the_route_says_why_and_fails_back_after_the_delay() {
    let mut s = Stack::start("pol-region", "us").await;
    let (primary, backup) = two_providers(&s).await;
    let policy = "    healthCheck: { interval: 1s, timeout: 2s, healthyThreshold: 2 }\n    failback: { delay: 6s }\n";
    s.ns.apply(&route("chat", policy, &primary, &backup, ""));
    let w = s.serve("chat").await;
    let r = until(
        &s,
        "chat",
        Duration::from_secs(20),
        "primary probed healthy",
        |r| backend_state(r, "primary").0 == "Healthy" && backend_state(r, "backup").0 == "Healthy",
    )
    .await;
    assert_eq!(active(&r), "primary");
    assert!(
        published_chain(&s, "chat")[0].contains("openai"),
        "{:?}",
        published_chain(&s, "chat")
    );
    let probes_before = primary.request_count();

    let load = Load::start(&w, 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let blocked_at = Instant::now();
    primary.set_fault(Fault::RegionBlocked);
    let r = until(
        &s,
        "chat",
        Duration::from_secs(6),
        "status shows the region block",
        |r| active(r) == "backup" && backend_state(r, "primary").0 == "RegionBlocked",
    )
    .await;
    let moved_after = blocked_at.elapsed();
    assert_eq!(condition(&r, "Ready"), "True");
    assert_eq!(condition(&r, "Degraded"), "True");
    let msg = r
        .status
        .as_ref()
        .unwrap()
        .backends
        .iter()
        .find(|b| b.name == "primary")
        .unwrap()
        .message
        .clone()
        .unwrap();
    assert!(
        msg.contains("unsupported_country_region_territory"),
        "{msg}"
    );
    eventually(
        Duration::from_secs(5),
        "the chain republished without the blocked backend first",
        || {
            let chain = published_chain(&s, "chat");
            async move {
                (!chain.is_empty() && chain.iter().all(|c| !c.contains("openai"))).then_some(())
            }
        },
    )
    .await;
    let events = s.events("chat").await;
    let failed_over = events
        .iter()
        .find(|(reason, _)| reason == "FailedOver")
        .expect("a FailedOver event");
    assert!(
        failed_over.1.contains("primary")
            && failed_over.1.contains("backup")
            && failed_over.1.contains("RegionBlocked"),
        "{failed_over:?}"
    );
    // Requests now go straight to the backup: the blocked primary sees only probes (~1/s).
    let before = primary.request_count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        primary.request_count() - before <= 4,
        "requests still hit the blocked backend"
    );

    // Recovery: back to the preferred backend, but not before the failback delay.
    let recovered_at = Instant::now();
    primary.set_fault(Fault::None);
    let r = until(
        &s,
        "chat",
        Duration::from_secs(20),
        "failed back to primary",
        |r| active(r) == "primary",
    )
    .await;
    let back_after = recovered_at.elapsed();
    assert!(
        back_after >= Duration::from_secs(6),
        "failed back after {back_after:?}, before the 6 s delay"
    );
    assert_eq!(condition(&r, "Degraded"), "False");
    let events = s.events("chat").await;
    assert!(
        events.iter().any(|(reason, _)| reason == "FailedBack"),
        "{events:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "clients saw {} failures: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 50, "{ok}");
    assert!(primary.request_count() > probes_before);

    let metrics = s.metrics().await;
    for needle in [
        "llmroute_failovers_total{",
        "reason=\"RegionBlocked\"",
        "llmroute_backend_state{",
        "llmroute_probes_total{provider=\"openai\",result=\"RegionBlocked\"}",
        "llmroute_probe_duration_seconds_count{provider=\"zhipu\"}",
        "llmroute_config_revisions_total{",
        "llmroute_reconcile_duration_seconds_count",
        // Back on the primary: Ready, no longer Degraded (it was).
        "route=\"chat\",condition=\"Ready\",status=\"True\"} 1",
        "route=\"chat\",condition=\"Degraded\",status=\"False\"} 1",
        "route=\"chat\",condition=\"Degraded\",status=\"True\"} 0",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
    let gap = log_gap_ms(
        &s.operator_log(),
        "backend probe failed",
        "published gateway configuration",
    );
    println!(
        "region block: status moved after {moved_after:?} (probe interval 1 s); probe result → config published: {gap:?} ms; failback after {back_after:?} (delay 6 s); {ok} client requests, 0 failed"
    );
    assert!(gap.is_some_and(|g| g < 5_000), "{gap:?}");
    for log in [s.operator_log(), s.envoy_log()] {
        assert!(!log.contains("primary-key-0001") && !log.contains("backup-key-0001"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_cool_down_for_their_retry_after_and_empty_balances_for_longer() {
    let mut s = Stack::start("pol-cooldown", "us").await;
    let (primary, backup) = two_providers(&s).await;
    let policy = "    healthCheck: { interval: 1s, timeout: 2s, healthyThreshold: 1 }\n    failback: { delay: 3s }\n";
    s.ns.apply(&route("chat", policy, &primary, &backup, ""));
    s.serve("chat").await;
    until(&s, "chat", Duration::from_secs(20), "probed", |r| {
        backend_state(r, "primary").0 == "Healthy"
    })
    .await;

    // Rate limited with retry-after 2 s: demoted while cooling down, back right after.
    primary.set_fault(Fault::RateLimited {
        retry_after_secs: 2,
    });
    let r = until(&s, "chat", Duration::from_secs(6), "rate limit seen", |r| {
        active(r) == "backup"
    })
    .await;
    assert_eq!(
        backend_state(&r, "primary"),
        ("RateLimited".into(), "CoolingDown".into())
    );
    let cleared = Instant::now();
    primary.set_fault(Fault::None);
    until(
        &s,
        "chat",
        Duration::from_secs(10),
        "back after the cooldown",
        |r| active(r) == "primary",
    )
    .await;
    let rate_limit_back = cleared.elapsed();

    // An empty balance: probed again only after 10 intervals, then the failback delay applies.
    primary.set_fault(Fault::QuotaExhausted);
    let r = until(&s, "chat", Duration::from_secs(6), "quota seen", |r| {
        active(r) == "backup"
    })
    .await;
    assert_eq!(
        backend_state(&r, "primary"),
        ("QuotaExhausted".into(), "Unhealthy".into())
    );
    let cleared = Instant::now();
    primary.set_fault(Fault::None);
    tokio::time::sleep(rate_limit_back + Duration::from_secs(3)).await;
    let r = route_now(&s, "chat").await;
    assert_eq!(
        active(&r),
        "backup",
        "an empty balance must not come back as fast as a rate limit"
    );
    until(
        &s,
        "chat",
        Duration::from_secs(25),
        "back after the quota cooldown",
        |r| active(r) == "primary",
    )
    .await;
    let quota_back = cleared.elapsed();
    println!(
        "rate limit (retry-after 2 s) back after {rate_limit_back:?}; empty balance back after {quota_back:?}"
    );
    assert!(quota_back > rate_limit_back + Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_its_region_excludes_is_never_probed_and_a_flapping_one_does_not_flap_the_config()
{
    let mut s = Stack::start("pol-cn", "cn").await;
    let (primary, backup) = two_providers(&s).await;
    let policy = "    healthCheck: { interval: 500ms, timeout: 2s, healthyThreshold: 2 }\n    failback: { delay: 4s }\n";
    s.ns.apply(&route("chat", policy, &primary, &backup, ""));
    let w = s.serve("chat").await;
    let r = until(&s, "chat", Duration::from_secs(10), "backup probed", |r| {
        backend_state(r, "backup").0 == "Healthy"
    })
    .await;
    assert_eq!(
        backend_state(&r, "primary"),
        ("Excluded".into(), "RegionUnavailable".into())
    );
    assert_eq!(active(&r), "backup");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        primary.request_count(),
        0,
        "OpenAI was contacted from region cn"
    );
    let r = w.chat("chat").await.unwrap();
    assert_eq!(backend_of(&r), "backup");
    assert_eq!(primary.request_count(), 0);

    // A second route whose preferred backend flaps every 1.2 s (probes every 0.5 s).
    let flappy = s
        .provider("flappy", SimProvider::Moonshot, "flappy-key-0001")
        .await;
    s.ns.apply(&format!(
        "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {{ name: flap }}\nspec:\n  policy:\n{policy}  backends:\n    - name: flappy\n      provider: moonshot\n      endpoint: {}\n      credentialsSecretRef: {{ name: flappy-key, key: api-key }}\n      models: {{ chat: moonshot-v1-8k }}\n    - name: backup\n      provider: zhipu\n      endpoint: {}\n      priority: 1\n      credentialsSecretRef: {{ name: backup-key, key: api-key }}\n      models: {{ chat: glm-4-flash }}\n",
        flappy.base_url(), backup.base_url()
    ));
    s.serve("flap").await;
    until(&s, "flap", Duration::from_secs(10), "flappy probed", |r| {
        backend_state(r, "flappy").0 == "Healthy"
    })
    .await;
    let revisions = |m: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with("llmroute_config_revisions_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = revisions(&s.metrics().await);
    flappy.set_fault(Fault::Flap {
        period: Duration::from_millis(1200),
        fault: Box::new(Fault::ServerError),
    });
    tokio::time::sleep(Duration::from_secs(12)).await;
    let changes = revisions(&s.metrics().await) - before;
    let r = route_now(&s, "flap").await;
    println!(
        "flapping backend (1.2 s period, probes every 0.5 s, failback delay 4 s): {changes} configuration changes in 12 s"
    );
    assert_eq!(
        active(&r),
        "backup",
        "a flapping backend must not be active"
    );
    assert!(changes <= 2, "{changes} configuration changes in 12 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_switches_the_secret_and_restarts_the_selected_workloads() {
    let mut s = Stack::start("pol-direct", "us").await;
    let (primary, backup) = two_providers(&s).await;
    let policy = "    healthCheck: { interval: 1s, timeout: 2s }\n";
    let extra = "  workloadSecret: { mode: Direct }\n  rollout: { selector: { matchLabels: { app: worker } } }\n";
    s.ns.apply(&route("chat", policy, &primary, &backup, extra));
    s.ns.apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: worker, labels: { app: worker } }\nspec:\n  replicas: 1\n  selector: { matchLabels: { app: worker } }\n  template:\n    metadata: { labels: { app: worker } }\n    spec:\n      containers:\n        - name: app\n          image: example.com/worker:1\n          envFrom: [{ secretRef: { name: chat-llm } }]\n",
    );
    // Direct mode: workloads use the provider; the route is on the gateway all the same.
    s.start_gateway().await;
    let rs: Api<ReplicaSet> = Api::namespaced(s.client.clone(), &s.ns.name);
    let replica_sets = || {
        let rs = rs.clone();
        async move {
            rs.list(&ListParams::default().labels("app=worker"))
                .await
                .map(|l| l.items.len())
                .unwrap_or(0)
        }
    };
    until(
        &s,
        "chat",
        Duration::from_secs(20),
        "Ready on primary",
        |r| condition(r, "Ready") == "True" && active(r) == "primary",
    )
    .await;
    eventually(Duration::from_secs(20), "the first ReplicaSet", || async {
        (replica_sets().await == 1).then_some(())
    })
    .await;

    primary.set_fault(Fault::RegionBlocked);
    until(
        &s,
        "chat",
        Duration::from_secs(10),
        "switched to backup",
        |r| active(r) == "backup",
    )
    .await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(s.client.clone(), &s.ns.name);
    eventually(
        Duration::from_secs(10),
        "the workload Secret names the backup",
        || {
            let secrets = secrets.clone();
            let url = backup.base_url().to_string();
            async move {
                let d = secrets.get("chat-llm").await.ok()?.data?;
                (String::from_utf8(d["OPENAI_BASE_URL"].0.clone()).ok()? == url
                    && d["OPENAI_API_KEY"].0 == b"backup-key-0001")
                    .then_some(())
            }
        },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "a new ReplicaSet (the workload restarted)",
        || async { (replica_sets().await == 2).then_some(()) },
    )
    .await;
    let deploys: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(s.client.clone(), &s.ns.name);
    let d = deploys.get("worker").await.unwrap();
    let annotations = d
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap_or_default();
    assert!(
        annotations.contains_key("llmroute.io/restartedAt"),
        "{annotations:?}"
    );
    assert!(
        s.events("chat")
            .await
            .iter()
            .any(|(r, _)| r == "WorkloadRestarted")
    );
}

/// Deleting a namespace's last route stops its probes at once (each one spends the provider key's
/// money, and nothing would stop them until the operator restarts) and withdraws its gateway
/// configuration from the xDS server (the operator's `llmroute_probe_targets` falls to 0). Before
/// that: one apply, each event once (reconciles right after a status write used to emit it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_route_s_deletion_stops_its_probes() {
    let s = Stack::start("pol-gone", "us").await;
    let (primary, backup) = two_providers(&s).await;
    let policy = "    healthCheck: { interval: 500ms, timeout: 2s }\n";
    s.ns.apply(&route("chat", policy, &primary, &backup, ""));
    let probes = || primary.requests().len() + backup.requests().len();
    eventually(Duration::from_secs(20), "both backends probed", || async {
        (!primary.requests().is_empty() && !backup.requests().is_empty()).then_some(())
    })
    .await;
    let targets = || async {
        let text = s.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix("llmroute_probe_targets "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    assert_eq!(targets().await, Some(2));
    // The reconciles of one apply (the route, then its gateway objects, then the probes) emit
    // each event once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = s.event_counts("chat").await;
    assert!(
        events.iter().any(|(reason, _)| reason == "GatewayPending"),
        "{events:?}"
    );
    for (reason, count) in &events {
        assert_eq!(*count, 1, "{reason} emitted {count} times: {events:?}");
    }
    let reasons: Vec<&String> = events.iter().map(|(r, _)| r).collect();
    let mut unique = reasons.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(reasons.len(), unique.len(), "{events:?}");

    s.routes()
        .delete("chat", &Default::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "no probe target left", || async {
        (targets().await == Some(0)).then_some(())
    })
    .await;
    let after_deletion = probes();
    // Six intervals: a probe still scheduled would have run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        probes(),
        after_deletion,
        "a deleted route's backends are still probed"
    );
    assert!(
        s.operator_log()
            .contains("the namespace's last route is gone"),
        "{}",
        s.operator_log()
    );
}
