//! The sidecar's server (`llmroute gateway shutdown-manager`): `GET /shutdown/ready` (Envoy's
//! preStop, answered once the drain is done) and `GET /metrics` (the Pod's usage counters) on its
//! port; `GET /usage` (the counts budgets are counted from) and `POST /usage/ack` on a port of their
//! own, over mutual TLS, for the operator leader only ([`super::tls`]). It runs the usage-log
//! follower ([`super::follow`]) beside them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use super::counters::UsageCounters;
use super::drain::{DRAINED_FILE, READY_PATH};
use super::follow::{self, Follower};
use crate::gateway::objects;

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
    /// Where the usage counts are served to the operator; None: they are not (counted for the
    /// metrics only).
    pub usage_endpoint: Option<UsageEndpoint>,
}

/// The usage endpoint: its address and the directory of the gateway's certificate (`tls.crt`,
/// `tls.key`, `ca.crt`).
#[derive(Clone, Debug)]
pub struct UsageEndpoint {
    pub addr: SocketAddr,
    pub cert_dir: PathBuf,
}

struct ManagerState {
    usage: Arc<UsageCounters>,
    /// Where counts are checkpointed before they are served (with a usage log).
    checkpoint: Option<PathBuf>,
    state_dir: PathBuf,
    ready_timeout: Duration,
    /// Set on SIGTERM: waiters are answered at once so the process can exit.
    stopping: AtomicBool,
    /// The drained file's content was logged.
    logged: AtomicBool,
    /// Admission's files (with a usage log: in its directory).
    leases: Option<super::leases::Leases>,
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
/// sidecar resumes from them); when that fails, none are served. A read acknowledges nothing: only
/// `POST /usage/ack` does ([`ack`]), so a scraper cannot make a draining Pod leave with counts the
/// operator never stored.
async fn usage(State(state): State<Arc<ManagerState>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let report = tokio::task::spawn_blocking(move || {
        match &state.checkpoint {
            Some(path) => state
                .usage
                .persist(|c| follow::write_checkpoint(path, c))
                .map(|(report, _)| report),
            None => Ok(state.usage.report()),
        }
        .map(|mut report| {
            report.leases = state.leases.as_ref().and_then(|l| l.holding(&state.usage));
            report
        })
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

/// What the reader acknowledges: the counts of `boot` up to `seq` answers are stored.
#[derive(serde::Deserialize)]
pub struct Ack {
    pub boot: String,
    pub seq: u64,
}

/// `POST /usage/ack` (JSON [`Ack`]): the operator leader stored the counts it read; a stopping
/// sidecar waits for this before it exits. 409 when the boot id is not this process's.
async fn ack(
    State(state): State<Arc<ManagerState>>,
    axum::Json(ack): axum::Json<Ack>,
) -> StatusCode {
    if state.usage.acknowledge(&ack.boot, ack.seq) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CONFLICT
    }
}

/// `POST /usage/lease` (JSON [`crate::usage::lease::Lease`]): the operator leader's grants for
/// this Pod's Envoy, written for its admission filter. 409 when they are for another Envoy
/// process than the one running.
async fn lease(
    State(state): State<Arc<ManagerState>>,
    axum::Json(lease): axum::Json<crate::usage::lease::Lease>,
) -> (StatusCode, String) {
    let Some(leases) = &state.leases else {
        return (StatusCode::NOT_FOUND, "no admission here\n".into());
    };
    match leases.grant(lease) {
        Ok(()) => (StatusCode::NO_CONTENT, String::new()),
        Err(e @ super::leases::LeaseError::OtherProcess { .. }) => {
            (StatusCode::CONFLICT, format!("{e}\n"))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot write the operator's lease");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    }
}

/// Path of the cumulative counts budgets are counted from.
pub const USAGE_PATH: &str = objects::USAGE_PATH;
/// Path of their acknowledgement.
pub const USAGE_ACK_PATH: &str = objects::USAGE_ACK_PATH;
/// Path of the leases.
pub const USAGE_LEASE_PATH: &str = objects::USAGE_LEASE_PATH;

/// Path of the usage metrics.
pub const METRICS_PATH: &str = "/metrics";

/// The manager's routes: `GET` [`READY_PATH`] and [`METRICS_PATH`].
fn router(state: Arc<ManagerState>) -> Router {
    Router::new()
        .route(READY_PATH, get(ready))
        .route(METRICS_PATH, get(metrics))
        .with_state(state)
}

/// The usage endpoint's routes: `GET` [`USAGE_PATH`], `POST` [`USAGE_ACK_PATH`].
fn usage_router(state: Arc<ManagerState>) -> Router {
    Router::new()
        .route(USAGE_PATH, get(usage))
        .route(USAGE_ACK_PATH, axum::routing::post(ack))
        .route(USAGE_LEASE_PATH, axum::routing::post(lease))
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
            let (follower, counters) = Follower::open(log, &opts.namespace);
            let counters = Arc::new(counters);
            let checkpoint = follower.checkpoint_path().to_path_buf();
            let (c, stop) = (counters.clone(), stop_following.clone());
            let thread = std::thread::Builder::new()
                .name("usage-log".into())
                .spawn(move || follow::follow(follower.echo(std::io::stdout()), c, stop))?;
            (counters, Some(checkpoint), Some(thread))
        }
        None => (Arc::new(UsageCounters::new(&opts.namespace)), None, None),
    };
    let state = Arc::new(ManagerState {
        usage,
        checkpoint,
        state_dir: opts.state_dir,
        ready_timeout: opts.ready_timeout,
        stopping: AtomicBool::new(false),
        logged: AtomicBool::new(false),
        leases: opts
            .usage_log
            .as_deref()
            .and_then(std::path::Path::parent)
            .map(super::leases::Leases::new),
    });
    // What answers did not use of their reservations goes back to the module's tokens-per-minute
    // buckets as they are counted.
    if state.leases.is_some() {
        let (s, stop) = (state.clone(), stop_following.clone());
        std::thread::Builder::new()
            .name("usage-refunds".into())
            .spawn(move || {
                let mut last = String::new();
                while !stop.load(Ordering::SeqCst) {
                    if let Some(leases) = &s.leases
                        && let Err(e) = leases.write_refunds(&s.usage, &mut last)
                    {
                        tracing::debug!(error = %e, "cannot write the refunds file");
                    }
                    std::thread::sleep(REFUNDS_EVERY);
                }
            })?;
    }
    // The usage endpoint outlives the manager's port: a stopping sidecar waits for the operator
    // to read and acknowledge its last counts there.
    let (usage_stop, usage_stopped) = tokio::sync::oneshot::channel::<()>();
    let usage_server = match opts.usage_endpoint {
        Some(endpoint) => {
            let listener = super::tls::TlsListener::bind(endpoint.addr, endpoint.cert_dir).await?;
            tracing::info!(addr = %endpoint.addr, path = USAGE_PATH, "usage counts served to the operator (mutual TLS)");
            let served = axum::serve(listener, usage_router(state.clone())).with_graceful_shutdown(
                async move {
                    let _ = usage_stopped.await;
                },
            );
            Some(tokio::spawn(async move { served.await }))
        }
        None => None,
    };
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
    let _ = usage_stop.send(());
    if let Some(server) = usage_server {
        let _ = server.await;
    }
    // A last read of the log and a last checkpoint.
    stop_following.store(true, Ordering::SeqCst);
    if let Some(thread) = follower {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    served
}

/// How often the refunds file is brought up to date (the log is read every 0.2 s too).
const REFUNDS_EVERY: Duration = Duration::from_millis(200);

/// How long a stopping sidecar waits for Envoy's last access-log lines (written out every second)
/// to be counted.
const LAST_LOG_WAIT: Duration = Duration::from_millis(1500);

/// How long a stopping sidecar waits for the operator leader to read its last counts: more than
/// the leader's default `--usage-interval` (10 s), well within the Pod's termination grace period.
pub const LAST_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// The counts of a Pod that goes away would go with it: after Envoy's last batch, wait (bounded)
/// until the leader read everything counted (it reads a replica that left a few more times).
async fn last_read(usage: &UsageCounters) {
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
    use crate::agent::drain::{
        ADMIN_CALL_TIMEOUT, DEFAULT_MAX_DRAIN, DEFAULT_MIN_DRAIN, DEFAULT_READY_TIMEOUT,
    };

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
            crate::api::duration_ms(&request),
            Ok(objects::MAX_DRAIN_SECONDS as u64 * 1000)
        );
    }
}
