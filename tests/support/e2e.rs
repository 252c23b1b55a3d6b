//! The end-to-end harness: `llmroute run` as a process against the test control plane (one
//! namespace), a gateway replica (the real Envoy 1.40) started from the bootstrap and certificate a
//! gateway Pod mounts and configured by the operator over xDS, HTTPS provider simulators with a
//! run-time test CA (trusted by the gateway and the prober: `--upstream-ca-file`), and clients that
//! read `OPENAI_BASE_URL` / `OPENAI_API_KEY` from the workload Secret as an OpenAI SDK would (only
//! the Service host is replaced by 127.0.0.1:<port>: the gateway runs on the host here).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use llmroute::api::LLMRoute;
use llmroute_devkit::sim::{Sim, SimConfig, SimProvider};
use llmroute_devkit::tls::TestCa;

use super::cluster::{TestNamespace, eventually};
use super::envoy::{Envoy, free_port};
use super::gateway::HostGateway;

/// One namespace's whole system.
pub struct Stack {
    pub ns: TestNamespace,
    pub client: kube::Client,
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub ca_file: PathBuf,
    pub port: u16,
    gateway: HostGateway,
    pub http_addr: String,
    operator: Option<Child>,
    region: String,
    pub envoy: Option<Envoy>,
    sidecar: Option<Child>,
    /// The operator gives the gateway llmroute's stream usage module (as in a Pod).
    usage_module: bool,
    /// The instant the operator's budget calendar starts at (`--test-clock-start`), if not now.
    clock_start: Option<String>,
}

impl Stack {
    /// A namespace and `llmroute run` for it (region `region` for routes without one).
    pub async fn start(prefix: &str, region: &str) -> Stack {
        let ns = TestNamespace::new(prefix).await;
        let c = ns.cluster();
        c.install_crds();
        let client = c.client().await;
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let ca_file = dir.path().join("ca.pem");
        ca.write_ca(&ca_file).unwrap();
        let gateway = HostGateway::new();
        let mut stack = Stack {
            ns,
            client,
            ca,
            ca_file,
            port: gateway.ports.port,
            gateway,
            http_addr: format!("127.0.0.1:{}", free_port()),
            dir,
            operator: None,
            region: region.to_string(),
            envoy: None,
            sidecar: None,
            usage_module: true,
            clock_start: None,
        };
        stack.start_operator(region);
        stack
    }

    fn start_operator(&mut self, region: &str) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("operator.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_llmroute"))
            .args(["run", "--leader-elect=false", "--log-format=json"])
            .arg(format!("--namespace={}", self.ns.name))
            .arg(format!("--default-region={region}"))
            // The test runs the gateway's replica (below), not the cluster.
            .args(
                self.gateway
                    .operator_args()
                    .into_iter()
                    .filter(|a| self.usage_module || !a.starts_with("--gateway-usage-module=")),
            )
            .args((!self.usage_module).then_some("--gateway-usage-module="))
            .arg(format!("--xds-ca-secret={}/llmroute-xds-ca", self.ns.name))
            // The usage ledgers go to the operator's namespace: the test's own here.
            .arg(format!("--operator-namespace={}", self.ns.name))
            .arg(format!("--upstream-ca-file={}", self.ca_file.display()))
            .arg(format!("--http-addr={}", self.http_addr))
            // Usage counts are read every second (budgets and status usage within seconds).
            .arg("--usage-interval=1s")
            .args(
                self.clock_start
                    .iter()
                    .map(|at| format!("--test-clock-start={at}")),
            )
            .env("KUBECONFIG", self.ns.cluster().kubeconfig())
            .env("LLMROUTE_LOG", "info,llmroute=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start llmroute run");
        self.operator = Some(child);
    }

    /// Runs the operator again without the stream usage module for the gateway
    /// (`--gateway-usage-module=`): a gateway as one run without it is configured.
    pub fn without_usage_module(&mut self) {
        self.usage_module = false;
        self.restart_operator();
    }

    /// Runs the operator again with its budget calendar reading `instant` (RFC 3339) now.
    pub fn restart_operator_at(&mut self, instant: &str) {
        self.clock_start = Some(instant.to_string());
        self.restart_operator();
    }

    /// Stops `llmroute run` (SIGTERM, as a Pod's deletion does) and starts it again: a new leader.
    pub fn restart_operator(&mut self) {
        if let Some(op) = self.operator.take() {
            stop(op);
        }
        let region = self.region.clone();
        self.start_operator(&region);
    }

    /// Starts the gateway replica's sidecar as the Pod runs it (`llmroute gateway
    /// shutdown-manager`): it receives the usage log and serves the counts at `/usage`. Again after
    /// [`Stack::stop_sidecar`]: a restarted sidecar process.
    pub fn start_sidecar(&mut self) {
        assert!(self.sidecar.is_none(), "the sidecar runs already");
        let d = self.dir.path();
        std::fs::create_dir_all(d.join("shutdown")).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("sidecar.log"))
            .unwrap();
        let ports = &self.gateway.ports;
        let child = Command::new(env!("CARGO_BIN_EXE_llmroute"))
            .args(["gateway", "shutdown-manager", "--address=127.0.0.1"])
            .arg(format!("--port={}", ports.sidecar_port))
            .arg(format!("--usage-port={}", ports.usage_port))
            // The gateway's certificate, where the replica's files are (see `HostGateway`).
            .arg(format!(
                "--tls-dir={}",
                self.gateway.dir.path().join("xds").display()
            ))
            .arg(format!("--usage-log={}", ports.usage_log))
            .arg(format!("--namespace={}", self.ns.name))
            .arg(format!("--state-dir={}", d.join("shutdown").display()))
            // It prints the gateway's access log.
            .stdout(self.access_log_file())
            .stderr(log)
            .spawn()
            .expect("start the sidecar");
        self.sidecar = Some(child);
    }

    /// Stops the sidecar (SIGTERM).
    pub fn stop_sidecar(&mut self) {
        if let Some(c) = self.sidecar.take() {
            stop(c);
        }
    }

    /// Kills the sidecar (SIGKILL): no last read, no last checkpoint.
    pub fn kill_sidecar(&mut self) {
        if let Some(mut c) = self.sidecar.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The gateway Pod killed outright: Envoy and the sidecar get SIGKILL and the Pod's emptyDir
    /// (the usage log and the sidecar's checkpoint) goes with them.
    pub fn kill_gateway_pod(&mut self) {
        self.envoy = None;
        self.kill_sidecar();
        let dir = std::path::Path::new(&self.gateway.ports.usage_log)
            .parent()
            .unwrap()
            .to_path_buf();
        for entry in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
    }

    /// The sidecar's `/usage`, once it answers, read as the operator reads it (mutual TLS with a
    /// client certificate of the namespace's xDS CA).
    pub async fn sidecar_usage(&self) -> llmroute::usage::ledger::Report {
        let reader = llmroute::operator::usage_read::UsageReader::new(std::sync::Arc::new(
            self.xds_authority().await,
        ))
        .unwrap();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], self.gateway.ports.usage_port).into();
        eventually(Duration::from_secs(10), "the sidecar's /usage", || {
            let reader = &reader;
            async move { reader.read(&self.ns.name, addr).await.ok() }
        })
        .await
    }

    /// Waits until the gateway's Envoy holds a lease of `route`'s token budget (admission), and
    /// returns what it holds.
    pub async fn leased(&self, route: &str) -> llmroute::usage::lease::Held {
        let held = eventually(
            Duration::from_secs(20),
            &format!("route {route} leased"),
            || async {
                let report = self.sidecar_usage().await;
                report
                    .leases?
                    .routes
                    .get(route)
                    .filter(|h| h.granted > 0)
                    .copied()
            },
        )
        .await;
        // The sidecar wrote it; Envoy's module loads it within 200 ms.
        tokio::time::sleep(Duration::from_millis(500)).await;
        held
    }

    /// Waits until the gateway's Envoy holds its share of `route`'s rate limits.
    pub async fn rate_leased(&self, route: &str) {
        eventually(
            Duration::from_secs(20),
            &format!("route {route} rate-limited"),
            || async {
                let report = self.sidecar_usage().await;
                report.leases?.rates.contains_key(route).then_some(())
            },
        )
        .await;
    }

    /// Waits until the gateway's Envoy no longer holds a lease of `route` (its token budget went).
    pub async fn not_leased(&self, route: &str) {
        eventually(
            Duration::from_secs(20),
            &format!("route {route} released"),
            || async {
                let report = self.sidecar_usage().await;
                (!report.leases?.routes.contains_key(route)).then_some(())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// The operator's xDS CA (the Secret `llmroute-xds-ca` of the test's namespace).
    pub async fn xds_authority(&self) -> llmroute::xds::tls::Authority {
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(self.client.clone(), &self.ns.name);
        let data = secrets.get("llmroute-xds-ca").await.unwrap().data.unwrap();
        let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
        llmroute::xds::tls::Authority::from_pem(&text("ca.crt"), &text("ca.key")).unwrap()
    }

    /// The sidecar's `/metrics` (empty when it does not answer).
    pub fn sidecar_metrics(&self) -> impl std::future::Future<Output = String> + use<> {
        let url = format!(
            "http://127.0.0.1:{}/metrics",
            self.gateway.ports.sidecar_port
        );
        async move {
            match llmroute_devkit::tls::http_client().get(url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        }
    }

    /// An HTTPS simulator of `provider` accepting `key`.
    pub async fn sim(&self, provider: SimProvider, key: &str) -> Sim {
        self.sim_with(SimConfig::new(provider).key(key)).await
    }

    pub async fn sim_with(&self, config: SimConfig) -> Sim {
        Sim::start_tls(config, &self.ca)
            .await
            .expect("start simulator")
    }

    /// The provider of a route's backend `name` (see [`backend`]): an HTTPS simulator of `provider`
    /// accepting `key`, and the Secret `{name}-key` holding that key.
    pub async fn provider(&self, name: &str, provider: SimProvider, key: &str) -> Sim {
        self.provider_with(name, SimConfig::new(provider).key(key))
            .await
    }

    /// [`Stack::provider`] with the simulator `config` says; the Secret holds its first key.
    pub async fn provider_with(&self, name: &str, config: SimConfig) -> Sim {
        let key = config.keys.first().expect("the simulator's key").clone();
        let sim = self.sim_with(config).await;
        self.ns.apply(&key_secret(&format!("{name}-key"), &key));
        sim
    }

    /// Applies the route `name` of `backends` (see [`route`]).
    pub fn apply_route(&self, name: &str, policy: &str, backends: &[String]) {
        self.ns.apply(&route(name, policy, backends));
    }

    pub fn routes(&self) -> Api<LLMRoute> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// Starts the gateway's replica (once; the operator must have created the gateway's objects).
    pub async fn start_gateway(&mut self) {
        if self.envoy.is_none() {
            self.envoy = Some(
                self.gateway
                    .start(&self.client, &self.ns.name, "gw-0")
                    .await,
            );
        }
    }

    /// Starts the gateway's replica (once), waits for `route` to be Ready (which now means that
    /// replica serves it), and returns the workload's view of the route.
    pub async fn serve(&mut self, route: &str) -> Workload {
        self.start_gateway().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        let mut ready = false;
        while !ready && std::time::Instant::now() < deadline {
            ready = self
                .routes()
                .get(route)
                .await
                .ok()
                .and_then(|r| r.status)
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ready {
            let log = self.operator_log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let status = self.routes().get(route).await.ok().map(|r| r.status);
            panic!(
                "route {route} not Ready in 45 s; status {status:?}\noperator log (last 60 lines, newest first):\n{}\nEnvoy log:\n{}",
                tail.join("\n"),
                self.envoy_log()
            );
        }
        let w = self.workload(route).await;
        // Programmed means loaded: the route answers its models list at once.
        let r = w.get("/models").await.expect("GET /models");
        assert!(
            r.status().is_success(),
            "{route} is Ready but not served: {}",
            r.status()
        );
        w
    }

    /// `OPENAI_BASE_URL` and `OPENAI_API_KEY` from the route's workload Secret.
    pub async fn workload(&self, route: &str) -> Workload {
        workload_of(&self.client, &self.ns.name, route, self.port).await
    }

    /// Follows the gateway's usage log as the Pod's sidecar does, in this process, and returns
    /// its counters.
    pub async fn usage_log(&self) -> std::sync::Arc<llmroute::agent::counters::UsageCounters> {
        let (follower, counters) = llmroute::agent::follow::Follower::open(
            std::path::Path::new(&self.gateway.ports.usage_log),
            &self.ns.name,
        );
        let counters = std::sync::Arc::new(counters);
        let (c, stop) = (counters.clone(), std::sync::Arc::default());
        let follower = follower.echo(self.access_log_file());
        std::thread::spawn(move || llmroute::agent::follow::follow(follower, c, stop));
        counters
    }

    /// Where the gateway's access log is printed by whatever follows it (the sidecar, or
    /// [`Stack::usage_log`]).
    fn access_log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("access.log"))
            .expect("the access log file")
    }

    pub fn operator_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default()
    }

    /// Envoy's own log, then its access log: as printed by what follows it (the sidecar, or
    /// [`Stack::usage_log`]), or, when nothing does, as Envoy wrote it.
    pub fn envoy_log(&self) -> String {
        let mut text = self
            .envoy
            .as_ref()
            .map(|e| e.log_text())
            .unwrap_or_default();
        let access = std::fs::read(self.dir.path().join("access.log"))
            .or_else(|_| std::fs::read(&self.gateway.ports.usage_log))
            .unwrap_or_default();
        text.push_str(&String::from_utf8_lossy(&access).replace('\0', ""));
        text
    }

    /// What the gateway's Envoy has loaded: its admin config dump of `resource` (e.g.
    /// `dynamic_active_clusters`).
    pub fn loaded(&self, resource: &str) -> serde_json::Value {
        self.gateway.loaded(resource)
    }

    /// The gateway's Envoy admin stats whose name contains `needle`, with their values.
    pub fn gateway_stats(&self, needle: &str) -> Vec<(String, u64)> {
        self.gateway.stats_matching(needle)
    }

    /// The operator's /metrics.
    pub async fn metrics(&self) -> String {
        llmroute_devkit::tls::http_client()
            .get(format!("http://{}/metrics", self.http_addr))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap()
    }

    /// The events about `route`.
    pub async fn route_events(&self, route: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns.name);
        let list = api.list(&Default::default()).await.unwrap();
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(route))
            .collect()
    }

    /// Event reasons and notes for `route`.
    pub async fn events(&self, route: &str) -> Vec<(String, String)> {
        let events = self.route_events(route).await.into_iter();
        events
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// The events about `route`: reason and how many times it was emitted (a series counts more).
    pub async fn event_counts(&self, route: &str) -> Vec<(String, i32)> {
        let events = self.route_events(route).await.into_iter();
        events
            .map(|e| {
                let count = e.series.as_ref().map_or(1, |s| s.count);
                (e.reason.unwrap_or_default(), count)
            })
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(op) = self.operator.take() {
            stop(op);
        }
        self.stop_sidecar();
    }
}

/// SIGTERM, then SIGKILL after 5 s.
fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..50 {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// What a workload of `namespace` reads from the workload Secret of `route`, with the gateway
/// Service's host replaced by the local Envoy on `port`.
pub async fn workload_of(
    client: &kube::Client,
    namespace: &str,
    route: &str,
    port: u16,
) -> Workload {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = format!("{route}-llm");
    let s = eventually(Duration::from_secs(30), "the workload Secret", || {
        let secrets = secrets.clone();
        let name = name.clone();
        async move { secrets.get_opt(&name).await.ok()? }
    })
    .await;
    let data = s.data.unwrap();
    let base = String::from_utf8(data["OPENAI_BASE_URL"].0.clone()).unwrap();
    let key = String::from_utf8(data["OPENAI_API_KEY"].0.clone()).unwrap();
    let path = base
        .split_once(".svc:8080")
        .expect("gateway URL")
        .1
        .to_string();
    Workload {
        base: format!("http://127.0.0.1:{port}{path}"),
        key,
        client: llmroute_devkit::tls::http_client(),
    }
}

/// What a workload has: the base URL and key of its route.
#[derive(Clone)]
pub struct Workload {
    pub base: String,
    pub key: String,
    pub client: reqwest::Client,
}

impl Workload {
    /// A chat completion as an OpenAI SDK sends it.
    pub async fn chat(&self, model: &str) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(format!("{}/chat/completions", self.base))
            .bearer_auth(&self.key)
            .json(&serde_json::json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] }))
            .send()
            .await
    }

    /// A chat completion request with this body (streamed, with options...).
    pub async fn chat_json(&self, body: &serde_json::Value) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(format!("{}/chat/completions", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
    }

    pub async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
    }
}

/// The backend that answered (`x-llmroute-backend`).
pub fn backend_of(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-llmroute-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The route `name` of `backends` (see [`backend`]), whose default model is `chat`, without health
/// probing (only in-request failover acts), with `policy` lines added.
pub fn route(name: &str, policy: &str, backends: &[String]) -> String {
    route_of(
        name,
        "",
        &format!("    healthCheck: {{ enabled: false }}\n{policy}"),
        backends,
    )
}

/// The route `name` of `backends`, whose default model is `chat`, with `spec` lines (e.g.
/// `workloadSecret`) and `policy` lines.
pub fn route_of(name: &str, spec: &str, policy: &str, backends: &[String]) -> String {
    format!(
        "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {{ name: {name} }}\nspec:\n  defaultModel: chat\n{spec}  policy:\n{policy}  backends:\n{}",
        backends.concat()
    )
}

/// A backend entry of a route: `sim`'s provider at `sim`'s base URL (Azure's is the resource root;
/// the deployment path is the gateway's to add), its key in the Secret `{name}-key` (as
/// [`Stack::provider`] makes it), the route's model `chat` served as `model`, then `extra` lines
/// (priority, weight...).
pub fn backend(name: &str, sim: &Sim, model: &str, extra: &str) -> String {
    backend_models(name, sim, &format!("{{ chat: {model} }}"), extra)
}

/// [`backend`] with the whole model mapping, e.g. `{ chat: gpt-4o-mini, emb: text-embedding-3-small }`.
pub fn backend_models(name: &str, sim: &Sim, models: &str, extra: &str) -> String {
    format!(
        "    - name: {name}\n      provider: {}\n      endpoint: {}\n      credentialsSecretRef: {{ name: {name}-key, key: api-key }}\n      models: {models}\n{extra}",
        sim.provider().id(),
        sim.base_url()
    )
}

/// A Secret with one key `api-key`.
pub fn key_secret(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: {name} }}\nstringData: {{ api-key: \"{value}\" }}\n"
    )
}

/// The sum of a counter's series (Prometheus text) whose labels contain every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
