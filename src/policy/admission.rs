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
use super::window::{Window, WindowCache};
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
    /// Lease mode: the lease this debit consumed, which the store lowers by the amount when it
    /// records the debit (the usage moves from "leased" to "used").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseUse>,
}

/// Which lease a debit came out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseUse {
    pub epoch: i64,
    pub unit: Unit,
}

/// A slice of a budget's global headroom this replica holds in the store (lease mode). Admission
/// against a leased budget needs `reserved + unflushed + estimate ≤ granted`; the store keeps
/// `used + Σ leases ≤ limit` across replicas, so the limit holds globally.
#[derive(Debug, Clone, Copy, Default)]
struct Lease {
    /// The window the lease is for ([`Window::lease_epoch`]).
    epoch: i64,
    unit: Option<Unit>,
    /// Held in the store for this replica, in the budget's unit. Lowered when the store
    /// records a debit it covered, and when headroom is given back.
    granted: u64,
    /// The lease lapses unless renewed by then (epoch ms).
    valid_until_ms: i64,
    /// The store had nothing left to grant: no new ask before this instant (epoch ms).
    short_until_ms: i64,
    /// What other replicas held at the last grant (counted as reserved while short).
    others: u64,
    /// Last admission against the lease (epoch ms): idle leases are given back.
    used_ms: i64,
}

/// One lease: a counter and the window it is for.
pub type LeaseKey = (CounterKey, i64);

/// A budget that needs (more of) a lease before a request can be admitted against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseNeed {
    pub key: CounterKey,
    pub epoch: i64,
    /// The oldest bucket that counts (the store sums used amounts from it on).
    pub oldest: i64,
    pub unit: Unit,
    pub limit: u64,
    /// How much more than the lease's current headroom is needed.
    pub want: u64,
}

/// How an admission treats leased budgets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeaseStep {
    /// A leased budget without enough headroom asks for a lease ([`Admission::Pending`]).
    #[default]
    Acquire,
    /// The lease was asked for already: not enough headroom now means exhausted.
    Final,
    /// Leases cannot be had (the store is down) and `no_state = allow`: the global view decides.
    Bypass,
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
    lease: Lease,
}

impl Counter {
    fn unflushed(&self) -> Amount {
        let mut a = Amount::default();
        for b in &self.buckets {
            a.add(b.unflushed);
        }
        a
    }

    /// The lease for `epoch`, if one is held and still valid at `now_ms`.
    fn lease_for(&self, epoch: i64, now_ms: i64) -> Option<&Lease> {
        let l = &self.lease;
        (l.epoch == epoch && l.unit.is_some() && now_ms <= l.valid_until_ms).then_some(l)
    }

    /// What the lease for `epoch` still covers beyond what this replica reserved and settled.
    fn lease_headroom(&self, epoch: i64, unit: Unit, now_ms: i64) -> u64 {
        let local = self.reserved.in_unit(unit) + self.unflushed().in_unit(unit);
        self.lease_for(epoch, now_ms)
            .map_or(0, |l| l.granted.saturating_sub(local))
    }

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
    pub lease: LeaseStep,
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
    /// Lease mode: the budget has room globally, but this replica's lease does not cover the
    /// request yet (never shown to a client: the request waits for a lease).
    NeedsLease,
}

impl DenyReason {
    /// The reason as recorded in deny events and shown by the API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Exhausted => "exhausted",
            DenyReason::NeverFits => "never_fits",
            DenyReason::ModelNotPriced => "model_not_priced",
            DenyReason::NeedsLease => "needs_lease",
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
    /// Lease mode: the budget's unit (its settled amount comes out of the lease).
    pub leased: Option<Unit>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Allowed {
        reservation: Reservation,
        /// The enforced budget with the least headroom left, for the response headers.
        binding: Option<BudgetStatus>,
        /// Shadow budgets that would have denied this request.
        shadow: Vec<Denial>,
        /// Lease mode: leases running low after this admission, to top up in the background.
        refills: Vec<LeaseNeed>,
    },
    Denied {
        denial: Denial,
        shadow: Vec<Denial>,
    },
    /// Lease mode: every budget has room, but some leases must grow first; ask the store for
    /// `needs`, then decide again with [`LeaseStep::Final`]. Nothing was reserved.
    Pending {
        needs: Vec<LeaseNeed>,
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
    /// Lease mode: the budget's unit when admission is against this replica's lease.
    pub leased: Option<Unit>,
    /// With `verdict == NeedsLease`: the lease to ask for.
    pub need: Option<LeaseNeed>,
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
        let mut needs = Vec::new();
        for c in &self.considered {
            if let Some(need) = &c.need {
                needs.push(need.clone());
                continue;
            }
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
        if !needs.is_empty() {
            return Admission::Pending { needs };
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
            refills: Vec::new(),
        }
    }
}

/// Every counter this process knows, current window only, and the matches of recent callers.
#[derive(Debug, Default)]
pub struct Counters {
    /// foldhash, not SipHash: keys are our own ids, hashed several times per request.
    map: HashMap<CounterKey, Counter, foldhash::fast::RandomState>,
    matches: MatchCache,
    last_match_hit: bool,
    windows: WindowCache,
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
        let oldest = self.windows.oldest(window, now, tz);
        let c = self.map.entry(key.clone()).or_default();
        c.prune(oldest);
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
        let now_ms = now.timestamp_millis();
        let mut considered = Vec::with_capacity(matched.hits.len());
        for m in &matched.hits {
            let budget = &policy.budgets[m.index];
            let key = CounterKey {
                budget: budget.id.clone(),
                member: Arc::clone(&m.member),
            };
            let epoch = self.windows.lease_epoch(&budget.window, now, policy.tz);
            let oldest = self.windows.oldest(&budget.window, now, policy.tz);
            let end = self.windows.bounds(&budget.window, now, policy.tz).end;
            let c = self.at(&key, &budget.window, now, policy.tz);
            let unit = budget.limit.unit();
            let limit = budget.limit.value();
            let used = c.used().in_unit(unit);
            let mut reserved = c.reserved.in_unit(unit);
            let want = estimate.in_unit(unit);
            let leased = (policy.lease_mode
                && budget.action == Action::Enforce
                && ask.lease != LeaseStep::Bypass)
                .then_some(unit);
            if leased.is_some()
                && let Some(l) = c.lease_for(epoch, now_ms)
                && l.short_until_ms > now_ms
            {
                // The store just said other replicas hold this: not ours to spend (until we ask
                // again, after the backoff).
                reserved = reserved.saturating_add(l.others);
            }
            let mut need = None;
            let verdict = if unit == Unit::Usd && unpriced {
                Some(DenyReason::ModelNotPriced)
            } else if want > limit {
                Some(DenyReason::NeverFits)
            } else if used.saturating_add(reserved).saturating_add(want) > limit {
                Some(DenyReason::Exhausted)
            } else if leased.is_some() && want > c.lease_headroom(epoch, unit, now_ms) {
                let short = c.lease.epoch == epoch && c.lease.short_until_ms > now_ms;
                if ask.lease == LeaseStep::Final || short {
                    Some(DenyReason::Exhausted)
                } else {
                    need = Some(LeaseNeed {
                        key: key.clone(),
                        epoch,
                        oldest,
                        unit,
                        limit,
                        want: want - c.lease_headroom(epoch, unit, now_ms),
                    });
                    Some(DenyReason::NeedsLease)
                }
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
                _ => end,
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
                leased,
                need,
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
        if !matches!(outcome, Admission::Allowed { .. }) {
            return outcome;
        }
        let now_ms = now.timestamp_millis();
        let mut refills = Vec::new();
        let entries = ev
            .considered
            .into_iter()
            .map(|c| {
                if let Some(counter) = self.map.get_mut(&c.key) {
                    counter.reserved.add(ev.estimate);
                    if let Some(unit) = c.leased {
                        counter.lease.used_ms = now_ms;
                        // Top the lease up before it runs dry, so the next request need not wait.
                        let epoch = c.status.window.lease_epoch(now, policy.tz);
                        // (Admitted already: the window cache was consulted in `evaluate`.)
                        let left = counter.lease_headroom(epoch, unit, now_ms);
                        if left < c.want.max(counter.lease.granted / 4) {
                            refills.push(LeaseNeed {
                                key: c.key.clone(),
                                epoch,
                                oldest: c.status.window.oldest_counted(now, policy.tz),
                                unit,
                                limit: c.status.limit,
                                want: c.want.max(1),
                            });
                        }
                    }
                }
                Held {
                    key: c.key,
                    window: c.status.window,
                    amount: ev.estimate,
                    leased: c.leased,
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
                refills,
            },
            other => other,
        }
    }

    /// A reservation of nothing on every budget `ask` matches, whatever their headroom: what
    /// usage charged without an admission (QuotaService LogUsage, a commit after its hold
    /// lapsed) settles against. Not against a lease: it was never taken from one.
    pub fn unreserved(
        &mut self,
        policy: &Policy,
        ask: &Ask<'_>,
        now: DateTime<Utc>,
    ) -> Reservation {
        let ev = self.evaluate(policy, ask, now);
        Reservation {
            entries: ev
                .considered
                .into_iter()
                .map(|c| Held {
                    key: c.key,
                    window: c.status.window,
                    amount: Amount::default(),
                    leased: None,
                })
                .collect(),
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
            let bucket = self.windows.bucket(&held.window, now, tz);
            let epoch = self.windows.lease_epoch(&held.window, now, tz);
            let c = self.at(&held.key, &held.window, now, tz);
            c.reserved.sub(held.amount);
            let b = c.bucket_mut(bucket);
            b.used.add(actual);
            b.unflushed.add(actual);
            deltas.push(CounterDelta {
                key: held.key.clone(),
                bucket,
                amount: actual,
                lease: held.leased.map(|unit| LeaseUse { epoch, unit }),
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

    /// The store granted `granted` more of the lease on `key` for `epoch` (0 when it had nothing
    /// left, which blocks new asks until `short_until_ms`); other replicas hold `others`.
    pub fn grant_lease(
        &mut self,
        need: &LeaseNeed,
        granted: u64,
        others: u64,
        now_ms: i64,
        valid_until_ms: i64,
        short_until_ms: i64,
    ) {
        let c = self.map.entry(need.key.clone()).or_default();
        let l = &mut c.lease;
        if l.epoch != need.epoch || l.unit != Some(need.unit) || now_ms > l.valid_until_ms {
            // A new window, or a lapsed lease: the store counts only what it granted from now on.
            *l = Lease {
                epoch: need.epoch,
                unit: Some(need.unit),
                ..Lease::default()
            };
        }
        l.granted = l.granted.saturating_add(granted);
        l.others = others;
        l.valid_until_ms = valid_until_ms;
        if granted < need.want {
            l.short_until_ms = short_until_ms;
        }
    }

    /// Leases not admitted against since `idle_before_ms`: their headroom is taken off now (so no
    /// admission can use it) and returned, to be given back to the store.
    pub fn take_idle_lease_headroom(
        &mut self,
        idle_before_ms: i64,
        now_ms: i64,
    ) -> Vec<(CounterKey, i64, u64)> {
        let mut out = Vec::new();
        for (key, c) in self.map.iter_mut() {
            let Some(unit) = c.lease.unit else { continue };
            if c.lease.used_ms >= idle_before_ms || now_ms > c.lease.valid_until_ms {
                continue;
            }
            let free = c.lease_headroom(c.lease.epoch, unit, now_ms);
            if free > 0 {
                c.lease.granted -= free;
                out.push((key.clone(), c.lease.epoch, free));
            }
        }
        out
    }

    /// Gives headroom taken by [`Counters::take_idle_lease_headroom`] back to the lease (the
    /// store did not take it).
    pub fn restore_lease_headroom(&mut self, key: &CounterKey, epoch: i64, amount: u64) {
        if let Some(c) = self.map.get_mut(key)
            && c.lease.epoch == epoch
        {
            c.lease.granted = c.lease.granted.saturating_add(amount);
        }
    }

    /// Leases still valid at `now_ms` (to renew), after dropping the lapsed ones, which are
    /// returned too (the store may have granted their headroom to others).
    pub fn leases(&mut self, now_ms: i64) -> (Vec<LeaseKey>, Vec<LeaseKey>) {
        let (mut live, mut lapsed) = (Vec::new(), Vec::new());
        for (key, c) in self.map.iter_mut() {
            if c.lease.unit.is_none() {
                continue;
            }
            if now_ms > c.lease.valid_until_ms {
                lapsed.push((key.clone(), c.lease.epoch));
                c.lease = Lease::default();
            } else {
                live.push((key.clone(), c.lease.epoch));
            }
        }
        (live, lapsed)
    }

    /// Leases the store no longer has (they expired there): this replica holds nothing on them.
    pub fn drop_leases(&mut self, gone: &[(CounterKey, i64)]) {
        for (key, epoch) in gone {
            if let Some(c) = self.map.get_mut(key)
                && c.lease.epoch == *epoch
            {
                c.lease = Lease::default();
            }
        }
    }

    /// The store extended the leases `renewed` to `valid_until_ms`.
    pub fn extend_leases(&mut self, renewed: &[(CounterKey, i64)], valid_until_ms: i64) {
        for (key, epoch) in renewed {
            if let Some(c) = self.map.get_mut(key)
                && c.lease.epoch == *epoch
                && c.lease.unit.is_some()
            {
                c.lease.valid_until_ms = c.lease.valid_until_ms.max(valid_until_ms);
            }
        }
    }

    /// The store has durably recorded `deltas`.
    pub fn mark_flushed(&mut self, deltas: &[CounterDelta]) {
        for d in deltas {
            let Some(c) = self.map.get_mut(&d.key) else {
                continue;
            };
            if let Ok(i) = c.buckets.binary_search_by_key(&d.bucket, |b| b.start) {
                c.buckets[i].unflushed.sub(d.amount);
            }
            // The store lowered the lease by the same amount in the same transaction.
            if let Some(u) = d.lease
                && c.lease.epoch == u.epoch
                && c.lease.unit == Some(u.unit)
            {
                c.lease.granted = c.lease.granted.saturating_sub(d.amount.in_unit(u.unit));
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
        DenyReason::Exhausted | DenyReason::NeedsLease => 0,
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
            lease: LeaseStep::Acquire,
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

    fn leased(limit: u64) -> Policy {
        let mut p = policy(vec![budget(
            "pool",
            SubjectKind::Everyone,
            "",
            Limit::Tokens(Tokens(limit)),
        )]);
        p.lease_mode = true;
        p
    }

    fn need_of(a: Admission) -> LeaseNeed {
        match a {
            Admission::Pending { mut needs } => {
                assert_eq!(needs.len(), 1);
                needs.remove(0)
            }
            other => panic!("expected a lease ask, got {other:?}"),
        }
    }

    fn reservation_of(a: Admission) -> Reservation {
        match a {
            Admission::Allowed { reservation, .. } => reservation,
            other => panic!("expected an admission, got {other:?}"),
        }
    }

    #[test]
    fn a_leased_budget_admits_only_within_its_lease() {
        let p = leased(1000);
        let mut c = Counters::default();
        let alice = Principal::user("alice");
        let now_ms = now().timestamp_millis();
        // No lease yet: ask for exactly what the request needs.
        let need = need_of(c.admit(&p, &ask(&alice, "m", 20, 80), now()));
        assert_eq!(
            (need.want, need.limit, need.unit),
            (100, 1000, Unit::Tokens)
        );
        c.grant_lease(&need, 250, 0, now_ms, now_ms + 7_500, now_ms + 250);
        let r1 = reservation_of(c.admit(&p, &ask(&alice, "m", 20, 80), now()));
        let r2 = reservation_of(c.admit(&p, &ask(&alice, "m", 20, 80), now()));
        // 50 left in the lease: the third request needs 50 more, though the budget has 800.
        let need = need_of(c.admit(&p, &ask(&alice, "m", 20, 80), now()));
        assert_eq!(need.want, 50);
        let mut final_ask = ask(&alice, "m", 20, 80);
        final_ask.lease = LeaseStep::Final;
        assert!(matches!(
            c.admit(&p, &final_ask, now()),
            Admission::Denied { denial, .. } if denial.reason == DenyReason::Exhausted
        ));
        // Settling moves usage from reserved to unflushed: still inside the lease.
        let deltas = c.settle(&r1, tokens(100), now(), chrono_tz::UTC);
        assert_eq!(
            deltas[0].lease,
            Some(LeaseUse {
                epoch: need.epoch,
                unit: Unit::Tokens
            })
        );
        assert!(matches!(
            c.admit(&p, &ask(&alice, "m", 20, 80), now()),
            Admission::Pending { .. }
        ));
        // The store records the debit and lowers the lease by as much: headroom is unchanged.
        c.mark_flushed(&deltas);
        assert!(matches!(
            c.admit(&p, &ask(&alice, "m", 20, 80), now()),
            Admission::Pending { .. }
        ));
        c.release(&r2);
        let r3 = reservation_of(c.admit(&p, &ask(&alice, "m", 20, 80), now()));
        assert_eq!(r3.entries[0].leased, Some(Unit::Tokens));
        // Bypass (store down, no_state = allow) decides on the global view alone.
        let mut bypass = ask(&alice, "m", 20, 80);
        bypass.lease = LeaseStep::Bypass;
        assert!(matches!(
            c.admit(&p, &bypass, now()),
            Admission::Allowed { .. }
        ));
    }

    #[test]
    fn a_short_grant_denies_at_once_until_the_backoff_passes() {
        let p = leased(1000);
        let mut c = Counters::default();
        let alice = Principal::user("alice");
        let now_ms = now().timestamp_millis();
        let need = need_of(c.admit(&p, &ask(&alice, "m", 20, 80), now()));
        // Other replicas hold everything: nothing granted.
        c.grant_lease(&need, 0, 1000, now_ms, now_ms + 7_500, now_ms + 250);
        match c.admit(&p, &ask(&alice, "m", 20, 80), now()) {
            Admission::Denied { denial, .. } => {
                assert_eq!(denial.reason, DenyReason::Exhausted);
                assert_eq!(
                    denial.status.reserved, 1000,
                    "held by others is shown as reserved"
                );
            }
            other => panic!("{other:?}"),
        }
        let later = now() + chrono::Duration::milliseconds(300);
        assert!(matches!(
            c.admit(&p, &ask(&alice, "m", 20, 80), later),
            Admission::Pending { .. }
        ));
    }

    #[test]
    fn idle_headroom_is_taken_off_before_it_is_given_back_and_lapsed_leases_are_dropped() {
        let p = leased(1000);
        let mut c = Counters::default();
        let alice = Principal::user("alice");
        let now_ms = now().timestamp_millis();
        let need = need_of(c.admit(&p, &ask(&alice, "m", 20, 80), now()));
        c.grant_lease(&need, 400, 0, now_ms, now_ms + 7_500, now_ms + 250);
        let r = reservation_of(c.admit(&p, &ask(&alice, "m", 20, 80), now()));
        // Used just now: not idle.
        assert!(c.take_idle_lease_headroom(now_ms, now_ms + 1).is_empty());
        // Idle: the 300 not reserved go back; the 100 in flight stay covered.
        let back = c.take_idle_lease_headroom(now_ms + 1, now_ms + 1);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].2, 300);
        c.settle(&r, tokens(100), now(), chrono_tz::UTC);
        assert!(matches!(
            c.admit(&p, &ask(&alice, "m", 20, 80), now()),
            Admission::Pending { .. }
        ));
        // The store refused the release: the headroom is usable again.
        c.restore_lease_headroom(&back[0].0, back[0].1, 300);
        assert!(matches!(
            c.admit(&p, &ask(&alice, "m", 20, 80), now()),
            Admission::Allowed { .. }
        ));
        // Past its validity the lease is gone.
        let (live, lapsed) = c.leases(now_ms + 8_000);
        assert!(live.is_empty());
        assert_eq!(lapsed.len(), 1);
        let after = now() + chrono::Duration::milliseconds(8_000);
        assert!(matches!(
            c.admit(&p, &ask(&alice, "m", 20, 80), after),
            Admission::Pending { .. }
        ));
    }
}
