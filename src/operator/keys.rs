//! Publishing order of the gateway keys Secret (pure). A running Envoy must never load a
//! configuration that names a key file the kubelet has not written yet, nor lose a key file its
//! current configuration still names. So: a new key is written first and the configuration that
//! uses it only after `delay`; a key no longer used stays for `delay` before it is pruned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// When each entry was first seen written, or first seen unused.
#[derive(Debug, Default)]
pub struct KeyClock {
    written: BTreeMap<String, Instant>,
    unused: BTreeMap<String, Instant>,
}

/// What to write now.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyPlan {
    /// The keys Secret's data to apply.
    pub data: BTreeMap<String, Vec<u8>>,
    /// Whether the configuration may be published now (every key it names has had `delay`).
    pub config_ready: bool,
    /// When to look again (a pending publication or prune).
    pub recheck_after: Option<Duration>,
}

impl KeyClock {
    /// Plans the keys Secret given what it holds now (`current`, None if it does not exist) and what
    /// the new configuration needs (`desired`). `gateway_running`: a configuration was published
    /// before (otherwise nothing can race and everything is written at once).
    pub fn plan(
        &mut self,
        current: Option<&BTreeMap<String, Vec<u8>>>,
        desired: &BTreeMap<String, Vec<u8>>,
        gateway_running: bool,
        delay: Duration,
        now: Instant,
    ) -> KeyPlan {
        let empty = BTreeMap::new();
        let current = current.unwrap_or(&empty);
        let mut data = desired.clone();
        let mut config_ready = true;
        let mut recheck: Option<Duration> = None;
        let mut wait = |d: Duration| recheck = Some(recheck.map_or(d, |r: Duration| r.min(d)));

        for entry in desired.keys() {
            self.unused.remove(entry);
            if !gateway_running {
                continue;
            }
            let first = if current.contains_key(entry) {
                // Present before this operator saw it written: old enough.
                *self.written.entry(entry.clone()).or_insert(now - delay)
            } else {
                *self.written.entry(entry.clone()).or_insert(now)
            };
            let age = now.saturating_duration_since(first);
            if age < delay {
                config_ready = false;
                wait(delay - age);
            }
        }
        let desired_names: BTreeSet<&String> = desired.keys().collect();
        for (entry, value) in current {
            if desired_names.contains(entry) {
                continue;
            }
            let since = *self.unused.entry(entry.clone()).or_insert(now);
            let age = now.saturating_duration_since(since);
            if gateway_running && age < delay {
                data.insert(entry.clone(), value.clone());
                wait(delay - age);
            } else {
                self.unused.remove(entry);
                self.written.remove(entry);
            }
        }
        KeyPlan {
            data,
            config_ready,
            recheck_after: recheck,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn first_publication_writes_everything_at_once() {
        let mut clock = KeyClock::default();
        let plan = clock.plan(
            None,
            &map(&[("a", "1")]),
            false,
            Duration::from_secs(10),
            Instant::now(),
        );
        assert!(plan.config_ready);
        assert_eq!(plan.data, map(&[("a", "1")]));
        assert_eq!(plan.recheck_after, None);
    }

    #[test]
    fn a_new_key_waits_before_the_config_that_uses_it() {
        let mut clock = KeyClock::default();
        let t0 = Instant::now();
        let delay = Duration::from_secs(10);
        let current = map(&[("a", "1")]);
        let desired = map(&[("a", "1"), ("b", "2")]);
        let plan = clock.plan(Some(&current), &desired, true, delay, t0);
        assert!(!plan.config_ready);
        assert_eq!(plan.data, desired, "the key is written now");
        assert_eq!(plan.recheck_after, Some(delay));
        // Seen written (store updated) a moment later: still waiting.
        let plan = clock.plan(
            Some(&desired),
            &desired,
            true,
            delay,
            t0 + Duration::from_secs(3),
        );
        assert!(!plan.config_ready);
        assert_eq!(plan.recheck_after, Some(Duration::from_secs(7)));
        let plan = clock.plan(Some(&desired), &desired, true, delay, t0 + delay);
        assert!(plan.config_ready);
        assert_eq!(plan.recheck_after, None);
    }

    #[test]
    fn an_unused_key_is_pruned_only_after_the_delay() {
        let mut clock = KeyClock::default();
        let t0 = Instant::now();
        let delay = Duration::from_secs(10);
        let current = map(&[("a", "1"), ("old", "x")]);
        let desired = map(&[("a", "1")]);
        let plan = clock.plan(Some(&current), &desired, true, delay, t0);
        assert!(
            plan.config_ready,
            "removing a key never holds the configuration back"
        );
        assert_eq!(
            plan.data, current,
            "kept while the running configuration may still use it"
        );
        let plan = clock.plan(Some(&current), &desired, true, delay, t0 + delay);
        assert_eq!(plan.data, desired);
    }

    #[test]
    fn a_rotated_value_is_written_at_once() {
        let mut clock = KeyClock::default();
        let plan = clock.plan(
            Some(&map(&[("a", "1")])),
            &map(&[("a", "2")]),
            true,
            Duration::from_secs(10),
            Instant::now(),
        );
        assert!(plan.config_ready);
        assert_eq!(plan.data, map(&[("a", "2")]));
    }
}
