//! What the real-node suites share: the simulators as Pods (HTTPS with a private CA), a route's
//! workloads using the official OpenAI Python SDK as Pods, requests sent from inside the node's
//! network to each gateway replica, and the operator's installation.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use llmroute::api::LLMRoute;
use llmroute_devkit::tls::TestCa;

use super::cluster::{AuditMark, AuditedWrite, TestCluster, TestNamespace, eventually};
use super::envoy::repo_root;
use super::node::{self, OPENAI_IMAGE, SIM_IMAGE};

/// The provider keys the simulators accept at first.
pub const OPENAI_KEY: &str = "sk-realnode-openai-1";
pub const ZHIPU_KEY: &str = "zk-realnode-1";

/// The operator's identity as `deploy/` installs it (its ServiceAccount).
pub const OPERATOR_USER: &str = "system:serviceaccount:llmroute-system:llmroute";

/// The CA of the simulators' certificates: what the operator is told to trust (`--upstream-ca-file`).
pub fn sim_ca() -> &'static TestCa {
    static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(TestCa::new)
}

/// A kustomize overlay of `deploy/` (in `target/`, so that it names the base by a relative path),
/// as a user with a private CA for a provider writes it: the CA in a ConfigMap, mounted into the
/// operator, `--upstream-ca-file` pointing at it. The ConfigMap's name carries kustomize's content
/// hash, so a new CA rolls the operator's Pods (the operator reads the file when it starts).
pub fn overlay(extra_args: &[&str]) -> PathBuf {
    let dir = repo_root().join(format!("target/realnode-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.crt"), &sim_ca().ca_pem).unwrap();
    let mut args = vec!["--upstream-ca-file=/etc/llmroute/upstream-ca/ca.crt".to_string()];
    args.extend(extra_args.iter().map(|a| a.to_string()));
    let arg_ops: String = args
        .iter()
        .map(|a| format!("      - {{ op: add, path: /spec/template/spec/containers/0/args/-, value: \"{a}\" }}\n"))
        .collect();
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../deploy
configMapGenerator:
  - name: llmroute-upstream-ca
    namespace: llmroute-system
    files: [ca.crt]
patches:
  - target: {{ group: apps, version: v1, kind: Deployment, name: llmroute-operator }}
    patch: |-
      - op: add
        path: /spec/template/spec/volumes
        value: [{{ name: upstream-ca, configMap: {{ name: llmroute-upstream-ca }} }}]
      - op: add
        path: /spec/template/spec/containers/0/volumeMounts
        value: [{{ name: upstream-ca, mountPath: /etc/llmroute/upstream-ca, readOnly: true }}]
{arg_ops}"#
        ),
    )
    .unwrap();
    dir
}

/// Waits until `count` operator Pods are ready and one of them leads (the xDS Service's
/// EndpointSlice names it); returns the leader's Pod name.
pub async fn operator_ready(client: &kube::Client, ns: &str, count: usize) -> String {
    let pods = node::ready_pods(
        client,
        ns,
        "app.kubernetes.io/name=llmroute,app.kubernetes.io/component=operator",
        count,
    )
    .await;
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), ns);
    let ips: Vec<(String, String)> = pods.clone();
    eventually(
        Duration::from_secs(60),
        "the xDS Service pointing at the leader",
        || {
            let (slices, ips) = (slices.clone(), ips.clone());
            async move {
                let list = slices.list(&Default::default()).await.ok()?;
                let slice = list.items.iter().find(|s| {
                    s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .is_some_and(|n| n.ends_with("-xds"))
                })?;
                let ip = slice.endpoints.first()?.addresses.first()?.clone();
                ips.iter().find(|(_, i)| *i == ip).map(|(n, _)| n.clone())
            }
        },
    )
    .await
}

/// The simulators of a namespace: one Pod running the OpenAI and Zhipu simulators over HTTPS with
/// a certificate for their Service names signed by [`sim_ca`].
pub struct Sims {
    pub ns: String,
    /// The Pod's IP (the admin APIs are there, reachable from the node's network).
    pub ip: String,
}

pub const OPENAI_ADMIN: u16 = 8080;
pub const ZHIPU_ADMIN: u16 = 9080;

impl Sims {
    pub async fn start(ns: &TestNamespace, client: &kube::Client) -> Sims {
        let names = [
            format!("openai-sim.{}.svc", ns.name),
            format!("zhipu-sim.{}.svc", ns.name),
        ];
        let (cert, key) = sim_ca().issue(&[&names[0], &names[1]]);
        let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
        ns.apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{ name: sim-tls }}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
            indent(&cert),
            indent(&key)
        ));
        ns.apply(&format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{ name: sims }}
spec:
  replicas: 1
  selector: {{ matchLabels: {{ app: sims }} }}
  template:
    metadata: {{ labels: {{ app: sims }} }}
    spec:
      securityContext: {{ runAsNonRoot: true, runAsUser: 65532, fsGroup: 65532 }}
      containers:
        - name: sims
          image: {SIM_IMAGE}
          imagePullPolicy: IfNotPresent
          args:
            - --address=0.0.0.0
            - --tls-cert-dir=/tls
            - --sim=provider=openai,port=8443,admin-port={OPENAI_ADMIN},key={OPENAI_KEY}
            - --sim=provider=zhipu,port=9443,admin-port={ZHIPU_ADMIN},key={ZHIPU_KEY}
          readinessProbe: {{ httpGet: {{ path: /__sim/info, port: {OPENAI_ADMIN} }}, periodSeconds: 1 }}
          volumeMounts: [{{ name: tls, mountPath: /tls, readOnly: true }}]
      volumes: [{{ name: tls, secret: {{ secretName: sim-tls }} }}]
---
apiVersion: v1
kind: Service
metadata: {{ name: openai-sim }}
spec:
  selector: {{ app: sims }}
  ports: [{{ port: 443, targetPort: 8443 }}]
---
apiVersion: v1
kind: Service
metadata: {{ name: zhipu-sim }}
spec:
  selector: {{ app: sims }}
  ports: [{{ port: 443, targetPort: 9443 }}]
"#
        ));
        let pods = node::ready_pods(client, &ns.name, "app=sims", 1).await;
        Sims {
            ns: ns.name.clone(),
            ip: pods[0].1.clone(),
        }
    }

    /// A request to a simulator's admin API (`/__sim/...`), from the node's network.
    pub async fn admin(
        &self,
        port: u16,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let url = format!("http://{}:{port}/__sim{path}", self.ip);
        let method: reqwest::Method = method.parse().unwrap();
        node::in_node(move || async move {
            let client = llmroute_devkit::tls::http_client();
            let mut req = client.request(method, &url);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let r = req.send().await.expect("the simulator's admin API");
            r.json::<serde_json::Value>().await.unwrap_or_default()
        })
        .await
    }

    pub async fn set_fault(&self, port: u16, fault: &str) {
        self.admin(
            port,
            "PUT",
            "/fault",
            Some(serde_json::json!({ "fault": fault })),
        )
        .await;
    }

    pub async fn set_keys(&self, port: u16, keys: &[&str]) {
        self.admin(
            port,
            "PUT",
            "/keys",
            Some(serde_json::json!({ "keys": keys })),
        )
        .await;
    }

    /// The `authorization` headers of the requests the simulator on `port` received.
    pub async fn authorizations(&self, port: u16) -> Vec<String> {
        let requests = self.admin(port, "GET", "/requests", None).await;
        requests
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["headers"]["authorization"].as_str().map(str::to_string))
            .collect()
    }
}

/// The route `name` of one backend, Zhipu through its simulator (`gpt-4o` → `glm-4-flash`),
/// without probes, with `policy` lines (each indented by four spaces, ending in a newline).
pub fn zhipu_route(ns: &str, name: &str, policy: &str) -> String {
    format!(
        r#"apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: {{ name: {name} }}
spec:
  defaultModel: gpt-4o
  policy:
    healthCheck: {{ enabled: false }}
{policy}  backends:
    - name: zhipu
      provider: zhipu
      endpoint: https://zhipu-sim.{ns}.svc/api/paas/v4
      credentialsSecretRef: {{ name: zhipu-key, key: api-key }}
      models: {{ gpt-4o: glm-4-flash }}
"#
    )
}

/// The route `chat`: OpenAI through its simulator first, Zhipu next; probes every second.
pub fn chat_route(ns: &str) -> String {
    format!(
        r#"apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: {{ name: chat }}
spec:
  defaultModel: gpt-4o
  policy:
    healthCheck: {{ interval: 1s, timeout: 2s }}
    failback: {{ delay: 3s }}
  backends:
    - name: openai
      provider: openai
      endpoint: https://openai-sim.{ns}.svc/v1
      credentialsSecretRef: {{ name: openai-key, key: api-key }}
      models: {{ gpt-4o: gpt-4o-mini }}
    - name: zhipu
      provider: zhipu
      priority: 1
      endpoint: https://zhipu-sim.{ns}.svc/api/paas/v4
      credentialsSecretRef: {{ name: zhipu-key, key: api-key }}
      models: {{ gpt-4o: glm-4-flash }}
"#
    )
}

pub fn key_secret(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: {name} }}\nstringData: {{ api-key: \"{value}\" }}\n"
    )
}

/// The workload: the official OpenAI Python SDK configured by the workload Secret alone (as
/// `envFrom`), no retries (a failure shows). Prints one JSON line per request.
const WORKLOAD_PY: &str = r#"
import json, os, sys, time
from openai import OpenAI

client = OpenAI(max_retries=0, timeout=60)
model = os.environ.get("OPENAI_MODEL") or "gpt-4o"
messages = [{"role": "user", "content": "hi"}]

def chat():
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    r = raw.parse()
    return {"kind": "chat", "status": raw.status_code, "backend": raw.headers.get("x-llmroute-backend"),
            "model": r.model, "content": r.choices[0].message.content}

def stream():
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, stream=True)
    chunks = [ev.choices[0].delta.content for ev in raw.parse() if ev.choices and ev.choices[0].delta.content]
    return {"kind": "stream", "status": raw.status_code, "backend": raw.headers.get("x-llmroute-backend"),
            "chunks": len(chunks), "content": "".join(chunks)}

def report(f):
    try:
        out = f()
    except Exception as e:
        out = {"kind": f.__name__, "error": "%s: %s" % (type(e).__name__, e)}
    out["t"] = time.time()
    print(json.dumps(out), flush=True)

if sys.argv[1] == "once":
    report(chat)
    report(stream)
else:
    n, interval = int(sys.argv[2]), float(sys.argv[3])
    for _ in range(n):
        report(chat)
        time.sleep(interval)
"#;

/// Runs the workload Pod `name` (`args`: `once`, or `loop N INTERVAL`) in `ns` with the route's
/// workload Secret; returns once it started.
pub async fn start_workload(ns: &TestNamespace, name: &str, args: &[&str]) {
    let script: String = WORKLOAD_PY.lines().map(|l| format!("    {l}\n")).collect();
    ns.apply(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{ name: workload-py }}\ndata:\n  workload.py: |\n{script}"
    ));
    let args: String = args.iter().map(|a| format!("\"{a}\", ")).collect();
    ns.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{ name: {name}, labels: {{ app: workload }} }}
spec:
  restartPolicy: Never
  securityContext: {{ runAsNonRoot: true, runAsUser: 1000 }}
  containers:
    - name: app
      image: {OPENAI_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["python3", "/app/workload.py", {args}]
      envFrom: [{{ secretRef: {{ name: chat-llm }} }}]
      volumeMounts: [{{ name: app, mountPath: /app }}]
  volumes: [{{ name: app, configMap: {{ name: workload-py }} }}]
"#
    ));
}

/// Waits for the workload Pod `name` to end and returns its JSON lines (panics with its log if it
/// failed).
pub async fn workload_results(
    client: &kube::Client,
    ns: &str,
    name: &str,
    limit: Duration,
) -> Vec<serde_json::Value> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let phase = eventually(limit, &format!("workload {name} to finish"), || {
        let pods = pods.clone();
        let name = name.to_string();
        async move {
            let p = pods.get(&name).await.ok()?;
            let phase = p.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        }
    })
    .await;
    let log = node::logs(client, ns, name, "app").await;
    assert_eq!(phase, "Succeeded", "workload {name} failed:\n{log}");
    let _ = pods.delete(name, &DeleteParams::default()).await;
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Sends chat completions from inside the node's network to `addr` (`ip:port`) with `key`, as
/// fast as `workers` loops go, until `stop`; returns (answered 200, failures).
pub async fn load(
    addr: String,
    route: &str,
    key: String,
    workers: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (u64, Vec<String>) {
    let url = format!("http://{addr}/{route}/v1/chat/completions");
    node::in_node(move || async move {
        let client = llmroute_devkit::tls::http_client();
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (client, url, key, mut stop) = (client.clone(), url.clone(), key.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(120);
                while !*stop.borrow_and_update() && Instant::now() < deadline {
                    let sent = client
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&serde_json::json!({ "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] }))
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(r) => failed.push(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                        Err(e) => failed.push(format!("{e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ok, failed)
            }));
        }
        let mut total = (0, Vec::new());
        for t in tasks {
            let (ok, failed) = t.await.unwrap();
            total.0 += ok;
            total.1.extend(failed);
        }
        total
    })
    .await
}

/// One chat completion from inside the node's network to `addr` (a gateway replica's `ip:8080`);
/// returns (status, x-llmroute-backend).
pub async fn chat_via(addr: &str, route: &str, key: &str) -> (u16, String) {
    let url = format!("http://{addr}/{route}/v1/chat/completions");
    let key = key.to_string();
    node::in_node(move || async move {
        let r = llmroute_devkit::tls::http_client()
            .post(&url)
            .bearer_auth(&key)
            .json(&serde_json::json!({ "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] }))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match r {
            Ok(r) => (
                r.status().as_u16(),
                r.headers()
                    .get("x-llmroute-backend")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
            ),
            Err(_) => (0, String::new()),
        }
    })
    .await
}

/// The route's condition `type_`, as (status, reason, message).
pub async fn condition(
    routes: &Api<LLMRoute>,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let r = routes.get(name).await.ok()?;
    r.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason, c.message))
}

/// The workload Secret's route key.
pub async fn route_key(client: &kube::Client, ns: &str, route: &str) -> String {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let name = format!("{route}-llm");
    let s = eventually(Duration::from_secs(60), "the workload Secret", || {
        let (secrets, name) = (secrets.clone(), name.clone());
        async move { secrets.get_opt(&name).await.ok()? }
    })
    .await;
    String::from_utf8(s.data.unwrap()["OPENAI_API_KEY"].0.clone()).unwrap()
}

/// `kubectl` with the admin kubeconfig, asserting success.
pub fn kubectl(c: &TestCluster, args: &[&str]) -> String {
    c.kubectl_ok(args)
}

/// Deletes what `kubectl apply -k dir` created and waits until the operator's namespace is gone.
pub async fn uninstall_kustomize(c: &TestCluster, dir: &Path) {
    let _ = c.kubectl(&[
        "delete",
        "-k",
        dir.to_str().unwrap(),
        "--ignore-not-found",
        "--wait=true",
        "--timeout=120s",
    ]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes what an earlier installation left in the shared test cluster, so that this one starts as
/// on a fresh cluster: `tests/deploy.rs` applies the kustomize base (without its Pods) and leaves it,
/// and a failed test here leaves its install. Helm refuses to adopt objects it did not create (the
/// chart installs the CRD too), and a second operator would fight this one over the gateways. The
/// CRD goes as well, and with it every LLMRoute other tests left: a namespace being deleted keeps its
/// objects until its gateway Pods' grace period has passed, and the operator under test would
/// otherwise go on reconciling (and writing the status of) routes it was never meant to see.
pub fn clean_slate(c: &TestCluster) {
    for args in [
        &["delete", "crd", "llmroutes.llmroute.io"][..],
        &["delete", "namespace", "llmroute-system", "llmroute-helm"][..],
        &[
            "delete",
            "clusterrole,clusterrolebinding",
            "llmroute-operator",
        ][..],
    ] {
        let mut args = args.to_vec();
        args.extend(["--ignore-not-found", "--wait=true", "--timeout=180s"]);
        let out = c.kubectl(&args);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What a benchmark on the real node starts from: the node with this build's images, a cluster no
/// earlier installation (an earlier run's operator would reconcile during the measurement) has left
/// anything in, the CRDs, and the test overlay of `deploy/` with `extra_args` for the operator.
pub async fn bench_start(extra_args: &[&str]) -> (&'static TestCluster, kube::Client, PathBuf) {
    let c = super::cluster::cluster();
    node::node();
    node::images(env!("CARGO_BIN_EXE_llmroute"));
    let client = c.client().await;
    clean_slate(c);
    apply_crds(c);
    (c, client, overlay(extra_args))
}

/// `kubectl apply -f crds/` as a user does it (server-side, so that a re-run takes the fields over),
/// then waits until the API server serves LLMRoutes.
pub fn apply_crds(c: &TestCluster) {
    c.kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        repo_root().join("crds").to_str().unwrap(),
    ]);
    c.kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "crd/llmroutes.llmroute.io",
    ]);
}

/// The `/metrics` of the operator Pod `pod` (in `llmroute-system`; the leader's shows the
/// reconciles and the xDS figures), read from the node's network.
pub async fn operator_metrics(client: &kube::Client, pod: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "llmroute-system");
    eventually(Duration::from_secs(60), "the operator's metrics", || {
        let pods = pods.clone();
        async move {
            let ip = pods.get(pod).await.ok()?.status?.pod_ip?;
            let url = format!("http://{ip}:9090/metrics");
            node::in_node(move || async move {
                let response = llmroute_devkit::tls::http_client().get(url).send().await;
                response.ok()?.text().await.ok()
            })
            .await
        }
    })
    .await
}

/// The value of the first sample of a Prometheus text exposition whose line starts with `name`
/// (0 when there is none).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Memory of one operator process, KiB, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
pub struct OperatorMemory {
    pub rss_kib: u64,
    pub peak_kib: u64,
}

/// The memory of each operator process on this machine (the node shares its process table), the
/// leader's and the standby's.
pub fn operator_memory() -> Vec<OperatorMemory> {
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            cmdline.starts_with(b"/usr/local/bin/llmroute\0run")
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .map(|status| OperatorMemory {
            rss_kib: field(&status, "VmRSS:"),
            peak_kib: field(&status, "VmHWM:"),
        })
        .collect()
}

/// Waits (polling every `every`, at most `limit`) until `count` LLMRoutes of namespaces whose name
/// starts with `prefix` are `Ready=True`; returns how many were.
pub async fn routes_ready(
    client: &kube::Client,
    prefix: &str,
    count: usize,
    every: Duration,
    limit: Duration,
) -> usize {
    let routes: Api<LLMRoute> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        let list = routes
            .list(&kube::api::ListParams::default())
            .await
            .unwrap();
        let ready = list
            .items
            .iter()
            .filter(|r| {
                r.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .filter(|r| {
                r.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == count || start.elapsed() >= limit {
            return ready;
        }
        tokio::time::sleep(every).await;
    }
}

/// CPU time (user and system, seconds) of each operator process on this machine by process id,
/// from `/proc/<pid>/stat`.
pub fn operator_cpu_seconds() -> std::collections::BTreeMap<u32, f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .filter(|(_, path)| {
            let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
            cmdline.starts_with(b"/usr/local/bin/llmroute\0run")
        })
        .filter_map(|(pid, path)| {
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            // Fields after the command's closing parenthesis; utime and stime are the 12th and
            // 13th of them.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let (u, s): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
            Some((pid, (u + s) / ticks))
        })
        .collect()
}

/// The operator's writes since `mark` as the API server's audit log recorded them, its leader
/// Lease renewals aside.
pub fn operator_writes(c: &TestCluster, mark: &AuditMark) -> Vec<AuditedWrite> {
    let mut writes = c.writes_since(mark, OPERATOR_USER);
    writes.retain(|w| w.resource != "leases");
    writes
}

/// An answer as a test reads it: status, `Retry-After`, body.
pub type Answer = (u16, Option<String>, String);

/// `body` posted as a chat completion to each of `addrs` in turn (gateway replicas' `ip:8080`),
/// `count` times in all, `parallel` at once, from inside the node's network; every answer.
pub async fn chats_via(
    addrs: &[String],
    route: &str,
    key: &str,
    body: serde_json::Value,
    count: usize,
    parallel: usize,
) -> Vec<Answer> {
    let (addrs, route, key) = (addrs.to_vec(), route.to_string(), key.to_string());
    node::in_node(move || async move {
        let client = llmroute_devkit::tls::http_client();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..parallel).map(|_| {
            let (client, addrs, route, key, body, next) = (
                client.clone(),
                addrs.clone(),
                route.clone(),
                key.clone(),
                body.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut answers = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= count {
                        return answers;
                    }
                    let url = format!(
                        "http://{}/{route}/v1/chat/completions",
                        addrs[i % addrs.len()]
                    );
                    let r = client
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&body)
                        .timeout(Duration::from_secs(20))
                        .send()
                        .await;
                    answers.push(match r {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let retry = r
                                .headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            (status, retry, r.text().await.unwrap_or_default())
                        }
                        Err(e) => (0, None, e.to_string()),
                    });
                }
            })
        });
        let mut all = Vec::new();
        for t in futures::future::join_all(tasks).await {
            all.extend(t.unwrap());
        }
        all
    })
    .await
}
