//! Mutual TLS of the xDS connection (pure: certificates in, certificates and rustls configuration
//! out; the operator stores them). The operator keeps a CA of its own (a Secret in its namespace);
//! every gateway namespace gets a client certificate naming that namespace, every operator replica
//! a server certificate for the address gateways dial. The server trusts only client certificates
//! of that CA and serves a stream only the configuration of the namespace its certificate names, so
//! one namespace's gateway can never read another namespace's provider keys.
//!
//! The same CA authenticates the other direction, the operator leader reading a gateway Pod's usage
//! counts (the sidecar's `/usage`): the gateway's certificate also serves that endpoint (it is
//! issued for both client and server use), and the leader presents a client certificate naming
//! [`OPERATOR_IDENTITY`], the only client the sidecar answers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// Common name of the CA (fixed: a certificate issued by an authority loaded from its key names
/// this issuer).
const CA_NAME: &str = "llmroute xDS CA";

/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a gateway's client certificate is valid; it is re-issued when a third of it is left
/// (the gateway Deployment rolls to pick it up).
pub const CLIENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long an operator's serving certificate is valid (made at start, renewed while running).
pub const SERVER_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
#[error("xDS certificates: {0}")]
pub struct TlsError(String);

fn err(e: impl std::fmt::Display) -> TlsError {
    TlsError(e.to_string())
}

/// The name a gateway's client certificate carries for namespace `ns` (its Service's DNS name).
pub fn gateway_identity(ns: &str) -> String {
    format!("llmroute-gateway.{ns}.svc")
}

/// The name the operator's client certificate carries (reading gateways' usage counts). No
/// gateway's name can equal it: those all begin with `llmroute-gateway.`.
pub const OPERATOR_IDENTITY: &str = "llmroute-operator.llmroute.io";

/// TLS sessions the usage reader keeps for resumption (a cluster's gateway replicas at most).
const USAGE_SESSIONS: usize = 16_384;

/// A certificate and its private key, PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pem {
    pub cert: String,
    pub key: String,
    /// Seconds since the epoch when it stops being valid.
    pub not_after: i64,
}

/// The operator's CA.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: what both sides trust.
    pub cert_pem: String,
    key_pem: String,
}

fn ca_params(not_before: SystemTime) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = not_before.into();
    params.not_after = (not_before + CA_VALIDITY).into();
    Ok(params)
}

fn epoch_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Authority {
    /// A new CA, valid from `now`.
    pub fn generate(now: SystemTime) -> Result<Authority, TlsError> {
        let key = KeyPair::generate().map_err(err)?;
        let params = ca_params(now)?;
        let cert = params.self_signed(&key).map_err(err)?;
        let key_pem = key.serialize_pem();
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA stored earlier (its certificate and key, PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(err)?;
        // Signing needs the issuer's name and key; both are fixed by how `generate` made it.
        let params = ca_params(SystemTime::now())?;
        rustls_pemfile_cert(cert_pem)?;
        Ok(Authority {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA's private key, PEM (stored in the operator's Secret, nowhere else).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn issue(
        &self,
        params: &mut CertificateParams,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Pem, TlsError> {
        let key = KeyPair::generate().map_err(err)?;
        // A minute of slack for clocks that disagree a little.
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + validity).into();
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
            not_after: epoch_seconds(now + validity),
        })
    }

    /// The certificate of namespace `ns`'s gateway: its client certificate for xDS, and the
    /// server certificate of its sidecar's usage endpoint.
    pub fn issue_gateway(&self, ns: &str, now: SystemTime) -> Result<Pem, TlsError> {
        let mut params = CertificateParams::new(vec![gateway_identity(ns)]).map_err(err)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, gateway_identity(ns));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        self.issue(&mut params, now, CLIENT_VALIDITY)
    }

    /// The operator's client certificate ([`OPERATOR_IDENTITY`]): what gateways' sidecars answer
    /// usage reads from.
    pub fn issue_operator(&self, now: SystemTime) -> Result<Pem, TlsError> {
        let mut params =
            CertificateParams::new(vec![OPERATOR_IDENTITY.to_string()]).map_err(err)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, OPERATOR_IDENTITY);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&mut params, now, SERVER_VALIDITY)
    }

    /// Whether `pem` is a gateway certificate this CA issued for namespace `ns` that can serve
    /// the usage endpoint, valid at `now` (certificates of earlier releases were for clients only).
    pub fn serves_gateway(&self, pem: &str, ns: &str, now: SystemTime) -> bool {
        let Ok(leaf) = rustls_pemfile_cert(pem) else {
            return false;
        };
        let Ok(verifier) = self.server_verifier() else {
            return false;
        };
        let Ok(name) = ServerName::try_from(gateway_identity(ns)) else {
            return false;
        };
        let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            epoch_seconds(now).max(0) as u64,
        ));
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], at)
            .is_ok()
    }

    fn server_verifier(&self) -> Result<Arc<rustls::client::WebPkiServerVerifier>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pemfile_cert(&self.cert_pem)?)
            .map_err(err)?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(err)
    }

    /// The operator's TLS client configuration for reading usage: `operator` (from
    /// [`Authority::issue_operator`]) as its client certificate; servers verified against this CA
    /// (the caller names the gateway it expects, [`gateway_identity`]). HTTP/1.1.
    pub fn usage_client_config(&self, operator: &Pem) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = private_key(&operator.key)?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(err)?
            .with_webpki_verifier(self.server_verifier()?)
            .with_client_auth_cert(vec![rustls_pemfile_cert(&operator.cert)?], key)
            .map_err(err)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // One resumable session per replica read every interval: resumption skips the
        // certificate signatures of a full handshake.
        config.resumption = rustls::client::Resumption::in_memory_sessions(USAGE_SESSIONS);
        Ok(config)
    }

    /// The serving certificate for the host gateways dial (a DNS name or an IP address).
    pub fn issue_server(&self, hosts: &[String], now: SystemTime) -> Result<Pem, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        for host in hosts {
            params.subject_alt_names.push(match host.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.clone().try_into().map_err(err)?),
            });
        }
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "llmroute xDS server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(&mut params, now, SERVER_VALIDITY)
    }

    /// The rustls configuration of the xDS server: `server` as its certificate, client certificates
    /// required and verified against this CA; HTTP/2 only (gRPC).
    pub fn server_config(&self, server: &Pem) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pemfile_cert(&self.cert_pem)?)
            .map_err(err)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(err)?;
        let key = private_key(&server.key)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![rustls_pemfile_cert(&server.cert)?], key)
            .map_err(err)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The TLS configuration of a gateway sidecar's usage endpoint: the gateway's certificate and key
/// (`cert_pem`, `key_pem`), client certificates required and verified against the CA (`ca_pem`);
/// HTTP/1.1. Which client may read is checked after the handshake ([`certifies`] with
/// [`OPERATOR_IDENTITY`]).
pub fn usage_server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pemfile_cert(ca_pem)?).map_err(err)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(err)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![rustls_pemfile_cert(cert_pem)?], private_key(key_pem)?)
        .map_err(err)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A PEM private key (PKCS#8, as rcgen writes them).
fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        KeyPair::from_pem(pem).map_err(err)?.serialize_der(),
    )))
}

/// The DER of the first certificate of a PEM text.
fn rustls_pemfile_cert(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(err)
}

/// Whether a client certificate (already verified against the CA by the TLS handshake) names the
/// gateway of namespace `ns`.
pub fn certifies_namespace(peer: &CertificateDer<'_>, ns: &str) -> bool {
    certifies(peer, &gateway_identity(ns))
}

/// Whether a certificate (already verified against the CA by the TLS handshake) names `identity`.
pub fn certifies(peer: &CertificateDer<'_>, identity: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(peer) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(identity.to_string()) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_certificates_name_their_namespace_only() {
        let now = SystemTime::now();
        let ca = Authority::generate(now).unwrap();
        let pem = ca.issue_gateway("team-a", now).unwrap();
        let der = rustls_pemfile_cert(&pem.cert).unwrap();
        assert!(certifies_namespace(&der, "team-a"));
        assert!(!certifies_namespace(&der, "team-b"));
        assert!(!certifies_namespace(&der, "team"));
        assert!(pem.not_after > epoch_seconds(now + CLIENT_VALIDITY - Duration::from_secs(5)));
    }

    #[test]
    fn a_reloaded_authority_issues_certificates_the_original_verifies() {
        use rustls::client::danger::ServerCertVerifier;
        let now = SystemTime::now();
        let ca = Authority::generate(now).unwrap();
        let again = Authority::from_pem(&ca.cert_pem, ca.key_pem()).unwrap();
        let server = again
            .issue_server(
                &[
                    "llmroute-xds.llmroute-system.svc".into(),
                    "127.0.0.1".into(),
                ],
                now,
            )
            .unwrap();
        // The original CA's server configuration accepts the reloaded one's certificate and key,
        // and the chain verifies against the original CA certificate.
        ca.server_config(&server).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pemfile_cert(&ca.cert_pem).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = rustls_pemfile_cert(&server.cert).unwrap();
        for host in ["llmroute-xds.llmroute-system.svc", "127.0.0.1"] {
            verifier
                .verify_server_cert(
                    &leaf,
                    &[],
                    &ServerName::try_from(host.to_string()).unwrap(),
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{host}: {e}"));
        }
    }

    #[test]
    fn gateway_certificates_serve_usage_and_only_the_operator_reads_it() {
        let now = SystemTime::now();
        let ca = Authority::generate(now).unwrap();
        let gateway = ca.issue_gateway("team-a", now).unwrap();
        assert!(ca.serves_gateway(&gateway.cert, "team-a", now));
        assert!(!ca.serves_gateway(&gateway.cert, "team-b", now));
        let later = now + CLIENT_VALIDITY + Duration::from_secs(3600);
        assert!(!ca.serves_gateway(&gateway.cert, "team-a", later));
        // Another CA's gateway certificate does not serve.
        let other = Authority::generate(now).unwrap();
        assert!(!ca.serves_gateway(
            &other.issue_gateway("team-a", now).unwrap().cert,
            "team-a",
            now
        ));
        // The operator's certificate names the operator, and no gateway does.
        let operator = ca.issue_operator(now).unwrap();
        let der = rustls_pemfile_cert(&operator.cert).unwrap();
        assert!(certifies(&der, OPERATOR_IDENTITY));
        assert!(!certifies_namespace(&der, "llmroute-operator"));
        let gw = rustls_pemfile_cert(&gateway.cert).unwrap();
        assert!(!certifies(&gw, OPERATOR_IDENTITY));
        ca.usage_client_config(&operator).unwrap();
        usage_server_config(&gateway.cert, &gateway.key, &ca.cert_pem).unwrap();
    }

    #[test]
    fn a_broken_stored_authority_is_an_error() {
        assert!(Authority::from_pem("not a cert", "not a key").is_err());
    }
}
