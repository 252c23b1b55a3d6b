//! The reconciler of one namespace (its routes share one gateway), in three phases:
//! [`observe`](super::observe) reads the caches into plain facts, [`decide`](super::plan::decide)
//! turns them into a plan without I/O, [`act`](super::act) carries the plan out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::controller::Action;
use tracing::warn;

use super::context::Context;
use super::plan::{self, Settings};
use super::{act, observe};
use crate::api::LLMRoute;
use crate::metrics::{ReasonLabels, ResultLabels};

pub use super::error::Error;

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

async fn reconcile_namespace(ns: &str, ctx: &Context) -> Result<Action, Error> {
    let routes = observe::routes(ctx, ns);
    ctx.forget_deleted_routes(ns, &routes);
    if routes.is_empty() {
        ctx.forget_namespace(ns);
        return Ok(Action::await_change());
    }
    let facts = observe::namespace(ctx, ns, routes.clone())?;
    let settings = Settings {
        default_region: &ctx.opts.default_region,
        envoy: &ctx.opts.envoy,
        deployment: &ctx.opts.gateway,
        xds: &ctx.xds.client,
        upstream_ca: ctx.xds.upstream_ca.as_deref(),
        operator_namespace: &ctx.opts.ledger_namespace,
    };
    // The plan is decided before the first await: a reconcile waits on the API server for most of
    // its time, up to `--reconcile-concurrency` of them at once, holding only the plan meanwhile.
    let plan = plan::decide(facts, &settings);
    let next = act::act(ctx, &routes, plan).await?;
    Ok(Action::requeue(next))
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
