//! The policy engine: a pure function of a route, the facts known about its backends (Secrets,
//! probe results), the catalog and the clock, deciding which backends are eligible, in what order,
//! and why the others are not. No I/O, no Kubernetes client, no clock of its own: the reconciler and
//! `llmroute render` feed it plain data.

pub mod health;
pub mod order;

use std::collections::{BTreeMap, BTreeSet};

use crate::api::duration_ms;
use crate::api::{Backend, LLMRoute, SecretKeyRef};
use crate::catalog;
use health::{Assessment, HealthView, ProbeRecord, Thresholds, assess};
use order::{RoutePlan, order_by_strategy};

/// What the world looks like to the policy, for one namespace.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Region used when a route has no `spec.region`.
    pub default_region: String,
    /// Secret name → keys present (with a non-empty value). A Secret absent from the map does not exist.
    pub secrets: BTreeMap<String, BTreeSet<String>>,
    /// Probe observations by [`probe_key`]. A backend absent from the map has not been probed.
    pub health: BTreeMap<String, HealthView>,
    /// Usage of each route (by name) and its backends, as counted across the gateway replicas.
    pub usage: BTreeMap<String, crate::usage::ledger::RouteTotals>,
    /// The time of the decision, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// Why the namespace's usage is not known (a replica's counts unread, or the ledger unstored,
    /// twice in a row); None while it is counted.
    pub usage_unknown: Option<String>,
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
    /// When the decision changes with time alone (a cooldown or failback delay ends, a budget
    /// period starts), in milliseconds since the Unix epoch.
    pub recheck_at_ms: Option<u64>,
    /// Why the route's own budget (`spec.policy.budget`) admits no more requests this period.
    pub over_budget: Option<String>,
    /// `BudgetExhausted`, or `UsageUnknown` when the refusal is `onUnknownUsage: Deny`'s.
    pub over_budget_reason: &'static str,
    /// For a route with a budget (its own or a backend's): whether its usage is known, and if not,
    /// why (`UsageStale`). None for a route without budgets.
    pub usage: Option<Result<(), String>>,
    /// Every referenced Secret or key that is missing, whether or not its backend is excluded for
    /// another reason (`ResolvedRefs` says what is missing, not only what is in use).
    pub missing_refs: Vec<Exclusion>,
}

impl Decision {
    /// Referenced Secrets or keys that are missing ([`Decision::missing_refs`]).
    pub fn missing_refs(&self) -> impl Iterator<Item = &Exclusion> {
        self.missing_refs.iter()
    }

    /// The verdict of the backend that serves (the head of the plan), if any.
    pub fn active(&self) -> Option<&BackendVerdict> {
        self.plan.active().map(|i| &self.backends[i])
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
    // Backends taken out because they used their budget.
    let mut spent_backends = Vec::new();
    let usage = facts.usage.get(&kube::ResourceExt::name_any(route));
    let mut recheck = |at: u64| recheck_at_ms = Some(recheck_at_ms.map_or(at, |r: u64| r.min(at)));
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
        if excluded.is_none()
            && let Some(budget) = &b.budget
        {
            let bucket = usage.and_then(|u| u.backends.get(&b.name));
            if let Some((why, resets_at)) = spent(budget, bucket, facts.now_ms) {
                recheck(resets_at);
                spent_backends.push(i);
                excluded = Some(Exclusion {
                    reason: "BudgetExhausted",
                    message: format!("backend {why}"),
                });
            } else if let Some(why) = unknown_usage_denies(budget, facts) {
                spent_backends.push(i);
                excluded = Some(Exclusion {
                    reason: "UsageUnknown",
                    message: format!("backend {why}"),
                });
            }
        }
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
                recheck(until);
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
    let mut over_budget_reason = "BudgetExhausted";
    let mut over_budget = route.spec.policy.budget.as_ref().and_then(|budget| {
        match spent(budget, usage.map(|u| &u.route), facts.now_ms) {
            Some((why, resets_at)) => {
                recheck(resets_at);
                Some(format!("route {why}"))
            }
            None => unknown_usage_denies(budget, facts).map(|why| {
                over_budget_reason = "UsageUnknown";
                format!("route {why}")
            }),
        }
    });
    let budgeted = route.spec.policy.budget.is_some()
        || route.spec.backends.iter().any(|b| b.budget.is_some());
    let usage_known = budgeted.then(|| match &facts.usage_unknown {
        Some(why) => Err(why.clone()),
        None => Ok(()),
    });
    let mut plan = with_last_resorts(route, &usable, &demoted);
    if usable.is_empty() && demoted.is_empty() && !spent_backends.is_empty() {
        // Only budgets stand in the way: the route stays on the gateway and answers 429 (it would
        // otherwise vanish from it, and its clients get a 404 for an unknown route).
        let names: Vec<&str> = spent_backends
            .iter()
            .map(|&i| route.spec.backends[i].name.as_str())
            .collect();
        let unknown = spent_backends.iter().all(|&i| {
            backends[i]
                .excluded
                .as_ref()
                .is_some_and(|e| e.reason == "UsageUnknown")
        });
        over_budget.get_or_insert_with(|| {
            if unknown {
                over_budget_reason = "UsageUnknown";
                format!(
                    "route has no backend whose budget can be held while the usage is unknown ({}: onUnknownUsage: Deny; see the UsageStale condition)",
                    names.join(", ")
                )
            } else {
                format!(
                    "route has no backend left within its budget ({} used theirs; see status.usage)",
                    names.join(", ")
                )
            }
        });
        plan = order_by_strategy(route, &spent_backends);
    }
    if !plan.chains.iter().all(|(_, m)| m.is_empty()) {
        plan.parked = parked;
    }
    let mut missing_refs: Vec<Exclusion> = Vec::new();
    for b in &route.spec.backends {
        let missing = b
            .credentials_secret_ref
            .as_ref()
            .and_then(|r| check_ref(namespace, r, facts));
        if let Some(m) = missing.filter(|m| !missing_refs.contains(m)) {
            missing_refs.push(m);
        }
    }
    Decision {
        region,
        plan,
        preferred: order_by_strategy(route, &allowed).active(),
        backends,
        recheck_at_ms,
        over_budget,
        over_budget_reason,
        usage: usage_known,
        missing_refs,
    }
}

/// Why `budget` refuses requests while the usage is unknown (`onUnknownUsage: Deny`), if it does.
fn unknown_usage_denies(budget: &crate::api::Budget, facts: &Facts) -> Option<String> {
    let why = facts.usage_unknown.as_ref()?;
    (budget.on_unknown_usage == crate::api::UnknownUsage::Deny).then(|| {
        format!(
            "cannot be held to its budget while its usage is unknown (onUnknownUsage: Deny): {why}"
        )
    })
}

/// Whether `bucket` used up `budget` in the period current at `now_ms`: what it used and when the
/// period ends (as a sentence ending the caller's subject) and that end in milliseconds.
pub fn spent(
    budget: &crate::api::Budget,
    bucket: Option<&crate::usage::ledger::Bucket>,
    now_ms: u64,
) -> Option<(String, u64)> {
    let (period, resets_at) = crate::usage::ledger::Period::of(Some(budget)).key(now_ms);
    let used = bucket.map(|b| b.of(&period)).unwrap_or_default();
    let limit_cost = budget.cost.as_deref().and_then(|c| c.parse::<f64>().ok());
    let over_tokens = budget.tokens.filter(|&t| used.tokens >= t);
    let over_cost = limit_cost.filter(|&c| used.cost >= c);
    let what = match (over_tokens, over_cost) {
        (Some(t), _) => format!("used {} of its {t} tokens for {period}", used.tokens),
        (None, Some(_)) => format!(
            "used {:.4} of its cost budget {} for {period}",
            used.cost,
            budget.cost.as_deref().unwrap_or_default()
        ),
        (None, None) => return None,
    };
    let at = k8s_openapi::jiff::Timestamp::from_millisecond(resets_at as i64)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Some((format!("{what}; the budget resets at {at}"), resets_at))
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
mod budget_tests {
    use super::*;
    use crate::usage::ledger::{Bucket, RouteTotals, Totals};

    /// 2026-12-01T10:00:00Z
    const NOW: u64 = 1_796_119_200_000;

    fn route() -> LLMRoute {
        serde_yaml_ng::from_str(
            r#"
apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: { name: chat, namespace: team }
spec:
  region: cn
  policy:
    healthCheck: { enabled: false }
    budget: { tokens: 1000, cost: "5" }
  backends:
    - name: free
      provider: zhipu
      credentialsSecretRef: { name: k, key: free }
      models: { chat: glm-4-flash }
      cost: { input: "0", output: "0" }
      budget: { tokens: 100, period: Day }
    - name: paid
      provider: zhipu
      priority: 1
      credentialsSecretRef: { name: k, key: paid }
      models: { chat: glm-4-plus }
      cost: { input: "5", output: "5" }
"#,
        )
        .unwrap()
    }

    fn facts(free: (&str, u64), route: (&str, u64, f64)) -> Facts {
        let mut f = Facts {
            now_ms: NOW,
            ..Default::default()
        };
        f.secrets
            .insert("k".into(), ["free".to_string(), "paid".to_string()].into());
        let bucket = |period: &str, tokens, cost| Bucket {
            period: period.into(),
            totals: Totals { tokens, cost },
        };
        f.usage.insert(
            "chat".into(),
            RouteTotals {
                route: bucket(route.0, route.1, route.2),
                backends: [("free".to_string(), bucket(free.0, free.1, 0.0))].into(),
            },
        );
        f
    }

    fn active(d: &Decision, r: &LLMRoute) -> Option<String> {
        d.plan.active().map(|i| r.spec.backends[i].name.clone())
    }

    #[test]
    fn a_spent_backend_is_taken_out_until_its_period_ends() {
        let r = route();
        let d = decide(&r, "team", &facts(("2026-12-01", 99), ("2026-12", 99, 0.0)));
        assert_eq!(active(&d, &r).as_deref(), Some("free"));
        assert_eq!(d.over_budget, None);

        let d = decide(
            &r,
            "team",
            &facts(("2026-12-01", 100), ("2026-12", 100, 0.0)),
        );
        assert_eq!(active(&d, &r).as_deref(), Some("paid"));
        let why = d.backends[0].excluded.as_ref().unwrap();
        assert_eq!(why.reason, "BudgetExhausted");
        assert_eq!(
            why.message,
            "backend used 100 of its 100 tokens for 2026-12-01; the budget resets at 2026-12-02T00:00:00Z"
        );
        // Looked at again when the day ends.
        assert_eq!(d.recheck_at_ms, Some(1_796_169_600_000));

        // Yesterday's count is no longer this period's.
        let d = decide(
            &r,
            "team",
            &facts(("2026-11-30", 500), ("2026-12", 100, 0.0)),
        );
        assert_eq!(active(&d, &r).as_deref(), Some("free"));
    }

    #[test]
    fn a_route_whose_backends_all_spent_their_budgets_stays_and_refuses() {
        let mut r = route();
        r.spec.backends.truncate(1);
        r.spec.policy.budget = None;
        let d = decide(
            &r,
            "team",
            &facts(("2026-12-01", 100), ("2026-12", 100, 0.0)),
        );
        assert_eq!(active(&d, &r).as_deref(), Some("free"));
        assert_eq!(
            d.over_budget.as_deref(),
            Some(
                "route has no backend left within its budget (free used theirs; see status.usage)"
            )
        );
        assert_eq!(
            d.backends[0].excluded.as_ref().unwrap().reason,
            "BudgetExhausted"
        );
    }

    #[test]
    fn a_spent_route_says_so_by_tokens_or_cost() {
        let r = route();
        let d = decide(
            &r,
            "team",
            &facts(("2026-12-01", 0), ("2026-12", 1000, 0.0)),
        );
        assert_eq!(
            d.over_budget.as_deref(),
            Some(
                "route used 1000 of its 1000 tokens for 2026-12; the budget resets at 2027-01-01T00:00:00Z"
            )
        );
        let d = decide(&r, "team", &facts(("2026-12-01", 0), ("2026-12", 10, 5.25)));
        assert!(
            d.over_budget
                .as_deref()
                .unwrap()
                .starts_with("route used 5.2500 of its cost budget 5 for 2026-12"),
            "{:?}",
            d.over_budget
        );
        // Last month's spending does not count.
        let d = decide(
            &r,
            "team",
            &facts(("2026-12-01", 0), ("2026-11", 5000, 99.0)),
        );
        assert_eq!(d.over_budget, None);
    }
}
