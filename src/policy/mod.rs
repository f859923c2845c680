//! PURE. The budget model, windows, money, prices and the admission arithmetic.
//!
//! Nothing here does IO, awaits, or reads the clock: callers pass `now`. This is where the rules
//! live and where most tests go.
//!
//! **Invariant:** an admission either reserves its estimate on *every* matching budget or on none.
//! **Boundary:** imports nothing from the rest of the crate.

pub mod admission;
pub mod budget;
pub mod matching;
pub mod models;
pub mod money;
pub mod prices;
#[cfg(test)]
mod props;
pub mod spec;
pub mod window;

use std::collections::HashMap;
use std::sync::Arc;

use chrono_tz::Tz;

pub use admission::{
    Admission, Amount, Ask, BudgetStatus, Considered, CounterDelta, CounterKey, Counters, Denial,
    DenyReason, Evaluation, Held, LeaseNeed, LeaseStep, LeaseUse, Reservation,
};
pub use budget::{
    Action, Budget, BudgetError, BudgetId, Limit, ModelSet, Principal, PrincipalKind, Scope,
    Subject, SubjectKind, Unit, principal_key,
};
pub use models::ModelAliases;
pub use money::{NanoUsd, Price, TokenClasses, Tokens};
pub use spec::{BudgetSpec, SpecError};
pub use window::{Window, WindowUnit};

/// Prices per model with their `effective_from` instants, so a change never re-rates the past.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    /// Per model, sorted by `effective_from` (epoch milliseconds), ascending.
    by_model: HashMap<String, Vec<(i64, Price)>>,
}

impl PriceBook {
    pub fn insert(&mut self, model: &str, effective_from_ms: i64, price: Price) {
        let v = self.by_model.entry(model.to_owned()).or_default();
        match v.binary_search_by_key(&effective_from_ms, |(t, _)| *t) {
            Ok(i) => v[i].1 = price,
            Err(i) => v.insert(i, (effective_from_ms, price)),
        }
    }

    /// The price in force for `model` at `at_ms`.
    pub fn at(&self, model: &str, at_ms: i64) -> Option<Price> {
        let v = self.by_model.get(model)?;
        let idx = v.partition_point(|(t, _)| *t <= at_ms);
        idx.checked_sub(1).map(|i| v[i].1)
    }
}

/// What to do with a model that has no price when a USD budget applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpricedModel {
    /// Deny with a message that says the model has no price (the default).
    Deny,
    /// Allow; the request counts against token budgets and costs nothing against USD budgets.
    Allow,
}

/// A consistent snapshot of everything admission needs to know, swapped atomically on change.
#[derive(Debug, Clone)]
pub struct Policy {
    pub budgets: Arc<[Budget]>,
    pub prices: PriceBook,
    pub tz: Tz,
    pub unpriced: UnpricedModel,
    /// Group membership managed by admins and declared in the config file, by principal key
    /// (`user:alice`); added to the groups the identity source reported.
    pub members: HashMap<String, Vec<String>>,
    pub models: ModelAliases,
    /// Lease mode: enforced budgets admit against this replica's lease of their headroom.
    pub lease_mode: bool,
    /// Unique per snapshot built by [`Policy::new`]: what cached matches are keyed by. A policy
    /// is not changed once decisions use it.
    generation: u64,
}

static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Policy {
    pub fn new(budgets: Vec<Budget>, prices: PriceBook, tz: Tz, unpriced: UnpricedModel) -> Self {
        Policy {
            budgets: budgets.into(),
            prices,
            tz,
            unpriced,
            members: HashMap::new(),
            models: ModelAliases::standard(),
            lease_mode: false,
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The principal's groups: from its identity, plus stored and configured membership.
    pub fn groups_of(&self, p: &Principal) -> Vec<String> {
        let mut groups = p.groups.clone();
        if let Some(extra) = self.members.get(&p.key()) {
            for g in extra {
                if !groups.contains(g) {
                    groups.push(g.clone());
                }
            }
        }
        groups
    }

    /// The price in force for `model` at `at_ms`: the exact name first, then its canonical name.
    pub fn price(&self, model: &str, at_ms: i64) -> Option<Price> {
        self.prices
            .at(model, at_ms)
            .or_else(|| self.prices.at(&self.models.canonical(model), at_ms))
    }

    /// Budgets that apply to `p` calling `model`, with their member keys. When an override budget
    /// matches the principal, only override budgets are returned.
    pub fn matching<'a>(
        &'a self,
        p: &Principal,
        model: Option<&str>,
    ) -> Vec<(&'a Budget, Arc<str>)> {
        self.matching_explained(p, model).0
    }

    /// As [`Policy::matching`], plus the names of the budgets an override set aside.
    pub fn matching_explained<'a>(
        &'a self,
        p: &Principal,
        model: Option<&str>,
    ) -> (Vec<(&'a Budget, Arc<str>)>, Vec<String>) {
        let canonical = model.map(|m| self.models.canonical(m));
        let widened;
        let p = if self.members.contains_key(&p.key()) {
            widened = Principal {
                groups: self.groups_of(p),
                ..p.clone()
            };
            &widened
        } else {
            p
        };
        let mut hits: Vec<(&Budget, Arc<str>)> = self
            .budgets
            .iter()
            .filter_map(|b| {
                let covered = b
                    .applies_to(p, model)
                    .or_else(|| match (&canonical, model) {
                        (Some(c), Some(m)) if c.as_ref() != m => b.applies_to(p, Some(c.as_ref())),
                        _ => None,
                    });
                covered.map(|k| (b, k))
            })
            .collect();
        let mut overridden = Vec::new();
        if hits.iter().any(|(b, _)| b.is_override) {
            overridden = hits
                .iter()
                .filter(|(b, _)| !b.is_override)
                .map(|(b, _)| b.name.clone())
                .collect();
            hits.retain(|(b, _)| b.is_override);
        }
        (hits, overridden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::budget::tests::budget;

    #[test]
    fn price_book_picks_the_price_in_force() {
        let mut book = PriceBook::default();
        let p1 = Price {
            input: NanoUsd(1),
            ..Default::default()
        };
        let p2 = Price {
            input: NanoUsd(2),
            ..Default::default()
        };
        book.insert("m", 1_000, p1);
        book.insert("m", 2_000, p2);
        assert_eq!(book.at("m", 999), None);
        assert_eq!(book.at("m", 1_000), Some(p1));
        assert_eq!(book.at("m", 1_999), Some(p1));
        assert_eq!(book.at("m", 5_000), Some(p2));
        assert_eq!(book.at("other", 5_000), None);
    }

    #[test]
    fn override_budgets_replace_the_rest_for_that_principal() {
        let mut power = budget(
            "power",
            SubjectKind::User,
            "alice",
            Limit::Tokens(Tokens(9)),
        );
        power.is_override = true;
        let team = budget("team", SubjectKind::Group, "ml", Limit::Tokens(Tokens(1)));
        let policy = Policy::new(
            vec![power, team],
            PriceBook::default(),
            chrono_tz::UTC,
            UnpricedModel::Deny,
        );
        let alice = Principal::user("alice").with_groups(["ml"]);
        let bob = Principal::user("bob").with_groups(["ml"]);
        let names = |p: &Principal| -> Vec<String> {
            policy
                .matching(p, Some("x"))
                .iter()
                .map(|(b, _)| b.name.clone())
                .collect()
        };
        assert_eq!(names(&alice), vec!["power"]);
        assert_eq!(names(&bob), vec!["team"]);
    }
}
