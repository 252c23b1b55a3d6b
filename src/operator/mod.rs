//! `llmroute run`: the operator. Thin glue around the pure core: reflectors feed caches and the
//! controller; the reconciler ([`reconcile`]) translates a namespace and applies the result.
//!
//! - [`watches`] and [`context`]: the caches and what the tasks share.
//! - [`reconcile`]: one namespace at a time, in three phases: [`observe`] (caches → plain facts),
//!   [`plan`] (decide, pure: objects, configuration, statuses, [`events`]), [`act`] (apply, publish,
//!   write, emit). [`apply`] is the one place objects are written.
//! - [`usage`]: the leader's usage collector (budgets), [`clock`] the calendar it counts in; [`xds`]: the xDS server's set-up;
//!   [`leader`]: leader election; [`http`]: health and metrics endpoints.
pub mod act;
pub mod apply;
pub mod clock;
pub mod context;
pub mod error;
pub mod events;
pub mod http;
pub mod leader;
pub mod leases;
pub mod observe;
pub mod plan;
pub mod reconcile;
pub mod usage;
pub mod usage_read;
pub mod watches;
pub mod xds;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::api::LLMRoute;
use crate::gateway::objects::{GATEWAY_NAME, GatewayDeploymentOptions, XDS_SECRET_NAME};
use crate::probe::Prober;
use apply::WriteCounter;
use context::Context;
use reconcile::{error_policy, reconcile};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespace to watch; None: all namespaces.
    pub namespace: Option<String>,
    /// Region of routes whose spec has none.
    pub default_region: String,
    /// The gateway Deployment's image and replicas.
    pub gateway: GatewayDeploymentOptions,
    /// The gateway's ports and the CA file it verifies providers with.
    pub envoy: crate::gateway::envoy::EnvoyOptions,
    /// Name of this instance (events, leader election).
    pub identity: String,
    /// The operator's own namespace, where it keeps the usage ledgers (tenants have no access).
    pub ledger_namespace: String,
    /// Namespaces reconciled at once at most.
    pub reconcile_concurrency: u16,
    /// How backends are probed.
    pub prober: crate::probe::ProberOptions,
    /// How often the leader reads the gateway replicas' usage counts (budgets, status usage);
    /// zero: never.
    pub usage_interval: std::time::Duration,
    /// The calendar budget periods are counted in (the wall clock but in tests).
    pub clock: clock::Clock,
    /// Where the operator records its metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Readiness, read by `/readyz`.
    pub runtime: Arc<RuntimeState>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: None,
            default_region: "us".into(),
            gateway: GatewayDeploymentOptions::default(),
            envoy: Default::default(),
            identity: "llmroute".into(),
            ledger_namespace: "llmroute-system".into(),
            reconcile_concurrency: RECONCILE_CONCURRENCY,
            prober: Default::default(),
            usage_interval: usage::USAGE_INTERVAL,
            clock: clock::Clock::system(),
            metrics: Default::default(),
            runtime: Default::default(),
        }
    }
}

/// What `/readyz` reads: the operator is ready when it stands by (another replica leads) or when
/// every controller it runs has synced its caches.
#[derive(Debug, Default)]
pub struct RuntimeState {
    pub leading: std::sync::atomic::AtomicBool,
    pub scopes: std::sync::atomic::AtomicUsize,
    pub scopes_synced: std::sync::atomic::AtomicUsize,
}

impl RuntimeState {
    pub fn ready(&self, leader_election: bool) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let leading = self.leading.load(SeqCst);
        if leader_election && !leading {
            return true;
        }
        let scopes = self.scopes.load(SeqCst);
        scopes > 0 && self.scopes_synced.load(SeqCst) >= scopes
    }
}

/// Routes of a namespace, as controller triggers.
/// The route that stands for its namespace in the controller's queue: the reconciler translates a
/// whole namespace whichever of its routes it is given, so every trigger of a namespace names the
/// same route (the first by name) and the queue merges them into one reconcile.
fn namespace_route(store: &Store<LLMRoute>, ns: &str) -> Option<Arc<LLMRoute>> {
    store
        .state()
        .into_iter()
        .filter(|r| r.namespace().as_deref() == Some(ns))
        .min_by(|a, b| a.name_any().cmp(&b.name_any()))
}

fn namespace_ref(store: &Store<LLMRoute>, ns: &str) -> Option<ObjectRef<LLMRoute>> {
    namespace_route(store, ns).map(|r| ObjectRef::from_obj(r.as_ref()))
}

/// Namespaces reconciled at once by default. A reconcile spends most of its time waiting on the API
/// server (status writes), so a few overlap well; each holds its namespace's configuration meanwhile.
pub const RECONCILE_CONCURRENCY: u16 = 4;

/// A stream of namespaces (each sent when something of it changed) as controller triggers: the
/// route that stands for each.
fn namespace_triggers(
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    routes: Store<LLMRoute>,
) -> impl futures::Stream<Item = ObjectRef<LLMRoute>> + Send + 'static {
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|ns| (ns, rx)) },
    )
    .filter_map(move |ns| std::future::ready(namespace_ref(&routes, &ns)))
}

/// A deleted route's namespace is reconciled through another of its routes; when none is left,
/// nothing can be reconciled (the controller reconciles only routes it holds) and the namespace is
/// forgotten here: its probes stop and its configuration leaves the xDS server.
fn deletion_triggers(
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    routes: Store<LLMRoute>,
    ctx: Arc<Context>,
) -> impl futures::Stream<Item = ObjectRef<LLMRoute>> + Send + 'static {
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|ns| (ns, rx)) },
    )
    .filter_map(move |ns| {
        let next = namespace_ref(&routes, &ns);
        if next.is_none() {
            // After a reconcile still running for it (it would hand the prober its targets again).
            let (ctx, routes) = (ctx.clone(), routes.clone());
            tokio::spawn(async move {
                let lock = ctx.namespace_lock(&ns);
                let _guard = lock.lock().await;
                if namespace_ref(&routes, &ns).is_none() {
                    info!(namespace = %ns, "the namespace's last route is gone: its probes stop and its gateway configuration is withdrawn");
                    ctx.forget_namespace(&ns);
                }
            });
        }
        std::future::ready(next)
    })
}

/// A gateway object (or any gateway Pod: `name` None) stands for its namespace.
fn gateway_trigger(
    routes: &Store<LLMRoute>,
) -> impl Fn(Option<String>, Option<String>) -> Option<ObjectRef<LLMRoute>> + Clone + Send + Sync + 'static
{
    let routes = routes.clone();
    move |name: Option<String>, ns: Option<String>| {
        if name.is_some_and(|n| n != GATEWAY_NAME) {
            return None;
        }
        namespace_ref(&routes, &ns?)
    }
}

/// A Secret stands for its namespace when llmroute owns it or a route of it references it.
fn secret_trigger(
    routes: &Store<LLMRoute>,
) -> impl Fn(Secret) -> Option<ObjectRef<LLMRoute>> + Send + Sync + 'static {
    let routes = routes.clone();
    move |secret: Secret| {
        let ns = secret.namespace().unwrap_or_default();
        let name = secret.name_any();
        let owned = name == XDS_SECRET_NAME
            || secret
                .labels()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str)
                == Some("llmroute");
        let referenced = || {
            routes.state().iter().any(|r| {
                r.namespace().as_deref() == Some(ns.as_str())
                    && r.spec.backends.iter().any(|b| {
                        b.credentials_secret_ref
                            .as_ref()
                            .is_some_and(|s| s.name == name)
                    })
            })
        };
        (owned || referenced())
            .then(|| namespace_ref(&routes, &ns))
            .flatten()
    }
}

/// Counts this controller's scope in `/readyz` until it ends; marks it synced once its caches are.
struct ScopeReadiness {
    runtime: Arc<RuntimeState>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

impl ScopeReadiness {
    fn start(ctx: &Arc<Context>, routes_listed: tokio::sync::watch::Receiver<bool>) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let runtime = ctx.opts.runtime.clone();
        runtime.scopes.fetch_add(1, SeqCst);
        let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ctx, synced_here) = (ctx.clone(), synced.clone());
        tokio::spawn(async move {
            ctx.watch_caches(routes_listed).await;
            ctx.opts.runtime.scopes_synced.fetch_add(1, SeqCst);
            synced_here.store(true, SeqCst);
        });
        ScopeReadiness { runtime, synced }
    }
}

impl Drop for ScopeReadiness {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.runtime.scopes.fetch_sub(1, SeqCst);
        if self.synced.load(SeqCst) {
            self.runtime.scopes_synced.fetch_sub(1, SeqCst);
        }
    }
}

/// Runs the controller until `shutdown` resolves, serving the gateways' configuration through `xds`.
pub async fn run(
    client: Client,
    opts: Options,
    xds: xds::XdsSetup,
    writes: Arc<WriteCounter>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    writes.report_to(opts.metrics.api_writes.clone());
    let gateway_events = xds.server.subscribe();
    let reconcile_concurrency = opts.reconcile_concurrency;
    let (prober, probed) = match Prober::new(&opts.prober, opts.metrics.clone()) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the prober");
            return;
        }
    };
    {
        let prober = prober.clone();
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move { prober.run(stop).await });
    }
    let w = watches::start(&client, &opts.namespace, &opts.ledger_namespace);
    let routes = w.caches.routes.clone();
    let reporter = Reporter {
        controller: "llmroute".into(),
        instance: Some(opts.identity.clone()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let ctx = Arc::new(Context::new(
        client, w.caches, opts, recorder, writes, prober, xds,
    ));
    // Usage counts read from the gateway replicas re-reconcile their namespace (status, budgets).
    let (usage_tx, usage_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let collector = usage::collect(ctx.clone(), usage_tx, stopped(stop_rx.clone()));
    tokio::spawn(collector);
    let _readiness = ScopeReadiness::start(&ctx, w.routes_listed);
    let gateway = gateway_trigger(&routes);
    let (g1, g2, g3, g4, g5, g6) = (
        gateway.clone(),
        gateway.clone(),
        gateway.clone(),
        gateway.clone(),
        gateway.clone(),
        gateway,
    );
    Controller::for_stream(w.routes, routes.clone())
        // Probe results that matter, a change of what its gateway replicas serve (connected,
        // acknowledged, rejected), a deleted route, new usage counts: any route stands for all.
        .reconcile_on(namespace_triggers(probed, routes.clone()))
        .reconcile_on(namespace_triggers(gateway_events, routes.clone()))
        .reconcile_on(deletion_triggers(w.deleted, routes.clone(), ctx.clone()))
        .reconcile_on(namespace_triggers(usage_rx, routes.clone()))
        .watches_stream(w.secrets, secret_trigger(&routes))
        .watches_stream(w.config_maps, move |o: ConfigMap| {
            g1(Some(o.name_any()), o.namespace())
        })
        .watches_stream(w.deployments, move |o: Deployment| {
            g2(Some(o.name_any()), o.namespace())
        })
        .watches_stream(w.services, move |o: Service| {
            g3(Some(o.name_any()), o.namespace())
        })
        .watches_stream(w.budgets, move |o: PodDisruptionBudget| {
            g4(Some(o.name_any()), o.namespace())
        })
        // Every Pod of the stream is a gateway Pod (label selector), whatever its name.
        .watches_stream(w.network_policies, move |o: NetworkPolicy| {
            g6(Some(o.name_any()), o.namespace())
        })
        .watches_stream(w.pods, move |o: Pod| g5(None, o.namespace()))
        // The ledgers' cache is read by reconciles; the collector says when a ledger changed.
        .watches_stream(w.ledgers, |_: ConfigMap| None::<ObjectRef<LLMRoute>>)
        // Bounded: a flood of triggers at start-up (every route of a namespace) must not hold every
        // translation in memory at once; reconciles of one namespace are serialised anyway.
        .with_config(
            kube::runtime::controller::Config::default().concurrency(reconcile_concurrency),
        )
        .graceful_shutdown_on(stopped(stop_rx))
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(route = %obj.name, "reconciled"),
                Err(kube::runtime::controller::Error::ReconcilerFailed(e, obj)) => {
                    warn!(route = %obj.name, error = %e, "reconcile failed")
                }
                Err(e) => warn!(error = %e, "controller"),
            }
        })
        .await;
    info!("controller stopped");
}

/// Runs one controller per namespace in `namespaces` (all namespaces when empty), until `shutdown`.
/// Each namespace has its own watches, so the operator needs no cluster-wide read access when scoped.
pub async fn run_scoped(
    client: Client,
    opts: Options,
    xds: xds::XdsSetup,
    namespaces: Vec<String>,
    writes: Arc<WriteCounter>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let scopes = scopes.into_iter().map(|namespace| {
        let opts = Options {
            namespace,
            ..opts.clone()
        };
        run(
            client.clone(),
            opts,
            xds.clone(),
            writes.clone(),
            stopped(rx.clone()),
        )
    });
    futures::future::join_all(scopes).await;
}

/// Resolves once the watch channel says stop.
async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
