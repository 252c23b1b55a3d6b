//! The translation core: the validated LLMRoutes of one namespace plus plain facts (which Secret
//! keys exist, the default region) → policy decisions → an intermediate model → Envoy files and
//! Kubernetes objects. No I/O and no API client here; the reconciler and `llmroute render` both
//! call [`translate`].

pub mod envoy;
pub mod ir;
pub mod keys;
pub mod objects;
pub mod shapes;

#[cfg(test)]
mod props;

use crate::api::LLMRoute;
use crate::policy::{self, Decision, Facts};
use ir::{GatewayIr, build_gateway, build_route};

/// A condition's verdict: a CamelCase reason and a precise message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: String,
    pub message: String,
}

impl Problem {
    pub fn new(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// What translation concluded for one route.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteOutcome {
    pub name: String,
    /// `Err` when a referenced Secret or key is missing (the backends needing it are left out).
    pub resolved_refs: Result<(), Problem>,
    /// `Err` when the route could not be put on the gateway (for example no eligible backend).
    pub programmed: Result<(), Problem>,
    pub decision: Decision,
    /// The backend that serves first.
    pub active_backend: Option<String>,
    /// `status.usage`: the route's counted usage and what is left of its budgets.
    pub usage: crate::api::UsageStatus,
}

/// The outcome of translating one namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Translation {
    pub gateway: GatewayIr,
    /// One outcome per input route, sorted by name.
    pub routes: Vec<RouteOutcome>,
}

/// Translates the valid routes of `namespace`. Routes that fail schema validation must be left out
/// by the caller (see [`crate::validate`]); they get their own condition there.
pub fn translate(namespace: &str, routes: &[LLMRoute], facts: &Facts) -> Translation {
    let mut programmed = Vec::new();
    let mut outcomes = Vec::new();
    for route in routes {
        let name = kube::ResourceExt::name_any(route);
        let decision = policy::decide(route, namespace, facts);
        let missing: Vec<String> = decision.missing_refs().map(|e| e.message.clone()).collect();
        let resolved_refs = match decision.missing_refs().next() {
            None => Ok(()),
            Some(first) => Err(Problem::new(first.reason, missing.join("; "))),
        };
        let active_backend = decision
            .plan
            .active()
            .map(|i| route.spec.backends[i].name.clone());
        let result = if active_backend.is_none() {
            let why: Vec<String> = decision
                .backends
                .iter()
                .filter_map(|b| {
                    b.excluded
                        .as_ref()
                        .map(|e| format!("{}: {}", b.name, e.message))
                })
                .collect();
            Err(Problem::new(
                "NoEligibleBackend",
                format!(
                    "no backend can serve region {:?}: {}",
                    decision.region,
                    why.join("; ")
                ),
            ))
        } else {
            match build_route(route, &decision.plan) {
                Ok(mut built) => {
                    built.route.over_budget = decision.over_budget.clone();
                    // The preference by design (not health, keys or budgets): which embedding
                    // model a route's vectors come from must not change when a backend fails.
                    let by_design: Vec<usize> = decision
                        .backends
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| b.excluded.as_ref().is_none_or(|e| !e.is_by_design()))
                        .map(|(i, _)| i)
                        .collect();
                    let order = crate::policy::order::order_by_strategy(route, &by_design);
                    let first: Vec<usize> = order
                        .chains
                        .first()
                        .map(|(_, m)| m.clone())
                        .unwrap_or_default();
                    built.route.embedding_family = ir::embedding_family(route, &first);
                    programmed.push(built);
                    Ok(())
                }
                Err(message) => Err(Problem::new("InvalidBackend", message)),
            }
        };
        let usage = crate::usage::ledger::usage_status(route, facts.usage.get(&name), facts.now_ms);
        outcomes.push(RouteOutcome {
            usage,
            name,
            resolved_refs,
            programmed: result,
            decision,
            active_backend,
        });
    }
    outcomes.sort_by(|a, b| a.name.cmp(&b.name));
    Translation {
        gateway: build_gateway(namespace, programmed),
        routes: outcomes,
    }
}
