//! Usage over time and top consumers (from the hourly rollups), deny events, the audit log, and
//! the caller's own identity.

use axum::Extension;
use axum::extract::State;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Page, St, amount, paging, parse_time, rfc3339, rfc3339_ms};
use crate::admin::AdminState;
use crate::admin::auth::{Caller, Role};
use crate::admin::problem::{ApiQuery, Problem};
use crate::policy::{Unit, principal_key};
use crate::store::{AuditQuery, DenyQuery, UsageBy, UsageQuery};

/// At most this many buckets per model in one time series.
const MAX_BUCKETS: i64 = 5_000;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    Hour,
    Day,
    /// Weeks start on Monday.
    Week,
}

impl Bucket {
    fn secs(self) -> i64 {
        match self {
            Bucket::Hour => 3_600,
            Bucket::Day => 86_400,
            Bucket::Week => 604_800,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Tokens,
    Usd,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum By {
    Principal,
    Model,
}

/// The period and filters of a usage report.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// RFC 3339; default: `until` minus 7 days.
    since: Option<String>,
    /// RFC 3339; default: now.
    until: Option<String>,
    /// Time series only: `hour` (default), `day` or `week` (UTC buckets).
    #[param(inline)]
    bucket: Option<Bucket>,
    /// Time series only: what `value` holds, `tokens` (default) or `usd`.
    #[param(inline)]
    metric: Option<Metric>,
    /// Top only: `principal` (default) or `model`.
    #[param(inline)]
    by: Option<By>,
    /// Only this principal (`user:NAME`, `service_principal:ID`, or a bare user name).
    principal: Option<String>,
    /// Only the members of this group (stored and configured membership).
    group: Option<String>,
    /// Only this model (as reported in usage).
    model: Option<String>,
    /// Top only: how many rows (default 10).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

struct Period {
    since: DateTime<Utc>,
    until: DateTime<Utc>,
}

fn period(
    s: &AdminState,
    since: Option<&str>,
    until: Option<&str>,
    default: Duration,
) -> Result<Period, Problem> {
    let until = match until {
        Some(t) => parse_time("until", t)?,
        None => s.ledger.clock().now(),
    };
    let since = match since {
        Some(t) => parse_time("since", t)?,
        None => until - default,
    };
    if since >= until {
        return Err(Problem::invalid("since", "must be before until"));
    }
    Ok(Period { since, until })
}

async fn usage_query(
    s: &AdminState,
    p: &UsageParams,
    bucket: Bucket,
) -> Result<(Period, UsageQuery), Problem> {
    let period = period(s, p.since.as_deref(), p.until.as_deref(), Duration::days(7))?;
    let mut principals = match &p.principal {
        Some(v) => Some(vec![
            principal_key(v).map_err(|e| Problem::invalid("principal", e))?,
        ]),
        None => None,
    };
    if let Some(g) = &p.group {
        let mut members: Vec<String> = s
            .store
            .list_members()
            .await?
            .into_iter()
            .chain(s.ledger.config_groups().iter().cloned())
            .filter(|(group, _)| group == g)
            .map(|(_, p)| p)
            .collect();
        if let Some(one) = &principals {
            members.retain(|m| one.contains(m));
        }
        principals = Some(members);
    }
    let q = UsageQuery {
        since_ms: period.since.timestamp_millis(),
        until_ms: period.until.timestamp_millis(),
        principals,
        model: p.model.clone(),
        bucket_secs: bucket.secs(),
    };
    Ok((period, q))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Point {
    /// Bucket start, RFC 3339 UTC.
    pub start: String,
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    /// Exact, as a decimal string.
    pub cost_usd: String,
    /// `tokens` or `cost_usd` as a number, per `metric`, for charts.
    pub value: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Timeseries {
    pub since: String,
    pub until: String,
    pub bucket: Bucket,
    pub metric: Metric,
    /// One point per bucket and model with usage, by time, then model.
    pub points: Vec<Point>,
}

/// Usage over time per model, for stacked charts. Buckets come from hourly rollups; a period
/// starting mid-hour includes that whole hour.
#[utoipa::path(get, path = "/usage/timeseries", tag = "reports", params(UsageParams),
    responses(
        (status = 200, body = Timeseries),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn timeseries(
    State(s): St,
    ApiQuery(p): ApiQuery<UsageParams>,
) -> Result<axum::Json<Timeseries>, Problem> {
    paging(p.limit, None)?;
    let bucket = p.bucket.unwrap_or(Bucket::Hour);
    let metric = p.metric.unwrap_or(Metric::Tokens);
    let (period, q) = usage_query(&s, &p, bucket).await?;
    if (q.until_ms - q.since_ms) / 1000 / bucket.secs() > MAX_BUCKETS {
        return Err(Problem::invalid(
            "bucket",
            format!("more than {MAX_BUCKETS} buckets: choose a larger bucket or a shorter period"),
        ));
    }
    let points = s
        .store
        .usage_timeseries(&q)
        .await?
        .into_iter()
        .map(|pt| Point {
            start: rfc3339_ms(pt.start.saturating_mul(1000)),
            value: match metric {
                Metric::Tokens => pt.tokens as f64,
                Metric::Usd => pt.cost.0 as f64 / 1e9,
            },
            model: pt.model,
            requests: pt.requests,
            tokens: pt.tokens,
            cost_usd: pt.cost.to_string(),
        })
        .collect();
    Ok(axum::Json(Timeseries {
        since: rfc3339(period.since),
        until: rfc3339(period.until),
        bucket,
        metric,
        points,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopRow {
    /// The principal key or model.
    pub key: String,
    pub requests: u64,
    pub tokens: u64,
    pub cost_usd: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Top {
    pub since: String,
    pub until: String,
    pub by: By,
    /// Most tokens first.
    pub items: Vec<TopRow>,
}

/// Top consumers (`by=principal`) or most used models (`by=model`) over a period.
#[utoipa::path(get, path = "/usage/top", tag = "reports", params(UsageParams),
    responses(
        (status = 200, body = Top),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn top(
    State(s): St,
    ApiQuery(p): ApiQuery<UsageParams>,
) -> Result<axum::Json<Top>, Problem> {
    let (limit, _) = paging(Some(p.limit.unwrap_or(10)), None)?;
    let by = p.by.unwrap_or(By::Principal);
    let (period, q) = usage_query(&s, &p, Bucket::Hour).await?;
    let rows = s
        .store
        .usage_top(
            &q,
            match by {
                By::Principal => UsageBy::Principal,
                By::Model => UsageBy::Model,
            },
            limit,
        )
        .await?;
    let items = rows
        .into_iter()
        .map(|t| TopRow {
            key: if by == By::Principal {
                t.principal
            } else {
                t.model
            },
            requests: t.requests,
            tokens: t.tokens,
            cost_usd: t.cost.to_string(),
        })
        .collect();
    Ok(axum::Json(Top {
        since: rfc3339(period.since),
        until: rfc3339(period.until),
        by,
        items,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DenyParams {
    /// RFC 3339; default: `until` minus 30 days.
    since: Option<String>,
    /// RFC 3339; default: now.
    until: Option<String>,
    principal: Option<String>,
    /// Only denies by this budget.
    budget: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    #[param(minimum = 0)]
    offset: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DenyView {
    pub at: String,
    /// Envoy's `x-request-id`.
    pub request_id: String,
    pub principal: String,
    pub model: String,
    pub budget: String,
    /// `exhausted`, `never_fits` or `model_not_priced`; prefixed `shadow:` when a shadow budget
    /// would have denied (the request went through).
    pub reason: String,
    pub unit: String,
    /// The budget's usage and limit when it denied, in its unit.
    pub used: String,
    pub limit: String,
}

/// Requests denied by a budget, newest first.
#[utoipa::path(get, path = "/denies", tag = "reports", params(DenyParams),
    responses(
        (status = 200, body = Page<DenyView>),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn denies(
    State(s): St,
    ApiQuery(p): ApiQuery<DenyParams>,
) -> Result<axum::Json<Page<DenyView>>, Problem> {
    let (limit, offset) = paging(p.limit, p.offset)?;
    let period = period(
        &s,
        p.since.as_deref(),
        p.until.as_deref(),
        Duration::days(30),
    )?;
    let principal = p
        .principal
        .as_deref()
        .map(principal_key)
        .transpose()
        .map_err(|e| Problem::invalid("principal", e))?;
    let q = DenyQuery {
        since_ms: period.since.timestamp_millis(),
        until_ms: period.until.timestamp_millis(),
        principal,
        budget: p.budget,
        limit: limit + 1,
        offset,
    };
    let rows = s
        .store
        .deny_events(&q)
        .await?
        .into_iter()
        .map(|d| {
            let unit = if d.unit == "usd" {
                Unit::Usd
            } else {
                Unit::Tokens
            };
            DenyView {
                at: rfc3339_ms(d.ts_ms),
                request_id: d.request_id,
                principal: d.principal,
                model: d.model,
                budget: d.budget_name,
                reason: d.reason,
                unit: unit.as_str().into(),
                used: amount(unit, d.used),
                limit: amount(unit, d.limit),
            }
        })
        .collect();
    Ok(axum::Json(Page::fetched(rows, limit, offset)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Only changes of this budget name, model or group.
    target: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    #[param(minimum = 0)]
    offset: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub id: i64,
    pub at: String,
    /// `token:NAME` (API), `cli:USER`, `config` or `defaults`.
    pub actor: String,
    /// `budget.create`, `budget.update`, `budget.delete`, `price.set`, `group.add`, `group.remove`.
    pub action: String,
    pub target: String,
    /// The target before the change (absent when created).
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    /// The target after the change (absent when deleted).
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
}

/// Every administrative change, newest first.
#[utoipa::path(get, path = "/audit", tag = "reports", params(AuditParams),
    responses(
        (status = 200, body = Page<AuditView>),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn audit(
    State(s): St,
    ApiQuery(p): ApiQuery<AuditParams>,
) -> Result<axum::Json<Page<AuditView>>, Problem> {
    let (limit, offset) = paging(p.limit, p.offset)?;
    let q = AuditQuery {
        target: p.target,
        limit: limit + 1,
        offset,
    };
    let doc = |v: Option<String>| v.and_then(|t| serde_json::from_str(&t).ok());
    let rows = s
        .store
        .audit_log(&q)
        .await?
        .into_iter()
        .map(|e| AuditView {
            id: e.id,
            at: rfc3339_ms(e.ts_ms),
            actor: e.actor,
            action: e.action,
            target: e.target,
            before: doc(e.before),
            after: doc(e.after),
        })
        .collect();
    Ok(axum::Json(Page::fetched(rows, limit, offset)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    /// The token's name.
    pub name: String,
    pub role: Role,
}

/// The caller's token name and role (the web UI's login check).
#[utoipa::path(get, path = "/me", tag = "reports",
    responses(
        (status = 200, body = Me),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn me(Extension(caller): Extension<Caller>) -> axum::Json<Me> {
    axum::Json(Me {
        name: caller.name,
        role: caller.role,
    })
}
