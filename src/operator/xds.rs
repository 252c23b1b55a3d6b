//! The operator's side of the xDS server: its CA (kept in a Secret of the operator's namespace, so
//! every replica and every restart signs with the same one), its serving certificate (renewed while
//! it runs), its listener, and the EndpointSlice that points the xDS Service at the leader.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::gateway::envoy::XdsClient;
use crate::metrics::Metrics;
use crate::xds::XdsServer;
use crate::xds::server::{self, TlsConfig};
use crate::xds::tls::{Authority, SERVER_VALIDITY};

/// How the xDS server runs.
#[derive(Clone, Debug)]
pub struct XdsOptions {
    /// Address the server listens on.
    pub listen: SocketAddr,
    /// What gateways dial (written in their bootstrap; the serving certificate names its host).
    pub client: XdsClient,
    /// Namespace and name of the Secret holding the CA.
    pub ca_secret: (String, String),
    /// PEM of the CA bundle providers are verified against by gateways, when the operator serves
    /// one (`--upstream-ca-file`: the system roots plus the extra CAs).
    pub upstream_ca: Option<String>,
}

/// A running xDS server and what the reconciler needs of it.
#[derive(Clone)]
pub struct XdsSetup {
    pub server: XdsServer,
    pub authority: Arc<Authority>,
    pub client: XdsClient,
    pub upstream_ca: Option<String>,
    /// Where it listens (the port chosen when the options said 0).
    pub local_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("the xDS CA Secret {0}: {1}")]
    Ca(String, String),
    #[error("listening for xDS on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::xds::tls::TlsError),
}

const CA_CERT_KEY: &str = "ca.crt";
const CA_KEY_KEY: &str = "ca.key";

/// The CA stored in `ns/name`, created (by whichever replica gets there first) when there is none.
pub async fn load_or_create_ca(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Authority, XdsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let what = format!("{ns}/{name}");
    let e = |m: String| XdsError::Ca(what.clone(), m);
    for _ in 0..3 {
        // A list by name: the operator's role lists Secrets, it does not get them.
        let found = api
            .list(&ListParams::default().fields(&format!("metadata.name={name}")))
            .await
            .map_err(|x| e(x.to_string()))?
            .items
            .into_iter()
            .next();
        if let Some(secret) = found {
            let data = secret.data.unwrap_or_default();
            let field = |k: &str| {
                data.get(k)
                    .and_then(|v| String::from_utf8(v.0.clone()).ok())
                    .ok_or_else(|| e(format!("has no {k}")))
            };
            return Authority::from_pem(&field(CA_CERT_KEY)?, &field(CA_KEY_KEY)?)
                .map_err(|x| e(x.to_string()));
        }
        let authority = Authority::generate(SystemTime::now())?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(ns.to_string()),
                labels: Some(
                    [
                        (
                            "app.kubernetes.io/part-of".to_string(),
                            "llmroute".to_string(),
                        ),
                        (
                            "app.kubernetes.io/component".to_string(),
                            "xds-ca".to_string(),
                        ),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                [
                    (
                        CA_CERT_KEY.to_string(),
                        ByteString(authority.cert_pem.clone().into_bytes()),
                    ),
                    (
                        CA_KEY_KEY.to_string(),
                        ByteString(authority.key_pem().as_bytes().to_vec()),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(secret = %what, "created the xDS CA");
                return Ok(authority);
            }
            // Another replica created it meanwhile: use that one.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(x) => return Err(e(x.to_string())),
        }
    }
    Err(e("created and deleted concurrently; giving up".into()))
}

/// Starts the xDS server: the CA, a serving certificate for the host gateways dial, the listener.
/// Streams are served while `serving` is true.
pub async fn start(
    client: &Client,
    opts: &XdsOptions,
    serving: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<XdsSetup, XdsError> {
    let authority =
        Arc::new(load_or_create_ca(client, &opts.ca_secret.0, &opts.ca_secret.1).await?);
    let hosts = vec![opts.client.host()];
    let pem = authority.issue_server(&hosts, SystemTime::now())?;
    let tls: TlsConfig = Arc::new(RwLock::new(Arc::new(authority.server_config(&pem)?)));
    {
        // Renewed well before it expires.
        let (authority, tls, hosts) = (authority.clone(), tls.clone(), hosts.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SERVER_VALIDITY / 3).await;
                match authority
                    .issue_server(&hosts, SystemTime::now())
                    .and_then(|pem| authority.server_config(&pem))
                {
                    Ok(config) => *tls.write().expect("TLS config") = Arc::new(config),
                    Err(e) => warn!(error = %e, "could not renew the xDS serving certificate"),
                }
            }
        });
    }
    // Port 0 (tests): a free port, kept for every term of leadership.
    let mut local_addr = opts.listen;
    if local_addr.port() == 0 {
        let probe = std::net::TcpListener::bind(opts.listen)
            .map_err(|e| XdsError::Listen(opts.listen, e))?;
        local_addr = probe
            .local_addr()
            .map_err(|e| XdsError::Listen(opts.listen, e))?;
    }
    // An address with port 0 (tests) names the port just chosen.
    let mut client_opts = opts.client.clone();
    if let Some(host) = client_opts.address.strip_suffix(":0") {
        client_opts.address = format!("{host}:{}", local_addr.port());
    }
    let server = XdsServer::new(serving, metrics);
    tokio::spawn(server::serve(local_addr, tls, server.clone(), shutdown));
    info!(address = %local_addr, gateways_dial = %client_opts.address, "xDS server listening");
    Ok(XdsSetup {
        server,
        authority,
        client: client_opts,
        upstream_ca: opts.upstream_ca.clone(),
        local_addr,
    })
}

/// Points the xDS Service `ns/service` (a Service without selector) at this replica, the leader:
/// the EndpointSlice `<service>-leader` holds `pod_ip:port` alone. Retried until it succeeds or
/// `leading` turns false.
pub async fn publish_leader_endpoint(
    client: Client,
    ns: String,
    service: String,
    pod_ip: String,
    port: u16,
    mut leading: watch::Receiver<bool>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &ns);
    let name = format!("{service}-leader");
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(
                [
                    ("kubernetes.io/service-name".to_string(), service.clone()),
                    (
                        "endpointslice.kubernetes.io/managed-by".to_string(),
                        "operator.llmroute.io".to_string(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        address_type: if pod_ip.contains(':') { "IPv6" } else { "IPv4" }.into(),
        endpoints: vec![Endpoint {
            addresses: vec![pod_ip.clone()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Default::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some("grpc".into()),
            port: Some(port as i32),
            protocol: Some("TCP".into()),
            app_protocol: Some("grpc".into()),
        }]),
    };
    let mut body = serde_json::to_value(&slice).expect("EndpointSlice serializes");
    body["apiVersion"] = "discovery.k8s.io/v1".into();
    body["kind"] = "EndpointSlice".into();
    let mut delay = Duration::from_millis(200);
    while *leading.borrow() {
        match api
            .patch(
                &name,
                &PatchParams::apply(super::apply::FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(_) => {
                info!(namespace = %ns, service = %service, address = %pod_ip, "the xDS Service points at this replica");
                return;
            }
            Err(e) => {
                warn!(error = %e, "could not point the xDS Service at this replica; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = leading.changed() => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
