//! The gateway Deployment and its Pod, built from small named parts: Envoy's container, the
//! sidecar (drain, usage counting), the init container that installs llmroute's Envoy module, the
//! volumes they share, and the security settings every part runs under.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::super::envoy::{BOOTSTRAP, EnvoyOptions};
use super::{
    ACCESS_LOG_FLUSH_FLAG, ACCESS_LOG_FLUSH_MS, CERT_NOT_AFTER_ANNOTATION, CONFIG_DIR,
    GATEWAY_NAME, GatewayDeploymentOptions, MAX_DRAIN_SECONDS, MIN_DRAIN_SECONDS, MODULES_DIR,
    SHUTDOWN_MANAGER_PORT, SHUTDOWN_READY_PATH, SHUTDOWN_STATE_DIR, TERMINATION_GRACE_SECONDS,
    USAGE_LOG_DIR, USAGE_PORT, XDS_CERT_DIR, XDS_SECRET_NAME, gateway_labels, meta, quantity,
    selector_labels, usage_address_overlay,
};

/// The gateway Deployment: Envoy started from the bootstrap in the ConfigMap, with the xDS client
/// certificate of the namespace; `cert_not_after` (the certificate's expiry) is in the Pod template,
/// so a renewed certificate rolls the Pods.
pub fn deployment(
    namespace: &str,
    envoy: &EnvoyOptions,
    opts: &GatewayDeploymentOptions,
    cert_not_after: &str,
    owners: &[OwnerReference],
) -> Deployment {
    let mut labels = gateway_labels();
    labels.extend(selector_labels());
    Deployment {
        metadata: meta(GATEWAY_NAME, namespace, owners),
        spec: Some(DeploymentSpec {
            replicas: Some(opts.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels()),
                ..Default::default()
            },
            // One new Pod at a time, none taken away before its successor is ready.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        CERT_NOT_AFTER_ANNOTATION.to_string(),
                        cert_not_after.to_string(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(pod_spec(envoy, opts)),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether the Pod installs llmroute's module: a module under [`MODULES_DIR`] is copied there by
/// an init container from the operator's image; one elsewhere is the Envoy image's own.
fn installs_modules(envoy: &EnvoyOptions) -> bool {
    envoy
        .usage_module
        .strip_prefix(MODULES_DIR)
        .is_some_and(|rest| rest.starts_with('/'))
}

fn pod_spec(envoy: &EnvoyOptions, opts: &GatewayDeploymentOptions) -> PodSpec {
    let installs = installs_modules(envoy);
    PodSpec {
        init_containers: installs.then(|| vec![install_modules_container(opts)]),
        containers: vec![envoy_container(envoy, opts), sidecar_container(envoy, opts)],
        topology_spread_constraints: Some(vec![spread_over_nodes()]),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        security_context: Some(pod_security()),
        volumes: Some(volumes(installs)),
        ..Default::default()
    }
}

/// Replicas on different nodes where the scheduler can: one node going away does not take the
/// namespace's gateway with it.
fn spread_over_nodes() -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels()),
            ..Default::default()
        }),
        // Spread each revision on its own during a rolling update.
        match_label_keys: Some(vec!["pod-template-hash".into()]),
        ..Default::default()
    }
}

fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(101),
        run_as_group: Some(101),
        // Secret volume files are root-owned: the group lets uid 101 read the certificate's key
        // (mode 0440) on a real kubelet.
        fs_group: Some(101),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What every container of the Pod runs under.
fn hardened() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn envoy_container(envoy: &EnvoyOptions, opts: &GatewayDeploymentOptions) -> Container {
    Container {
        name: "envoy".to_string(),
        image: Some(opts.image.clone()),
        command: Some(vec!["envoy".to_string()]),
        args: Some(envoy_args()),
        ports: Some(vec![
            port("http", envoy.port),
            port("metrics", envoy.health_port),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::String("metrics".into()),
                ..Default::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(resources(("100m", "128Mi"), "1Gi")),
        security_context: Some(hardened()),
        // SIGTERM only once the sidecar has drained Envoy: this GET answers then (or after its
        // timeout).
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                http_get: Some(HTTPGetAction {
                    path: Some(SHUTDOWN_READY_PATH.into()),
                    // A number: a named port resolves among this container's ports only.
                    port: IntOrString::Int(SHUTDOWN_MANAGER_PORT as i32),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_IP", "status.podIP"),
        ]),
        // Envoy's last log lines become the termination message of a container that fails (a
        // bootstrap it cannot load, a certificate it cannot read): the operator reports it in the
        // routes' status.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(envoy_mounts(installs_modules(envoy))),
        ..Default::default()
    }
}

fn envoy_args() -> Vec<String> {
    [
        "-c",
        &format!("{CONFIG_DIR}/{BOOTSTRAP}"),
        // The node id the xDS server knows this replica by (and reports in status).
        "--service-node",
        "$(POD_NAME)",
        // Merged into the bootstrap's node metadata: where the operator reads this replica's usage
        // counts (the sidecar's port on the Pod's IP), for budgets.
        "--config-yaml",
        &usage_address_overlay("$(POD_IP)", USAGE_PORT),
        "--log-level",
        "info",
        "--disable-hot-restart",
        ACCESS_LOG_FLUSH_FLAG,
        &ACCESS_LOG_FLUSH_MS.to_string(),
        // The drain period after `/drain_listeners?graceful` (and after a listener update): the
        // listeners keep accepting through the whole drain, and `immediate` asks every client to go
        // (`connection: close`, GOAWAY) from its start instead of a growing share of them.
        "--drain-time-s",
        &MAX_DRAIN_SECONDS.to_string(),
        "--drain-strategy",
        "immediate",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn envoy_mounts(installs_modules: bool) -> Vec<VolumeMount> {
    let mut mounts = vec![
        mount("config", CONFIG_DIR, true),
        mount("xds-certificate", XDS_CERT_DIR, true),
        mount("tmp", "/tmp", false),
        mount("usage-log", USAGE_LOG_DIR, false),
    ];
    if installs_modules {
        mounts.push(mount("modules", MODULES_DIR, true));
    }
    mounts
}

/// `llmroute` with `args` (the command of the Pod's llmroute containers).
fn llmroute(args: &[&str]) -> Vec<String> {
    std::iter::once("llmroute")
        .chain(args.iter().copied())
        .map(String::from)
        .collect()
}

/// The sidecar: serves Envoy's preStop wait and the usage counts, and drains Envoy in its own
/// preStop.
fn sidecar_container(envoy: &EnvoyOptions, opts: &GatewayDeploymentOptions) -> Container {
    Container {
        name: "shutdown-manager".to_string(),
        image: Some(opts.shutdown_manager_image.clone()),
        command: Some(llmroute(&[
            "gateway",
            "shutdown-manager",
            "--port",
            &SHUTDOWN_MANAGER_PORT.to_string(),
            "--state-dir",
            SHUTDOWN_STATE_DIR,
            "--ready-timeout",
            &format!("{}s", MAX_DRAIN_SECONDS + 10),
            "--usage-log",
            &envoy.usage_log,
            "--usage-port",
            &USAGE_PORT.to_string(),
            "--tls-dir",
            XDS_CERT_DIR,
        ])),
        // The gateway's namespace labels its usage metrics.
        env: Some(vec![field_env("POD_NAMESPACE", "metadata.namespace")]),
        ports: Some(vec![
            port("shutdown", SHUTDOWN_MANAGER_PORT),
            port("usage", USAGE_PORT),
        ]),
        // Drains Envoy, then lets the manager answer Envoy's preStop.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(llmroute(&[
                        "gateway",
                        "shutdown",
                        "--admin-port",
                        &envoy.admin_port.to_string(),
                        "--min-drain",
                        &format!("{MIN_DRAIN_SECONDS}s"),
                        "--max-drain",
                        &format!("{MAX_DRAIN_SECONDS}s"),
                        "--state-dir",
                        SHUTDOWN_STATE_DIR,
                    ])),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(llmroute_container_resources()),
        security_context: Some(hardened()),
        volume_mounts: Some(vec![
            mount("shutdown-state", SHUTDOWN_STATE_DIR, false),
            mount("usage-log", USAGE_LOG_DIR, false),
            // Its certificate serves the usage endpoint.
            mount("xds-certificate", XDS_CERT_DIR, true),
        ]),
        ..Default::default()
    }
}

fn install_modules_container(opts: &GatewayDeploymentOptions) -> Container {
    Container {
        name: "install-modules".to_string(),
        image: Some(opts.shutdown_manager_image.clone()),
        command: Some(llmroute(&[
            "gateway",
            "install-modules",
            "--to",
            MODULES_DIR,
        ])),
        resources: Some(llmroute_container_resources()),
        security_context: Some(hardened()),
        volume_mounts: Some(vec![mount("modules", MODULES_DIR, false)]),
        ..Default::default()
    }
}

fn volumes(installs_modules: bool) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: GATEWAY_NAME.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "xds-certificate".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(XDS_SECRET_NAME.into()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        // The sidecar punches out what it has counted and checkpointed: on disk the log holds
        // seconds of answers, unless the sidecar stops following it.
        empty_dir("usage-log", "1Gi"),
        empty_dir("shutdown-state", "1Mi"),
    ];
    if installs_modules {
        volumes.push(empty_dir("modules", "16Mi"));
    }
    volumes
}

fn empty_dir(name: &str, size_limit: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(quantity(size_limit)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number as i32,
        ..Default::default()
    }
}

/// An environment variable holding a field of the Pod (the downward API).
fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Requests (cpu, memory) and a memory limit.
fn resources(requests: (&str, &str), memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), quantity(requests.0)),
            ("memory".into(), quantity(requests.1)),
        ])),
        limits: Some(BTreeMap::from([("memory".into(), quantity(memory_limit))])),
        ..Default::default()
    }
}

/// Requests and limits of the gateway Pod's llmroute containers (the sidecar, the init container):
/// small, fixed.
fn llmroute_container_resources() -> ResourceRequirements {
    resources(("10m", "16Mi"), "64Mi")
}
