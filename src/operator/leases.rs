//! The leader's leases of route token budgets to gateway replicas (docs/design/usage.md,
//! "Admission control"): after each read of a namespace's replicas, each budgeted route's grants
//! ([`crate::usage::lease::grants`]) are sent to every replica whose Envoy reports admission, so
//! that a replica admits a request only while it fits its share of what is left, with no call on
//! the request path.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{LLMRoute, RateLimit};
use crate::usage::lease::{self, Grant, Holding, Lease, RateGrant, Replica};
use crate::usage::ledger::{Period, RouteTotals};

/// Completion tokens written into a request of a budgeted route that sets no limit, by default.
pub const DEFAULT_CAP: u64 = 4096;

/// What the leader knows of one replica's admission: where it is, what it last reported, and the
/// demand (reserved plus refused) per route at the lease before, to weigh shares.
#[derive(Clone, Debug)]
pub struct Known {
    pub addr: SocketAddr,
    pub holding: Holding,
    /// Reserved plus refused per route when the previous lease was computed (this boot).
    pub asked: BTreeMap<String, u64>,
}

/// The routes of a namespace with a `tokens` budget on the whole route: (name, tokens, cap, period).
fn budgeted(routes: &[Arc<LLMRoute>]) -> Vec<(String, u64, u64, Period)> {
    routes
        .iter()
        .filter_map(|r| {
            let b = r.spec.policy.budget.as_ref()?;
            let tokens = b.tokens?;
            let cap = b.max_completion_tokens.unwrap_or(DEFAULT_CAP);
            Some((r.metadata.name.clone()?, tokens, cap, Period::of(Some(b))))
        })
        .collect()
}

/// The rate limits of a namespace's routes and their backends: (key, limit, cap), keyed by the
/// route's name, or `<route>/<backend>` for a backend's (the module's keys, see
/// `sse-usage/src/admission.rs`). The cap is what a request that sets no completion limit gets
/// written into it: the budget's, else the route limit's, else [`DEFAULT_CAP`].
fn limited(routes: &[Arc<LLMRoute>]) -> Vec<(String, RateLimit, u64)> {
    let mut out = Vec::new();
    for r in routes {
        let Some(name) = r.metadata.name.as_deref() else {
            continue;
        };
        let policy = &r.spec.policy;
        let cap = policy
            .budget
            .as_ref()
            .and_then(|b| b.max_completion_tokens)
            .or(policy
                .rate_limit
                .as_ref()
                .and_then(|l| l.max_completion_tokens))
            .unwrap_or(DEFAULT_CAP);
        let own = policy.rate_limit.clone().map(|l| (name.to_string(), l));
        let backends = r.spec.backends.iter().filter_map(|b| {
            let l = b.rate_limit.as_ref()?;
            let limit = RateLimit {
                requests_per_minute: l.requests_per_minute,
                tokens_per_minute: l.tokens_per_minute,
                max_completion_tokens: None,
            };
            Some((format!("{name}/{}", b.name), limit))
        });
        for (key, limit) in own.into_iter().chain(backends) {
            if limit.requests_per_minute.is_some() || limit.tokens_per_minute.is_some() {
                out.push((key, limit, cap));
            }
        }
    }
    out
}

/// The leases of one namespace's replicas (`replicas` by node id), from its routes and its
/// ledger's totals at `now_ms`; updates each replica's `asked`. A replica that reports no
/// admission (no module filter) gets none; one that holds routes no longer budgeted gets a lease
/// without them (they are admitted freely again).
pub fn plan(
    routes: &[Arc<LLMRoute>],
    totals: &dyn Fn(&str) -> Option<RouteTotals>,
    replicas: &mut BTreeMap<String, Known>,
    now_ms: u64,
    interval: Duration,
) -> Vec<(SocketAddr, Lease)> {
    let budgeted = budgeted(routes);
    let limited = limited(routes);
    let mut leases: BTreeMap<String, Lease> = replicas
        .iter()
        .filter(|(_, k)| {
            !budgeted.is_empty()
                || !limited.is_empty()
                || !k.holding.routes.is_empty()
                || !k.holding.rates.is_empty()
        })
        .map(|(node, k)| {
            let lease = Lease {
                boot: k.holding.boot.clone(),
                retry_after: interval.as_secs_f64().ceil().max(1.0) as u64,
                ..Lease::default()
            };
            (node.clone(), lease)
        })
        .collect();
    let nodes: Vec<String> = leases.keys().cloned().collect();
    for (route, limit, cap) in &limited {
        // Demand since the last lease: requests (and tokens) admitted and refused.
        let asked = |k: &Known, kind: &str| -> (u64, u64) {
            let r = k.holding.rates.get(route).copied().unwrap_or_default();
            let now = match kind {
                "requests" => r.requests + r.requests_refused,
                _ => r.tokens.saturating_add(r.tokens_refused),
            };
            let key = format!("@{kind} {route}");
            (
                now,
                now.saturating_sub(k.asked.get(&key).copied().unwrap_or(now)),
            )
        };
        let mut grant: Vec<RateGrant> = vec![
            RateGrant {
                cap: *cap,
                ..RateGrant::default()
            };
            nodes.len()
        ];
        for (kind, limit) in [
            ("requests", limit.requests_per_minute),
            ("tokens", limit.tokens_per_minute),
        ] {
            let Some(limit) = limit else { continue };
            let demand: Vec<u64> = nodes.iter().map(|n| asked(&replicas[n], kind).1).collect();
            for ((n, g), share) in nodes
                .iter()
                .zip(&mut grant)
                .zip(lease::shares(limit, &demand))
            {
                let (now, _) = asked(&replicas[n], kind);
                replicas
                    .get_mut(n)
                    .expect("replica")
                    .asked
                    .insert(format!("@{kind} {route}"), now);
                match kind {
                    "requests" => g.requests_per_minute = share,
                    _ => g.tokens_per_minute = share,
                }
            }
        }
        for (n, g) in nodes.iter().zip(grant) {
            leases
                .get_mut(n)
                .expect("lease")
                .rates
                .insert(route.clone(), g);
        }
    }
    for (route, tokens, cap, period) in &budgeted {
        let (key, resets_ms) = period.key(now_ms);
        let resets_at = k8s_openapi::jiff::Timestamp::from_millisecond(resets_ms as i64)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let counted = totals(route).map_or(0, |t| t.route.of(&key).tokens);
        let nodes: Vec<&String> = leases.keys().collect();
        let parts: Vec<Replica> = nodes
            .iter()
            .map(|node| {
                let k = &replicas[*node];
                let held = k.holding.routes.get(route).copied().unwrap_or_default();
                let asked = held.reserved.saturating_add(held.refused);
                let before = k.asked.get(route).copied().unwrap_or(asked);
                Replica {
                    held,
                    demand: asked.saturating_sub(before),
                }
            })
            .collect();
        let granted = lease::grants(*tokens, counted, &parts);
        let nodes: Vec<String> = nodes.into_iter().cloned().collect();
        for ((node, part), granted) in nodes.iter().zip(&parts).zip(granted) {
            let k = replicas.get_mut(node).expect("replica");
            k.asked.insert(
                route.clone(),
                part.held.reserved.saturating_add(part.held.refused),
            );
            leases.get_mut(node).expect("lease").routes.insert(
                route.clone(),
                Grant {
                    granted,
                    cap: *cap,
                    resets_at: resets_at.clone(),
                },
            );
        }
    }
    leases
        .into_iter()
        .map(|(node, lease)| (replicas[&node].addr, lease))
        .collect()
}

/// Forgets what the leader knew of replicas no longer read (gone, or their Pod's boot changed).
pub fn keep_only(
    replicas: &mut HashMap<String, BTreeMap<String, Known>>,
    alive: &dyn Fn(&str, &str) -> bool,
) {
    for (ns, nodes) in replicas.iter_mut() {
        nodes.retain(|node, _| alive(ns, node));
    }
    replicas.retain(|_, nodes| !nodes.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::lease::Held;

    fn route(name: &str, budget: serde_json::Value) -> Arc<LLMRoute> {
        let mut r: LLMRoute = serde_json::from_value(serde_json::json!({
            "apiVersion": "llmroute.io/v1alpha1", "kind": "LLMRoute",
            "metadata": { "name": name, "namespace": "team" },
            "spec": { "backends": [{ "name": "a", "provider": "deepseek", "secretRef": { "name": "k" }, "models": { "m": "deepseek-chat" } }],
                      "policy": { "budget": budget } }
        }))
        .unwrap();
        r.metadata.namespace = Some("team".into());
        Arc::new(r)
    }

    fn known(port: u16, boot: &str, routes: &[(&str, Held)]) -> Known {
        Known {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            holding: Holding {
                boot: boot.into(),
                routes: routes.iter().map(|(r, h)| (r.to_string(), *h)).collect(),
                rates: BTreeMap::new(),
            },
            asked: BTreeMap::new(),
        }
    }

    #[test]
    fn budgeted_routes_are_leased_to_every_replica_with_admission() {
        let routes = [
            route(
                "chat",
                serde_json::json!({ "tokens": 1000, "maxCompletionTokens": 64 }),
            ),
            route("cost", serde_json::json!({ "cost": "5.00" })),
        ];
        let mut replicas: BTreeMap<String, Known> = [
            ("a".to_string(), known(1, "b1", &[])),
            ("b".to_string(), known(2, "b2", &[])),
        ]
        .into();
        let leases = plan(
            &routes,
            &|_| None,
            &mut replicas,
            0,
            Duration::from_millis(1500),
        );
        assert_eq!(leases.len(), 2);
        let (_, first) = &leases[0];
        assert_eq!((first.boot.as_str(), first.retry_after), ("b1", 2));
        assert_eq!(first.routes.keys().collect::<Vec<_>>(), ["chat"]);
        assert_eq!(
            first.routes["chat"],
            Grant {
                granted: 500,
                cap: 64,
                resets_at: "1970-02-01T00:00:00Z".into()
            }
        );
        // The next round weighs by what each asked since: b reserved 400 and was refused 300.
        replicas.get_mut("b").unwrap().holding.routes.insert(
            "chat".into(),
            Held {
                reserved: 400,
                refused: 300,
                granted: 500,
                settled: 400,
            },
        );
        replicas.get_mut("a").unwrap().holding.routes.insert(
            "chat".into(),
            Held {
                reserved: 0,
                refused: 0,
                granted: 500,
                settled: 0,
            },
        );
        let leases = plan(&routes, &|_| None, &mut replicas, 0, Duration::from_secs(1));
        // Nothing in flight: 1000 available, weights 1 : 701. a is lowered to its target (1) but
        // counted at its unused 500 until it loaded that; b gets the rest: its unused 100 + 400.
        assert_eq!(leases[0].1.routes["chat"].granted, 1);
        assert_eq!(leases[1].1.routes["chat"].granted, 400 + 500);
    }

    #[test]
    fn rate_limits_are_shared_by_demand_with_the_route_s_cap() {
        let routes = [route(
            "chat",
            serde_json::json!({ "maxCompletionTokens": 32, "tokens": 1000000 }),
        )];
        let mut routes = routes.to_vec();
        Arc::make_mut(&mut routes[0]).spec.policy.rate_limit = Some(RateLimit {
            requests_per_minute: Some(60),
            tokens_per_minute: None,
            max_completion_tokens: Some(8),
        });
        let mut replicas: BTreeMap<String, Known> = [
            ("a".to_string(), known(1, "b1", &[])),
            ("b".to_string(), known(2, "b2", &[])),
        ]
        .into();
        let leases = plan(&routes, &|_| None, &mut replicas, 0, Duration::from_secs(1));
        let g = |i: usize| leases[i].1.rates["chat"];
        assert_eq!(
            (g(0).requests_per_minute, g(0).tokens_per_minute, g(0).cap),
            (30, 0, 32)
        );
        // b asked for 99 requests since: it gets nearly all.
        replicas.get_mut("b").unwrap().holding.rates.insert(
            "chat".into(),
            crate::usage::lease::RateHeld {
                requests: 30,
                requests_refused: 69,
                ..Default::default()
            },
        );
        let leases = plan(&routes, &|_| None, &mut replicas, 0, Duration::from_secs(1));
        let g = |i: usize| leases[i].1.rates["chat"].requests_per_minute;
        assert_eq!((g(0), g(1)), (0, 59));
        // A backend's limits are leased under `<route>/<backend>`, shared the same way.
        let spec = &mut Arc::make_mut(&mut routes[0]).spec;
        spec.backends[0].rate_limit = Some(crate::api::BackendRateLimit {
            requests_per_minute: None,
            tokens_per_minute: Some(1000),
        });
        let key = format!("chat/{}", spec.backends[0].name);
        let leases = plan(&routes, &|_| None, &mut replicas, 0, Duration::from_secs(1));
        let g = |i: usize| leases[i].1.rates[&key];
        assert_eq!(
            (g(0).requests_per_minute, g(0).tokens_per_minute, g(0).cap),
            (0, 500, 32)
        );
        assert_eq!(g(0).tokens_per_minute + g(1).tokens_per_minute, 1000);
    }

    #[test]
    fn a_route_whose_budget_went_is_released_and_replicas_without_admission_get_nothing() {
        let routes = [route("chat", serde_json::json!({ "cost": "1" }))];
        let held = Held {
            reserved: 1,
            refused: 0,
            granted: 5,
            settled: 0,
        };
        let mut replicas: BTreeMap<String, Known> = [
            ("a".to_string(), known(1, "b1", &[("chat", held)])),
            ("b".to_string(), known(2, "b2", &[])),
        ]
        .into();
        let leases = plan(
            &routes,
            &|_| None,
            &mut replicas,
            0,
            Duration::from_secs(10),
        );
        assert_eq!(leases.len(), 1);
        assert!(leases[0].1.routes.is_empty());
    }
}
