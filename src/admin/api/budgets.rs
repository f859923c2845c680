//! Budgets: CRUD, status per subject, near/over-limit lists, and the dry-run check.

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Page, PageQuery, SearchQuery, St, actor, amount, paging, reload, rfc3339};
use crate::admin::AdminState;
use crate::admin::auth::Caller;
use crate::admin::problem::{ApiJson, ApiQuery, Problem};
use crate::policy::{
    Admission, Ask, Budget, BudgetSpec, BudgetStatus, DenyReason, LeaseStep, NanoUsd, Principal,
    TokenClasses, Window, principal_key,
};

/// A budget as stored: its spec and id, and where it stands now.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetView {
    pub id: String,
    #[serde(flatten)]
    pub spec: BudgetSpec,
    /// The current window; for per-member budgets, the member closest to the limit.
    pub usage: UsageSummary,
}

/// Where a budget (or one member of it) stands in the current window, in the budget's unit.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Standing {
    /// `tokens` or `usd`.
    pub unit: String,
    pub used: String,
    /// Held by requests in flight.
    pub reserved: String,
    pub limit: String,
    pub remaining: String,
    /// used / limit (for bars; the exact amounts are the strings).
    pub fraction: f64,
    /// `ok`, `near` (at or past the threshold, 80 % unless asked otherwise) or `over` (limit reached).
    pub state: String,
    /// When the current window ends (absent for lifetime budgets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageSummary {
    #[serde(flatten)]
    pub standing: Standing,
    /// Members with usage in this window (per-member budgets), else 1 or 0.
    pub members: u64,
}

/// One budget and subject (or member) now.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StatusView {
    pub budget: String,
    /// The member of a per-member budget (a principal key); absent for a shared pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// e.g. `day`, `rolling 7 days`, `total`.
    pub window: String,
    /// `enforce` or `shadow`.
    pub action: String,
    #[serde(flatten)]
    pub standing: Standing,
}

const NEAR: f64 = 0.8;

fn fraction(s: &BudgetStatus) -> f64 {
    s.used as f64 / s.limit.max(1) as f64
}

fn state(f: f64, threshold: f64) -> &'static str {
    if f >= 1.0 {
        "over"
    } else if f >= threshold {
        "near"
    } else {
        "ok"
    }
}

fn standing(s: &BudgetStatus, threshold: f64) -> Standing {
    let f = fraction(s);
    Standing {
        unit: s.unit.as_str().into(),
        used: amount(s.unit, s.used),
        reserved: amount(s.unit, s.reserved),
        limit: amount(s.unit, s.limit),
        remaining: amount(s.unit, s.remaining()),
        fraction: f,
        state: state(f, threshold).into(),
        resets_at: s.resets_at.map(rfc3339),
    }
}

pub fn status_view(s: &BudgetStatus, member: &str, threshold: f64) -> StatusView {
    StatusView {
        budget: s.name.clone(),
        member: (!member.is_empty()).then(|| member.to_string()),
        window: s.window.to_string(),
        action: s.action.as_str().into(),
        standing: standing(s, threshold),
    }
}

/// The spec as shown: the window kind spelled out.
fn shown_spec(b: &Budget) -> BudgetSpec {
    let mut spec = BudgetSpec::of(b);
    if spec.kind.is_none() && b.window != Window::Total {
        spec.kind = Some("calendar".into());
    }
    spec
}

pub fn budget_view(b: &Budget, statuses: &[(BudgetStatus, std::sync::Arc<str>)]) -> BudgetView {
    let mine: Vec<&BudgetStatus> = statuses
        .iter()
        .filter(|(s, _)| s.budget == b.id)
        .map(|(s, _)| s)
        .collect();
    let worst = mine
        .iter()
        .max_by(|a, b| fraction(a).total_cmp(&fraction(b)));
    let usage = match worst {
        Some(s) => UsageSummary {
            standing: standing(s, NEAR),
            members: mine.len() as u64,
        },
        // No usage in this window yet (nothing in memory for this budget).
        None => UsageSummary {
            standing: standing(
                &BudgetStatus {
                    budget: b.id.clone(),
                    name: b.name.clone(),
                    window: b.window,
                    action: b.action,
                    unit: b.limit.unit(),
                    limit: b.limit.value(),
                    used: 0,
                    reserved: 0,
                    resets_at: None,
                },
                NEAR,
            ),
            members: 0,
        },
    };
    BudgetView {
        id: b.id.0.to_string(),
        spec: shown_spec(b),
        usage,
    }
}

fn matches(b: &Budget, q: &str) -> bool {
    let q = q.to_lowercase();
    b.name.to_lowercase().contains(&q)
        || b.subject.to_string().to_lowercase().contains(&q)
        || match &b.models {
            crate::policy::ModelSet::All => "all models".contains(&q),
            crate::policy::ModelSet::Only(m) => m.iter().any(|m| m.to_lowercase().contains(&q)),
        }
}

/// Lists budgets with their current usage, sorted by name; `q` searches names, subjects and models.
#[utoipa::path(get, path = "/budgets", tag = "budgets", params(SearchQuery),
    responses(
        (status = 200, body = Page<BudgetView>),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(s): St,
    ApiQuery(q): ApiQuery<SearchQuery>,
) -> Result<axum::Json<Page<BudgetView>>, Problem> {
    let (limit, offset) = paging(q.limit, q.offset)?;
    let policy = s.ledger.policy();
    let statuses = s.ledger.statuses();
    let mut list: Vec<&Budget> = policy
        .budgets
        .iter()
        .filter(|b| q.q.as_deref().is_none_or(|q| matches(b, q)))
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let views = list
        .into_iter()
        .map(|b| budget_view(b, &statuses))
        .collect();
    Ok(axum::Json(Page::slice(views, limit, offset)))
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The enforced budget named `name`, or 404.
fn enforced<'a>(policy: &'a crate::policy::Policy, name: &str) -> Result<&'a Budget, Problem> {
    policy
        .budgets
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(|| Problem::not_found(format!("no budget named {name:?}")))
}

async fn view_of(s: &AdminState, name: &str) -> Result<BudgetView, Problem> {
    let policy = s.ledger.policy();
    Ok(budget_view(enforced(&policy, name)?, &s.ledger.statuses()))
}

/// Creates a budget.
#[utoipa::path(post, path = "/budgets", tag = "budgets", request_body = BudgetSpec,
    responses(
        (status = 201, body = BudgetView, headers(("location" = String, description = "The new budget's URL"))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json", description = "A budget with this name exists"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create(
    State(s): St,
    Extension(caller): Extension<Caller>,
    ApiJson(spec): ApiJson<BudgetSpec>,
) -> Result<impl IntoResponse, Problem> {
    let b = spec.to_budget(&new_id())?;
    s.store.create_budget(&b, &actor(&s, &caller)).await?;
    reload(&s).await?;
    let location = format!(
        "/api/v1/budgets/{}",
        form_urlencoded::byte_serialize(b.name.as_bytes()).collect::<String>()
    );
    let view = view_of(&s, &b.name).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(view),
    ))
}

/// One budget.
#[utoipa::path(get, path = "/budgets/{name}", tag = "budgets", params(("name" = String, Path)),
    responses(
        (status = 200, body = BudgetView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(s): St,
    Path(name): Path<String>,
) -> Result<axum::Json<BudgetView>, Problem> {
    Ok(axum::Json(view_of(&s, &name).await?))
}

async fn update_to(
    s: &AdminState,
    caller: &Caller,
    existing: &Budget,
    spec: BudgetSpec,
) -> Result<axum::Json<BudgetView>, Problem> {
    let b = spec.to_budget(&existing.id.0)?;
    s.store.update_budget(&b, &actor(s, caller)).await?;
    reload(s).await?;
    Ok(axum::Json(view_of(s, &b.name).await?))
}

async fn stored(s: &AdminState, name: &str) -> Result<Budget, Problem> {
    s.store
        .get_budget(name)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no budget named {name:?}")))
}

/// Replaces a budget's spec (a different `name` renames it). Its usage is kept.
#[utoipa::path(put, path = "/budgets/{name}", tag = "budgets", params(("name" = String, Path)),
    request_body = BudgetSpec,
    responses(
        (status = 200, body = BudgetView),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn replace(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    ApiJson(spec): ApiJson<BudgetSpec>,
) -> Result<axum::Json<BudgetView>, Problem> {
    let existing = stored(&s, &name).await?;
    update_to(&s, &caller, &existing, spec).await
}

/// The fields a patch may change; absent fields are kept.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetPatch {
    name: Option<String>,
    subject: Option<String>,
    scope: Option<String>,
    models: Option<Vec<String>>,
    /// Setting one limit clears the other.
    limit_tokens: Option<u64>,
    limit_usd: Option<String>,
    window: Option<String>,
    every: Option<u32>,
    kind: Option<String>,
    action: Option<String>,
    #[serde(rename = "override")]
    is_override: Option<bool>,
    enabled: Option<bool>,
}

/// Changes some fields of a budget (JSON merge patch). Its usage is kept.
#[utoipa::path(patch, path = "/budgets/{name}", tag = "budgets", params(("name" = String, Path)),
    request_body(content = BudgetPatch, content_type = "application/merge-patch+json"),
    responses(
        (status = 200, body = BudgetView),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn patch(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    ApiJson(p): ApiJson<BudgetPatch>,
) -> Result<axum::Json<BudgetView>, Problem> {
    let existing = stored(&s, &name).await?;
    let mut spec = BudgetSpec::of(&existing);
    if let Some(v) = p.name {
        spec.name = v;
    }
    if let Some(v) = p.subject {
        spec.subject = v;
    }
    if let Some(v) = p.scope {
        spec.scope = Some(v);
    }
    if let Some(v) = p.models {
        spec.models = v;
    }
    match (p.limit_tokens, p.limit_usd) {
        (Some(_), Some(_)) => {
            return Err(Problem::invalid(
                "limit",
                "give at most one of limit_tokens or limit_usd",
            ));
        }
        (Some(t), None) => (spec.limit_tokens, spec.limit_usd) = (Some(t), None),
        (None, Some(u)) => (spec.limit_tokens, spec.limit_usd) = (None, Some(u)),
        (None, None) => {}
    }
    if let Some(v) = p.window {
        spec.window = v;
    }
    if let Some(v) = p.every {
        spec.every = v;
    }
    if let Some(v) = p.kind {
        spec.kind = Some(v);
    }
    if let Some(v) = p.action {
        spec.action = Some(v);
    }
    if let Some(v) = p.is_override {
        spec.is_override = v;
    }
    if let Some(v) = p.enabled {
        spec.enabled = v;
    }
    update_to(&s, &caller, &existing, spec).await
}

/// Deletes a budget. Its recorded usage events stay.
#[utoipa::path(delete, path = "/budgets/{name}", tag = "budgets", params(("name" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    s.store.delete_budget(&name, &actor(&s, &caller)).await?;
    reload(&s).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Used, limit, remaining and reset of one budget, per subject (one row for a shared pool, one
/// per member with usage in this window for a per-member budget), closest to the limit first.
#[utoipa::path(get, path = "/budgets/{name}/status", tag = "budgets",
    params(("name" = String, Path), PageQuery),
    responses(
        (status = 200, body = Page<StatusView>),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn budget_status(
    State(s): St,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<axum::Json<Page<StatusView>>, Problem> {
    let (limit, offset) = paging(q.limit, q.offset)?;
    let policy = s.ledger.policy();
    let b = enforced(&policy, &name)?;
    let mut rows: Vec<StatusView> = s
        .ledger
        .statuses()
        .iter()
        .filter(|(st, _)| st.budget == b.id)
        .map(|(st, m)| status_view(st, m, NEAR))
        .collect();
    rows.sort_by(|a, b| b.standing.fraction.total_cmp(&a.standing.fraction));
    Ok(axum::Json(Page::slice(rows, limit, offset)))
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StateFilter {
    /// Every budget and member.
    All,
    /// At or past the threshold, including over.
    Near,
    /// At or past the limit.
    Over,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// Which rows: `near` (default), `over` or `all`.
    #[param(inline)]
    state: Option<StateFilter>,
    /// The fraction of the limit that counts as near (default 0.8).
    #[param(minimum = 0.0, maximum = 1.0)]
    threshold: Option<f64>,
    /// Only this principal's rows: budgets whose subject is it, its groups' and everyone's.
    principal: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    #[param(minimum = 0)]
    offset: Option<i64>,
}

/// Budgets (and members) near or over their limit, closest to the limit first.
#[utoipa::path(get, path = "/status", tag = "budgets", params(StatusQuery),
    responses(
        (status = 200, body = Page<StatusView>),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn status(
    State(s): St,
    ApiQuery(q): ApiQuery<StatusQuery>,
) -> Result<axum::Json<Page<StatusView>>, Problem> {
    let (limit, offset) = paging(q.limit, q.offset)?;
    let threshold = q.threshold.unwrap_or(NEAR);
    if !(0.0..=1.0).contains(&threshold) {
        return Err(Problem::invalid("threshold", "must be between 0 and 1"));
    }
    let filter = q.state.unwrap_or(StateFilter::Near);
    let policy = s.ledger.policy();
    let mine: Option<(String, Vec<String>)> = match &q.principal {
        None => None,
        Some(p) => {
            let key = principal_key(p).map_err(|e| Problem::invalid("principal", e))?;
            let groups = policy.groups_of(&Principal::from_key(&key, Vec::new()));
            Some((key, groups))
        }
    };
    let mut rows: Vec<StatusView> = s
        .ledger
        .statuses()
        .iter()
        .filter(|(st, member)| {
            let Some((key, groups)) = &mine else {
                return true;
            };
            let Some(b) = policy.budgets.iter().find(|b| b.id == st.budget) else {
                return false;
            };
            let applies = match b.subject.kind {
                crate::policy::SubjectKind::Everyone => true,
                crate::policy::SubjectKind::Group => groups.contains(&b.subject.name),
                _ => b.subject.to_string() == *key,
            };
            applies && (member.is_empty() || **member == **key)
        })
        .map(|(st, m)| status_view(st, m, threshold))
        .filter(|v| match filter {
            StateFilter::All => true,
            StateFilter::Near => v.standing.state != "ok",
            StateFilter::Over => v.standing.state == "over",
        })
        .collect();
    rows.sort_by(|a, b| {
        b.standing
            .fraction
            .total_cmp(&a.standing.fraction)
            .then_with(|| a.budget.cmp(&b.budget))
    });
    Ok(axum::Json(Page::slice(rows, limit, offset)))
}

/// A request to evaluate without sending it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// `user:NAME`, `service_principal:ID` (or `sp:ID`), or a bare user name.
    principal: String,
    /// Groups the identity source would report; stored and configured membership is added.
    #[serde(default)]
    groups: Vec<String>,
    model: String,
    #[serde(default)]
    #[schema(maximum = 1_000_000_000)]
    input_tokens: u64,
    /// The output bound to assume (default: the server's `admission.default_output_tokens`).
    #[schema(maximum = 1_000_000_000)]
    max_output_tokens: Option<u64>,
}

/// Token counts a check accepts: far above any context window, far below overflow.
const MAX_CHECK_TOKENS: u64 = 1_000_000_000;

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckConsidered {
    #[serde(flatten)]
    status: StatusView,
    /// This request's estimate in the budget's unit.
    requested: String,
    /// `fits`, `exhausted`, `never_fits` or `model_not_priced`.
    verdict: String,
    /// This budget decides (the denying one, or the tightest when allowed).
    binds: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckResult {
    /// `allow` or `deny`.
    decision: String,
    principal: String,
    groups: Vec<String>,
    model: String,
    canonical_model: String,
    priced: bool,
    estimate_tokens: u64,
    estimate_usd: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    binding: Option<String>,
    budgets: Vec<CheckConsidered>,
    /// Budgets that matched but were set aside because an override budget applies.
    overridden: Vec<String>,
}

/// Evaluates a request against the budgets, reserving nothing: which budgets match, where each
/// stands, which binds, and the decision.
#[utoipa::path(post, path = "/check", tag = "budgets", request_body = CheckRequest,
    responses(
        (status = 200, body = CheckResult),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn check(
    State(s): St,
    ApiJson(r): ApiJson<CheckRequest>,
) -> Result<axum::Json<CheckResult>, Problem> {
    let key = principal_key(&r.principal).map_err(|e| Problem::invalid("principal", e))?;
    if r.model.trim().is_empty() {
        return Err(Problem::invalid("model", "must not be empty"));
    }
    for (field, v) in [
        ("input_tokens", Some(r.input_tokens)),
        ("max_output_tokens", r.max_output_tokens),
    ] {
        if v.is_some_and(|v| v > MAX_CHECK_TOKENS) {
            return Err(Problem::invalid(
                field,
                format!("at most {MAX_CHECK_TOKENS}"),
            ));
        }
    }
    let principal = Principal::from_key(&key, r.groups);
    let policy = s.ledger.policy();
    let ask = Ask {
        principal: &principal,
        model: Some(&r.model),
        estimate: TokenClasses {
            input: r.input_tokens,
            output: r.max_output_tokens.unwrap_or(s.default_output_tokens),
            ..Default::default()
        },
        // A dry run shows the global view; leases are a replica's private bookkeeping.
        lease: LeaseStep::Bypass,
    };
    let ev = s.ledger.evaluate(&ask);
    let (decision, binding) = match ev.outcome() {
        Admission::Allowed { binding, .. } => ("allow", binding.map(|b| b.name)),
        Admission::Denied { denial, .. } => ("deny", Some(denial.status.name)),
        Admission::Pending { .. } => ("allow", None),
    };
    let budgets = ev
        .considered
        .iter()
        .map(|c| CheckConsidered {
            status: status_view(&c.status, &c.key.member, NEAR),
            requested: amount(c.status.unit, c.want),
            verdict: c.verdict.map_or("fits", DenyReason::as_str).into(),
            binds: binding.as_deref() == Some(c.status.name.as_str()),
        })
        .collect();
    Ok(axum::Json(CheckResult {
        decision: decision.into(),
        principal: key,
        groups: policy.groups_of(&principal),
        canonical_model: policy.models.canonical(&r.model).into_owned(),
        model: r.model,
        priced: ev.priced,
        estimate_tokens: ev.estimate.tokens,
        estimate_usd: NanoUsd(ev.estimate.nanos).to_string(),
        binding,
        budgets,
        overridden: ev.overridden,
    }))
}
