//! The one place the operator writes objects: server-side apply (field manager `llmroute`) when
//! the desired object differs from what the cache holds, so that a steady state makes no writes.

use std::sync::atomic::{AtomicU64, Ordering};

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "llmroute";

/// Counts the writes the operator makes (tests read it; the metric `llmroute_api_writes_total`
/// reports the same once [`WriteCounter::report_to`] linked it).
#[derive(Debug, Default)]
pub struct WriteCounter {
    count: AtomicU64,
    metric: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
}

impl WriteCounter {
    pub fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.metric.get() {
            m.inc();
        }
    }
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    /// Counts every write in `metric` too (the first call wins).
    pub fn report_to(&self, metric: prometheus_client::metrics::counter::Counter) {
        let _ = self.metric.set(metric);
    }
}

/// Whether `desired` is already in effect in `current`: every field of `desired` has the same value
/// in `current` (which may hold more, defaulted by the API server). Lists must match element-wise.
/// Maps listed in `exact` (e.g. a ConfigMap's `data`) must match exactly, since apply removes the
/// entries it no longer names.
pub fn in_effect(desired: &Value, current: &Value, exact: &[&str]) -> bool {
    fn walk(d: &Value, c: &Value, path: &str, exact: &[&str]) -> bool {
        match (d, c) {
            (Value::Object(dm), Value::Object(cm)) => {
                if exact.contains(&path) && dm.len() != cm.len() {
                    return false;
                }
                dm.iter().all(|(k, dv)| {
                    let child = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match cm.get(k) {
                        Some(cv) => walk(dv, cv, &child, exact),
                        None => dv.is_null(),
                    }
                })
            }
            (Value::Array(da), Value::Array(ca)) => {
                da.len() == ca.len() && da.iter().zip(ca).all(|(dv, cv)| walk(dv, cv, path, exact))
            }
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            _ => d == c,
        }
    }
    walk(desired, current, "", exact)
}

/// Applies `desired` unless it is already in effect in `current`. Returns whether it wrote.
pub async fn apply<K>(
    api: &Api<K>,
    desired: &K,
    current: Option<&K>,
    exact: &[&str],
    writes: &WriteCounter,
) -> Result<bool, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let desired_value = serde_json::to_value(desired).expect("objects serialize");
    if let Some(current) = current {
        let current_value = serde_json::to_value(current).expect("objects serialize");
        if in_effect(&desired_value, &current_value, exact) {
            return Ok(false);
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&desired.name_any(), &params, &Patch::Apply(&desired_value))
        .await?;
    writes.add();
    let kind = std::any::type_name::<K>()
        .rsplit("::")
        .next()
        .unwrap_or("?");
    tracing::debug!(target: "llmroute::write", kind, name = %desired.name_any(), namespace = ?desired.namespace(), "applied");
    Ok(true)
}

/// Applies `desired` unconditionally and returns the object written. A `resourceVersion` in
/// `desired` makes it a compare-and-swap: the API server answers 409 Conflict if the object
/// changed since (for state where a lost update would count twice, the usage ledger).
pub async fn apply_exactly<K>(
    api: &Api<K>,
    desired: &K,
    writes: &WriteCounter,
) -> Result<K, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let written = api
        .patch(&desired.name_any(), &params, &Patch::Apply(desired))
        .await?;
    writes.add();
    tracing::debug!(target: "llmroute::write", name = %desired.name_any(), namespace = ?desired.namespace(), "applied exactly");
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_added_by_the_server_do_not_count_as_drift() {
        let desired =
            json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"replicas": 2}});
        let current = json!({"metadata": {"name": "a", "uid": "u", "labels": {"x": "1"}}, "spec": {"replicas": 2, "revisionHistoryLimit": 10}});
        assert!(in_effect(&desired, &current, &[]));
        let changed =
            json!({"metadata": {"name": "a", "labels": {"x": "2"}}, "spec": {"replicas": 2}});
        assert!(!in_effect(&changed, &current, &[]));
    }

    #[test]
    fn exact_maps_notice_removed_entries() {
        let desired = json!({"data": {"a": "1"}});
        let current = json!({"data": {"a": "1", "stale": "2"}});
        assert!(in_effect(&desired, &current, &[]));
        assert!(!in_effect(&desired, &current, &["data"]));
    }

    #[test]
    fn lists_match_element_wise() {
        let desired = json!({"ownerReferences": [{"name": "a"}]});
        assert!(!in_effect(
            &desired,
            &json!({"ownerReferences": [{"name": "a"}, {"name": "b"}]}),
            &[]
        ));
        assert!(in_effect(
            &desired,
            &json!({"ownerReferences": [{"name": "a", "uid": "1"}]}),
            &[]
        ));
    }
}
