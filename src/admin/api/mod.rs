//! The REST API under `/api/v1`: budgets, status, check, prices, groups, principals and models,
//! usage reports, deny events and the audit log. The OpenAPI document is generated from these
//! handlers (`utoipa`), so it cannot drift from them.
//!
//! Conventions: amounts in a budget's unit are decimal strings (`"1500"` tokens, `"12.5"` USD —
//! exact, no floating point), times are RFC 3339 UTC, lists are pages (`limit`, `offset`,
//! `next_offset`), errors are RFC 9457 problem documents.

mod budgets;
mod catalog;
mod reports;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AdminState;
use super::auth::Caller;
use super::problem::Problem;
use crate::policy::{NanoUsd, Unit};
use crate::store::Actor;

pub const MAX_PAGE: i64 = 1000;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tokenbudget admin API",
        description = "Budgets, prices, groups, usage reports and audit log of tokenbudget. \
            Authenticate with `Authorization: Bearer <token>`; tokens with the viewer role may only read.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "budgets", description = "Budgets, their status, and the dry-run check"),
        (name = "catalog", description = "Prices, groups, principals and models"),
        (name = "reports", description = "Usage, denies and the audit log"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The API's routes (authenticated by the caller of this function) and its OpenAPI document.
pub fn routes() -> (axum::Router<AdminState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(budgets::list, budgets::create))
        .routes(routes!(
            budgets::get,
            budgets::replace,
            budgets::patch,
            budgets::delete
        ))
        .routes(routes!(budgets::budget_status))
        .routes(routes!(budgets::status))
        .routes(routes!(budgets::check))
        .routes(routes!(catalog::list_prices, catalog::set_price))
        .routes(routes!(catalog::list_groups))
        .routes(routes!(catalog::get_group))
        .routes(routes!(catalog::add_member, catalog::remove_member))
        .routes(routes!(catalog::principals))
        .routes(routes!(catalog::models))
        .routes(routes!(reports::timeseries))
        .routes(routes!(reports::top))
        .routes(routes!(reports::denies))
        .routes(routes!(reports::audit))
        .routes(routes!(reports::me))
        .split_for_parts()
}

/// A page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub offset: i64,
    pub limit: i64,
    /// The offset of the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<i64>,
}

/// A page of a list, optionally searched (case-insensitive).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// Case-insensitive search.
    pub q: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    #[param(minimum = 0)]
    pub offset: Option<i64>,
}

/// A page of a list.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    #[param(minimum = 0)]
    pub offset: Option<i64>,
}

/// Checks `limit` and `offset` query parameters.
pub fn paging(limit: Option<i64>, offset: Option<i64>) -> Result<(i64, i64), Problem> {
    let limit = limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Problem::invalid(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    let offset = offset.unwrap_or(0);
    if !(0..=i64::from(i32::MAX)).contains(&offset) {
        return Err(Problem::invalid("offset", "must be 0 or more"));
    }
    Ok((limit, offset))
}

impl<T> Page<T> {
    /// A page cut from a complete list.
    pub fn slice(all: Vec<T>, limit: i64, offset: i64) -> Page<T> {
        let total = all.len();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(total);
        let n = usize::try_from(limit).unwrap_or(0);
        let items: Vec<T> = all.into_iter().skip(start).take(n).collect();
        let end = start + items.len();
        Page {
            items,
            offset,
            limit,
            next_offset: (end < total).then(|| i64::try_from(end).unwrap_or(i64::MAX)),
        }
    }

    /// A page fetched with `limit + 1` rows: the extra row only says another page exists.
    pub fn fetched(mut rows: Vec<T>, limit: i64, offset: i64) -> Page<T> {
        let more = rows.len() > usize::try_from(limit).unwrap_or(0);
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        Page {
            next_offset: more.then(|| offset + limit),
            items: rows,
            offset,
            limit,
        }
    }
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub fn rfc3339_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(rfc3339)
        .unwrap_or_default()
}

/// Parses an RFC 3339 query parameter.
pub fn parse_time(field: &str, v: &str) -> Result<DateTime<Utc>, Problem> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            Problem::invalid(
                field,
                format!("{e}: expected RFC 3339, like 2026-12-01T00:00:00Z"),
            )
        })
}

/// An amount in a budget's unit, as an exact decimal string.
pub fn amount(unit: Unit, v: u64) -> String {
    match unit {
        Unit::Tokens => v.to_string(),
        Unit::Usd => NanoUsd(v).to_string(),
    }
}

/// The audit actor of an authenticated API call.
pub fn actor(s: &AdminState, caller: &Caller) -> Actor {
    Actor {
        name: format!("token:{}", caller.name),
        ts_ms: s.ledger.clock().now().timestamp_millis(),
    }
}

/// Reloads the policy after a change, so this replica enforces it at once.
pub async fn reload(s: &AdminState) -> Result<(), Problem> {
    crate::ledger::writer::reload_policy(&s.ledger, &s.store)
        .await
        .map_err(Problem::from)
}

/// Shared handle for handlers.
pub type St = axum::extract::State<AdminState>;
