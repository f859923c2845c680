//! Command-line commands other than `serve`: they talk to the store directly.

use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};

use crate::clock::SharedClock;
use crate::config::Config;
use crate::policy::{
    Action, Budget, BudgetId, Limit, ModelSet, NanoUsd, Scope, Subject, SubjectKind, Tokens,
    Window, WindowUnit,
};
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub enum BudgetCmd {
    /// Create a budget.
    Create(CreateBudget),
    /// List budgets.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a budget by name.
    Delete { name: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WindowArg {
    Hour,
    Day,
    Week,
    Month,
    Total,
}

#[derive(Debug, Args)]
pub struct CreateBudget {
    /// Unique name, e.g. "alice daily".
    #[arg(long)]
    pub name: String,
    /// user:NAME, service_principal:ID (or sp:ID), group:NAME, or everyone.
    #[arg(long)]
    pub subject: String,
    /// For group and everyone budgets: shared (one pool) or per_member.
    #[arg(long, default_value = "shared")]
    pub scope: String,
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
    /// Record would-deny decisions without denying.
    #[arg(long)]
    pub shadow: bool,
    /// For user/service-principal budgets: only override budgets apply to this principal.
    #[arg(long = "override")]
    pub is_override: bool,
    #[arg(long)]
    pub disabled: bool,
}

impl CreateBudget {
    pub fn to_budget(&self) -> anyhow::Result<Budget> {
        let (kind, name) = match self.subject.split_once(':') {
            Some((k, n)) => (k, n),
            None => (self.subject.as_str(), ""),
        };
        let kind = SubjectKind::parse(kind).with_context(|| {
            format!("--subject: unknown kind {kind:?}; allowed: user:NAME, service_principal:ID, group:NAME, everyone")
        })?;
        let scope = Scope::parse(&self.scope).with_context(|| {
            format!(
                "--scope: expected shared or per_member, got {:?}",
                self.scope
            )
        })?;
        let limit = match (&self.limit_tokens, &self.limit_usd) {
            (Some(t), None) => Limit::Tokens(Tokens(*t)),
            (None, Some(usd)) => Limit::Usd(
                usd.parse::<NanoUsd>()
                    .map_err(|e| anyhow::anyhow!("--limit-usd: {e}"))?,
            ),
            _ => bail!("give exactly one of --limit-tokens or --limit-usd"),
        };
        let window = match self.window {
            WindowArg::Total => Window::Total,
            WindowArg::Hour => Window::Calendar {
                unit: WindowUnit::Hour,
                every: self.every,
            },
            WindowArg::Day => Window::Calendar {
                unit: WindowUnit::Day,
                every: self.every,
            },
            WindowArg::Week => Window::Calendar {
                unit: WindowUnit::Week,
                every: self.every,
            },
            WindowArg::Month => Window::Calendar {
                unit: WindowUnit::Month,
                every: self.every,
            },
        };
        let b = Budget {
            id: BudgetId(Arc::from(uuid::Uuid::now_v7().to_string())),
            name: self.name.clone(),
            subject: Subject {
                kind,
                name: name.to_owned(),
            },
            scope,
            models: if self.models.is_empty() {
                ModelSet::All
            } else {
                ModelSet::only(self.models.iter().cloned())
            },
            limit,
            window,
            action: if self.shadow {
                Action::Shadow
            } else {
                Action::Enforce
            },
            is_override: self.is_override,
            enabled: !self.disabled,
        };
        b.validate()
            .map_err(|e| anyhow::anyhow!("invalid budget: {e}"))?;
        Ok(b)
    }
}

fn budget_json(b: &Budget) -> serde_json::Value {
    serde_json::json!({
        "id": &*b.id.0,
        "name": b.name,
        "subject": {"kind": b.subject.kind.as_str(), "name": b.subject.name},
        "scope": b.scope.as_str(),
        "models": match &b.models { ModelSet::All => serde_json::Value::Null, ModelSet::Only(v) => serde_json::json!(v) },
        "limit": match b.limit { Limit::Tokens(t) => serde_json::json!({"tokens": t.0}), Limit::Usd(u) => serde_json::json!({"usd": u.to_string()}) },
        "window": b.window.to_string(),
        "action": b.action.as_str(),
        "override": b.is_override,
        "enabled": b.enabled,
    })
}

pub async fn budgets(config: &Config, clock: &SharedClock, cmd: BudgetCmd) -> anyhow::Result<()> {
    let store = crate::app::open_store(config, clock).await?;
    match cmd {
        BudgetCmd::Create(c) => {
            let b = c.to_budget()?;
            store
                .create_budget(&b, clock.now().timestamp_millis())
                .await?;
            println!("created budget {:?} ({})", b.name, b.id);
        }
        BudgetCmd::List { json } => {
            let list = store.list_budgets().await?;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(list.iter().map(budget_json).collect())
                );
            } else {
                print_budgets(&list);
            }
        }
        BudgetCmd::Delete { name } => {
            store.delete_budget(&name).await?;
            println!("deleted budget {name:?}");
        }
    }
    Ok(())
}

fn print_budgets(list: &[Budget]) {
    println!(
        "{:<24} {:<28} {:<10} {:<22} {:>14} {:<10} {:<8}",
        "NAME", "SUBJECT", "SCOPE", "MODELS", "LIMIT", "WINDOW", "ACTION"
    );
    for b in list {
        let models = match &b.models {
            ModelSet::All => "all".to_string(),
            ModelSet::Only(v) => v.join(","),
        };
        let limit = b.limit.unit().show(b.limit.value());
        let mut action = b.action.as_str().to_string();
        if b.is_override {
            action.push_str("+override");
        }
        if !b.enabled {
            action.push_str(" (off)");
        }
        println!(
            "{:<24} {:<28} {:<10} {:<22} {:>14} {:<10} {:<8}",
            b.name,
            b.subject.to_string(),
            b.scope.as_str(),
            models,
            limit,
            b.window.to_string(),
            action
        );
    }
}

pub async fn usage(
    config: &Config,
    clock: &SharedClock,
    since_hours: u64,
    json: bool,
) -> anyhow::Result<()> {
    let store: Store = crate::app::open_store(config, clock).await?;
    let since = clock.now().timestamp_millis()
        - i64::try_from(since_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
    let totals = store.usage_since(since).await?;
    if json {
        let rows: Vec<_> = totals
            .iter()
            .map(|t| serde_json::json!({"principal": t.principal, "model": t.model, "requests": t.requests, "tokens": t.tokens, "usd": t.cost.to_string()}))
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<36} {:<28} {:>9} {:>12} {:>14}",
        "PRINCIPAL", "MODEL", "REQUESTS", "TOKENS", "USD"
    );
    for t in totals {
        println!(
            "{:<36} {:<28} {:>9} {:>12} {:>14}",
            t.principal,
            t.model,
            t.requests,
            t.tokens,
            t.cost.to_string()
        );
    }
    Ok(())
}
