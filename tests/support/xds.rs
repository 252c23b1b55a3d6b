//! An xDS server for tests that need no Kubernetes: the operator's server (mutual TLS with a CA made
//! for the test) on 127.0.0.1, and the files a gateway replica starts from.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use llmroute::gateway::envoy::{self, EnvoyOptions, XdsClient};
use llmroute::xds::tls::Authority;
use llmroute::xds::{XdsServer, server};

/// An xDS server with mutual TLS on 127.0.0.1, and what a gateway needs to dial it.
pub struct Server {
    pub xds: XdsServer,
    pub port: u16,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    pub async fn start(authority: Arc<Authority>, port: u16) -> Server {
        let pem = authority
            .issue_server(&["127.0.0.1".into()], SystemTime::now())
            .unwrap();
        let tls = Arc::new(RwLock::new(Arc::new(
            authority.server_config(&pem).unwrap(),
        )));
        let port = if port == 0 {
            super::envoy::free_port()
        } else {
            port
        };
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
            _stop: stop,
        }
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
