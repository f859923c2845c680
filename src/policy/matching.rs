//! Which budgets apply to a caller, remembered per (principal, groups, model) for one policy.
//!
//! Matching scans every budget and builds member keys; the same caller asks again and again with
//! the same model, so [`MatchCache`] keeps the answer until the policy changes (each [`Policy`]
//! has its own generation). A hit costs one hash and one comparison of the key's fields, and
//! allocates nothing.
//!
//! **Invariant:** an entry is only ever used with the policy generation that computed it; the
//! cache never grows beyond [`MatchCache::CAPACITY`] entries (it is emptied when full).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use super::Policy;
use super::budget::{Principal, PrincipalKind};

/// One matching budget: its index in `policy.budgets` and the counter member key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub index: usize,
    pub member: Arc<str>,
}

/// The budgets that apply to one caller and model under one policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matched {
    pub hits: Vec<Match>,
    /// Names of budgets that matched but were set aside because an override budget applies.
    pub overridden: Vec<String>,
}

#[derive(Debug)]
struct Entry {
    kind: PrincipalKind,
    id: String,
    groups: Vec<String>,
    model: Option<String>,
    matched: Arc<Matched>,
}

impl Entry {
    fn is(&self, p: &Principal, model: Option<&str>) -> bool {
        self.kind == p.kind
            && self.id == p.id
            && self.groups == p.groups
            && self.model.as_deref() == model
    }
}

/// Remembered matches for the current policy generation.
#[derive(Debug, Default)]
pub struct MatchCache {
    generation: u64,
    entries: HashMap<u64, Vec<Entry>, foldhash::fast::RandomState>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl MatchCache {
    /// Entries kept before the cache is emptied (a few MiB at most).
    pub const CAPACITY: usize = 65_536;

    fn key(&self, p: &Principal, model: Option<&str>) -> u64 {
        let mut h = self.hasher.build_hasher();
        p.kind.hash(&mut h);
        p.id.hash(&mut h);
        p.groups.hash(&mut h);
        model.hash(&mut h);
        h.finish()
    }

    /// The matches of `p` calling `model` under `policy`, and whether they were remembered.
    pub fn get(
        &mut self,
        policy: &Policy,
        p: &Principal,
        model: Option<&str>,
    ) -> (Arc<Matched>, bool) {
        if self.generation != policy.generation() {
            self.entries.clear();
            self.len = 0;
            self.generation = policy.generation();
        }
        let key = self.key(p, model);
        if let Some(e) = self
            .entries
            .get(&key)
            .and_then(|v| v.iter().find(|e| e.is(p, model)))
        {
            return (Arc::clone(&e.matched), true);
        }
        let matched = Arc::new(compute(policy, p, model));
        if self.len >= Self::CAPACITY {
            self.entries.clear();
            self.len = 0;
        }
        self.entries.entry(key).or_default().push(Entry {
            kind: p.kind,
            id: p.id.clone(),
            groups: p.groups.clone(),
            model: model.map(str::to_owned),
            matched: Arc::clone(&matched),
        });
        self.len += 1;
        (matched, false)
    }
}

fn compute(policy: &Policy, p: &Principal, model: Option<&str>) -> Matched {
    let (hits, overridden) = policy.matching_explained(p, model);
    let hits = hits
        .into_iter()
        .filter_map(|(b, member)| {
            let index = policy.budgets.iter().position(|x| std::ptr::eq(x, b))?;
            Some(Match { index, member })
        })
        .collect();
    Matched { hits, overridden }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::budget::tests::budget;
    use crate::policy::{Limit, PriceBook, SubjectKind, Tokens, UnpricedModel};

    fn policy() -> Policy {
        Policy::new(
            vec![
                budget("mine", SubjectKind::User, "alice", Limit::Tokens(Tokens(1))),
                budget("team", SubjectKind::Group, "ml", Limit::Tokens(Tokens(1))),
            ],
            PriceBook::default(),
            chrono_tz::UTC,
            UnpricedModel::Deny,
        )
    }

    #[test]
    fn a_repeated_caller_hits_and_a_new_policy_misses() {
        let mut cache = MatchCache::default();
        let p1 = policy();
        let alice = Principal::user("alice").with_groups(["ml"]);
        let (m, hit) = cache.get(&p1, &alice, Some("gpt-4o"));
        assert!(!hit);
        assert_eq!(m.hits.len(), 2);
        assert!(cache.get(&p1, &alice, Some("gpt-4o")).1);
        // Same id, other groups or model: a different caller.
        let (m, hit) = cache.get(&p1, &Principal::user("alice"), Some("gpt-4o"));
        assert!(!hit);
        assert_eq!(m.hits.len(), 1);
        assert!(!cache.get(&p1, &alice, Some("claude")).1);
        // A new policy (even an identical one) is never answered from the old one's entries.
        let p2 = policy();
        assert!(!cache.get(&p2, &alice, Some("gpt-4o")).1);
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut cache = MatchCache::default();
        let p = policy();
        for i in 0..(MatchCache::CAPACITY + 10) {
            cache.get(&p, &Principal::user(format!("u{i}")), None);
        }
        assert!(cache.len <= MatchCache::CAPACITY);
    }
}
