//! A namespace's gateway configuration as the xDS server holds it: every resource encoded once, with
//! a version (a hash of its content) and the snapshot number at which that content appeared, and for
//! each route the resources it lives in and the snapshot at which its own content last changed.
//! Those numbers are what lets the server say, per route and per gateway replica, "this replica
//! serves the route's current configuration" from the replica's acknowledgements alone. Pure.

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::api;

/// A resource as the translation core produced it.
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceInput {
    pub type_url: &'static str,
    pub name: String,
    /// proto3 JSON (what `envoy` would read from a file), without a top-level `@type`.
    pub json: serde_json::Value,
}

/// What a route needs from the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInput {
    pub name: String,
    /// The route's `metadata.generation`: what status reports as served.
    pub generation: Option<i64>,
    /// Anything that changes when the route's part of the configuration changes.
    pub fingerprint: String,
    /// The resources the route's configuration lives in, as (type URL, name).
    pub deps: Vec<(&'static str, String)>,
}

/// An encoded resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Hash of the content: what Envoy reports back for the resource.
    pub version: String,
    /// The snapshot number at which this content first appeared.
    pub since: u64,
    pub bytes: Arc<Vec<u8>>,
}

/// A route of the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub generation: Option<i64>,
    fingerprint: String,
    /// The snapshot number at which the route's own configuration last changed.
    pub since: u64,
    pub deps: Vec<(&'static str, String)>,
}

/// A namespace's whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Grows by one with every change of content.
    pub number: u64,
    /// Type URL → resource name → entry.
    pub resources: BTreeMap<&'static str, BTreeMap<String, Entry>>,
    pub routes: BTreeMap<String, RouteEntry>,
}

fn version_of(json: &str) -> String {
    let digest = Sha256::digest(json.as_bytes());
    digest[..10].iter().map(|b| format!("{b:02x}")).collect()
}

impl Snapshot {
    /// The snapshot following `previous` with these resources and routes. Unchanged resources keep
    /// their bytes, version and `since`; the number grows only when something changed, so building
    /// the same configuration again yields an equal snapshot.
    pub fn next(
        previous: Option<&Snapshot>,
        resources: Vec<ResourceInput>,
        routes: Vec<RouteInput>,
    ) -> Result<Snapshot, String> {
        let base = previous.map_or(0, |p| p.number);
        let number = base + 1;
        let mut changed = false;
        let mut out: BTreeMap<&'static str, BTreeMap<String, Entry>> = BTreeMap::new();
        for r in resources {
            let text = serde_json::to_string(&r.json).map_err(|e| e.to_string())?;
            let version = version_of(&text);
            let old = previous.and_then(|p| p.resources.get(r.type_url)?.get(&r.name));
            let entry = match old {
                Some(old) if old.version == version => old.clone(),
                _ => {
                    changed = true;
                    Entry {
                        bytes: Arc::new(
                            api::encode_str(r.type_url, &text)
                                .map_err(|e| format!("{} {:?}: {e}", r.type_url, r.name))?,
                        ),
                        version,
                        since: number,
                    }
                }
            };
            out.entry(r.type_url).or_default().insert(r.name, entry);
        }
        // A resource that went away is a change too.
        if let Some(p) = previous {
            for (t, entries) in &p.resources {
                let now = out.get(t);
                if entries
                    .keys()
                    .any(|n| now.is_none_or(|m| !m.contains_key(n)))
                {
                    changed = true;
                }
            }
        }
        let mut route_entries = BTreeMap::new();
        for r in routes {
            let old = previous.and_then(|p| p.routes.get(&r.name));
            let since = match old {
                Some(old) if old.fingerprint == r.fingerprint && old.generation == r.generation => {
                    old.since
                }
                _ => {
                    changed = true;
                    number
                }
            };
            route_entries.insert(
                r.name,
                RouteEntry {
                    generation: r.generation,
                    fingerprint: r.fingerprint,
                    since,
                    deps: r.deps,
                },
            );
        }
        if previous.is_some_and(|p| p.routes.keys().any(|n| !route_entries.contains_key(n))) {
            changed = true;
        }
        let number = if changed || previous.is_none() {
            number
        } else {
            base
        };
        Ok(Snapshot {
            number,
            resources: out,
            routes: route_entries,
        })
    }

    /// The entry of resource `name` of type `type_url`.
    pub fn entry(&self, type_url: &str, name: &str) -> Option<&Entry> {
        self.resources.get(type_url)?.get(name)
    }

    /// Number of resources of every type.
    pub fn len(&self) -> usize {
        self.resources.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encoded size of every resource, in bytes.
    pub fn bytes(&self) -> usize {
        self.resources
            .values()
            .flat_map(|m| m.values())
            .map(|e| e.bytes.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(name: &str, timeout: &str) -> ResourceInput {
        ResourceInput {
            type_url: api::CLUSTER,
            name: name.into(),
            json: json!({ "name": name, "connect_timeout": timeout }),
        }
    }

    fn route(name: &str, fingerprint: &str, deps: &[&str]) -> RouteInput {
        RouteInput {
            name: name.into(),
            generation: Some(1),
            fingerprint: fingerprint.into(),
            deps: deps.iter().map(|d| (api::CLUSTER, d.to_string())).collect(),
        }
    }

    #[test]
    fn unchanged_content_keeps_versions_and_the_number() {
        let a = Snapshot::next(
            None,
            vec![cluster("a", "1s")],
            vec![route("r", "x", &["a"])],
        )
        .unwrap();
        assert_eq!(a.number, 1);
        let again = Snapshot::next(
            Some(&a),
            vec![cluster("a", "1s")],
            vec![route("r", "x", &["a"])],
        )
        .unwrap();
        assert_eq!(again, a);
    }

    #[test]
    fn a_change_moves_only_what_changed() {
        let a = Snapshot::next(
            None,
            vec![cluster("a", "1s"), cluster("b", "1s")],
            vec![route("r", "x", &["a"]), route("s", "y", &["b"])],
        )
        .unwrap();
        let b = Snapshot::next(
            Some(&a),
            vec![cluster("a", "1s"), cluster("b", "2s")],
            vec![route("r", "x", &["a"]), route("s", "y2", &["b"])],
        )
        .unwrap();
        assert_eq!(b.number, 2);
        assert_eq!(b.entry(api::CLUSTER, "a"), a.entry(api::CLUSTER, "a"));
        let eb = b.entry(api::CLUSTER, "b").unwrap();
        assert_eq!(eb.since, 2);
        assert_ne!(eb.version, a.entry(api::CLUSTER, "b").unwrap().version);
        assert_eq!(b.routes["r"].since, 1);
        assert_eq!(b.routes["s"].since, 2);
    }

    #[test]
    fn removals_count_as_changes() {
        let a = Snapshot::next(None, vec![cluster("a", "1s"), cluster("b", "1s")], vec![]).unwrap();
        let b = Snapshot::next(Some(&a), vec![cluster("a", "1s")], vec![]).unwrap();
        assert_eq!(b.number, 2);
        assert!(b.entry(api::CLUSTER, "b").is_none());
    }

    #[test]
    fn invalid_resources_are_refused_with_their_name() {
        let bad = ResourceInput {
            type_url: api::CLUSTER,
            name: "bad".into(),
            json: json!({ "name": "bad", "connect_timeout": "soon" }),
        };
        let e = Snapshot::next(None, vec![bad], vec![]).unwrap_err();
        assert!(e.contains("\"bad\""), "{e}");
    }
}
