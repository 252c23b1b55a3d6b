//! Decide: what a namespace should look like, from plain facts, with no I/O (no client, no cache,
//! no clock, no randomness): the gateway's objects, the xDS configuration, each route's workload
//! Secret, what to probe, and (once the replicas have answered) each route's status and events.
//! `llmroute render` prints the objects of the same plan, so the CLI and the operator cannot drift.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference, Time};
use kube::{Resource, ResourceExt};

use super::events::{self, Transition};
use crate::api::{LLMRoute, WorkloadMode};
use crate::gateway::envoy::{self, EnvoyOptions, XdsClient};
use crate::gateway::keys::{self, KeyMaterial};
use crate::gateway::objects::{self, GatewayDeploymentOptions};
use crate::gateway::{self, Problem, RouteOutcome};
use crate::policy::Facts;
use crate::policy::health::HealthView;
use crate::probe::ProbeTarget;
use crate::status::{self, GatewayView, RouteState};
use crate::xds::ReplicaServing;
use crate::xds::snapshot::Snapshot;
use crate::xds::tls::Pem;

/// How the operator builds gateways (its options, and what the xDS server tells a gateway).
pub struct Settings<'a> {
    pub default_region: &'a str,
    pub envoy: &'a EnvoyOptions,
    pub deployment: &'a GatewayDeploymentOptions,
    /// The xDS server the gateways' bootstrap names.
    pub xds: &'a XdsClient,
    /// The CA bundle providers are verified against, when not the system's.
    pub upstream_ca: Option<&'a str>,
    /// The operator's namespace (the gateways' NetworkPolicy lets its Pods read usage counts).
    pub operator_namespace: &'a str,
}

/// A namespace's facts: its live routes and what they reference, as plain values.
pub struct NamespaceFacts {
    pub namespace: String,
    /// Live routes (not being deleted), sorted by name.
    pub routes: Vec<Arc<LLMRoute>>,
    /// Data of the Secrets the routes reference, by Secret name then key. A Secret absent from the
    /// map does not exist.
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Each route's key, by route name.
    pub route_keys: BTreeMap<String, String>,
    /// Probe observations (see [`Facts::health`]).
    pub health: BTreeMap<String, HealthView>,
    /// Counted usage per route (see [`Facts::usage`]).
    pub usage: BTreeMap<String, crate::usage::ledger::RouteTotals>,
    /// Why the namespace's usage is not known, if it is not (see [`Facts::usage_unknown`]).
    pub usage_unknown: Option<String>,
    /// The time of the decision, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// The gateway's xDS client certificate (the current one, or one issued for this reconcile).
    pub certificate: Pem,
    /// The xDS CA's certificate, which the gateway verifies the server with.
    pub ca_pem: String,
    /// The configuration the gateway replicas were sent last, if any.
    pub previous: Option<Arc<Snapshot>>,
}

/// The gateway's own objects, in the order they are applied.
#[derive(Clone, Debug)]
pub struct GatewayObjects {
    /// The xDS client certificate (written before the Deployment that mounts it).
    pub xds_secret: Secret,
    /// Envoy's bootstrap.
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    pub budget: PodDisruptionBudget,
    pub network_policy: NetworkPolicy,
}

/// A route's workload side: what its workload reads, and whether its workloads restart on a change.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The workload Secret, when the route is served (none while it is not: the last one stays).
    pub secret: Option<Secret>,
    /// Deployments restarted when the Secret changes (Direct mode with `spec.rollout`).
    pub rollout: Option<Rollout>,
    /// `status.endpoint`.
    pub endpoint: String,
}

/// Which workloads to restart, and for which backend.
#[derive(Clone, Debug)]
pub struct Rollout {
    pub selector: LabelSelector,
    pub backend: String,
}

/// The decision for one namespace.
pub struct Plan {
    pub namespace: String,
    /// Routes that fail the CRD's rules, by name.
    pub invalid: BTreeMap<String, Problem>,
    /// One outcome per valid route, sorted by name.
    pub outcomes: Vec<RouteOutcome>,
    /// Backends probing has not seen yet, with the state their route's status gives them.
    pub seeds: Vec<(String, HealthView)>,
    /// What to probe: every backend a route may use by design and has a key for.
    pub probes: Vec<ProbeTarget>,
    /// The configuration for the gateway replicas (taken when published)...
    pub configuration: Option<Snapshot>,
    /// ...or why Envoy's API refuses it (the replicas keep the configuration published last).
    pub publish_error: Option<Problem>,
    /// Routes the configuration programs.
    pub served_routes: usize,
    pub objects: GatewayObjects,
    /// Each valid route's workload side, by name.
    pub workloads: BTreeMap<String, Workload>,
    /// When a decision changes by itself (a failback delay, a budget period), in ms since the epoch.
    pub recheck_at_ms: Option<u64>,
    /// When the xDS client certificate is renewed, in seconds since the epoch.
    pub renew_at: i64,
    pub now_ms: u64,
}

/// An owner reference to `route` (the gateway's objects have one per route; a workload Secret is
/// controlled by its route).
pub fn owner_ref(route: &LLMRoute, controller: bool) -> Option<OwnerReference> {
    let mut o = route.controller_owner_ref(&())?;
    o.controller = Some(controller);
    o.block_owner_deletion = Some(true);
    Some(o)
}

/// A certificate is renewed when less than this is left of it.
pub fn renew_margin_secs() -> i64 {
    (crate::xds::tls::CLIENT_VALIDITY.as_secs() / 3) as i64
}

/// Decides a namespace from its facts.
pub fn decide(facts: NamespaceFacts, settings: &Settings) -> Plan {
    let ns = facts.namespace.as_str();
    let (valid, invalid) = validate(&facts.routes);
    let mut policy_facts = Facts {
        default_region: settings.default_region.to_string(),
        health: facts.health.clone(),
        usage: facts.usage.clone(),
        now_ms: facts.now_ms,
        secrets: present_keys(&facts.secrets),
        usage_unknown: facts.usage_unknown.clone(),
    };
    let seeds = seed_from_status(&valid, &mut policy_facts);
    let translation = gateway::translate(ns, &valid, &policy_facts);
    let probes = probe_targets(&valid, &translation, &facts.secrets);
    let recheck_at_ms = translation
        .routes
        .iter()
        .filter_map(|o| o.decision.recheck_at_ms)
        .min();
    let material = key_material(&translation, &facts);
    drop(valid);
    let (configuration, served_routes) =
        configuration(&facts, translation.gateway, &material, settings);
    let owners: Vec<OwnerReference> = facts
        .routes
        .iter()
        .filter_map(|r| owner_ref(r, false))
        .collect();
    let objects = gateway_objects(&facts, &owners, settings);
    let outcomes = translation.routes;
    let (configuration, publish_error) = match configuration {
        Ok(snapshot) => (Some(snapshot), None),
        Err(problem) => (None, Some(problem)),
    };
    let workloads = facts
        .routes
        .iter()
        .filter_map(|r| {
            let outcome = outcomes.iter().find(|o| o.name == r.name_any())?;
            let publish_error = publish_error.as_ref();
            Some((
                r.name_any(),
                workload(r, ns, outcome, &material, publish_error),
            ))
        })
        .collect();
    Plan {
        namespace: facts.namespace.clone(),
        invalid,
        outcomes,
        seeds,
        probes,
        configuration,
        publish_error,
        served_routes,
        objects,
        workloads,
        recheck_at_ms,
        renew_at: facts.certificate.not_after - renew_margin_secs(),
        now_ms: facts.now_ms,
    }
}

/// Validates with the CRD's own rules (a route stored before a rule existed may break one).
fn validate(routes: &[Arc<LLMRoute>]) -> (Vec<LLMRoute>, BTreeMap<String, Problem>) {
    let mut valid = Vec::new();
    let mut invalid = BTreeMap::new();
    for r in routes {
        let mut value = serde_json::to_value(r.as_ref()).expect("routes serialize");
        value.as_object_mut().map(|o| o.remove("status"));
        match crate::validate::validate_route(&value) {
            Ok(_) => valid.push(r.as_ref().clone()),
            Err(errors) => {
                let message = errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                invalid.insert(r.name_any(), Problem::new("InvalidSpec", message));
            }
        }
    }
    (valid, invalid)
}

/// Which keys of each Secret exist with a value (not only whitespace).
fn present_keys(
    secrets: &BTreeMap<String, BTreeMap<String, Vec<u8>>>,
) -> BTreeMap<String, BTreeSet<String>> {
    secrets
        .iter()
        .map(|(name, data)| {
            let keys = data
                .iter()
                .filter(|(_, v)| !v.iter().all(u8::is_ascii_whitespace))
                .map(|(k, _)| k.clone())
                .collect();
            (name.clone(), keys)
        })
        .collect()
}

/// Backends probing has not seen yet (a new leader, a restart) start from what status says, so
/// that decisions survive a hand-over instead of flapping back to backends known to fail.
fn seed_from_status(routes: &[LLMRoute], facts: &mut Facts) -> Vec<(String, HealthView)> {
    let ms = |t: &Option<Time>| t.as_ref().map(|t| t.0.as_millisecond().max(0) as u64);
    let mut seeds = Vec::new();
    for route in routes {
        let Some(status) = &route.status else {
            continue;
        };
        for b in &route.spec.backends {
            let key = crate::policy::probe_key(route, b);
            if facts.health.get(&key).is_some_and(|v| v.last.is_some()) {
                continue;
            }
            let Some(view) = status
                .backends
                .iter()
                .find(|s| s.name == b.name)
                .and_then(|s| {
                    HealthView::from_status(
                        &s.state,
                        ms(&s.last_probe_time),
                        ms(&s.last_transition_time),
                        s.last_probe_latency_ms,
                        s.message.as_deref(),
                    )
                })
            else {
                continue;
            };
            facts.health.insert(key.clone(), view.clone());
            seeds.push((key, view));
        }
    }
    seeds
}

/// What to probe: every backend the route may use by design and has a key for (an observed
/// failure is exactly what probing must keep watching).
fn probe_targets(
    valid: &[LLMRoute],
    translation: &gateway::Translation,
    secrets: &BTreeMap<String, BTreeMap<String, Vec<u8>>>,
) -> Vec<ProbeTarget> {
    let skip = |route: &LLMRoute, i: usize| {
        translation
            .routes
            .iter()
            .find(|o| o.name == route.name_any())
            .and_then(|o| o.decision.backends.get(i))
            .and_then(|b| b.excluded.as_ref())
            // A backend over its budget is not probed either: a chat probe would spend more of it.
            .is_some_and(|e| {
                e.is_by_design() || e.reason.starts_with("Secret") || e.reason == "BudgetExhausted"
            })
    };
    let key_of = |r: &crate::api::SecretKeyRef| {
        secrets
            .get(&r.name)
            .and_then(|data| data.get(&r.key))
            .and_then(|v| String::from_utf8(v.clone()).ok())
            .map(|v| v.trim().to_string())
    };
    crate::probe::targets(valid, key_of, skip)
}

/// Key material: provider keys from the referenced Secrets, route keys kept stable.
fn key_material(translation: &gateway::Translation, facts: &NamespaceFacts) -> KeyMaterial {
    let mut material = KeyMaterial::default();
    for k in &translation.gateway.provider_keys {
        if let Some(v) = facts
            .secrets
            .get(&k.source.name)
            .and_then(|data| data.get(&k.source.key))
        {
            material
                .provider_keys
                .insert(k.entry.clone(), keys::trim(v));
        }
    }
    for r in &translation.routes {
        if let Some(key) = facts.route_keys.get(&r.name) {
            material.route_keys.insert(r.name.clone(), key.clone());
        }
    }
    material
}

/// The configuration for the gateway replicas (xDS): all of it at once, keys included, so no
/// replica ever loads a route whose key or provider key it lacks. A configuration Envoy's API
/// refuses is not served; the replicas keep what they have.
fn configuration(
    facts: &NamespaceFacts,
    ir: crate::gateway::ir::GatewayIr,
    material: &KeyMaterial,
    settings: &Settings,
) -> (Result<Snapshot, Problem>, usize) {
    let mut ads = envoy::ads_config(&ir, settings.envoy, material, settings.upstream_ca);
    let served = ir.routes.len();
    drop(ir);
    for r in &mut ads.routes {
        r.generation = facts
            .routes
            .iter()
            .find(|route| route.name_any() == r.name)
            .and_then(|route| route.meta().generation);
    }
    let ns = &facts.namespace;
    let snapshot =
        Snapshot::next(facts.previous.as_deref(), ads.resources, ads.routes).map_err(|e| {
            Problem::new(
                "InvalidConfiguration",
                format!(
                    "Envoy's API refused the gateway configuration of namespace {ns:?}: {e}; the \
                 gateway keeps serving the configuration published last"
                ),
            )
        });
    (snapshot, served)
}

/// The gateway's objects: its xDS client certificate, bootstrap, Deployment, Service,
/// PodDisruptionBudget and NetworkPolicy.
fn gateway_objects(
    facts: &NamespaceFacts,
    owners: &[OwnerReference],
    settings: &Settings,
) -> GatewayObjects {
    let ns = facts.namespace.as_str();
    let bootstrap = envoy::ads_bootstrap(settings.envoy, settings.xds, ns);
    GatewayObjects {
        xds_secret: objects::xds_secret(ns, &facts.certificate, &facts.ca_pem, owners),
        config_map: objects::config_map(ns, &bootstrap, owners),
        deployment: objects::deployment(
            ns,
            settings.envoy,
            settings.deployment,
            &facts.certificate.not_after.to_string(),
            owners,
        ),
        service: objects::service(ns, owners),
        budget: objects::pod_disruption_budget(ns, owners),
        network_policy: objects::network_policy(ns, settings.operator_namespace, owners),
    }
}

/// A valid route's workload side. Its Secret is written only once the configuration serving it
/// is published.
fn workload(
    route: &LLMRoute,
    ns: &str,
    outcome: &RouteOutcome,
    material: &KeyMaterial,
    publish_error: Option<&Problem>,
) -> Workload {
    let active = outcome.active_backend.as_deref();
    let env = objects::workload_env(route, ns, active, material);
    let secret = (publish_error.is_none() && outcome.programmed.is_ok())
        .then_some(env.as_ref())
        .flatten()
        .and_then(|env| {
            owner_ref(route, true).map(|owner| objects::workload_secret(route, ns, env, owner))
        });
    let rollout = (route.spec.workload_secret.mode == WorkloadMode::Direct)
        .then_some(route.spec.rollout.as_ref())
        .flatten()
        .map(|r| Rollout {
            selector: r.selector.clone(),
            backend: active.unwrap_or_default().to_string(),
        });
    let endpoint = match route.spec.workload_secret.mode {
        WorkloadMode::Gateway => objects::gateway_base_url(ns, &route.name_any()),
        WorkloadMode::Direct => env.map(|e| e.base_url).unwrap_or_default(),
    };
    Workload {
        secret,
        rollout,
        endpoint,
    }
}

/// What the operator saw of the gateway once the configuration was published (see
/// `super::observe::gateway`).
#[derive(Clone, Debug, Default)]
pub struct GatewayFacts {
    /// How each connected replica stands with each route, by route name.
    pub serving: BTreeMap<String, Vec<ReplicaServing>>,
    /// Ready and desired replicas of the gateway Deployment.
    pub ready_replicas: i32,
    pub desired_replicas: i32,
    /// What keeps gateway Pods from running, if anything.
    pub pod_problem: Option<String>,
    /// The xDS server started moments ago: replicas may still be reconnecting.
    pub settling: bool,
}

/// A route's status, and what to tell about its change.
pub struct RouteReport {
    pub status: crate::api::LLMRouteStatus,
    /// Whether the status differs from the stored one (else nothing is written).
    pub changed: bool,
    pub transition: Transition,
}

impl Plan {
    /// The status `route` should have, given what the gateway replicas serve.
    pub fn route_report(&self, route: &LLMRoute, gateway: &GatewayFacts, now: Time) -> RouteReport {
        let name = route.name_any();
        let state = match self.invalid.get(&name) {
            Some(problem) => RouteState::Invalid(problem.clone()),
            None => RouteState::Translated {
                outcome: self
                    .outcomes
                    .iter()
                    .find(|o| o.name == name)
                    .expect("one outcome per valid route"),
                gateway: Box::new(self.gateway_view(route, gateway)),
                endpoint: self
                    .workloads
                    .get(&name)
                    .map(|w| w.endpoint.clone())
                    .unwrap_or_default(),
            },
        };
        let previous = route.status.as_ref();
        let status = status::route_status(&state, route.meta().generation, previous, now);
        RouteReport {
            changed: status::status_changed(previous, &status),
            transition: events::transition(route, previous, &status),
            status,
        }
    }

    fn gateway_view(&self, route: &LLMRoute, gateway: &GatewayFacts) -> GatewayView {
        GatewayView {
            publish_error: self.publish_error.clone(),
            generation: route.meta().generation,
            replicas: gateway
                .serving
                .get(&route.name_any())
                .cloned()
                .unwrap_or_default(),
            ready_replicas: gateway.ready_replicas,
            desired_replicas: gateway.desired_replicas,
            pod_problem: gateway.pod_problem.clone(),
            settling: gateway.settling,
            previous: route
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == status::PROGRAMMED))
                .filter(|c| c.observed_generation == route.meta().generation)
                .cloned(),
        }
    }

    /// When to look at the namespace again: a decision that changes by itself, the certificate's
    /// renewal, replicas still settling (see [`status::programmed`]).
    pub fn requeue_after(&self, gateway: &GatewayFacts) -> Duration {
        let by_time = self.recheck_at_ms.map(|at| {
            Duration::from_millis(at.saturating_sub(self.now_ms)) + Duration::from_millis(50)
        });
        let now_s = (self.now_ms / 1000) as i64;
        let renew = Duration::from_secs((self.renew_at - now_s).max(60) as u64);
        let settle = gateway
            .serving
            .values()
            .flatten()
            .any(|r| r.fresh)
            .then_some(crate::xds::server::FRESH)
            .or(gateway
                .settling
                .then_some(crate::xds::server::RECONNECT_GRACE));
        [Some(renew), by_time, settle]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(renew)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendStatus, LLMRouteStatus};

    /// A route with two backends whose keys are in Secret `keys`.
    fn route(name: &str, mode: &str) -> Arc<LLMRoute> {
        let mut r: LLMRoute = serde_yaml_ng::from_str(&format!(
            "apiVersion: llmroute.io/v1alpha1\nkind: LLMRoute\n\
             metadata: {{name: {name}, namespace: team, uid: uid-{name}, generation: 3}}\n\
             spec:\n  defaultModel: chat\n  workloadSecret: {{name: {name}-llm, mode: {mode}}}\n  backends:\n\
             \x20 - {{name: zhipu, provider: zhipu, priority: 1, credentialsSecretRef: {{name: keys, key: zhipu}}, models: {{chat: glm-4-flash}}}}\n\
             \x20 - {{name: deepseek, provider: deepseek, priority: 2, credentialsSecretRef: {{name: keys, key: deepseek}}, models: {{chat: deepseek-chat}}}}\n"
        ))
        .unwrap();
        r.metadata.uid = Some(format!("uid-{name}"));
        Arc::new(r)
    }

    fn facts(routes: Vec<Arc<LLMRoute>>, keys: &[(&str, &str)]) -> NamespaceFacts {
        let data = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        NamespaceFacts {
            namespace: "team".into(),
            route_keys: routes
                .iter()
                .map(|r| (r.name_any(), format!("sk-llmroute-{}", r.name_any())))
                .collect(),
            routes,
            secrets: BTreeMap::from([("keys".to_string(), data)]),
            health: BTreeMap::new(),
            usage: BTreeMap::new(),
            usage_unknown: None,
            now_ms: 1_800_000_000_000,
            certificate: Pem {
                cert: "CERT".into(),
                key: "KEY".into(),
                not_after: 1_800_000_000 + 90 * 24 * 3600,
            },
            ca_pem: "CA".into(),
            previous: None,
        }
    }

    fn settings<'a>(
        envoy: &'a EnvoyOptions,
        deployment: &'a GatewayDeploymentOptions,
        xds: &'a XdsClient,
    ) -> Settings<'a> {
        Settings {
            default_region: "cn",
            envoy,
            deployment,
            xds,
            upstream_ca: None,
            operator_namespace: "llmroute-system",
        }
    }

    fn decide_for(facts: NamespaceFacts) -> Plan {
        let (envoy, deployment, xds) = Default::default();
        decide(facts, &settings(&envoy, &deployment, &xds))
    }

    /// One ready replica that serves `route`'s current configuration.
    fn served(route: &str) -> GatewayFacts {
        let replica = ReplicaServing {
            node: "gw-a".into(),
            serving: crate::xds::delta::Serving::Current,
            fresh: false,
        };
        GatewayFacts {
            serving: BTreeMap::from([(route.to_string(), vec![replica])]),
            ready_replicas: 1,
            desired_replicas: 1,
            ..Default::default()
        }
    }

    fn condition<'a>(status: &'a LLMRouteStatus, type_: &str) -> &'a str {
        let c = status.conditions.iter().find(|c| c.type_ == type_);
        c.map(|c| c.reason.as_str()).unwrap_or("missing")
    }

    #[test]
    fn a_served_route_gets_its_objects_configuration_and_workload_secret() {
        let plan = decide_for(facts(
            vec![route("chat", "Gateway")],
            &[("zhipu", "zk"), ("deepseek", "dk")],
        ));
        assert!(plan.invalid.is_empty() && plan.publish_error.is_none());
        let snapshot = plan.configuration.as_ref().expect("a configuration");
        assert_eq!(plan.served_routes, 1);
        assert!(!snapshot.is_empty());
        // Every gateway object is owned by the route, and the Deployment carries the certificate's
        // expiry (a renewal rolls the Pods).
        let o = &plan.objects;
        for owners in [
            &o.config_map.metadata.owner_references,
            &o.deployment.metadata.owner_references,
            &o.xds_secret.metadata.owner_references,
        ] {
            assert_eq!(owners.as_ref().unwrap()[0].uid, "uid-chat");
        }
        let template = o
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref();
        let annotations = template.unwrap().annotations.as_ref().unwrap();
        assert_eq!(
            annotations[objects::CERT_NOT_AFTER_ANNOTATION],
            (1_800_000_000i64 + 90 * 24 * 3600).to_string()
        );
        let w = &plan.workloads["chat"];
        let secret = w.secret.as_ref().expect("a workload Secret");
        assert_eq!(secret.metadata.name.as_deref(), Some("chat-llm"));
        assert_eq!(w.endpoint, objects::gateway_base_url("team", "chat"));
        assert!(w.rollout.is_none());
        // Both backends are probed (each has a key).
        assert_eq!(plan.probes.len(), 2);
        // Renewal when a third of the certificate's life is left.
        assert_eq!(
            plan.renew_at,
            1_800_000_000 + 90 * 24 * 3600 - renew_margin_secs()
        );
    }

    #[test]
    fn a_missing_key_leaves_its_backend_out_but_the_route_served() {
        let plan = decide_for(facts(
            vec![route("chat", "Direct")],
            &[("deepseek", "dk"), ("zhipu", "  \n")],
        ));
        let outcome = &plan.outcomes[0];
        assert!(
            outcome.resolved_refs.is_err(),
            "{:?}",
            outcome.resolved_refs
        );
        assert_eq!(outcome.active_backend.as_deref(), Some("deepseek"));
        // Direct mode: the workload reads the provider's own endpoint; only keyed backends probed.
        let w = &plan.workloads["chat"];
        assert!(w.endpoint.contains("deepseek"), "{}", w.endpoint);
        assert_eq!(plan.probes.len(), 1);
    }

    /// Every backend failing its probes: the gateway still tries them, but the route is not Ready
    /// and says so (it used to say `Ready=True "serving from backend zhipu"`).
    #[test]
    fn a_route_whose_backends_all_fail_their_probes_is_not_ready() {
        let chat = route("chat", "Gateway");
        let mut f = facts(vec![chat.clone()], &[("zhipu", "zk"), ("deepseek", "dk")]);
        let now_ms = f.now_ms;
        for b in &chat.spec.backends {
            let view = crate::policy::health::HealthView::from_status(
                "Unreachable",
                Some(now_ms - 1_000),
                Some(now_ms - 60_000),
                None,
                Some("probe failed: connection refused"),
            )
            .unwrap();
            f.health.insert(crate::policy::probe_key(&chat, b), view);
        }
        let plan = decide_for(f);
        let report = plan.route_report(&chat, &served("chat"), Time(Default::default()));
        let ready = report
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == status::READY)
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", status::NO_HEALTHY_BACKEND)
        );
        assert!(
            ready.message.contains("\"zhipu\"") && ready.message.contains("Unreachable"),
            "{}",
            ready.message
        );
        assert_eq!(
            condition(&report.status, status::DEGRADED),
            status::NO_HEALTHY_BACKEND
        );
        // The gateway still serves from the head of the order.
        assert_eq!(report.status.active_backend.as_deref(), Some("zhipu"));
    }

    /// A missing key is reported even when its backend is left out for another reason (a region
    /// it does not serve): `ResolvedRefs` is about what the spec references.
    #[test]
    fn resolved_refs_names_a_missing_key_of_a_backend_excluded_by_region() {
        let mut chat = (*route("chat", "Gateway")).clone();
        chat.spec.backends[1].regions = Some(vec!["us".into()]);
        let chat = Arc::new(chat);
        let plan = decide_for(facts(vec![chat.clone()], &[("zhipu", "zk")]));
        let outcome = &plan.outcomes[0];
        let problem = outcome.resolved_refs.as_ref().unwrap_err();
        assert_eq!(problem.reason, "SecretKeyNotFound");
        assert!(
            problem.message.contains("\"deepseek\""),
            "{}",
            problem.message
        );
        assert_eq!(outcome.active_backend.as_deref(), Some("zhipu"));
    }

    #[test]
    fn an_invalid_route_is_reported_and_not_served() {
        let mut bad = (*route("bad", "Gateway")).clone();
        bad.spec.backends.clear();
        let plan = decide_for(facts(
            vec![Arc::new(bad.clone()), route("chat", "Gateway")],
            &[("zhipu", "zk"), ("deepseek", "dk")],
        ));
        assert_eq!(plan.invalid["bad"].reason, "InvalidSpec");
        assert_eq!(plan.served_routes, 1);
        assert!(!plan.workloads.contains_key("bad"));
        let report = plan.route_report(&bad, &GatewayFacts::default(), Time(Default::default()));
        assert_eq!(condition(&report.status, status::ACCEPTED), "InvalidSpec");
        assert!(report.changed);
        assert!(
            report
                .transition
                .events
                .iter()
                .any(|e| e.reason == "InvalidSpec")
        );
    }

    #[test]
    fn status_says_what_the_replicas_serve() {
        let chat = route("chat", "Gateway");
        let plan = decide_for(facts(
            vec![chat.clone()],
            &[("zhipu", "zk"), ("deepseek", "dk")],
        ));
        let now = Time(Default::default());
        // No replica connected, none ready: not programmed yet.
        let none = plan.route_report(&chat, &GatewayFacts::default(), now.clone());
        let programmed = |s: &LLMRouteStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == status::PROGRAMMED)
                .map(|c| c.status.clone())
        };
        assert_eq!(programmed(&none.status).as_deref(), Some("False"));
        assert_eq!(none.status.active_backend, None);
        // One ready replica serving it: programmed, on the preferred backend.
        let one = plan.route_report(&chat, &served("chat"), now.clone());
        assert_eq!(programmed(&one.status).as_deref(), Some("True"));
        assert_eq!(one.status.active_backend.as_deref(), Some("zhipu"));
        assert!(
            one.transition
                .events
                .iter()
                .any(|e| e.reason == "Published")
        );
        // Requeue: at the latest when the certificate is renewed.
        let after = plan.requeue_after(&GatewayFacts::default());
        assert!(after <= Duration::from_secs((plan.renew_at - 1_800_000_000) as u64));
    }

    #[test]
    fn a_failover_is_an_event_and_a_metric() {
        let chat = route("chat", "Gateway");
        let previous = LLMRouteStatus {
            active_backend: Some("deepseek".into()),
            backends: vec![BackendStatus {
                name: "deepseek".into(),
                state: "Healthy".into(),
                reason: None,
                message: None,
                last_probe_time: None,
                last_probe_latency_ms: None,
                last_transition_time: None,
            }],
            ..Default::default()
        };
        let mut with_status = (*chat).clone();
        with_status.status = Some(previous);
        let plan = decide_for(facts(
            vec![Arc::new(with_status.clone())],
            &[("zhipu", "zk"), ("deepseek", "dk")],
        ));
        let report = plan.route_report(&with_status, &served("chat"), Time(Default::default()));
        let failover = report.transition.failover.expect("a failover");
        assert_eq!(
            (failover.labels.from.as_str(), failover.labels.to.as_str()),
            ("deepseek", "zhipu")
        );
        assert_eq!(failover.reason, "FailedBack");
        assert!(
            report
                .transition
                .events
                .iter()
                .any(|e| e.reason == "FailedBack")
        );
    }
}
