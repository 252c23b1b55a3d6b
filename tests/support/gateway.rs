//! A gateway replica run by the test instead of a kubelet, for the suites whose operator runs on the
//! host (no Pod network to reach it): the real Envoy 1.40 started from what a gateway Pod mounts —
//! the bootstrap of the namespace's ConfigMap `llmroute-gateway` and the xDS client certificate of
//! its Secret `llmroute-gateway-xds` — and then configured by the operator over xDS like any
//! replica. Its node id plays the Pod's name. (tests/realnode.rs runs the gateway as real Pods.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;

use super::cluster::eventually;
use super::envoy::{Envoy, free_port};

/// Ports the gateway's Envoy listens on (all on 127.0.0.1).
#[derive(Clone, Debug)]
pub struct GatewayPorts {
    pub port: u16,
    pub admin_port: u16,
    pub health_port: u16,
    /// The gateway's access log, which the replica's sidecar (or the test, see `Stack::usage_log`)
    /// follows to count usage: in a directory of its own under the build's scratch directory, as
    /// the Pod's emptyDir.
    pub usage_log: String,
    /// The usage log's directory, removed when the last copy of these ports goes.
    _usage_dir: std::sync::Arc<tempfile::TempDir>,
    /// Where the replica's sidecar serves (`/metrics`, `/shutdown/ready`).
    pub sidecar_port: u16,
    /// Where its sidecar serves the usage counts (`/usage`, mutual TLS), as its Envoy tells the
    /// operator in its node metadata.
    pub usage_port: u16,
}

impl GatewayPorts {
    pub fn free() -> GatewayPorts {
        let dir = usage_log_dir();
        GatewayPorts {
            port: free_port(),
            admin_port: free_port(),
            health_port: free_port(),
            usage_log: dir.path().join("access.log").display().to_string(),
            _usage_dir: std::sync::Arc::new(dir),
            sidecar_port: free_port(),
            usage_port: free_port(),
        }
    }

    /// The `llmroute run` flags that make the bootstrap use these ports on 127.0.0.1.
    pub fn operator_args(&self) -> Vec<String> {
        vec![
            format!("--gateway-port={}", self.port),
            "--gateway-address=127.0.0.1".into(),
            format!("--gateway-admin-port={}", self.admin_port),
            format!("--gateway-health-port={}", self.health_port),
            format!("--gateway-usage-log={}", self.usage_log),
            format!(
                "--gateway-usage-module={}",
                super::envoy::sse_usage_module()
            ),
        ]
    }
}

/// A new, empty directory for a gateway's access log (the Pod's emptyDir), under the build's
/// scratch directory; removed when dropped.
fn usage_log_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("usage-log-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a directory for the usage log")
}

/// A gateway replica on the host for an operator run as a process: where its files go, its ports,
/// and the port of the operator's xDS server.
pub struct HostGateway {
    pub dir: tempfile::TempDir,
    pub ports: GatewayPorts,
    pub xds_port: u16,
}

impl HostGateway {
    pub fn new() -> HostGateway {
        HostGateway {
            dir: tempfile::tempdir().unwrap(),
            ports: GatewayPorts::free(),
            xds_port: free_port(),
        }
    }

    /// The `llmroute run` flags for it: the xDS server on 127.0.0.1 (the gateway dials it there),
    /// the gateway's ports and certificate directory, and no gateway Pods (the test runs the replica).
    pub fn operator_args(&self) -> Vec<String> {
        let mut args = self.ports.operator_args();
        args.extend([
            format!("--xds-listen=127.0.0.1:{}", self.xds_port),
            format!("--xds-address=127.0.0.1:{}", self.xds_port),
            format!(
                "--gateway-xds-cert-dir={}",
                self.dir.path().join("xds").display()
            ),
            "--gateway-replicas=0".into(),
        ]);
        args
    }

    /// Starts the replica `node` of namespace `ns`.
    pub async fn start(&self, client: &kube::Client, ns: &str, node: &str) -> Envoy {
        start(client, ns, self.dir.path(), &self.ports, node).await
    }

    /// What the replica's Envoy has loaded: its admin config dump of `resource`.
    pub fn loaded(&self, resource: &str) -> serde_json::Value {
        super::envoy::http_get(
            self.ports.admin_port,
            &format!("/config_dump?resource={resource}"),
        )
        .and_then(|b| serde_json::from_str(&b).ok())
        .unwrap_or_default()
    }

    /// The replica's Envoy admin stats whose name contains `needle`, with their values.
    pub fn stats_matching(&self, needle: &str) -> Vec<(String, u64)> {
        super::envoy::stats_matching(self.ports.admin_port, needle)
    }

    /// The version of the SDS secret `name` the replica has loaded.
    pub fn loaded_secret_version(&self, name: &str) -> Option<String> {
        self.loaded("dynamic_active_secrets")["configs"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .and_then(|c| c["version_info"].as_str().map(str::to_string))
    }
}

impl Default for HostGateway {
    fn default() -> Self {
        HostGateway::new()
    }
}

/// Writes the gateway's mounted files into `dir` once the operator created them: `dir/config/
/// bootstrap.yaml` and the certificate files in `dir/xds` (where the operator was told gateways
/// mount them, `--gateway-xds-cert-dir`). Returns the bootstrap's path.
pub async fn materialise(client: &kube::Client, ns: &str, dir: &Path) -> PathBuf {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let cm = eventually(Duration::from_secs(60), "the gateway ConfigMap", || {
        let cms = cms.clone();
        async move { cms.get_opt("llmroute-gateway").await.ok()? }
    })
    .await;
    let secret = eventually(
        Duration::from_secs(60),
        "the gateway xDS certificate Secret",
        || {
            let secrets = secrets.clone();
            async move { secrets.get_opt("llmroute-gateway-xds").await.ok()? }
        },
    )
    .await;
    let config = dir.join("config");
    let certs = dir.join("xds");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::create_dir_all(&certs).unwrap();
    let bootstrap = config.join("bootstrap.yaml");
    std::fs::write(&bootstrap, &cm.data.unwrap()["bootstrap.yaml"]).unwrap();
    for (k, v) in secret.data.unwrap() {
        std::fs::write(certs.join(k), v.0).unwrap();
    }
    bootstrap
}

/// Starts a gateway replica named `node` of namespace `ns` (see [`materialise`]) and waits until
/// Envoy is ready (it has its first configuration).
pub async fn start(
    client: &kube::Client,
    ns: &str,
    dir: &Path,
    ports: &GatewayPorts,
    node: &str,
) -> Envoy {
    let bootstrap = materialise(client, ns, dir).await;
    let log = dir.join(format!("envoy-{node}.log"));
    let (bootstrap, admin, health) = (bootstrap.clone(), ports.admin_port, ports.health_port);
    // The arguments the gateway Deployment gives Envoy, with the host's address for the Pod's.
    let args = [
        "--service-node".into(),
        node.to_string(),
        "--config-yaml".into(),
        llmroute::gateway::objects::usage_address_overlay("127.0.0.1", ports.usage_port),
        llmroute::gateway::objects::ACCESS_LOG_FLUSH_FLAG.into(),
        llmroute::gateway::objects::ACCESS_LOG_FLUSH_MS.to_string(),
    ];
    tokio::task::spawn_blocking(move || Envoy::start_with(&bootstrap, admin, health, log, &args))
        .await
        .expect("start the gateway's Envoy")
}

/// An xDS server for an operator run in the test process: on 127.0.0.1:`port` (0: any), its CA in
/// `ns`, gateways mounting their certificate in `cert_dir`; it stops when `stop` resolves.
pub async fn xds_setup(
    client: &kube::Client,
    ns: &str,
    cert_dir: &Path,
    port: u16,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> llmroute::operator::xds::XdsSetup {
    let metrics = std::sync::Arc::new(llmroute::metrics::Metrics::new());
    let (serving, rx) = tokio::sync::watch::channel(true);
    // A dropped sender leaves the server serving.
    drop(serving);
    llmroute::operator::xds::start(
        client,
        &llmroute::operator::xds::XdsOptions {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            client: llmroute::gateway::envoy::XdsClient {
                address: format!("127.0.0.1:{port}"),
                cert_dir: cert_dir.display().to_string(),
            },
            ca_secret: (ns.to_string(), "llmroute-xds-ca".into()),
            upstream_ca: None,
        },
        rx,
        metrics,
        stop,
    )
    .await
    .expect("start the xDS server")
}
