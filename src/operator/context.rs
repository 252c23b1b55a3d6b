//! What the operator's tasks share: the caches, the clients, the prober, the xDS server, and the
//! little the operator keeps in memory (route keys, usage ledgers). Nothing here decides anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tracing::warn;

use super::Options;
use super::apply::WriteCounter;
use super::xds::XdsSetup;
use crate::api::LLMRoute;
use crate::gateway::objects::{self, USAGE_LEDGER_KEY};
use crate::probe::Prober;
use crate::usage::ledger::{Ledger, RouteTotals};

/// The caches a reconcile reads from.
pub struct Caches {
    pub routes: Store<LLMRoute>,
    pub secrets: Store<Secret>,
    pub config_maps: Store<ConfigMap>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub budgets: Store<PodDisruptionBudget>,
    pub network_policies: Store<NetworkPolicy>,
    /// The gateways' Pods (status only).
    pub pods: Store<Pod>,
    /// The usage ledgers' shards, in the operator's namespace.
    pub ledgers: Store<ConfigMap>,
}

/// Shared state of the reconciler.
pub struct Context {
    pub client: Client,
    pub caches: Caches,
    pub opts: Options,
    pub recorder: Recorder,
    pub writes: Arc<WriteCounter>,
    pub prober: Prober,
    /// The xDS server the gateways get their configuration from.
    pub xds: XdsSetup,
    /// The usage ledgers the leader's collector keeps (budgets, status usage).
    pub usage: Arc<UsageBook>,
    /// Whether every cache has its initial list.
    synced: tokio::sync::watch::Sender<bool>,
    /// One reconciliation per namespace at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Reconciles failed in a row, by namespace (the retry backs off).
    failures: Mutex<HashMap<String, u32>>,
    /// Route keys generated or read, by (namespace, route uid).
    route_keys: Mutex<HashMap<(String, String), String>>,
    /// The status last written for each route (namespace, name), with the `resourceVersion` the
    /// route had when it was read: until the cache shows a newer version, the written status is
    /// the route's (a reconcile right after a write would otherwise report the same transitions
    /// and emit the same events again).
    written_status: Mutex<HashMap<(String, String), WrittenStatus>>,
}

impl Context {
    pub fn new(
        client: Client,
        caches: Caches,
        opts: Options,
        recorder: Recorder,
        writes: Arc<WriteCounter>,
        prober: Prober,
        xds: XdsSetup,
    ) -> Context {
        Context {
            client,
            caches,
            opts,
            recorder,
            writes,
            prober,
            xds,
            usage: Default::default(),
            synced: tokio::sync::watch::Sender::new(false),
            locks: Mutex::default(),
            failures: Default::default(),
            route_keys: Mutex::default(),
            written_status: Mutex::default(),
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
        let c = &self.caches;
        let _ = tokio::join!(
            async move {
                let _ = routes_listed.wait_for(|listed| *listed).await.map(|_| ());
            },
            c.secrets.wait_until_ready(),
            c.config_maps.wait_until_ready(),
            c.deployments.wait_until_ready(),
            c.services.wait_until_ready(),
            c.budgets.wait_until_ready(),
            c.network_policies.wait_until_ready(),
            c.pods.wait_until_ready(),
            c.ledgers.wait_until_ready(),
        );
        self.synced.send_replace(true);
    }

    /// Counts a failed reconcile of `ns` (Ok) or forgets its failures: how many in a row now.
    pub(super) fn record_outcome(&self, ns: &str, ok: bool) -> u32 {
        let mut failures = self.failures.lock().expect("failure counts");
        if ok {
            failures.remove(ns);
            return 0;
        }
        let n = failures.entry(ns.to_string()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    pub(super) fn namespace_lock(&self, ns: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("lock map")
            .entry(ns.to_string())
            .or_default()
            .clone()
    }

    pub(super) fn secret(&self, ns: &str, name: &str) -> Option<Arc<Secret>> {
        self.caches.secrets.get(&ObjectRef::new(name).within(ns))
    }

    /// A route's key: the one its workload Secret holds (Gateway mode), else the one generated
    /// before by this process, else a new one. Kept for the route's life (its uid).
    pub(super) fn route_key(&self, ns: &str, route: &LLMRoute) -> String {
        let id = (ns.to_string(), route.uid().unwrap_or_default());
        let mut cache = self.route_keys.lock().expect("route key cache");
        cache
            .entry(id)
            .or_insert_with(|| {
                (route.spec.workload_secret.mode == crate::api::WorkloadMode::Gateway)
                    .then(|| self.secret(ns, &route.workload_secret_name()))
                    .flatten()
                    .and_then(|s| secret_data(&s).remove(objects::ENV_API_KEY))
                    .and_then(|v| String::from_utf8(v).ok())
                    .filter(|k| !k.is_empty())
                    .unwrap_or_else(new_route_key)
            })
            .clone()
    }

    /// What the operator keeps in memory per route (metric series, the route key read or
    /// generated) goes with the route.
    /// `ns` has no route left: nothing of it is probed (a probe spends the provider key's money)
    /// or served over xDS any more, and its route keys are forgotten. Its gateway objects are owned
    /// by the routes: the garbage collector removes them; its usage ledger goes with the collector's
    /// next sweep.
    pub(super) fn forget_namespace(&self, ns: &str) {
        self.prober.sync_namespace(ns, Vec::new());
        self.xds.server.remove(ns);
        self.forget_deleted_routes(ns, &[]);
    }

    /// Remembers the status written for `route` (read at its current `resourceVersion`).
    pub(super) fn status_written(&self, route: &LLMRoute, status: &crate::api::LLMRouteStatus) {
        let key = (route.namespace().unwrap_or_default(), route.name_any());
        let read_at = route.resource_version();
        self.written_status
            .lock()
            .expect("written statuses")
            .insert(key, (read_at, status.clone()));
    }

    /// `route` as this operator last left it: with the status it wrote, while the cache still
    /// holds the version that status was written over.
    pub(super) fn with_written_status(&self, route: Arc<LLMRoute>) -> Arc<LLMRoute> {
        let key = (route.namespace().unwrap_or_default(), route.name_any());
        let mut written = self.written_status.lock().expect("written statuses");
        match written.get(&key) {
            Some((read_at, status)) if *read_at == route.resource_version() => {
                let mut newer = (*route).clone();
                newer.status = Some(status.clone());
                Arc::new(newer)
            }
            Some(_) => {
                // The cache has caught up (or the route changed since).
                written.remove(&key);
                route
            }
            None => route,
        }
    }

    pub(super) fn forget_deleted_routes(&self, ns: &str, routes: &[Arc<LLMRoute>]) {
        let names: BTreeSet<String> = routes.iter().map(|r| r.name_any()).collect();
        self.written_status
            .lock()
            .expect("written statuses")
            .retain(|(key_ns, name), _| key_ns != ns || names.contains(name));
        self.opts.metrics.retain_routes(ns, &names);
        let uids: BTreeSet<String> = routes.iter().filter_map(|r| r.uid()).collect();
        self.route_keys
            .lock()
            .expect("route key cache")
            .retain(|(key_ns, uid), _| key_ns != ns || uids.contains(uid));
    }
}

/// A status this operator wrote, and the route's `resourceVersion` when it was read.
type WrittenStatus = (Option<String>, crate::api::LLMRouteStatus);

/// A Secret's data, by key.
pub(super) fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .as_ref()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default()
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

/// The period totals the collector keeps, by namespace, shared with the reconciler.
#[derive(Default)]
pub struct UsageBook {
    totals: Mutex<HashMap<String, BTreeMap<String, RouteTotals>>>,
    /// Why a namespace's usage is not known (its counts unread or its ledger unstored for two
    /// intervals), by namespace.
    unknown: Mutex<HashMap<String, String>>,
}

impl UsageBook {
    /// The period totals of `ns`'s routes: the collector's, else those of the ledger's shards in
    /// `cached` (a new leader before its first read).
    pub fn routes(&self, ns: &str, cached: &Store<ConfigMap>) -> BTreeMap<String, RouteTotals> {
        if let Some(t) = self.totals.lock().expect("usage totals").get(ns) {
            return t.clone();
        }
        let mut totals = BTreeMap::new();
        for cm in cached.state() {
            if cm.labels().get(objects::USAGE_OF_LABEL).map(String::as_str) == Some(ns)
                && let Some(ledger) = stored_ledger(&cm)
            {
                totals.extend(ledger.routes);
            }
        }
        totals
    }

    /// Why `ns`'s usage is not known, if it is not.
    pub fn unknown(&self, ns: &str) -> Option<String> {
        self.unknown.lock().expect("usage unknown").get(ns).cloned()
    }

    /// Namespaces whose usage is not known.
    pub(super) fn unknown_namespaces(&self) -> Vec<String> {
        self.unknown
            .lock()
            .expect("usage unknown")
            .keys()
            .cloned()
            .collect()
    }

    /// Sets why `ns`'s usage is not known (None: it is); true when that changed.
    pub(super) fn set_unknown(&self, ns: &str, why: Option<String>) -> bool {
        let mut all = self.unknown.lock().expect("usage unknown");
        let before = all.get(ns).cloned();
        match &why {
            Some(w) => all.insert(ns.to_string(), w.clone()),
            None => all.remove(ns),
        };
        before != why
    }

    pub(super) fn set(&self, ns: &str, totals: Option<BTreeMap<String, RouteTotals>>) {
        let mut all = self.totals.lock().expect("usage totals");
        match totals {
            Some(t) => all.insert(ns.to_string(), t),
            None => all.remove(ns),
        };
    }
}

/// The ledger stored in `cm`, if it has a readable one.
pub(super) fn stored_ledger(cm: &ConfigMap) -> Option<Ledger> {
    let text = cm.data.as_ref()?.get(USAGE_LEDGER_KEY)?;
    serde_json::from_str(text)
        .map_err(|e| warn!(namespace = ?cm.namespace(), error = %e, "unreadable usage ledger: counting starts again"))
        .ok()
}

/// The wall clock, in milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
