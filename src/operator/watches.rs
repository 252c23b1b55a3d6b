//! The operator's watches: each kind it reads, cached in a store and streamed as controller
//! triggers. Routes, every Secret a route may reference, the gateway objects it manages, and the
//! gateway Pods (their status only).

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Client, ResourceExt};

use super::context::Caches;
use crate::api::LLMRoute;
use crate::gateway::objects::{GATEWAY_NAME, USAGE_OF_LABEL};

/// A stream of changed objects of one kind.
pub type Changes<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// The caches and the streams of what changes in them.
pub struct Watches {
    pub caches: Caches,
    /// Turns true once the routes' initial list is in their store.
    pub routes_listed: tokio::sync::watch::Receiver<bool>,
    /// The namespace of each deleted route.
    pub deleted: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Routes whose spec, labels or annotations changed, each standing for its namespace.
    pub routes: Changes<LLMRoute>,
    pub secrets: Changes<Secret>,
    pub config_maps: Changes<ConfigMap>,
    pub deployments: Changes<Deployment>,
    pub services: Changes<Service>,
    pub budgets: Changes<PodDisruptionBudget>,
    pub network_policies: Changes<NetworkPolicy>,
    pub pods: Changes<Pod>,
    /// Polled to keep the ledgers' cache current; not a trigger.
    pub ledgers: Changes<ConfigMap>,
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

/// Watches one kind into a store (without managedFields).
fn cached<K>(
    client: &Client,
    namespace: &Option<String>,
    config: watcher::Config,
    modify: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, Changes<K>)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let changes = watcher(api::<K>(client, namespace), config)
        .default_backoff()
        .modify(modify)
        .reflect(writer)
        .touched_objects()
        .boxed();
    (store, changes)
}

/// Starts every watch of the operator (in `namespace`, or all namespaces).
pub fn start(client: &Client, namespace: &Option<String>, ledger_namespace: &str) -> Watches {
    let managed = || watcher::Config::default().labels("app.kubernetes.io/managed-by=llmroute");
    // Secrets: every Secret a route may reference, but not the large kinds no route references.
    let secrets_cfg = watcher::Config::default()
        .fields("type!=kubernetes.io/service-account-token,type!=helm.sh/release.v1,type!=kubernetes.io/dockerconfigjson");
    let (secrets, secret_changes) = cached(client, namespace, secrets_cfg, drop_managed_fields);
    let (config_maps, cm_changes) = cached(client, namespace, managed(), drop_managed_fields);
    let (deployments, dep_changes) = cached(client, namespace, managed(), drop_managed_fields);
    let (services, svc_changes) = cached(client, namespace, managed(), drop_managed_fields);
    let (budgets, pdb_changes) = cached(client, namespace, managed(), drop_managed_fields);
    let (network_policies, netpol_changes) =
        cached(client, namespace, managed(), drop_managed_fields);
    // The gateway's Pods: what keeps them from running goes into the routes' status.
    let pods_cfg =
        watcher::Config::default().labels(&format!("app.kubernetes.io/name={GATEWAY_NAME}"));
    let (pods, pod_changes) = cached(client, namespace, pods_cfg, |pod: &mut Pod| {
        drop_managed_fields(pod);
        // Only the status is read.
        pod.spec = None;
    });
    // The usage ledgers, in the operator's own namespace: read by reconciles, never a trigger.
    let (ledgers, ledger_changes) = cached(
        client,
        &Some(ledger_namespace.to_string()),
        watcher::Config::default().labels(USAGE_OF_LABEL),
        drop_managed_fields,
    );
    let (routes, routes_listed, deleted, route_changes) = route_watch(client, namespace);
    Watches {
        caches: Caches {
            routes,
            secrets,
            config_maps,
            deployments,
            services,
            budgets,
            network_policies,
            pods,
            ledgers,
        },
        routes_listed,
        deleted,
        routes: route_changes,
        secrets: secret_changes,
        config_maps: cm_changes,
        deployments: dep_changes,
        services: svc_changes,
        budgets: pdb_changes,
        network_policies: netpol_changes,
        pods: pod_changes,
        ledgers: ledger_changes,
    }
}

type RouteWatch = (
    Store<LLMRoute>,
    tokio::sync::watch::Receiver<bool>,
    tokio::sync::mpsc::UnboundedReceiver<String>,
    Changes<LLMRoute>,
);

/// The routes' watch. Its initial list is seen here, not through `Store::wait_until_ready` (the
/// controller itself waits on that, and the store's readiness signal wakes only one waiter). A
/// deleted route is no longer in the store the controller reconciles from: its namespace is
/// reconciled through another of its routes (its part of the configuration goes at once).
fn route_watch(client: &Client, namespace: &Option<String>) -> RouteWatch {
    let (routes, writer) = reflector::store::<LLMRoute>();
    let (listed_tx, listed) = tokio::sync::watch::channel(false);
    let (deleted_tx, deleted) = tokio::sync::mpsc::unbounded_channel::<String>();
    let changes = watcher(
        api::<LLMRoute>(client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(drop_managed_fields)
    .reflect(writer)
    .inspect(move |event| match event {
        Ok(watcher::Event::InitDone) => {
            listed_tx.send_replace(true);
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
            super::namespace_route(&routes, &ns).map_or(route, |r| r.as_ref().clone())
        }
    })
    .boxed();
    (routes, listed, deleted, changes)
}
