//! The gateway Pod's drain (`llmroute gateway shutdown`, the sidecar's preStop command): Envoy
//! drained through its admin interface until no request is in flight, then [`DRAINED_FILE`]
//! written for the server ([`super::server`]) to release Envoy's own preStop. The sequence is in
//! [`super`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::gateway::objects;

/// The path whose GET blocks until the drain is done (Envoy container's preStop httpGet).
pub const READY_PATH: &str = objects::SHUTDOWN_READY_PATH;
/// Port of the manager.
pub const DEFAULT_MANAGER_PORT: u16 = objects::SHUTDOWN_MANAGER_PORT;
/// Where the manager and `shutdown` share state (an emptyDir mounted in the sidecar).
pub const DEFAULT_STATE_DIR: &str = objects::SHUTDOWN_STATE_DIR;
/// The file `shutdown` writes into the state directory once the drain is over.
pub const DRAINED_FILE: &str = "drained";
/// Minimum drain: the time a terminating Pod's removal from the Service's EndpointSlices takes to
/// reach kube-proxy (and any proxy in front) everywhere. Requests arriving meanwhile are answered.
pub const DEFAULT_MIN_DRAIN: Duration = Duration::from_secs(objects::MIN_DRAIN_SECONDS as u64);
/// Maximum drain: the default request timeout of a route (`spec.policy.timeouts.request`, 300 s).
/// With default timeouts, Envoy itself ends every request before the drain would give up on it.
pub const DEFAULT_MAX_DRAIN: Duration = Duration::from_secs(objects::MAX_DRAIN_SECONDS as u64);
/// How long the manager holds a GET of [`READY_PATH`] at most: the maximum drain, plus time for
/// `shutdown` to reach the admin interface and write its file (still within the grace period).
pub const DEFAULT_READY_TIMEOUT: Duration =
    Duration::from_secs(objects::MAX_DRAIN_SECONDS as u64 + 10);
/// Envoy's stat of the requests in flight on the front listener (its HTTP connection manager's stat
/// prefix is [`crate::gateway::envoy::FRONT`]).
pub fn active_requests_stat() -> String {
    format!("http.{}.downstream_rq_active", crate::gateway::envoy::FRONT)
}

/// Bound of each call to the admin interface (it answers in milliseconds on localhost).
pub(crate) const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Failed reads of the active-request stat in a row after which Envoy is taken to be gone.
const MAX_STAT_FAILURES: u32 = 3;

/// What `shutdown` does.
#[derive(Clone, Debug)]
pub struct DrainOptions {
    /// Envoy's admin port on 127.0.0.1.
    pub admin_port: u16,
    pub min_drain: Duration,
    pub max_drain: Duration,
    /// Pause between two reads of the active-request stat.
    pub poll: Duration,
    /// Directory in which [`DRAINED_FILE`] is written.
    pub state_dir: PathBuf,
}

/// How a drain ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// No request active any more (after the minimum drain).
    Drained,
    /// The maximum drain passed with requests still active (their number at the last read).
    TimedOut { active: u64 },
    /// The admin interface could not be reached: nothing to drain, or nothing left to ask.
    AdminUnreachable(String),
}

impl DrainOutcome {
    /// One line for logs.
    pub fn summary(&self) -> String {
        match self {
            DrainOutcome::Drained => "drained".into(),
            DrainOutcome::TimedOut { active } => {
                format!("maximum drain time reached with {active} requests in flight")
            }
            DrainOutcome::AdminUnreachable(e) => format!("not drained, admin unreachable: {e}"),
        }
    }
}

/// A plain-HTTP client for Envoy's admin interface on localhost (no TLS involved; the *ring* provider
/// is installed because reqwest's rustls backend wants a process-wide provider to build at all).
fn admin_client() -> reqwest::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(ADMIN_CALL_TIMEOUT)
        .connect_timeout(ADMIN_CALL_TIMEOUT)
        .no_proxy()
        .build()
}

/// Starts Envoy's graceful drain: `POST /drain_listeners?graceful`.
///
/// - `graceful`: Envoy enters its drain period (`--drain-time-s`, strategy `--drain-strategy`)
///   before it stops the listeners: meanwhile it still accepts connections, but with the
///   `immediate` strategy every HTTP/1 response carries `connection: close` and every HTTP/2
///   connection gets a GOAWAY, so clients move on; requests in flight run to their end. At the end
///   of the period the listeners stop accepting (established connections are left alone).
/// - Every listener is drained, not only inbound ones (`inboundonly`): that option leaves alone the
///   listeners without a `traffic_direction`, and the gateway's set none (measured with Envoy 1.40:
///   with `inboundonly` no response got `connection: close`). Draining the internal per-account
///   listeners too only closes the in-process connections behind each answer.
///
/// The admin listener is not a listener of the configuration: it keeps answering, so the stats can
/// be read during the drain.
async fn start_drain(client: &reqwest::Client, admin_port: u16) -> Result<(), String> {
    let url = format!("http://127.0.0.1:{admin_port}/drain_listeners?graceful");
    let resp = client.post(&url).send().await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url}: HTTP {}", resp.status()))
    }
}

/// Reads the requests in flight on the front listener: `GET /stats?filter=<regex>` answers
/// `name: value` lines for the stats whose name matches.
async fn active_requests(client: &reqwest::Client, admin_port: u16) -> Result<u64, String> {
    let name = active_requests_stat();
    let url = format!(
        "http://127.0.0.1:{admin_port}/stats?filter=^{}$",
        name.replace('.', "\\.")
    );
    let resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let body = resp.text().await.map_err(|e| e.to_string())?;
    parse_stat(&body, &name).ok_or_else(|| format!("no {name} in the admin's answer: {body:?}"))
}

/// The value of stat `name` in the admin's `/stats` text (`name: value` per line).
pub fn parse_stat(body: &str, name: &str) -> Option<u64> {
    body.lines().find_map(|l| {
        let (k, v) = l.split_once(": ")?;
        (k.trim() == name).then(|| v.trim().parse().ok())?
    })
}

/// Drains Envoy (see the module documentation), then marks the drain done for the manager. Always
/// returns within about `max_drain` plus one admin call: every wait is bounded.
pub async fn drain(opts: &DrainOptions) -> DrainOutcome {
    let started = Instant::now();
    let outcome = drain_envoy(opts, started).await;
    match &outcome {
        DrainOutcome::Drained => tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "gateway drained: no request in flight"
        ),
        DrainOutcome::TimedOut { active } => tracing::warn!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            active,
            "maximum drain time reached with requests still in flight; they are cut when Envoy stops"
        ),
        DrainOutcome::AdminUnreachable(e) => tracing::error!(
            error = %e,
            "Envoy's admin interface is unreachable: not draining"
        ),
    }
    let summary = format!(
        "{} after {:.1}s\n",
        outcome.summary(),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = mark_drained(&opts.state_dir, &summary) {
        tracing::error!(error = %e, dir = %opts.state_dir.display(), "cannot tell the shutdown manager the drain is done; Envoy's preStop waits for its timeout");
    }
    outcome
}

async fn drain_envoy(opts: &DrainOptions, started: Instant) -> DrainOutcome {
    let client = match admin_client() {
        Ok(c) => c,
        Err(e) => return DrainOutcome::AdminUnreachable(format!("HTTP client: {e}")),
    };
    if let Err(e) = start_drain(&client, opts.admin_port).await {
        return DrainOutcome::AdminUnreachable(e);
    }
    tracing::info!(
        min_drain_s = opts.min_drain.as_secs_f64(),
        max_drain_s = opts.max_drain.as_secs_f64(),
        "Envoy is draining its listeners"
    );
    let deadline = started + opts.max_drain;
    let min_end = started + opts.min_drain.min(opts.max_drain);
    tokio::time::sleep_until(min_end.into()).await;
    let mut failures = 0;
    let mut last_active = 0;
    // Bounded in time by the deadline; each round takes at least `poll` (at least 10 ms).
    let poll = opts.poll.max(Duration::from_millis(10));
    loop {
        match active_requests(&client, opts.admin_port).await {
            Ok(0) => return DrainOutcome::Drained,
            Ok(n) => {
                failures = 0;
                last_active = n;
                tracing::debug!(active = n, "requests still in flight");
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "cannot read the active requests");
                if failures >= MAX_STAT_FAILURES {
                    return DrainOutcome::AdminUnreachable(e);
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return DrainOutcome::TimedOut {
                active: last_active,
            };
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

/// Writes [`DRAINED_FILE`] into `dir`, with a line saying how the drain went: the manager logs it
/// (the kubelet keeps no output of a preStop command that succeeds).
pub fn mark_drained(dir: &Path, summary: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Written under another name and renamed: the manager never reads a half-written file.
    let tmp = dir.join(format!(".{DRAINED_FILE}.tmp"));
    std::fs::write(&tmp, summary)?;
    std::fs::rename(&tmp, dir.join(DRAINED_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_stat_finds_the_exact_name() {
        let body = "http.gateway.downstream_rq_active: 3\nhttp.gateway.downstream_rq_active_x: 9\n";
        assert_eq!(
            parse_stat(body, "http.gateway.downstream_rq_active"),
            Some(3)
        );
        assert_eq!(parse_stat(body, "http.health.downstream_rq_active"), None);
        assert_eq!(parse_stat("x: notanumber\n", "x"), None);
    }

    #[test]
    fn the_stat_is_the_front_listeners() {
        assert_eq!(active_requests_stat(), "http.gateway.downstream_rq_active");
    }
}
