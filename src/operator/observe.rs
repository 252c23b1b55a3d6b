//! Observe: a namespace as the caches and the operator's memory have it, read into plain values
//! ([`NamespaceFacts`], [`GatewayFacts`]) for the decision. Nothing is written here.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::info;

use super::context::{Context, now_ms, secret_data};
use super::error::Error;
use super::plan::{GatewayFacts, NamespaceFacts, renew_margin_secs};
use crate::api::LLMRoute;
use crate::gateway::objects::{self, GATEWAY_NAME, XDS_SECRET_NAME};
use crate::status;
use crate::xds::tls::Pem;

/// The live routes of `ns` (not being deleted), sorted by name.
pub fn routes(ctx: &Context, ns: &str) -> Vec<Arc<LLMRoute>> {
    let mut routes: Vec<Arc<LLMRoute>> = ctx
        .caches
        .routes
        .state()
        .into_iter()
        .filter(|r| r.namespace().as_deref() == Some(ns) && r.meta().deletion_timestamp.is_none())
        .map(|r| ctx.with_written_status(r))
        .collect();
    routes.sort_by_key(|r| r.name_any());
    routes
}

/// What the decision for `ns` is made from.
pub fn namespace(
    ctx: &Context,
    ns: &str,
    routes: Vec<Arc<LLMRoute>>,
) -> Result<NamespaceFacts, Error> {
    let mut secrets = BTreeMap::new();
    for name in routes
        .iter()
        .flat_map(|r| &r.spec.backends)
        .filter_map(|b| b.credentials_secret_ref.as_ref())
        .map(|s| &s.name)
    {
        if !secrets.contains_key(name)
            && let Some(secret) = ctx.secret(ns, name)
        {
            secrets.insert(name.clone(), secret_data(&secret));
        }
    }
    let route_keys = routes
        .iter()
        .map(|r| (r.name_any(), ctx.route_key(ns, r)))
        .collect();
    Ok(NamespaceFacts {
        namespace: ns.to_string(),
        secrets,
        route_keys,
        health: ctx.prober.health(ns),
        usage: ctx.usage.routes(ns, &ctx.caches.ledgers),
        usage_unknown: ctx.usage.unknown(ns),
        now_ms: ctx.opts.clock.now_ms(),
        certificate: certificate(ctx, ns)?,
        ca_pem: ctx.xds.authority.cert_pem.clone(),
        previous: ctx.xds.server.current(ns),
        routes,
    })
}

/// The namespace's xDS client certificate: the one in its Secret while it was issued by the current
/// CA for this namespace, serves the usage endpoint and has more than a third of its life left, else a new one (written by the act phase).
fn certificate(ctx: &Context, ns: &str) -> Result<Pem, Error> {
    let authority = &ctx.xds.authority;
    let now_s = (now_ms() / 1000) as i64;
    let reusable = ctx.secret(ns, XDS_SECRET_NAME).and_then(|s| {
        let data = secret_data(&s);
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
        let not_after: i64 = s
            .annotations()
            .get(objects::CERT_NOT_AFTER_ANNOTATION)?
            .parse()
            .ok()?;
        let cert = text("tls.crt")?;
        // A certificate of an earlier release cannot serve the usage endpoint: issued again.
        let serves = authority.serves_gateway(&cert, ns, std::time::SystemTime::now());
        (text("ca.crt")? == authority.cert_pem && serves && not_after - renew_margin_secs() > now_s)
            .then(|| Pem {
                cert,
                key: text("tls.key").unwrap_or_default(),
                not_after,
            })
    });
    match reusable {
        Some(p) if !p.cert.is_empty() && !p.key.is_empty() => Ok(p),
        _ => {
            info!(
                namespace = ns,
                "issuing the gateway's xDS client certificate"
            );
            authority
                .issue_gateway(ns, std::time::SystemTime::now())
                .map_err(|e| Error::Certificate(e.to_string()))
        }
    }
}

/// What the gateway replicas serve now, and how its Deployment and Pods stand.
pub fn gateway(ctx: &Context, ns: &str) -> GatewayFacts {
    let (ready_replicas, desired_replicas) = ctx
        .caches
        .deployments
        .get(&ObjectRef::new(GATEWAY_NAME).within(ns))
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
    let pods: Vec<Arc<Pod>> = ctx
        .caches
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .collect();
    GatewayFacts {
        serving: ctx.xds.server.route_serving(ns),
        ready_replicas,
        desired_replicas,
        pod_problem: status::gateway_pod_problem(pods.iter().map(|p| p.as_ref())),
        settling: ctx.xds.server.settling(),
    }
}
