//! Reserve, then settle: the arithmetic that keeps concurrent requests from all passing at the
//! limit.
//!
//! [`Counters`] holds, per (budget, member) counter, the current window's bucket, the amount used
//! (as last read from the store plus what this process settled since), the part of that not yet
//! written to the store, and what in-flight requests have reserved. A request is admitted only if,
//! on every matching enforced budget, `used + reserved + estimate ≤ limit`; it then reserves its
//! estimate on all of them at once. At the end of the stream the reservation is released and the
//! actual amount is added, in the window current at that moment.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::budget::{Action, BudgetId, Principal, Unit};
use super::matching::MatchCache;
use super::money::TokenClasses;
use super::window::Window;
use super::{Policy, UnpricedModel};

/// An amount in both units at once, so a budget can change unit without losing its history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amount {
    pub tokens: u64,
    pub nanos: u64,
}

impl Amount {
    pub fn in_unit(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Tokens => self.tokens,
            Unit::Usd => self.nanos,
        }
    }

    fn add(&mut self, o: Amount) {
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.nanos = self.nanos.saturating_add(o.nanos);
    }

    fn sub(&mut self, o: Amount) {
        self.tokens = self.tokens.saturating_sub(o.tokens);
        self.nanos = self.nanos.saturating_sub(o.nanos);
    }
}

/// One counter: a budget, and for per-member budgets the member (empty for a shared pool).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CounterKey {
    pub budget: BudgetId,
    pub member: Arc<str>,
}

/// An increment of one counter in one window, to be written to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterDelta {
    pub key: CounterKey,
    pub bucket: i64,
    pub amount: Amount,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Bucket {
    start: i64,
    /// Store value at the last refresh plus `unflushed`.
    used: Amount,
    /// Settled here, not yet confirmed written to the store.
    unflushed: Amount,
}

/// One counter: the buckets still counting (one for calendar and total windows, up to 61 for a
/// rolling window), ascending, and what requests in flight hold.
#[derive(Debug, Default, Clone)]
struct Counter {
    buckets: Vec<Bucket>,
    /// Held by requests in flight (kept across window changes: they are still in flight).
    reserved: Amount,
}

impl Counter {
    /// Forgets buckets that no longer count.
    fn prune(&mut self, oldest: i64) {
        self.buckets.retain(|b| b.start >= oldest);
    }

    fn used(&self) -> Amount {
        let mut a = Amount::default();
        for b in &self.buckets {
            a.add(b.used);
        }
        a
    }

    fn bucket_mut(&mut self, start: i64) -> &mut Bucket {
        let i = match self.buckets.binary_search_by_key(&start, |b| b.start) {
            Ok(i) => i,
            Err(i) => {
                self.buckets.insert(
                    i,
                    Bucket {
                        start,
                        ..Bucket::default()
                    },
                );
                i
            }
        };
        &mut self.buckets[i]
    }

    /// When a rolling window frees enough for `want` more (in `unit`), as its oldest buckets age
    /// out; for an allowed request (`want` = 0 and already under the limit), when the oldest usage
    /// ages out. `None` when ageing alone cannot free enough.
    fn rolling_reset(
        &self,
        window: &Window,
        unit: Unit,
        limit: u64,
        want: u64,
    ) -> Option<DateTime<Utc>> {
        let used = self.used().in_unit(unit);
        let reserved = self.reserved.in_unit(unit);
        let mut freed = 0u64;
        for b in &self.buckets {
            let u = b.used.in_unit(unit);
            if u == 0 {
                continue;
            }
            freed = freed.saturating_add(u);
            let still = used.saturating_sub(freed);
            if want == 0 || still.saturating_add(reserved).saturating_add(want) <= limit {
                return window.ages_out_at(b.start);
            }
        }
        None
    }
}

/// What the caller asks to spend: who, which model, and the estimate to reserve.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub principal: &'a Principal,
    pub model: Option<&'a str>,
    pub estimate: TokenClasses,
}

/// One budget's state as a decision saw it, in the budget's unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetStatus {
    pub budget: BudgetId,
    pub name: String,
    pub window: Window,
    pub action: Action,
    pub unit: Unit,
    pub limit: u64,
    pub used: u64,
    pub reserved: u64,
    pub resets_at: Option<DateTime<Utc>>,
}

impl BudgetStatus {
    pub fn remaining(&self) -> u64 {
        self.limit
            .saturating_sub(self.used.saturating_add(self.reserved))
    }

    /// Whole seconds until the window resets, rounded up; `None` for lifetime budgets.
    pub fn reset_after(&self, now: DateTime<Utc>) -> Option<u64> {
        self.resets_at.map(|t| {
            let ms = (t - now).num_milliseconds().max(0) as u64;
            ms.div_ceil(1000)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// Used + in flight + this request's estimate exceeds the limit.
    Exhausted,
    /// This request's estimate alone exceeds the limit: it can never be admitted.
    NeverFits,
    /// A USD budget applies and the model has no price.
    ModelNotPriced,
}

impl DenyReason {
    /// The reason as recorded in deny events and shown by the API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Exhausted => "exhausted",
            DenyReason::NeverFits => "never_fits",
            DenyReason::ModelNotPriced => "model_not_priced",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub status: BudgetStatus,
    pub reason: DenyReason,
    /// The request's estimate in the budget's unit.
    pub requested: u64,
}

/// The held part of an admission, released at settlement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservation {
    pub entries: Vec<Held>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub key: CounterKey,
    pub window: Window,
    pub amount: Amount,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Allowed {
        reservation: Reservation,
        /// The enforced budget with the least headroom left, for the response headers.
        binding: Option<BudgetStatus>,
        /// Shadow budgets that would have denied this request.
        shadow: Vec<Denial>,
    },
    Denied {
        denial: Denial,
        shadow: Vec<Denial>,
    },
}

/// One matching budget as a decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Considered {
    pub key: CounterKey,
    /// Used and reserved before this request.
    pub status: BudgetStatus,
    /// This request's estimate in the budget's unit.
    pub want: u64,
    /// Why this budget would deny the request, if it would.
    pub verdict: Option<DenyReason>,
}

/// Everything a decision looked at: the matching budgets and where each stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub estimate: Amount,
    /// The model had a price (USD estimates are meaningful).
    pub priced: bool,
    pub considered: Vec<Considered>,
    /// Names of budgets that matched but were set aside because an override budget applies.
    pub overridden: Vec<String>,
    /// The matching budgets were remembered from an earlier request of the same caller.
    pub cache_hit: bool,
}

impl Evaluation {
    /// The decision these budgets make. When allowed, `binding` is the enforced budget with the
    /// least headroom once this request's estimate is reserved; nothing is reserved here.
    pub fn outcome(&self) -> Admission {
        let mut denials = Vec::new();
        let mut shadow = Vec::new();
        for c in &self.considered {
            if let Some(reason) = c.verdict {
                let d = Denial {
                    status: c.status.clone(),
                    reason,
                    requested: c.want,
                };
                match c.status.action {
                    Action::Enforce => denials.push(d),
                    Action::Shadow => shadow.push(d),
                }
            }
        }
        if let Some(denial) = pick_binding_denial(denials) {
            return Admission::Denied { denial, shadow };
        }
        // The enforced budget with proportionally the least headroom once this request is
        // reserved; only that one status is copied.
        let after = |c: &Considered| {
            let s = &c.status;
            (
                s.limit
                    .saturating_sub(s.used.saturating_add(s.reserved).saturating_add(c.want)),
                s.limit.max(1),
            )
        };
        let tightest = self
            .considered
            .iter()
            .filter(|c| c.status.action == Action::Enforce)
            .min_by(|a, b| {
                let ((ra, la), (rb, lb)) = (after(a), after(b));
                (u128::from(ra) * u128::from(lb)).cmp(&(u128::from(rb) * u128::from(la)))
            });
        let binding = tightest.map(|c| {
            let mut status = c.status.clone();
            status.reserved = status.reserved.saturating_add(c.want);
            status
        });
        Admission::Allowed {
            reservation: Reservation::default(),
            binding,
            shadow,
        }
    }
}

/// Every counter this process knows, current window only, and the matches of recent callers.
#[derive(Debug, Default)]
pub struct Counters {
    map: HashMap<CounterKey, Counter>,
    matches: MatchCache,
    last_match_hit: bool,
}

impl Counters {
    /// The counter for `key`, without the buckets that no longer count at `now`.
    fn at(
        &mut self,
        key: &CounterKey,
        window: &Window,
        now: DateTime<Utc>,
        tz: Tz,
    ) -> &mut Counter {
        let c = self.map.entry(key.clone()).or_default();
        c.prune(window.oldest_counted(now, tz));
        c
    }

    /// How every budget matching `ask` stands, without reserving anything.
    pub fn evaluate(&mut self, policy: &Policy, ask: &Ask<'_>, now: DateTime<Utc>) -> Evaluation {
        let (matched, cache_hit) = self.matches.get(policy, ask.principal, ask.model);
        self.last_match_hit = cache_hit;
        let price = ask
            .model
            .and_then(|m| policy.price(m, now.timestamp_millis()));
        let estimate = Amount {
            tokens: ask.estimate.total().0,
            nanos: price.map_or(0, |p| p.cost(&ask.estimate).0),
        };
        let unpriced =
            ask.model.is_some() && price.is_none() && policy.unpriced == UnpricedModel::Deny;
        let mut considered = Vec::with_capacity(matched.hits.len());
        for m in &matched.hits {
            let budget = &policy.budgets[m.index];
            let key = CounterKey {
                budget: budget.id.clone(),
                member: Arc::clone(&m.member),
            };
            let c = self.at(&key, &budget.window, now, policy.tz);
            let unit = budget.limit.unit();
            let limit = budget.limit.value();
            let used = c.used().in_unit(unit);
            let reserved = c.reserved.in_unit(unit);
            let want = estimate.in_unit(unit);
            let verdict = if unit == Unit::Usd && unpriced {
                Some(DenyReason::ModelNotPriced)
            } else if want > limit {
                Some(DenyReason::NeverFits)
            } else if used.saturating_add(reserved).saturating_add(want) > limit {
                Some(DenyReason::Exhausted)
            } else {
                None
            };
            let resets_at = match budget.window {
                Window::Rolling { .. } => {
                    let need = if verdict == Some(DenyReason::Exhausted) {
                        want
                    } else {
                        0
                    };
                    c.rolling_reset(&budget.window, unit, limit, need)
                }
                w => w.bounds(now, policy.tz).end,
            };
            let status = BudgetStatus {
                budget: budget.id.clone(),
                name: budget.name.clone(),
                window: budget.window,
                action: budget.action,
                unit,
                limit,
                used,
                reserved,
                resets_at,
            };
            considered.push(Considered {
                key,
                status,
                want,
                verdict,
            });
        }
        Evaluation {
            estimate,
            priced: price.is_some(),
            considered,
            overridden: matched.overridden.clone(),
            cache_hit,
        }
    }

    /// Whether the last evaluation found the caller's matching budgets in the cache.
    pub fn last_match_hit(&self) -> bool {
        self.last_match_hit
    }

    /// Decides and, when allowed, reserves — atomically with respect to other calls on `self`.
    pub fn admit(&mut self, policy: &Policy, ask: &Ask<'_>, now: DateTime<Utc>) -> Admission {
        let ev = self.evaluate(policy, ask, now);
        let outcome = ev.outcome();
        if let Admission::Denied { .. } = outcome {
            return outcome;
        }
        let entries = ev
            .considered
            .into_iter()
            .map(|c| {
                if let Some(counter) = self.map.get_mut(&c.key) {
                    counter.reserved.add(ev.estimate);
                }
                Held {
                    key: c.key,
                    window: c.status.window,
                    amount: ev.estimate,
                }
            })
            .collect();
        match outcome {
            Admission::Allowed {
                binding, shadow, ..
            } => Admission::Allowed {
                reservation: Reservation { entries },
                binding,
                shadow,
            },
            denied => denied,
        }
    }

    /// Releases `r` and adds `actual` to each of its counters in the window current at `now`.
    /// Returns the increments the store must record.
    pub fn settle(
        &mut self,
        r: &Reservation,
        actual: Amount,
        now: DateTime<Utc>,
        tz: Tz,
    ) -> Vec<CounterDelta> {
        let mut deltas = Vec::with_capacity(r.entries.len());
        for held in &r.entries {
            let bucket = held.window.bucket(now, tz);
            let c = self.at(&held.key, &held.window, now, tz);
            c.reserved.sub(held.amount);
            let b = c.bucket_mut(bucket);
            b.used.add(actual);
            b.unflushed.add(actual);
            deltas.push(CounterDelta {
                key: held.key.clone(),
                bucket,
                amount: actual,
            });
        }
        deltas
    }

    /// Releases `r` without charging anything (the upstream failed before producing usage).
    pub fn release(&mut self, r: &Reservation) {
        for held in &r.entries {
            if let Some(c) = self.map.get_mut(&held.key) {
                c.reserved.sub(held.amount);
            }
        }
    }

    /// Debits settled by an earlier process and not yet confirmed in the store (replayed from its
    /// journal): counted as used, and as unflushed until written.
    pub fn add_unflushed(&mut self, deltas: &[CounterDelta]) {
        for d in deltas {
            let b = self
                .map
                .entry(d.key.clone())
                .or_default()
                .bucket_mut(d.bucket);
            b.used.add(d.amount);
            b.unflushed.add(d.amount);
        }
    }

    /// The store has durably recorded `deltas`.
    pub fn mark_flushed(&mut self, deltas: &[CounterDelta]) {
        for d in deltas {
            if let Some(c) = self.map.get_mut(&d.key)
                && let Ok(i) = c.buckets.binary_search_by_key(&d.bucket, |b| b.start)
            {
                c.buckets[i].unflushed.sub(d.amount);
            }
        }
    }

    /// Replaces used amounts with what the store holds (plus what is not flushed yet), for the
    /// buckets of each budget in `oldest` (budget → oldest counted bucket), and forgets idle
    /// counters of deleted budgets. `rows` must hold every stored bucket from those oldest ones on;
    /// a missing row means zero.
    pub fn refresh(
        &mut self,
        oldest: &HashMap<BudgetId, i64>,
        rows: Vec<(CounterKey, i64, Amount)>,
    ) {
        let mut stored: HashMap<CounterKey, Vec<(i64, Amount)>> = HashMap::new();
        for (key, bucket, amount) in rows {
            if oldest.get(&key.budget).is_some_and(|o| bucket >= *o) {
                stored.entry(key).or_default().push((bucket, amount));
            }
        }
        self.map
            .retain(|key, c| oldest.contains_key(&key.budget) || c.reserved != Amount::default());
        for (key, c) in self.map.iter_mut() {
            let Some(&o) = oldest.get(&key.budget) else {
                continue;
            };
            c.prune(o);
            for b in &mut c.buckets {
                b.used = b.unflushed;
            }
            for (bucket, amount) in stored.remove(key).unwrap_or_default() {
                c.bucket_mut(bucket).used.add(amount);
            }
        }
        for (key, rows) in stored {
            let c = self.map.entry(key).or_default();
            for (bucket, amount) in rows {
                c.bucket_mut(bucket).used.add(amount);
            }
        }
    }

    /// The state of every counter of every budget in `policy` (pooled budgets without usage
    /// included, at zero), for status reports. Sorted by budget name, then member.
    pub fn statuses(
        &mut self,
        policy: &Policy,
        now: DateTime<Utc>,
    ) -> Vec<(BudgetStatus, Arc<str>)> {
        let mut out = Vec::new();
        for b in policy.budgets.iter() {
            let mut members: Vec<Arc<str>> = self
                .map
                .keys()
                .filter(|k| k.budget == b.id)
                .map(|k| Arc::clone(&k.member))
                .collect();
            if b.scope == super::Scope::Shared && members.is_empty() {
                members.push(Arc::from(""));
            }
            members.sort();
            for member in members {
                let key = CounterKey {
                    budget: b.id.clone(),
                    member: Arc::clone(&member),
                };
                let c = self.at(&key, &b.window, now, policy.tz);
                let unit = b.limit.unit();
                let resets_at = match b.window {
                    Window::Rolling { .. } => c.rolling_reset(&b.window, unit, b.limit.value(), 0),
                    w => w.bounds(now, policy.tz).end,
                };
                let status = BudgetStatus {
                    budget: b.id.clone(),
                    name: b.name.clone(),
                    window: b.window,
                    action: b.action,
                    unit,
                    limit: b.limit.value(),
                    used: c.used().in_unit(unit),
                    reserved: c.reserved.in_unit(unit),
                    resets_at,
                };
                out.push((status, member));
            }
        }
        out
    }

    /// Used and reserved amounts of one counter at `now` (no reservation made).
    pub fn peek(
        &mut self,
        key: &CounterKey,
        window: &Window,
        now: DateTime<Utc>,
        tz: Tz,
    ) -> (Amount, Amount) {
        let c = self.at(key, window, now, tz);
        (c.used(), c.reserved)
    }
}

/// The denial to report: an unpriced model first (the fix is a price), then a request that can
/// never fit, then the exhausted budget that frees last (so retrying after its reset can succeed).
fn pick_binding_denial(denials: Vec<Denial>) -> Option<Denial> {
    let rank = |d: &Denial| match d.reason {
        DenyReason::ModelNotPriced => 2,
        DenyReason::NeverFits => 1,
        DenyReason::Exhausted => 0,
    };
    denials.into_iter().max_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| match (a.status.resets_at, b.status.resets_at) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(_), None) => std::cmp::Ordering::Less,
                (Some(x), Some(y)) => x.cmp(&y),
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::budget::tests::budget;
    use crate::policy::budget::{Limit, Scope, SubjectKind};
    use crate::policy::money::{NanoUsd, Price, Tokens};
    use crate::policy::window::WindowUnit;
    use crate::policy::{Budget, PriceBook};

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-03T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn policy(budgets: Vec<Budget>) -> Policy {
        let mut prices = PriceBook::default();
        prices.insert(
            "gpt-4o-mini",
            0,
            Price {
                input: "0.15".parse().unwrap(),
                output: "0.60".parse().unwrap(),
                cache_read: "0.075".parse().unwrap(),
                cache_write: NanoUsd(0),
                cache_write_1h: NanoUsd(0),
            },
        );
        Policy::new(budgets, prices, chrono_tz::UTC, UnpricedModel::Deny)
    }

    fn ask<'a>(p: &'a Principal, model: &'a str, input: u64, output: u64) -> Ask<'a> {
        Ask {
            principal: p,
            model: Some(model),
            estimate: TokenClasses {
                input,
                output,
                ..Default::default()
            },
        }
    }

    fn tokens(n: u64) -> Amount {
        Amount {
            tokens: n,
            nanos: 0,
        }
    }

    #[test]
    fn reservations_stop_concurrent_requests_at_the_limit() {
        let p = policy(vec![budget(
            "alice",
            SubjectKind::User,
            "alice",
            Limit::Tokens(Tokens(1000)),
        )]);
        let alice = Principal::user("alice");
        let mut c = Counters::default();
        let mut held = Vec::new();
        // Each request reserves 10 + 90 = 100 tokens; ten fit, the eleventh does not.
        for i in 0..10 {
            match c.admit(&p, &ask(&alice, "m", 10, 90), now()) {
                Admission::Allowed {
                    reservation,
                    binding,
                    ..
                } => {
                    assert_eq!(binding.unwrap().remaining(), 1000 - 100 * (i + 1));
                    held.push(reservation);
                }
                other => panic!("request {i} denied: {other:?}"),
            }
        }
        let Admission::Denied { denial, .. } = c.admit(&p, &ask(&alice, "m", 10, 90), now()) else {
            panic!("11th admitted")
        };
        assert_eq!(denial.reason, DenyReason::Exhausted);
        assert_eq!((denial.status.used, denial.status.reserved), (0, 1000));
        // Settling one at its actual 40 tokens frees 60.
        let deltas = c.settle(&held.pop().unwrap(), tokens(40), now(), chrono_tz::UTC);
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].amount, tokens(40));
        assert!(matches!(
            c.admit(&p, &ask(&alice, "m", 10, 50), now()),
            Admission::Allowed { .. }
        ));
    }

    #[test]
    fn a_request_larger_than_the_limit_never_fits() {
        let p = policy(vec![budget(
            "a",
            SubjectKind::User,
            "alice",
            Limit::Tokens(Tokens(100)),
        )]);
        let alice = Principal::user("alice");
        let Admission::Denied { denial, .. } =
            Counters::default().admit(&p, &ask(&alice, "m", 1, 100), now())
        else {
            panic!()
        };
        assert_eq!(denial.reason, DenyReason::NeverFits);
    }

    #[test]
    fn denies_when_group_pool_is_spent_but_not_per_member() {
        let shared = budget("pool", SubjectKind::Group, "ml", Limit::Tokens(Tokens(100)));
        let mut each = budget("each", SubjectKind::Group, "ml", Limit::Tokens(Tokens(100)));
        each.scope = Scope::PerMember;
        let alice = Principal::user("alice").with_groups(["ml"]);
        let bob = Principal::user("bob").with_groups(["ml"]);
        let mut c = Counters::default();

        let p = policy(vec![shared]);
        let Admission::Allowed { reservation, .. } = c.admit(&p, &ask(&alice, "m", 50, 30), now())
        else {
            panic!()
        };
        c.settle(&reservation, tokens(80), now(), chrono_tz::UTC);
        assert!(matches!(
            c.admit(&p, &ask(&bob, "m", 10, 20), now()),
            Admission::Denied { .. }
        ));

        let p = policy(vec![each]);
        let mut c = Counters::default();
        let Admission::Allowed { reservation, .. } = c.admit(&p, &ask(&alice, "m", 50, 30), now())
        else {
            panic!()
        };
        c.settle(&reservation, tokens(80), now(), chrono_tz::UTC);
        assert!(matches!(
            c.admit(&p, &ask(&bob, "m", 10, 20), now()),
            Admission::Allowed { .. }
        ));
        assert!(matches!(
            c.admit(&p, &ask(&alice, "m", 10, 20), now()),
            Admission::Denied { .. }
        ));
    }

    #[test]
    fn usd_budgets_price_the_estimate_and_deny_unpriced_models() {
        let b = budget(
            "usd",
            SubjectKind::User,
            "alice",
            Limit::Usd("0.001".parse().unwrap()),
        );
        let p = policy(vec![b]);
        let alice = Principal::user("alice");
        let mut c = Counters::default();
        // 1000 in + 1000 out at $0.15/$0.60 per M = $0.00075: fits under $0.001.
        let Admission::Allowed { binding, .. } =
            c.admit(&p, &ask(&alice, "gpt-4o-mini", 1000, 1000), now())
        else {
            panic!()
        };
        assert_eq!(binding.unwrap().reserved, 750_000);
        let Admission::Denied { denial, .. } =
            c.admit(&p, &ask(&alice, "gpt-4o-mini", 1000, 1000), now())
        else {
            panic!()
        };
        assert_eq!(denial.reason, DenyReason::Exhausted);
        let Admission::Denied { denial, .. } = c.admit(&p, &ask(&alice, "mystery", 1, 1), now())
        else {
            panic!()
        };
        assert_eq!(denial.reason, DenyReason::ModelNotPriced);
    }

    #[test]
    fn shadow_budgets_report_but_allow() {
        let mut b = budget("watch", SubjectKind::Everyone, "", Limit::Tokens(Tokens(5)));
        b.action = Action::Shadow;
        let p = policy(vec![b]);
        let alice = Principal::user("alice");
        let Admission::Allowed {
            shadow, binding, ..
        } = Counters::default().admit(&p, &ask(&alice, "m", 10, 10), now())
        else {
            panic!()
        };
        assert_eq!(shadow.len(), 1);
        assert_eq!(binding, None);
    }

    #[test]
    fn a_new_window_starts_empty_and_keeps_in_flight_reservations() {
        let mut b = budget(
            "hourly",
            SubjectKind::User,
            "alice",
            Limit::Tokens(Tokens(100)),
        );
        b.window = Window::Calendar {
            unit: WindowUnit::Hour,
            every: 1,
        };
        let p = policy(vec![b]);
        let alice = Principal::user("alice");
        let mut c = Counters::default();
        let Admission::Allowed {
            reservation: r1, ..
        } = c.admit(&p, &ask(&alice, "m", 10, 20), now())
        else {
            panic!()
        };
        c.settle(&r1, tokens(70), now(), chrono_tz::UTC);
        let Admission::Allowed {
            reservation: r2, ..
        } = c.admit(&p, &ask(&alice, "m", 10, 20), now())
        else {
            panic!()
        };
        assert!(matches!(
            c.admit(&p, &ask(&alice, "m", 1, 1), now()),
            Admission::Denied { .. }
        ));
        let later = now() + chrono::Duration::hours(1);
        let Admission::Allowed { binding, .. } = c.admit(&p, &ask(&alice, "m", 10, 20), later)
        else {
            panic!()
        };
        // r2 (30) is still in flight across the boundary; the settled 70 belonged to the old hour.
        assert_eq!(binding.unwrap().remaining(), 100 - 30 - 30);
        let deltas = c.settle(&r2, tokens(5), later, chrono_tz::UTC);
        assert_eq!(
            deltas[0].bucket,
            later.timestamp() - later.timestamp() % 3600
        );
    }

    #[test]
    fn refresh_keeps_unflushed_amounts() {
        let p = policy(vec![budget(
            "a",
            SubjectKind::User,
            "alice",
            Limit::Tokens(Tokens(1000)),
        )]);
        let alice = Principal::user("alice");
        let mut c = Counters::default();
        let Admission::Allowed { reservation, .. } = c.admit(&p, &ask(&alice, "m", 1, 9), now())
        else {
            panic!()
        };
        let deltas = c.settle(&reservation, tokens(10), now(), chrono_tz::UTC);
        let key = deltas[0].key.clone();
        let bucket = deltas[0].bucket;
        let current = HashMap::from([(key.budget.clone(), bucket)]);
        // Another replica wrote 500; ours (10) is not flushed yet.
        c.refresh(&current, vec![(key.clone(), bucket, tokens(500))]);
        assert_eq!(
            c.peek(
                &key,
                &Window::Calendar {
                    unit: WindowUnit::Day,
                    every: 1
                },
                now(),
                chrono_tz::UTC
            )
            .0,
            tokens(510)
        );
        c.mark_flushed(&deltas);
        c.refresh(&current, vec![(key.clone(), bucket, tokens(510))]);
        assert_eq!(
            c.peek(
                &key,
                &Window::Calendar {
                    unit: WindowUnit::Day,
                    every: 1
                },
                now(),
                chrono_tz::UTC
            )
            .0,
            tokens(510)
        );
    }
}
