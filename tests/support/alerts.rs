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
            names_in(rule["expr"].as_str().expect("expr"), prefix, &mut names);
        }
    }
    names
}

/// The Grafana dashboard shipped with the chart.
pub const DASHBOARD: &str = "deploy/helm/llmroute/files/grafana-dashboard.json";

/// Every metric name starting with `prefix` in the dashboard's queries (panels and variables).
pub fn dashboard_metrics(prefix: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join(DASHBOARD)).expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            names_in(target["expr"].as_str().expect("expr"), prefix, &mut names);
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(query) = variable["definition"].as_str() {
            names_in(query, prefix, &mut names);
        }
    }
    names
}

/// Adds the metric names starting with `prefix` in the PromQL `expr` to `names`.
fn names_in(expr: &str, prefix: &str, names: &mut BTreeSet<String>) {
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

/// Asserts that every metric of `used` is in `exposition`, and that there are at least `at_least`
/// of them (so that a parsing slip cannot pass vacuously).
pub fn assert_all_exported(used: &BTreeSet<String>, exposition: &str, at_least: usize, what: &str) {
    assert!(used.len() >= at_least, "{used:?}");
    let exported = exported(exposition);
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "{what} name metrics not exported: {missing:?}"
    );
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
    assert_all_exported(
        &metrics_named(prefix),
        exposition,
        at_least,
        &format!("alerts ({exporter} exports)"),
    );
}
