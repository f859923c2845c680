//! A budget as people write it — in the config file, on the command line, in the API — and its
//! validation into a [`Budget`]. One place, so every surface names the same fields and accepts the
//! same values.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::budget::{Action, Budget, BudgetId, Limit, ModelSet, Scope, Subject, SubjectKind};
use super::money::{NanoUsd, Tokens};
use super::window::{Window, WindowUnit};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    pub name: String,
    /// `user:NAME`, `service_principal:ID` (or `sp:ID`), `group:NAME`, or `everyone`.
    pub subject: String,
    /// `shared` (default) or `per_member`, for group and everyone budgets.
    #[serde(default)]
    pub scope: Option<String>,
    /// One pool across these models; empty for all models.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limit_tokens: Option<u64>,
    /// US dollars as a decimal string, e.g. `"500.00"`.
    #[serde(default)]
    pub limit_usd: Option<String>,
    /// `hour`, `day`, `week`, `month` or `total`.
    pub window: String,
    #[serde(default = "one")]
    pub every: u32,
    /// `calendar` (default) or `rolling`.
    #[serde(default)]
    pub kind: Option<String>,
    /// `enforce` (default) or `shadow`.
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default, rename = "override")]
    pub is_override: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// A spec that cannot become a budget: the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

impl BudgetSpec {
    /// Validates into a budget with the given id.
    pub fn to_budget(&self, id: &str) -> Result<Budget, SpecError> {
        let (kind, name) = self
            .subject
            .split_once(':')
            .unwrap_or((self.subject.as_str(), ""));
        let kind = SubjectKind::parse(kind).ok_or_else(|| {
            err("subject", format!("unknown kind {kind:?}; allowed: user:NAME, service_principal:ID, group:NAME, everyone"))
        })?;
        let scope = match self.scope.as_deref() {
            None => Scope::Shared,
            Some(s) => Scope::parse(s)
                .ok_or_else(|| err("scope", format!("expected shared or per_member, got {s:?}")))?,
        };
        let limit = match (self.limit_tokens, &self.limit_usd) {
            (Some(t), None) => Limit::Tokens(Tokens(t)),
            (None, Some(usd)) => Limit::Usd(
                usd.parse::<NanoUsd>()
                    .map_err(|e| err("limit_usd", e.to_string()))?,
            ),
            _ => {
                return Err(err(
                    "limit",
                    "give exactly one of limit_tokens or limit_usd",
                ));
            }
        };
        let rolling = match self.kind.as_deref() {
            None | Some("calendar") => false,
            Some("rolling") => true,
            Some(other) => {
                return Err(err(
                    "kind",
                    format!("expected calendar or rolling, got {other:?}"),
                ));
            }
        };
        let window = if self.window == "total" {
            Window::Total
        } else {
            let unit = WindowUnit::parse(&self.window).ok_or_else(|| {
                err(
                    "window",
                    format!(
                        "expected hour, day, week, month or total, got {:?}",
                        self.window
                    ),
                )
            })?;
            if rolling {
                Window::Rolling {
                    unit,
                    every: self.every,
                }
            } else {
                Window::Calendar {
                    unit,
                    every: self.every,
                }
            }
        };
        let action = match self.action.as_deref() {
            None | Some("enforce") => Action::Enforce,
            Some("shadow") => Action::Shadow,
            Some(other) => {
                return Err(err(
                    "action",
                    format!("expected enforce or shadow, got {other:?}"),
                ));
            }
        };
        let models: Vec<&String> = self
            .models
            .iter()
            .filter(|m| !m.trim().is_empty())
            .collect();
        let budget = Budget {
            id: BudgetId(Arc::from(id)),
            name: self.name.clone(),
            subject: Subject {
                kind,
                name: name.to_owned(),
            },
            scope,
            models: if models.is_empty() {
                ModelSet::All
            } else {
                ModelSet::only(models.into_iter().cloned())
            },
            limit,
            window,
            action,
            is_override: self.is_override,
            enabled: self.enabled,
        };
        budget.validate().map_err(|e| {
            let field = match e {
                super::BudgetError::BadName => "name",
                super::BudgetError::MissingSubjectName(_) => "subject",
                super::BudgetError::PerMemberOnIndividual(_) => "scope",
                super::BudgetError::OverrideOnShared(_) => "override",
                super::BudgetError::ZeroLimit => "limit",
                super::BudgetError::EmptyModelList => "models",
                super::BudgetError::Window(_) => "every",
            };
            err(field, e.to_string())
        })?;
        Ok(budget)
    }

    /// The spec of an existing budget (for `update`: change some fields, validate again).
    pub fn of(b: &Budget) -> BudgetSpec {
        let (window, every, kind) = match b.window {
            Window::Total => ("total".to_string(), 1, None),
            Window::Calendar { unit, every } => (unit.as_str().to_string(), every, None),
            Window::Rolling { unit, every } => (
                unit.as_str().to_string(),
                every,
                Some("rolling".to_string()),
            ),
        };
        let (limit_tokens, limit_usd) = match b.limit {
            Limit::Tokens(t) => (Some(t.0), None),
            Limit::Usd(u) => (None, Some(u.to_string())),
        };
        BudgetSpec {
            name: b.name.clone(),
            subject: b.subject.to_string(),
            scope: Some(b.scope.as_str().to_string()),
            models: match &b.models {
                ModelSet::All => Vec::new(),
                ModelSet::Only(v) => v.clone(),
            },
            limit_tokens,
            limit_usd,
            window,
            every,
            kind,
            action: Some(b.action.as_str().to_string()),
            is_override: b.is_override,
            enabled: b.enabled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> BudgetSpec {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_full_spec_becomes_a_budget_and_back() {
        let s = spec(
            r#"name = "ml pool"
               subject = "group:ml"
               scope = "per_member"
               models = ["gpt-4o", "claude-sonnet-4-5"]
               limit_usd = "500.00"
               window = "day"
               every = 7
               kind = "rolling"
               action = "shadow""#,
        );
        let b = s.to_budget("id1").unwrap();
        assert_eq!(
            b.window,
            Window::Rolling {
                unit: WindowUnit::Day,
                every: 7
            }
        );
        assert_eq!(b.limit, Limit::Usd(NanoUsd(500_000_000_000)));
        assert_eq!(b.scope, Scope::PerMember);
        assert_eq!(BudgetSpec::of(&b).to_budget("id1").unwrap(), b);
    }

    #[test]
    fn each_mistake_names_its_field() {
        let base = r#"name = "x"
subject = "user:a"
limit_tokens = 5
window = "day""#;
        let ok = spec(base);
        assert!(ok.to_budget("i").is_ok());
        let cases: Vec<(BudgetSpec, &str, &str)> = vec![
            (
                BudgetSpec {
                    subject: "team:a".into(),
                    ..ok.clone()
                },
                "subject",
                "team",
            ),
            (
                BudgetSpec {
                    scope: Some("each".into()),
                    ..ok.clone()
                },
                "scope",
                "per_member",
            ),
            (
                BudgetSpec {
                    limit_usd: Some("1".into()),
                    ..ok.clone()
                },
                "limit",
                "exactly one",
            ),
            (
                BudgetSpec {
                    limit_tokens: None,
                    limit_usd: Some("-1".into()),
                    ..ok.clone()
                },
                "limit_usd",
                "digits",
            ),
            (
                BudgetSpec {
                    window: "fortnight".into(),
                    ..ok.clone()
                },
                "window",
                "fortnight",
            ),
            (
                BudgetSpec {
                    kind: Some("sliding".into()),
                    ..ok.clone()
                },
                "kind",
                "rolling",
            ),
            (
                BudgetSpec {
                    action: Some("block".into()),
                    ..ok.clone()
                },
                "action",
                "shadow",
            ),
            (
                BudgetSpec {
                    scope: Some("per_member".into()),
                    ..ok.clone()
                },
                "scope",
                "per_member",
            ),
            (
                BudgetSpec {
                    subject: "group:g".into(),
                    is_override: true,
                    ..ok.clone()
                },
                "override",
                "override",
            ),
            (
                BudgetSpec {
                    limit_tokens: Some(0),
                    ..ok.clone()
                },
                "limit",
                "greater than zero",
            ),
            (
                BudgetSpec {
                    window: "hour".into(),
                    every: 5,
                    ..ok.clone()
                },
                "every",
                "divide 24",
            ),
        ];
        for (s, field, contains) in cases {
            let e = s.to_budget("i").unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(contains), "{e}");
        }
        assert!(
            toml::from_str::<BudgetSpec>("name='x'\nsubject='everyone'\nwindow='day'\nlimit='5'")
                .is_err()
        );
    }
}
