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
    issuer: Issuer<'static, KeyPair>,
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
            issuer,
            server_cert: cert.der().clone(),
            server_key: key.serialize_der(),
        }
    }

    /// Writes the CA certificate (PEM) to `path`.
    pub fn write_ca(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        acceptor(vec![self.server_cert.clone()], key)
    }

    /// A server certificate and key (PEM) for `names` (DNS names or IP addresses), signed by this
    /// CA: for a simulator reached by its Service name in a cluster.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("server params");
        for name in names {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.to_string().try_into().expect("a DNS name")),
            });
        }
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("sim"));
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        (cert.pem(), key.serialize_pem())
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

/// A TLS acceptor serving `chain` with `key` (HTTP/1.1).
fn acceptor(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> TlsAcceptor {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate and key");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

/// A TLS acceptor serving the certificate (chain) and key of two PEM texts (`tls.crt`, `tls.key`
/// of a `kubernetes.io/tls` Secret).
pub fn acceptor_from_pem(cert_pem: &str, key_pem: &str) -> io::Result<TlsAcceptor> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let invalid = |e: tokio_rustls::rustls::pki_types::pem::Error| {
        io::Error::new(io::ErrorKind::InvalidData, e.to_string())
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(invalid)?;
    Ok(acceptor(chain, key))
}

impl TlsFront {
    pub async fn start(ca: &TestCa, upstream: u16, port: u16) -> io::Result<TlsFront> {
        TlsFront::start_with(ca.acceptor(), [127, 0, 0, 1].into(), upstream, port).await
    }

    /// A front on `address`:`port` with `acceptor`'s certificate, forwarding to 127.0.0.1:`upstream`.
    pub async fn start_with(
        acceptor: TlsAcceptor,
        address: std::net::IpAddr,
        upstream: u16,
        port: u16,
    ) -> io::Result<TlsFront> {
        let listener = TcpListener::bind((address, port)).await?;
        let port = listener.local_addr()?.port();
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
