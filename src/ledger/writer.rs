//! The background task between the ledger and the store: batch writes, policy and counter sync,
//! and the final flush at shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Ledger;
use crate::policy::{Amount, Budget, CounterKey};
use crate::store::snapshot::Snapshot;
use crate::store::{Actor, Store, StoreError};

#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// How long the writer lets debits gather after the first one arrives (and its longest
    /// sleep): bounds the delay from end of stream to debit visible in the store.
    pub flush_interval: Duration,
    pub batch_max: usize,
    /// How often the policy version is checked (changes also arrive at once by LISTEN/NOTIFY
    /// on Postgres; this poll is the fallback).
    pub sync_interval: Duration,
    /// How often used amounts are re-read from the store (what other replicas spent).
    pub refresh_interval: Duration,
    /// How long shutdown keeps retrying a failing store before giving up on the flush.
    pub drain_deadline: Duration,
    /// Usage and deny events older than this are deleted (hourly rollups, counters and the names
    /// seen are kept); `None` keeps them forever.
    pub retention: Option<Duration>,
}

/// How often old events are purged, and how many rows one statement deletes.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
const PURGE_CHUNK: i64 = 10_000;

/// Deletes events past the retention period, a chunk at a time so no statement runs long.
async fn purge(ledger: &Ledger, store: &Store, retention: Duration) -> Result<u64, StoreError> {
    let keep = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let before = ledger.clock().now().timestamp_millis().saturating_sub(keep);
    let mut total = 0;
    loop {
        let n = store.purge_events(before, PURGE_CHUNK).await?;
        total += n;
        if n < PURGE_CHUNK as u64 {
            break;
        }
        tokio::task::yield_now().await;
    }
    if total > 0 {
        tracing::info!(
            deleted = total,
            before_ms = before,
            "old usage and deny events purged"
        );
    }
    Ok(total)
}

/// What a replica does to the store before it first loads from it, and where it keeps its
/// local snapshot.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    pub migrate: bool,
    /// Budgets declared in the config file, applied by name (idempotent).
    pub budgets: Vec<Budget>,
    /// The local copy of the last loaded state (`None`: no snapshot).
    pub snapshot: Option<PathBuf>,
}

/// How often the local snapshot is rewritten.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);

/// Migrates (if configured), applies the config file's budgets, and loads policy and counters;
/// the ledger is ready afterwards.
pub async fn prepare(ledger: &Ledger, store: &Store, startup: &Startup) -> Result<(), StoreError> {
    let now_ms = ledger.clock().now().timestamp_millis();
    if startup.migrate {
        store.migrate(now_ms).await?;
    }
    for b in &startup.budgets {
        let who = Actor {
            name: "config".into(),
            ts_ms: now_ms,
        };
        let outcome = store.upsert_budget(b, &who).await?;
        tracing::info!(budget = %b.name, ?outcome, "config budget applied");
    }
    let rows = load(ledger, store).await?;
    if let Some(path) = &startup.snapshot {
        save_snapshot(ledger, store, path, rows).await;
    }
    Ok(())
}

/// Loads policy and counters once; the ledger is ready afterwards. Returns the counter rows read.
pub async fn load(
    ledger: &Ledger,
    store: &Store,
) -> Result<Vec<(CounterKey, i64, Amount)>, StoreError> {
    let rows = store.load_policy().await?;
    ledger.install_policy(rows);
    let counters = sync_counters(ledger, store).await?;
    ledger.set_store_ok(true);
    ledger.set_ready();
    Ok(counters)
}

/// The store is unreachable at start: take the state the last run saved, if there is one.
/// Debits settled after it was taken come back from the journal.
pub fn restore_snapshot(ledger: &Ledger, startup: &Startup) -> bool {
    let Some(path) = &startup.snapshot else {
        return false;
    };
    match Snapshot::load(path) {
        Ok(Some(snap)) => {
            let budgets = snap.policy.budgets.len();
            ledger.install_policy(snap.policy);
            let current = ledger.current_windows();
            ledger.refresh_counters(&current, snap.counters);
            ledger.set_ready();
            tracing::warn!(
                taken_ms = snap.taken_ms,
                budgets,
                "store unreachable: enforcing from the local snapshot"
            );
            true
        }
        Ok(None) => false,
        Err(e) => {
            tracing::error!(error = %e, "the local snapshot cannot be used");
            false
        }
    }
}

async fn save_snapshot(
    ledger: &Ledger,
    store: &Store,
    path: &std::path::Path,
    counters: Vec<(CounterKey, i64, Amount)>,
) {
    let policy = match store.load_policy().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "snapshot skipped");
            return;
        }
    };
    let snap = Snapshot {
        taken_ms: ledger.clock().now().timestamp_millis(),
        policy,
        counters,
    };
    let path = path.to_owned();
    let saved = tokio::task::spawn_blocking(move || snap.save(&path)).await;
    if !matches!(saved, Ok(Ok(()))) {
        tracing::warn!("cannot write the local snapshot");
    }
}

/// Reloads the policy now (after an admin change), instead of at the next sync.
pub async fn reload_policy(ledger: &Ledger, store: &Store) -> Result<(), StoreError> {
    let rows = store.load_policy().await?;
    ledger.install_policy(rows);
    Ok(())
}

async fn sync_counters(
    ledger: &Ledger,
    store: &Store,
) -> Result<Vec<(CounterKey, i64, Amount)>, StoreError> {
    let current = ledger.current_windows();
    let windows: Vec<_> = current.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let rows = store.load_counters(&windows).await?;
    ledger.refresh_counters(&current, rows.clone());
    Ok(rows)
}

/// Reloads the policy if its version moved (or was never loaded).
async fn sync_policy(ledger: &Ledger, store: &Store) -> Result<(), StoreError> {
    let version = store.policy_version().await?;
    if u64::try_from(version).unwrap_or(0) != ledger.loaded_version() || !ledger.is_ready() {
        let rows = store.load_policy().await?;
        tracing::info!(
            version = rows.version,
            budgets = rows.budgets.len(),
            "policy reloaded"
        );
        ledger.install_policy(rows);
    }
    Ok(())
}

/// The writer's view of the store between its ticks.
struct Sync<'a> {
    ledger: &'a Ledger,
    store: &'a Store,
    startup: &'a Startup,
    prepared: bool,
    snapshot_at: Option<tokio::time::Instant>,
}

impl Sync<'_> {
    /// Checks the policy version; with `counters`, also re-reads used amounts (and now and then
    /// saves the snapshot). Until the replica has prepared the store once, prepares it.
    async fn run(&mut self, counters: bool) -> Result<(), StoreError> {
        if !self.prepared {
            prepare(self.ledger, self.store, self.startup).await?;
            self.prepared = true;
            self.snapshot_at = Some(tokio::time::Instant::now());
            tracing::info!("store reachable: policy and counters loaded");
            return Ok(());
        }
        sync_policy(self.ledger, self.store).await?;
        if counters {
            let rows = sync_counters(self.ledger, self.store).await?;
            if let Some(path) = &self.startup.snapshot
                && self
                    .snapshot_at
                    .is_none_or(|t| t.elapsed() >= SNAPSHOT_EVERY)
            {
                save_snapshot(self.ledger, self.store, path, rows).await;
                self.snapshot_at = Some(tokio::time::Instant::now());
            }
        }
        Ok(())
    }
}

/// Writes one batch if any is waiting. Returns how many records were written.
async fn flush_once(ledger: &Ledger, store: &Store, max: usize) -> Result<usize, StoreError> {
    let taken = ledger.take_batch(max);
    if taken.batch.is_empty() {
        return Ok(0);
    }
    match store.write_batch(&taken.batch).await {
        Ok(outcome) => {
            ledger.mark_flushed(&taken);
            let m = &ledger.metrics;
            let n = taken.batch.len();
            m.events_written.inc_by(outcome.inserted as u64);
            m.duplicates.inc_by(outcome.duplicates as u64);
            m.batches.inc();
            m.batch_size.observe(n as f64);
            Ok(n)
        }
        Err(e) => {
            ledger.requeue(taken);
            Err(e)
        }
    }
}

/// Runs until `shutdown` turns true, then flushes what is left (bounded by `drain_deadline`).
/// `prepared`: whether [`prepare`] already succeeded (else the writer retries it each tick).
pub async fn run(
    ledger: Arc<Ledger>,
    store: Store,
    cfg: WriterConfig,
    startup: Startup,
    prepared: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sync = Sync {
        ledger: &ledger,
        store: &store,
        startup: &startup,
        prepared,
        snapshot_at: prepared.then(tokio::time::Instant::now),
    };
    let mut sync_tick = tokio::time::interval(cfg.sync_interval);
    sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh_tick = tokio::time::interval(cfg.refresh_interval);
    refresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut purge_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(60),
        PURGE_EVERY,
    );
    purge_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(50);
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            _ = ledger.wait_for_work() => {
                // Let a batch gather: one transaction for many requests, not one per request.
                if ledger.queue_depth() < cfg.batch_max {
                    tokio::select! {
                        _ = tokio::time::sleep(cfg.flush_interval) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
            _ = tokio::time::sleep(cfg.flush_interval) => {}
            _ = sync_tick.tick() => report(&ledger, sync.run(false).await),
            _ = refresh_tick.tick() => report(&ledger, sync.run(true).await),
            _ = ledger.policy_changed() => report(&ledger, sync.run(false).await),
            _ = purge_tick.tick(), if cfg.retention.is_some() && sync.prepared => {
                if let Some(r) = cfg.retention {
                    report(&ledger, purge(&ledger, &store, r).await.map(|_| ()));
                }
            }
            _ = shutdown.changed() => {}
        }
        // Until the store was prepared (migrated) once, writes would only fail: they wait.
        if sync.prepared {
            loop {
                match flush_once(&ledger, &store, cfg.batch_max).await {
                    Ok(0) => break,
                    Ok(_) => {
                        backoff = Duration::from_millis(50);
                        ledger.set_store_ok(true);
                    }
                    Err(e) => {
                        ledger.set_store_ok(false);
                        ledger.metrics.store_errors.inc();
                        tracing::warn!(error = %e, queued = ledger.queue_depth(), "batch write failed; will retry");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.changed() => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        break;
                    }
                }
            }
        }
    }
    drain(&ledger, &store, cfg).await;
    // The state this replica leaves behind, for a start while the store is unreachable.
    if sync.prepared
        && let Some(path) = &startup.snapshot
        && let Ok(rows) = sync_counters(&ledger, &store).await
    {
        save_snapshot(&ledger, &store, path, rows).await;
    }
}

fn report(ledger: &Ledger, r: Result<(), StoreError>) {
    match r {
        Ok(()) => ledger.set_store_ok(true),
        Err(e) => {
            ledger.set_store_ok(false);
            ledger.metrics.store_errors.inc();
            tracing::warn!(error = %e, "store sync failed; admitting from memory");
        }
    }
}

async fn drain(ledger: &Ledger, store: &Store, cfg: WriterConfig) {
    let deadline = tokio::time::Instant::now() + cfg.drain_deadline;
    loop {
        match flush_once(ledger, store, cfg.batch_max).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                if tokio::time::Instant::now() >= deadline {
                    tracing::error!(error = %e, lost = ledger.queue_depth(), "store unavailable at shutdown; unwritten debits remain");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
