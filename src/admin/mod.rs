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
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Alive: the process serves HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: policy and counters were loaded from the store, and the store answered last time.
async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let loaded = s.ledger.is_ready();
    let store_ok = s.ledger.store_ok();
    let code = if loaded && store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(
            json!({"ready": loaded && store_ok, "loaded": loaded, "store_ok": store_ok, "queued": s.ledger.queue_depth()}),
        ),
    )
}
