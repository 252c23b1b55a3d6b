//! How a route orders the backends policy lets it use: by priority, by cost, or in weighted
//! chains. The policy engine decides eligibility; this only orders.

use crate::api::{Backend, LLMRoute, Strategy};

/// Which backends a route may use, in which order: the outcome of policy for one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePlan {
    /// Chains as lists of indexes into `spec.backends`, with their weights.
    pub chains: Vec<(u32, Vec<usize>)>,
    /// Backends kept on the gateway although in no chain (taken out by a probe result, e.g. a region
    /// block): their provider account stays programmed, so that removing and restoring them only
    /// reorders chains instead of draining and re-adding listeners and key files.
    pub parked: Vec<usize>,
}

impl RoutePlan {
    /// The backend that serves first (head of the heaviest chain).
    pub fn active(&self) -> Option<usize> {
        self.chains
            .iter()
            .max_by_key(|(w, _)| *w)
            .and_then(|(_, members)| members.first().copied())
    }
}

/// Static ordering of eligible backends by the route's strategy. `eligible` is in `spec.backends`
/// order. The policy engine decides eligibility; this only orders.
pub fn order_by_strategy(route: &LLMRoute, eligible: &[usize]) -> RoutePlan {
    let backends = &route.spec.backends;
    let mut ordered: Vec<usize> = eligible.to_vec();
    match route.spec.policy.strategy {
        Strategy::Failover | Strategy::Weighted => {
            ordered.sort_by_key(|&i| (backends[i].priority, i));
        }
        Strategy::LowestCost => {
            ordered.sort_by(|&a, &b| {
                blended_cost(&backends[a])
                    .total_cmp(&blended_cost(&backends[b]))
                    .then(backends[a].priority.cmp(&backends[b].priority))
                    .then(a.cmp(&b))
            });
        }
    }
    if route.spec.policy.strategy != Strategy::Weighted || ordered.is_empty() {
        return RoutePlan {
            chains: vec![(1, ordered)],
            parked: Vec::new(),
        };
    }
    // Weighted: each backend of the best priority heads a chain with its weight; the rest of the
    // chain is every other eligible backend in priority order.
    let best = backends[ordered[0]].priority;
    let heads: Vec<usize> = ordered
        .iter()
        .copied()
        .filter(|&i| backends[i].priority == best)
        .collect();
    let chains = heads
        .iter()
        .map(|&head| {
            let mut members = vec![head];
            members.extend(ordered.iter().copied().filter(|&i| i != head));
            (backends[head].weight, members)
        })
        .collect();
    RoutePlan {
        chains,
        parked: Vec::new(),
    }
}

/// Cost of a typical chat request mix, per million tokens: three input tokens for each output token.
pub fn blended_cost(backend: &Backend) -> f64 {
    backend
        .cost
        .as_ref()
        .map(|c| {
            let input: f64 = c.input.parse().unwrap_or(f64::MAX / 8.0);
            let output: f64 = c.output.parse().unwrap_or(f64::MAX / 8.0);
            (3.0 * input + output) / 4.0
        })
        .unwrap_or(f64::MAX)
}
