//! The policy engine: a pure function of a route, the facts known about its backends (Secrets,
//! probe results), the catalog and the clock, deciding which backends are eligible, in what order,
//! and why the others are not. No I/O, no Kubernetes client, no clock of its own: the reconciler and
//! `llmroute render` feed it plain data.

pub mod health;

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{Backend, LLMRoute, SecretKeyRef};
use crate::catalog;
use crate::gateway::ir::{RoutePlan, duration_ms, order_by_strategy};
use health::{Assessment, HealthView, ProbeRecord, Thresholds, assess};

/// What the world looks like to the policy, for one namespace.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Region used when a route has no `spec.region`.
    pub default_region: String,
    /// Secret name → keys present (with a non-empty value). A Secret absent from the map does not exist.
    pub secrets: BTreeMap<String, BTreeSet<String>>,
    /// Probe observations by [`probe_key`]. A backend absent from the map has not been probed.
    pub health: BTreeMap<String, HealthView>,
    /// The time of the decision, in milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// The identity of what a probe of `backend` for `route` checks: the provider account (provider,
/// endpoint, credentials) and the probe itself (kind, provider model). Routes sharing all of it
/// share probes and their results.
pub fn probe_key(route: &LLMRoute, backend: &Backend) -> String {
    let hc = &route.spec.policy.health_check;
    let creds = backend
        .credentials_secret_ref
        .as_ref()
        .map(|r| format!("{}/{}", r.name, r.key))
        .unwrap_or_default();
    let api_version = backend
        .azure
        .as_ref()
        .map(|a| a.api_version.as_str())
        .unwrap_or("");
    format!(
        "{}|{}|{}|{}|{:?}|{}",
        backend.provider,
        backend.endpoint.as_deref().unwrap_or(""),
        creds,
        api_version,
        hc.probe,
        probe_model(route, backend)
    )
}

/// The provider model a chat-completion probe of `backend` asks for: `healthCheck.model` when
/// the backend maps it, else the route's `defaultModel` when mapped, else the mapped model whose
/// name marks a low-cost tier (mini, flash, lite, turbo, speed, air, haiku), else the first. A
/// passthrough (`"*"`) mapping probes with the requested logical name or the catalog's first model.
pub fn probe_model(route: &LLMRoute, backend: &Backend) -> String {
    let mapped = |logical: &str| {
        backend.models.get(logical).cloned().or_else(|| {
            backend
                .models
                .contains_key("*")
                .then(|| logical.to_string())
        })
    };
    let hc = &route.spec.policy.health_check;
    if let Some(m) = hc.model.as_deref().and_then(mapped) {
        return m;
    }
    if let Some(m) = route.spec.default_model.as_deref().and_then(mapped) {
        return m;
    }
    const CHEAP: [&str; 7] = ["mini", "flash", "lite", "turbo", "speed", "air", "haiku"];
    let named: Vec<&String> = backend.models.values().filter(|m| *m != "*").collect();
    if let Some(m) = named
        .iter()
        .find(|m| CHEAP.iter().any(|c| m.to_lowercase().contains(c)))
        .or(named.first())
    {
        return m.to_string();
    }
    catalog::provider(&backend.provider)
        .and_then(|p| p.models.first().cloned())
        .unwrap_or_default()
}

/// The route's settings that read probe results.
pub fn thresholds(route: &LLMRoute) -> Thresholds {
    let p = &route.spec.policy;
    Thresholds {
        unhealthy: p.health_check.unhealthy_threshold,
        healthy: p.health_check.healthy_threshold,
        failback_delay_ms: duration_ms(&p.failback.delay).unwrap_or(60_000),
        interval_ms: duration_ms(&p.health_check.interval).unwrap_or(30_000),
        failover_on: p.failover_on.clone(),
    }
}

/// Why a backend is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exclusion {
    /// CamelCase reason: `RegionUnavailable`, `DataResidency`, `SecretNotFound`, `SecretKeyNotFound`.
    pub reason: &'static str,
    pub message: String,
}

impl Exclusion {
    /// Excluded by the route's own rules (region, data residency) rather than by a fault.
    pub fn is_by_design(&self) -> bool {
        matches!(
            self.reason,
            "RegionUnavailable" | "DataResidency" | "UnknownProvider"
        )
    }
}

/// The policy's verdict on one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendVerdict {
    pub name: String,
    /// Not used at all: by the route's rules, a missing key, or an observed region block
    /// (reason `RegionBlocked`).
    pub excluded: Option<Exclusion>,
    /// Used only behind every healthy backend (reason `Unhealthy`, `CoolingDown`, `Recovering`).
    pub demoted: Option<Exclusion>,
    /// `Unknown`, `Healthy` or the class of the last failed probe.
    pub health: &'static str,
    /// The last probe, if any.
    pub last_probe: Option<ProbeRecord>,
    /// When `health` last changed, in milliseconds since the Unix epoch.
    pub health_since_ms: Option<u64>,
}

/// The policy's decision for one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub region: String,
    pub plan: RoutePlan,
    /// The backend that would serve if nothing were failing: the head of the order among backends
    /// allowed by design (region, data residency). Serving from another one is degraded.
    pub preferred: Option<usize>,
    /// One verdict per `spec.backends` entry, in spec order.
    pub backends: Vec<BackendVerdict>,
    /// When the decision changes with time alone (a cooldown or failback delay ends), in
    /// milliseconds since the Unix epoch.
    pub recheck_at_ms: Option<u64>,
}

impl Decision {
    /// Backends excluded because a referenced Secret or key is missing.
    pub fn missing_refs(&self) -> impl Iterator<Item = &Exclusion> {
        self.backends
            .iter()
            .filter_map(|b| b.excluded.as_ref())
            .filter(|e| e.reason == "SecretNotFound" || e.reason == "SecretKeyNotFound")
    }
}

fn check_ref(namespace: &str, r: &SecretKeyRef, facts: &Facts) -> Option<Exclusion> {
    match facts.secrets.get(&r.name) {
        None => Some(Exclusion {
            reason: "SecretNotFound",
            message: format!("secret {:?} not found in namespace {namespace:?}", r.name),
        }),
        Some(keys) if !keys.contains(&r.key) => Some(Exclusion {
            reason: "SecretKeyNotFound",
            message: format!(
                "secret {:?} in namespace {namespace:?} has no key {:?}",
                r.name, r.key
            ),
        }),
        Some(_) => None,
    }
}

/// Decides which backends of `route` are eligible and in what order.
pub fn decide(route: &LLMRoute, namespace: &str, facts: &Facts) -> Decision {
    let region = route
        .spec
        .region
        .clone()
        .unwrap_or_else(|| facts.default_region.clone());
    let residency = route.spec.policy.data_residency.as_deref();
    let thresholds = thresholds(route);
    let mut usable = Vec::new();
    let mut demoted = Vec::new();
    let mut allowed = Vec::new();
    let mut backends = Vec::new();
    let mut recheck_at_ms: Option<u64> = None;
    let mut parked = Vec::new();
    for (i, b) in route.spec.backends.iter().enumerate() {
        let mut excluded = match catalog::provider(&b.provider) {
            None => Some(Exclusion {
                reason: "UnknownProvider",
                message: format!("provider {:?} is not in the catalog", b.provider),
            }),
            Some(p) => {
                let serves = match &b.regions {
                    Some(list) => list.iter().any(|r| r == &region),
                    None => p.serves_region(&region),
                };
                if !serves {
                    Some(Exclusion {
                        reason: "RegionUnavailable",
                        message: format!("provider {} does not serve region {region:?}", p.id),
                    })
                } else if let Some(allowed) = residency.filter(|allowed| !p.hosted_within(allowed))
                {
                    Some(Exclusion {
                        reason: "DataResidency",
                        message: format!(
                            "provider {} processes data in {} but spec.policy.dataResidency allows only {}",
                            p.id,
                            p.hosted_in.join(", "),
                            allowed.join(", ")
                        ),
                    })
                } else {
                    b.credentials_secret_ref
                        .as_ref()
                        .and_then(|r| check_ref(namespace, r, facts))
                }
            }
        };
        if excluded.as_ref().is_none_or(|e| !e.is_by_design()) {
            allowed.push(i);
        }
        let view = route
            .spec
            .policy
            .health_check
            .enabled
            .then(|| facts.health.get(&probe_key(route, b)))
            .flatten();
        let mut demotion = None;
        if excluded.is_none()
            && let Some(view) = view
        {
            let (assessment, until) = assess(view, &thresholds, facts.now_ms);
            if let Some(until) = until {
                recheck_at_ms = Some(recheck_at_ms.map_or(until, |r| r.min(until)));
            }
            match assessment {
                Assessment::Usable => {}
                Assessment::Excluded(class, why) => {
                    parked.push(i);
                    excluded = Some(Exclusion {
                        reason: class.as_str(),
                        message: why,
                    })
                }
                Assessment::Demoted(class, why) => {
                    let reason = if view.failures == 0 {
                        "Recovering"
                    } else if class == crate::api::FailureClass::RateLimited {
                        "CoolingDown"
                    } else {
                        "Unhealthy"
                    };
                    demotion = Some(Exclusion {
                        reason,
                        message: why,
                    })
                }
            }
        }
        if excluded.is_none() {
            if demotion.is_none() {
                usable.push(i);
            } else {
                demoted.push(i);
            }
        }
        backends.push(BackendVerdict {
            name: b.name.clone(),
            excluded,
            demoted: demotion,
            health: view.map(HealthView::state).unwrap_or("Unknown"),
            last_probe: view.and_then(|v| v.last.clone()),
            health_since_ms: view.and_then(|v| v.state_since_ms),
        });
    }
    let mut plan = with_last_resorts(route, &usable, &demoted);
    if !plan.chains.iter().all(|(_, m)| m.is_empty()) {
        plan.parked = parked;
    }
    Decision {
        region,
        plan,
        preferred: order_by_strategy(route, &allowed).active(),
        backends,
        recheck_at_ms,
    }
}

/// The strategy's order of the usable backends, each chain followed by the demoted backends (in
/// the strategy's order) as last resorts. With no usable backend, the demoted ones serve.
fn with_last_resorts(route: &LLMRoute, usable: &[usize], demoted: &[usize]) -> RoutePlan {
    if usable.is_empty() {
        return order_by_strategy(route, demoted);
    }
    let mut plan = order_by_strategy(route, usable);
    if !demoted.is_empty() {
        let tail: Vec<usize> = order_by_strategy(route, demoted)
            .chains
            .into_iter()
            .next()
            .map(|(_, m)| m)
            .unwrap_or_default();
        for (_, members) in &mut plan.chains {
            members.extend(tail.iter().copied());
        }
    }
    plan
}

#[cfg(test)]
mod props;
