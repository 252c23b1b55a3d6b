//! The operator's Prometheus metrics (served at `/metrics` by `llmroute run`). One registry, made
//! once; the reconciler and the prober record into it.

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub namespace: String,
    pub route: String,
    pub backend: String,
    pub state: String,
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
    pub config_revisions: Family<NamespaceLabels, Counter>,
    /// 1 for a backend's current state, one series per (route, backend, state) ever seen; states
    /// left are set to 0.
    pub backend_state: Family<BackendLabels, Gauge>,
    pub failovers: Family<FailoverLabels, Counter>,
    pub probes: Family<ProbeLabels, Counter>,
    pub probe_duration: Family<ProviderLabels, Histogram>,
    pub probe_targets: Gauge,
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
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            config_revisions,
            backend_state,
            failovers,
            probes,
            probe_duration,
            probe_targets,
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn probe_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}
