//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process answers: always
//! 200) and `/readyz` (200 while streaming from Postgres with Redis reachable, else 503).

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::telemetry::health;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for metrics (set metrics.listen to a free address, or \"\" to disable)")]
pub struct ListenError {
    pub(crate) addr: String,
    #[source]
    pub(crate) source: std::io::Error,
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install_recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&crate::telemetry::metrics::SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(
                            crate::telemetry::metrics::BATCH_SIZE_TRANSACTIONS.to_string(),
                        ),
                        &crate::telemetry::metrics::BATCH_SIZE_BUCKETS,
                    )
                })
                .and_then(|b| b.install_recorder())
                .unwrap_or_else(|_| {
                    // Another recorder is installed (embedding): serve an empty registry.
                    metrics_exporter_prometheus::PrometheusBuilder::new()
                        .build_recorder()
                        .handle()
                });
            crate::telemetry::metrics::describe();
            handle
        })
        .clone()
}

/// Binds `addr` and serves until the process ends. Returns the bound address (port 0 works).
pub async fn serve(addr: &str, handle: PrometheusHandle) -> Result<SocketAddr, ListenError> {
    let err = |source| ListenError {
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { handle.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

async fn readyz() -> (StatusCode, String) {
    let streaming = health::streaming();
    let redis = health::redis_up();
    let body = format!("streaming: {streaming}\nredis: {redis}\n");
    if streaming && redis {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
