//! The leader's leases of route token budgets to gateway replicas (docs/design/usage.md,
//! "Admission control"): after each read of a namespace's replicas, each budgeted route's grants
//! ([`crate::usage::lease::grants`]) are sent to every replica whose Envoy reports admission, so
//! that a replica admits a request only while it fits its share of what is left, with no call on
//! the request path.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::api::LLMRoute;
use crate::usage::lease::{self, Grant, Holding, Lease, Replica};
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
    let mut leases: BTreeMap<String, Lease> = replicas
        .iter()
        .filter(|(_, k)| !budgeted.is_empty() || !k.holding.routes.is_empty())
        .map(|(node, k)| {
            let lease = Lease {
                boot: k.holding.boot.clone(),
                retry_after: interval.as_secs_f64().ceil().max(1.0) as u64,
                routes: BTreeMap::new(),
            };
            (node.clone(), lease)
        })
        .collect();
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
