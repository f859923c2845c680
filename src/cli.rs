//! Command-line commands other than `serve`. They talk to the store directly; decisions and
//! statuses are computed by the same ledger code the server runs, loaded from the store.

use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::SecondsFormat;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::clock::SharedClock;
use crate::config::Config;
use crate::ledger::{Ledger, writer};
use crate::policy::prices::{PriceEntry, PriceFile, parse_price_file};
use crate::policy::{
    Admission, Ask, Budget, BudgetSpec, BudgetStatus, DenyReason, LeaseStep, Limit, ModelSet,
    NanoUsd, Price, Principal, PrincipalKind, TokenClasses, Unit, Window,
};
use crate::store::{Actor, PriceRow, Store, UsageBy, UsageQuery};

#[derive(Debug, Subcommand)]
pub enum BudgetCmd {
    /// Create a budget.
    Create(SpecArgs),
    /// List budgets.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one budget.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change fields of a budget (its usage is kept).
    Update(UpdateArgs),
    /// Delete a budget by name.
    Delete { name: String },
    /// Used, limit, remaining and reset per budget and member.
    Status {
        /// Only this budget.
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WindowArg {
    Hour,
    Day,
    Week,
    Month,
    Total,
}

impl WindowArg {
    fn as_str(self) -> &'static str {
        match self {
            WindowArg::Hour => "hour",
            WindowArg::Day => "day",
            WindowArg::Week => "week",
            WindowArg::Month => "month",
            WindowArg::Total => "total",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    Calendar,
    Rolling,
}

#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Unique name, e.g. "alice daily".
    #[arg(long)]
    pub name: String,
    /// user:NAME, service_principal:ID (or sp:ID), group:NAME, or everyone.
    #[arg(long)]
    pub subject: String,
    /// For group and everyone budgets: shared (one pool) or per_member.
    #[arg(long)]
    pub scope: Option<String>,
    /// Comma-separated models sharing this budget; omit for all models.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Limit in tokens (input + output, cached and reasoning included).
    #[arg(
        long,
        conflicts_with = "limit_usd",
        required_unless_present = "limit_usd"
    )]
    pub limit_tokens: Option<u64>,
    /// Limit in US dollars, e.g. 500.00.
    #[arg(long)]
    pub limit_usd: Option<String>,
    #[arg(long, value_enum)]
    pub window: WindowArg,
    /// Number of window units (e.g. --window day --every 7).
    #[arg(long, default_value_t = 1)]
    pub every: u32,
    /// calendar (hours on the hour, days at midnight, …) or rolling (sliding).
    #[arg(long, value_enum, default_value = "calendar")]
    pub kind: KindArg,
    /// Record would-deny decisions without denying.
    #[arg(long)]
    pub shadow: bool,
    /// For user/service-principal budgets: only override budgets apply to this principal.
    #[arg(long = "override")]
    pub is_override: bool,
    #[arg(long)]
    pub disabled: bool,
}

impl SpecArgs {
    pub fn spec(&self) -> BudgetSpec {
        BudgetSpec {
            name: self.name.clone(),
            subject: self.subject.clone(),
            scope: self.scope.clone(),
            models: self.models.clone(),
            limit_tokens: self.limit_tokens,
            limit_usd: self.limit_usd.clone(),
            window: self.window.as_str().to_owned(),
            every: self.every,
            kind: Some(match self.kind {
                KindArg::Calendar => "calendar".into(),
                KindArg::Rolling => "rolling".into(),
            }),
            action: Some(if self.shadow { "shadow" } else { "enforce" }.into()),
            is_override: self.is_override,
            enabled: !self.disabled,
        }
    }
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    pub name: String,
    #[arg(long)]
    pub rename: Option<String>,
    #[arg(long)]
    pub subject: Option<String>,
    #[arg(long)]
    pub scope: Option<String>,
    /// Comma-separated models; "all" for all models.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    #[arg(long, conflicts_with = "limit_usd")]
    pub limit_tokens: Option<u64>,
    #[arg(long)]
    pub limit_usd: Option<String>,
    #[arg(long, value_enum)]
    pub window: Option<WindowArg>,
    #[arg(long)]
    pub every: Option<u32>,
    #[arg(long, value_enum)]
    pub kind: Option<KindArg>,
    /// enforce or shadow.
    #[arg(long)]
    pub action: Option<String>,
    #[arg(long = "override")]
    pub is_override: Option<bool>,
    #[arg(long)]
    pub enabled: Option<bool>,
}

/// Turns a spec error into a message naming the command-line flag.
fn spec_error(e: crate::policy::SpecError) -> anyhow::Error {
    anyhow::anyhow!("--{}: {}", e.field.replace('_', "-"), e.message)
}

/// Who changes things from the command line, for the audit log.
fn actor(clock: &SharedClock) -> Actor {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    Actor {
        name: format!("cli:{user}"),
        ts_ms: clock.now().timestamp_millis(),
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub fn budget_json(b: &Budget) -> Value {
    json!({
        "id": &*b.id.0,
        "name": b.name,
        "subject": {"kind": b.subject.kind.as_str(), "name": b.subject.name},
        "scope": b.scope.as_str(),
        "models": match &b.models { ModelSet::All => Value::Null, ModelSet::Only(v) => json!(v) },
        "limit": match b.limit { Limit::Tokens(t) => json!({"tokens": t.0}), Limit::Usd(u) => json!({"usd": u.to_string()}) },
        "window": match b.window {
            Window::Total => json!({"unit": "total"}),
            Window::Calendar { unit, every } => json!({"unit": unit.as_str(), "every": every, "kind": "calendar"}),
            Window::Rolling { unit, every } => json!({"unit": unit.as_str(), "every": every, "kind": "rolling"}),
        },
        "action": b.action.as_str(),
        "override": b.is_override,
        "enabled": b.enabled,
    })
}

/// The ledger as the server would have it: policy and counters loaded from the store.
async fn loaded_ledger(
    config: &Config,
    store: &Store,
    clock: &SharedClock,
) -> anyhow::Result<Arc<Ledger>> {
    let ledger = Ledger::new(
        config.policy_settings(),
        Arc::clone(clock),
        1,
        Arc::default(),
    );
    writer::load(&ledger, store)
        .await
        .context("loading budgets and counters")?;
    Ok(ledger)
}

fn status_json(s: &BudgetStatus, member: &str) -> Value {
    let plain = |v: u64| match s.unit {
        Unit::Tokens => json!(v),
        Unit::Usd => json!(NanoUsd(v).to_string()),
    };
    json!({
        "budget": s.name,
        "member": if member.is_empty() { Value::Null } else { json!(member) },
        "unit": s.unit.as_str(),
        "window": s.window.to_string(),
        "action": s.action.as_str(),
        "used": plain(s.used),
        "reserved": plain(s.reserved),
        "limit": plain(s.limit),
        "remaining": plain(s.remaining()),
        "resets_at": s.resets_at.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
    })
}

pub async fn budgets(config: &Config, clock: &SharedClock, cmd: BudgetCmd) -> anyhow::Result<()> {
    let store = crate::app::open_store(config, clock).await?;
    match cmd {
        BudgetCmd::Create(args) => {
            let b = args.spec().to_budget(&new_id()).map_err(spec_error)?;
            store.create_budget(&b, &actor(clock)).await?;
            println!("created budget {:?} ({})", b.name, b.id);
        }
        BudgetCmd::List { json } => {
            let list = store.list_budgets().await?;
            if json {
                println!("{}", Value::Array(list.iter().map(budget_json).collect()));
            } else {
                print_budgets(&list);
            }
        }
        BudgetCmd::Show { name, json } => {
            let b = store
                .get_budget(&name)
                .await?
                .with_context(|| format!("no budget named {name:?}"))?;
            if json {
                println!("{}", budget_json(&b));
            } else {
                println!("{}", serde_json::to_string_pretty(&budget_json(&b))?);
            }
        }
        BudgetCmd::Update(u) => {
            let b = store
                .get_budget(&u.name)
                .await?
                .with_context(|| format!("no budget named {:?}", u.name))?;
            let mut spec = BudgetSpec::of(&b);
            if let Some(v) = u.rename {
                spec.name = v;
            }
            if let Some(v) = u.subject {
                spec.subject = v;
            }
            if let Some(v) = u.scope {
                spec.scope = Some(v);
            }
            if let Some(v) = u.models {
                spec.models = if v.len() == 1 && v[0] == "all" {
                    Vec::new()
                } else {
                    v
                };
            }
            if let Some(v) = u.limit_tokens {
                (spec.limit_tokens, spec.limit_usd) = (Some(v), None);
            }
            if let Some(v) = u.limit_usd {
                (spec.limit_tokens, spec.limit_usd) = (None, Some(v));
            }
            if let Some(v) = u.window {
                spec.window = v.as_str().to_owned();
            }
            if let Some(v) = u.every {
                spec.every = v;
            }
            if let Some(v) = u.kind {
                spec.kind = Some(match v {
                    KindArg::Calendar => "calendar".into(),
                    KindArg::Rolling => "rolling".into(),
                });
            }
            if let Some(v) = u.action {
                spec.action = Some(v);
            }
            if let Some(v) = u.is_override {
                spec.is_override = v;
            }
            if let Some(v) = u.enabled {
                spec.enabled = v;
            }
            let updated = spec.to_budget(&b.id.0).map_err(spec_error)?;
            if updated.name != b.name && store.get_budget(&updated.name).await?.is_some() {
                bail!("--rename: a budget named {:?} already exists", updated.name);
            }
            store.update_budget(&updated, &actor(clock)).await?;
            println!("updated budget {:?}", updated.name);
        }
        BudgetCmd::Delete { name } => {
            store.delete_budget(&name, &actor(clock)).await?;
            println!("deleted budget {name:?}");
        }
        BudgetCmd::Status { name, json } => {
            let ledger = loaded_ledger(config, &store, clock).await?;
            let rows: Vec<_> = ledger
                .statuses()
                .into_iter()
                .filter(|(s, _)| name.as_ref().is_none_or(|n| *n == s.name))
                .collect();
            if let Some(n) = &name
                && rows.is_empty()
                && store.get_budget(n).await?.is_none()
            {
                bail!("no budget named {n:?}");
            }
            if json {
                println!(
                    "{}",
                    Value::Array(rows.iter().map(|(s, m)| status_json(s, m)).collect())
                );
                return Ok(());
            }
            println!(
                "{:<24} {:<28} {:>14} {:>14} {:>14} {:<22}",
                "BUDGET", "MEMBER", "USED", "LIMIT", "REMAINING", "RESETS"
            );
            for (s, member) in rows {
                println!(
                    "{:<24} {:<28} {:>14} {:>14} {:>14} {:<22}",
                    s.name,
                    if member.is_empty() { "(pool)" } else { &member },
                    s.unit.show(s.used),
                    s.unit.show(s.limit),
                    s.unit.show(s.remaining()),
                    s.resets_at.map_or("never".into(), |t| t
                        .to_rfc3339_opts(SecondsFormat::Secs, true)),
                );
            }
        }
    }
    Ok(())
}

fn print_budgets(list: &[Budget]) {
    println!(
        "{:<24} {:<28} {:<10} {:<22} {:>14} {:<16} {:<8}",
        "NAME", "SUBJECT", "SCOPE", "MODELS", "LIMIT", "WINDOW", "ACTION"
    );
    for b in list {
        let models = match &b.models {
            ModelSet::All => "all".to_string(),
            ModelSet::Only(v) => v.join(","),
        };
        let mut action = b.action.as_str().to_string();
        if b.is_override {
            action.push_str("+override");
        }
        if !b.enabled {
            action.push_str(" (off)");
        }
        println!(
            "{:<24} {:<28} {:<10} {:<22} {:>14} {:<16} {:<8}",
            b.name,
            b.subject.to_string(),
            b.scope.as_str(),
            models,
            b.limit.unit().show(b.limit.value()),
            b.window.to_string(),
            action
        );
    }
}

#[derive(Debug, Subcommand)]
pub enum PriceCmd {
    /// Prices in force (or every version with --history).
    List {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        history: bool,
        #[arg(long)]
        json: bool,
    },
    /// Set a model's price from an instant on (past costs keep their price).
    Set {
        model: String,
        /// USD per 1M input tokens.
        #[arg(long)]
        input: String,
        /// USD per 1M output tokens.
        #[arg(long)]
        output: String,
        /// USD per 1M cached input tokens read (default: the input price).
        #[arg(long)]
        cache_read: Option<String>,
        /// USD per 1M cache-write tokens (default: the input price).
        #[arg(long)]
        cache_write: Option<String>,
        /// USD per 1M Anthropic 1-hour cache-write tokens (default: the cache-write price).
        #[arg(long)]
        cache_write_1h: Option<String>,
        /// RFC 3339 instant the price applies from (default: now).
        #[arg(long)]
        effective_from: Option<String>,
    },
    /// Import prices from a TOML or JSON file (the format of `export`).
    Import { file: std::path::PathBuf },
    /// Export every price version.
    Export {
        #[arg(long, value_enum, default_value = "toml")]
        format: Format,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Toml,
    Json,
}

fn usd_arg(flag: &str, v: &str) -> anyhow::Result<NanoUsd> {
    v.parse::<NanoUsd>()
        .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

pub async fn prices(config: &Config, clock: &SharedClock, cmd: PriceCmd) -> anyhow::Result<()> {
    let store = crate::app::open_store(config, clock).await?;
    let now_ms = clock.now().timestamp_millis();
    match cmd {
        PriceCmd::List {
            model,
            history,
            json,
        } => {
            let mut rows = store.list_prices().await?;
            rows.retain(|r| model.as_ref().is_none_or(|m| *m == r.model));
            if !history {
                rows = crate::store::in_force(rows, now_ms);
            }
            if json {
                let entries: Vec<PriceEntry> = rows
                    .iter()
                    .map(|r| PriceEntry::new(&r.model, r.effective_from_ms, &r.price))
                    .collect();
                println!("{}", serde_json::to_string(&PriceFile { price: entries })?);
                return Ok(());
            }
            println!(
                "{:<36} {:>10} {:>10} {:>12} {:>12} {:<22}",
                "MODEL", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE", "FROM"
            );
            for r in rows {
                let p = r.price;
                let from = PriceEntry::new(&r.model, r.effective_from_ms, &p)
                    .effective_from
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<36} {:>10} {:>10} {:>12} {:>12} {:<22}",
                    r.model,
                    p.input.to_string(),
                    p.output.to_string(),
                    p.cache_read.to_string(),
                    p.cache_write.to_string(),
                    from
                );
            }
            println!("(USD per 1M tokens)");
        }
        PriceCmd::Set {
            model,
            input,
            output,
            cache_read,
            cache_write,
            cache_write_1h,
            effective_from,
        } => {
            let input = usd_arg("input", &input)?;
            let write = cache_write
                .map(|v| usd_arg("cache-write", &v))
                .transpose()?
                .unwrap_or(input);
            let price = Price {
                input,
                output: usd_arg("output", &output)?,
                cache_read: cache_read
                    .map(|v| usd_arg("cache-read", &v))
                    .transpose()?
                    .unwrap_or(input),
                cache_write: write,
                cache_write_1h: cache_write_1h
                    .map(|v| usd_arg("cache-write-1h", &v))
                    .transpose()?
                    .unwrap_or(write),
            };
            let from = match effective_from {
                None => now_ms,
                Some(t) => chrono::DateTime::parse_from_rfc3339(&t)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "--effective-from: {e} (expected RFC 3339, like 2026-12-01T00:00:00Z)"
                        )
                    })?
                    .timestamp_millis(),
            };
            store
                .set_price(
                    &PriceRow {
                        model: model.clone(),
                        effective_from_ms: from,
                        price,
                    },
                    &actor(clock),
                )
                .await?;
            println!("price of {model:?} set");
        }
        PriceCmd::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let json = file.extension().is_some_and(|e| e == "json");
            let parsed = parse_price_file(&text, json)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let mut n = 0;
            for e in &parsed.price {
                let from = e.effective_from_ms().map_err(|e| anyhow::anyhow!(e))?;
                store
                    .set_price(
                        &PriceRow {
                            model: e.model.clone(),
                            effective_from_ms: from,
                            price: e.price(),
                        },
                        &actor(clock),
                    )
                    .await?;
                n += 1;
            }
            println!("imported {n} prices");
        }
        PriceCmd::Export { format } => {
            let rows = store.list_prices().await?;
            let file = PriceFile {
                price: rows
                    .iter()
                    .map(|r| PriceEntry::new(&r.model, r.effective_from_ms, &r.price))
                    .collect(),
            };
            match format {
                Format::Toml => print!("{}", toml::to_string(&file)?),
                Format::Json => println!("{}", serde_json::to_string_pretty(&file)?),
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Add principals (user:NAME, service_principal:ID, or a bare user name) to a group.
    Add {
        group: String,
        principals: Vec<String>,
    },
    /// Remove a principal from a group.
    Remove { group: String, principal: String },
    /// List stored memberships (and those from the config file).
    List {
        group: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `alice` → `user:alice`; `user:…` and `service_principal:…` (or `sp:…`) are kept.
fn principal_key(p: &str) -> anyhow::Result<String> {
    crate::policy::principal_key(p).map_err(|e| anyhow::anyhow!("principal {e}"))
}

pub async fn groups(config: &Config, clock: &SharedClock, cmd: GroupCmd) -> anyhow::Result<()> {
    let store = crate::app::open_store(config, clock).await?;
    match cmd {
        GroupCmd::Add { group, principals } => {
            if group.trim().is_empty() || principals.is_empty() {
                bail!("give a group name and at least one principal");
            }
            for p in principals {
                let key = principal_key(&p)?;
                store.add_member(&group, &key, &actor(clock)).await?;
                println!("{key} is in {group:?}");
            }
        }
        GroupCmd::Remove { group, principal } => {
            let key = principal_key(&principal)?;
            store.remove_member(&group, &key, &actor(clock)).await?;
            println!("{key} removed from {group:?}");
        }
        GroupCmd::List { group, json } => {
            let mut rows: Vec<(String, String, &str)> = store
                .list_members()
                .await?
                .into_iter()
                .map(|(g, p)| (g, p, "store"))
                .collect();
            rows.extend(
                config
                    .groups
                    .iter()
                    .map(|(g, p)| (g.clone(), p.clone(), "config")),
            );
            rows.retain(|(g, _, _)| group.as_ref().is_none_or(|x| x == g));
            rows.sort();
            if json {
                let v: Vec<Value> = rows
                    .iter()
                    .map(|(g, p, src)| json!({"group": g, "principal": p, "source": src}))
                    .collect();
                println!("{}", Value::Array(v));
            } else {
                println!("{:<24} {:<40} {:<8}", "GROUP", "PRINCIPAL", "SOURCE");
                for (g, p, src) in rows {
                    println!("{g:<24} {p:<40} {src:<8}");
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum UsageCmd {
    /// Top consumers (or models) over a period.
    Top {
        #[arg(long, value_enum, default_value = "principal")]
        by: ByArg,
        #[arg(long, default_value_t = 24)]
        since_hours: u64,
        #[arg(long, default_value_t = 10)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Usage per hour or day and model.
    Timeseries {
        #[arg(long, value_enum, default_value = "hour")]
        bucket: BucketArg,
        #[arg(long, default_value_t = 24)]
        since_hours: u64,
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ByArg {
    Principal,
    Model,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BucketArg {
    Hour,
    Day,
}

pub async fn usage(config: &Config, clock: &SharedClock, cmd: UsageCmd) -> anyhow::Result<()> {
    let store = crate::app::open_store(config, clock).await?;
    let now_ms = clock.now().timestamp_millis();
    let since = |h: u64| now_ms - i64::try_from(h.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
    match cmd {
        UsageCmd::Top {
            by,
            since_hours,
            limit,
            json,
        } => {
            let q = UsageQuery {
                since_ms: since(since_hours),
                until_ms: now_ms + 3_600_000,
                ..UsageQuery::default()
            };
            let by = match by {
                ByArg::Principal => UsageBy::Principal,
                ByArg::Model => UsageBy::Model,
            };
            let rows = store.usage_top(&q, by, limit).await?;
            let key = |t: &crate::store::UsageTotal| {
                if by == UsageBy::Principal {
                    t.principal.clone()
                } else {
                    t.model.clone()
                }
            };
            if json {
                let v: Vec<Value> = rows
                    .iter()
                    .map(|t| json!({"key": key(t), "requests": t.requests, "tokens": t.tokens, "usd": t.cost.to_string()}))
                    .collect();
                println!("{}", Value::Array(v));
                return Ok(());
            }
            println!(
                "{:<40} {:>9} {:>12} {:>14}",
                if by == UsageBy::Principal {
                    "PRINCIPAL"
                } else {
                    "MODEL"
                },
                "REQUESTS",
                "TOKENS",
                "USD"
            );
            for t in &rows {
                println!(
                    "{:<40} {:>9} {:>12} {:>14}",
                    key(t),
                    t.requests,
                    t.tokens,
                    t.cost.to_string()
                );
            }
        }
        UsageCmd::Timeseries {
            bucket,
            since_hours,
            principal,
            model,
            json,
        } => {
            let q = UsageQuery {
                since_ms: since(since_hours),
                until_ms: now_ms + 3_600_000,
                principals: principal
                    .map(|p| principal_key(&p).map(|k| vec![k]))
                    .transpose()?,
                model,
                bucket_secs: match bucket {
                    BucketArg::Hour => 3_600,
                    BucketArg::Day => 86_400,
                },
            };
            let points = store.usage_timeseries(&q).await?;
            let at = |s: i64| {
                chrono::DateTime::<chrono::Utc>::from_timestamp(s, 0)
                    .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
                    .unwrap_or_default()
            };
            if json {
                let v: Vec<Value> = points
                    .iter()
                    .map(|p| json!({"start": at(p.start), "model": p.model, "requests": p.requests, "tokens": p.tokens, "usd": p.cost.to_string()}))
                    .collect();
                println!("{}", Value::Array(v));
                return Ok(());
            }
            println!(
                "{:<22} {:<32} {:>9} {:>12} {:>14}",
                "START", "MODEL", "REQUESTS", "TOKENS", "USD"
            );
            for p in points {
                println!(
                    "{:<22} {:<32} {:>9} {:>12} {:>14}",
                    at(p.start),
                    p.model,
                    p.requests,
                    p.tokens,
                    p.cost.to_string()
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The principal's id (user name or email; service principal id with --kind service_principal).
    #[arg(long)]
    pub principal: String,
    #[arg(long, value_enum, default_value = "user")]
    pub kind: KindOfPrincipal,
    /// Groups the identity source would report (repeatable); stored and configured membership is added.
    #[arg(long = "group")]
    pub groups: Vec<String>,
    #[arg(long)]
    pub model: String,
    /// Prompt tokens to assume.
    #[arg(long, default_value_t = 0)]
    pub input_tokens: u64,
    /// Output bound to assume (default: admission.default_output_tokens).
    #[arg(long)]
    pub max_tokens: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindOfPrincipal {
    User,
    ServicePrincipal,
}

/// Dry run of an admission: which budgets match, where each stands, which binds, and the decision.
pub async fn check(config: &Config, clock: &SharedClock, a: CheckArgs) -> anyhow::Result<()> {
    let store = crate::app::open_store(config, clock).await?;
    let ledger = loaded_ledger(config, &store, clock).await?;
    let principal = Principal {
        kind: match a.kind {
            KindOfPrincipal::User => PrincipalKind::User,
            KindOfPrincipal::ServicePrincipal => PrincipalKind::ServicePrincipal,
        },
        id: a.principal.clone(),
        groups: a.groups.clone(),
    };
    let policy = ledger.policy();
    let groups = policy.groups_of(&principal);
    let output = a.max_tokens.unwrap_or(config.extproc.default_output_tokens);
    let ask = Ask {
        principal: &principal,
        model: Some(&a.model),
        estimate: TokenClasses {
            input: a.input_tokens,
            output,
            ..Default::default()
        },
        // A dry run shows the global view; leases are a replica's private bookkeeping.
        lease: LeaseStep::Bypass,
    };
    let ev = ledger.evaluate(&ask);
    let outcome = ev.outcome();
    let (decision, binding) = match &outcome {
        Admission::Allowed { binding, .. } => ("allow", binding.as_ref().map(|b| b.name.clone())),
        Admission::Denied { denial, .. } => ("deny", Some(denial.status.name.clone())),
        Admission::Pending { .. } => ("allow", None),
    };
    let canonical = policy.models.canonical(&a.model).into_owned();
    if a.json {
        let budgets: Vec<Value> = ev
            .considered
            .iter()
            .map(|c| {
                let mut v = status_json(&c.status, &c.key.member);
                v["requested"] = json!(c.want);
                v["verdict"] = json!(c.verdict.map(DenyReason::as_str).unwrap_or("fits"));
                v["binds"] = json!(binding.as_deref() == Some(c.status.name.as_str()));
                v
            })
            .collect();
        println!(
            "{}",
            json!({
                "principal": principal.key(), "groups": groups, "model": a.model, "canonical_model": canonical,
                "priced": ev.priced, "estimate": {"tokens": ev.estimate.tokens, "usd": NanoUsd(ev.estimate.nanos).to_string()},
                "decision": decision, "binding": binding, "budgets": budgets, "overridden": ev.overridden,
            })
        );
        return Ok(());
    }
    println!(
        "principal  {}   groups: {}",
        principal.key(),
        if groups.is_empty() {
            "(none)".into()
        } else {
            groups.join(", ")
        }
    );
    println!(
        "model      {}{}   {}",
        a.model,
        if canonical != a.model {
            format!(" (as {canonical})")
        } else {
            String::new()
        },
        if ev.priced {
            format!(
                "estimate {} tokens, ${}",
                ev.estimate.tokens,
                NanoUsd(ev.estimate.nanos)
            )
        } else {
            format!("estimate {} tokens, no price", ev.estimate.tokens)
        }
    );
    println!("{} matching budget(s):", ev.considered.len());
    for c in &ev.considered {
        let s = &c.status;
        let binds = binding.as_deref() == Some(s.name.as_str());
        let verdict = match c.verdict {
            None => "fits".to_string(),
            Some(r) => format!("would deny: {}", r.as_str()),
        };
        println!(
            "  {} {:<24} {:<9} {:<16} used {} + reserved {} + this {} of {}  → {}{}",
            if binds { "*" } else { " " },
            s.name,
            s.action.as_str(),
            s.window.to_string(),
            s.unit.show(s.used),
            s.unit.show(s.reserved),
            s.unit.show(c.want),
            s.unit.show(s.limit),
            verdict,
            s.resets_at.map_or(String::new(), |t| format!(
                "; resets {}",
                t.to_rfc3339_opts(SecondsFormat::Secs, true)
            )),
        );
    }
    for name in &ev.overridden {
        println!("    {name:<24} set aside: an override budget applies to this principal");
    }
    match &outcome {
        Admission::Allowed {
            binding: Some(b),
            shadow,
            ..
        } => {
            println!(
                "decision   ALLOW — binding budget {:?} (least headroom: {} left after this request)",
                b.name,
                b.unit.show(b.remaining())
            );
            for d in shadow {
                println!(
                    "           shadow budget {:?} would deny ({})",
                    d.status.name,
                    d.reason.as_str()
                );
            }
        }
        Admission::Allowed { binding: None, .. } | Admission::Pending { .. } => {
            println!("decision   ALLOW — no enforced budget applies")
        }
        Admission::Denied { denial, .. } => println!(
            "decision   DENY — budget {:?}: {} ({} status)",
            denial.status.name,
            denial.reason.as_str(),
            if denial.reason == DenyReason::ModelNotPriced {
                403
            } else {
                429
            }
        ),
    }
    Ok(())
}
