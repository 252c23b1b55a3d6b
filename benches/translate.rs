//! Translation benchmark: 1,000 LLMRoutes × 3 backends in one namespace → policy → IR → Envoy files.
//! Prints figures (no pass/fail): `cargo bench --bench translate`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use llmroute::api::{Backend, LLMRoute, LLMRouteSpec, SecretKeyRef};
use llmroute::gateway::{self, envoy};
use llmroute::policy::Facts;

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
    let rss_before = peak_rss_kib(None);

    // Warm-up, then timed iterations.
    let files = envoy::render(&gateway::translate("bench", &routes, &facts).gateway, &opts);
    let bytes: usize = files.values().map(String::len).sum();
    let iterations = 10;
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        let t = gateway::translate("bench", &routes, &facts);
        let files = envoy::render(&t.gateway, &opts);
        std::hint::black_box(files);
        times.push(start.elapsed());
    }
    times.sort();
    let rss_after = peak_rss_kib(None);
    let start = Instant::now();
    let t = gateway::translate("bench", &routes, &facts);
    let translate_only = start.elapsed();
    let start = Instant::now();
    std::hint::black_box(envoy::render(&t.gateway, &opts));
    let files_only = start.elapsed();

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
        "translate {n} routes x 3 backends (one namespace) -> {} Envoy files, {:.1} MiB",
        files.len(),
        bytes as f64 / 1048576.0
    );
    println!(
        "  time per translation: min {:.1} ms, median {:.1} ms, max {:.1} ms ({iterations} runs; target < 50 ms)",
        times[0].as_secs_f64() * 1e3,
        times[iterations / 2].as_secs_f64() * 1e3,
        times[iterations - 1].as_secs_f64() * 1e3
    );
    println!(
        "  of which policy + IR: {:.1} ms, IR -> Envoy files: {:.1} ms",
        translate_only.as_secs_f64() * 1e3,
        files_only.as_secs_f64() * 1e3
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
