//! The operator's HTTP endpoints: `/healthz` (the process runs), `/readyz` (its watches are
//! synced; a standby replica is ready too, see `serving`) and `/metrics` (Prometheus).

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State as AxumState, http::StatusCode, routing::get};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the HTTP side reads; the controllers write it.
#[derive(Debug, Default)]
pub struct State {
    pub ready: AtomicBool,
    pub metrics: Metrics,
}

impl State {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|AxumState(state): AxumState<Arc<State>>| async move {
                if state.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route(
            "/metrics",
            get(|AxumState(state): AxumState<Arc<State>>| async move {
                ([("content-type", "text/plain; version=0.0.4")], state.metrics.encode())
            }),
        )
        .with_state(state)
}

/// Serves until `shutdown` resolves. The listener is bound by the caller, so tests can use
/// port 0.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
