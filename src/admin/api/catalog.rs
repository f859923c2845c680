//! Prices (with history), groups and members, and the principals and models seen, for pickers.

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Page, SearchQuery, St, actor, paging, parse_time, reload, rfc3339_ms};
use crate::admin::auth::Caller;
use crate::admin::problem::{ApiJson, ApiQuery, Problem};
use crate::policy::{NanoUsd, Price, principal_key};
use crate::store::{PriceRow, Seen, in_force};

/// A price version: US dollars per one million tokens, as exact decimal strings.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PriceView {
    pub model: String,
    pub input: String,
    pub output: String,
    pub cache_read: String,
    pub cache_write: String,
    /// Anthropic 1-hour cache writes.
    pub cache_write_1h: String,
    /// When this version took or takes effect; absent for "from the beginning".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective_from: Option<String>,
}

fn price_view(r: &PriceRow) -> PriceView {
    let p = &r.price;
    PriceView {
        model: r.model.clone(),
        input: p.input.to_string(),
        output: p.output.to_string(),
        cache_read: p.cache_read.to_string(),
        cache_write: p.cache_write.to_string(),
        cache_write_1h: p.cache_write_1h.to_string(),
        effective_from: (r.effective_from_ms != 0).then(|| rfc3339_ms(r.effective_from_ms)),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PriceQuery {
    /// Case-insensitive search in model names.
    q: Option<String>,
    /// Only this model (exact name).
    model: Option<String>,
    /// Every version, past and scheduled, instead of the one in force now.
    history: Option<bool>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    #[param(minimum = 0)]
    offset: Option<i64>,
}

/// Prices in force now, or every version with `history=true`, sorted by model, then time.
#[utoipa::path(get, path = "/prices", tag = "catalog", params(PriceQuery),
    responses(
        (status = 200, body = Page<PriceView>),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_prices(
    State(s): St,
    ApiQuery(q): ApiQuery<PriceQuery>,
) -> Result<axum::Json<Page<PriceView>>, Problem> {
    let (limit, offset) = paging(q.limit, q.offset)?;
    let mut rows = s.store.list_prices().await?;
    if !q.history.unwrap_or(false) {
        rows = in_force(rows, s.ledger.clock().now().timestamp_millis());
    }
    let needle = q.q.as_deref().map(str::to_lowercase);
    rows.retain(|r| {
        q.model.as_ref().is_none_or(|m| *m == r.model)
            && needle
                .as_ref()
                .is_none_or(|n| r.model.to_lowercase().contains(n))
    });
    let views = rows.iter().map(price_view).collect();
    Ok(axum::Json(Page::slice(views, limit, offset)))
}

/// A new price version. Omitted cache prices default to the input price (never cheaper than
/// input unless said so); `cache_write_1h` defaults to `cache_write`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceInput {
    model: String,
    /// USD per 1M input tokens, e.g. `"2.50"`.
    input: String,
    output: String,
    cache_read: Option<String>,
    cache_write: Option<String>,
    cache_write_1h: Option<String>,
    /// RFC 3339; default now. Past usage keeps the price it was charged at.
    effective_from: Option<String>,
}

fn usd(field: &str, v: &str) -> Result<NanoUsd, Problem> {
    v.parse::<NanoUsd>()
        .map_err(|e| Problem::invalid(field, e.to_string()))
}

/// Sets a price version of a model (replacing a version with the same `effective_from`).
#[utoipa::path(post, path = "/prices", tag = "catalog", request_body = PriceInput,
    responses(
        (status = 201, body = PriceView),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn set_price(
    State(s): St,
    Extension(caller): Extension<Caller>,
    ApiJson(p): ApiJson<PriceInput>,
) -> Result<(StatusCode, axum::Json<PriceView>), Problem> {
    let model = p.model.trim();
    if model.is_empty() {
        return Err(Problem::invalid("model", "must not be empty"));
    }
    let input = usd("input", &p.input)?;
    let cache_write = p
        .cache_write
        .as_deref()
        .map(|v| usd("cache_write", v))
        .transpose()?
        .unwrap_or(input);
    let price = Price {
        input,
        output: usd("output", &p.output)?,
        cache_read: p
            .cache_read
            .as_deref()
            .map(|v| usd("cache_read", v))
            .transpose()?
            .unwrap_or(input),
        cache_write,
        cache_write_1h: p
            .cache_write_1h
            .as_deref()
            .map(|v| usd("cache_write_1h", v))
            .transpose()?
            .unwrap_or(cache_write),
    };
    let who = actor(&s, &caller);
    let effective_from_ms = match &p.effective_from {
        None => who.ts_ms,
        Some(t) => parse_time("effective_from", t)?.timestamp_millis(),
    };
    let row = PriceRow {
        model: model.to_string(),
        effective_from_ms,
        price,
    };
    s.store.set_price(&row, &who).await?;
    reload(&s).await?;
    Ok((StatusCode::CREATED, axum::Json(price_view(&row))))
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Member {
    /// A principal key: `user:NAME` or `service_principal:ID`.
    pub principal: String,
    /// `store` (managed here) or `config` (declared in the config file; change it there).
    pub source: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GroupView {
    pub name: String,
    pub members: Vec<Member>,
    /// Budgets whose subject is this group.
    pub budgets: Vec<String>,
}

fn group<'a>(groups: &'a mut BTreeMap<String, GroupView>, name: &str) -> &'a mut GroupView {
    groups.entry(name.to_string()).or_insert_with(|| GroupView {
        name: name.to_string(),
        members: Vec::new(),
        budgets: Vec::new(),
    })
}

/// Every group known: with stored or configured members, or named by a budget.
fn all_groups(s: &crate::admin::AdminState, stored: Vec<(String, String)>) -> Vec<GroupView> {
    let mut groups: BTreeMap<String, GroupView> = BTreeMap::new();
    for (g, p) in stored {
        group(&mut groups, &g).members.push(Member {
            principal: p,
            source: "store".into(),
        });
    }
    for (g, p) in s.ledger.config_groups() {
        let v = group(&mut groups, g);
        if !v.members.iter().any(|m| m.principal == *p) {
            v.members.push(Member {
                principal: p.clone(),
                source: "config".into(),
            });
        }
    }
    for b in s.ledger.policy().budgets.iter() {
        if b.subject.kind == crate::policy::SubjectKind::Group {
            group(&mut groups, &b.subject.name)
                .budgets
                .push(b.name.clone());
        }
    }
    groups.into_values().collect()
}

/// Groups with their members and budgets, sorted by name.
#[utoipa::path(get, path = "/groups", tag = "catalog", params(SearchQuery),
    responses(
        (status = 200, body = Page<GroupView>),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_groups(
    State(s): St,
    ApiQuery(q): ApiQuery<SearchQuery>,
) -> Result<axum::Json<Page<GroupView>>, Problem> {
    let (limit, offset) = paging(q.limit, q.offset)?;
    let mut groups = all_groups(&s, s.store.list_members().await?);
    if let Some(n) = q.q.as_deref().map(str::to_lowercase) {
        groups.retain(|g| g.name.to_lowercase().contains(&n));
    }
    Ok(axum::Json(Page::slice(groups, limit, offset)))
}

/// One group.
#[utoipa::path(get, path = "/groups/{group}", tag = "catalog", params(("group" = String, Path)),
    responses(
        (status = 200, body = GroupView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_group(
    State(s): St,
    Path(group): Path<String>,
) -> Result<axum::Json<GroupView>, Problem> {
    all_groups(&s, s.store.list_members().await?)
        .into_iter()
        .find(|g| g.name == group)
        .map(axum::Json)
        .ok_or_else(|| Problem::not_found(format!("no group named {group:?}")))
}

fn member_key(p: &str) -> Result<String, Problem> {
    principal_key(p).map_err(|e| Problem::invalid("principal", e))
}

fn group_name(g: &str) -> Result<&str, Problem> {
    let g = g.trim();
    if g.is_empty() {
        return Err(Problem::invalid("group", "must not be empty"));
    }
    Ok(g)
}

/// Adds a principal to a group (idempotent). Budgets of the group apply to it at once.
#[utoipa::path(put, path = "/groups/{group}/members/{principal}", tag = "catalog",
    params(("group" = String, Path), ("principal" = String, Path, description = "user:NAME, service_principal:ID, or a bare user name")),
    responses(
        (status = 204, description = "The principal is a member"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn add_member(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path((group, principal)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    let key = member_key(&principal)?;
    let group = group_name(&group)?;
    if s.store.add_member(group, &key, &actor(&s, &caller)).await? {
        reload(&s).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a stored membership. Members declared in the config file are changed there (409).
#[utoipa::path(delete, path = "/groups/{group}/members/{principal}", tag = "catalog",
    params(("group" = String, Path), ("principal" = String, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn remove_member(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path((group, principal)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    let key = member_key(&principal)?;
    let group = group_name(&group)?;
    let stored = s.store.list_members().await?;
    if !stored.iter().any(|(g, p)| g == group && *p == key)
        && s.ledger
            .config_groups()
            .iter()
            .any(|(g, p)| g == group && *p == key)
    {
        return Err(Problem::conflict(format!(
            "{key} is a member of {group:?} in the config file; change it there"
        )));
    }
    s.store
        .remove_member(group, &key, &actor(&s, &caller))
        .await?;
    reload(&s).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Names {
    pub items: Vec<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NameQuery {
    /// Case-insensitive search.
    q: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

async fn seen(s: &crate::admin::AdminState, what: Seen, q: NameQuery) -> Result<Names, Problem> {
    let (limit, _) = paging(q.limit, None)?;
    let search = q.q.unwrap_or_default();
    let mut items = s.store.seen(what, &search, limit).await?;
    if what == Seen::Principals {
        let n = search.to_lowercase();
        for (_, p) in s.ledger.config_groups() {
            if p.to_lowercase().contains(&n) && !items.contains(p) {
                items.push(p.clone());
            }
        }
        items.sort();
        items.truncate(usize::try_from(limit).unwrap_or(0));
    }
    Ok(Names { items })
}

/// Principal keys seen in usage, group memberships and budgets (for the budget form's picker).
#[utoipa::path(get, path = "/principals", tag = "catalog", params(NameQuery),
    responses(
        (status = 200, body = Names),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn principals(
    State(s): St,
    ApiQuery(q): ApiQuery<NameQuery>,
) -> Result<axum::Json<Names>, Problem> {
    Ok(axum::Json(seen(&s, Seen::Principals, q).await?))
}

/// Models seen in usage or priced (for the budget form's model picker).
#[utoipa::path(get, path = "/models", tag = "catalog", params(NameQuery),
    responses(
        (status = 200, body = Names),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn models(
    State(s): St,
    ApiQuery(q): ApiQuery<NameQuery>,
) -> Result<axum::Json<Names>, Problem> {
    Ok(axum::Json(seen(&s, Seen::Models, q).await?))
}
