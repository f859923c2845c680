//! The admin HTTP port: health and readiness now; the REST API, web UI and metrics build on it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::ledger::Ledger;

#[derive(Clone)]
pub struct AdminState {
    pub ledger: Arc<Ledger>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Prometheus exposition (OpenMetrics text).
async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let m = &s.ledger.metrics;
    m.queue_depth
        .set(i64::try_from(s.ledger.queue_depth()).unwrap_or(i64::MAX));
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// Alive: the process serves HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready once policy and counters were loaded from the store. A store outage afterwards does not
/// make the process unready — admission continues from memory and debits queue — so the body
/// reports it (`store_ok`, `queued`) instead of failing the probe and taking every replica out.
async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let loaded = s.ledger.is_ready();
    let store_ok = s.ledger.store_ok();
    let code = if loaded {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let status = match (loaded, store_ok) {
        (false, _) => "loading",
        (true, true) => "ready",
        (true, false) => "degraded",
    };
    (
        code,
        Json(
            json!({"status": status, "loaded": loaded, "store_ok": store_ok, "queued": s.ledger.queue_depth()}),
        ),
    )
}
