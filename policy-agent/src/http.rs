//! `/healthz` (the process serves), `/readyz` (it has a configuration and, unless every rule
//! fails open, a store that answers) and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::limiter::Limiter;
use crate::store::CounterStore;

pub fn router<S: CounterStore>(limiter: Arc<Limiter<S>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics::<S>))
        .with_state(limiter)
}

async fn readyz<S: CounterStore>(State(limiter): State<Arc<Limiter<S>>>) -> impl IntoResponse {
    match limiter.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn metrics<S: CounterStore>(State(limiter): State<Arc<Limiter<S>>>) -> impl IntoResponse {
    limiter.metrics().store_up.set(i64::from(limiter.store().is_up()));
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        limiter.metrics().encode(),
    )
}
