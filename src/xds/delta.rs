//! The delta xDS protocol, as plain state machines (no I/O): what one gateway subscribed to, what it
//! was sent, what it acknowledged (ACK) or rejected (NACK), and from that whether it serves a
//! route's current configuration.
//!
//! Envoy's delta ADS stream: for each resource type the gateway subscribes (to everything for
//! listeners and clusters, by name for route configurations and secrets, which its listeners name);
//! the server sends the resources whose version differs from what the gateway has, and the names of
//! those it must drop; the gateway answers each response, by nonce, with an ACK or a NACK carrying
//! the error. A NACKed resource stays rejected until a new version of it is acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::api;
use super::snapshot::{Entry, RouteEntry, Snapshot};

/// One resource type's subscription and what was sent for it.
#[derive(Clone, Debug, Default)]
pub struct TypeState {
    /// Subscribed to every resource of the type.
    pub wildcard: bool,
    /// Subscribed names (besides the wildcard).
    pub names: BTreeSet<String>,
    /// Name → version the gateway has or was last sent.
    pub sent: HashMap<String, String>,
}

/// What to send for one type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Update {
    /// (name, entry) to send.
    pub resources: Vec<(String, Entry)>,
    /// Names the gateway must drop.
    pub removed: Vec<String>,
}

impl Update {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }
}

impl TypeState {
    /// Applies a request's subscription changes. The first request of listeners or clusters with no
    /// names (the legacy form) and the name `*` subscribe to everything.
    pub fn subscribe(
        &mut self,
        type_url: &str,
        first: bool,
        subscribe: &[String],
        unsubscribe: &[String],
    ) {
        let wildcard_type = type_url == api::LISTENER || type_url == api::CLUSTER;
        if first && subscribe.is_empty() && wildcard_type {
            self.wildcard = true;
        }
        for n in subscribe {
            if n == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(n.clone());
            }
        }
        for n in unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(n);
                // Unsubscribed: the gateway dropped it, nothing to remove later.
                if !self.wildcard {
                    self.sent.remove(n);
                }
            }
        }
    }

    /// Versions the gateway says it already has (a reconnecting gateway).
    pub fn initial_versions(&mut self, versions: &HashMap<String, String>) {
        for (n, v) in versions {
            self.sent.insert(n.clone(), v.clone());
        }
    }

    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// What the gateway lacks of `resources` (this type's entries of the snapshot).
    pub fn diff(&self, resources: Option<&BTreeMap<String, Entry>>) -> Update {
        let empty = BTreeMap::new();
        let resources = resources.unwrap_or(&empty);
        let mut update = Update::default();
        for (name, entry) in resources {
            if self.wants(name) && self.sent.get(name) != Some(&entry.version) {
                update.resources.push((name.clone(), entry.clone()));
            }
        }
        let mut removed: Vec<String> = self
            .sent
            .keys()
            .filter(|n| !resources.contains_key(*n))
            .cloned()
            .collect();
        removed.sort();
        update.removed = removed;
        update
    }

    /// Records that `update` was sent.
    pub fn mark_sent(&mut self, update: &Update) {
        for (name, entry) in &update.resources {
            self.sent.insert(name.clone(), entry.version.clone());
        }
        for name in &update.removed {
            self.sent.remove(name);
        }
    }
}

/// A response waiting for its ACK or NACK.
#[derive(Clone, Debug)]
struct Pending {
    type_url: &'static str,
    /// (name, version, since) sent.
    sent: Vec<(String, String, u64)>,
    removed: Vec<String>,
}

/// What the gateway acknowledged of one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acked {
    pub version: String,
    /// `since` of the acknowledged content.
    pub since: u64,
}

/// How one gateway replica stands with one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serving {
    /// It has loaded the route's current configuration.
    Current,
    /// It has not acknowledged all of it yet.
    Pending,
    /// It rejected part of it: Envoy's error.
    Rejected(String),
}

/// Acknowledgements of one gateway replica.
#[derive(Clone, Debug, Default)]
pub struct Acks {
    pending: HashMap<String, Pending>,
    acked: HashMap<&'static str, HashMap<String, Acked>>,
    /// Versions the gateway reported having when it (re)connected. Kept as reported, not matched
    /// against the snapshot of that moment: a gateway often reconnects to a restarted operator
    /// before its first snapshot exists, and what it already has is then never sent (so never
    /// acknowledged) again. An acknowledgement of the same name supersedes it.
    held: HashMap<&'static str, HashMap<String, String>>,
    /// (type, name) → Envoy's error, until a newer version of it is acknowledged.
    rejected: BTreeMap<(&'static str, String), String>,
}

/// The outcome of a gateway's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Ack,
    Nack(String),
    /// A nonce this stream never sent or already settled (Envoy answers each response once).
    Unknown,
}

impl Acks {
    /// Records a response sent with `nonce`.
    pub fn sent(&mut self, nonce: &str, type_url: &'static str, update: &Update) {
        self.pending.insert(
            nonce.to_string(),
            Pending {
                type_url,
                sent: update
                    .resources
                    .iter()
                    .map(|(n, e)| (n.clone(), e.version.clone(), e.since))
                    .collect(),
                removed: update.removed.clone(),
            },
        );
    }

    /// Applies the gateway's answer to the response `nonce`.
    pub fn answer(&mut self, nonce: &str, error: Option<&str>) -> Answer {
        let Some(p) = self.pending.remove(nonce) else {
            return Answer::Unknown;
        };
        match error {
            None => {
                let acked = self.acked.entry(p.type_url).or_default();
                for (name, version, since) in p.sent {
                    self.rejected.remove(&(p.type_url, name.clone()));
                    acked.insert(name, Acked { version, since });
                }
                for name in p.removed {
                    acked.remove(&name);
                    if let Some(held) = self.held.get_mut(p.type_url) {
                        held.remove(&name);
                    }
                    self.rejected.remove(&(p.type_url, name));
                }
                Answer::Ack
            }
            Some(message) => {
                // Envoy applies the resources of a response one by one and names the ones it
                // rejected in its error; when it names none of them, all count as rejected.
                // The others of the response were applied.
                let names_any = p.sent.iter().any(|(n, _, _)| message.contains(n.as_str()));
                let acked = self.acked.entry(p.type_url).or_default();
                for (name, version, since) in p.sent {
                    if !names_any || message.contains(name.as_str()) {
                        self.rejected
                            .insert((p.type_url, name), message.to_string());
                    } else {
                        acked.insert(name, Acked { version, since });
                    }
                }
                Answer::Nack(message.to_string())
            }
        }
    }

    /// Versions a reconnecting gateway reported: those equal to a snapshot's (this one or a later
    /// one) count as acknowledged.
    pub fn initial(&mut self, type_url: &'static str, versions: &HashMap<String, String>) {
        self.held
            .entry(type_url)
            .or_default()
            .extend(versions.iter().map(|(n, v)| (n.clone(), v.clone())));
    }

    /// `since` of what the gateway has loaded of `name`, when that is `entry`'s content or was
    /// acknowledged: the last acknowledgement, else the version it reported on connecting if that
    /// is the current one.
    fn loaded_since(&self, t: &'static str, name: &str, entry: &Entry) -> Option<u64> {
        if let Some(a) = self.acked.get(t).and_then(|m| m.get(name)) {
            return Some(a.since);
        }
        self.held
            .get(t)
            .and_then(|m| m.get(name))
            .filter(|v| **v == entry.version)
            .map(|_| entry.since)
    }

    /// Whether responses are waiting for an answer.
    pub fn in_flight(&self) -> bool {
        !self.pending.is_empty()
    }

    /// How this gateway stands with `route` of `snapshot`: it serves the route's current
    /// configuration when, for every resource the route lives in, what it acknowledged is at least
    /// as new as the route's last change (or is that resource's current content).
    pub fn serving(&self, route: &RouteEntry, snapshot: &Snapshot) -> Serving {
        let mut current = true;
        for (t, name) in &route.deps {
            if let Some(e) = self.rejected.get(&(*t, name.clone())) {
                return Serving::Rejected(e.clone());
            }
            let Some(entry) = snapshot.entry(t, name) else {
                continue;
            };
            let needed = route.since.min(entry.since);
            let ok = self
                .loaded_since(t, name, entry)
                .is_some_and(|since| since >= needed);
            current &= ok;
        }
        if current {
            Serving::Current
        } else {
            Serving::Pending
        }
    }

    /// Whether every resource of `snapshot` is acknowledged at its current version.
    pub fn has_all(&self, snapshot: &Snapshot) -> bool {
        snapshot.resources.iter().all(|(t, entries)| {
            entries
                .iter()
                .all(|(n, e)| match self.acked.get(t).and_then(|m| m.get(n)) {
                    Some(a) => a.version == e.version,
                    None => self.loaded_since(t, n, e).is_some(),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::snapshot::{ResourceInput, RouteInput};
    use serde_json::json;

    fn snapshot(
        previous: Option<&Snapshot>,
        clusters: &[(&str, &str)],
        routes: &[(&str, &str, &[&str])],
    ) -> Snapshot {
        Snapshot::next(
            previous,
            clusters
                .iter()
                .map(|(n, t)| ResourceInput {
                    type_url: api::CLUSTER,
                    name: n.to_string(),
                    json: json!({ "name": n, "connect_timeout": t }),
                })
                .collect(),
            routes
                .iter()
                .map(|(n, f, deps)| RouteInput {
                    name: n.to_string(),
                    generation: Some(1),
                    fingerprint: f.to_string(),
                    deps: deps.iter().map(|d| (api::CLUSTER, d.to_string())).collect(),
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn wildcard_subscription_gets_everything_then_only_changes() {
        let s1 = snapshot(None, &[("a", "1s"), ("b", "1s")], &[]);
        let mut st = TypeState::default();
        st.subscribe(api::CLUSTER, true, &[], &[]);
        let u = st.diff(s1.resources.get(api::CLUSTER));
        assert_eq!(u.resources.len(), 2);
        st.mark_sent(&u);
        assert!(st.diff(s1.resources.get(api::CLUSTER)).is_empty());
        let s2 = snapshot(Some(&s1), &[("a", "2s")], &[]);
        let u = st.diff(s2.resources.get(api::CLUSTER));
        assert_eq!(
            u.resources
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(u.removed, ["b"]);
    }

    #[test]
    fn named_subscriptions_get_only_their_names() {
        let s = snapshot(None, &[("a", "1s"), ("b", "1s")], &[]);
        let mut st = TypeState::default();
        // Route configurations and secrets are never wildcard, even on the first request.
        st.subscribe(api::ROUTE, true, &[], &[]);
        assert!(!st.wildcard);
        st.subscribe(api::ROUTE, false, &["b".into()], &[]);
        let u = st.diff(s.resources.get(api::CLUSTER));
        assert_eq!(u.resources.len(), 1);
        assert_eq!(u.resources[0].0, "b");
        st.mark_sent(&u);
        st.subscribe(api::ROUTE, false, &[], &["b".into()]);
        assert!(st.diff(s.resources.get(api::CLUSTER)).is_empty());
    }

    #[test]
    fn a_reconnecting_gateway_gets_only_what_differs() {
        let s = snapshot(None, &[("a", "1s"), ("b", "1s")], &[]);
        let mut st = TypeState::default();
        st.subscribe(api::CLUSTER, true, &[], &[]);
        let have: HashMap<String, String> = [
            (
                "a".to_string(),
                s.entry(api::CLUSTER, "a").unwrap().version.clone(),
            ),
            ("gone".to_string(), "v0".to_string()),
        ]
        .into();
        st.initial_versions(&have);
        let u = st.diff(s.resources.get(api::CLUSTER));
        assert_eq!(
            u.resources
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(u.removed, ["gone"]);
        let mut acks = Acks::default();
        acks.initial(api::CLUSTER, &have);
        assert!(!acks.has_all(&s));
    }

    /// A gateway that reconnects to a restarted operator before its first snapshot exists: what it
    /// reported having is never sent again, and it counts as loaded once a snapshot has it.
    #[test]
    fn a_gateway_that_reconnects_before_the_first_snapshot_serves_what_it_has() {
        let s1 = snapshot(
            None,
            &[("front", "1s"), ("ra", "1s")],
            &[("a", "A", &["front", "ra"])],
        );
        let have: HashMap<String, String> = ["front", "ra"]
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    s1.entry(api::CLUSTER, n).unwrap().version.clone(),
                )
            })
            .collect();
        let mut st = TypeState::default();
        let mut acks = Acks::default();
        st.subscribe(api::CLUSTER, true, &[], &[]);
        st.initial_versions(&have);
        acks.initial(api::CLUSTER, &have);
        // The snapshot comes afterwards: nothing to send, and the route is served.
        assert!(st.diff(s1.resources.get(api::CLUSTER)).is_empty());
        assert_eq!(acks.serving(&s1.routes["a"], &s1), Serving::Current);
        assert!(acks.has_all(&s1));
        // A later change of one resource is pending until acknowledged.
        let s2 = snapshot(
            Some(&s1),
            &[("front", "1s"), ("ra", "2s")],
            &[("a", "A2", &["front", "ra"])],
        );
        let u = st.diff(s2.resources.get(api::CLUSTER));
        assert_eq!(u.resources.len(), 1);
        st.mark_sent(&u);
        acks.sent("n1", api::CLUSTER, &u);
        assert_eq!(acks.serving(&s2.routes["a"], &s2), Serving::Pending);
        assert!(!acks.has_all(&s2));
        assert_eq!(acks.answer("n1", None), Answer::Ack);
        assert_eq!(acks.serving(&s2.routes["a"], &s2), Serving::Current);
        assert!(acks.has_all(&s2));
    }

    #[test]
    fn a_route_is_current_once_what_it_lives_in_is_acknowledged() {
        let s1 = snapshot(
            None,
            &[("front", "1s"), ("ra", "1s"), ("rb", "1s")],
            &[("a", "A", &["front", "ra"]), ("b", "B", &["front", "rb"])],
        );
        let mut st = TypeState::default();
        let mut acks = Acks::default();
        st.subscribe(api::CLUSTER, true, &[], &[]);
        let u = st.diff(s1.resources.get(api::CLUSTER));
        st.mark_sent(&u);
        acks.sent("n1", api::CLUSTER, &u);
        assert_eq!(acks.serving(&s1.routes["a"], &s1), Serving::Pending);
        assert_eq!(acks.answer("n1", None), Answer::Ack);
        assert_eq!(acks.serving(&s1.routes["a"], &s1), Serving::Current);
        assert!(acks.has_all(&s1));

        // Route b changes the shared front resource; a's own content does not change.
        let s2 = snapshot(
            Some(&s1),
            &[("front", "2s"), ("ra", "1s"), ("rb", "2s")],
            &[("a", "A", &["front", "ra"]), ("b", "B2", &["front", "rb"])],
        );
        let u = st.diff(s2.resources.get(api::CLUSTER));
        st.mark_sent(&u);
        acks.sent("n2", api::CLUSTER, &u);
        // Before the gateway answers, a is still served as it is; b is not yet.
        assert_eq!(acks.serving(&s2.routes["a"], &s2), Serving::Current);
        assert_eq!(acks.serving(&s2.routes["b"], &s2), Serving::Pending);
        assert_eq!(
            acks.answer("n2", Some("rb: bad")),
            Answer::Nack("rb: bad".into())
        );
        assert_eq!(
            acks.serving(&s2.routes["b"], &s2),
            Serving::Rejected("rb: bad".into())
        );
        // Only the resource Envoy's error names is rejected: a is still served.
        assert_eq!(acks.serving(&s2.routes["a"], &s2), Serving::Current);
        // A fixed version, acknowledged, clears the rejection.
        let s3 = snapshot(
            Some(&s2),
            &[("front", "3s"), ("ra", "1s"), ("rb", "3s")],
            &[("a", "A", &["front", "ra"]), ("b", "B3", &["front", "rb"])],
        );
        let u = st.diff(s3.resources.get(api::CLUSTER));
        st.mark_sent(&u);
        acks.sent("n3", api::CLUSTER, &u);
        assert_eq!(acks.answer("n3", None), Answer::Ack);
        assert_eq!(acks.serving(&s3.routes["b"], &s3), Serving::Current);
        assert_eq!(acks.serving(&s3.routes["a"], &s3), Serving::Current);
        assert_eq!(acks.answer("n3", None), Answer::Unknown);
    }
}
