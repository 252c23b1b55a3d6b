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

/// A place in the API server's audit log.
pub struct AuditMark(u64);

/// One write the API server's audit log recorded.
#[derive(Clone, Debug)]
pub struct AuditedWrite {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The HTTP status the API server answered.
    pub code: u64,
}

impl std::fmt::Display for AuditedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        let sub = if self.subresource.is_empty() {
            String::new()
        } else {
            format!("/{}", self.subresource)
        };
        write!(
            f,
            "{} {}{group}{sub} {}/{} -> {}",
            self.verb, self.resource, self.namespace, self.name, self.code
        )
    }
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

    /// The current end of the API server's audit log (`scripts/testcluster` starts kube-apiserver
    /// with one that records every write): where [`TestCluster::writes_since`] starts reading.
    pub fn audit_mark(&self) -> AuditMark {
        let path = self.dir.join("audit.log");
        let len = std::fs::metadata(&path)
            .map(|m| m.len())
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; a cluster started by an older scripts/testcluster has no audit log: \
                 run `scripts/testcluster down {}` and start it again",
                    path.display(),
                    self.dir.display()
                )
            });
        AuditMark(len)
    }

    /// The writes (create, update, patch, delete) `user` made since `mark`, as the API server's
    /// audit log recorded them: a count independent of the client's own figures.
    pub fn writes_since(&self, mark: &AuditMark, user: &str) -> Vec<AuditedWrite> {
        let text = std::fs::read(self.dir.join("audit.log")).unwrap_or_default();
        // A rotated log starts again from the beginning.
        let from = if (mark.0 as usize) <= text.len() {
            mark.0 as usize
        } else {
            0
        };
        String::from_utf8_lossy(&text[from..])
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|e| e["stage"] == "ResponseComplete" && e["user"]["username"] == user)
            .map(|e| {
                let field = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
                let object = &e["objectRef"];
                AuditedWrite {
                    verb: field(&e["verb"]),
                    group: field(&object["apiGroup"]),
                    resource: field(&object["resource"]),
                    subresource: field(&object["subresource"]),
                    namespace: field(&object["namespace"]),
                    name: field(&object["name"]),
                    code: e["responseStatus"]["code"].as_u64().unwrap_or(0),
                }
            })
            .collect()
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

    /// An admin client that returns the API server's answer as it is: kube's client otherwise
    /// retries a 429 (an eviction the PodDisruptionBudget refuses, for one) until it passes.
    pub async fn client_without_retries(&self) -> Client {
        let mut config = config_for(&self.kubeconfig()).await;
        config.default_retry = false;
        Client::try_from(config).expect("kube client")
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
    Client::try_from(config_for(kubeconfig).await).expect("kube client")
}

async fn config_for(kubeconfig: &Path) -> Config {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config")
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
        // A loaded API server sometimes drops a connection before it answers (seen in CI as
        // hyper's IncompleteMessage); the name is unique, so trying again is safe, and an
        // AlreadyExists then means the first try went through.
        let mut tries = 0;
        loop {
            tries += 1;
            match api.create(&PostParams::default(), &ns).await {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if tries > 1 && e.code == 409 => break,
                Err(e @ (kube::Error::HyperError(_) | kube::Error::Service(_))) if tries < 3 => {
                    eprintln!("creating namespace {name}: {e}; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => panic!("create test namespace {name}: {e:?}"),
            }
        }
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
