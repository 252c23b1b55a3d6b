//! What probing has observed of one backend account, and what that means for one route: plain data
//! and pure functions. The prober records [`ProbeRecord`]s into a [`HealthView`]; the policy engine
//! [`assess`]es a view with the route's own thresholds, failback delay and `failoverOn`, at a given
//! time. Nothing here reads a clock or does I/O.
//!
//! Rules (see docs/policy.md):
//! - a backend is *demoted* (moved behind every usable backend) after `unhealthyThreshold`
//!   consecutive failed probes of a class listed in `failoverOn`; classes not listed do not count;
//! - an observed `RegionBlocked` *excludes* the backend (retrying cannot help);
//! - `RateLimited` demotes until its `retry-after` has passed (or one probe interval without one),
//!   then the backend is usable again without further proof;
//! - after any other counted failure the backend must answer `healthyThreshold` consecutive probes
//!   and then stay healthy for `failback.delay` before it is usable again: a flapping backend stays
//!   demoted instead of flapping the configuration.

use crate::api::FailureClass;

/// Most consecutive successes remembered: the schema's maximum `healthyThreshold`.
pub const MAX_STREAK: usize = 100;

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeRecord {
    /// When the probe finished, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub latency_ms: u32,
    /// `None`: healthy.
    pub failure: Option<FailureClass>,
    /// What the provider said, without secrets (status and error code/message).
    pub message: String,
    /// The provider's `retry-after`, in milliseconds.
    pub retry_after_ms: Option<u64>,
}

/// What probing has observed of one backend account. Shared by every route using the account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthView {
    pub last: Option<ProbeRecord>,
    /// Consecutive failed probes (0 after a success).
    pub failures: u32,
    /// When the current failure streak started.
    pub failing_since_ms: Option<u64>,
    /// Finish times of the consecutive successful probes since the last failure (at most
    /// [`MAX_STREAK`]).
    pub successes: Vec<u64>,
    /// The failure streak that preceded the current success streak: class and length.
    pub recovered_from: Option<(FailureClass, u32)>,
    /// When the current `state()` began, in milliseconds since the Unix epoch.
    pub state_since_ms: Option<u64>,
}

impl HealthView {
    /// Records a probe result.
    pub fn record(&mut self, r: ProbeRecord) {
        let before = self.state();
        match r.failure {
            Some(_) => {
                if self.failures == 0 {
                    self.failing_since_ms = Some(r.at_ms);
                    self.recovered_from = None;
                    self.successes.clear();
                }
                self.failures = self.failures.saturating_add(1);
            }
            None => {
                if self.failures > 0 {
                    let class = self
                        .last
                        .as_ref()
                        .and_then(|l| l.failure)
                        .unwrap_or(FailureClass::ServerError);
                    self.recovered_from = Some((class, self.failures));
                    self.failures = 0;
                    self.failing_since_ms = None;
                    self.successes.clear();
                }
                if self.successes.len() < MAX_STREAK {
                    self.successes.push(r.at_ms);
                }
            }
        }
        let at = r.at_ms;
        self.last = Some(r);
        if self.state() != before || self.state_since_ms.is_none() {
            self.state_since_ms = Some(at);
        }
    }

    /// The state shown in status: `Unknown`, `Healthy` or the class of the last failure.
    pub fn state(&self) -> &'static str {
        match &self.last {
            None => "Unknown",
            Some(r) => r.failure.map(FailureClass::as_str).unwrap_or("Healthy"),
        }
    }
}

impl HealthView {
    /// A view restored from a backend's status as an earlier operator wrote it (`state`,
    /// `lastProbeTime`, `lastTransitionTime`, `message`), so that a new leader starts from the
    /// last decisions instead of forgetting every failure. `None` when status says nothing useful.
    pub fn from_status(
        state: &str,
        last_probe_ms: Option<u64>,
        since_ms: Option<u64>,
        latency_ms: Option<u32>,
        message: Option<&str>,
    ) -> Option<HealthView> {
        let at_ms = last_probe_ms?;
        let failure = if state == "Healthy" {
            None
        } else {
            Some(
                FailureClass::ALL
                    .into_iter()
                    .find(|c| c.as_str() == state)?,
            )
        };
        let mut view = HealthView {
            last: Some(ProbeRecord {
                at_ms,
                latency_ms: latency_ms.unwrap_or(0),
                failure,
                message: message
                    .and_then(|m| m.strip_prefix("probe failed: "))
                    .unwrap_or("restored from status")
                    .to_string(),
                retry_after_ms: None,
            }),
            state_since_ms: since_ms.or(Some(at_ms)),
            ..Default::default()
        };
        match failure {
            Some(_) => {
                view.failures = MAX_STREAK as u32;
                view.failing_since_ms = view.state_since_ms;
            }
            None => view.successes = vec![at_ms; MAX_STREAK],
        }
        Some(view)
    }
}

/// A route's reading of a backend's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assessment {
    /// Serve in its normal position.
    Usable,
    /// Keep as a last resort, behind every usable backend: (class, why).
    Demoted(FailureClass, String),
    /// Never use (an observed region block).
    Excluded(FailureClass, String),
}

/// The route's settings that read a [`HealthView`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub unhealthy: u32,
    pub healthy: u32,
    pub failback_delay_ms: u64,
    pub interval_ms: u64,
    pub failover_on: Vec<FailureClass>,
}

/// Reads `view` for a route at time `now_ms`. Returns the assessment and, when it will change with
/// time alone (a cooldown or a failback delay ending), the time it changes.
pub fn assess(view: &HealthView, t: &Thresholds, now_ms: u64) -> (Assessment, Option<u64>) {
    let counts = |c: FailureClass| t.failover_on.contains(&c);
    let Some(last) = &view.last else {
        return (Assessment::Usable, None);
    };
    if view.failures > 0 {
        let class = last.failure.unwrap_or(FailureClass::ServerError);
        if !counts(class) || view.failures < t.unhealthy {
            return (Assessment::Usable, None);
        }
        let why = format!("probe failed: {}", last.message);
        return match class {
            FailureClass::RegionBlocked => (Assessment::Excluded(class, why), None),
            FailureClass::RateLimited => {
                let until = last.at_ms + last.retry_after_ms.unwrap_or(t.interval_ms);
                if now_ms >= until {
                    (Assessment::Usable, None)
                } else {
                    (
                        Assessment::Demoted(
                            class,
                            format!("{why}; cooling down until its retry-after passes"),
                        ),
                        Some(until),
                    )
                }
            }
            _ => (Assessment::Demoted(class, why), None),
        };
    }
    // Healthy now: did it recover from a failure that took it out of rotation?
    let Some((class, streak)) = view.recovered_from else {
        return (Assessment::Usable, None);
    };
    if !counts(class) || streak < t.unhealthy || class == FailureClass::RateLimited {
        return (Assessment::Usable, None);
    }
    let needed = t.healthy.max(1) as usize;
    if view.successes.len() < needed {
        return (
            Assessment::Demoted(
                class,
                format!(
                    "recovering from {class}: {} of {needed} consecutive successful probes",
                    view.successes.len()
                ),
            ),
            None,
        );
    }
    let back_at = view.successes[needed - 1] + t.failback_delay_ms;
    if now_ms >= back_at {
        (Assessment::Usable, None)
    } else {
        (
            Assessment::Demoted(
                class,
                format!(
                    "recovered from {class}; failing back after {} s of health",
                    t.failback_delay_ms / 1000
                ),
            ),
            Some(back_at),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Thresholds {
        Thresholds {
            unhealthy: 1,
            healthy: 2,
            failback_delay_ms: 10_000,
            interval_ms: 1_000,
            failover_on: FailureClass::all(),
        }
    }

    fn probe(v: &mut HealthView, at_ms: u64, failure: Option<FailureClass>) {
        v.record(ProbeRecord {
            at_ms,
            latency_ms: 5,
            failure,
            message: "m".into(),
            retry_after_ms: None,
        });
    }

    #[test]
    fn unknown_and_healthy_are_usable() {
        let mut v = HealthView::default();
        assert_eq!(assess(&v, &t(), 0).0, Assessment::Usable);
        probe(&mut v, 1, None);
        assert_eq!(assess(&v, &t(), 2).0, Assessment::Usable);
        assert_eq!(v.state(), "Healthy");
    }

    #[test]
    fn region_block_excludes_and_failback_waits_for_threshold_and_delay() {
        let mut v = HealthView::default();
        probe(&mut v, 1_000, Some(FailureClass::RegionBlocked));
        assert!(matches!(
            assess(&v, &t(), 1_000).0,
            Assessment::Excluded(..)
        ));
        probe(&mut v, 2_000, None);
        assert!(matches!(assess(&v, &t(), 2_000).0, Assessment::Demoted(..)));
        probe(&mut v, 3_000, None);
        let (a, until) = assess(&v, &t(), 3_000);
        assert!(matches!(a, Assessment::Demoted(..)));
        assert_eq!(until, Some(13_000));
        assert_eq!(assess(&v, &t(), 13_000).0, Assessment::Usable);
    }

    #[test]
    fn rate_limit_cools_down_for_retry_after_only() {
        let mut v = HealthView::default();
        v.record(ProbeRecord {
            at_ms: 1_000,
            latency_ms: 1,
            failure: Some(FailureClass::RateLimited),
            message: "429".into(),
            retry_after_ms: Some(5_000),
        });
        let (a, until) = assess(&v, &t(), 2_000);
        assert!(matches!(
            a,
            Assessment::Demoted(FailureClass::RateLimited, _)
        ));
        assert_eq!(until, Some(6_000));
        assert_eq!(assess(&v, &t(), 6_000).0, Assessment::Usable);
        // A success after a rate limit needs no failback delay.
        probe(&mut v, 7_000, None);
        assert_eq!(assess(&v, &t(), 7_000).0, Assessment::Usable);
    }

    #[test]
    fn classes_not_in_failover_on_and_streaks_below_threshold_do_not_count() {
        let mut th = t();
        th.failover_on = vec![FailureClass::RegionBlocked];
        let mut v = HealthView::default();
        probe(&mut v, 1, Some(FailureClass::ServerError));
        assert_eq!(assess(&v, &th, 1).0, Assessment::Usable);
        let mut th = t();
        th.unhealthy = 3;
        probe(&mut v, 2, Some(FailureClass::ServerError));
        assert_eq!(assess(&v, &th, 2).0, Assessment::Usable);
        probe(&mut v, 3, Some(FailureClass::ServerError));
        assert!(matches!(assess(&v, &th, 3).0, Assessment::Demoted(..)));
    }

    #[test]
    fn a_flapping_backend_stays_demoted() {
        let mut v = HealthView::default();
        for i in 0..20u64 {
            let failure = (i % 2 == 0).then_some(FailureClass::ServerError);
            probe(&mut v, i * 1_000, failure);
            assert!(
                matches!(assess(&v, &t(), i * 1_000 + 500).0, Assessment::Demoted(..)),
                "probe {i}"
            );
        }
    }
}
