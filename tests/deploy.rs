//! Packaging on the real control plane: the kustomize base (`kubectl apply -k deploy/`), the Helm
//! chart (`helm lint`, `helm template`, the output applied), the operator run with the identity and
//! the exact RBAC each of them installs, every example applied with `--dry-run=server`, and the
//! status the operator writes read by kstatus (Flux) and by Argo CD's health script.
//!
//! The test control plane has no kubelet: the operator's Pods are created (which proves that the
//! `restricted` Pod Security level admits them) but stay Pending, so the operator itself runs here as a
//! process with the Deployment's own arguments and a kubeconfig for its ServiceAccount.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cluster::{TestCluster, TestNamespace, cluster, eventually};
use support::envoy::{free_port, repo_root};
use support::gitops::{argocd_health, kstatus};
use support::tools::{helm, lua_interpreters};

const CRD: &str = "crds/llmroute.io_llmroutes.yaml";
/// Copies of `crds/llmroute.io_llmroutes.yaml` (kustomize and Helm load no file outside their
/// directory): Helm's byte for byte, kustomize's as JSON (its YAML 1.1 reader would read the
/// unquoted `default: 2024-10-21` as a timestamp). `UPDATE_GOLDEN=1` refreshes them.
const CRD_YAML_COPY: &str = "deploy/helm/llmroute/files/crds/llmroute.io_llmroutes.yaml";
const CRD_JSON_COPY: &str = "deploy/crds/llmroute.io_llmroutes.json";
const CHART: &str = "deploy/helm/llmroute";

// ---------------------------------------------------------------------------------------------
// Helpers

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} among {:?}", kinds(docs)))
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn stdout_of(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `kubectl kustomize deploy/` (the objects `kubectl apply -k deploy/` applies).
fn kustomize_build() -> Vec<Value> {
    let out = Command::new(cluster().kubectl_path())
        .arg("kustomize")
        .arg(repo_root().join("deploy"))
        .output()
        .expect("run kubectl kustomize");
    yaml_docs(&stdout_of(out, "kubectl kustomize deploy/"))
}

/// `helm template RELEASE deploy/helm/llmroute --namespace NS ARGS...`.
fn helm_template(release: &str, namespace: &str, args: &[&str]) -> String {
    let out = Command::new(helm())
        .args(["template", release])
        .arg(repo_root().join(CHART))
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .expect("run helm template");
    stdout_of(out, &format!("helm template {}", args.join(" ")))
}

/// The rules of the ClusterRole and of the Role in a set of objects.
/// The ClusterRole's rules, and every Role's rules (in the operator's namespace) in one list.
fn rules(docs: &[Value]) -> (Value, Value) {
    let mut roles: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Role").collect();
    roles.sort_by_key(|d| d["rules"].to_string());
    (
        find(docs, "ClusterRole")["rules"].clone(),
        Value::Array(
            roles
                .iter()
                .flat_map(|r| r["rules"].as_array().unwrap().clone())
                .collect(),
        ),
    )
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(deployment: &Value) -> Vec<String> {
    container(deployment)["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect()
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{:x}", (nanos / 1000) % 0xff_ffff)
}

/// Applies the kustomize base once per test run (the objects are shared by the tests below), all
/// but the operator's Deployment and PodDisruptionBudget: this cluster has a real node, and the
/// operator running there cluster-wide would reconcile every other test's routes (tests/realnode.rs
/// runs it for real). The Deployment goes through the API server's admission as a server-side dry
/// run.
fn kustomize_applied() -> &'static String {
    static APPLIED: OnceLock<String> = OnceLock::new();
    APPLIED.get_or_init(|| {
        let c = cluster();
        let docs = kustomize_build();
        let (workload, rest): (Vec<Value>, Vec<Value>) = docs
            .into_iter()
            .partition(|d| d["kind"] == "Deployment" || d["kind"] == "PodDisruptionBudget");
        let list = |items: Vec<Value>| {
            json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string()
        };
        let out = c.kubectl_as(&c.kubeconfig(), &["apply", "-f", "-"], Some(&list(rest)));
        let mut stdout = stdout_of(
            out,
            "kubectl apply (the kustomize base without the operator's Pods)",
        );
        let out = c.kubectl_as(
            &c.kubeconfig(),
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&list(workload)),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stdout.push_str(&stdout_of(
            out,
            "kubectl apply --dry-run=server (the operator's Deployment)",
        ));
        // The namespace warns about (and enforces) the `restricted` Pod Security level.
        assert!(
            !stderr.contains("PodSecurity"),
            "the operator's Pod template is not `restricted`:\n{stderr}"
        );
        c.kubectl_ok(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/llmroutes.llmroute.io",
        ]);
        stdout
    })
}

/// `llmroute run` as a process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Operator {
    child: Child,
    log: PathBuf,
    http: Option<String>,
}

impl Operator {
    /// Runs `llmroute` with `args` (starting with `run`) as the identity of `kubeconfig`.
    fn start(args: &[String], kubeconfig: &Path, pod_namespace: &str, log: PathBuf) -> Operator {
        let mut args = args.to_vec();
        // Once the operator serves /metrics, /healthz and /readyz (--http-addr, default
        // 0.0.0.0:9090), bind it to a free port so that parallel tests do not collide.
        let http = http_addr_supported().then(|| {
            let addr = format!("127.0.0.1:{}", free_port());
            args.retain(|a| !a.starts_with("--http-addr"));
            args.push(format!("--http-addr={addr}"));
            addr
        });
        let child = Command::new(env!("CARGO_BIN_EXE_llmroute"))
            .args(&args)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", pod_namespace)
            .env("POD_NAME", "llmroute-operator-test")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("operator log"))
            .spawn()
            .expect("start llmroute run");
        Operator { child, log, http }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as the kubelet stops a container; returns the exit status within `limit`.
    fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.terminate(Duration::from_secs(5));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether this build of `llmroute run` has `--http-addr` (the probes' and metrics' endpoint).
fn http_addr_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_llmroute"))
            .args(["run", "--help"])
            .output()
            .expect("llmroute run --help");
        let help = String::from_utf8_lossy(&out.stdout);
        let supported = help.contains("--http-addr");
        if !supported {
            eprintln!(
                "note: `llmroute run` has no --http-addr yet: /healthz, /readyz and /metrics are not checked"
            );
        }
        supported
    })
}

/// Mints a kubeconfig for the ServiceAccount `namespace/name` (its groups as the API server gives them).
fn service_account_kubeconfig(c: &TestCluster, namespace: &str, name: &str, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{namespace}-{name}.kubeconfig"));
    c.mint_kubeconfig(
        &format!("system:serviceaccount:{namespace}:{name}"),
        &[
            "system:serviceaccounts",
            &format!("system:serviceaccounts:{namespace}"),
            "system:authenticated",
        ],
        &path,
    );
    path
}

fn secret_yaml(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: {name} }}\nstringData: {{ api-key: {value} }}\n"
    )
}

/// A route of Zhipu's real host, which cannot be reached from the test cluster: without health
/// checks (with them, every probe fails and the route is `Ready=False NoHealthyBackend`).
fn route_yaml(name: &str, secret: &str, model: &str) -> String {
    format!(
        "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: {{ name: {name} }}\nspec:\n  region: cn\n  defaultModel: chat\n  policy: {{ healthCheck: {{ enabled: false }} }}\n  backends:\n    - {{ name: zhipu, provider: zhipu, credentialsSecretRef: {{ name: {secret}, key: api-key }}, models: {{ chat: {model} }} }}\n"
    )
}

/// The route as the API server serves it (JSON), once `check` accepts it.
async fn route_when(
    c: &TestCluster,
    namespace: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    eventually(Duration::from_secs(30), what, || {
        let out = c.kubectl(&["get", "llmroute", name, "-n", namespace, "-o", "json"]);
        let route: Option<Value> = out
            .status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("JSON"));
        let ok = route.as_ref().is_some_and(|r| {
            r["status"]["observedGeneration"] == r["metadata"]["generation"] && check(r)
        });
        async move { if ok { route } else { None } }
    })
    .await
}

fn condition<'a>(route: &'a Value, type_: &str) -> Option<&'a Value> {
    route["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn condition_is(route: &Value, type_: &str, status: &str) -> bool {
    condition(route, type_).is_some_and(|c| c["status"] == status)
}

/// The operator's HTTP endpoints (when it has them): /healthz and /readyz answer 200, /metrics is
/// Prometheus text.
async fn check_http_endpoints(op: &Operator) {
    let Some(addr) = &op.http else { return };
    let client = llmroute_devkit::tls::http_client();
    for path in ["/healthz", "/readyz"] {
        let url = format!("http://{addr}{path}");
        eventually(Duration::from_secs(20), &format!("GET {url} = 200"), || {
            let client = client.clone();
            let url = url.clone();
            async move {
                let r = client.get(&url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
    }
    let metrics = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert!(
        metrics.status().is_success(),
        "GET /metrics: {}",
        metrics.status()
    );
    let body = metrics.text().await.expect("metrics body");
    assert!(
        body.contains("# TYPE") || body.contains("# HELP"),
        "/metrics is not Prometheus text:\n{body}"
    );
}

// ---------------------------------------------------------------------------------------------
// Files

/// `value` with integral floats as integers (`minimum: 0.0` and `minimum: 0` mean the same).
fn normalized(value: &Value) -> Value {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => json!(f as i64),
            _ => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        _ => value.clone(),
    }
}

#[test]
fn every_crd_copy_equals_crds_dir() {
    let source = std::fs::read_to_string(repo_root().join(CRD)).unwrap();
    let value: Value = serde_yaml_ng::from_str(&source).unwrap();
    let refresh = "run `UPDATE_GOLDEN=1 cargo test --test deploy every_crd_copy` to refresh it";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(repo_root().join(CRD_YAML_COPY), &source).unwrap();
        let json = serde_json::to_string_pretty(&value).unwrap() + "\n";
        std::fs::write(repo_root().join(CRD_JSON_COPY), json).unwrap();
    }
    let yaml_copy = std::fs::read_to_string(repo_root().join(CRD_YAML_COPY)).unwrap_or_default();
    assert!(
        yaml_copy == source,
        "{CRD_YAML_COPY} differs from {CRD}: {refresh}"
    );
    let json_copy: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join(CRD_JSON_COPY)).unwrap_or_default(),
    )
    .unwrap_or(Value::Null);
    assert!(
        normalized(&json_copy) == normalized(&value),
        "{CRD_JSON_COPY} differs from {CRD}: {refresh}"
    );
    // What kustomize makes of it is still the CRD (no date turned into a timestamp).
    let built = kustomize_build();
    let crd = find(&built, "CustomResourceDefinition");
    assert_eq!(normalized(&crd["spec"]), normalized(&value["spec"]));
}

#[test]
fn dockerfile_builds_the_operator_and_runs_it_as_non_root() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(stages >= 2, "a multi-stage build");
    assert!(dockerfile.contains("cargo build --release --locked"));
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER in the final stage");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("a numeric USER (runAsNonRoot can only verify a numeric one)");
    assert_ne!(uid, 0);
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/llmroute"]"#));
    assert!(dockerfile.contains(r#"CMD ["run"]"#));
    // The builder's Rust is at least the crate's rust-version.
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let wanted = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let builder = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM docker.io/library/rust:"))
        .expect("a rust builder stage");
    let version = |s: &str| -> Vec<u32> {
        s.split(['.', '-', ' '])
            .take(2)
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    assert!(
        version(builder) >= version(&wanted),
        "rust:{builder} < {wanted}"
    );
    for entry in ["target", ".tools", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim_start_matches('/') == entry),
            ".dockerignore does not exclude {entry}"
        );
    }
    // The image and its port match the manifests.
    let deployment = std::fs::read_to_string(repo_root().join("deploy/operator.yaml")).unwrap();
    assert!(deployment.contains("image: ghcr.io/llmroute/llmroute:0.1.0"));
    assert!(dockerfile.contains("EXPOSE 9090"));
}

// ---------------------------------------------------------------------------------------------
// Kustomize

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_k_deploy_installs_a_hardened_operator() {
    let c = cluster();
    let applied = kustomize_applied();
    for object in [
        "namespace/llmroute-system",
        "customresourcedefinition.apiextensions.k8s.io/llmroutes.llmroute.io",
        "serviceaccount/llmroute",
        "clusterrole.rbac.authorization.k8s.io/llmroute-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/llmroute-operator",
        "role.rbac.authorization.k8s.io/llmroute-leader-election",
        "rolebinding.rbac.authorization.k8s.io/llmroute-leader-election",
        "role.rbac.authorization.k8s.io/llmroute-xds",
        "rolebinding.rbac.authorization.k8s.io/llmroute-xds",
        "deployment.apps/llmroute-operator",
        "service/llmroute-operator-metrics",
        "service/llmroute-xds",
        "poddisruptionbudget.policy/llmroute-operator",
    ] {
        assert!(applied.contains(object), "{object} not applied:\n{applied}");
    }
    // A second apply changes nothing. (kubectl always re-sends a PodDisruptionBudget's selector,
    // whose patch strategy is `replace`, and reports it `configured`; the patch changes nothing.)
    let rest: Vec<Value> = kustomize_build()
        .into_iter()
        .filter(|d| d["kind"] != "Deployment" && d["kind"] != "PodDisruptionBudget")
        .collect();
    let again = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "-f", "-"],
        Some(&json!({ "apiVersion": "v1", "kind": "List", "items": rest }).to_string()),
    );
    let again = stdout_of(again, "a second kubectl apply");
    assert!(
        again.lines().all(|l| l.ends_with(" unchanged")),
        "a second apply changed something:\n{again}"
    );
    // The Deployment as applied: `kubectl apply -k deploy/` builds exactly these objects.
    let out = serde_json::to_string(
        kustomize_build()
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .unwrap(),
    )
    .unwrap();
    let d: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "llmroute");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let ctr = container(&d);
    let sc = &ctr["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(ctr["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(ctr["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(ctr["ports"][0]["name"], "http-metrics");
    assert_eq!(ctr["ports"][0]["containerPort"], 9090);
    assert!(ctr["resources"]["requests"]["memory"].is_string());
    assert!(ctr["resources"]["limits"]["memory"].is_string());
    let args = args_of(&d);
    assert_eq!(args[0], "run");
    assert!(args.contains(&"--leader-elect=true".to_string()));
    let env = ctr["env"].as_array().unwrap();
    let pod_namespace = env.iter().find(|e| e["name"] == "POD_NAMESPACE").unwrap();
    assert_eq!(
        pod_namespace["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );

    let svc: Value = serde_json::from_str(&c.kubectl_ok(&[
        "get",
        "service",
        "llmroute-operator-metrics",
        "-n",
        "llmroute-system",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(svc["spec"]["ports"][0]["port"], 9090);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http-metrics");
    assert_eq!(
        svc["spec"]["selector"], d["spec"]["selector"]["matchLabels"],
        "the metrics Service selects the operator's Pods"
    );

    // That the restricted Pod Security level admits the Pods, and that two of them run and one
    // leads, is shown with a real kubelet by tests/realnode.rs.
}

/// The operator with the identity and RBAC `kubectl apply -k deploy/` installed, started with the
/// Deployment's own arguments, reconciles routes; kstatus and Argo CD's health script read the status
/// it writes as they should. SIGTERM stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kustomize_install_runs_the_operator_and_gitops_tools_read_its_status() {
    let c = cluster();
    kustomize_applied();
    let ns = TestNamespace::new("deploy").await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(c, "llmroute-system", "llmroute", dir.path());
    let deployment = kustomize_build()
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let mut args = args_of(&deployment);
    // One namespace only (other tests share the control plane), a Lease of its own, and a gateway
    // replica run here (on the host: the xDS server on 127.0.0.1, no gateway Pods).
    let gateway = support::gateway::HostGateway::new();
    args.extend([
        format!("--namespace={}", ns.name),
        format!("--leader-election-name={}", unique("deploy-test")),
    ]);
    args.extend(gateway.operator_args());
    ns.apply(&secret_yaml("zhipu-key", "deploy-test-key"));
    ns.apply(&route_yaml("chat", "zhipu-key", "glm-4-plus"));
    ns.apply(&route_yaml("broken", "missing-key", "glm-4-plus"));
    let mut op = Operator::start(
        &args,
        &kubeconfig,
        "llmroute-system",
        dir.path().join("operator.log"),
    );
    let client = c.client().await;
    let _envoy = gateway.start(&client, &ns.name, "gw-0").await;

    let ready = route_when(c, &ns.name, "chat", "chat Ready=True", |r| {
        condition_is(r, "Ready", "True")
    })
    .await;
    let broken = route_when(c, &ns.name, "broken", "broken Ready=False", |r| {
        condition_is(r, "Ready", "False")
    })
    .await;
    assert_eq!(
        condition(&broken, "ResolvedRefs").unwrap()["reason"],
        "SecretNotFound"
    );
    check_http_endpoints(&op).await;

    // The same route as seen after an edit the operator has not observed yet.
    let mut edited = ready.clone();
    let generation = edited["metadata"]["generation"].as_i64().unwrap();
    edited["metadata"]["generation"] = json!(generation + 1);
    let objects = [ready.clone(), edited.clone(), broken.clone()];
    let verdicts = kstatus(&objects);
    let statuses: Vec<&str> = verdicts.iter().map(|v| v.status.as_str()).collect();
    // A route that cannot become Ready without a change (NoEligibleBackend) carries Stalled=True,
    // which kstatus reads as Failed (docs/gitops.md).
    assert_eq!(
        statuses,
        ["Current", "InProgress", "Failed"],
        "{verdicts:?}"
    );
    for lua in lua_interpreters() {
        let health: Vec<String> = objects
            .iter()
            .map(|o| argocd_health(lua, o).status)
            .collect();
        assert_eq!(health, ["Healthy", "Progressing", "Degraded"], "{lua}");
    }

    // SIGTERM: the operator stops (releasing its Lease) well within terminationGracePeriodSeconds.
    let status = op.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "llmroute run did not exit cleanly on SIGTERM: {status:?}\n{}",
        op.log_text()
    );
    if args.contains(&"--log-format=json".to_string()) {
        for line in op.log_text().lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                serde_json::from_str::<Value>(line).is_ok(),
                "--log-format=json printed a line that is not JSON: {line}"
            );
        }
    }
}

/// The overlay shown in the README (region and image) builds on `deploy/` and changes what it says.
#[test]
fn the_readme_overlay_sets_region_and_image() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let overlay = yaml_blocks(&readme)
        .into_iter()
        .find(|b| b.contains("kind: Kustomization"))
        .expect("the README's overlay");
    // kustomize refuses absolute bases and overlays inside their base: build it from target/.
    let dir = tempfile::Builder::new()
        .prefix("overlay-")
        .tempdir_in(repo_root().join("target"))
        .unwrap();
    let text = overlay.replace("../llmroute/deploy", "../../deploy");
    assert_ne!(text, overlay, "the overlay's base path");
    std::fs::write(dir.path().join("kustomization.yaml"), text).unwrap();
    let out = Command::new(cluster().kubectl_path())
        .arg("kustomize")
        .arg(dir.path())
        .output()
        .expect("run kubectl kustomize");
    let docs = yaml_docs(&stdout_of(out, "kubectl kustomize (README overlay)"));
    let d = find(&docs, "Deployment");
    let args = args_of(d);
    assert!(
        args.contains(&"--default-region=cn".to_string()),
        "{args:?}"
    );
    assert!(
        !args.contains(&"--default-region=us".to_string()),
        "{args:?}"
    );
    assert_eq!(
        container(d)["image"],
        "registry.example.com/platform/llmroute:0.1.0"
    );
    // The gateways' shutdown-manager sidecar follows the operator's image.
    assert!(
        args.contains(&format!(
            "--shutdown-manager-image={}",
            container(d)["image"].as_str().unwrap()
        )),
        "{args:?}"
    );
    assert_eq!(kinds(&docs), kinds(&kustomize_build()));
}

// ---------------------------------------------------------------------------------------------
// Helm

#[test]
fn helm_lint_passes_for_the_default_and_the_usual_values() {
    for args in [
        vec![],
        vec!["--set", "metrics.serviceMonitor.enabled=true"],
        vec![
            "--set",
            "metrics.gatewayPodMonitor.enabled=true",
            "--set",
            "metrics.prometheusRule.enabled=true",
        ],
        vec![
            "--set",
            "watchNamespaces={team-a,team-b}",
            "--set",
            "region=cn",
        ],
        vec!["--set", "crds.install=false", "--set", "replicaCount=1"],
    ] {
        let out = Command::new(helm())
            .args(["lint", "--strict"])
            .arg(repo_root().join(CHART))
            .args(&args)
            .output()
            .expect("run helm lint");
        stdout_of(out, &format!("helm lint --strict {}", args.join(" ")));
    }
}

#[test]
fn helm_renders_the_same_operator_as_the_kustomize_base() {
    let base = kustomize_build();
    let chart = yaml_docs(&helm_template("llmroute", "llmroute-system", &[]));

    // The same kinds (Helm leaves the namespace to `--create-namespace`).
    let base_kinds: BTreeSet<String> = kinds(&base)
        .into_iter()
        .filter(|k| k != "Namespace")
        .collect();
    let chart_kinds: BTreeSet<String> = kinds(&chart).into_iter().collect();
    assert_eq!(base_kinds, chart_kinds);

    // The same names, for a release called llmroute.
    let names = |docs: &[Value]| -> BTreeSet<(String, String)> {
        docs.iter()
            .filter(|d| d["kind"] != "Namespace")
            .map(|d| {
                (
                    d["kind"].as_str().unwrap().to_string(),
                    d["metadata"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(names(&base), names(&chart));

    // The RBAC: the chart's rules are deploy/rbac.yaml's (tests/operator_rbac.rs proves those).
    assert_eq!(
        rules(&base),
        rules(&chart),
        "Helm RBAC drifted from deploy/rbac.yaml"
    );
    let rbac_file =
        yaml_docs(&std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).unwrap());
    assert_eq!(rules(&rbac_file), rules(&chart));

    // The Deployment: the same pod, container and arguments (the chart adds two defaults explicitly).
    let (bd, cd) = (find(&base, "Deployment"), find(&chart, "Deployment"));
    assert_eq!(bd["spec"]["replicas"], cd["spec"]["replicas"]);
    assert_eq!(bd["spec"]["strategy"], cd["spec"]["strategy"]);
    for field in ["securityContext", "terminationGracePeriodSeconds"] {
        assert_eq!(
            bd["spec"]["template"]["spec"][field], cd["spec"]["template"]["spec"][field],
            "pod {field}"
        );
    }
    for field in [
        "image",
        "imagePullPolicy",
        "securityContext",
        "resources",
        "livenessProbe",
        "readinessProbe",
        "ports",
        "env",
    ] {
        assert_eq!(
            container(bd)[field],
            container(cd)[field],
            "container {field}"
        );
    }
    // Both label the operator's Pods as the gateways' NetworkPolicy admits them to the usage port.
    for d in [bd, cd] {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        for (k, v) in llmroute::gateway::objects::operator_pod_labels() {
            assert_eq!(labels[&k], v.as_str(), "operator Pod label {k}");
        }
    }
    // Both run the gateways' shutdown-manager sidecar with the operator's own image.
    for d in [bd, cd] {
        let image = container(d)["image"].as_str().unwrap().to_string();
        assert!(
            args_of(d).contains(&format!("--shutdown-manager-image={image}")),
            "{:?}",
            args_of(d)
        );
    }
    let chart_args = args_of(cd);
    for arg in args_of(bd) {
        assert!(
            chart_args.contains(&arg),
            "the chart lacks {arg}: {chart_args:?}"
        );
    }
    let extra: Vec<&String> = chart_args
        .iter()
        .filter(|a| !args_of(bd).contains(a))
        .collect();
    assert_eq!(
        extra,
        [
            "--leader-election-name=llmroute-operator",
            "--gateway-replicas=2",
            "--xds-service=llmroute-xds",
            "--xds-ca-secret=llmroute-system/llmroute-xds-ca",
        ],
        "the chart's extra arguments are the operator's defaults"
    );

    // The Service and the CRD.
    assert_eq!(
        find(&base, "Service")["spec"]["ports"],
        find(&chart, "Service")["spec"]["ports"]
    );
    let crd = find(&chart, "CustomResourceDefinition");
    let source = yaml_docs(&std::fs::read_to_string(repo_root().join(CRD)).unwrap());
    assert_eq!(normalized(&crd["spec"]), normalized(&source[0]["spec"]));
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "uninstalling the release keeps the CRD and so every LLMRoute"
    );
}

#[test]
fn helm_values_switch_what_they_should() {
    // The ServiceMonitor only when asked for.
    let off = yaml_docs(&helm_template("llmroute", "llmroute-system", &[]));
    assert!(!kinds(&off).contains(&"ServiceMonitor".to_string()));
    // The operator's NetworkPolicy by default, selecting the operator's Pods and opening its
    // xDS port to gateway Pods only; off when asked.
    let policy = find(&off, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        find(&off, "Deployment")["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], "grpc-xds");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "llmroute-gateway"
    );
    let no_policy = yaml_docs(&helm_template(
        "llmroute",
        "llmroute-system",
        &["--set", "networkPolicy.enabled=false"],
    ));
    assert!(!kinds(&no_policy).contains(&"NetworkPolicy".to_string()));
    let on = yaml_docs(&helm_template(
        "llmroute",
        "llmroute-system",
        &["--set", "metrics.serviceMonitor.enabled=true"],
    ));
    let sm = find(&on, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        find(&on, "Service")["metadata"]["labels"]
            .as_object()
            .map(|labels| {
                let sel = &find(&on, "Service")["spec"]["selector"];
                let mut m = serde_json::Map::new();
                for (k, v) in labels {
                    if sel.get(k).is_some() {
                        m.insert(k.clone(), v.clone());
                    }
                }
                Value::Object(m)
            })
            .unwrap(),
        "the ServiceMonitor selects the metrics Service"
    );

    // The gateways' PodMonitor and the alerts only when asked for.
    for kind in ["PodMonitor", "PrometheusRule"] {
        assert!(
            !kinds(&off).contains(&kind.to_string()),
            "{kind} by default"
        );
    }
    let on = yaml_docs(&helm_template(
        "llmroute",
        "llmroute-system",
        &[
            "--set",
            "metrics.gatewayPodMonitor.enabled=true",
            "--set",
            "metrics.prometheusRule.enabled=true",
        ],
    ));
    let rule = find(&on, "PrometheusRule");
    assert_eq!(
        rule["spec"],
        support::alerts::rules(),
        "the rule file's groups"
    );
    let pm = find(&on, "PodMonitor");
    assert_eq!(pm["spec"]["namespaceSelector"], json!({ "any": true }));
    let gateway = llmroute::gateway::objects::deployment(
        "team-a",
        &Default::default(),
        &Default::default(),
        "0",
        &[],
    );
    let pod = gateway.spec.unwrap().template;
    let pod_labels = pod.metadata.unwrap().labels.unwrap();
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            pod_labels.get(k).map(String::as_str),
            v.as_str(),
            "the PodMonitor selects gateway Pods ({k})"
        );
    }
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    let port = pod.spec.unwrap().containers[0]
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .find(|p| p.name.as_deref() == endpoint["port"].as_str())
        .expect("the PodMonitor's port is a gateway container port");
    assert_eq!(port.container_port, 19003);
    assert_eq!(endpoint["path"], "/stats/prometheus");
    let scoped = yaml_docs(&helm_template(
        "llmroute",
        "llmroute-system",
        &[
            "--set",
            "metrics.gatewayPodMonitor.enabled=true",
            "--set",
            "watchNamespaces={team-a,team-b}",
        ],
    ));
    assert_eq!(
        find(&scoped, "PodMonitor")["spec"]["namespaceSelector"],
        json!({ "matchNames": ["team-a", "team-b"] })
    );

    // Namespace scope: RoleBindings in the watched namespaces, no ClusterRoleBinding, --namespace.
    let scoped = yaml_docs(&helm_template(
        "llmroute",
        "llmroute-system",
        &[
            "--set",
            "watchNamespaces={team-a,team-b}",
            "--set",
            "region=cn",
        ],
    ));
    assert!(!kinds(&scoped).contains(&"ClusterRoleBinding".to_string()));
    let bound: BTreeSet<&str> = scoped
        .iter()
        .filter(|d| d["kind"] == "RoleBinding" && d["roleRef"]["kind"] == "ClusterRole")
        .map(|d| d["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(bound, BTreeSet::from(["team-a", "team-b"]));
    let args = args_of(find(&scoped, "Deployment"));
    assert!(
        args.contains(&"--namespace=team-a,team-b".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--default-region=cn".to_string()),
        "{args:?}"
    );
    assert_eq!(rules(&scoped), rules(&off));

    // Image, replicas, logs, port, CRDs.
    let custom = yaml_docs(&helm_template(
        "llmroute",
        "llmroute-system",
        &[
            "--set",
            "image.repository=registry.example.com/llmroute",
            "--set",
            "image.tag=0.1.1",
            "--set",
            "replicaCount=3",
            "--set",
            "logFormat=text",
            "--set",
            "logLevel=llmroute=debug",
            "--set",
            "metrics.port=9191",
            "--set",
            "crds.install=false",
        ],
    ));
    let d = find(&custom, "Deployment");
    assert_eq!(container(d)["image"], "registry.example.com/llmroute:0.1.1");
    assert_eq!(d["spec"]["replicas"], 3);
    let args = args_of(d);
    for a in [
        // The gateways' shutdown-manager sidecar runs the operator's image.
        "--shutdown-manager-image=registry.example.com/llmroute:0.1.1",
        "--log-format=text",
        "--log-level=llmroute=debug",
        "--http-addr=0.0.0.0:9191",
    ] {
        assert!(args.contains(&a.to_string()), "{a} missing from {args:?}");
    }
    assert_eq!(container(d)["ports"][0]["containerPort"], 9191);
    assert!(!kinds(&custom).contains(&"CustomResourceDefinition".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_output_applies_with_server_side_dry_run() {
    let c = cluster();
    c.install_crds();
    let ns = TestNamespace::new("helm").await;
    let yaml = helm_template("llmroute", &ns.name, &[]);
    let out = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&yaml),
    );
    let stdout = stdout_of(out, "kubectl apply --dry-run=server (helm template)");
    assert_eq!(
        stdout.lines().count(),
        yaml_docs(&yaml).len(),
        "one line per object:\n{stdout}"
    );
    assert!(
        stdout.lines().all(|l| l.ends_with("(server dry run)")),
        "{stdout}"
    );
}

/// A namespace-scoped install (`watchNamespaces`): with only the chart's RoleBinding in the watched
/// namespace and its Lease Role, the operator (the chart's arguments, its ServiceAccount's identity)
/// makes a route there Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_scoped_helm_install_runs_the_operator_with_the_charts_rbac() {
    let c = cluster();
    c.install_crds();
    let release_ns = TestNamespace::new("helmrel").await;
    let watched = TestNamespace::new("helmwatch").await;
    let release = unique("llmroute");
    let yaml = helm_template(
        &release,
        &release_ns.name,
        &[
            "--set",
            &format!("watchNamespaces={{{}}}", watched.name),
            "--set",
            "region=cn",
            "--set",
            "crds.install=false",
        ],
    );
    let docs = yaml_docs(&yaml);
    // Everything but the Deployment and its PodDisruptionBudget (no kubelet; the operator runs as a
    // process below) is applied for real.
    let objects: Vec<Value> = docs
        .iter()
        .filter(|d| d["kind"] != "Deployment" && d["kind"] != "PodDisruptionBudget")
        .cloned()
        .collect();
    let list = json!({ "apiVersion": "v1", "kind": "List", "items": objects });
    let out = c.kubectl_as(
        &c.kubeconfig(),
        &["apply", "-f", "-"],
        Some(&list.to_string()),
    );
    stdout_of(out, "kubectl apply (helm template, namespace scope)");
    let cluster_role = format!("{release}-operator");
    let cleanup = scopeguard(c, &cluster_role);

    let dir = tempfile::tempdir().unwrap();
    let sa = find(&docs, "ServiceAccount")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let kubeconfig = service_account_kubeconfig(c, &release_ns.name, &sa, dir.path());
    let mut args = args_of(find(&docs, "Deployment"));
    let gateway = support::gateway::HostGateway::new();
    // The replica runs here, not in Pods.
    args.retain(|a| !a.starts_with("--gateway-replicas"));
    args.extend(gateway.operator_args());
    watched.apply(&secret_yaml("zhipu-key", "helm-test-key"));
    watched.apply(&route_yaml("chat", "zhipu-key", "glm-4-plus"));
    let op = Operator::start(
        &args,
        &kubeconfig,
        &release_ns.name,
        dir.path().join("operator.log"),
    );
    let client = c.client().await;
    let Ok(_envoy) = tokio::time::timeout(
        Duration::from_secs(50),
        gateway.start(&client, &watched.name, "gw-0"),
    )
    .await
    else {
        panic!("no gateway objects in {}:\n{}", watched.name, op.log_text());
    };
    let ready = tokio::time::timeout(
        Duration::from_secs(40),
        route_when(c, &watched.name, "chat", "chat Ready=True", |r| {
            condition_is(r, "Ready", "True")
        }),
    )
    .await;
    assert!(
        ready.is_ok(),
        "the route did not become Ready with the chart's namespace-scoped RBAC:\n{}",
        op.log_text()
    );
    // The operator may not read outside its namespaces: a cluster-wide list is forbidden.
    let forbidden = c.kubectl_as(&kubeconfig, &["get", "secrets", "--all-namespaces"], None);
    assert!(!forbidden.status.success());
    drop(op);
    drop(cleanup);
}

/// Deletes a cluster-scoped ClusterRole (and its namesake binding) a test created, when dropped.
struct Cleanup {
    c: &'static TestCluster,
    name: String,
}

fn scopeguard(c: &'static TestCluster, name: &str) -> Cleanup {
    Cleanup {
        c,
        name: name.to_string(),
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.c.kubectl(&[
            "delete",
            "clusterrole",
            &self.name,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

// ---------------------------------------------------------------------------------------------
// Examples and guides

/// Every file in examples/ (and examples/providers/) and every YAML block of docs/guides/ applies with
/// `kubectl apply --dry-run=server` (schema, CEL rules, Secrets, Deployments), in the namespaces it
/// names (created when missing, deleted afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_and_guide_manifest_applies_with_server_side_dry_run() {
    let c = cluster();
    c.install_crds();
    let mut inputs: Vec<(String, String)> = Vec::new();
    for dir in ["examples", "examples/providers"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for f in files {
            inputs.push((
                f.strip_prefix(repo_root()).unwrap().display().to_string(),
                std::fs::read_to_string(&f).unwrap(),
            ));
        }
    }
    let providers = inputs
        .iter()
        .filter(|(name, _)| name.starts_with("examples/providers/"))
        .count();
    assert_eq!(
        providers,
        llmroute::catalog::providers().len(),
        "one example per catalog provider"
    );
    let mut guides: Vec<PathBuf> = std::fs::read_dir(repo_root().join("docs/guides"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    guides.sort();
    for g in guides {
        let text = std::fs::read_to_string(&g).unwrap();
        for (i, block) in yaml_blocks(&text).into_iter().enumerate() {
            if block.contains("apiVersion:") {
                inputs.push((
                    format!(
                        "{} (YAML block {})",
                        g.strip_prefix(repo_root()).unwrap().display(),
                        i + 1
                    ),
                    block,
                ));
            }
        }
    }

    let mut namespaces: BTreeSet<String> = BTreeSet::new();
    for (_, text) in &inputs {
        for d in yaml_docs(text) {
            if let Some(ns) = d["metadata"]["namespace"].as_str() {
                namespaces.insert(ns.to_string());
            }
        }
    }
    let mut created = Vec::new();
    for ns in &namespaces {
        // A namespace left terminating by an earlier run: wait for it to go (bounded).
        for _ in 0..120 {
            let phase = c.kubectl(&["get", "namespace", ns, "-o", "jsonpath={.status.phase}"]);
            if String::from_utf8_lossy(&phase.stdout) != "Terminating" {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let exists = c.kubectl(&["get", "namespace", ns]).status.success();
        if !exists && c.kubectl(&["create", "namespace", ns]).status.success() {
            created.push(ns.clone());
        }
    }
    let mut failures = Vec::new();
    let mut per_provider = BTreeMap::new();
    for (name, text) in &inputs {
        let out = c.kubectl_as(
            &c.kubeconfig(),
            &["apply", "--dry-run=server", "-f", "-"],
            Some(text),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let docs = yaml_docs(text);
        if !out.status.success() || stdout.lines().count() != docs.len() {
            failures.push(format!(
                "{name}: {}{}",
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if name.starts_with("examples/providers/") {
            per_provider.insert(name.clone(), kinds(&docs));
        }
    }
    for ns in created {
        let _ = c.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for (name, kinds) in per_provider {
        assert_eq!(
            kinds,
            ["Secret", "LLMRoute"],
            "{name}: a Secret and its route"
        );
    }
}

/// The fenced ```yaml blocks of a Markdown text.
fn yaml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start().starts_with("```yaml") => current = Some(String::new()),
            Some(_) if line.trim_start().starts_with("```") => blocks.push(current.take().unwrap()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// Every operator metric the shipped alerts use is one the operator exports.
#[test]
fn the_alerts_use_metrics_the_operator_exports() {
    let m = llmroute::metrics::Metrics::new();
    m.set_backend_state("ns", "chat", "openai", "RegionBlocked");
    m.set_route_conditions("ns", "chat", [("Ready", "True")]);
    m.reconciles
        .get_or_create(&llmroute::metrics::ResultLabels { result: "error" })
        .inc();
    m.failovers
        .get_or_create(&llmroute::metrics::FailoverLabels {
            namespace: "ns".into(),
            route: "chat".into(),
            from: "openai".into(),
            to: "zhipu".into(),
            reason: "RegionBlocked".into(),
        })
        .inc();
    m.xds_rejections
        .get_or_create(&llmroute::metrics::XdsPushLabels {
            namespace: "ns".into(),
            kind: "Listener".into(),
        })
        .inc();
    m.xds_propagation.observe(0.01);
    m.set_usage_unknown("ns", true);
    support::alerts::assert_exported("llmroute_", &m.encode(), 7, "the operator");
    // The dashboard's route and backend panels read the operator's series (its token panels the
    // gateways': tests/dataplane.rs).
    let mut operator_series = support::alerts::dashboard_metrics("llmroute_");
    operator_series.retain(|n| !n.starts_with("llmroute_gateway_"));
    support::alerts::assert_all_exported(&operator_series, &m.encode(), 3, "the dashboard");
}
