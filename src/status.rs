//! Status of an LLMRoute from the translation's outcome: conditions following the Kubernetes API
//! conventions and kstatus (`Accepted`, `ResolvedRefs`, `Programmed`, `Ready`, `Degraded`), the
//! active backend, the endpoint and per-backend states. Pure: the reconciler writes what this builds.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{BackendStatus, LLMRouteStatus};
use crate::gateway::{Problem, RouteOutcome};
use crate::policy::BackendVerdict;
use crate::xds::ReplicaServing;
use crate::xds::delta::Serving;

pub const ACCEPTED: &str = "Accepted";
pub const RESOLVED_REFS: &str = "ResolvedRefs";
pub const PROGRAMMED: &str = "Programmed";
pub const READY: &str = "Ready";
pub const DEGRADED: &str = "Degraded";
/// On routes with a budget: True while their usage is not counted (a gateway replica's counts
/// unread, or the ledger unstored, for two usage intervals), naming what and why.
pub const USAGE_STALE: &str = "UsageStale";
/// `Ready=False` and `Degraded=True` reason: every backend that may serve fails its health checks.
pub const NO_HEALTHY_BACKEND: &str = "NoHealthyBackend";
/// kstatus' abnormal-true condition: present (True) only while the route cannot become Ready without
/// a change by its owner, so that Flux and `kstatus` report it Failed instead of waiting.
pub const STALLED: &str = "Stalled";

/// Reasons of `Ready=False` that only a change by the user can clear.
pub const TERMINAL_REASONS: [&str; 4] = [
    "InvalidSpec",
    "NoEligibleBackend",
    "InvalidBackend",
    "InvalidConfiguration",
];

/// What the operator knows of a namespace's gateway, for one route: whether its configuration could
/// be published, and how each replica stands with it.
#[derive(Clone, Debug, Default)]
pub struct GatewayView {
    /// Why the namespace's configuration could not be published (the last one stays served).
    pub publish_error: Option<Problem>,
    /// The route's `metadata.generation`, for the message.
    pub generation: Option<i64>,
    /// The replicas connected to the xDS server, and how each stands with the route.
    pub replicas: Vec<ReplicaServing>,
    /// Ready replicas of the gateway Deployment (a ready replica that is not connected serves
    /// whatever it loaded last, so it counts as not serving the route).
    pub ready_replicas: i32,
    /// Replicas the Deployment asks for.
    pub desired_replicas: i32,
    /// What keeps gateway Pods from running, when something does (a crash, an image that cannot be
    /// pulled), as reported by their status.
    pub pod_problem: Option<String>,
    /// The operator started serving moments ago: replicas may still be reconnecting.
    pub settling: bool,
    /// `Programmed` as the route's status has it (kept while settling and replicas are missing).
    pub previous: Option<Condition>,
}

/// Waiting reasons of a container that will not run without a change (or not soon).
const STUCK: [&str; 7] = [
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What keeps the gateway's Pods from running, from their status, for the routes' `Programmed`
/// message: a container stuck (with its last termination message, e.g. Envoy's error about a file
/// it cannot read), or a Pod that cannot be scheduled. `None` when nothing is wrong.
pub fn gateway_pod_problem<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Option<String> {
    let mut problems = Vec::new();
    let mut pods: Vec<&Pod> = pods.into_iter().collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let Some(status) = &pod.status else { continue };
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if let Some(c) = status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        }) {
            problems.push(format!(
                "gateway Pod {name} cannot be scheduled: {}",
                c.message.as_deref().unwrap_or_default()
            ));
            continue;
        }
        for c in status.container_statuses.iter().flatten() {
            let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if !STUCK.contains(&reason) {
                continue;
            }
            let detail = c
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.message.clone())
                .or_else(|| waiting.message.clone())
                .unwrap_or_default();
            // The last lines say why; keep the message short.
            let detail: String = detail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            problems.push(format!(
                "gateway Pod {name}: container {} is {reason}: {}",
                c.name,
                detail.trim()
            ));
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// `Programmed`: every ready gateway replica has loaded the route's current configuration. The
/// message counts them ("2/2 gateway replicas serve generation 7"); a rejection names Envoy's error.
pub fn programmed(view: &GatewayView) -> Result<String, Problem> {
    if let Some(p) = &view.publish_error {
        return Err(p.clone());
    }
    // Replicas may be reconnecting (this operator just started serving) or resubscribing (a fresh
    // stream): what status said stands until they settle, so a restart or a leader change does not
    // flip routes to not programmed and back.
    let connected = view.replicas.len();
    let unsettled = (view.settling && connected < view.ready_replicas.max(1) as usize)
        || view
            .replicas
            .iter()
            .any(|r| r.fresh && r.serving != Serving::Current);
    if unsettled && let Some(previous) = &view.previous {
        return if previous.status == "True" {
            Ok(previous.message.clone())
        } else {
            Err(Problem::new(
                previous.reason.clone(),
                previous.message.clone(),
            ))
        };
    }
    let generation = view.generation.map_or_else(
        || "the current generation".to_string(),
        |g| format!("generation {g}"),
    );
    if let Some((node, error)) = view.replicas.iter().find_map(|r| match &r.serving {
        Serving::Rejected(e) => Some((&r.node, e)),
        _ => None,
    }) {
        return Err(Problem::new(
            "ConfigurationRejected",
            format!("gateway replica {node} rejected the configuration of {generation}: {error}"),
        ));
    }
    let serving = view
        .replicas
        .iter()
        .filter(|r| r.serving == Serving::Current)
        .count();
    let total = connected.max(view.ready_replicas.max(0) as usize);
    let problem = view
        .pod_problem
        .as_ref()
        .map(|p| format!("; {p}"))
        .unwrap_or_default();
    if connected == 0 {
        return Err(Problem::new(
            "GatewayPending",
            format!(
                "no gateway replica serves {generation} yet: none is connected to the operator \
                 ({} ready of {} desired){problem}",
                view.ready_replicas, view.desired_replicas
            ),
        ));
    }
    if serving < total {
        let waiting: Vec<&str> = view
            .replicas
            .iter()
            .filter(|r| r.serving != Serving::Current)
            .map(|r| r.node.as_str())
            .collect();
        let unconnected = total - connected;
        let mut why = Vec::new();
        if !waiting.is_empty() {
            why.push(format!("waiting for {}", waiting.join(", ")));
        }
        if unconnected > 0 {
            why.push(format!(
                "{unconnected} ready replica(s) not connected to the operator"
            ));
        }
        return Err(Problem::new(
            "Propagating",
            format!(
                "{serving}/{total} gateway replicas serve {generation} ({}){problem}",
                why.join("; ")
            ),
        ));
    }
    Ok(format!(
        "{serving}/{total} gateway replicas serve {generation}"
    ))
}

/// What the reconciler knows about one route.
#[derive(Clone, Debug)]
pub enum RouteState<'a> {
    /// The spec failed validation: (reason, message).
    Invalid(Problem),
    /// Translated; `gateway` says whether the gateway replicas serve it.
    Translated {
        outcome: &'a RouteOutcome,
        endpoint: String,
        gateway: Box<GatewayView>,
    },
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The status a route should have. `previous` supplies `lastTransitionTime`s: a condition whose
/// status did not change keeps its time.
pub fn route_status(
    state: &RouteState,
    generation: Option<i64>,
    previous: Option<&LLMRouteStatus>,
    now: Time,
) -> LLMRouteStatus {
    let mut conditions = Vec::new();
    let mut status = LLMRouteStatus {
        observed_generation: generation,
        ..Default::default()
    };
    match state {
        RouteState::Invalid(p) => {
            conditions.push(condition(
                ACCEPTED,
                false,
                &p.reason,
                p.message.clone(),
                generation,
                &now,
            ));
            conditions.push(condition(
                READY,
                false,
                &p.reason,
                format!("the route is not served: {}", p.message),
                generation,
                &now,
            ));
        }
        RouteState::Translated {
            outcome,
            endpoint,
            gateway,
        } => {
            conditions.push(condition(
                ACCEPTED,
                true,
                ACCEPTED,
                "the spec is valid".into(),
                generation,
                &now,
            ));
            match &outcome.resolved_refs {
                Ok(()) => conditions.push(condition(
                    RESOLVED_REFS,
                    true,
                    RESOLVED_REFS,
                    "every referenced Secret key exists".into(),
                    generation,
                    &now,
                )),
                Err(p) => conditions.push(condition(
                    RESOLVED_REFS,
                    false,
                    &p.reason,
                    p.message.clone(),
                    generation,
                    &now,
                )),
            }
            let programmed = outcome
                .programmed
                .clone()
                .and_then(|()| programmed(gateway));
            match &programmed {
                Ok(message) => conditions.push(condition(
                    PROGRAMMED,
                    true,
                    PROGRAMMED,
                    message.clone(),
                    generation,
                    &now,
                )),
                Err(p) => conditions.push(condition(
                    PROGRAMMED,
                    false,
                    &p.reason,
                    p.message.clone(),
                    generation,
                    &now,
                )),
            }
            let preferred = outcome
                .decision
                .preferred
                .map(|i| outcome.decision.backends[i].name.clone());
            status.usage = Some(outcome.usage.clone());
            match (&programmed, &outcome.active_backend) {
                (Ok(_), Some(active)) if outcome.decision.over_budget.is_some() => {
                    let why = outcome.decision.over_budget.clone().unwrap_or_default();
                    conditions.push(condition(
                        READY,
                        false,
                        outcome.decision.over_budget_reason,
                        format!("the {why}: the gateway answers its requests with 429"),
                        generation,
                        &now,
                    ));
                    status.active_backend = Some(active.clone());
                    status.endpoint = Some(endpoint.clone());
                }
                (Ok(_), Some(active))
                    if let Some((verdict, failing)) = outcome
                        .decision
                        .active()
                        .and_then(|v| Some((v, v.demoted.as_ref()?))) =>
                {
                    // Every backend that may serve fails its health checks: the gateway still
                    // tries them in order, but nothing says a request will be answered.
                    let message = format!(
                        "no backend passes its health checks; the gateway still tries them in order, first {active:?} ({}, {}: {})",
                        verdict.health, failing.reason, failing.message
                    );
                    conditions.push(condition(
                        READY,
                        false,
                        NO_HEALTHY_BACKEND,
                        message.clone(),
                        generation,
                        &now,
                    ));
                    conditions.push(condition(
                        DEGRADED,
                        true,
                        NO_HEALTHY_BACKEND,
                        message,
                        generation,
                        &now,
                    ));
                    status.active_backend = Some(active.clone());
                    status.endpoint = Some(endpoint.clone());
                }
                (Ok(_), Some(active)) => {
                    conditions.push(condition(
                        READY,
                        true,
                        READY,
                        format!("serving from backend {active:?}"),
                        generation,
                        &now,
                    ));
                    let degraded = preferred.as_deref() != Some(active.as_str());
                    let message = if degraded {
                        let preferred = preferred.clone().unwrap_or_default();
                        let why = outcome
                            .decision
                            .backends
                            .iter()
                            .find(|b| b.name == preferred)
                            .and_then(|b| b.excluded.as_ref().or(b.demoted.as_ref()))
                            .map(|e| format!("{}: {}", e.reason, e.message))
                            .unwrap_or_default();
                        format!(
                            "serving from {active:?} instead of the preferred backend {preferred:?}: {why}"
                        )
                    } else {
                        "serving from the preferred backend".into()
                    };
                    let reason = if degraded {
                        "NotPreferredBackend"
                    } else {
                        "PreferredBackend"
                    };
                    conditions.push(condition(
                        DEGRADED, degraded, reason, message, generation, &now,
                    ));
                    status.active_backend = Some(active.clone());
                    status.endpoint = Some(endpoint.clone());
                }
                (Err(p), _) => conditions.push(condition(
                    READY,
                    false,
                    &p.reason,
                    p.message.clone(),
                    generation,
                    &now,
                )),
                (Ok(_), None) => conditions.push(condition(
                    READY,
                    false,
                    "NoEligibleBackend",
                    "no backend can serve".into(),
                    generation,
                    &now,
                )),
            }
            match &outcome.decision.usage {
                None => {}
                Some(Ok(())) => conditions.push(condition(
                    USAGE_STALE,
                    false,
                    "UsageCounted",
                    "every gateway replica's usage is counted".into(),
                    generation,
                    &now,
                )),
                Some(Err(why)) => conditions.push(condition(
                    USAGE_STALE,
                    true,
                    "UsageUnknown",
                    format!(
                        "usage is not counted, so budgets may be overshot (onUnknownUsage: Deny refuses instead): {why}"
                    ),
                    generation,
                    &now,
                )),
            }
            status.backends = outcome
                .decision
                .backends
                .iter()
                .map(|b| backend_status(b, outcome.active_backend.as_deref(), previous, &now))
                .collect();
        }
    }
    if let Some(ready) = conditions
        .iter()
        .find(|c| c.type_ == READY && c.status == "False")
        .filter(|c| TERMINAL_REASONS.contains(&c.reason.as_str()))
    {
        let stalled = condition(
            STALLED,
            true,
            &ready.reason,
            ready.message.clone(),
            generation,
            &now,
        );
        conditions.push(stalled);
    }
    // Keep lastTransitionTime where the status of a condition did not change.
    for c in &mut conditions {
        if let Some(old) = previous.and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_))
            && old.status == c.status
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    status.conditions = conditions;
    status
}

fn time_of(ms: u64) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64)
        .ok()
        .map(Time)
}

/// One backend's status: `state` is `Excluded` (by the route's rules or a missing key) or what
/// probing saw (`Unknown`, `Healthy`, a failure class); `reason` says how the policy uses it
/// (`Active`, `Standby`, `Unhealthy`, `CoolingDown`, `Recovering`, `RegionBlocked`, or why it is
/// excluded).
fn backend_status(
    b: &BackendVerdict,
    active: Option<&str>,
    previous: Option<&LLMRouteStatus>,
    now: &Time,
) -> BackendStatus {
    let (state, reason, message) = match (&b.excluded, &b.demoted) {
        (Some(e), _) if e.is_by_design() || e.reason.starts_with("Secret") => (
            "Excluded".to_string(),
            e.reason.to_string(),
            Some(e.message.clone()),
        ),
        (Some(e), _) | (None, Some(e)) => (
            b.health.to_string(),
            e.reason.to_string(),
            Some(e.message.clone()),
        ),
        (None, None) => (
            b.health.to_string(),
            if active == Some(b.name.as_str()) {
                "Active"
            } else {
                "Standby"
            }
            .to_string(),
            b.last_probe
                .as_ref()
                .filter(|p| p.failure.is_some())
                .map(|p| {
                    format!(
                        "last probe failed (not counted by this route): {}",
                        p.message
                    )
                }),
        ),
    };
    let previous_backend = previous.and_then(|p| p.backends.iter().find(|pb| pb.name == b.name));
    let last_transition_time = match previous_backend {
        Some(pb) if pb.state == state && pb.reason.as_deref() == Some(reason.as_str()) => {
            pb.last_transition_time.clone()
        }
        _ => Some(now.clone()),
    };
    BackendStatus {
        name: b.name.clone(),
        state,
        reason: Some(reason),
        message,
        last_probe_time: b.last_probe.as_ref().and_then(|p| time_of(p.at_ms)),
        last_probe_latency_ms: b.last_probe.as_ref().map(|p| p.latency_ms),
        last_transition_time,
    }
}

/// Whether `new` says something `old` does not. The time and latency of the last probe alone are
/// no reason to write: probes that change nothing must not cost a write per route and probe
/// interval (they are refreshed whenever the status changes otherwise; metrics count every probe).
pub fn status_changed(old: Option<&LLMRouteStatus>, new: &LLMRouteStatus) -> bool {
    let Some(old) = old else {
        return true;
    };
    let without_probe_times = |s: &LLMRouteStatus| {
        let mut s = s.clone();
        for b in &mut s.backends {
            b.last_probe_time = None;
            b.last_probe_latency_ms = None;
        }
        s
    };
    without_probe_times(old) != without_probe_times(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(node: &str, serving: Serving, fresh: bool) -> ReplicaServing {
        ReplicaServing {
            node: node.into(),
            serving,
            fresh,
        }
    }

    fn view(replicas: Vec<ReplicaServing>, ready: i32) -> GatewayView {
        GatewayView {
            generation: Some(7),
            replicas,
            ready_replicas: ready,
            desired_replicas: 2,
            ..Default::default()
        }
    }

    fn previous(status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: PROGRAMMED.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: Some(7),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn a_probe_alone_is_no_reason_to_write_status() {
        let backend = |state: &str, at: i64, latency: u32| BackendStatus {
            name: "openai".into(),
            state: state.into(),
            reason: Some("Active".into()),
            message: None,
            last_probe_time: time_of(at as u64),
            last_probe_latency_ms: Some(latency),
            last_transition_time: time_of(1_000),
        };
        let status = |b: BackendStatus| LLMRouteStatus {
            observed_generation: Some(1),
            backends: vec![b],
            ..Default::default()
        };
        let old = status(backend("Healthy", 5_000, 40));
        assert!(!status_changed(
            Some(&old),
            &status(backend("Healthy", 9_000, 55))
        ));
        assert!(status_changed(
            Some(&old),
            &status(backend("RateLimited", 9_000, 55))
        ));
        assert!(status_changed(None, &old));
    }

    #[test]
    fn programmed_counts_the_replicas_that_serve_the_generation() {
        let both = view(
            vec![
                replica("gw-a", Serving::Current, false),
                replica("gw-b", Serving::Current, false),
            ],
            2,
        );
        assert_eq!(
            programmed(&both).unwrap(),
            "2/2 gateway replicas serve generation 7"
        );
        let one = view(
            vec![
                replica("gw-a", Serving::Current, false),
                replica("gw-b", Serving::Pending, false),
            ],
            2,
        );
        let p = programmed(&one).unwrap_err();
        assert_eq!(p.reason, "Propagating");
        assert!(
            p.message
                .starts_with("1/2 gateway replicas serve generation 7 (waiting for gw-b)"),
            "{}",
            p.message
        );
        // A ready replica that is not connected serves whatever it loaded last.
        let cut_off = view(vec![replica("gw-a", Serving::Current, false)], 2);
        let p = programmed(&cut_off).unwrap_err();
        assert!(
            p.message.contains("1/2") && p.message.contains("not connected"),
            "{}",
            p.message
        );
    }

    #[test]
    fn nothing_connected_is_pending_and_says_why_pods_do_not_run() {
        let mut v = view(vec![], 0);
        v.pod_problem = Some(
            "gateway Pod gw-a: container envoy is CrashLoopBackOff: cannot read tls.key".into(),
        );
        let p = programmed(&v).unwrap_err();
        assert_eq!(p.reason, "GatewayPending");
        assert!(p.message.contains("0 ready of 2 desired"), "{}", p.message);
        assert!(p.message.ends_with("cannot read tls.key"), "{}", p.message);
    }

    #[test]
    fn a_rejection_names_the_replica_and_envoys_error() {
        let v = view(
            vec![
                replica("gw-a", Serving::Current, false),
                replica(
                    "gw-b",
                    Serving::Rejected("Error adding listener x: bad".into()),
                    false,
                ),
            ],
            2,
        );
        let p = programmed(&v).unwrap_err();
        assert_eq!(p.reason, "ConfigurationRejected");
        assert_eq!(
            p.message,
            "gateway replica gw-b rejected the configuration of generation 7: Error adding listener x: bad"
        );
    }

    #[test]
    fn status_stands_while_replicas_reconnect_or_resubscribe() {
        // The operator just started: no replica is back yet.
        let mut v = view(vec![], 2);
        v.settling = true;
        v.previous = Some(previous(
            "True",
            "Programmed",
            "2/2 gateway replicas serve generation 7",
        ));
        assert_eq!(
            programmed(&v).unwrap(),
            "2/2 gateway replicas serve generation 7"
        );
        // A fresh stream still resubscribing.
        let mut v = view(
            vec![
                replica("gw-a", Serving::Current, false),
                replica("gw-b", Serving::Pending, true),
            ],
            2,
        );
        v.previous = Some(previous(
            "True",
            "Programmed",
            "2/2 gateway replicas serve generation 7",
        ));
        assert!(programmed(&v).is_ok());
        // Without a previous condition (a new route), the truth.
        v.previous = None;
        assert_eq!(programmed(&v).unwrap_err().reason, "Propagating");
        // Settled: the truth.
        let mut v = view(vec![], 2);
        v.previous = Some(previous(
            "True",
            "Programmed",
            "2/2 gateway replicas serve generation 7",
        ));
        assert_eq!(programmed(&v).unwrap_err().reason, "GatewayPending");
    }

    #[test]
    fn stuck_gateway_pods_are_reported_with_their_last_words() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "llmroute-gateway-7d9c-x2v" },
            "status": { "containerStatuses": [
                { "name": "envoy", "ready": false, "restartCount": 3, "image": "envoy", "imageID": "",
                  "state": { "waiting": { "reason": "CrashLoopBackOff", "message": "back-off 40s" } },
                  "lastState": { "terminated": { "exitCode": 1,
                    "message": "[info] starting\n[critical] error initializing config: cannot open /etc/llmroute/xds/tls.key\n" } } },
                { "name": "shutdown-manager", "ready": true, "restartCount": 0, "image": "x", "imageID": "",
                  "state": { "running": {} } }
            ] }
        }))
        .unwrap();
        let pending: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "llmroute-gateway-7d9c-zz1" },
            "status": { "conditions": [ { "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient memory." } ] }
        }))
        .unwrap();
        let healthy: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "llmroute-gateway-7d9c-ok1" },
            "status": { "containerStatuses": [ { "name": "envoy", "ready": true, "restartCount": 0,
                "image": "envoy", "imageID": "", "state": { "running": {} } } ] }
        }))
        .unwrap();
        assert_eq!(gateway_pod_problem([&healthy]), None);
        assert_eq!(
            gateway_pod_problem([&pending, &pod, &healthy]).unwrap(),
            "gateway Pod llmroute-gateway-7d9c-x2v: container envoy is CrashLoopBackOff: [critical] \
             error initializing config: cannot open /etc/llmroute/xds/tls.key; gateway Pod \
             llmroute-gateway-7d9c-zz1 cannot be scheduled: 0/3 nodes are available: 3 Insufficient memory."
        );
    }
}
