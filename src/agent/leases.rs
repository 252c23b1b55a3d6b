//! The sidecar's side of admission (docs/design/usage.md, "Admission control"): it reports what
//! the Envoy module reserved, settled and holds per leased route (the module's `reservations`
//! file, the counted lines' settlements) with the counts at `GET /usage`, and writes the grants
//! the operator leases at `POST /usage/lease` into the `grants` file the module loads. Both files
//! live in the usage log's directory (an emptyDir of the Pod) and are replaced whole by a rename
//! (`sse-usage/src/admission.rs` has their format).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::counters::UsageCounters;
use crate::usage::lease::{Held, Holding, Lease, RateHeld};

/// The files, and the last lease written (the module may obey it before it says so).
pub struct Leases {
    dir: PathBuf,
    written: Mutex<Lease>,
}

/// Why a lease was not written.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the lease is for Envoy process {wanted}, this Pod's runs as {running}")]
    OtherProcess { wanted: String, running: String },
    #[error("the grants file cannot be written: {0}")]
    Write(#[from] std::io::Error),
}

/// The module's reservations file: its boot and, per route, what it reserved, was granted and
/// refused (nothing settled: the sidecar knows that).
fn reservations(dir: &Path) -> Option<Holding> {
    let text = std::fs::read_to_string(dir.join("reservations")).ok()?;
    let mut lines = text.lines();
    let boot = lines.next()?.strip_prefix("boot ")?.trim().to_string();
    let mut holding = Holding {
        boot,
        ..Holding::default()
    };
    for line in lines {
        let mut w = line.split_ascii_whitespace();
        let Some(first) = w.next() else { continue };
        let rate = first == "@rate";
        let Some(route) = (if rate { w.next() } else { Some(first) }) else {
            continue;
        };
        let n: Vec<u64> = w.filter_map(|x| x.parse().ok()).collect();
        match (rate, n.as_slice()) {
            (true, [requests, requests_refused, tokens, tokens_refused]) => {
                let held = RateHeld {
                    requests: *requests,
                    requests_refused: *requests_refused,
                    tokens: *tokens,
                    tokens_refused: *tokens_refused,
                };
                holding.rates.insert(route.to_string(), held);
            }
            (false, [reserved, granted, refused]) => {
                let held = Held {
                    reserved: *reserved,
                    refused: *refused,
                    granted: *granted,
                    settled: 0,
                };
                holding.routes.insert(route.to_string(), held);
            }
            _ => {}
        }
    }
    Some(holding)
}

impl Leases {
    /// Leases exchanged in `dir`.
    pub fn new(dir: &Path) -> Leases {
        Leases {
            dir: dir.to_path_buf(),
            written: Mutex::new(Lease::default()),
        }
    }

    /// What this Pod's Envoy holds, or None when its module reports nothing (no admission filter,
    /// or not started yet). Read after the counts, so that what they settled is never newer than
    /// the reservations (docs/design/usage.md).
    pub fn holding(&self, counters: &UsageCounters) -> Option<Holding> {
        let Holding {
            boot,
            routes,
            rates,
        } = reservations(&self.dir)?;
        let settled = counters.settled(&boot).routes;
        let written = self.written.lock().expect("lease");
        let pending = |route: &str| {
            (written.boot == boot)
                .then(|| written.routes.get(route).map(|g| g.granted))
                .flatten()
                .unwrap_or(0)
        };
        let mut held: BTreeMap<String, Held> = routes
            .into_iter()
            .map(|(route, h)| {
                let h = Held {
                    granted: h.granted.max(pending(&route)),
                    settled: settled.get(&route).copied().unwrap_or(0),
                    ..h
                };
                (route, h)
            })
            .collect();
        // Granted and not loaded yet: the module may obey it any moment.
        if written.boot == boot {
            for (route, g) in &written.routes {
                held.entry(route.clone()).or_insert(Held {
                    granted: g.granted,
                    settled: settled.get(route).copied().unwrap_or(0),
                    ..Held::default()
                });
            }
        }
        Some(Holding {
            boot,
            routes: held,
            rates,
        })
    }

    /// Writes the tokens reserved and not used by the answers counted so far (per route,
    /// cumulative for Envoy process `boot`), for the module's tokens-per-minute buckets; only when
    /// they changed since `last`.
    pub fn write_refunds(
        &self,
        counters: &UsageCounters,
        last: &mut String,
    ) -> std::io::Result<()> {
        let Some(boot) = reservations(&self.dir).map(|h| h.boot) else {
            return Ok(());
        };
        let mut text = format!("boot {boot}\n");
        for (route, tokens) in counters.settled(&boot).refunded {
            text.push_str(&format!("{route} {tokens}\n"));
        }
        if text == *last {
            return Ok(());
        }
        let tmp = self.dir.join(".refunds.tmp");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, self.dir.join("refunds"))?;
        *last = text;
        Ok(())
    }

    /// Writes `lease` for the module to load, if it is for the Envoy process running.
    pub fn grant(&self, lease: Lease) -> Result<(), LeaseError> {
        let running = reservations(&self.dir).map(|h| h.boot).unwrap_or_default();
        if lease.boot != running {
            return Err(LeaseError::OtherProcess {
                wanted: lease.boot,
                running,
            });
        }
        let mut text = format!("boot {}\nretry {}\n", lease.boot, lease.retry_after);
        for (route, g) in &lease.routes {
            let resets = Some(g.resets_at.as_str())
                .filter(|r| !r.is_empty() && !r.contains(char::is_whitespace))
                .unwrap_or("-");
            text.push_str(&format!("{route} {} {} {resets}\n", g.granted, g.cap));
        }
        for (route, r) in &lease.rates {
            text.push_str(&format!(
                "@rate {route} {} {} {}\n",
                r.requests_per_minute, r.tokens_per_minute, r.cap
            ));
        }
        // Remembered first: from now on the module may obey it.
        *self.written.lock().expect("lease") = lease;
        let tmp = self.dir.join(".grants.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.join("grants"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Answer;
    use crate::usage::lease::{Grant, RateGrant};

    #[test]
    fn holdings_join_the_module_s_reservations_the_settlements_and_the_last_lease() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Leases::new(dir.path());
        let counters = UsageCounters::new("ns");
        assert_eq!(leases.holding(&counters), None);
        std::fs::write(
            dir.path().join("reservations"),
            "boot b1\nchat 900 1000 50\n@rate chat 9 2 720 10\n",
        )
        .unwrap();
        let settle = |boot: &str, tokens| Answer {
            route: "chat".into(),
            reserved: Some((boot.into(), tokens)),
            ..Answer::default()
        };
        counters.record_lines(&[settle("b0", 7), settle("b1", 300), settle("b1", 200)], 10);
        let lease = |boot: &str, granted| Lease {
            boot: boot.into(),
            retry_after: 2,
            rates: [(
                "chat".to_string(),
                RateGrant {
                    requests_per_minute: 60,
                    tokens_per_minute: 0,
                    cap: 64,
                },
            )]
            .into(),
            routes: [
                (
                    "chat".to_string(),
                    Grant {
                        granted,
                        cap: 64,
                        resets_at: "2027-01-01T00:00:00Z".into(),
                    },
                ),
                (
                    "new".to_string(),
                    Grant {
                        granted: 10,
                        cap: 64,
                        resets_at: String::new(),
                    },
                ),
            ]
            .into(),
        };
        assert!(matches!(
            leases.grant(lease("b0", 5)),
            Err(LeaseError::OtherProcess { .. })
        ));
        leases.grant(lease("b1", 1500)).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("grants")).unwrap(),
            "boot b1\nretry 2\nchat 1500 64 2027-01-01T00:00:00Z\nnew 10 64 -\n@rate chat 60 0 64\n"
        );
        let h = leases.holding(&counters).unwrap();
        assert_eq!(h.boot, "b1");
        assert_eq!(
            h.routes["chat"],
            Held {
                reserved: 900,
                refused: 50,
                granted: 1500,
                settled: 500
            }
        );
        assert_eq!(
            h.routes["new"],
            Held {
                granted: 10,
                ..Held::default()
            }
        );
        assert_eq!(
            h.rates["chat"],
            RateHeld {
                requests: 9,
                requests_refused: 2,
                tokens: 720,
                tokens_refused: 10
            }
        );
        // What the counted answers did not use of their reservations (no usage here: all).
        let mut last = String::new();
        leases.write_refunds(&counters, &mut last).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("refunds")).unwrap(),
            "boot b1\nchat 500\n"
        );
    }
}
