//! The budget model: who a budget applies to, which models, how much, over which window.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::money::{NanoUsd, Tokens};
use super::window::{Window, WindowError};

/// A budget's stable identifier (generated; the name can be changed).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BudgetId(pub Arc<str>);

impl fmt::Display for BudgetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    User,
    ServicePrincipal,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::ServicePrincipal => "service_principal",
        }
    }
}

/// The caller, as identity resolution established it from trusted sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: PrincipalKind,
    /// Stable id: an email or user name for users, an application id for service principals.
    pub id: String,
    pub groups: Vec<String>,
}

impl Principal {
    pub fn user(id: impl Into<String>) -> Self {
        Principal {
            kind: PrincipalKind::User,
            id: id.into(),
            groups: Vec::new(),
        }
    }

    pub fn with_groups<I: IntoIterator<Item = S>, S: Into<String>>(mut self, groups: I) -> Self {
        self.groups = groups.into_iter().map(Into::into).collect();
        self
    }

    /// `user:alice@example.com`, `service_principal:1234-…`: the member key of per-member counters
    /// and the principal column of usage rows.
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.id)
    }

    /// The principal of a key made by [`principal_key`].
    pub fn from_key(key: &str, groups: Vec<String>) -> Principal {
        let (kind, id) = match key.split_once(':') {
            Some(("service_principal", id)) => (PrincipalKind::ServicePrincipal, id),
            Some(("user", id)) => (PrincipalKind::User, id),
            _ => (PrincipalKind::User, key),
        };
        Principal {
            kind,
            id: id.to_owned(),
            groups,
        }
    }
}

/// A principal as people write it, as a key: `alice` → `user:alice`, `sp:ID` →
/// `service_principal:ID`; `user:…` and `service_principal:…` are kept.
pub fn principal_key(p: &str) -> Result<String, String> {
    match p.split_once(':') {
        Some(("user" | "service_principal", id)) if !id.is_empty() => Ok(p.to_owned()),
        Some(("sp", id)) if !id.is_empty() => Ok(format!("service_principal:{id}")),
        Some(_) => Err(format!(
            "{p:?}: expected user:NAME, service_principal:ID, or a bare user name"
        )),
        None if !p.trim().is_empty() => Ok(format!("user:{p}")),
        None => Err("must not be empty".into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectKind {
    User,
    ServicePrincipal,
    Group,
    Everyone,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::User => "user",
            SubjectKind::ServicePrincipal => "service_principal",
            SubjectKind::Group => "group",
            SubjectKind::Everyone => "everyone",
        }
    }

    pub fn parse(s: &str) -> Option<SubjectKind> {
        Some(match s {
            "user" => SubjectKind::User,
            "service_principal" | "sp" => SubjectKind::ServicePrincipal,
            "group" => SubjectKind::Group,
            "everyone" => SubjectKind::Everyone,
            _ => return None,
        })
    }
}

/// Whom a budget limits. `name` is empty for `everyone`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    pub kind: SubjectKind,
    pub name: String,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SubjectKind::Everyone => f.write_str("everyone"),
            k => write!(f, "{}:{}", k.as_str(), self.name),
        }
    }
}

/// For group and everyone budgets: one pool for all members, or the limit for each member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Shared,
    PerMember,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Shared => "shared",
            Scope::PerMember => "per_member",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Some(match s {
            "shared" => Scope::Shared,
            "per_member" => Scope::PerMember,
            _ => return None,
        })
    }
}

/// The models a budget covers: all, or one shared pool across a list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelSet {
    All,
    /// Sorted and deduplicated.
    Only(Vec<String>),
}

impl ModelSet {
    pub fn only<I: IntoIterator<Item = S>, S: Into<String>>(models: I) -> ModelSet {
        let mut v: Vec<String> = models.into_iter().map(Into::into).collect();
        v.sort();
        v.dedup();
        ModelSet::Only(v)
    }

    pub fn covers(&self, model: Option<&str>) -> bool {
        match (self, model) {
            (ModelSet::All, _) => true,
            (ModelSet::Only(list), Some(m)) => list.binary_search_by(|x| x.as_str().cmp(m)).is_ok(),
            (ModelSet::Only(_), None) => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Tokens(Tokens),
    Usd(NanoUsd),
}

impl Limit {
    pub fn unit(&self) -> Unit {
        match self {
            Limit::Tokens(_) => Unit::Tokens,
            Limit::Usd(_) => Unit::Usd,
        }
    }

    /// The limit as an integer in its unit (tokens, or nano-USD).
    pub fn value(&self) -> u64 {
        match *self {
            Limit::Tokens(t) => t.0,
            Limit::Usd(n) => n.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Tokens,
    Usd,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Tokens => "tokens",
            Unit::Usd => "usd",
        }
    }

    /// Renders an amount of this unit for people: `1234` tokens or `$12.50`.
    pub fn show(self, value: u64) -> String {
        match self {
            Unit::Tokens => value.to_string(),
            Unit::Usd => format!("${}", NanoUsd(value)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Deny requests that would exceed the limit.
    Enforce,
    /// Record would-block decisions, allow the request.
    Shadow,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Enforce => "enforce",
            Action::Shadow => "shadow",
        }
    }
}

/// The member key of a shared pool (empty), allocated once.
static SHARED_POOL: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub id: BudgetId,
    pub name: String,
    pub subject: Subject,
    pub scope: Scope,
    pub models: ModelSet,
    pub limit: Limit,
    pub window: Window,
    pub action: Action,
    /// For user and service-principal budgets: when any override budget matches a principal,
    /// only override budgets apply to it.
    pub is_override: bool,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("name must be 1 to 200 characters")]
    BadName,
    #[error("subject.name is required for {0} budgets")]
    MissingSubjectName(&'static str),
    #[error("scope per_member applies only to group and everyone budgets, not {0}")]
    PerMemberOnIndividual(&'static str),
    #[error("override applies only to user and service_principal budgets, not {0}")]
    OverrideOnShared(&'static str),
    #[error("limit must be greater than zero for an enforced budget")]
    ZeroLimit,
    #[error("models must list at least one model, or be omitted for all models")]
    EmptyModelList,
    #[error("{0}")]
    Window(#[from] WindowError),
}

impl Budget {
    /// Rejects budgets that cannot work, naming the field at fault.
    pub fn validate(&self) -> Result<(), BudgetError> {
        if self.name.trim().is_empty() || self.name.chars().count() > 200 {
            return Err(BudgetError::BadName);
        }
        let kind = self.subject.kind;
        if kind != SubjectKind::Everyone && self.subject.name.trim().is_empty() {
            return Err(BudgetError::MissingSubjectName(kind.as_str()));
        }
        let individual = matches!(kind, SubjectKind::User | SubjectKind::ServicePrincipal);
        if individual && self.scope == Scope::PerMember {
            return Err(BudgetError::PerMemberOnIndividual(kind.as_str()));
        }
        if !individual && self.is_override {
            return Err(BudgetError::OverrideOnShared(kind.as_str()));
        }
        if self.action == Action::Enforce && self.limit.value() == 0 {
            return Err(BudgetError::ZeroLimit);
        }
        if matches!(&self.models, ModelSet::Only(v) if v.is_empty()) {
            return Err(BudgetError::EmptyModelList);
        }
        self.window.validate()?;
        Ok(())
    }

    /// Whether this budget applies to `p` calling `model`; if so, the counter's member key
    /// (empty for a pooled budget, the principal's key for a per-member one).
    pub fn applies_to(&self, p: &Principal, model: Option<&str>) -> Option<Arc<str>> {
        if !self.enabled || !self.models.covers(model) {
            return None;
        }
        let hit = match self.subject.kind {
            SubjectKind::User => p.kind == PrincipalKind::User && p.id == self.subject.name,
            SubjectKind::ServicePrincipal => {
                p.kind == PrincipalKind::ServicePrincipal && p.id == self.subject.name
            }
            SubjectKind::Group => p.groups.contains(&self.subject.name),
            SubjectKind::Everyone => true,
        };
        if !hit {
            return None;
        }
        Some(match self.scope {
            Scope::Shared => Arc::clone(&SHARED_POOL),
            Scope::PerMember => Arc::from(p.key()),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::window::WindowUnit;

    pub fn budget(name: &str, kind: SubjectKind, subject: &str, limit: Limit) -> Budget {
        Budget {
            id: BudgetId(Arc::from(format!("id-{name}"))),
            name: name.into(),
            subject: Subject {
                kind,
                name: subject.into(),
            },
            scope: Scope::Shared,
            models: ModelSet::All,
            limit,
            window: Window::Calendar {
                unit: WindowUnit::Day,
                every: 1,
            },
            action: Action::Enforce,
            is_override: false,
            enabled: true,
        }
    }

    #[test]
    fn invalid_budgets_are_rejected_with_the_field_named() {
        let ok = budget("a", SubjectKind::User, "alice", Limit::Tokens(Tokens(10)));
        assert_eq!(ok.validate(), Ok(()));
        let cases: Vec<(Budget, BudgetError)> = vec![
            (
                Budget {
                    name: " ".into(),
                    ..ok.clone()
                },
                BudgetError::BadName,
            ),
            (
                Budget {
                    scope: Scope::PerMember,
                    ..ok.clone()
                },
                BudgetError::PerMemberOnIndividual("user"),
            ),
            (
                Budget {
                    limit: Limit::Tokens(Tokens(0)),
                    ..ok.clone()
                },
                BudgetError::ZeroLimit,
            ),
            (
                Budget {
                    models: ModelSet::Only(vec![]),
                    ..ok.clone()
                },
                BudgetError::EmptyModelList,
            ),
            (
                Budget {
                    subject: Subject {
                        kind: SubjectKind::Group,
                        name: "ml".into(),
                    },
                    is_override: true,
                    ..ok.clone()
                },
                BudgetError::OverrideOnShared("group"),
            ),
            (
                Budget {
                    subject: Subject {
                        kind: SubjectKind::Group,
                        name: "".into(),
                    },
                    ..ok.clone()
                },
                BudgetError::MissingSubjectName("group"),
            ),
        ];
        for (b, want) in cases {
            assert_eq!(b.validate(), Err(want));
        }
        // A shadow budget may have a zero limit: it only reports.
        let shadow = Budget {
            action: Action::Shadow,
            limit: Limit::Tokens(Tokens(0)),
            ..ok
        };
        assert_eq!(shadow.validate(), Ok(()));
    }

    #[test]
    fn matching_respects_kind_groups_models_and_scope() {
        let alice = Principal::user("alice").with_groups(["ml", "eng"]);
        let sp = Principal {
            kind: PrincipalKind::ServicePrincipal,
            id: "alice".into(),
            groups: vec![],
        };
        let user_b = budget("u", SubjectKind::User, "alice", Limit::Tokens(Tokens(1)));
        assert_eq!(
            user_b.applies_to(&alice, Some("gpt-4o")).as_deref(),
            Some("")
        );
        assert_eq!(
            user_b.applies_to(&sp, Some("gpt-4o")),
            None,
            "kinds are distinct"
        );

        let mut group = budget("g", SubjectKind::Group, "ml", Limit::Tokens(Tokens(1)));
        assert_eq!(group.applies_to(&alice, None).as_deref(), Some(""));
        group.scope = Scope::PerMember;
        assert_eq!(
            group.applies_to(&alice, None).as_deref(),
            Some("user:alice")
        );
        assert_eq!(group.applies_to(&Principal::user("bob"), None), None);

        let mut models = budget("m", SubjectKind::Everyone, "", Limit::Tokens(Tokens(1)));
        models.models = ModelSet::only(["gpt-4o", "claude-sonnet-4-5"]);
        assert!(
            models
                .applies_to(&alice, Some("claude-sonnet-4-5"))
                .is_some()
        );
        assert!(models.applies_to(&alice, Some("gpt-4o-mini")).is_none());
        assert!(models.applies_to(&alice, None).is_none());

        models.enabled = false;
        assert!(models.applies_to(&alice, Some("gpt-4o")).is_none());
    }
}
