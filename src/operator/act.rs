//! Act: carry out a namespace's [`Plan`], each kind of write in one place and in a safe order:
//! the prober told what to watch; the configuration published to the gateway replicas (keys
//! included, so no replica loads a route whose key it lacks); the gateway's objects applied; then,
//! once the connected replicas had a moment to load the configuration, each route's workload
//! Secret (only for a configuration that serves it), its status and its events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::apply::{FIELD_MANAGER, apply};
use super::context::Context;
use super::error::Error;
use super::observe;
use super::plan::{GatewayFacts, GatewayObjects, Plan, Rollout, RouteReport};
use crate::api::{LLMRoute, LLMRouteStatus, WorkloadMode};
use crate::gateway::objects::{self, GATEWAY_NAME, XDS_SECRET_NAME};
use crate::metrics::NamespaceLabels;
use crate::xds::snapshot::Snapshot;

/// Routes of a namespace whose workload Secret and status are written at once.
const STATUS_WRITES: usize = 8;

/// How long a reconcile waits for the connected replicas to load a changed configuration before it
/// writes status.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// Field manager of the restart annotations on users' Deployments (kept apart from the objects
/// llmroute owns).
const ROLLOUT_FIELD_MANAGER: &str = "llmroute-rollout";

/// Carries out `plan` for the live `routes` it was decided from; returns when to look again.
pub async fn act(
    ctx: &Context,
    routes: &[Arc<LLMRoute>],
    mut plan: Plan,
) -> Result<Duration, Error> {
    let ns = plan.namespace.clone();
    ctx.prober
        .sync_namespace(&ns, std::mem::take(&mut plan.probes));
    for (key, view) in std::mem::take(&mut plan.seeds) {
        ctx.prober.seed(&ns, &key, view);
    }
    if let Some(problem) = &plan.publish_error {
        warn!(namespace = %ns, reason = %problem.reason, "{}", problem.message);
    }
    let changed = plan
        .configuration
        .take()
        .is_some_and(|snapshot| publish(ctx, &ns, snapshot, plan.served_routes));
    let published_at = Instant::now();
    apply_gateway(ctx, &ns, &plan.objects).await?;
    settle(ctx, &ns, changed, published_at).await;
    let gateway = observe::gateway(ctx, &ns);
    write_routes(ctx, routes, &plan, &gateway).await?;
    Ok(plan.requeue_after(&gateway))
}

/// Publishes the configuration; true when it changed.
fn publish(ctx: &Context, ns: &str, snapshot: Snapshot, routes: usize) -> bool {
    let (number, resources) = (snapshot.number, snapshot.len());
    let changed = ctx.xds.server.publish(ns, snapshot);
    if changed {
        info!(
            namespace = ns,
            routes,
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
    changed
}

/// Applies the gateway's objects, each compared with the cache first (unchanged: not written).
async fn apply_gateway(ctx: &Context, ns: &str, o: &GatewayObjects) -> Result<(), Error> {
    let c = &ctx.caches;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let fields = ["data", "metadata.annotations"];
    let cur = ctx.secret(ns, XDS_SECRET_NAME);
    apply(
        &secrets,
        &o.xds_secret,
        cur.as_deref(),
        &fields,
        &ctx.writes,
    )
    .await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let cur = c.config_maps.get(&ObjectRef::new(GATEWAY_NAME).within(ns));
    apply(
        &config_maps,
        &o.config_map,
        cur.as_deref(),
        &["data"],
        &ctx.writes,
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let cur = c.deployments.get(&ObjectRef::new(GATEWAY_NAME).within(ns));
    apply(
        &deployments,
        &o.deployment,
        cur.as_deref(),
        &[],
        &ctx.writes,
    )
    .await?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let cur = c.services.get(&ObjectRef::new(GATEWAY_NAME).within(ns));
    apply(&services, &o.service, cur.as_deref(), &[], &ctx.writes).await?;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let cur = c.budgets.get(&ObjectRef::new(GATEWAY_NAME).within(ns));
    apply(&budgets, &o.budget, cur.as_deref(), &[], &ctx.writes).await?;
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    let cur = c
        .network_policies
        .get(&ObjectRef::new(GATEWAY_NAME).within(ns));
    apply(
        &policies,
        &o.network_policy,
        cur.as_deref(),
        &[],
        &ctx.writes,
    )
    .await?;
    Ok(())
}

/// A changed configuration: give the connected replicas a moment to load it, so that status says
/// what they serve rather than "propagating" (their answers trigger a reconcile anyway).
async fn settle(ctx: &Context, ns: &str, changed: bool, published_at: Instant) {
    if changed && !ctx.xds.server.connected(ns).is_empty() {
        ctx.xds.server.settled(ns, SETTLE_LIMIT).await;
        if ctx.xds.server.all_current(ns) {
            ctx.opts
                .metrics
                .xds_propagation
                .observe(published_at.elapsed().as_secs_f64());
        }
    }
}

/// Writes each route's workload Secret and status, `STATUS_WRITES` routes at a time (routes are
/// independent here; each write is built when a slot frees up).
async fn write_routes(
    ctx: &Context,
    routes: &[Arc<LLMRoute>],
    plan: &Plan,
    gateway: &GatewayFacts,
) -> Result<(), Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let mut pending = routes.iter();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    loop {
        while in_flight.len() < STATUS_WRITES
            && let Some(route) = pending.next()
        {
            in_flight.push(write_route(
                ctx,
                route,
                plan,
                gateway,
                &secrets,
                now.clone(),
            ));
        }
        match in_flight.next().await {
            Some(written) => written?,
            None => return Ok(()),
        }
    }
}

/// Writes one route's workload Secret (restarting its workloads when it changed and the route
/// asks so), then its status and events.
async fn write_route(
    ctx: &Context,
    route: &LLMRoute,
    plan: &Plan,
    gateway: &GatewayFacts,
    secrets: &Api<Secret>,
    now: Time,
) -> Result<(), Error> {
    let ns = plan.namespace.as_str();
    if let Some(workload) = plan.workloads.get(&route.name_any())
        && let Some(desired) = &workload.secret
    {
        let current = ctx.secret(ns, &route.workload_secret_name());
        let changed = apply(secrets, desired, current.as_deref(), &["data"], &ctx.writes).await?;
        if changed
            && current.is_some()
            && route.spec.workload_secret.mode == WorkloadMode::Direct
            && let Some(rollout) = &workload.rollout
        {
            restart_workloads(ctx, ns, route, rollout).await?;
        }
    }
    let report = plan.route_report(route, gateway, now);
    record_route_metrics(ctx, route, &report.status);
    if report.changed {
        write_status(ctx, route, report).await?;
    }
    Ok(())
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

/// Emits the report's events, then writes the status.
async fn write_status(ctx: &Context, route: &LLMRoute, report: RouteReport) -> Result<(), Error> {
    let RouteReport {
        status: new,
        transition,
        ..
    } = report;
    if let Some(f) = &transition.failover {
        ctx.opts.metrics.failovers.get_or_create(&f.labels).inc();
        info!(route = %route.name_any(), namespace = %route.namespace().unwrap_or_default(), reason = %f.reason, message = %f.message, "active backend changed");
    }
    for event in transition.events {
        emit(ctx, route, &event).await;
    }
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
    ctx.status_written(route, &new);
    let previous = route.status.as_ref();
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

/// Publishes one event about `route` (a failure to is logged, not retried).
async fn emit(ctx: &Context, route: &LLMRoute, event: &Event) {
    if let Err(e) = ctx.recorder.publish(event, &route.object_ref(&())).await {
        warn!(route = %route.name_any(), error = %e, "could not publish event");
    } else {
        ctx.writes.add();
        tracing::debug!(target: "llmroute::write", kind = "Event", reason = %event.reason, name = %route.name_any(), "applied");
    }
}

/// Restarts the Deployments the rollout's selector matches (as `kubectl rollout restart` does,
/// through a pod-template annotation), so that workloads reading the Direct-mode Secret as
/// environment variables pick up the new backend.
async fn restart_workloads(
    ctx: &Context,
    ns: &str,
    route: &LLMRoute,
    rollout: &Rollout,
) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let selector = objects::selector_string(&rollout.selector);
    let list = api
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?;
    let at = k8s_openapi::jiff::Timestamp::now().to_string();
    let backend = rollout.backend.as_str();
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
