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

pub mod journal;
pub mod lease;
pub mod writer;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use journal::Record;

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
    /// The debit's idempotency key in the store; `None`: a new one (every Envoy request is its
    /// own). The QuotaService derives it from the caller's request id, so retries collapse.
    pub event_id: Option<String>,
    pub request_id: String,
    pub principal: String,
    pub model: String,
    pub family: &'static str,
    pub tokens: TokenClasses,
    pub reasoning: u64,
    pub estimated: bool,
    pub outcome: &'static str,
}

/// What [`Ledger::settle`] charged.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    /// The debit's sequence number (see [`Ledger::wait_durable`]).
    pub seq: u64,
    pub cost: crate::policy::NanoUsd,
}

/// Settled records on their way to the store, in sequence order. A record is `pending` until the
/// journal has it on disk (or at once without a journal), then `ready` for the store writer.
#[derive(Default)]
struct Inbox {
    pending: Vec<(u64, Record)>,
    debits: VecDeque<(u64, Debit)>,
    denies: VecDeque<(u64, DenyEvent)>,
    next_seq: u64,
}

impl Inbox {
    fn ready_len(&self) -> usize {
        self.debits.len() + self.denies.len()
    }

    fn push_ready(&mut self, seq: u64, r: Record) {
        match r {
            Record::Debit(d) => self.debits.push_back((seq, d)),
            Record::Deny(d) => self.denies.push_back((seq, d)),
        }
    }
}

/// A batch taken for one store transaction, with the sequence numbers of its records.
#[derive(Debug, Default)]
pub struct Taken {
    pub batch: Batch,
    debit_seqs: Vec<u64>,
    deny_seqs: Vec<u64>,
}

impl Taken {
    /// The highest sequence number in the batch (the journal may forget everything up to it
    /// once the batch is written).
    fn last_seq(&self) -> u64 {
        let d = self.debit_seqs.last().copied().unwrap_or(0);
        let n = self.deny_seqs.last().copied().unwrap_or(0);
        d.max(n)
    }
}

pub struct Ledger {
    policy: ArcSwap<Policy>,
    policy_version: AtomicU64,
    settings: PolicySettings,
    counters: Mutex<Counters>,
    inbox: Mutex<Inbox>,
    /// Wakes the journal thread when records become pending.
    journal_wake: Condvar,
    journaling: AtomicBool,
    journal_stop: AtomicBool,
    /// Highest sequence number on disk (every record at or below it is durable).
    durable: watch::Sender<u64>,
    /// Highest sequence number the store confirmed (a prefix: batches are written in order).
    flushed_seq: AtomicU64,
    wake: Notify,
    /// Another replica (or this one) changed the policy in the store.
    policy_changed: Notify,
    /// Lease mode's task (unset in sync mode).
    leases: std::sync::OnceLock<lease::LeaseClient>,
    clock: SharedClock,
    capacity: usize,
    ready: AtomicBool,
    store_ok: AtomicBool,
    draining: AtomicBool,
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
            inbox: Mutex::new(Inbox {
                next_seq: 1,
                ..Inbox::default()
            }),
            journal_wake: Condvar::new(),
            journaling: AtomicBool::new(false),
            journal_stop: AtomicBool::new(false),
            durable: watch::Sender::new(0),
            flushed_seq: AtomicU64::new(0),
            wake: Notify::new(),
            policy_changed: Notify::new(),
            leases: std::sync::OnceLock::new(),
            clock,
            capacity,
            ready: AtomicBool::new(false),
            store_ok: AtomicBool::new(false),
            draining: AtomicBool::new(false),
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

    /// True once shutdown began: no new streams are taken.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
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
        let mut admission = counters.admit(&policy, ask, now);
        let hit = counters.last_match_hit();
        drop(counters);
        self.metrics.match_cache(hit);
        if let Admission::Allowed { refills, .. } = &mut admission
            && !refills.is_empty()
            && let Some(l) = self.leases.get()
        {
            l.refill(std::mem::take(refills));
        }
        admission
    }

    /// Lease mode: from now on enforced budgets admit against leases granted through `client`.
    pub(crate) fn use_leases(&self, client: lease::LeaseClient) {
        let _ = self.leases.set(client);
    }

    /// Lease mode: asks for `needs` and waits, bounded by `lease_wait_ms`. `false` when the store
    /// did not answer in time (then [`crate::extproc::NoState`] decides).
    pub async fn acquire_leases(&self, needs: Vec<crate::policy::LeaseNeed>) -> bool {
        match self.leases.get() {
            Some(l) => l.acquire(needs).await,
            None => false,
        }
    }

    pub(crate) fn with_counters<R>(&self, f: impl FnOnce(&mut Counters) -> R) -> R {
        f(&mut self.counters())
    }

    /// How every matching budget stands for `ask`, reserving nothing (the dry-run `check`).
    pub fn evaluate(&self, ask: &Ask<'_>) -> crate::policy::Evaluation {
        let policy = self.policy.load();
        let now = self.clock.now();
        self.counters().evaluate(&policy, ask, now)
    }

    /// A reservation of nothing on every budget `ask` matches (see [`Counters::unreserved`]).
    pub fn unreserved(&self, ask: &Ask<'_>) -> Reservation {
        let policy = self.policy.load();
        let now = self.clock.now();
        self.counters().unreserved(&policy, ask, now)
    }

    /// Every budget's counters now, for status reports.
    pub fn statuses(&self) -> Vec<(crate::policy::BudgetStatus, std::sync::Arc<str>)> {
        let policy = self.policy.load();
        let now = self.clock.now();
        self.counters().statuses(&policy, now)
    }

    /// Releases the reservation, charges the actual usage and queues the debit. Never awaits.
    pub fn settle(&self, s: Settlement) -> Settled {
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
            event_id: s
                .event_id
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
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
        Settled {
            seq: self.enqueue(Record::Debit(Debit { event, deltas })),
            cost,
        }
    }

    /// Releases a reservation without charging (the upstream answered with an error).
    pub fn release(&self, r: &Reservation) {
        if !r.entries.is_empty() {
            self.counters().release(r);
        }
    }

    pub fn record_deny(&self, deny: DenyEvent) {
        self.enqueue(Record::Deny(deny));
    }

    fn enqueue(&self, r: Record) -> u64 {
        let mut inbox = self.inbox();
        let seq = inbox.next_seq;
        inbox.next_seq += 1;
        let journaling = self.journaling.load(Ordering::Acquire);
        // The journal thread sleeps until the first record of a group arrives (then gathers for
        // up to `journal_sync_ms`): only that record wakes it, not every one.
        let first = journaling && inbox.pending.is_empty();
        if journaling {
            inbox.pending.push((seq, r));
        } else {
            inbox.push_ready(seq, r);
        }
        if inbox.pending.len() + inbox.ready_len() > self.capacity {
            self.metrics.queue_overflow.inc();
        }
        drop(inbox);
        if first {
            self.journal_wake.notify_one();
        } else if !journaling {
            self.durable.send_replace(seq);
            self.wake.notify_one();
        }
        seq
    }

    /// Waits until the record `seq` is on disk (at once without a journal).
    pub async fn wait_durable(&self, seq: u64) {
        let mut rx = self.durable.subscribe();
        let _ = rx.wait_for(|d| *d >= seq).await;
    }

    /// Debits and denies waiting to be written (journaled or not yet).
    pub fn queue_depth(&self) -> usize {
        let inbox = self.inbox();
        inbox.pending.len() + inbox.ready_len()
    }

    /// From now on, settled records go to the journal thread before the store writer.
    pub(crate) fn start_journaling(&self) {
        self.journaling.store(true, Ordering::Release);
    }

    /// Records settled from now on skip the journal; the journal thread writes what is pending
    /// and stops (the last step of shutdown before the final flush).
    pub(crate) fn stop_journaling(&self) {
        let inbox = self.inbox();
        self.journaling.store(false, Ordering::Release);
        self.journal_stop.store(true, Ordering::Release);
        drop(inbox);
        self.journal_wake.notify_all();
    }

    /// The journal thread's wait: every pending record, once there is any, or `None` after
    /// `timeout` (the thread then looks at what the store flushed) or when stopping with nothing
    /// left.
    pub(crate) fn take_pending(&self, timeout: Duration) -> Option<Vec<(u64, Record)>> {
        let inbox = self.inbox();
        let (mut inbox, _) = self
            .journal_wake
            .wait_timeout_while(inbox, timeout, |i| {
                i.pending.is_empty() && !self.journal_stop.load(Ordering::Acquire)
            })
            .unwrap_or_else(|e| e.into_inner());
        if inbox.pending.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut inbox.pending))
    }

    pub(crate) fn journal_stopping(&self) -> bool {
        self.journal_stop.load(Ordering::Acquire)
    }

    /// Records the journal wrote (or failed to write: they are still kept in memory) move on to
    /// the store writer.
    pub(crate) fn journaled(&self, records: Vec<(u64, Record)>) {
        let Some(last) = records.last().map(|(s, _)| *s) else {
            return;
        };
        let mut inbox = self.inbox();
        for (seq, r) in records {
            inbox.push_ready(seq, r);
        }
        drop(inbox);
        self.durable.send_replace(last);
        self.wake.notify_one();
    }

    /// Records an earlier process left in the journal: queued for the store again, and counted
    /// in memory until written (a record the store already has is then ignored by its id).
    pub(crate) fn replay(&self, records: Vec<(u64, Record)>) {
        let Some(last) = records.last().map(|(s, _)| *s) else {
            return;
        };
        let mut counters = self.counters();
        let mut inbox = self.inbox();
        for (seq, r) in records {
            if let Record::Debit(d) = &r {
                counters.add_unflushed(&d.deltas);
            }
            inbox.push_ready(seq, r);
        }
        inbox.next_seq = inbox.next_seq.max(last + 1);
        drop(inbox);
        drop(counters);
        self.durable.send_replace(last);
        self.wake.notify_one();
    }

    /// The highest sequence number the store has confirmed.
    pub(crate) fn flushed_seq(&self) -> u64 {
        self.flushed_seq.load(Ordering::Acquire)
    }

    /// Takes up to `max` ready records, oldest first, for one batch.
    pub(crate) fn take_batch(&self, max: usize) -> Taken {
        let mut inbox = self.inbox();
        let mut t = Taken::default();
        while t.batch.len() < max {
            let next_debit = inbox.debits.front().map(|(s, _)| *s);
            let next_deny = inbox.denies.front().map(|(s, _)| *s);
            let debit_first = match (next_debit, next_deny) {
                (None, None) => break,
                (Some(d), Some(n)) => d < n,
                (d, _) => d.is_some(),
            };
            match debit_first {
                true => {
                    if let Some((seq, d)) = inbox.debits.pop_front() {
                        t.debit_seqs.push(seq);
                        t.batch.debits.push(d);
                    }
                }
                false => {
                    if let Some((seq, d)) = inbox.denies.pop_front() {
                        t.deny_seqs.push(seq);
                        t.batch.denies.push(d);
                    }
                }
            }
        }
        t
    }

    /// Puts a batch that failed to write back in front of the queue, in order.
    pub(crate) fn requeue(&self, t: Taken) {
        let mut inbox = self.inbox();
        for (seq, d) in t.debit_seqs.into_iter().zip(t.batch.debits).rev() {
            inbox.debits.push_front((seq, d));
        }
        for (seq, d) in t.deny_seqs.into_iter().zip(t.batch.denies).rev() {
            inbox.denies.push_front((seq, d));
        }
    }

    pub(crate) fn mark_flushed(&self, t: &Taken) {
        let mut c = self.counters();
        for d in &t.batch.debits {
            c.mark_flushed(&d.deltas);
        }
        drop(c);
        self.flushed_seq.fetch_max(t.last_seq(), Ordering::AcqRel);
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
        policy.lease_mode = self.leases.get().is_some();
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

    /// The store says the policy changed (a notification): the writer reloads it now.
    pub fn notify_policy_changed(&self) {
        self.policy_changed.notify_one();
    }

    pub(crate) async fn policy_changed(&self) {
        self.policy_changed.notified().await;
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
