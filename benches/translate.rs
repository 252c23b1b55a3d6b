//! Translation benchmark: 1,000 LLMRoutes × 3 backends in one namespace → policy → IR → Envoy files.
//! Prints figures (no pass/fail): `cargo bench --bench translate`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use llmroute::api::{Backend, LLMRoute, LLMRouteSpec, SecretKeyRef};
use llmroute::gateway::keys::KeyMaterial;
use llmroute::gateway::{self, envoy};
use llmroute::policy::Facts;
use llmroute::xds::snapshot::Snapshot;

mod common;
use common::peak_rss_kib;

fn backend(name: &str, provider: &str, priority: u32, secret: &str, model: &str) -> Backend {
    Backend {
        name: name.into(),
        provider: provider.into(),
        endpoint: None,
        credentials_secret_ref: Some(SecretKeyRef {
            name: secret.into(),
            key: "api-key".into(),
        }),
        models: BTreeMap::from([
            ("chat".to_string(), model.to_string()),
            ("fast".to_string(), model.to_string()),
        ]),
        priority,
        weight: 1,
        regions: None,
        cost: None,
        azure: None,
        budget: None,
        rate_limit: None,
    }
}

fn routes(n: usize) -> Vec<LLMRoute> {
    (0..n)
        .map(|i| {
            let spec = LLMRouteSpec {
                region: Some("cn".into()),
                default_model: Some("chat".into()),
                backends: vec![
                    backend(
                        "zhipu",
                        "zhipu",
                        0,
                        &format!("zhipu-{}", i % 10),
                        "glm-4-plus",
                    ),
                    backend("qianfan", "qianfan", 1, "qianfan", "ernie-4.0-8k"),
                    backend("deepseek", "deepseek", 2, "deepseek", "deepseek-chat"),
                ],
                policy: Default::default(),
                workload_secret: Default::default(),
                rollout: None,
                operations: Vec::new(),
            };
            let mut r = LLMRoute::new(&format!("route-{i:04}"), spec);
            r.metadata.namespace = Some("bench".into());
            r
        })
        .collect()
}

fn main() {
    let n = 1000;
    let routes = routes(n);
    let mut facts = Facts {
        default_region: "us".into(),
        ..Default::default()
    };
    for r in &routes {
        for b in &r.spec.backends {
            let s = b.credentials_secret_ref.as_ref().unwrap();
            facts
                .secrets
                .entry(s.name.clone())
                .or_default()
                .insert(s.key.clone());
        }
    }
    let opts = envoy::EnvoyOptions::default();
    let keys_of = |t: &gateway::Translation| KeyMaterial {
        provider_keys: t
            .gateway
            .provider_keys
            .iter()
            .map(|k| (k.entry.clone(), b"sk-bench-provider-key".to_vec()))
            .collect(),
        route_keys: t
            .gateway
            .routes
            .iter()
            .map(|r| (r.name.clone(), format!("sk-llmroute-bench-{}", r.name)))
            .collect(),
    };
    // What the operator does per change of a namespace: translate, build the xDS resources, and
    // encode them against Envoy's API (only resources whose content changed are encoded again).
    let snapshot = |t: &gateway::Translation, previous: Option<&Snapshot>| {
        let ads = envoy::ads_config(&t.gateway, &opts, &keys_of(t), None);
        Snapshot::next(previous, ads.resources, ads.routes).expect("valid configuration")
    };
    let rss_before = peak_rss_kib();

    // Warm-up, then timed iterations of a full build (every resource encoded).
    let first = snapshot(&gateway::translate("bench", &routes, &facts), None);
    let (resources, bytes) = (first.len(), first.bytes());
    let iterations = 10;
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        let t = gateway::translate("bench", &routes, &facts);
        std::hint::black_box(snapshot(&t, None));
        times.push(start.elapsed());
    }
    times.sort();
    // One route changed (a reorder of its backends): what a probe result or an edit costs.
    let mut edited = routes.clone();
    edited[n / 2].spec.backends[0].priority = 9;
    let mut changes: Vec<Duration> = Vec::new();
    for i in 0..iterations {
        let input = if i % 2 == 0 { &edited } else { &routes };
        let start = Instant::now();
        let t = gateway::translate("bench", input, &facts);
        let next = snapshot(&t, Some(&first));
        changes.push(start.elapsed());
        std::hint::black_box(next);
    }
    changes.sort();
    let rss_after = peak_rss_kib();
    let start = Instant::now();
    let t = gateway::translate("bench", &routes, &facts);
    let translate_only = start.elapsed();
    let start = Instant::now();
    let ads = envoy::ads_config(&t.gateway, &opts, &keys_of(&t), None);
    let resources_only = start.elapsed();
    let start = Instant::now();
    std::hint::black_box(Snapshot::next(None, ads.resources, ads.routes).unwrap());
    let encode_only = start.elapsed();

    // Validation (schema + CEL) of the same routes, as `render` and the operator do before translating.
    let values: Vec<serde_json::Value> = routes
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect();
    let start = Instant::now();
    for v in &values {
        llmroute::validate::validate_route(v).expect("valid");
    }
    let validation = start.elapsed();

    println!(
        "translate {n} routes x 3 backends (one namespace) -> {resources} xDS resources, {:.1} MiB encoded",
        bytes as f64 / 1048576.0
    );
    println!(
        "  full build (translate + resources + encode every one): min {:.1} ms, median {:.1} ms, max {:.1} ms ({iterations} runs)",
        times[0].as_secs_f64() * 1e3,
        times[iterations / 2].as_secs_f64() * 1e3,
        times[iterations - 1].as_secs_f64() * 1e3
    );
    println!(
        "  of which policy + IR: {:.1} ms, IR -> resources (JSON): {:.1} ms, encoding against Envoy's API: {:.1} ms",
        translate_only.as_secs_f64() * 1e3,
        resources_only.as_secs_f64() * 1e3,
        encode_only.as_secs_f64() * 1e3
    );
    println!(
        "  one route changed (only changed resources encoded): min {:.1} ms, median {:.1} ms ({iterations} runs)",
        changes[0].as_secs_f64() * 1e3,
        changes[iterations / 2].as_secs_f64() * 1e3
    );
    println!(
        "  peak RSS: {:.1} MiB (before translating: {:.1} MiB)",
        rss_after as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
    println!(
        "  validation (schema + CEL) of the {n} routes: {:.1} ms",
        validation.as_secs_f64() * 1e3
    );
}
