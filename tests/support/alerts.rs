//! The alerting rules shipped with the chart (`deploy/helm/llmroute/files/prometheus-rules.yaml`):
//! tests check that every metric they name is exported, by the operator or by a gateway.

use std::collections::BTreeSet;

use super::envoy::repo_root;

pub const RULES: &str = "deploy/helm/llmroute/files/prometheus-rules.yaml";

/// The rule file, parsed.
pub fn rules() -> serde_json::Value {
    let text = std::fs::read_to_string(repo_root().join(RULES)).expect("read the rule file");
    serde_yaml_ng::from_str(&text).expect("the rule file is YAML")
}

/// Every metric name starting with `prefix` in the rules' expressions.
pub fn metrics_named(prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for group in rules()["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
            let mut rest = expr;
            while let Some(start) = rest.find(word) {
                let end = rest[start..]
                    .find(|c| !word(c))
                    .map_or(rest.len(), |e| start + e);
                let token = &rest[start..end];
                rest = &rest[end..];
                // A label matcher (`name="..."`, `name=~`, `name!=`) names a label, not a metric.
                let label = rest.trim_start().starts_with(['=', '!']);
                if token.starts_with(prefix) && !label {
                    names.insert(token.to_string());
                }
            }
        }
    }
    names
}

/// The metric names of a Prometheus text exposition (a histogram's series count as its name too).
pub fn exported(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        names.insert(name.to_string());
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                names.insert(base.to_string());
            }
        }
    }
    names
}

/// Asserts that every metric starting with `prefix` that the rules name is in `exposition`, and
/// that the rules name at least `at_least` of them (so that a parsing slip cannot pass vacuously).
pub fn assert_exported(prefix: &str, exposition: &str, at_least: usize, exporter: &str) {
    let used = metrics_named(prefix);
    assert!(used.len() >= at_least, "{used:?}");
    let exported = exported(exposition);
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "alerts name metrics {exporter} does not export: {missing:?}"
    );
}
