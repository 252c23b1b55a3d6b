//! An xDS server for tests that need no Kubernetes: the operator's server (mutual TLS with a CA made
//! for the test) on 127.0.0.1, the files a gateway replica starts from, and the replica itself.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use llmroute::gateway::envoy::{self, EnvoyOptions, XdsClient};
use llmroute::xds::delta::Serving;
use llmroute::xds::snapshot::Snapshot;
use llmroute::xds::tls::Authority;
use llmroute::xds::{XdsServer, server};

use super::envoy::{Envoy, free_port};

/// An xDS server with mutual TLS on 127.0.0.1, and what a gateway needs to dial it.
pub struct Server {
    pub xds: XdsServer,
    pub port: u16,
    /// Dropped (with the server, or by [`Server::stop`]): the server stops.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    pub async fn start(authority: Arc<Authority>, port: u16) -> Server {
        let pem = authority
            .issue_server(&["127.0.0.1".into()], SystemTime::now())
            .unwrap();
        let tls = Arc::new(RwLock::new(Arc::new(
            authority.server_config(&pem).unwrap(),
        )));
        let port = if port == 0 { free_port() } else { port };
        let xds = XdsServer::new(tokio::sync::watch::channel(true).1, Default::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server::serve(
            format!("127.0.0.1:{port}").parse().unwrap(),
            tls,
            xds.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            xds,
            port,
            stop: Some(stop),
        }
    }

    /// Stops serving, as dropping the server does.
    pub fn stop(&mut self) {
        self.stop = None;
    }
}

/// A gateway directory: the client certificate of `cert_ns`, the bootstrap of namespace `ns`.
pub fn gateway_files(
    dir: &Path,
    authority: &Authority,
    ns: &str,
    cert_ns: &str,
    server_port: u16,
    opts: &EnvoyOptions,
) -> PathBuf {
    let certs = dir.join("xds");
    std::fs::create_dir_all(&certs).unwrap();
    let pem = authority.issue_gateway(cert_ns, SystemTime::now()).unwrap();
    std::fs::write(certs.join("tls.crt"), &pem.cert).unwrap();
    std::fs::write(certs.join("tls.key"), &pem.key).unwrap();
    std::fs::write(certs.join("ca.crt"), &authority.cert_pem).unwrap();
    let client = XdsClient {
        address: format!("127.0.0.1:{server_port}"),
        cert_dir: certs.display().to_string(),
    };
    let bootstrap = dir.join("bootstrap.yaml");
    std::fs::write(&bootstrap, envoy::ads_bootstrap(opts, &client, ns)).unwrap();
    bootstrap
}

/// A gateway replica configured over xDS, as the tests start one: a CA made for the test, the
/// operator's xDS server on a free port, the replica's own free ports (front, admin, health) with
/// llmroute's usage module, and a directory for its files. Render the snapshots with
/// [`Replica::opts`] and publish the first one to [`Replica::ns`] before [`Replica::start`]: the
/// replica serves once it has its configuration.
pub struct Replica {
    /// The replica's files (bootstrap, certificate, Envoy's log) and the test's own.
    pub dir: tempfile::TempDir,
    pub authority: Arc<Authority>,
    pub server: Server,
    pub opts: EnvoyOptions,
    /// The namespace the replica's bootstrap claims.
    pub ns: String,
}

impl Replica {
    /// Everything but the running Envoy, for a replica of namespace `ns`.
    pub async fn new(ns: &str) -> Replica {
        let authority = Arc::new(Authority::generate(SystemTime::now()).unwrap());
        let server = Server::start(authority.clone(), 0).await;
        let opts = EnvoyOptions {
            port: free_port(),
            address: "127.0.0.1".into(),
            admin_port: free_port(),
            health_port: free_port(),
            usage_module: super::envoy::sse_usage_module(),
            ..Default::default()
        };
        Replica {
            dir: tempfile::tempdir().unwrap(),
            authority,
            server,
            opts,
            ns: ns.to_string(),
        }
    }

    /// Starts Envoy as the node `node` from the bootstrap and certificate of the replica's
    /// namespace, and waits until it serves.
    pub fn start(&self, node: &str) -> Envoy {
        self.launch(Envoy::start_with, &self.ns, node)
    }

    /// Starts Envoy as the node `node` with the certificate of namespace `cert_ns` (the bootstrap
    /// still claims the replica's), without waiting: it may never serve.
    pub fn spawn_with_certificate_of(&self, cert_ns: &str, node: &str) -> Envoy {
        self.launch(Envoy::spawn_with, cert_ns, node)
    }

    /// Envoy started by `how` from the replica's files with the certificate of `cert_ns`.
    fn launch(
        &self,
        how: fn(&Path, u16, u16, PathBuf, &[String]) -> Envoy,
        cert_ns: &str,
        node: &str,
    ) -> Envoy {
        how(
            &self.files(cert_ns),
            self.opts.admin_port,
            self.opts.health_port,
            self.dir.path().join("envoy.log"),
            &["--service-node".into(), node.into()],
        )
    }

    /// The replica's files, with the certificate of namespace `cert_ns`: its bootstrap.
    fn files(&self, cert_ns: &str) -> PathBuf {
        gateway_files(
            self.dir.path(),
            &self.authority,
            &self.ns,
            cert_ns,
            self.server.port,
            &self.opts,
        )
    }

    /// The operator restarts: its server stops, and a new one (same CA, same port) starts, with
    /// nothing published yet.
    pub async fn restart_server(&mut self) {
        let port = self.server.port;
        self.server.stop();
        self.server = Server::start(self.authority.clone(), port).await;
    }

    /// Publishes the configuration of the replica's namespace; `false` if it is the one already
    /// published.
    pub fn publish(&self, snapshot: Snapshot) -> bool {
        self.server.xds.publish(&self.ns, snapshot)
    }

    /// The node names of the namespace's replicas connected to the server.
    pub fn connected(&self) -> Vec<String> {
        self.server.xds.connected(&self.ns)
    }

    /// Whether the namespace's replicas acknowledged all of the last snapshot.
    pub fn all_current(&self) -> bool {
        self.server.xds.all_current(&self.ns)
    }

    /// Each replica's node name and what it serves of `route`, as the server sees them.
    pub fn serving(&self, route: &str) -> Vec<(String, Serving)> {
        self.server
            .xds
            .route_serving(&self.ns)
            .get(route)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.node, r.serving))
            .collect()
    }
}
