//! The policy engine: a pure function of a route, the facts known about its backends and the
//! catalog, deciding which backends are eligible, in what order, and why the others are not.
//! No I/O, no Kubernetes client: the reconciler and `llmroute render` feed it plain data.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{LLMRoute, SecretKeyRef};
use crate::catalog;
use crate::gateway::ir::{RoutePlan, order_by_strategy};

/// What the world looks like to the policy, for one namespace.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Region used when a route has no `spec.region`.
    pub default_region: String,
    /// Secret name → keys present (with a non-empty value). A Secret absent from the map does not exist.
    pub secrets: BTreeMap<String, BTreeSet<String>>,
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
    pub excluded: Option<Exclusion>,
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
    let mut eligible = Vec::new();
    let mut allowed = Vec::new();
    let mut backends = Vec::new();
    for (i, b) in route.spec.backends.iter().enumerate() {
        let excluded = match catalog::provider(&b.provider) {
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
        if excluded.is_none() {
            eligible.push(i);
        }
        if excluded.as_ref().is_none_or(|e| !e.is_by_design()) {
            allowed.push(i);
        }
        backends.push(BackendVerdict {
            name: b.name.clone(),
            excluded,
        });
    }
    Decision {
        region,
        plan: order_by_strategy(route, &eligible),
        preferred: order_by_strategy(route, &allowed).active(),
        backends,
    }
}
