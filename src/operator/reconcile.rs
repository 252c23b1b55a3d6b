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
    if result.is_ok() {
        ctx.record_outcome(&ns, true);
    }
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

/// Retry failed reconciliations (conflicts, transient API errors, a webhook or quota refusing a
/// write), backing off per namespace while they keep failing ([`retry_delay`]).
pub fn error_policy(route: Arc<LLMRoute>, error: &Error, ctx: Arc<Context>) -> Action {
    // A namespace being deleted takes its routes with it: nothing to retry.
    if let Error::Kube(kube::Error::Api(status)) = error
        && status.code == 403
        && status.message.contains("because it is being terminated")
    {
        tracing::debug!(route = %route.name_any(), "namespace is terminating; not retrying");
        return Action::await_change();
    }
    let ns = route.namespace().unwrap_or_default();
    let failures = ctx.record_outcome(&ns, false);
    let delay = retry_delay(failures, rand::random());
    warn!(route = %route.name_any(), namespace = %ns, %error, failures, retry_in_s = delay.as_secs_f64(), "reconcile failed; retrying");
    Action::requeue(delay)
}

/// The first retry after 2 s, each next one twice as late, at most 5 minutes; up to a quarter
/// less at random (`jitter` in [0, 1)), so that namespaces failing together do not retry together.
pub fn retry_delay(failures: u32, jitter: f64) -> Duration {
    const FIRST: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(300);
    let exponent = failures.saturating_sub(1).min(16);
    let full = FIRST.saturating_mul(1 << exponent).min(MAX);
    full.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_five_minutes_with_jitter() {
        let secs = |n, j| retry_delay(n, j).as_secs_f64();
        assert_eq!(secs(1, 0.0), 2.0);
        assert_eq!(secs(2, 0.0), 4.0);
        assert_eq!(secs(5, 0.0), 32.0);
        assert_eq!(secs(9, 0.0), 300.0);
        assert_eq!(secs(u32::MAX, 0.0), 300.0);
        assert!((secs(1, 0.999_999) - 1.5).abs() < 1e-3);
        assert!((secs(9, 0.5) - 262.5).abs() < 1e-6);
        assert_eq!(secs(0, 0.0), 2.0);
    }
}
