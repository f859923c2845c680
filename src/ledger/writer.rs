//! The background task between the ledger and the store: batch writes, policy and counter sync,
//! and the final flush at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Ledger;
use crate::store::{Store, StoreError};

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
}

/// Loads policy and counters once; the ledger is ready afterwards.
pub async fn load(ledger: &Ledger, store: &Store) -> Result<(), StoreError> {
    let rows = store.load_policy().await?;
    ledger.install_policy(rows);
    sync_counters(ledger, store).await?;
    ledger.set_store_ok(true);
    ledger.set_ready();
    Ok(())
}

/// Reloads the policy now (after an admin change), instead of at the next sync.
pub async fn reload_policy(ledger: &Ledger, store: &Store) -> Result<(), StoreError> {
    let rows = store.load_policy().await?;
    ledger.install_policy(rows);
    Ok(())
}

async fn sync_counters(ledger: &Ledger, store: &Store) -> Result<(), StoreError> {
    let current = ledger.current_windows();
    let windows: Vec<_> = current.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let rows = store.load_counters(&windows).await?;
    ledger.refresh_counters(&current, rows);
    Ok(())
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

async fn sync(ledger: &Ledger, store: &Store, counters: bool) -> Result<(), StoreError> {
    sync_policy(ledger, store).await?;
    if counters || !ledger.is_ready() {
        sync_counters(ledger, store).await?;
    }
    ledger.set_ready();
    Ok(())
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
pub async fn run(
    ledger: Arc<Ledger>,
    store: Store,
    cfg: WriterConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sync_tick = tokio::time::interval(cfg.sync_interval);
    sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh_tick = tokio::time::interval(cfg.refresh_interval);
    refresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = sync_tick.tick() => report(&ledger, sync(&ledger, &store, false).await),
            _ = refresh_tick.tick() => report(&ledger, sync(&ledger, &store, true).await),
            _ = ledger.policy_changed() => report(&ledger, sync(&ledger, &store, false).await),
            _ = shutdown.changed() => {}
        }
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
    drain(&ledger, &store, cfg).await;
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
