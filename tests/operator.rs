//! The operator on the real control plane: routes and Secrets in, gateway objects, workload Secrets,
//! status and events out. Each test runs its own operator scoped to its own namespace.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use llmroute::api::LLMRoute;
use llmroute::gateway::envoy::EnvoyOptions;
use llmroute::gateway::objects::GatewayDeploymentOptions;
use llmroute::operator::{self, Options, apply::WriteCounter};
use support::cluster::{TestNamespace, eventually};
use support::envoy::{Envoy, http_get};
use support::gateway::GatewayPorts;

const ZHIPU_KEY: &str = "zhipu-test-key-4f1c9a7e";
const QIANFAN_KEY: &str = "bce-v3/qianfan-test-key-77aa";
/// OpenAI's key: its backend is excluded in region cn, but the route references it, so it exists
/// (a missing one makes `ResolvedRefs=False` whatever excludes its backend).
const OPENAI_KEY: &str = "sk-openai-test-key-5e2d";

struct Running {
    writes: Arc<WriteCounter>,
    metrics: Arc<llmroute::metrics::Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stop_xds: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    /// Port of its xDS server.
    xds_port: u16,
    xds: llmroute::xds::XdsServer,
}

impl Running {
    /// Reconciles finished so far (`llmroute_reconciles_total`, any result).
    fn reconciles(&self) -> u64 {
        self.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("llmroute_reconciles_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        if let Some(s) = self.stop_xds.take() {
            let _ = s.send(());
        }
    }
}

/// What a test's gateway replica needs: its directory and ports (the operator writes them into the
/// bootstrap).
struct Gateway {
    dir: tempfile::TempDir,
    ports: GatewayPorts,
}

impl Gateway {
    fn new() -> Gateway {
        Gateway {
            dir: tempfile::tempdir().unwrap(),
            ports: GatewayPorts::free(),
        }
    }

    async fn start(&self, ns: &TestNamespace) -> Envoy {
        let client = ns.cluster().client().await;
        support::gateway::start(&client, &ns.name, self.dir.path(), &self.ports, "gw-0").await
    }

    /// What the gateway's Envoy has loaded (its admin config dump of `resource`).
    fn loaded(&self, resource: &str) -> String {
        http_get(
            self.ports.admin_port,
            &format!("/config_dump?resource={resource}"),
        )
        .unwrap_or_default()
    }
}

/// The operator for `ns`, its xDS server on `xds_port` (0: any), gateway replicas run by the test
/// (the Deployment asks for none: this control plane's node must not run them).
async fn start_operator(ns: &TestNamespace, gw: &Gateway, xds_port: u16) -> Running {
    let client = ns.cluster().client().await;
    let (stop_xds, xds_stopped) = tokio::sync::oneshot::channel::<()>();
    let xds = support::gateway::xds_setup(
        &client,
        &ns.name,
        &gw.dir.path().join("xds"),
        xds_port,
        async move {
            let _ = xds_stopped.await;
        },
    )
    .await;
    let opts = Options {
        namespace: Some(ns.name.clone()),
        default_region: "cn".into(),
        gateway: GatewayDeploymentOptions {
            replicas: 0,
            ..Default::default()
        },
        envoy: EnvoyOptions {
            port: gw.ports.port,
            address: "127.0.0.1".into(),
            admin_port: gw.ports.admin_port,
            health_port: gw.ports.health_port,
            usage_module: support::envoy::sse_usage_module(),
            ..Default::default()
        },
        identity: "test".into(),
        // The usage ledgers: in the test's namespace (the cluster has no llmroute-system here).
        ledger_namespace: ns.name.clone(),
        ..Default::default()
    };
    let metrics = opts.metrics.clone();
    let writes = Arc::new(WriteCounter::default());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let xds_port = xds.local_addr.port();
    let server = xds.server.clone();
    let task = tokio::spawn(operator::run(
        client,
        opts,
        xds,
        writes.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    Running {
        writes,
        metrics,
        stop: Some(tx),
        stop_xds: Some(stop_xds),
        task,
        xds_port,
        xds: server,
    }
}

fn secret(name: &str, key: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: {name} }}\nstringData: {{ {key}: \"{value}\" }}\n"
    )
}

const ROUTE: &str = r#"
apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: { name: chat }
spec:
  region: cn
  defaultModel: gpt-4o
  # The providers' real hosts are unreachable here: probing is tested with simulators (policy_e2e).
  policy: { healthCheck: { enabled: false } }
  backends:
    - name: openai
      provider: openai
      credentialsSecretRef: { name: openai-key, key: api-key }
      models: { gpt-4o: gpt-4o }
    - name: zhipu
      provider: zhipu
      priority: 1
      credentialsSecretRef: { name: zhipu-key, key: api-key }
      models: { gpt-4o: glm-4-plus }
    - name: qianfan
      provider: qianfan
      priority: 2
      credentialsSecretRef: { name: qianfan-key, key: api-key }
      models: { gpt-4o: ernie-4.0-8k }
"#;

/// A namespace with both provider keys, the `chat` route, an operator watching it and a gateway
/// replica.
async fn operator_with_chat_route(
    prefix: &str,
) -> (TestNamespace, kube::Client, Running, Gateway, Envoy) {
    let ns = TestNamespace::new(prefix).await;
    ns.cluster().install_crds();
    let client = ns.cluster().client().await;
    let gw = Gateway::new();
    let op = start_operator(&ns, &gw, 0).await;
    ns.apply(&secret("zhipu-key", "api-key", ZHIPU_KEY));
    ns.apply(&secret("qianfan-key", "api-key", QIANFAN_KEY));
    ns.apply(&secret("openai-key", "api-key", OPENAI_KEY));
    ns.apply(ROUTE);
    let envoy = gw.start(&ns).await;
    (ns, client, op, gw, envoy)
}

fn condition(route: &LLMRoute, type_: &str) -> Option<(String, String, String)> {
    route
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_condition(api: &Api<LLMRoute>, name: &str, type_: &str, status: &str) -> LLMRoute {
    eventually(
        Duration::from_secs(30),
        &format!("{name}: {type_}={status}"),
        || {
            let api = api.clone();
            async move {
                let r = api.get_opt(name).await.ok()??;
                let gen_ok = r.status.as_ref()?.observed_generation == r.metadata.generation;
                (gen_ok && condition(&r, type_).is_some_and(|c| c.0 == status)).then_some(r)
            }
        },
    )
    .await
}

/// The version of the provider key secret `entry` the gateway's Envoy has loaded.
fn loaded_secret_version(gw: &Gateway, entry: &str) -> Option<String> {
    let dump: serde_json::Value =
        serde_json::from_str(&gw.loaded("dynamic_active_secrets")).ok()?;
    dump["configs"].as_array()?.iter().find_map(|c| {
        (c["name"] == entry).then(|| c["version_info"].as_str().unwrap_or_default().to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_becomes_a_gateway_workload_secret_and_honest_status() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("llmroute::write=debug,llmroute=info")
        .with_test_writer()
        .try_init();
    let ns = TestNamespace::new("op").await;
    ns.cluster().install_crds();
    let client = ns.cluster().client().await;
    let gw = Gateway::new();
    let op = start_operator(&ns, &gw, 0).await;
    // The zhipu key is missing at first.
    ns.apply(&secret("qianfan-key", "api-key", QIANFAN_KEY));
    ns.apply(&secret("openai-key", "api-key", OPENAI_KEY));
    ns.apply(ROUTE);
    let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);

    let r = wait_condition(&routes, "chat", "ResolvedRefs", "False").await;
    let (_, reason, message) = condition(&r, "ResolvedRefs").unwrap();
    assert_eq!(reason, "SecretNotFound");
    assert_eq!(
        message,
        format!(
            "secret \"zhipu-key\" not found in namespace \"{}\"",
            ns.name
        )
    );
    // Written to the API server is not served: no gateway replica runs yet.
    let r = wait_condition(&routes, "chat", "Programmed", "False").await;
    let (_, reason, message) = condition(&r, "Programmed").unwrap();
    assert_eq!(reason, "GatewayPending", "{message}");
    assert!(
        message.starts_with("no gateway replica serves generation 1 yet"),
        "{message}"
    );
    assert_eq!(condition(&r, "Ready").unwrap().0, "False");

    // A replica connects and loads it: Programmed, counting the replicas that serve it.
    let _envoy = gw.start(&ns).await;
    let r = wait_condition(&routes, "chat", "Ready", "True").await;
    let (_, _, message) = condition(&r, "Programmed").unwrap();
    assert_eq!(message, "1/1 gateway replicas serve generation 1");
    let st = r.status.clone().unwrap();
    assert_eq!(st.active_backend.as_deref(), Some("qianfan"));
    assert_eq!(condition(&r, "Degraded").unwrap().0, "True");
    let openai = st.backends.iter().find(|b| b.name == "openai").unwrap();
    assert_eq!(
        (openai.state.as_str(), openai.reason.as_deref()),
        ("Excluded", Some("RegionUnavailable"))
    );

    // The Secret appears: refs resolve, zhipu (preferred among those allowed in cn) takes over.
    ns.apply(&secret("zhipu-key", "api-key", ZHIPU_KEY));
    let r = wait_condition(&routes, "chat", "ResolvedRefs", "True").await;
    let r = eventually(Duration::from_secs(30), "zhipu active", || {
        let routes = routes.clone();
        let _ = &r;
        async move {
            let r = routes.get("chat").await.ok()?;
            (r.status.as_ref()?.active_backend.as_deref() == Some("zhipu")).then_some(r)
        }
    })
    .await;
    assert_eq!(
        condition(&r, "Degraded").unwrap().0,
        "False",
        "openai is excluded by design in cn, not a fault"
    );
    assert_eq!(condition(&r, "Programmed").unwrap().0, "True");
    assert_eq!(
        r.status.as_ref().unwrap().endpoint.as_deref(),
        Some(format!("http://llmroute-gateway.{}.svc:8080/chat/v1", ns.name).as_str())
    );

    // Gateway objects: the bootstrap only (everything else goes over xDS), the client certificate.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let cm = cms.get("llmroute-gateway").await.unwrap();
    let data = cm.data.clone().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["bootstrap.yaml"]);
    assert!(data["bootstrap.yaml"].contains("127.0.0.1"));
    assert!(data["bootstrap.yaml"].contains("DELTA_GRPC"));
    let all = serde_json::to_string(&data).unwrap();
    assert!(
        !all.contains(ZHIPU_KEY) && !all.contains(QIANFAN_KEY),
        "key material in the ConfigMap"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        secrets
            .get_opt("llmroute-gateway-keys")
            .await
            .unwrap()
            .is_none(),
        "keys reach the gateway over xDS, not in a Secret of their own"
    );
    let xds_secret = secrets.get("llmroute-gateway-xds").await.unwrap();
    assert_eq!(xds_secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let mut cert_keys: Vec<String> = xds_secret.data.clone().unwrap().into_keys().collect();
    cert_keys.sort();
    assert_eq!(cert_keys, ["ca.crt", "tls.crt", "tls.key"]);
    let dep: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let template = dep
        .get("llmroute-gateway")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template;
    let pod_labels = template.metadata.unwrap().labels.unwrap();
    let pod = template.spec.unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );
    assert!(c.readiness_probe.is_some());
    assert_eq!(
        pod.security_context.as_ref().unwrap().fs_group,
        Some(101),
        "the certificate key (0440) is readable by Envoy's group on a real kubelet"
    );
    // At most one gateway Pod evicted at a time, replicas spread over nodes.
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns.name);
    let pdb = budgets.get("llmroute-gateway").await.unwrap();
    assert!(pdb.metadata.owner_references.is_some_and(|o| !o.is_empty()));
    let spec = pdb.spec.unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    for (k, v) in spec.selector.unwrap().match_labels.unwrap() {
        assert_eq!(
            pod_labels.get(&k),
            Some(&v),
            "the budget selects the gateway Pods"
        );
    }
    let spread = pod.topology_spread_constraints.as_ref().unwrap();
    assert_eq!(spread[0].topology_key, "kubernetes.io/hostname");
    let svc: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(
        svc.get("llmroute-gateway")
            .await
            .unwrap()
            .spec
            .unwrap()
            .ports
            .unwrap()[0]
            .port,
        8080
    );

    // The workload Secret: what any OpenAI SDK reads. The gateway admits its key (the provider is
    // unreachable from here, so the answer is an upstream failure, not a 401).
    let w = secrets.get("chat-llm").await.unwrap().data.unwrap();
    assert_eq!(
        String::from_utf8(w["OPENAI_BASE_URL"].0.clone()).unwrap(),
        format!("http://llmroute-gateway.{}.svc:8080/chat/v1", ns.name)
    );
    let route_key = String::from_utf8(w["OPENAI_API_KEY"].0.clone()).unwrap();
    assert!(route_key.starts_with("sk-llmroute-") && route_key.len() > 40);
    assert_eq!(
        String::from_utf8(w["OPENAI_MODEL"].0.clone()).unwrap(),
        "gpt-4o"
    );
    let models = |key: String| {
        let url = format!("http://127.0.0.1:{}/chat/v1/models", gw.ports.port);
        async move {
            llmroute_devkit::tls::http_client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(models(route_key.clone()).await, 200);
    assert_eq!(models("sk-llmroute-wrong".into()).await, 401);

    // Events say what happened.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let reasons: Vec<String> = eventually(Duration::from_secs(10), "events", || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            let reasons: Vec<String> = list.items.iter().filter_map(|e| e.reason.clone()).collect();
            (reasons.contains(&"SecretNotFound".to_string())
                && reasons.contains(&"Published".to_string()))
            .then_some(reasons)
        }
    })
    .await;
    assert!(
        reasons.contains(&"BackendExcluded".to_string()),
        "{reasons:?}"
    );

    // Rotation: the gateway has loaded the new key within two seconds.
    let entry = "provider_zhipu-key_api-key";
    let before = loaded_secret_version(&gw, entry).expect("the zhipu key loaded");
    let t0 = std::time::Instant::now();
    ns.apply(&secret("zhipu-key", "api-key", "zhipu-rotated-key-0001"));
    eventually(
        Duration::from_secs(10),
        "the rotated key loaded by the gateway",
        || {
            let now = loaded_secret_version(&gw, entry);
            let before = before.clone();
            async move { now.filter(|v| *v != before) }
        },
    )
    .await;
    let rotated = t0.elapsed();
    println!("key rotation: loaded by the gateway {rotated:?} after the Secret was applied");
    assert!(rotated < Duration::from_secs(2), "{rotated:?}");

    // Steady state: no writes at all.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = op.writes.get();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(op.writes.get(), before, "writes in a steady state");

    // Restart (same xDS address): the gateway reconnects, and nothing is rewritten, status
    // included.
    let port = op.xds_port;
    op.stop().await;
    let op2 = start_operator(&ns, &gw, port).await;
    eventually(Duration::from_secs(20), "the gateway reconnected", || {
        let connected = op2.xds.connected(&ns.name);
        async move { (connected == ["gw-0"]).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        op2.writes.get(),
        0,
        "a restarted operator rewrote objects that were already right"
    );
    let w = secrets.get("chat-llm").await.unwrap().data.unwrap();
    assert_eq!(
        String::from_utf8(w["OPENAI_API_KEY"].0.clone()).unwrap(),
        route_key,
        "route key kept across restarts"
    );
    assert_eq!(models(route_key).await, 200);
    op2.stop().await;
}

/// The reconciler translates a whole namespace whichever route it is given: a change that concerns
/// every route of a namespace costs one reconcile, not one per route, and the status the operator
/// writes does not wake it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_change_costs_one_reconcile_however_many_routes() {
    const ROUTES: usize = 12;
    let ns = TestNamespace::new("once").await;
    ns.cluster().install_crds();
    let client = ns.cluster().client().await;
    let gw = Gateway::new();
    let op = start_operator(&ns, &gw, 0).await;
    ns.apply(&secret("zhipu-key", "api-key", ZHIPU_KEY));
    let names: Vec<String> = (0..ROUTES).map(|i| format!("r{i:02}")).collect();
    for name in &names {
        ns.apply(&format!(
            r#"
apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: {{ name: {name} }}
spec:
  region: cn
  policy: {{ healthCheck: {{ enabled: false }} }}
  backends:
    - name: zhipu
      provider: zhipu
      credentialsSecretRef: {{ name: zhipu-key, key: api-key }}
      models: {{ gpt-4o: glm-4-plus }}
"#
        ));
    }
    let _envoy = gw.start(&ns).await;
    let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);
    for name in &names {
        wait_condition(&routes, name, "Ready", "True").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The Secret every route uses goes away: every route's status changes.
    let (reconciles, writes) = (op.reconciles(), op.writes.get());
    ns.cluster()
        .kubectl_ok(&["-n", &ns.name, "delete", "secret", "zhipu-key"]);
    for name in &names {
        let r = wait_condition(&routes, name, "ResolvedRefs", "False").await;
        assert_eq!(condition(&r, "ResolvedRefs").unwrap().1, "SecretNotFound");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (reconciles, writes) = (op.reconciles() - reconciles, op.writes.get() - writes);
    println!("{ROUTES} routes changed by one Secret: {reconciles} reconciles, {writes} writes");
    // One for the Secret; the gateway's acknowledgement of the new configuration may wake one
    // more. Before, each route and each status write woke a reconcile of the namespace.
    assert!(reconciles <= 3, "{reconciles} reconciles");
    assert!(writes >= ROUTES as u64, "{writes} writes");

    // And nothing after that.
    let (reconciles, writes) = (op.reconciles(), op.writes.get());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        op.reconciles(),
        reconciles,
        "reconciles while nothing changes"
    );
    assert_eq!(op.writes.get(), writes, "writes while nothing changes");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_isolated_and_cleaned_up() {
    let (ns, client, op, gw, _envoy) = operator_with_chat_route("iso").await;
    // A second route that cannot serve in cn: not programmed, with its own condition; chat unaffected.
    ns.apply(
        r#"
apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: { name: legacy }
spec:
  region: cn
  backends:
    - name: openai
      provider: openai
      credentialsSecretRef: { name: openai-key, key: api-key }
      models: { gpt-4o: gpt-4o }
"#,
    );
    let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);
    let legacy = wait_condition(&routes, "legacy", "Programmed", "False").await;
    let (_, reason, message) = condition(&legacy, "Programmed").unwrap();
    assert_eq!(reason, "NoEligibleBackend");
    assert!(
        message.contains("provider openai does not serve region \"cn\""),
        "{message}"
    );
    assert_eq!(condition(&legacy, "Ready").unwrap().0, "False");
    wait_condition(&routes, "chat", "Ready", "True").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let loaded = gw.loaded("dynamic_route_configs");
    assert!(loaded.contains("/chat/v1/") && !loaded.contains("/legacy/v1/"));

    // Deleting a route removes its workload Secret and its part of the configuration.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    assert!(secrets.get_opt("chat-llm").await.unwrap().is_some());
    routes
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    eventually(
        Duration::from_secs(2),
        "chat's configuration removed from the gateway",
        || {
            let clean = !gw.loaded("dynamic_route_configs").contains("/chat/v1/");
            async move { clean.then_some(()) }
        },
    )
    .await;
    println!(
        "route deletion: gone from the gateway after {:?}",
        t0.elapsed()
    );
    eventually(
        Duration::from_secs(30),
        "chat-llm garbage-collected",
        || {
            let secrets = secrets.clone();
            async move {
                secrets
                    .get_opt("chat-llm")
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await;
    // Deleting the last route removes the gateway (garbage collector).
    routes
        .delete("legacy", &DeleteParams::default())
        .await
        .unwrap();
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        Duration::from_secs(30),
        "gateway objects garbage-collected",
        || {
            let (deps, cms, secrets) = (deps.clone(), cms.clone(), secrets.clone());
            async move {
                let none = deps.get_opt("llmroute-gateway").await.ok()?.is_none()
                    && cms.get_opt("llmroute-gateway").await.ok()?.is_none()
                    && secrets
                        .get_opt("llmroute-gateway-xds")
                        .await
                        .ok()?
                        .is_none();
                none.then_some(())
            }
        },
    )
    .await;
    op.stop().await;
}

/// Routes of 16 self-hosted backends each (distinct endpoints, so distinct provider accounts).
fn big_routes(names: &[&str]) -> String {
    let mut docs = Vec::new();
    for name in names {
        let mut backends = String::new();
        for b in 0..16 {
            backends.push_str(&format!(
                "    - name: b{b}\n      provider: openai-compatible\n      endpoint: http://llm-{name}-{b}.models.svc:8000/v1\n      priority: {b}\n      credentialsSecretRef: {{ name: llm-keys, key: k{b} }}\n      models: {{ chat: model-{b}, code: coder-{b} }}\n"
            ));
        }
        docs.push(format!(
            "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {{ name: {name} }}\nspec:\n  policy: {{ healthCheck: {{ enabled: false }} }}\n  backends:\n{backends}"
        ));
    }
    docs.join("---\n")
}

/// A configuration larger than a ConfigMap could hold (about 1.3 MB for these eight routes of 16
/// accounts each) is served: it never goes through a ConfigMap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_larger_than_a_config_map_is_served() {
    let (ns, client, op, gw, _envoy) = operator_with_chat_route("big").await;
    let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);
    wait_condition(&routes, "chat", "Ready", "True").await;
    let keys: Vec<String> = (0..16).map(|b| format!("k{b}: key-{b}-0001")).collect();
    ns.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: llm-keys }}\nstringData: {{ {} }}\n",
        keys.join(", ")
    ));
    let names = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];
    ns.apply(&big_routes(&names));
    for name in names {
        let r = wait_condition(&routes, name, "Ready", "True").await;
        assert_eq!(
            condition(&r, "Programmed").unwrap().2,
            "1/1 gateway replicas serve generation 1"
        );
    }
    let snapshot = op.xds.current(&ns.name).unwrap();
    println!(
        "served: {} resources, {} bytes encoded",
        snapshot.len(),
        snapshot.bytes()
    );
    assert!(snapshot.bytes() > 1024 * 1024, "{} bytes", snapshot.bytes());
    assert!(gw.loaded("dynamic_route_configs").contains("/r7/v1/"));
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_leak_into_config_status_or_events() {
    let (ns, client, op, _gw, _envoy) = operator_with_chat_route("leak").await;
    let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);
    wait_condition(&routes, "chat", "Ready", "True").await;
    // Break a ref so that error paths run too.
    let patch = serde_json::json!({ "spec": { "backends": [
        { "name": "openai", "provider": "openai", "credentialsSecretRef": { "name": "openai-key", "key": "api-key" }, "models": { "gpt-4o": "gpt-4o" } },
        { "name": "zhipu", "provider": "zhipu", "priority": 1, "credentialsSecretRef": { "name": "zhipu-key", "key": "wrong-key" }, "models": { "gpt-4o": "glm-4-plus" } },
        { "name": "qianfan", "provider": "qianfan", "priority": 2, "credentialsSecretRef": { "name": "qianfan-key", "key": "api-key" }, "models": { "gpt-4o": "ernie-4.0-8k" } },
    ] } });
    routes
        .patch("chat", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let r = wait_condition(&routes, "chat", "ResolvedRefs", "False").await;
    assert_eq!(
        condition(&r, "ResolvedRefs").unwrap().1,
        "SecretKeyNotFound"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let mut haystack = String::new();
    for cm in cms.list(&ListParams::default()).await.unwrap() {
        haystack.push_str(&serde_json::to_string(&cm).unwrap());
    }
    let xds = secrets.get("llmroute-gateway-xds").await.unwrap();
    haystack.push_str(&serde_json::to_string(&xds).unwrap());
    for r in routes.list(&ListParams::default()).await.unwrap() {
        haystack.push_str(&serde_json::to_string(&r.status).unwrap());
    }
    for e in events.list(&ListParams::default()).await.unwrap() {
        haystack.push_str(&serde_json::to_string(&e).unwrap());
    }
    assert!(haystack.len() > 1000);
    for key in [ZHIPU_KEY, QIANFAN_KEY, OPENAI_KEY] {
        assert!(
            !haystack.contains(key),
            "a provider key leaked into a ConfigMap, status or Event"
        );
    }
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_gives_workloads_the_active_backend_itself() {
    let ns = TestNamespace::new("direct").await;
    ns.cluster().install_crds();
    let client = ns.cluster().client().await;
    let gw = Gateway::new();
    let op = start_operator(&ns, &gw, 0).await;
    ns.apply(&secret("zhipu-key", "api-key", ZHIPU_KEY));
    ns.apply(&secret("qianfan-key", "api-key", QIANFAN_KEY));
    ns.apply(&secret("openai-key", "api-key", OPENAI_KEY));
    ns.apply(&ROUTE.replace(
        "  defaultModel: gpt-4o\n",
        "  defaultModel: gpt-4o\n  workloadSecret: { name: chat-direct, mode: Direct }\n",
    ));
    let _envoy = gw.start(&ns).await;
    let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);
    let r = wait_condition(&routes, "chat", "Ready", "True").await;
    assert_eq!(
        r.status.as_ref().unwrap().endpoint.as_deref(),
        Some("https://open.bigmodel.cn/api/paas/v4")
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let w = eventually(
        Duration::from_secs(20),
        "the Direct workload Secret",
        || {
            let secrets = secrets.clone();
            async move {
                secrets
                    .get_opt("chat-direct")
                    .await
                    .ok()?
                    .and_then(|s| s.data)
            }
        },
    )
    .await;
    let get = |k: &str| String::from_utf8(w[k].0.clone()).unwrap();
    assert_eq!(
        get("OPENAI_BASE_URL"),
        "https://open.bigmodel.cn/api/paas/v4"
    );
    assert_eq!(get("OPENAI_API_KEY"), ZHIPU_KEY);
    assert_eq!(
        get("OPENAI_MODEL"),
        "glm-4-plus",
        "the provider's model name in Direct mode"
    );

    // The active backend's key goes away: the Secret follows the next backend.
    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    secrets_api
        .delete("zhipu-key", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the Direct Secret to follow qianfan",
        || {
            let secrets = secrets.clone();
            async move {
                let d = secrets.get_opt("chat-direct").await.ok()??.data?;
                (d["OPENAI_BASE_URL"].0 == b"https://qianfan.baidubce.com/v2"
                    && d["OPENAI_API_KEY"].0 == QIANFAN_KEY.as_bytes())
                .then_some(())
            }
        },
    )
    .await;
    op.stop().await;
}
