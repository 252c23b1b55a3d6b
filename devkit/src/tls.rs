//! HTTPS for simulators: a test CA made at run time and a TLS front that terminates TLS on
//! 127.0.0.1 and forwards bytes to a plain-HTTP simulator. Catalog providers must be reached over
//! `https://` (the CRD enforces it), so tests and the demo point backends at
//! `https://127.0.0.1:<front port>/...` and give the gateway and the prober the CA file.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA and one server certificate for `127.0.0.1` and `localhost`, signed by it.
pub struct TestCa {
    /// The CA certificate, PEM: what clients trust.
    pub ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "llmroute test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        TestCa {
            ca_pem: ca_cert.pem(),
            server_cert: cert.der().clone(),
            server_key: key.serialize_der(),
        }
    }

    /// Writes the CA certificate (PEM) to `path`.
    pub fn write_ca(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }

    fn acceptor(&self) -> TlsAcceptor {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .expect("server certificate and key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// A TLS-terminating front on 127.0.0.1 forwarding to `127.0.0.1:<upstream>`. Stops when dropped.
pub struct TlsFront {
    pub port: u16,
    _stop: watch::Sender<bool>,
}

impl TlsFront {
    pub async fn start(ca: &TestCa, upstream: u16, port: u16) -> io::Result<TlsFront> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let acceptor = ca.acceptor();
        let (tx, mut rx) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                    _ = rx.wait_for(|s| *s) => return,
                };
                let acceptor = acceptor.clone();
                let mut stop = rx.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let addr: SocketAddr = ([127, 0, 0, 1], upstream).into();
                    let Ok(mut plain) = TcpStream::connect(addr).await else {
                        return;
                    };
                    let _ = plain.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut tls, &mut plain) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        Ok(TlsFront { port, _stop: tx })
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self._stop.send(true);
    }
}

/// Installs rustls's *ring* provider as the process default (a no-op when one is installed), as
/// HTTP clients built with reqwest's `rustls-no-provider` need.
pub fn install_default_provider() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client for tests and tools (installs the TLS provider first).
pub fn http_client() -> reqwest::Client {
    install_default_provider();
    reqwest::Client::new()
}
