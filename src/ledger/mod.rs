//! Admission state in memory, and the path of every debit to the store.
//!
//! [`Ledger`] owns the policy snapshot (swapped atomically), the counters and reservations
//! ([`Counters`], behind one short mutex taken once at admission and once at settlement — never
//! per body chunk), and the inbox of debits not yet written. The [`writer`] task drains the inbox
//! in batches (one store transaction each), keeps the policy and counters fresh from the store,
//! and flushes everything on shutdown.
//!
//! **Invariant:** each settled request enters the inbox exactly once; the inbox never drops a debit
//! (when the store lags it grows past its soft capacity and `overflowed` counts it).
//! **Boundary:** the hot path calls `admit`/`settle`/`release`/`record_deny`, which never await.

pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::policy::{
    Admission, Amount, Ask, BudgetId, Counters, ModelAliases, Policy, PriceBook, Reservation,
    TokenClasses, UnpricedModel,
};
use crate::store::{Batch, Debit, DenyEvent, PolicyRows, UsageEvent};

/// Settings that shape the policy snapshot but are not stored.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub tz: chrono_tz::Tz,
    pub unpriced: UnpricedModel,
    pub models: ModelAliases,
    /// Group membership declared in the config file: (group, principal key).
    pub groups: Vec<(String, String)>,
}

/// The outcome of one request's response, to be charged.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub reservation: Reservation,
    pub request_id: String,
    pub principal: String,
    pub model: String,
    pub family: &'static str,
    pub tokens: TokenClasses,
    pub reasoning: u64,
    pub estimated: bool,
    pub outcome: &'static str,
}

#[derive(Default)]
struct Inbox {
    batch: Batch,
}

pub struct Ledger {
    policy: ArcSwap<Policy>,
    policy_version: AtomicU64,
    settings: PolicySettings,
    counters: Mutex<Counters>,
    inbox: Mutex<Inbox>,
    wake: Notify,
    clock: SharedClock,
    capacity: usize,
    ready: AtomicBool,
    store_ok: AtomicBool,
    pub metrics: Arc<Metrics>,
}

impl Ledger {
    pub fn new(
        settings: PolicySettings,
        clock: SharedClock,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Ledger> {
        Arc::new(Ledger {
            policy: ArcSwap::from_pointee(Policy::new(
                Vec::new(),
                PriceBook::default(),
                settings.tz,
                settings.unpriced,
            )),
            policy_version: AtomicU64::new(0),
            settings,
            counters: Mutex::new(Counters::default()),
            inbox: Mutex::new(Inbox::default()),
            wake: Notify::new(),
            clock,
            capacity,
            ready: AtomicBool::new(false),
            store_ok: AtomicBool::new(false),
            metrics,
        })
    }

    /// Group membership declared in the config file: (group, principal key).
    pub fn config_groups(&self) -> &[(String, String)] {
        &self.settings.groups
    }

    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// True once policy and counters were loaded from the store at least once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// False while the last store operation failed.
    pub fn store_ok(&self) -> bool {
        self.store_ok.load(Ordering::Acquire)
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        // A poisoned lock means a panic mid-update elsewhere; the counters are still the best
        // state we have, and refusing all traffic would be worse.
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides from memory and reserves when allowed. Never awaits.
    pub fn admit(&self, ask: &Ask<'_>) -> Admission {
        let policy = self.policy.load();
        let now = self.clock.now();
        let mut counters = self.counters();
        let admission = counters.admit(&policy, ask, now);
        let hit = counters.last_match_hit();
        drop(counters);
        self.metrics.match_cache(hit);
        admission
    }

    /// How every matching budget stands for `ask`, reserving nothing (the dry-run `check`).
    pub fn evaluate(&self, ask: &Ask<'_>) -> crate::policy::Evaluation {
        let policy = self.policy.load();
        let now = self.clock.now();
        self.counters().evaluate(&policy, ask, now)
    }

    /// Every budget's counters now, for status reports.
    pub fn statuses(&self) -> Vec<(crate::policy::BudgetStatus, std::sync::Arc<str>)> {
        let policy = self.policy.load();
        let now = self.clock.now();
        self.counters().statuses(&policy, now)
    }

    /// Releases the reservation, charges the actual usage and queues the debit. Never awaits.
    pub fn settle(&self, s: Settlement) {
        let now = self.clock.now();
        let policy = self.policy.load();
        let price = policy.price(&s.model, now.timestamp_millis());
        let cost = price.map(|p| p.cost(&s.tokens)).unwrap_or_default();
        let unpriced = price.is_none() && s.model != "unknown";
        let amount = Amount {
            tokens: s.tokens.total().0,
            nanos: cost.0,
        };
        let deltas = self
            .counters()
            .settle(&s.reservation, amount, now, policy.tz);
        let event = UsageEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            request_id: s.request_id,
            ts_ms: now.timestamp_millis(),
            principal: s.principal,
            model: s.model,
            family: s.family.to_string(),
            input: s.tokens.input,
            cache_read: s.tokens.cache_read,
            cache_write: s.tokens.cache_write,
            cache_write_1h: s.tokens.cache_write_1h,
            output: s.tokens.output,
            reasoning: s.reasoning,
            cost,
            estimated: s.estimated,
            outcome: s.outcome.to_string(),
            unpriced,
        };
        let t = &s.tokens;
        let priced_model = price.map(|_| policy.models.canonical(&event.model).into_owned());
        self.metrics.settled(
            s.outcome,
            priced_model.as_deref(),
            [
                ("input", t.input),
                ("cache_read", t.cache_read),
                ("cache_write", t.cache_write),
                ("cache_write_1h", t.cache_write_1h),
                ("output", t.output),
            ],
            cost.0,
            s.estimated,
        );
        self.enqueue(|b| b.debits.push(Debit { event, deltas }));
    }

    /// Releases a reservation without charging (the upstream answered with an error).
    pub fn release(&self, r: &Reservation) {
        if !r.entries.is_empty() {
            self.counters().release(r);
        }
    }

    pub fn record_deny(&self, deny: DenyEvent) {
        self.enqueue(|b| b.denies.push(deny));
    }

    fn enqueue(&self, add: impl FnOnce(&mut Batch)) {
        let mut inbox = self.inbox();
        add(&mut inbox.batch);
        if inbox.batch.len() > self.capacity {
            self.metrics.queue_overflow.inc();
        }
        drop(inbox);
        self.wake.notify_one();
    }

    /// Debits and denies waiting to be written.
    pub fn queue_depth(&self) -> usize {
        self.inbox().batch.len()
    }

    /// Takes up to `max` waiting records for one batch.
    pub(crate) fn take_batch(&self, max: usize) -> Batch {
        let mut inbox = self.inbox();
        let b = &mut inbox.batch;
        if b.len() <= max {
            return std::mem::take(b);
        }
        let debits = b.debits.len().min(max);
        let denies = (max - debits).min(b.denies.len());
        Batch {
            debits: b.debits.drain(..debits).collect(),
            denies: b.denies.drain(..denies).collect(),
        }
    }

    /// Puts a batch that failed to write back in front of the queue, in order.
    pub(crate) fn requeue(&self, mut batch: Batch) {
        let mut inbox = self.inbox();
        batch.debits.append(&mut inbox.batch.debits);
        batch.denies.append(&mut inbox.batch.denies);
        inbox.batch = batch;
    }

    pub(crate) fn mark_flushed(&self, batch: &Batch) {
        let mut c = self.counters();
        for d in &batch.debits {
            c.mark_flushed(&d.deltas);
        }
    }

    /// Installs a new policy from store rows.
    pub(crate) fn install_policy(&self, rows: PolicyRows) {
        // A sync that read the store before an admin change must not undo that change's reload.
        if u64::try_from(rows.version).unwrap_or(0) < self.loaded_version() {
            return;
        }
        let mut prices = PriceBook::default();
        for p in rows.prices {
            prices.insert(&p.model, p.effective_from_ms, p.price);
        }
        let mut budgets = Vec::with_capacity(rows.budgets.len());
        for b in rows.budgets {
            match b.validate() {
                Ok(()) => budgets.push(b),
                Err(e) => {
                    tracing::warn!(budget = %b.name, error = %e, "ignoring invalid stored budget")
                }
            }
        }
        let mut policy = Policy::new(budgets, prices, self.settings.tz, self.settings.unpriced);
        policy.models = self.settings.models.clone();
        let mut members: HashMap<String, Vec<String>> = HashMap::new();
        for (group, principal) in rows
            .members
            .into_iter()
            .chain(self.settings.groups.iter().cloned())
        {
            let groups = members.entry(principal).or_default();
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
        policy.members = members;
        self.policy.store(Arc::new(policy));
        self.policy_version
            .store(u64::try_from(rows.version).unwrap_or(0), Ordering::Release);
    }

    pub(crate) fn loaded_version(&self) -> u64 {
        self.policy_version.load(Ordering::Acquire)
    }

    /// The oldest bucket still counting, per budget, for a counter refresh.
    pub(crate) fn current_windows(&self) -> HashMap<BudgetId, i64> {
        let policy = self.policy.load();
        let now = self.clock.now();
        policy
            .budgets
            .iter()
            .map(|b| (b.id.clone(), b.window.oldest_counted(now, policy.tz)))
            .collect()
    }

    pub(crate) fn refresh_counters(
        &self,
        current: &HashMap<BudgetId, i64>,
        rows: Vec<(crate::policy::CounterKey, i64, Amount)>,
    ) {
        self.counters().refresh(current, rows);
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub(crate) fn set_store_ok(&self, ok: bool) {
        self.store_ok.store(ok, Ordering::Release);
    }

    pub(crate) async fn wait_for_work(&self) {
        self.wake.notified().await;
    }

    /// Used and reserved amounts of one counter now (for reports and tests).
    pub fn peek(
        &self,
        key: &crate::policy::CounterKey,
        window: &crate::policy::Window,
    ) -> (Amount, Amount) {
        let now = self.clock.now();
        let tz = self.settings.tz;
        self.counters().peek(key, window, now, tz)
    }
}
