//! `llmroute run`: the operator. Thin glue around the pure core: reflectors feed caches and the
//! controller; the reconciler ([`reconcile`]) translates a namespace and applies the result.

pub mod apply;
pub mod http;
pub mod leader;
pub mod reconcile;
pub mod usage;
pub mod xds;

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::api::LLMRoute;
use crate::gateway::objects::{GATEWAY_NAME, GatewayDeploymentOptions, XDS_SECRET_NAME};
use crate::probe::Prober;
use apply::WriteCounter;
use reconcile::{Context, error_policy, reconcile};

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
    /// Namespaces reconciled at once at most.
    pub reconcile_concurrency: u16,
    /// How backends are probed.
    pub prober: crate::probe::ProberOptions,
    /// How often the leader reads the gateway replicas' usage counts (budgets, status usage);
    /// zero: never.
    pub usage_interval: std::time::Duration,
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
            reconcile_concurrency: RECONCILE_CONCURRENCY,
            prober: Default::default(),
            usage_interval: usage::USAGE_INTERVAL,
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

fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Cached objects do not need their managedFields (often the largest part of small objects).
fn drop_managed_fields<K: kube::Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
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
    let (prober, changes) = match Prober::new(&opts.prober, opts.metrics.clone()) {
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
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=llmroute");
    // Secrets: every Secret a route may reference, but not the large kinds no route references.
    let secrets_cfg = watcher::Config::default()
        .fields("type!=kubernetes.io/service-account-token,type!=helm.sh/release.v1,type!=kubernetes.io/dockerconfigjson");

    let (routes, routes_writer) = reflector::store::<LLMRoute>();
    let (secrets, secrets_writer) = reflector::store::<Secret>();
    let (config_maps, cm_writer) = reflector::store::<ConfigMap>();
    let (deployments, dep_writer) = reflector::store::<Deployment>();
    let (services, svc_writer) = reflector::store::<Service>();
    let (budgets, pdb_writer) = reflector::store::<PodDisruptionBudget>();
    let (pods, pod_writer) = reflector::store::<Pod>();

    // The routes' initial list is seen here, not through `routes.wait_until_ready()`: the controller
    // itself waits on that, and the store's readiness signal wakes only one waiter.
    let (routes_listed_tx, routes_listed) = tokio::sync::watch::channel(false);
    // A deleted route is no longer in the store the controller reconciles from: its namespace is
    // reconciled through another of its routes (its part of the configuration goes at once).
    let (deleted_tx, deleted) = tokio::sync::mpsc::unbounded_channel::<String>();
    let route_stream = watcher(
        api::<LLMRoute>(&client, &opts.namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(drop_managed_fields)
    .reflect(routes_writer)
    .inspect(move |event| match event {
        Ok(watcher::Event::InitDone) => {
            routes_listed_tx.send_replace(true);
        }
        Ok(watcher::Event::Delete(route)) => {
            let _ = deleted_tx.send(route.namespace().unwrap_or_default());
        }
        _ => {}
    })
    .touched_objects()
    // What the operator writes itself (status) changes neither generation, labels nor
    // annotations: its own writes do not wake it.
    .predicate_filter(
        predicates::generation
            .combine(predicates::labels)
            .combine(predicates::annotations),
        Default::default(),
    )
    .map_ok({
        let routes = routes.clone();
        move |route| {
            let ns = route.namespace().unwrap_or_default();
            namespace_route(&routes, &ns).map_or(route, |r| r.as_ref().clone())
        }
    });
    let secret_stream = watcher(api::<Secret>(&client, &opts.namespace), secrets_cfg)
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(secrets_writer)
        .touched_objects();
    let cm_stream = watcher(api::<ConfigMap>(&client, &opts.namespace), managed.clone())
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(cm_writer)
        .touched_objects();
    let dep_stream = watcher(api::<Deployment>(&client, &opts.namespace), managed.clone())
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(dep_writer)
        .touched_objects();
    let svc_stream = watcher(api::<Service>(&client, &opts.namespace), managed.clone())
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(svc_writer)
        .touched_objects();
    let pdb_stream = watcher(
        api::<PodDisruptionBudget>(&client, &opts.namespace),
        managed,
    )
    .default_backoff()
    .modify(drop_managed_fields)
    .reflect(pdb_writer)
    .touched_objects();

    // The gateway's Pods: what keeps them from running goes into the routes' status.
    let pod_stream = watcher(
        api::<Pod>(&client, &opts.namespace),
        watcher::Config::default().labels(&format!("app.kubernetes.io/name={GATEWAY_NAME}")),
    )
    .default_backoff()
    .modify(|pod: &mut Pod| {
        drop_managed_fields(pod);
        // Only the status is read.
        pod.spec = None;
    })
    .reflect(pod_writer)
    .touched_objects();

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "llmroute".into(),
            instance: Some(opts.identity.clone()),
        },
    );
    let ctx = Arc::new(Context::new(
        client.clone(),
        routes.clone(),
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
    ));
    // Usage counts read from the gateway replicas re-reconcile their namespace (status, budgets).
    let (usage_tx, usage_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(usage::collect(
        ctx.clone(),
        usage_tx,
        stopped(stop_rx.clone()),
    ));
    let usage_changed = {
        let routes = routes.clone();
        futures::stream::unfold(usage_rx, |mut rx| async move {
            rx.recv().await.map(|ns| (ns, rx))
        })
        .filter_map(move |ns| std::future::ready(namespace_ref(&routes, &ns)))
    };
    let runtime = ctx.opts.runtime.clone();
    let synced_here = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        use std::sync::atomic::Ordering::SeqCst;
        runtime.scopes.fetch_add(1, SeqCst);
        let (ctx, synced_here) = (ctx.clone(), synced_here.clone());
        tokio::spawn(async move {
            ctx.watch_caches(routes_listed).await;
            ctx.opts.runtime.scopes_synced.fetch_add(1, SeqCst);
            synced_here.store(true, SeqCst);
        });
    }
    // Probe results that matter re-reconcile their namespace (any route of it stands for all).
    let probed = {
        let routes = routes.clone();
        futures::stream::unfold(changes, |mut rx| async move {
            rx.recv().await.map(|ns| (ns, rx))
        })
        .filter_map(move |ns| std::future::ready(namespace_ref(&routes, &ns)))
    };

    let after_deletion = {
        let routes = routes.clone();
        futures::stream::unfold(deleted, |mut rx| async move {
            rx.recv().await.map(|ns| (ns, rx))
        })
        .filter_map(move |ns| std::future::ready(namespace_ref(&routes, &ns)))
    };
    // So does a change of what its gateway replicas serve (connected, acknowledged, rejected).
    let gateways_changed = {
        let routes = routes.clone();
        futures::stream::unfold(gateway_events, |mut rx| async move {
            rx.recv().await.map(|ns| (ns, rx))
        })
        .filter_map(move |ns| std::future::ready(namespace_ref(&routes, &ns)))
    };

    // The gateway's objects and Pods stand for their namespace.
    let gateway_object = {
        let routes = routes.clone();
        move |name: Option<String>, ns: Option<String>| {
            if name.is_some_and(|n| n != GATEWAY_NAME) {
                return None;
            }
            namespace_ref(&routes, &ns?)
        }
    };
    let secret_mapper = {
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
    };
    let (g1, g2, g3, g4, g5) = (
        gateway_object.clone(),
        gateway_object.clone(),
        gateway_object.clone(),
        gateway_object.clone(),
        gateway_object,
    );
    Controller::for_stream(route_stream, routes)
        .reconcile_on(probed)
        .reconcile_on(gateways_changed)
        .reconcile_on(after_deletion)
        .reconcile_on(usage_changed)
        .watches_stream(secret_stream, secret_mapper)
        .watches_stream(cm_stream, move |o: ConfigMap| {
            g1(Some(o.name_any()), o.namespace())
        })
        .watches_stream(dep_stream, move |o: Deployment| {
            g2(Some(o.name_any()), o.namespace())
        })
        .watches_stream(svc_stream, move |o: Service| {
            g3(Some(o.name_any()), o.namespace())
        })
        .watches_stream(pdb_stream, move |o: PodDisruptionBudget| {
            g4(Some(o.name_any()), o.namespace())
        })
        // Every Pod of the stream is a gateway Pod (label selector), whatever its name.
        .watches_stream(pod_stream, move |o: Pod| g5(None, o.namespace()))
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
    {
        use std::sync::atomic::Ordering::SeqCst;
        runtime.scopes.fetch_sub(1, SeqCst);
        if synced_here.load(SeqCst) {
            runtime.scopes_synced.fetch_sub(1, SeqCst);
        }
    }
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
