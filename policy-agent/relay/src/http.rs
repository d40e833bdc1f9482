//! `/healthz` (the process runs), `/readyz` (ready: a standby is ready too, it takes over at
//! once) and `/metrics`.

use std::sync::Arc;

use axum::{Router, routing::get};
use tokio::sync::watch;

use crate::metrics::Metrics;

pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    token: watch::Receiver<Option<i64>>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }))
        .route(
            "/metrics",
            get(move || {
                let (metrics, token) = (metrics.clone(), token.clone());
                async move {
                    metrics.active.set(i64::from(token.borrow().is_some()));
                    ([("content-type", "text/plain; version=0.0.4")], metrics.encode())
                }
            }),
        );
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await
}
