//! `llmroute run` as a process, as it runs in a cluster: leader election between two replicas
//! (only the Lease holder reconciles and serves xDS; the standby takes over when the leader stops,
//! and the gateway replica reconnects to it), and no provider key in the operator's log output.

mod support;

use std::process::{Child, Command};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use llmroute::api::LLMRoute;
use support::cluster::{TestNamespace, eventually, wait_route_ready};
use support::gateway::HostGateway;

const ZHIPU_KEY: &str = "zhipu-process-key-9c2e51";

struct Operator {
    child: Child,
    log: std::path::PathBuf,
}

impl Operator {
    /// A replica; both replicas of a test share `gateway`'s xDS address (as they share a Service):
    /// only the leader listens on it.
    fn start(ns: &TestNamespace, identity: &str, gateway: &HostGateway) -> Operator {
        let log = gateway.dir.path().join(format!("{identity}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_llmroute"))
            .args(["run", "--namespace", &ns.name, "--default-region", "cn"])
            .args(gateway.operator_args())
            .arg(format!("--xds-ca-secret={}/llmroute-xds-ca", ns.name))
            .args([
                "--leader-election-namespace",
                &ns.name,
                "--log-level",
                "llmroute=debug,info",
                "--log-format",
                "json",
            ])
            .env("KUBECONFIG", ns.cluster().kubeconfig())
            .env("POD_NAME", identity)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("start llmroute run");
        Operator { child, log }
    }

    /// SIGTERM, as the kubelet stops a pod.
    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("llmroute run did not stop within 10 s of SIGTERM");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("llmroute-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_reconciles_a_standby_takes_over_and_logs_hold_no_keys() {
    let ns = TestNamespace::new("lead").await;
    let c = ns.cluster();
    c.install_crds();
    let client = c.client().await;
    let gateway = HostGateway::new();
    ns.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: zhipu-key }}\nstringData: {{ api-key: {ZHIPU_KEY} }}\n"
    ));
    ns.apply(
        r#"
apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: { name: chat }
spec:
  # Zhipu's real host cannot be reached from here: with health checks it would be NoHealthyBackend.
  policy: { healthCheck: { enabled: false } }
  backends:
    - name: zhipu
      provider: zhipu
      credentialsSecretRef: { name: zhipu-key, key: api-key }
      models: { gpt-4o: glm-4-plus }
    - name: broken
      provider: deepseek
      credentialsSecretRef: { name: missing, key: api-key }
      models: { gpt-4o: deepseek-chat }
"#,
    );

    let mut a = Operator::start(&ns, "replica-a", &gateway);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    eventually(Duration::from_secs(30), "replica-a to lead", || {
        let leases = leases.clone();
        async move { (holder(&leases).await.as_deref() == Some("replica-a")).then_some(()) }
    })
    .await;
    let _envoy = gateway.start(&client, &ns.name, "gw-0").await;
    let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);
    wait_route_ready(&routes, "chat").await;

    let mut b = Operator::start(&ns, "replica-b", &gateway);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        holder(&leases).await.as_deref(),
        Some("replica-a"),
        "the standby must not take a held Lease"
    );
    assert!(
        b.log_text().contains("waiting for leadership"),
        "{}",
        b.log_text()
    );
    assert!(
        !b.log_text().contains("published gateway configuration"),
        "the standby wrote"
    );

    // The leader stops (SIGTERM): it releases the Lease and the standby takes over and reconciles.
    a.terminate();
    eventually(Duration::from_secs(20), "replica-b to lead", || {
        let leases = leases.clone();
        async move { (holder(&leases).await.as_deref() == Some("replica-b")).then_some(()) }
    })
    .await;
    ns.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: zhipu-key }}\nstringData: {{ api-key: {ZHIPU_KEY}-rotated }}\n"
    ));
    // The gateway replica reconnects to the new leader, which serves it the rotated key.
    let before = gateway
        .loaded_secret_version("provider_zhipu-key_api-key")
        .expect("the key loaded");
    eventually(
        Duration::from_secs(30),
        "the new leader to serve the rotated key to the gateway",
        || {
            let now = gateway.loaded_secret_version("provider_zhipu-key_api-key");
            let before = before.clone();
            async move { now.filter(|v| *v != before).map(|_| ()) }
        },
    )
    .await;
    assert!(
        b.log_text().contains("gateway connected"),
        "{}",
        b.log_text()
    );
    b.terminate();

    // Neither replica ever logged a key.
    let logs = a.log_text() + &b.log_text();
    assert!(
        logs.contains("acquired leadership") && logs.lines().count() > 5,
        "{logs}"
    );
    assert!(
        !logs.contains(ZHIPU_KEY),
        "a provider key appeared in the operator's log"
    );
    assert!(
        !logs.contains("sk-llmroute-"),
        "a route key appeared in the operator's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_serves_exactly_the_namespaces_given() {
    let (a, b, other) = (
        TestNamespace::new("nsa").await,
        TestNamespace::new("nsb").await,
        TestNamespace::new("nsc").await,
    );
    let c = a.cluster();
    c.install_crds();
    let route = "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\nmetadata: { name: chat }\nspec:\n  backends:\n    - { name: local, provider: openai-compatible, endpoint: \"http://vllm.ml.svc:8000/v1\", models: { \"*\": \"*\" } }\n";
    for ns in [&a, &b, &other] {
        ns.apply(route);
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("op.log");
    // No gateway replica: a reconciled route has a status (Programmed=False, GatewayPending).
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args([
            "run",
            "--leader-elect=false",
            "--xds-listen=127.0.0.1:0",
            "--gateway-replicas=0",
            &format!("--xds-ca-secret={}/llmroute-xds-ca", a.name),
            "--namespace",
            &format!("{},{}", a.name, b.name),
        ])
        .env("KUBECONFIG", c.kubeconfig())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .expect("start llmroute run");
    let client = c.client().await;
    for ns in [&a, &b] {
        let routes: Api<LLMRoute> = Api::namespaced(client.clone(), &ns.name);
        eventually(Duration::from_secs(30), "a status", || {
            let routes = routes.clone();
            async move {
                let status = routes.get("chat").await.ok()?.status?;
                status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Programmed" && c.reason == "GatewayPending")
                    .then_some(())
            }
        })
        .await;
    }
    let others: Api<LLMRoute> = Api::namespaced(client.clone(), &other.name);
    assert!(
        others.get("chat").await.unwrap().status.is_none(),
        "a namespace not given was reconciled"
    );
    let _ = child.kill();
    let _ = child.wait();
}
