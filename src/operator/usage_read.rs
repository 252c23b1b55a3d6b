//! How the leader reads a gateway replica's usage counts and acknowledges them: HTTP/1.1 over
//! mutual TLS to the replica's sidecar (`crate::agent::tls`), presenting the operator's client
//! certificate and accepting only the certificate of the gateway of the namespace the replica
//! belongs to (the name `llmroute-gateway.<namespace>.svc`, issued by the operator's CA): a
//! replica that gave another Pod's address in its node metadata (a tenant who read its gateway's
//! certificate could) gets no reads and no acknowledgements from there.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::gateway::objects;
use crate::usage::ledger::Report;
use crate::xds::tls::{Authority, SERVER_VALIDITY, gateway_identity};

/// How long one read or acknowledgement may take, connection and handshake included.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The largest report read (a replica's counts of every route of its namespace).
const MAX_REPORT_BYTES: usize = 64 << 20;

/// The operator's side of the usage endpoint.
pub struct UsageReader {
    authority: Arc<Authority>,
    /// The TLS configuration with the current client certificate, and when it was issued.
    config: RwLock<(Arc<rustls::ClientConfig>, Instant)>,
}

impl UsageReader {
    /// A reader with a client certificate of `authority` issued now.
    pub fn new(authority: Arc<Authority>) -> Result<UsageReader, String> {
        let config = client_config(&authority)?;
        Ok(UsageReader {
            authority,
            config: RwLock::new((config, Instant::now())),
        })
    }

    /// The configuration to connect with; its certificate issued again after a third of its life.
    fn config(&self) -> Arc<rustls::ClientConfig> {
        {
            let current = self.config.read().expect("usage TLS config");
            if current.1.elapsed() < SERVER_VALIDITY / 3 {
                return current.0.clone();
            }
        }
        match client_config(&self.authority) {
            Ok(config) => {
                *self.config.write().expect("usage TLS config") = (config.clone(), Instant::now());
                config
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the usage reader's client certificate");
                self.config.read().expect("usage TLS config").0.clone()
            }
        }
    }

    /// `GET /usage` of the replica of namespace `ns` at `addr`.
    pub async fn read(&self, ns: &str, addr: SocketAddr) -> Result<Report, String> {
        let request = http::Request::get(objects::USAGE_PATH)
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let (status, body) = self.exchange(ns, addr, request).await?;
        if !status.is_success() {
            return Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("unreadable counts: {e}"))
    }

    /// `POST /usage/ack`: the counts of `boot` up to `seq` answers are stored.
    pub async fn acknowledge(
        &self,
        ns: &str,
        addr: SocketAddr,
        boot: &str,
        seq: u64,
    ) -> Result<(), String> {
        let body = serde_json::json!({ "boot": boot, "seq": seq }).to_string();
        self.post(ns, addr, objects::USAGE_ACK_PATH, body).await
    }

    /// Sends a replica its lease (`POST /usage/lease`).
    pub async fn lease(
        &self,
        ns: &str,
        addr: SocketAddr,
        lease: &crate::usage::lease::Lease,
    ) -> Result<(), String> {
        let body = serde_json::to_string(lease).map_err(|e| e.to_string())?;
        self.post(ns, addr, objects::USAGE_LEASE_PATH, body).await
    }

    /// `POST` of a JSON body; any answer but a success is an error.
    async fn post(
        &self,
        ns: &str,
        addr: SocketAddr,
        path: &str,
        body: String,
    ) -> Result<(), String> {
        let request = http::Request::post(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let (status, _) = self.exchange(ns, addr, request).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }

    async fn exchange(
        &self,
        ns: &str,
        addr: SocketAddr,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(http::StatusCode, Bytes), String> {
        let name = ServerName::try_from(gateway_identity(ns)).map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.config());
        let exchange = async move {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connecting: {}", chain(&e)))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {}", chain(&e)))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| chain(&e))?;
            tokio::spawn(conn);
            let response = sender.send_request(request).await.map_err(|e| chain(&e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_REPORT_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {}", chain(e.as_ref())))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {} s", TIMEOUT.as_secs()))?
    }
}

fn client_config(authority: &Authority) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = authority
        .issue_operator(SystemTime::now())
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(
        authority
            .usage_client_config(&pem)
            .map_err(|e| e.to_string())?,
    ))
}

/// An error and its sources, `: `-separated (hyper's and rustls' say what went wrong in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
