//! The reconciler: read (from caches), translate (pure core), apply in the safe order, write status.
//! The unit of work is a namespace: its routes share one gateway.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::Options;
use super::apply::{FIELD_MANAGER, WriteCounter, apply};
use super::xds::XdsSetup;
use crate::api::{LLMRoute, LLMRouteStatus};
use crate::gateway::keys::{self, KeyMaterial};
use crate::gateway::objects::{self, GATEWAY_NAME, XDS_SECRET_NAME};
use crate::gateway::{self, Problem, envoy};
use crate::metrics::{FailoverLabels, NamespaceLabels, ReasonLabels, ResultLabels};
use crate::policy::Facts;
use crate::policy::health::HealthView;
use crate::probe::{self, Prober};
use crate::status::{self, GatewayView, RouteState};
use crate::xds::snapshot::Snapshot;

/// Errors of one reconciliation; they are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("issuing the gateway's xDS certificate: {0}")]
    Certificate(String),
}

impl Error {
    /// A short label for metrics: the API status reason (`Conflict`, `Forbidden`...) or the kind of
    /// failure.
    pub fn reason(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) if !s.reason.is_empty() => s.reason.clone(),
            Error::Kube(kube::Error::Api(s)) => format!("HTTP{}", s.code),
            Error::Kube(_) => "Transport".into(),
            Error::Certificate(_) => "Certificate".into(),
        }
    }
}

/// Shared state of the reconciler.
pub struct Context {
    pub client: Client,
    pub routes: Store<LLMRoute>,
    pub secrets: Store<Secret>,
    pub config_maps: Store<ConfigMap>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub budgets: Store<PodDisruptionBudget>,
    /// The gateways' Pods (status only).
    pub pods: Store<Pod>,
    pub opts: Options,
    pub recorder: Recorder,
    pub writes: Arc<WriteCounter>,
    pub prober: Prober,
    /// The xDS server the gateways get their configuration from.
    pub xds: XdsSetup,
    /// The usage ledgers the leader's collector keeps (budgets, status usage).
    pub usage: Arc<super::usage::UsageBook>,
    /// Whether every cache has its initial list.
    synced: tokio::sync::watch::Sender<bool>,
    /// One reconciliation per namespace at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Route keys generated or read, by (namespace, route uid).
    route_keys: Mutex<HashMap<(String, String), String>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        routes: Store<LLMRoute>,
        secrets: Store<Secret>,
        config_maps: Store<ConfigMap>,
        deployments: Store<Deployment>,
        services: Store<Service>,
        budgets: Store<PodDisruptionBudget>,
        pods: Store<Pod>,
        opts: Options,
        recorder: Recorder,
        writes: Arc<WriteCounter>,
        prober: Prober,
        xds: XdsSetup,
    ) -> Context {
        Context {
            client,
            routes,
            secrets,
            config_maps,
            deployments,
            services,
            budgets,
            pods,
            opts,
            recorder,
            writes,
            prober,
            xds,
            usage: Default::default(),
            synced: tokio::sync::watch::Sender::new(false),
            locks: Mutex::default(),
            route_keys: Mutex::default(),
        }
    }

    /// Waits until every cache has its initial list: reconciling against a partial cache would
    /// rewrite objects that already exist. Any number of reconciles may wait at once (see
    /// [`Context::watch_caches`]).
    pub async fn caches_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Marks the caches synced once every store has its initial list (`routes_listed` says when the
    /// routes' has). Only this task waits on the stores' own readiness signals: kube-runtime's
    /// `Store::wait_until_ready` wakes only the most recent of several concurrent waiters (its
    /// `DelayedInit` polls a oneshot receiver, which keeps one waker), and the controller already
    /// waits on the routes store; two waiters there could leave either asleep until some unrelated
    /// event (reconciles and graceful shutdown hung that way).
    pub async fn watch_caches(&self, mut routes_listed: tokio::sync::watch::Receiver<bool>) {
        let _ = tokio::join!(
            async move {
                let _ = routes_listed.wait_for(|listed| *listed).await.map(|_| ());
            },
            self.secrets.wait_until_ready(),
            self.config_maps.wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.services.wait_until_ready(),
            self.budgets.wait_until_ready(),
            self.pods.wait_until_ready(),
        );
        self.synced.send_replace(true);
    }

    fn namespace_lock(&self, ns: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("lock map")
            .entry(ns.to_string())
            .or_default()
            .clone()
    }

    fn secret(&self, ns: &str, name: &str) -> Option<Arc<Secret>> {
        self.secrets.get(&ObjectRef::new(name).within(ns))
    }
}

fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .as_ref()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default()
}

pub(super) fn owner_ref(route: &LLMRoute, controller: bool) -> Option<OwnerReference> {
    let mut o = route.controller_owner_ref(&())?;
    o.controller = Some(controller);
    o.block_owner_deletion = Some(true);
    Some(o)
}

fn new_route_key() -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    let suffix: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("sk-llmroute-{suffix}")
}

/// Reconciles the namespace of `route`.
pub async fn reconcile(route: Arc<LLMRoute>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.caches_synced().await;
    let ns = route.namespace().unwrap_or_default();
    let lock = ctx.namespace_lock(&ns);
    let _guard = lock.lock().await;
    let started = Instant::now();
    let result = reconcile_namespace(&ns, &ctx).await;
    let m = &ctx.opts.metrics;
    m.reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    m.reconciles
        .get_or_create(&ResultLabels {
            result: if result.is_ok() { "ok" } else { "error" },
        })
        .inc();
    if let Err(e) = &result {
        m.reconcile_errors
            .get_or_create(&ReasonLabels { reason: e.reason() })
            .inc();
    }
    result
}

/// What the operator keeps in memory per route (metric series, the route key read or generated)
/// goes with the route.
fn forget_deleted_routes(ctx: &Context, ns: &str, routes: &[Arc<LLMRoute>]) {
    let names: BTreeSet<String> = routes.iter().map(|r| r.name_any()).collect();
    ctx.opts.metrics.retain_routes(ns, &names);
    let uids: BTreeSet<String> = routes.iter().filter_map(|r| r.uid()).collect();
    ctx.route_keys
        .lock()
        .expect("route key cache")
        .retain(|(key_ns, uid), _| key_ns != ns || uids.contains(uid));
}

async fn reconcile_namespace(ns: &str, ctx: &Context) -> Result<Action, Error> {
    let mut routes: Vec<Arc<LLMRoute>> = ctx
        .routes
        .state()
        .into_iter()
        .filter(|r| r.namespace().as_deref() == Some(ns) && r.meta().deletion_timestamp.is_none())
        .collect();
    routes.sort_by_key(|r| r.name_any());
    forget_deleted_routes(ctx, ns, &routes);
    if routes.is_empty() {
        // The gateway objects are owned by the routes: the garbage collector removes them.
        return Ok(Action::await_change());
    }

    // Validate with the CRD's own rules (a route stored before a rule existed may break one).
    let mut valid = Vec::new();
    let mut invalid = BTreeMap::new();
    for r in &routes {
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

    // Facts: which referenced Secret keys exist (non-empty).
    let mut facts = Facts {
        default_region: ctx.opts.default_region.clone(),
        health: ctx.prober.health(ns),
        usage: ctx.usage.routes(
            ns,
            ctx.config_maps
                .get(&ObjectRef::new(objects::USAGE_LEDGER_NAME).within(ns))
                .as_deref(),
        ),
        now_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        ..Default::default()
    };
    for r in &valid {
        for b in &r.spec.backends {
            if let Some(s) = &b.credentials_secret_ref
                && let Some(secret) = ctx.secret(ns, &s.name)
            {
                let keys = facts.secrets.entry(s.name.clone()).or_default();
                for (k, v) in secret_data(&secret) {
                    if !v.iter().all(u8::is_ascii_whitespace) {
                        keys.insert(k);
                    }
                }
            }
        }
    }
    let seeds = seed_from_status(&valid, &mut facts);
    let translation = gateway::translate(ns, &valid, &facts);

    // What to probe: every backend the route may use by design and has a key for (an observed
    // failure is exactly what probing must keep watching).
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
        ctx.secret(ns, &r.name)
            .and_then(|s| secret_data(&s).remove(&r.key))
            .and_then(|v| String::from_utf8(v).ok())
            .map(|v| v.trim().to_string())
    };
    ctx.prober
        .sync_namespace(ns, probe::targets(&valid, key_of, skip));
    for (key, view) in seeds {
        ctx.prober.seed(ns, &key, view);
    }
    let recheck_at_ms = translation
        .routes
        .iter()
        .filter_map(|o| o.decision.recheck_at_ms)
        .min();

    // Key material: provider keys from the referenced Secrets, route keys kept stable.
    let mut material = KeyMaterial::default();
    for k in &translation.gateway.provider_keys {
        if let Some(v) = ctx
            .secret(ns, &k.source.name)
            .and_then(|s| secret_data(&s).remove(&k.source.key))
        {
            material
                .provider_keys
                .insert(k.entry.clone(), keys::trim(&v));
        }
    }
    for r in &valid {
        material
            .route_keys
            .insert(r.name_any(), route_key(ctx, ns, r));
    }

    // 1. The configuration, to the gateway replicas (xDS): all of it at once, keys included, so no
    //    replica ever loads a route whose key or provider key it lacks. A configuration Envoy's API
    //    refuses is not served; the replicas keep what they have.
    // What is left for the writes below is the routes' outcomes: the gateway's IR, the routes'
    // copies and the configuration's JSON go before the first await (a reconcile waits on the API
    // server for most of its time, up to `--reconcile-concurrency` of them at once).
    let gateway::Translation {
        gateway: ir,
        routes: outcomes,
    } = translation;
    drop(valid);
    let mut ads = envoy::ads_config(
        &ir,
        &ctx.opts.envoy,
        &material,
        ctx.xds.upstream_ca.as_deref(),
    );
    let served_routes = ir.routes.len();
    drop(ir);
    for r in &mut ads.routes {
        r.generation = routes
            .iter()
            .find(|route| route.name_any() == r.name)
            .and_then(|route| route.meta().generation);
    }
    let previous = ctx.xds.server.current(ns);
    let mut publish_error = None;
    let mut changed = false;
    match Snapshot::next(previous.as_deref(), ads.resources, ads.routes) {
        Ok(snapshot) => {
            let (number, resources) = (snapshot.number, snapshot.len());
            changed = ctx.xds.server.publish(ns, snapshot);
            if changed {
                info!(
                    namespace = ns,
                    routes = served_routes,
                    resources,
                    snapshot = number,
                    "published gateway configuration"
                );
                ctx.opts
                    .metrics
                    .config_revisions
                    .get_or_create(&NamespaceLabels {
                        namespace: ns.to_string(),
                    })
                    .inc();
            }
        }
        Err(e) => {
            let problem = Problem::new(
                "InvalidConfiguration",
                format!(
                    "Envoy's API refused the gateway configuration of namespace {ns:?}: {e}; the \
                     gateway keeps serving the configuration published last"
                ),
            );
            warn!(namespace = ns, reason = %problem.reason, "{}", problem.message);
            publish_error = Some(problem);
        }
    }
    let published_at = Instant::now();

    // 2. The gateway's objects: its bootstrap, its xDS client certificate, Deployment, Service and
    //    PodDisruptionBudget.
    let owners: Vec<OwnerReference> = routes.iter().filter_map(|r| owner_ref(r, false)).collect();
    let certificate = gateway_certificate(ctx, ns, &owners).await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let bootstrap = envoy::ads_bootstrap(&ctx.opts.envoy, &ctx.xds.client, ns);
    let desired_cm = objects::config_map(ns, &bootstrap, &owners);
    let current_cm = ctx
        .config_maps
        .get(&ObjectRef::new(GATEWAY_NAME).within(ns));
    apply(
        &config_maps,
        &desired_cm,
        current_cm.as_deref(),
        &["data"],
        &ctx.writes,
    )
    .await?;
    let envoy_opts = &ctx.opts.envoy;
    let deployment = objects::deployment(
        ns,
        envoy_opts,
        &ctx.opts.gateway,
        &certificate.not_after.to_string(),
        &owners,
    );
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let current_deployment = ctx
        .deployments
        .get(&ObjectRef::new(GATEWAY_NAME).within(ns));
    apply(
        &deployments,
        &deployment,
        current_deployment.as_deref(),
        &[],
        &ctx.writes,
    )
    .await?;
    let service = objects::service(ns, &owners);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let current = ctx.services.get(&ObjectRef::new(GATEWAY_NAME).within(ns));
    apply(&services, &service, current.as_deref(), &[], &ctx.writes).await?;
    let budget = objects::pod_disruption_budget(ns, &owners);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let current = ctx.budgets.get(&ObjectRef::new(GATEWAY_NAME).within(ns));
    apply(&budgets, &budget, current.as_deref(), &[], &ctx.writes).await?;

    // 3. A changed configuration: give the connected replicas a moment to load it, so that status
    //    says what they serve rather than "propagating" (their answers trigger a reconcile anyway).
    if changed && !ctx.xds.server.connected(ns).is_empty() {
        ctx.xds.server.settled(ns, SETTLE_LIMIT).await;
        if ctx.xds.server.all_current(ns) {
            ctx.opts
                .metrics
                .xds_propagation
                .observe(published_at.elapsed().as_secs_f64());
        }
    }

    // 4. Workload Secrets, once the configuration serving them is published; 5. status and events.
    // Routes are independent here: write them a few at a time.
    let serving = ctx.xds.server.route_serving(ns);
    let (ready_replicas, desired_replicas) = current_deployment
        .as_deref()
        .map(|d| {
            (
                d.status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0),
                d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            )
        })
        .unwrap_or((0, ctx.opts.gateway.replicas));
    let gateway_pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .collect();
    let pod_problem = status::gateway_pod_problem(gateway_pods.iter().map(|p| p.as_ref()));
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    // At most `STATUS_WRITES` in flight, each built when a slot frees up, so a namespace's routes
    // never hold memory all at once.
    let settling = ctx.xds.server.settling();
    let mut pending = routes.iter();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    loop {
        while in_flight.len() < STATUS_WRITES
            && let Some(route) = pending.next()
        {
            let view = GatewayView {
                publish_error: publish_error.clone(),
                generation: route.meta().generation,
                replicas: serving.get(&route.name_any()).cloned().unwrap_or_default(),
                ready_replicas,
                desired_replicas,
                pod_problem: pod_problem.clone(),
                settling,
                previous: route
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == status::PROGRAMMED))
                    .filter(|c| c.observed_generation == route.meta().generation)
                    .cloned(),
            };
            in_flight.push(write_route(
                ctx,
                ns,
                route,
                &outcomes,
                &material,
                &invalid,
                view,
                &secrets_api,
                now.clone(),
            ));
        }
        match in_flight.next().await {
            Some(written) => written?,
            None => break,
        }
    }

    let by_time = recheck_at_ms.map(|at| {
        Duration::from_millis(at.saturating_sub(facts.now_ms)) + Duration::from_millis(50)
    });
    // The certificate is renewed when a third of its life is left.
    let renew = Duration::from_secs(
        (certificate.not_after - renew_margin_secs() - epoch_now()).max(60) as u64,
    );
    // Replicas still settling (see status::programmed) are looked at again once they have.
    let settle = serving
        .values()
        .flatten()
        .any(|r| r.fresh)
        .then_some(crate::xds::server::FRESH)
        .or(ctx
            .xds
            .server
            .settling()
            .then_some(crate::xds::server::RECONNECT_GRACE));
    let next = [Some(renew), by_time, settle]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(renew);
    Ok(Action::requeue(next))
}

/// Routes of a namespace whose workload Secret and status are written at once.
const STATUS_WRITES: usize = 8;

/// How long a reconcile waits for the connected replicas to load a changed configuration before it
/// writes status.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

fn epoch_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A certificate is renewed when less than this is left of it.
fn renew_margin_secs() -> i64 {
    (crate::xds::tls::CLIENT_VALIDITY.as_secs() / 3) as i64
}

/// The namespace's xDS client certificate: the one in its Secret while it was issued by the current
/// CA and has more than a third of its life left, else a new one (written).
async fn gateway_certificate(
    ctx: &Context,
    ns: &str,
    owners: &[OwnerReference],
) -> Result<crate::xds::tls::Pem, Error> {
    let authority = &ctx.xds.authority;
    let current = ctx.secret(ns, XDS_SECRET_NAME);
    let reusable = current.as_deref().and_then(|s| {
        let data = secret_data(s);
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
        let not_after: i64 = s
            .annotations()
            .get(objects::CERT_NOT_AFTER_ANNOTATION)?
            .parse()
            .ok()?;
        (text("ca.crt")? == authority.cert_pem && not_after - renew_margin_secs() > epoch_now())
            .then(|| crate::xds::tls::Pem {
                cert: text("tls.crt").unwrap_or_default(),
                key: text("tls.key").unwrap_or_default(),
                not_after,
            })
    });
    let pem = match reusable {
        Some(p) if !p.cert.is_empty() && !p.key.is_empty() => p,
        _ => {
            info!(
                namespace = ns,
                "issuing the gateway's xDS client certificate"
            );
            authority
                .issue_gateway(ns, std::time::SystemTime::now())
                .map_err(|e| Error::Certificate(e.to_string()))?
        }
    };
    let desired = objects::xds_secret(ns, &pem, &authority.cert_pem, owners);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    apply(
        &secrets,
        &desired,
        current.as_deref(),
        &["data", "metadata.annotations"],
        &ctx.writes,
    )
    .await?;
    Ok(pem)
}

/// A route's key: the one its workload Secret holds (Gateway mode), else the one generated before
/// by this process, else a new one. Kept for the route's life (its uid).
fn route_key(ctx: &Context, ns: &str, route: &LLMRoute) -> String {
    let id = (ns.to_string(), route.uid().unwrap_or_default());
    let mut cache = ctx.route_keys.lock().expect("route key cache");
    cache
        .entry(id)
        .or_insert_with(|| {
            (route.spec.workload_secret.mode == crate::api::WorkloadMode::Gateway)
                .then(|| ctx.secret(ns, &route.workload_secret_name()))
                .flatten()
                .and_then(|s| secret_data(&s).remove(objects::ENV_API_KEY))
                .and_then(|v| String::from_utf8(v).ok())
                .filter(|k| !k.is_empty())
                .unwrap_or_else(new_route_key)
        })
        .clone()
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

/// Writes one route's workload Secret and status.
#[allow(clippy::too_many_arguments)]
async fn write_route(
    ctx: &Context,
    ns: &str,
    route: &LLMRoute,
    outcomes: &[gateway::RouteOutcome],
    material: &KeyMaterial,
    invalid: &BTreeMap<String, Problem>,
    gateway: GatewayView,
    secrets_api: &Api<Secret>,
    now: Time,
) -> Result<(), Error> {
    let name = route.name_any();
    let state = match invalid.get(&name) {
        Some(problem) => RouteState::Invalid(problem.clone()),
        None => {
            let outcome = outcomes
                .iter()
                .find(|o| o.name == name)
                .expect("one outcome per valid route");
            if gateway.publish_error.is_none()
                && outcome.programmed.is_ok()
                && let Some(env) =
                    objects::workload_env(route, ns, outcome.active_backend.as_deref(), material)
                && let Some(owner) = owner_ref(route, true)
            {
                let desired = objects::workload_secret(route, ns, &env, owner);
                let current = ctx.secret(ns, &route.workload_secret_name());
                let changed = apply(
                    secrets_api,
                    &desired,
                    current.as_deref(),
                    &["data"],
                    &ctx.writes,
                )
                .await?;
                if changed
                    && current.is_some()
                    && route.spec.workload_secret.mode == crate::api::WorkloadMode::Direct
                    && let Some(rollout) = &route.spec.rollout
                {
                    restart_workloads(
                        ctx,
                        ns,
                        route,
                        &rollout.selector,
                        outcome.active_backend.as_deref().unwrap_or_default(),
                    )
                    .await?;
                }
            }
            RouteState::Translated {
                outcome,
                gateway: Box::new(gateway),
                endpoint: match route.spec.workload_secret.mode {
                    crate::api::WorkloadMode::Gateway => objects::gateway_base_url(ns, &name),
                    crate::api::WorkloadMode::Direct => objects::workload_env(
                        route,
                        ns,
                        outcome.active_backend.as_deref(),
                        material,
                    )
                    .map(|e| e.base_url)
                    .unwrap_or_default(),
                },
            }
        }
    };
    write_status(ctx, route, &state, now).await
}

/// The route's per-route metrics: each backend's state and each condition's status.
fn record_route_metrics(ctx: &Context, route: &LLMRoute, new: &LLMRouteStatus) {
    let (ns, name) = (route.namespace().unwrap_or_default(), route.name_any());
    let m = &ctx.opts.metrics;
    for b in &new.backends {
        m.set_backend_state(&ns, &name, &b.name, &b.state);
    }
    m.set_route_conditions(
        &ns,
        &name,
        new.conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str())),
    );
}

async fn write_status(
    ctx: &Context,
    route: &LLMRoute,
    state: &RouteState<'_>,
    now: Time,
) -> Result<(), Error> {
    let previous = route.status.as_ref();
    let new = status::route_status(state, route.meta().generation, previous, now);
    record_route_metrics(ctx, route, &new);
    if !status::status_changed(previous, &new) {
        return Ok(());
    }
    publish_events(ctx, route, previous, &new).await;
    let api: Api<LLMRoute> =
        Api::namespaced(ctx.client.clone(), &route.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "apiVersion": "llmroute.io/v1alpha1", "kind": "LLMRoute", "status": new });
    api.patch_status(
        &route.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.writes.add();
    let changed: Vec<String> = new
        .conditions
        .iter()
        .filter(|c| {
            previous
                .and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_))
                .is_none_or(|o| {
                    o.status != c.status || o.reason != c.reason || o.message != c.message
                })
        })
        .map(|c| format!("{}={} ({})", c.type_, c.status, c.reason))
        .collect();
    tracing::debug!(target: "llmroute::write", kind = "LLMRoute/status", name = %route.name_any(), conditions = ?changed, "applied");
    Ok(())
}

/// Restarts the Deployments `selector` matches (as `kubectl rollout restart` does, through a
/// pod-template annotation), so that workloads reading the Direct-mode Secret as environment
/// variables pick up the new backend.
async fn restart_workloads(
    ctx: &Context,
    ns: &str,
    route: &LLMRoute,
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    backend: &str,
) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let selector = objects::selector_string(selector);
    let list = api
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?;
    let at = k8s_openapi::jiff::Timestamp::now().to_string();
    for d in list.items {
        let name = d.name_any();
        let patch = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": name },
            "spec": { "template": { "metadata": { "annotations": {
                objects::RESTARTED_AT_ANNOTATION: at,
                objects::RESTART_REASON_ANNOTATION: format!(
                    "LLMRoute {} switched its workload Secret to backend {backend}",
                    route.name_any()
                ),
            } } } },
        });
        api.patch(
            &name,
            &PatchParams::apply(ROLLOUT_FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        ctx.writes.add();
        info!(namespace = ns, route = %route.name_any(), deployment = %name, backend, "restarted workload for the new backend");
        let event = Event {
            type_: EventType::Normal,
            reason: "WorkloadRestarted".into(),
            note: Some(format!(
                "restarted Deployment {name} to use backend {backend:?} (Direct mode)"
            )),
            action: "Rollout".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &route.object_ref(&())).await {
            warn!(route = %route.name_any(), error = %e, "could not publish event");
        }
    }
    Ok(())
}

/// Field manager of the restart annotations on users' Deployments (kept apart from the objects
/// llmroute owns).
const ROLLOUT_FIELD_MANAGER: &str = "llmroute-rollout";

/// Events for what a user should notice: transitions only, so a steady state emits nothing.
async fn publish_events(
    ctx: &Context,
    route: &LLMRoute,
    previous: Option<&LLMRouteStatus>,
    new: &LLMRouteStatus,
) {
    let old_condition = |t: &str| previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == t));
    let mut events = Vec::new();
    for c in &new.conditions {
        let old = old_condition(&c.type_);
        if old.is_some_and(|o| o.status == c.status && o.reason == c.reason) {
            continue;
        }
        let event = match (c.type_.as_str(), c.status.as_str()) {
            (status::PROGRAMMED, "True") => Some((EventType::Normal, "Published".to_string())),
            (status::ACCEPTED | status::RESOLVED_REFS | status::PROGRAMMED, "False") => {
                Some((EventType::Warning, c.reason.clone()))
            }
            _ => None,
        };
        if let Some((type_, reason)) = event {
            events.push(Event {
                type_,
                reason,
                note: Some(c.message.chars().take(1000).collect()),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
    }
    for b in &new.backends {
        let old = previous.and_then(|p| p.backends.iter().find(|o| o.name == b.name));
        if b.state == "Excluded"
            && old.is_none_or(|o| o.state != "Excluded" || o.reason != b.reason)
        {
            events.push(Event {
                type_: EventType::Warning,
                reason: "BackendExcluded".into(),
                note: Some(format!(
                    "backend {:?}: {}",
                    b.name,
                    b.message.clone().unwrap_or_default()
                )),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
    }
    if let (Some(from), Some(to)) = (
        previous.and_then(|p| p.active_backend.as_deref()),
        new.active_backend.as_deref(),
    ) && from != to
    {
        let degraded = new
            .conditions
            .iter()
            .any(|c| c.type_ == status::DEGRADED && c.status == "True");
        let left = new.backends.iter().find(|b| b.name == from);
        let (reason, why) = if degraded {
            let class = left.map(|b| b.state.clone()).unwrap_or_default();
            let detail = left
                .and_then(|b| b.message.clone())
                .unwrap_or_else(|| "it is no longer eligible".into());
            (
                "FailedOver",
                format!("from backend {from:?} to {to:?}: {from} is {class}: {detail}"),
            )
        } else {
            (
                "FailedBack",
                format!(
                    "from backend {from:?} to the preferred backend {to:?}: {to} is healthy again"
                ),
            )
        };
        let class = if degraded {
            left.map(|b| b.state.clone()).unwrap_or_default()
        } else {
            "FailedBack".into()
        };
        ctx.opts
            .metrics
            .failovers
            .get_or_create(&FailoverLabels {
                namespace: route.namespace().unwrap_or_default(),
                route: route.name_any(),
                from: from.to_string(),
                to: to.to_string(),
                reason: class,
            })
            .inc();
        info!(route = %route.name_any(), namespace = %route.namespace().unwrap_or_default(), %reason, message = %why, "active backend changed");
        events.push(Event {
            type_: if degraded {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(why.chars().take(1000).collect()),
            action: "Failover".into(),
            secondary: None,
        });
    }
    for event in events {
        if let Err(e) = ctx.recorder.publish(&event, &route.object_ref(&())).await {
            warn!(route = %route.name_any(), error = %e, "could not publish event");
        } else {
            ctx.writes.add();
            tracing::debug!(target: "llmroute::write", kind = "Event", reason = %event.reason, name = %route.name_any(), "applied");
        }
    }
}

/// Retry failed reconciliations with a short delay (conflicts, transient API errors).
pub fn error_policy(route: Arc<LLMRoute>, error: &Error, _ctx: Arc<Context>) -> Action {
    // A namespace being deleted takes its routes with it: nothing to retry.
    if let Error::Kube(kube::Error::Api(status)) = error
        && status.code == 403
        && status.message.contains("because it is being terminated")
    {
        tracing::debug!(route = %route.name_any(), "namespace is terminating; not retrying");
        return Action::await_change();
    }
    warn!(route = %route.name_any(), namespace = %route.namespace().unwrap_or_default(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}
