//! Graceful termination of a gateway Pod: the `llmroute gateway shutdown-manager` sidecar and its
//! preStop command `llmroute gateway shutdown`.
//!
//! When a gateway Pod terminates, the kubelet runs every container's preStop hook, then sends SIGTERM.
//! Envoy exits at once on SIGTERM and cuts the streams in flight, so Envoy must be drained first:
//!
//! 1. The sidecar's preStop (`shutdown`) asks Envoy's admin interface to drain its listeners
//!    gracefully: responses get `connection: close` (HTTP/1) or a GOAWAY (HTTP/2), so clients take
//!    their next requests elsewhere, while the requests in flight continue.
//! 2. It waits a minimum drain time, so the Pod's removal from the Service's endpoints reaches
//!    kube-proxy and the clients (requests still sent here meanwhile are answered), then until no
//!    request is active on the front listener, at most a maximum drain time.
//! 3. It writes [`DRAINED_FILE`] into a directory the manager reads (an emptyDir of the sidecar:
//!    the preStop exec runs in the sidecar's own container), and exits.
//! 4. Envoy's own preStop is an HTTP GET of the manager's [`READY_PATH`], which answers only once that
//!    file exists (or after a timeout): the kubelet sends Envoy its SIGTERM after the drain.
//!
//! Nothing the manager serves starts a drain: a caller on the Pod network can only wait. A file
//! (not an HTTP call) marks the drain done so that no network caller can end the wait early either.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

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
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(2);
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

/// What the manager does.
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    pub addr: SocketAddr,
    pub state_dir: PathBuf,
    /// Longest hold of a GET of [`READY_PATH`].
    pub ready_timeout: Duration,
    /// Envoy's access log, followed to count token usage and printed to stdout; None: not.
    pub usage_log: Option<PathBuf>,
    /// The gateway's namespace (a label of the usage metrics).
    pub namespace: String,
}

struct ManagerState {
    usage: Arc<crate::usage::UsageCounters>,
    /// Where counts are checkpointed before they are served (with a usage log).
    checkpoint: Option<PathBuf>,
    state_dir: PathBuf,
    ready_timeout: Duration,
    /// Set on SIGTERM: waiters are answered at once so the process can exit.
    stopping: AtomicBool,
    /// The drained file's content was logged.
    logged: AtomicBool,
}

/// How often a waiting GET looks for the drained file.
const READY_POLL: Duration = Duration::from_millis(100);

async fn ready(State(state): State<Arc<ManagerState>>) -> (StatusCode, &'static str) {
    let started = Instant::now();
    let file = state.state_dir.join(DRAINED_FILE);
    // Bounded by `ready_timeout` (and by SIGTERM).
    loop {
        if let Ok(summary) = std::fs::read_to_string(&file) {
            if !state.logged.swap(true, Ordering::SeqCst) {
                tracing::info!(drain = summary.trim(), "drain done; Envoy may stop");
            }
            return (StatusCode::OK, "drained\n");
        }
        if state.stopping.load(Ordering::SeqCst) {
            return (StatusCode::OK, "shutdown manager stopping\n");
        }
        if started.elapsed() >= state.ready_timeout {
            tracing::warn!(
                timeout_s = state.ready_timeout.as_secs_f64(),
                "no drain completed in time; letting Envoy stop"
            );
            return (StatusCode::OK, "timeout\n");
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// `GET /metrics`: the Pod's usage counters (Prometheus text).
async fn metrics(State(state): State<Arc<ManagerState>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.usage.encode(),
    )
}

/// `GET /usage`: the Pod's cumulative counts per route and backend, read by the operator leader
/// for budgets (see `usage::ledger`). Counts of a usage log are checkpointed first (a restarted
/// sidecar resumes from them); when that fails, none are served.
async fn usage(State(state): State<Arc<ManagerState>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let report = tokio::task::spawn_blocking(move || match &state.checkpoint {
        Some(path) => state
            .usage
            .persist(true, |c| crate::usage::log::write_checkpoint(path, c))
            .map(|(report, _)| report),
        None => Ok(state.usage.report()),
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match report {
        Ok(report) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&report).expect("counts serialize"),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot checkpoint the usage counts: not serving them");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("usage counts not checkpointed: {e}\n"),
            )
                .into_response()
        }
    }
}

/// Path of the cumulative counts budgets are counted from.
pub const USAGE_PATH: &str = "/usage";

/// Path of the usage metrics.
pub const METRICS_PATH: &str = "/metrics";

/// The manager's routes: `GET` [`READY_PATH`] and [`METRICS_PATH`].
fn router(state: Arc<ManagerState>) -> Router {
    Router::new()
        .route(READY_PATH, get(ready))
        .route(METRICS_PATH, get(metrics))
        .route(USAGE_PATH, get(usage))
        .with_state(state)
}

/// Serves [`READY_PATH`] on `opts.addr` until `stop` completes. A drained file left in the state
/// directory by an earlier run is removed first (the kubelet does not restart containers of a
/// terminating Pod, so a file present at start cannot be this Pod's current drain).
pub async fn serve_manager(
    opts: ManagerOptions,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stale = opts.state_dir.join(DRAINED_FILE);
    match std::fs::remove_file(&stale) {
        Ok(()) => {
            tracing::info!(file = %stale.display(), "removed a drained file of an earlier run")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %stale.display(), error = %e, "cannot remove a stale drained file")
        }
    }
    let listener = tokio::net::TcpListener::bind(opts.addr).await?;
    tracing::info!(addr = %listener.local_addr()?, path = READY_PATH, "shutdown manager serving");
    let stop_following = Arc::new(AtomicBool::new(false));
    let (usage, checkpoint, follower) = match &opts.usage_log {
        Some(log) => {
            let (follower, counters) = crate::usage::log::Follower::open(log, &opts.namespace);
            let counters = Arc::new(counters);
            let checkpoint = follower.checkpoint_path().to_path_buf();
            let (c, stop) = (counters.clone(), stop_following.clone());
            let thread = std::thread::Builder::new()
                .name("usage-log".into())
                .spawn(move || {
                    crate::usage::log::follow(follower.echo(std::io::stdout()), c, stop)
                })?;
            (counters, Some(checkpoint), Some(thread))
        }
        None => (
            Arc::new(crate::usage::UsageCounters::new(&opts.namespace)),
            None,
            None,
        ),
    };
    let state = Arc::new(ManagerState {
        usage,
        checkpoint,
        state_dir: opts.state_dir,
        ready_timeout: opts.ready_timeout,
        stopping: AtomicBool::new(false),
        logged: AtomicBool::new(false),
    });
    let on_stop = state.clone();
    let counting = opts.usage_log.is_some();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            stop.await;
            tracing::info!("shutdown manager stopping");
            on_stop.stopping.store(true, Ordering::SeqCst);
            if counting && on_stop.usage.unread(true) {
                last_read(&on_stop.usage).await;
            }
        })
        .await;
    // A last read of the log and a last checkpoint.
    stop_following.store(true, Ordering::SeqCst);
    if let Some(thread) = follower {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    served
}

/// How long a stopping sidecar waits for Envoy's last access-log lines (written out every second)
/// to be counted.
const LAST_LOG_WAIT: Duration = Duration::from_millis(1500);

/// How long a stopping sidecar waits for the operator leader to read its last counts: more than
/// the leader's default `--usage-interval` (10 s), well within the Pod's termination grace period.
pub const LAST_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// The counts of a Pod that goes away would go with it: after Envoy's last batch, wait (bounded)
/// until the leader read everything counted (it reads a replica that left a few more times).
async fn last_read(usage: &crate::usage::UsageCounters) {
    tokio::time::sleep(LAST_LOG_WAIT).await;
    let deadline = Instant::now() + LAST_READ_TIMEOUT;
    while usage.unread(false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if usage.unread(false) {
        tracing::warn!(
            timeout_s = LAST_READ_TIMEOUT.as_secs(),
            "stopping with usage counts the operator has not read: budgets miss them"
        );
    } else {
        tracing::info!("the operator read the last usage counts");
    }
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

    #[test]
    fn timings_are_consistent() {
        assert!(DEFAULT_MIN_DRAIN < DEFAULT_MAX_DRAIN);
        assert!(DEFAULT_READY_TIMEOUT > DEFAULT_MAX_DRAIN + ADMIN_CALL_TIMEOUT);
        assert!(
            DEFAULT_READY_TIMEOUT < Duration::from_secs(objects::TERMINATION_GRACE_SECONDS as u64)
        );
        // After the drain, the last usage read still fits in the grace period.
        assert!(
            DEFAULT_READY_TIMEOUT + LAST_LOG_WAIT + LAST_READ_TIMEOUT
                < Duration::from_secs(objects::TERMINATION_GRACE_SECONDS as u64)
        );
        // The maximum drain is a route's default request timeout.
        let request = crate::api::Timeouts::default().request;
        assert_eq!(
            crate::gateway::ir::duration_ms(&request),
            Ok(objects::MAX_DRAIN_SECONDS as u64 * 1000)
        );
    }
}
