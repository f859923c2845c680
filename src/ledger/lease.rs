//! Lease mode: each replica holds a slice of every enforced budget's headroom, taken from the
//! store atomically, and admits locally against it — so the global limit holds across replicas.
//!
//! The task here is the only one that talks to the store about leases. It grants: requests that
//! found their lease short wait on it (bounded by `lease_wait_ms`), asks from the same instant are
//! merged per counter, and each ask also takes `lease_share` of what is free, so the next
//! requests do not wait. It keeps leases alive (renewing them every third of their TTL) and gives
//! back the headroom of leases nobody used for half a TTL, so an idle replica does not sit on
//! budget another one needs. A lease the store could not renew lapses here before it lapses in
//! the store, so this replica never spends what the store may have granted to another.
//!
//! **Invariant:** headroom is taken off the local lease before it is given back to the store,
//! and added to it only after the store granted it: the local lease never exceeds the store's.
//! **Boundary:** the request path only sends asks (never awaits the store); waiting is bounded.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::Ledger;
use crate::policy::{CounterKey, LeaseNeed};
use crate::store::{LeaseRequest, Store};

#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// Each grant also takes this share (per mille) of what is free.
    pub share_permille: u32,
    /// A lease lapses this long after its last renewal.
    pub ttl: Duration,
    /// How long a request waits for a lease before it is decided without one.
    pub wait: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            share_permille: 200,
            ttl: Duration::from_secs(10),
            wait: Duration::from_millis(150),
        }
    }
}

/// After the store had nothing left to grant on a counter, asks wait this long before trying
/// again (requests meanwhile are denied at once, as the budget is spent).
const SHORT_BACKOFF_MS: i64 = 250;

/// One ask, on its way to the lease task.
pub struct Asked {
    need: LeaseNeed,
    /// Told whether the store answered (`false`: unreachable).
    done: Option<oneshot::Sender<bool>>,
}

/// The request path's handle on the lease task.
#[derive(Clone)]
pub struct LeaseClient {
    tx: mpsc::UnboundedSender<Asked>,
    cfg: LeaseConfig,
}

pub fn channel(cfg: LeaseConfig) -> (LeaseClient, mpsc::UnboundedReceiver<Asked>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (LeaseClient { tx, cfg }, rx)
}

impl LeaseClient {
    /// Asks for `needs` and waits (at most `lease_wait_ms`) until the store answered all of them.
    /// `false` when it did not (unreachable, or too slow).
    pub(crate) async fn acquire(&self, needs: Vec<LeaseNeed>) -> bool {
        let mut waits = Vec::with_capacity(needs.len());
        for need in needs {
            let (done, rx) = oneshot::channel();
            if self
                .tx
                .send(Asked {
                    need,
                    done: Some(done),
                })
                .is_err()
            {
                return false;
            }
            waits.push(rx);
        }
        let all = async {
            for w in waits {
                if !matches!(w.await, Ok(true)) {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(self.cfg.wait, all)
            .await
            .unwrap_or(false)
    }

    /// Tops leases up in the background (nobody waits).
    pub(crate) fn refill(&self, needs: Vec<LeaseNeed>) {
        for need in needs {
            let _ = self.tx.send(Asked { need, done: None });
        }
    }
}

/// The asks on one lease: what the neediest one needs, what all need together, who waits.
struct Group {
    need: LeaseNeed,
    wish: u64,
    waiters: Vec<oneshot::Sender<bool>>,
}

impl Group {
    fn add(&mut self, a: Asked) {
        self.need.want = self.need.want.max(a.need.want);
        self.wish = self.wish.saturating_add(a.need.want).min(self.need.limit);
        self.waiters.extend(a.done);
    }
}

type LeaseId = (CounterKey, i64);

/// Runs until `shutdown`, then gives back every lease's free headroom.
///
/// One grant is in flight per lease at a time; asks that arrive meanwhile are merged into the
/// next one (the store would serialise them on its lock row anyway, one transaction each).
/// Grants on different leases run side by side.
pub async fn run(
    ledger: Arc<Ledger>,
    store: Store,
    cfg: LeaseConfig,
    mut rx: mpsc::UnboundedReceiver<Asked>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(cfg.ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut queued: HashMap<LeaseId, Group> = HashMap::new();
    let mut inflight: HashSet<LeaseId> = HashSet::new();
    let mut grants: tokio::task::JoinSet<LeaseId> = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            first = rx.recv() => {
                let Some(first) = first else { break };
                let mut add = |a: Asked| {
                    let id = (a.need.key.clone(), a.need.epoch);
                    queued
                        .entry(id)
                        .or_insert_with(|| Group {
                            need: LeaseNeed { want: 0, ..a.need.clone() },
                            wish: 0,
                            waiters: Vec::new(),
                        })
                        .add(a);
                };
                add(first);
                while let Ok(a) = rx.try_recv() {
                    add(a);
                }
            }
            Some(done) = grants.join_next(), if !grants.is_empty() => {
                if let Ok(id) = done {
                    inflight.remove(&id);
                }
            }
            _ = tick.tick() => maintain(&ledger, &store, &cfg).await,
            _ = shutdown.changed() => break,
        }
        let ready: Vec<LeaseId> = queued
            .keys()
            .filter(|id| !inflight.contains(*id))
            .cloned()
            .collect();
        for id in ready {
            if let Some(group) = queued.remove(&id) {
                inflight.insert(id.clone());
                let (l, s) = (Arc::clone(&ledger), store.clone());
                grants.spawn(async move {
                    grant(&l, &s, &cfg, group).await;
                    id
                });
            }
        }
    }
    grants.shutdown().await;
    let now_ms = ledger.clock().now().timestamp_millis();
    give_back(&ledger, &store, i64::MAX, now_ms).await;
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

async fn grant(ledger: &Ledger, store: &Store, cfg: &LeaseConfig, group: Group) {
    let Group {
        need,
        wish,
        waiters,
    } = group;
    let now_ms = ledger.clock().now().timestamp_millis();
    let ttl = ms(cfg.ttl);
    let req = LeaseRequest {
        key: need.key.clone(),
        epoch: need.epoch,
        oldest: need.oldest,
        unit: need.unit,
        limit: need.limit,
        want: need.want,
        wish,
        share_permille: cfg.share_permille,
        now_ms,
        expires_ms: now_ms + ttl,
    };
    let started = std::time::Instant::now();
    let result = store.acquire_lease(&req).await;
    ledger
        .metrics
        .lease_seconds
        .observe(started.elapsed().as_secs_f64());
    let answered = match result {
        Ok(g) => {
            ledger.metrics.lease_grant(g.granted >= need.want);
            ledger.with_counters(|c| {
                c.grant_lease(
                    &need,
                    g.granted,
                    g.others,
                    now_ms,
                    // Lapses here a quarter TTL before it can lapse in the store.
                    now_ms + ttl - ttl / 4,
                    now_ms + SHORT_BACKOFF_MS,
                )
            });
            true
        }
        Err(e) => {
            ledger.metrics.store_errors.inc();
            tracing::warn!(error = %e, "lease grant failed");
            false
        }
    };
    for w in waiters {
        let _ = w.send(answered);
    }
}

async fn maintain(ledger: &Ledger, store: &Store, cfg: &LeaseConfig) {
    let now_ms = ledger.clock().now().timestamp_millis();
    let ttl = ms(cfg.ttl);
    give_back(ledger, store, now_ms - ttl / 2, now_ms).await;
    let (live, lapsed) = ledger.with_counters(|c| c.leases(now_ms));
    if !lapsed.is_empty() {
        tracing::warn!(
            leases = lapsed.len(),
            "leases lapsed (not renewed in time); their budgets need new ones"
        );
    }
    match store.renew_leases(&live, now_ms, now_ms + ttl).await {
        Ok(renewed) => ledger.with_counters(|c| {
            c.extend_leases(&renewed, now_ms + ttl - ttl / 4);
            let gone: Vec<_> = live.into_iter().filter(|l| !renewed.contains(l)).collect();
            c.drop_leases(&gone);
        }),
        Err(e) => {
            ledger.metrics.store_errors.inc();
            tracing::warn!(error = %e, "lease renewal failed; leases lapse unless the store returns");
        }
    }
}

/// Gives back the free headroom of leases idle since `idle_before_ms`.
async fn give_back(ledger: &Ledger, store: &Store, idle_before_ms: i64, now_ms: i64) {
    let idle = ledger.with_counters(|c| c.take_idle_lease_headroom(idle_before_ms, now_ms));
    for (key, epoch, amount) in idle {
        if store.release_lease(&key, epoch, amount).await.is_err() {
            ledger.with_counters(|c| c.restore_lease_headroom(&key, epoch, amount));
        }
    }
}
