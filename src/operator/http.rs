//! The operator's own HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the process
//! serves) and `/readyz` (caches synced, or standing by for the leader Lease).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::RuntimeState;
use crate::metrics::Metrics;

/// Serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    runtime: Arc<RuntimeState>,
    leader_election: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics, runtime, leader_election))
        .with_graceful_shutdown(shutdown)
        .await
}

pub fn router(metrics: Arc<Metrics>, runtime: Arc<RuntimeState>, leader_election: bool) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let runtime = runtime.clone();
                async move {
                    if runtime.ready(leader_election) {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        use std::sync::atomic::Ordering::SeqCst;
                        let body = format!(
                            "not ready: leading={} caches synced for {} of {} watch scopes\n",
                            runtime.leading.load(SeqCst),
                            runtime.scopes_synced.load(SeqCst),
                            runtime.scopes.load(SeqCst)
                        );
                        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
                    }
                }
            }),
        )
}
