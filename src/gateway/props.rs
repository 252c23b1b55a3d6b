//! Property tests of the policy engine's invariants over random routes and probe histories, and of
//! the routes translation builds from its decisions (here, above both).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::ir::build_route;
use crate::api::{FailureClass, LLMRoute};
use crate::policy::health::{HealthView, ProbeRecord};
use crate::policy::{Facts, decide, probe_key};

const PROVIDERS: [&str; 5] = [
    "openai",
    "zhipu",
    "qianfan",
    "deepseek",
    "openai-compatible",
];
const STRATEGIES: [&str; 3] = ["Failover", "Weighted", "LowestCost"];
const REGIONS: [&str; 3] = ["cn", "us", "hk"];

#[derive(Clone, Debug)]
struct BackendCase {
    provider: usize,
    priority: u32,
    weight: u32,
    cost: u32,
    /// Probe results, oldest first: None healthy, Some(i) failure class ALL[i].
    probes: Vec<Option<usize>>,
    retry_after_s: Option<u64>,
}

#[derive(Clone, Debug)]
struct Case {
    strategy: usize,
    region: usize,
    failover_on: Vec<bool>,
    backends: Vec<BackendCase>,
    now_offset_s: u64,
}

fn backend_case() -> impl Strategy<Value = BackendCase> {
    (
        0..PROVIDERS.len(),
        0u32..3,
        1u32..5,
        1u32..20,
        prop::collection::vec(
            prop::option::weighted(0.5, 0..FailureClass::ALL.len()),
            0..6,
        ),
        prop::option::of(0u64..10),
    )
        .prop_map(
            |(provider, priority, weight, cost, probes, retry_after_s)| BackendCase {
                provider,
                priority,
                weight,
                cost,
                probes,
                retry_after_s,
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..STRATEGIES.len(),
        0..REGIONS.len(),
        prop::collection::vec(any::<bool>(), FailureClass::ALL.len()),
        prop::collection::vec(backend_case(), 1..6),
        0u64..120,
    )
        .prop_map(
            |(strategy, region, failover_on, backends, now_offset_s)| Case {
                strategy,
                region,
                failover_on,
                backends,
                now_offset_s,
            },
        )
}

fn build(case: &Case) -> (LLMRoute, Facts) {
    let failover_on: Vec<&str> = FailureClass::ALL
        .iter()
        .zip(&case.failover_on)
        .filter(|(_, on)| **on)
        .map(|(c, _)| c.as_str())
        .collect();
    let backends: Vec<serde_json::Value> = case
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let provider = PROVIDERS[b.provider];
            let mut v = serde_json::json!({
                "name": format!("b{i}"),
                "provider": provider,
                "credentialsSecretRef": { "name": "keys", "key": format!("k{i}") },
                "models": { "chat": "m" },
                "priority": b.priority,
                "weight": b.weight,
                "cost": { "input": b.cost.to_string(), "output": "1" },
            });
            if provider == "openai-compatible" {
                v["endpoint"] = serde_json::json!(format!("http://llm-{i}.local:8000/v1"));
            }
            v
        })
        .collect();
    let route: LLMRoute = serde_json::from_value(serde_json::json!({
        "apiVersion": "llmroute.io/v1alpha1", "kind": "LLMRoute",
        "metadata": { "name": "r", "namespace": "ns" },
        "spec": {
            "region": REGIONS[case.region],
            "backends": backends,
            "policy": {
                "strategy": STRATEGIES[case.strategy],
                "failoverOn": failover_on,
                "failback": { "delay": "30s" },
                "healthCheck": { "interval": "5s", "healthyThreshold": 2 },
            },
        },
    }))
    .expect("generated route deserializes");
    let mut facts = Facts {
        default_region: "us".into(),
        secrets: BTreeMap::from([(
            "keys".to_string(),
            (0..case.backends.len())
                .map(|i| format!("k{i}"))
                .collect::<BTreeSet<_>>(),
        )]),
        now_ms: 0,
        ..Default::default()
    };
    let mut last = 0;
    for (b, spec) in case.backends.iter().zip(&route.spec.backends) {
        let mut view = HealthView::default();
        for (n, p) in b.probes.iter().enumerate() {
            let at_ms = 1_000_000 + n as u64 * 5_000;
            last = last.max(at_ms);
            view.record(ProbeRecord {
                at_ms,
                latency_ms: 3,
                failure: p.map(|i| FailureClass::ALL[i]),
                message: "probe".into(),
                retry_after_ms: b.retry_after_s.map(|s| s * 1_000),
            });
        }
        if !b.probes.is_empty() {
            facts.health.insert(probe_key(&route, spec), view);
        }
    }
    facts.now_ms = last.max(1_000_000) + case.now_offset_s * 1_000;
    (route, facts)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// No excluded backend is ever in a chain; a demoted backend never serves first while a
    /// usable one exists; every non-excluded backend is in every chain exactly once.
    #[test]
    fn chains_hold_no_excluded_backend_and_healthy_ones_serve_first(case in case()) {
        let (route, facts) = build(&case);
        let d = decide(&route, "ns", &facts);
        let usable: Vec<usize> = d.backends.iter().enumerate()
            .filter(|(_, b)| b.excluded.is_none() && b.demoted.is_none()).map(|(i, _)| i).collect();
        let kept: BTreeSet<usize> = d.backends.iter().enumerate()
            .filter(|(_, b)| b.excluded.is_none()).map(|(i, _)| i).collect();
        for (_, members) in &d.plan.chains {
            let set: BTreeSet<usize> = members.iter().copied().collect();
            prop_assert_eq!(set.len(), members.len(), "a backend repeats in a chain");
            prop_assert_eq!(&set, &kept);
            if !usable.is_empty() {
                prop_assert!(usable.contains(&members[0]), "chain {:?} starts with a demoted backend", members);
                // Demoted backends come after every usable one.
                let first_demoted = members.iter().position(|i| !usable.contains(i)).unwrap_or(members.len());
                prop_assert!(members[first_demoted..].iter().all(|i| !usable.contains(i)));
            }
        }
        if let Some(active) = d.plan.active() {
            prop_assert!(d.backends[active].excluded.is_none());
        } else {
            prop_assert!(kept.is_empty());
        }
    }

    /// The same inputs give the same decision, however often they are asked.
    #[test]
    fn decisions_are_deterministic_and_stable(case in case()) {
        let (route, facts) = build(&case);
        let first = decide(&route, "ns", &facts);
        for _ in 0..3 {
            prop_assert_eq!(&decide(&route, "ns", &facts), &first);
        }
    }

    /// A failure class left out of failoverOn never moves a backend.
    #[test]
    fn classes_outside_failover_on_do_not_count(case in case()) {
        let (route, facts) = build(&case);
        let d = decide(&route, "ns", &facts);
        for b in &d.backends {
            let counted = |reason: &str| FailureClass::ALL.iter().zip(&case.failover_on)
                .any(|(c, on)| *on && c.as_str() == reason);
            if let Some(e) = &b.excluded && e.reason == "RegionBlocked" {
                prop_assert!(counted("RegionBlocked"));
            }
            if b.demoted.is_some() {
                let failed = b.last_probe.as_ref().and_then(|p| p.failure);
                if let Some(class) = failed {
                    prop_assert!(counted(class.as_str()), "{} demoted for uncounted {}", b.name, class);
                }
            }
        }
    }

    /// A probe result only reorders what is programmed: whichever of two consecutive decisions'
    /// routes (RDS) Envoy has loaded, the chain clusters they name exist among the other's
    /// clusters (CDS), and the same provider accounts stay programmed. (A route left with no
    /// eligible backend at all is not programmed; it is outside this property.)
    #[test]
    fn a_probe_result_never_makes_a_route_name_a_missing_cluster(
        case in case(),
        which in 0usize..8,
        failure in prop::option::weighted(0.5, 0..FailureClass::ALL.len()),
    ) {
        let (route, before) = build(&case);
        let mut after = before.clone();
        let spec = &route.spec.backends[which % route.spec.backends.len()];
        after.now_ms += 5_000;
        after.health.entry(probe_key(&route, spec)).or_default().record(ProbeRecord {
            at_ms: after.now_ms,
            latency_ms: 3,
            failure: failure.map(|i| FailureClass::ALL[i]),
            message: "probe".into(),
            retry_after_ms: None,
        });
        let (one, two) = (decide(&route, "ns", &before).plan, decide(&route, "ns", &after).plan);
        prop_assume!(one.active().is_some() && two.active().is_some());
        let (one, two) = (build_route(&route, &one), build_route(&route, &two));
        let (Ok(one), Ok(two)) = (one, two) else {
            return Err(TestCaseError::reject("route not programmable"));
        };
        let clusters = |b: &crate::gateway::ir::BuiltRoute| -> BTreeSet<String> {
            b.chains.iter().map(|c| c.cluster.clone()).collect()
        };
        let named = |b: &crate::gateway::ir::BuiltRoute| -> BTreeSet<String> {
            b.route.chains.iter().map(|(c, _)| c.clone()).collect()
        };
        prop_assert!(named(&one).is_subset(&clusters(&two)), "{:?} not in {:?}", named(&one), clusters(&two));
        prop_assert!(named(&two).is_subset(&clusters(&one)), "{:?} not in {:?}", named(&two), clusters(&one));
        let accounts = |b: &crate::gateway::ir::BuiltRoute| -> BTreeSet<String> {
            b.accounts.iter().map(|a| a.name.clone()).collect()
        };
        prop_assert_eq!(accounts(&one), accounts(&two));
    }
}
