//! The sidecar's usage endpoint (`/usage`, `/usage/ack`) over mutual TLS: served with the gateway's
//! own certificate (the xDS Secret the Pod mounts: `tls.crt`, `tls.key`, `ca.crt`), answering only
//! a client whose certificate the same CA issued to the operator
//! ([`crate::xds::tls::OPERATOR_IDENTITY`]). Other workloads of the cluster can neither read the
//! counts nor acknowledge them (a forged acknowledgement would let a stopping Pod leave before its
//! last counts are stored).
//!
//! The files are read again for every connection (the operator connects every usage interval), so
//! a renewed certificate is served without a restart. Handshakes run side by side and are bounded
//! in time: a client that connects and stays silent holds up no one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use crate::xds::tls::{OPERATOR_IDENTITY, certifies, usage_server_config};

/// How long a client has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections that completed the handshake with the operator's certificate.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Listens on `addr`, serving the certificate of `cert_dir`.
    pub async fn bind(addr: SocketAddr, cert_dir: PathBuf) -> std::io::Result<TlsListener> {
        let tcp = TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        let (tx, accepted) = mpsc::channel(16);
        let configs = Arc::new(Configs {
            dir: cert_dir,
            cached: Mutex::new(None),
        });
        tokio::spawn(async move {
            loop {
                let (conn, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "usage endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tx, configs) = (tx.clone(), configs.clone());
                tokio::spawn(async move {
                    if let Some(stream) = handshake(conn, peer, &configs).await {
                        let _ = tx.send((stream, peer)).await;
                    }
                });
            }
        });
        Ok(TlsListener { accepted, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(c) => c,
            // The accepting task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The TLS handshake of one connection; None (logged) unless the client is the operator.
async fn handshake(
    conn: TcpStream,
    peer: SocketAddr,
    configs: &Configs,
) -> Option<TlsStream<TcpStream>> {
    let config = match configs.current() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(dir = %configs.dir.display(), error = %e, "usage endpoint: no usable certificate; not answering");
            return None;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "usage endpoint: TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "usage endpoint: TLS handshake timed out");
            return None;
        }
    };
    let operator = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .is_some_and(|leaf| certifies(leaf, OPERATOR_IDENTITY));
    if !operator {
        tracing::warn!(%peer, "usage endpoint: a client certificate of the CA that is not the operator's; refused");
        return None;
    }
    Some(stream)
}

/// The server configuration of the files in `dir`, built again when they change.
struct Configs {
    dir: PathBuf,
    /// The SHA-256 of the files the configuration was built of, and the configuration.
    cached: Mutex<Option<([u8; 32], Arc<rustls::ServerConfig>)>>,
}

impl Configs {
    fn current(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let read = |name: &str| read_file(&self.dir, name);
        let (cert, key, ca) = (read("tls.crt")?, read("tls.key")?, read("ca.crt")?);
        let fingerprint: [u8; 32] = sha2::Sha256::new()
            .chain_update(&cert)
            .chain_update(&key)
            .chain_update(&ca)
            .finalize()
            .into();
        let mut cached = self.cached.lock().expect("usage TLS cache");
        if let Some((seen, config)) = cached.as_ref()
            && *seen == fingerprint
        {
            return Ok(config.clone());
        }
        let config = Arc::new(usage_server_config(&cert, &key, &ca).map_err(|e| e.to_string())?);
        *cached = Some((fingerprint, config.clone()));
        Ok(config)
    }
}

fn read_file(dir: &Path, name: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{name}: {e}"))
}
