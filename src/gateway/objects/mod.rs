//! Gateway IR → the Kubernetes objects the operator applies in a namespace: the ConfigMap with
//! Envoy's bootstrap, the Secret with the gateway's xDS client certificate, the gateway Deployment,
//! Service, PodDisruptionBudget and NetworkPolicy, and one workload Secret per route. The configuration itself
//! (and every key) reaches the gateway over xDS, not through these objects. Pure: certificates and
//! key material come in as data.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ir::{BaseUrl, backend_base_url};
use super::keys::{KeyMaterial, trim};

mod pod;
use crate::api::{LLMRoute, WorkloadMode};
use crate::catalog;
pub use pod::deployment;

/// Name of the per-namespace gateway objects (ConfigMap, Deployment, Service).
pub const GATEWAY_NAME: &str = "llmroute-gateway";
/// Name of the Secret with the gateway's xDS client certificate.
pub const XDS_SECRET_NAME: &str = "llmroute-gateway-xds";
/// Annotation of that Secret (and of the gateway's Pod template): when its certificate expires. A
/// renewed certificate changes the Pod template, so the Deployment rolls to it.
pub const CERT_NOT_AFTER_ANNOTATION: &str = "llmroute.io/xds-certificate-not-after";
/// Where the gateway's containers mount the ConfigMap (the bootstrap) and the xDS certificate.
pub const CONFIG_DIR: &str = "/etc/llmroute/config";
pub const XDS_CERT_DIR: &str = "/etc/llmroute/xds";
/// The official Envoy image matching the configuration llmroute generates.
pub const DEFAULT_ENVOY_IMAGE: &str = "docker.io/envoyproxy/envoy:v1.40.0";

/// The operator's own image (the Dockerfile's, at this version): it also runs the gateway Pods'
/// shutdown-manager sidecar (`llmroute gateway shutdown-manager`).
pub const DEFAULT_SHUTDOWN_MANAGER_IMAGE: &str =
    concat!("ghcr.io/llmroute/llmroute:", env!("CARGO_PKG_VERSION"));

/// Graceful termination of a gateway Pod (see [`crate::agent`]): the sidecar's preStop
/// drains Envoy for at least `MIN_DRAIN_SECONDS` (endpoint removal propagates), then until no request
/// is in flight, at most `MAX_DRAIN_SECONDS` (a route's default request timeout: Envoy ends every
/// request by then with default timeouts); Envoy's preStop waits for it.
pub const MIN_DRAIN_SECONDS: i64 = 10;
pub const MAX_DRAIN_SECONDS: i64 = 300;
/// The grace period covers the drain plus a margin for the admin calls and Envoy's own exit, and
/// for the sidecar to wait until the operator read its last usage counts.
pub const TERMINATION_GRACE_SECONDS: i64 = MAX_DRAIN_SECONDS + 30;
/// Port of the shutdown manager (also the Pod's usage metrics, `/metrics`).
pub const SHUTDOWN_MANAGER_PORT: u16 = 19002;
/// Port of the sidecar's usage endpoint (`/usage`, `/usage/ack`; mutual TLS, the operator only).
pub const USAGE_PORT: u16 = 19004;
/// Envoy's flag of how often it writes its access log out, and the value the gateway gets: every
/// second (Envoy's default is 10 s; there is no bootstrap field for it). The Pod's sidecar counts
/// usage from the log (`crate::usage::log`): budgets, and a stopping sidecar's last read, should not
/// wait for more.
pub const ACCESS_LOG_FLUSH_FLAG: &str = "--file-flush-interval-msec";
pub const ACCESS_LOG_FLUSH_MS: u64 = 1000;
/// Where the emptyDir shared by Envoy (which writes its access log there) and the sidecar (which
/// follows it, counts token usage and keeps its checkpoint there) is mounted.
pub const USAGE_LOG_DIR: &str = "/var/run/llmroute-usage";
/// Envoy's access log, the sidecar's usage log (`crate::usage::log`).
pub const USAGE_LOG_FILE: &str = "/var/run/llmroute-usage/access.log";
/// Where Envoy finds llmroute's dynamic modules: an emptyDir the Pod's init container fills from
/// the operator's image (`llmroute gateway install-modules`), mounted read-only by Envoy.
pub const MODULES_DIR: &str = "/var/run/llmroute-modules";
/// The module that reads streamed answers' usage (`EnvoyOptions::usage_module`).
pub const USAGE_MODULE_FILE: &str = "/var/run/llmroute-modules/libllmroute_sse_usage.so";

/// The `--config-yaml` bootstrap overlay giving Envoy's node the address of its sidecar's usage
/// counts (`host` is `$(POD_IP)` in the Deployment, expanded by the kubelet).
pub fn usage_address_overlay(host: &str, port: u16) -> String {
    format!(
        r#"{{"node":{{"metadata":{{"{}":"{host}:{port}"}}}}}}"#,
        crate::xds::server::USAGE_ADDRESS_METADATA
    )
}
/// The manager's path whose GET answers once the drain is done (Envoy's preStop).
pub const SHUTDOWN_READY_PATH: &str = "/shutdown/ready";
/// Path of the sidecar's cumulative usage counts, which the operator leader reads for budgets.
pub const USAGE_PATH: &str = "/usage";
/// Path the operator leader acknowledges the counts it stored at (`POST`, JSON `{boot, seq}`).
pub const USAGE_ACK_PATH: &str = "/usage/ack";
/// Path of the leases of budgets to the replica's admission (`POST`, over the same TLS).
pub const USAGE_LEASE_PATH: &str = "/usage/lease";
/// Where the sidecar's emptyDir holding the drain state is mounted.
pub const SHUTDOWN_STATE_DIR: &str = "/var/run/llmroute-shutdown";

/// Environment variable names of the workload Secret (what OpenAI SDKs read).
pub const ENV_BASE_URL: &str = "OPENAI_BASE_URL";
pub const ENV_API_KEY: &str = "OPENAI_API_KEY";
pub const ENV_MODEL: &str = "OPENAI_MODEL";

/// How the gateway Deployment is run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayDeploymentOptions {
    /// Envoy's image.
    pub image: String,
    pub replicas: i32,
    /// Image of the shutdown-manager sidecar: the operator's (`llmroute run --shutdown-manager-image`).
    pub shutdown_manager_image: String,
}

impl Default for GatewayDeploymentOptions {
    fn default() -> Self {
        GatewayDeploymentOptions {
            image: DEFAULT_ENVOY_IMAGE.to_string(),
            replicas: 2,
            shutdown_manager_image: DEFAULT_SHUTDOWN_MANAGER_IMAGE.to_string(),
        }
    }
}

/// Standard labels of everything the operator creates for a gateway.
pub fn gateway_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            GATEWAY_NAME.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            "gateway".to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "llmroute".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "llmroute".to_string(),
        ),
    ])
}

fn selector_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            GATEWAY_NAME.to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "llmroute".to_string(),
        ),
    ])
}

fn meta(name: &str, namespace: &str, owners: &[OwnerReference]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(gateway_labels()),
        owner_references: if owners.is_empty() {
            None
        } else {
            Some(owners.to_vec())
        },
        ..Default::default()
    }
}

/// The ConfigMap with Envoy's bootstrap (static: it names the operator's xDS server; everything
/// else comes over xDS). It never holds key material.
pub fn config_map(namespace: &str, bootstrap: &str, owners: &[OwnerReference]) -> ConfigMap {
    ConfigMap {
        metadata: meta(GATEWAY_NAME, namespace, owners),
        data: Some(BTreeMap::from([(
            super::envoy::BOOTSTRAP.to_string(),
            bootstrap.to_string(),
        )])),
        ..Default::default()
    }
}

/// Key of a usage ledger ConfigMap holding the ledger's JSON.
pub const USAGE_LEDGER_KEY: &str = "ledger.json";
/// Label of a usage ledger shard: the namespace whose usage it counts.
pub const USAGE_OF_LABEL: &str = "llmroute.io/usage-of";
/// Label of a usage ledger shard: its shard number (`usage::ledger::shard_of`).
pub const USAGE_SHARD_LABEL: &str = "llmroute.io/usage-shard";

/// Name of the ConfigMap holding shard `shard` of `namespace`'s usage ledger.
pub fn usage_ledger_name(namespace: &str, shard: u32) -> String {
    format!("llmroute-usage-{namespace}-{shard:02}")
}

/// A shard of `namespace`'s usage ledger (period totals and the replicas' watermarks of the
/// routes of the shard), kept in the operator's namespace `ledger_namespace`, where tenants have
/// no access (no owner: the operator deletes it with the namespace's last route). With
/// `resource_version`, a write fails if another writer got there first.
pub fn usage_ledger(
    ledger_namespace: &str,
    namespace: &str,
    shard: u32,
    ledger_json: String,
    resource_version: Option<String>,
) -> ConfigMap {
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            "llmroute".to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "llmroute".to_string(),
        ),
        (USAGE_OF_LABEL.to_string(), namespace.to_string()),
    ]);
    labels.insert(USAGE_SHARD_LABEL.to_string(), shard.to_string());
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(usage_ledger_name(namespace, shard)),
            namespace: Some(ledger_namespace.to_string()),
            labels: Some(labels),
            resource_version,
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            USAGE_LEDGER_KEY.to_string(),
            ledger_json,
        )])),
        ..Default::default()
    }
}

/// The gateway's xDS client certificate (it names the namespace, see [`crate::xds::tls`]), its key
/// and the CA that signed the server's certificate, as a `kubernetes.io/tls` Secret.
pub fn xds_secret(
    namespace: &str,
    cert: &crate::xds::tls::Pem,
    ca_pem: &str,
    owners: &[OwnerReference],
) -> Secret {
    let mut metadata = meta(XDS_SECRET_NAME, namespace, owners);
    metadata.annotations = Some(BTreeMap::from([(
        CERT_NOT_AFTER_ANNOTATION.to_string(),
        cert.not_after.to_string(),
    )]));
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_string(),
                ByteString(cert.cert.as_bytes().to_vec()),
            ),
            (
                "tls.key".to_string(),
                ByteString(cert.key.as_bytes().to_vec()),
            ),
            ("ca.crt".to_string(), ByteString(ca_pem.as_bytes().to_vec())),
        ])),
        ..Default::default()
    }
}

fn quantity(s: &str) -> Quantity {
    Quantity(s.to_string())
}

/// The gateway's PodDisruptionBudget: a voluntary disruption (a node drain, a cluster upgrade)
/// takes at most one gateway Pod at a time, so a namespace keeps serving while it is evicted.
pub fn pod_disruption_budget(namespace: &str, owners: &[OwnerReference]) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(GATEWAY_NAME, namespace, owners),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels()),
                ..Default::default()
            }),
            // A Pod that is not Ready serves nothing: evicting it never costs availability.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The gateway's egress outside the cluster's Pods: everything but link-local addresses (the
/// metadata service of AWS, GCP, Azure at 169.254.169.254) and the other clouds' metadata
/// addresses (the prober refuses the same, `probe::egress`).
pub const METADATA_EXCEPT: [(&str, &[&str]); 2] = [
    ("0.0.0.0/0", &["169.254.0.0/16", "100.100.100.200/32"]),
    ("::/0", &["fe80::/10", "fd00:ec2::254/128"]),
];

/// The labels of the operator's Pods (deploy/ and the Helm chart give them both).
pub fn operator_pod_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "llmroute".to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "operator".to_string(),
        ),
    ])
}

/// The gateway's NetworkPolicy: what its Pods need and nothing of the usage endpoint for anyone
/// else. Ingress: the listener (`http`), Envoy's health and metrics port (`metrics`) and the
/// sidecar's metrics and drain port (`shutdown`) from anywhere, as without a policy; the usage
/// endpoint (`usage`, already mutual TLS) only from the operator's Pods in `operator_namespace`.
/// Egress: every Pod of the cluster (DNS, the operator's xDS server, self-hosted backends) and any
/// address outside it but link-local ones and the cloud metadata addresses ([`METADATA_EXCEPT`]):
/// a route's endpoint is its namespace users' to write, and must not reach the node's metadata
/// service through the gateway. Ports by name, so `--gateway-port` and friends need no change here.
pub fn network_policy(
    namespace: &str,
    operator_namespace: &str,
    owners: &[OwnerReference],
) -> NetworkPolicy {
    let ports = |names: &[&str]| {
        names
            .iter()
            .map(|n| NetworkPolicyPort {
                port: Some(IntOrString::String(n.to_string())),
                protocol: Some("TCP".into()),
                ..Default::default()
            })
            .collect::<Vec<_>>()
    };
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                operator_namespace.to_string(),
            )])),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(operator_pod_labels()),
            ..Default::default()
        }),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: meta(GATEWAY_NAME, namespace, owners),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels()),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(ports(&["http", "metrics", "shutdown"])),
                    from: None,
                },
                NetworkPolicyIngressRule {
                    ports: Some(ports(&["usage"])),
                    from: Some(vec![operator]),
                },
            ]),
            egress: Some(vec![
                NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(LabelSelector::default()),
                        ..Default::default()
                    }]),
                    ports: None,
                },
                NetworkPolicyEgressRule {
                    to: Some(
                        METADATA_EXCEPT
                            .iter()
                            .map(|(cidr, except)| NetworkPolicyPeer {
                                ip_block: Some(IPBlock {
                                    cidr: cidr.to_string(),
                                    except: Some(except.iter().map(|e| e.to_string()).collect()),
                                }),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ports: None,
                },
            ]),
        }),
    }
}

/// The gateway Service (port 8080).
pub fn service(namespace: &str, owners: &[OwnerReference]) -> Service {
    Service {
        metadata: meta(GATEWAY_NAME, namespace, owners),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 8080,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The gateway's in-cluster base URL for a route.
pub fn gateway_base_url(namespace: &str, route: &str) -> String {
    format!("http://{GATEWAY_NAME}.{namespace}.svc:8080/{route}/v1")
}

/// What the workload Secret of a route holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadEnv {
    pub base_url: String,
    pub api_key: Vec<u8>,
    pub model: Option<String>,
}

/// The workload Secret's content: the gateway (Gateway mode) or the active backend (Direct mode).
/// `None` when Direct mode has no usable active backend or key.
pub fn workload_env(
    route: &LLMRoute,
    namespace: &str,
    active: Option<&str>,
    keys: &KeyMaterial,
) -> Option<WorkloadEnv> {
    let name = kube::ResourceExt::name_any(route);
    match route.spec.workload_secret.mode {
        WorkloadMode::Gateway => Some(WorkloadEnv {
            base_url: gateway_base_url(namespace, &name),
            api_key: keys.route_keys.get(&name)?.as_bytes().to_vec(),
            model: route.spec.default_model.clone(),
        }),
        WorkloadMode::Direct => {
            let backend = route
                .spec
                .backends
                .iter()
                .find(|b| Some(b.name.as_str()) == active)?;
            let provider = catalog::provider(&backend.provider)?;
            let base: BaseUrl = backend_base_url(backend, provider).ok()?;
            let api_key = match &backend.credentials_secret_ref {
                Some(r) => trim(keys.provider_keys.get(&super::ir::provider_key_entry(r))?),
                None => Vec::new(),
            };
            let model = route
                .spec
                .default_model
                .as_ref()
                .map(|m| backend.models.get(m).cloned().unwrap_or_else(|| m.clone()));
            Some(WorkloadEnv {
                base_url: base.to_url(),
                api_key,
                model,
            })
        }
    }
}

/// The workload Secret of a route, owned by the route.
pub fn workload_secret(
    route: &LLMRoute,
    namespace: &str,
    env: &WorkloadEnv,
    owner: OwnerReference,
) -> Secret {
    let mut data = BTreeMap::from([
        (
            ENV_BASE_URL.to_string(),
            ByteString(env.base_url.as_bytes().to_vec()),
        ),
        (ENV_API_KEY.to_string(), ByteString(env.api_key.clone())),
    ]);
    if let Some(m) = &env.model {
        data.insert(ENV_MODEL.to_string(), ByteString(m.as_bytes().to_vec()));
    }
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            "llmroute".to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "llmroute".to_string(),
        ),
        (
            "llmroute.io/route".to_string(),
            kube::ResourceExt::name_any(route),
        ),
    ]);
    labels.insert(
        "app.kubernetes.io/component".into(),
        "workload-credentials".into(),
    );
    Secret {
        metadata: ObjectMeta {
            name: Some(route.workload_secret_name()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Default::default()
    }
}

/// Pod-template annotation that restarts Direct-mode workloads when their Secret changes.
pub const RESTARTED_AT_ANNOTATION: &str = "llmroute.io/restartedAt";
/// Pod-template annotation saying why llmroute restarted a workload.
pub const RESTART_REASON_ANNOTATION: &str = "llmroute.io/restartReason";

/// A label selector in the API server's query syntax (`a=b,c in (d,e),!f`).
pub fn selector_string(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gateway's NetworkPolicy keeps open what was open (the listener, the metrics and drain
    /// ports, every egress) and admits only the operator's Pods of its namespace to the usage port.
    #[test]
    fn the_usage_port_admits_the_operator_only() {
        let policy = network_policy("team-a", "llmroute-system", &[]);
        let spec = policy.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels,
            Some(selector_labels())
        );
        let rules = spec.ingress.unwrap();
        let names = |rule: &NetworkPolicyIngressRule| -> Vec<String> {
            rule.ports
                .iter()
                .flatten()
                .map(|p| match p.port.as_ref().unwrap() {
                    IntOrString::String(s) => s.clone(),
                    IntOrString::Int(i) => i.to_string(),
                })
                .collect()
        };
        let open: Vec<_> = rules.iter().filter(|r| r.from.is_none()).collect();
        assert_eq!(open.len(), 1);
        assert_eq!(names(open[0]), ["http", "metrics", "shutdown"]);
        let usage: Vec<_> = rules
            .iter()
            .filter(|r| names(r).contains(&"usage".to_string()))
            .collect();
        assert_eq!(usage.len(), 1);
        let from = usage[0].from.as_ref().unwrap();
        assert_eq!(from.len(), 1);
        let ns = from[0].namespace_selector.as_ref().unwrap();
        assert_eq!(
            ns.match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
            "llmroute-system"
        );
        assert_eq!(
            from[0].pod_selector.as_ref().unwrap().match_labels,
            Some(operator_pod_labels())
        );
        // Egress: every Pod (DNS, xDS, self-hosted backends), and outside the cluster all but
        // link-local and metadata addresses.
        let egress = spec.egress.unwrap();
        assert_eq!(egress.len(), 2);
        let pods = egress[0].to.as_ref().unwrap();
        assert_eq!(pods[0].namespace_selector, Some(LabelSelector::default()));
        assert!(egress.iter().all(|r| r.ports.is_none()));
        let blocks: Vec<(String, Vec<String>)> = egress[1]
            .to
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| {
                let b = p.ip_block.clone().unwrap();
                (b.cidr, b.except.unwrap())
            })
            .collect();
        assert_eq!(blocks[0].0, "0.0.0.0/0");
        assert!(blocks[0].1.contains(&"169.254.0.0/16".to_string()));
        assert_eq!(blocks[1].0, "::/0");
        assert!(blocks[1].1.contains(&"fe80::/10".to_string()));
    }
}
