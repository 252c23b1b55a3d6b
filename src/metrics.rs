//! The operator's Prometheus metrics (served at `/metrics` by `llmroute run`). One registry, made
//! once; the reconciler and the prober record into it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct BackendLabels {
    pub namespace: String,
    pub route: String,
    pub backend: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub route: String,
    pub condition: String,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabels {
    pub namespace: String,
    pub route: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub provider: String,
    pub result: &'static str,
}

/// A namespace and a kind of xDS resource (Cluster, Listener, RouteConfiguration, Secret).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsPushLabels {
    pub namespace: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// Writes to the API server (server-side applies, status patches, events).
    pub api_writes: Counter,
    pub config_revisions: Family<NamespaceLabels, Counter>,
    /// 1 for a backend's current state, one series per (route, backend, state) seen; states
    /// left are set to 0. Set through [`Metrics::set_backend_state`].
    backend_state: Family<BackendLabels, Gauge>,
    /// 1 for the current status of each condition of each route, 0 for the other two statuses.
    route_condition: Family<ConditionLabels, Gauge>,
    /// The per-route series set so far, by namespace and route: a deleted route's series go.
    route_series: Mutex<BTreeMap<(String, String), RouteSeries>>,
    pub failovers: Family<FailoverLabels, Counter>,
    pub probes: Family<ProbeLabels, Counter>,
    pub probe_duration: Family<ProviderLabels, Histogram>,
    pub probe_targets: Gauge,
    /// Gateway replicas holding an xDS stream, by namespace.
    pub xds_connected: Family<NamespaceLabels, Gauge>,
    /// xDS responses sent, by namespace and resource kind.
    pub xds_pushes: Family<XdsPushLabels, Counter>,
    /// xDS responses a gateway rejected (NACK), by namespace and resource kind.
    pub xds_rejections: Family<XdsPushLabels, Counter>,
    /// From publishing a namespace's changed configuration until every connected replica of its
    /// gateway acknowledged it.
    pub xds_propagation: Histogram,
    /// Failed reads of a gateway replica's usage counts, by namespace.
    usage_read_errors: Family<NamespaceLabels, Counter>,
    /// 1 while a namespace's usage is unknown (`UsageStale`), else 0.
    usage_unknown: Family<NamespaceLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("llmroute");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciliations of a namespace, by result (ok, error)",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Time to reconcile a namespace",
            reconcile_duration.clone(),
        );
        let api_writes = Counter::default();
        registry.register(
            "api_writes",
            "Writes the operator made to the API server (server-side applies, status patches, events); 0 in a steady state",
            api_writes.clone(),
        );
        let config_revisions = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "config_revisions",
            "Gateway configurations published (ConfigMap writes), by namespace",
            config_revisions.clone(),
        );
        let backend_state = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_state",
            "1 for the current state of each backend of each route (Healthy, Unknown, Excluded or a failure class)",
            backend_state.clone(),
        );
        let route_condition = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "route_condition",
            "1 for the current status (True, False or Unknown) of each condition of each LLMRoute, 0 for the others",
            route_condition.clone(),
        );
        let failovers = Family::<FailoverLabels, Counter>::default();
        registry.register(
            "failovers",
            "Changes of a route's active backend, with the reason (the failure class of the backend left, or FailedBack)",
            failovers.clone(),
        );
        let probes = Family::<ProbeLabels, Counter>::default();
        registry.register(
            "probes",
            "Health probes, by provider and result (Healthy or a failure class)",
            probes.clone(),
        );
        let probe_duration: Family<ProviderLabels, Histogram> =
            Family::new_with_constructor(probe_histogram as fn() -> Histogram);
        registry.register(
            "probe_duration_seconds",
            "Latency of health probes, by provider",
            probe_duration.clone(),
        );
        let probe_targets = Gauge::default();
        registry.register(
            "probe_targets",
            "Backend accounts being probed",
            probe_targets.clone(),
        );
        let xds_connected = Family::<NamespaceLabels, Gauge>::default();
        registry.register(
            "xds_connected_gateways",
            "Gateway replicas connected to this operator's xDS server, by namespace",
            xds_connected.clone(),
        );
        let xds_pushes = Family::<XdsPushLabels, Counter>::default();
        registry.register(
            "xds_pushes",
            "xDS responses sent to gateway replicas, by namespace and resource kind",
            xds_pushes.clone(),
        );
        let xds_rejections = Family::<XdsPushLabels, Counter>::default();
        registry.register(
            "xds_rejections",
            "xDS responses a gateway replica rejected (NACK), by namespace and resource kind",
            xds_rejections.clone(),
        );
        let xds_propagation = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "xds_propagation_seconds",
            "Time from publishing a changed gateway configuration until every connected replica acknowledged it",
            xds_propagation.clone(),
        );
        let usage_read_errors = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "usage_read_errors",
            "Failed reads of a connected gateway replica's usage counts (budgets), by namespace",
            usage_read_errors.clone(),
        );
        let usage_unknown = Family::<NamespaceLabels, Gauge>::default();
        registry.register(
            "usage_unknown",
            "1 while a namespace's usage has not been counted for two usage intervals (routes with budgets are UsageStale)",
            usage_unknown.clone(),
        );
        Metrics {
            registry,
            usage_read_errors,
            usage_unknown,
            xds_connected,
            xds_pushes,
            xds_rejections,
            xds_propagation,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            api_writes,
            config_revisions,
            backend_state,
            route_condition,
            route_series: Mutex::default(),
            failovers,
            probes,
            probe_duration,
            probe_targets,
        }
    }

    /// A failed read of a replica's usage counts in `namespace`.
    pub fn usage_read_errors(&self, namespace: &str) {
        self.usage_read_errors
            .get_or_create(&NamespaceLabels {
                namespace: namespace.to_string(),
            })
            .inc();
    }

    /// `llmroute_usage_unknown` of `namespace`.
    pub fn set_usage_unknown(&self, namespace: &str, unknown: bool) {
        self.usage_unknown
            .get_or_create(&NamespaceLabels {
                namespace: namespace.to_string(),
            })
            .set(i64::from(unknown));
    }

    /// `llmroute_backend_state`: 1 for `state`, 0 for the other states this backend had.
    pub fn set_backend_state(&self, namespace: &str, route: &str, backend: &str, state: &str) {
        let mut series = self.route_series.lock().expect("route series");
        let states = series
            .entry((namespace.to_string(), route.to_string()))
            .or_default()
            .backends
            .entry(backend.to_string())
            .or_default();
        let labels = |state: &str| BackendLabels {
            namespace: namespace.to_string(),
            route: route.to_string(),
            backend: backend.to_string(),
            state: state.to_string(),
        };
        for other in states.iter().filter(|s| *s != state) {
            self.backend_state.get_or_create(&labels(other)).set(0);
        }
        self.backend_state.get_or_create(&labels(state)).set(1);
        states.insert(state.to_string());
    }

    /// `llmroute_route_condition`: each condition's current status is 1, the other two 0.
    pub fn set_route_conditions<'a>(
        &self,
        namespace: &str,
        route: &str,
        conditions: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        let mut series = self.route_series.lock().expect("route series");
        let known = &mut series
            .entry((namespace.to_string(), route.to_string()))
            .or_default()
            .conditions;
        for (condition, current) in conditions {
            for status in CONDITION_STATUSES {
                let labels = ConditionLabels {
                    namespace: namespace.to_string(),
                    route: route.to_string(),
                    condition: condition.to_string(),
                    status,
                };
                self.route_condition
                    .get_or_create(&labels)
                    .set(i64::from(status == current));
            }
            if !known.contains(condition) {
                known.insert(condition.to_string());
            }
        }
    }

    /// Drops the per-route series of the routes of `namespace` not in `routes` (deleted ones).
    pub fn retain_routes(&self, namespace: &str, routes: &BTreeSet<String>) {
        let mut series = self.route_series.lock().expect("route series");
        series.retain(|(ns, route), set| {
            if ns != namespace || routes.contains(route) {
                return true;
            }
            for (backend, states) in &set.backends {
                for state in states {
                    self.backend_state.remove(&BackendLabels {
                        namespace: ns.clone(),
                        route: route.clone(),
                        backend: backend.clone(),
                        state: state.clone(),
                    });
                }
            }
            for condition in &set.conditions {
                for status in CONDITION_STATUSES {
                    self.route_condition.remove(&ConditionLabels {
                        namespace: ns.clone(),
                        route: route.clone(),
                        condition: condition.clone(),
                        status,
                    });
                }
            }
            false
        });
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// A registry in Prometheus' text format (the operator's `/metrics` and the gateway sidecar's).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// Which per-route series exist, so a deleted route's can be removed: names only, the label sets
/// are rebuilt from them (at 1,000 routes the families hold some 50,000 series; keeping a second
/// copy of every label set here cost megabytes).
#[derive(Default)]
struct RouteSeries {
    /// Backend name → the states it has had a series for.
    backends: BTreeMap<String, BTreeSet<String>>,
    /// Condition types with a series for each of [`CONDITION_STATUSES`].
    conditions: BTreeSet<String>,
}

const CONDITION_STATUSES: [&str; 3] = ["True", "False", "Unknown"];

fn probe_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(m: &Metrics, needle: &str) -> Vec<String> {
        m.encode()
            .lines()
            .filter(|l| l.contains(needle) && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn per_route_series_follow_their_route() {
        let m = Metrics::new();
        m.set_backend_state("ns", "chat", "openai", "Healthy");
        m.set_backend_state("ns", "chat", "openai", "RegionBlocked");
        m.set_route_conditions("ns", "chat", [("Ready", "True"), ("Degraded", "True")]);
        m.set_route_conditions("ns", "old", [("Ready", "False")]);
        m.set_route_conditions("other", "old", [("Ready", "True")]);
        let mut openai = series(&m, "backend=\"openai\"");
        openai.sort();
        assert_eq!(
            openai,
            [
                "llmroute_backend_state{namespace=\"ns\",route=\"chat\",backend=\"openai\",state=\"Healthy\"} 0",
                "llmroute_backend_state{namespace=\"ns\",route=\"chat\",backend=\"openai\",state=\"RegionBlocked\"} 1",
            ]
        );
        let degraded = series(&m, "route=\"chat\",condition=\"Degraded\"");
        assert_eq!(degraded.len(), 3, "{degraded:?}");
        assert!(degraded.iter().any(|l| l.ends_with("status=\"True\"} 1")));
        assert!(degraded.iter().any(|l| l.ends_with("status=\"False\"} 0")));

        // "old" was deleted in ns: its series go; the same name in another namespace stays.
        m.retain_routes("ns", &BTreeSet::from(["chat".to_string()]));
        assert!(series(&m, "namespace=\"ns\",route=\"old\"").is_empty());
        assert_eq!(series(&m, "namespace=\"other\",route=\"old\"").len(), 3);
        assert_eq!(series(&m, "route=\"chat\"").len(), 2 + 6);
        m.retain_routes("ns", &BTreeSet::new());
        assert!(series(&m, "namespace=\"ns\"").is_empty());
    }
}
