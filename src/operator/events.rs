//! Decide, for events: what a user should notice in a route's status change. Transitions only, so
//! a steady state emits nothing. Pure; the reconciler publishes what this returns.

use kube::ResourceExt;
use kube::runtime::events::{Event, EventType};

use crate::api::{LLMRoute, LLMRouteStatus};
use crate::metrics::FailoverLabels;
use crate::status;

/// What a status change tells.
#[derive(Default)]
pub struct Transition {
    pub events: Vec<Event>,
    /// The active backend changed.
    pub failover: Option<Failover>,
}

/// A change of the active backend.
#[derive(Debug)]
pub struct Failover {
    /// The failover metric's labels.
    pub labels: FailoverLabels,
    /// `FailedOver` or `FailedBack`.
    pub reason: &'static str,
    pub message: String,
}

/// Events of the change from `previous` to `new`: conditions that turn (Published, or the reason a
/// condition turns False), backends newly excluded, and a failover or failback.
pub fn transition(
    route: &LLMRoute,
    previous: Option<&LLMRouteStatus>,
    new: &LLMRouteStatus,
) -> Transition {
    let mut events = condition_events(previous, new);
    events.extend(exclusion_events(previous, new));
    let failover = failover(route, previous, new).map(|(event, failover)| {
        events.push(event);
        failover
    });
    Transition { events, failover }
}

fn event(type_: EventType, reason: &str, note: String, action: &str) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    }
}

fn condition_events(previous: Option<&LLMRouteStatus>, new: &LLMRouteStatus) -> Vec<Event> {
    let old_condition = |t: &str| previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == t));
    let mut events = Vec::new();
    for c in &new.conditions {
        let old = old_condition(&c.type_);
        if old.is_some_and(|o| o.status == c.status && o.reason == c.reason) {
            continue;
        }
        let kind = match (c.type_.as_str(), c.status.as_str()) {
            (status::PROGRAMMED, "True") => Some((EventType::Normal, "Published")),
            (status::ACCEPTED | status::RESOLVED_REFS | status::PROGRAMMED, "False")
            | (status::USAGE_STALE, "True") => Some((EventType::Warning, c.reason.as_str())),
            _ => None,
        };
        if let Some((type_, reason)) = kind {
            events.push(event(type_, reason, c.message.clone(), "Reconcile"));
        }
    }
    events
}

fn exclusion_events(previous: Option<&LLMRouteStatus>, new: &LLMRouteStatus) -> Vec<Event> {
    let mut events = Vec::new();
    for b in &new.backends {
        let old = previous.and_then(|p| p.backends.iter().find(|o| o.name == b.name));
        if b.state == "Excluded"
            && old.is_none_or(|o| o.state != "Excluded" || o.reason != b.reason)
        {
            let note = format!(
                "backend {:?}: {}",
                b.name,
                b.message.clone().unwrap_or_default()
            );
            events.push(event(
                EventType::Warning,
                "BackendExcluded",
                note,
                "Reconcile",
            ));
        }
    }
    events
}

/// A change of the active backend: a failover (the route is degraded) or a failback.
fn failover(
    route: &LLMRoute,
    previous: Option<&LLMRouteStatus>,
    new: &LLMRouteStatus,
) -> Option<(Event, Failover)> {
    let from = previous.and_then(|p| p.active_backend.as_deref())?;
    let to = new.active_backend.as_deref()?;
    if from == to {
        return None;
    }
    let degraded = new
        .conditions
        .iter()
        .any(|c| c.type_ == status::DEGRADED && c.status == "True");
    let left = new.backends.iter().find(|b| b.name == from);
    let (reason, why, class) = if degraded {
        let class = left.map(|b| b.state.clone()).unwrap_or_default();
        let detail = left
            .and_then(|b| b.message.clone())
            .unwrap_or_else(|| "it is no longer eligible".into());
        (
            "FailedOver",
            format!("from backend {from:?} to {to:?}: {from} is {class}: {detail}"),
            class,
        )
    } else {
        (
            "FailedBack",
            format!("from backend {from:?} to the preferred backend {to:?}: {to} is healthy again"),
            "FailedBack".to_string(),
        )
    };
    let labels = FailoverLabels {
        namespace: route.namespace().unwrap_or_default(),
        route: route.name_any(),
        from: from.to_string(),
        to: to.to_string(),
        reason: class,
    };
    let type_ = if degraded {
        EventType::Warning
    } else {
        EventType::Normal
    };
    let event = event(type_, reason, why.clone(), "Failover");
    Some((
        event,
        Failover {
            labels,
            reason,
            message: why,
        },
    ))
}
