//! The real test control plane (kube-apiserver + etcd + kube-controller-manager, built from Go
//! modules by `scripts/testcluster`), shared by every integration test of a run.
//!
//! - `LLMROUTE_TEST_CLUSTER=DIR` (set by `scripts/test` / `.ci/run`): use the control plane already
//!   running in DIR.
//! - otherwise: start (or reuse) one in `target/testcluster`, with its real node (`--node`), under a
//!   file lock so that parallel test binaries share it. It is left running for the next run;
//!   `scripts/testcluster down target/testcluster` stops it.
//!
//! If the control plane cannot be had, tests fail loudly: they never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use super::envoy::repo_root;

/// A control plane's directory: `kubeconfig`, `bin/kubectl`, `bin/testcluster`.
#[derive(Clone, Debug)]
pub struct TestCluster {
    pub dir: PathBuf,
}

/// The shared control plane, started on first use.
pub fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        if let Some(dir) = std::env::var_os("LLMROUTE_TEST_CLUSTER") {
            let dir = PathBuf::from(dir);
            assert!(
                dir.join("kubeconfig").exists(),
                "LLMROUTE_TEST_CLUSTER={} has no kubeconfig: is the control plane up?",
                dir.display()
            );
            return TestCluster { dir };
        }
        let dir = repo_root().join("target/testcluster");
        std::fs::create_dir_all(&dir).expect("create target/testcluster");
        // One starter at a time across test binaries; `up` is a no-op when already running.
        let lock = std::fs::File::create(repo_root().join("target/testcluster.lock")).expect("lock file");
        lock.lock().expect("lock target/testcluster.lock");
        let out = Command::new(repo_root().join("scripts/testcluster"))
            .arg("up")
            .arg(&dir)
            .arg("--node")
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/testcluster up");
        lock.unlock().expect("unlock");
        assert!(
            out.status.success(),
            "the test control plane could not start (scripts/testcluster up {}); see its log in {}/logs",
            dir.display(),
            dir.display()
        );
        TestCluster { dir }
    })
}

impl TestCluster {
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn kubectl_path(&self) -> PathBuf {
        self.dir.join("bin/kubectl")
    }

    /// Runs kubectl (admin) with `args`.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig(), args, None)
    }

    /// Runs kubectl with another kubeconfig, optionally feeding `stdin`.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut child = Command::new(self.kubectl_path())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        child.wait_with_output().expect("kubectl output")
    }

    /// Runs kubectl and asserts success; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` with `yaml`.
    pub fn apply_yaml(&self, yaml: &str) -> Output {
        self.kubectl_as(&self.kubeconfig(), &["apply", "-f", "-"], Some(yaml))
    }

    /// Mints a kubeconfig for a non-admin identity (client certificate signed by the cluster CA).
    pub fn mint_kubeconfig(&self, user: &str, groups: &[&str], out: &Path) {
        let mut cmd = Command::new(repo_root().join("scripts/testcluster"));
        cmd.arg("kubeconfig").arg(&self.dir).arg("--user").arg(user);
        for g in groups {
            cmd.arg("--group").arg(g);
        }
        let status = cmd
            .arg("--out")
            .arg(out)
            .status()
            .expect("run scripts/testcluster kubeconfig");
        assert!(status.success(), "minting a kubeconfig for {user} failed");
    }

    /// A kube client with admin rights.
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig()).await
    }

    /// Installs the CRDs from `crds/` and waits until they are established.
    pub fn install_crds(&self) {
        let crds = repo_root().join("crds");
        self.kubectl_ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            crds.to_str().unwrap(),
        ]);
        self.kubectl_ok(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/llmroutes.llmroute.io",
        ]);
    }
}

/// A kube client for a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("kube client")
}

/// A namespace of its own for one test, deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    cluster: &'static TestCluster,
}

impl TestNamespace {
    /// Creates `t-<prefix>-<unique>`.
    pub async fn new(prefix: &str) -> TestNamespace {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let cluster = cluster();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let unique = format!(
            "{:x}{:x}{}",
            nanos % 0xffff_ffff,
            std::process::id() % 0xffff,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let name = format!("t-{prefix}-{unique}");
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<Namespace> = Api::all(cluster.client().await);
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        TestNamespace { name, cluster }
    }

    pub fn cluster(&self) -> &'static TestCluster {
        self.cluster
    }

    /// `kubectl apply -n <namespace> -f -` with `yaml`, asserting success.
    pub fn apply(&self, yaml: &str) {
        let out = self.cluster.kubectl_as(
            &self.cluster.kubeconfig(),
            &["apply", "-n", &self.name, "-f", "-"],
            Some(yaml),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deletes the namespace now (also done on drop).
    pub async fn delete(&self) {
        let api: Api<Namespace> = Api::all(self.cluster.client().await);
        let _ = api.delete(&self.name, &DeleteParams::default()).await;
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new(self.cluster.kubectl_path())
            .arg("--kubeconfig")
            .arg(self.cluster.kubeconfig())
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Waits until the route `name` has `Ready=True`.
pub async fn wait_route_ready(routes: &Api<llmroute::api::LLMRoute>, name: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("route {name} Ready"),
        || {
            let routes = routes.clone();
            let name = name.to_string();
            async move {
                let r = routes.get(&name).await.ok()?;
                r.status?
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
                    .then_some(())
            }
        },
    )
    .await;
}

/// Polls `check` every 100 ms until it returns Some, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
