//! The admin HTTP port: health and readiness, Prometheus metrics, the REST API under `/api/v1`
//! (with its OpenAPI document) and the web UI at `/`.
//!
//! **Boundary:** the API reads budgets and statuses from the ledger's memory and changes them
//! through the store (audited), then reloads the ledger's policy; it never touches the hot path.

pub mod api;
pub mod auth;
pub mod problem;
mod ui;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::ledger::Ledger;
use crate::store::Store;

#[derive(Clone)]
pub struct AdminState {
    pub ledger: Arc<Ledger>,
    pub store: Store,
    pub tokens: Arc<[auth::AdminToken]>,
    /// The output bound `check` assumes when the request gives none.
    pub default_output_tokens: u64,
    pub cors_origins: Vec<String>,
    /// Requests are admitted before any budget state is known (`admission.no_state = "allow"`),
    /// so the replica is ready to take traffic from the start.
    pub serves_without_state: bool,
}

pub fn router(state: AdminState) -> Router {
    let (api, mut doc) = api::routes();
    doc.servers = Some(vec![utoipa::openapi::Server::new("/api/v1")]);
    let doc = axum::body::Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
    let api = api
        .fallback(|| async { problem::Problem::not_found("no such API route") })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.tokens),
            auth::require,
        ));
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/api/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], doc) }
            }),
        )
        .nest("/api/v1", api)
        .merge(ui::routes())
        .with_state(state.clone());
    if !state.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = state
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([
                    Method::GET,
                    Method::POST,
                    Method::PUT,
                    Method::PATCH,
                    Method::DELETE,
                ])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app
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

/// Ready once policy and counters were loaded (from the store, or from the local snapshot when the
/// store is unreachable at start). A store outage afterwards does not make the process unready —
/// admission continues from memory and debits are journaled — so the body reports it
/// (`store_ok`, `queued`) instead of failing the probe and taking every replica out. Draining
/// (shutdown has begun) is unready.
async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let loaded = s.ledger.is_ready();
    let store_ok = s.ledger.store_ok();
    let draining = s.ledger.is_draining();
    let code = if (loaded || s.serves_without_state) && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let status = match (draining, loaded, store_ok) {
        (true, _, _) => "draining",
        (false, false, _) => "loading",
        (false, true, true) => "ready",
        (false, true, false) => "degraded",
    };
    (
        code,
        Json(
            json!({"status": status, "loaded": loaded, "store_ok": store_ok, "queued": s.ledger.queue_depth()}),
        ),
    )
}
