//! The real node of the test cluster (`scripts/testcluster up DIR --node`, tests/node/README.md):
//! its environment, the images the tests run (built and imported once per run), and a way to talk to
//! Pod and Service IPs, which exist only in the node's network namespace.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};

use super::cluster::{cluster, eventually};
use super::envoy::repo_root;

/// `DIR/node.env` of the test cluster.
pub struct NodeEnv {
    pub vars: BTreeMap<String, String>,
}

impl NodeEnv {
    pub fn get(&self, name: &str) -> &str {
        self.vars
            .get(name)
            .unwrap_or_else(|| panic!("node.env has no {name}"))
    }
}

/// The node of the shared test cluster. The cluster must have been started with `--node`
/// (`scripts/test` does): these tests are about Pods, and fail loudly without one.
pub fn node() -> &'static NodeEnv {
    static NODE: OnceLock<NodeEnv> = OnceLock::new();
    NODE.get_or_init(|| {
        let path = cluster().dir.join("node.env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "{} is missing: the test cluster has no node; start it with \
                 `scripts/testcluster up {} --node` (scripts/test does)",
                path.display(),
                cluster().dir.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect();
        NodeEnv { vars }
    })
}

/// Builds (cached) and imports into the node the images of the operator, the simulators, Envoy and
/// the OpenAI SDK workload, from this build's binaries. Once per test binary.
pub fn images(operator_bin: &str) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let sim_bin = repo_root().join("target/debug/llmroute-sim");
        if !sim_bin.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "llmroute-devkit", "--bin", "llmroute-sim"])
                .current_dir(repo_root())
                .status()
                .expect("cargo build llmroute-sim");
            assert!(status.success(), "building llmroute-sim failed");
        }
        let out = Command::new(repo_root().join("scripts/test-images"))
            .arg("--import")
            .arg(&cluster().dir)
            .args(["envoy", "operator", "sim", "openai"])
            .env("LLMROUTE_BIN", operator_bin)
            .env("LLMROUTE_SIM_BIN", &sim_bin)
            .env(
                "LLMROUTE_SSE_USAGE_MODULE",
                super::envoy::sse_usage_module(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run scripts/test-images");
        assert!(
            out.status.success(),
            "scripts/test-images failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

pub const OPERATOR_IMAGE: &str = "ghcr.io/llmroute/llmroute:0.1.0";
pub const SIM_IMAGE: &str = "localhost/llmroute/sim:test";
pub const OPENAI_IMAGE: &str = "localhost/llmroute/openai-python:test";

/// Runs `work` on a thread of its own inside the node's network namespace (where Pod and Service
/// IPs are reachable), on a runtime of that thread: every socket it opens is in the node's network.
/// Use IP addresses: the host's resolver knows no cluster names.
pub async fn in_node<F, Fut, T>(work: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let netns = PathBuf::from(node().get("NODE_NETNS"));
    tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        let ns =
            std::fs::File::open(&netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
        // SAFETY: setns on a valid descriptor, for this thread only; the thread ends with `work`.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into the node's network: {}",
            std::io::Error::last_os_error()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(work())
    })
    .await
    .expect("the node-side task")
}

/// The ClusterIP of Service `ns/name`.
pub async fn service_ip(client: &kube::Client, ns: &str, name: &str) -> String {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    api.get(name)
        .await
        .expect("the Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP")
}

/// Ready Pods matching `selector` in `ns`, with their IPs, sorted by name; waits until there are
/// `count`.
pub async fn ready_pods(
    client: &kube::Client,
    ns: &str,
    selector: &str,
    count: usize,
) -> Vec<(String, String)> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = selector.to_string();
    eventually(
        Duration::from_secs(120),
        &format!("{count} ready Pods {selector} in {ns}"),
        || {
            let (api, selector) = (api.clone(), selector.clone());
            async move {
                let pods = api
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .ok()?;
                let mut ready: Vec<(String, String)> = pods
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter(|p| {
                        p.status.as_ref().is_some_and(|s| {
                            s.conditions
                                .iter()
                                .flatten()
                                .any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                    })
                    .filter_map(|p| {
                        Some((p.metadata.name.clone()?, p.status.as_ref()?.pod_ip.clone()?))
                    })
                    .collect();
                ready.sort();
                (ready.len() == count).then_some(ready)
            }
        },
    )
    .await
}

/// The logs of a Pod's container (through the apiserver, as `kubectl logs`).
pub async fn logs(client: &kube::Client, ns: &str, pod: &str, container: &str) -> String {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.logs(
        pod,
        &kube::api::LogParams {
            container: Some(container.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_default()
}
