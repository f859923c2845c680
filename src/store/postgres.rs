//! Postgres backend (deadpool-postgres + tokio-postgres). Uses only portable SQL: UNNEST arrays for
//! multi-row statements, `ON CONFLICT`, no extensions, no advisory locks — so managed Postgres,
//! Lakebase and CockroachDB/YugabyteDB work too.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::{
    Aggregates, Amount, AuditEntry, AuditQuery, Batch, BatchOutcome, BudgetRow, DenyEvent,
    DenyQuery, LeaseGrant, LeaseRequest, PolicyRows, PriceRow, Result, Seen, StoreError, UsageBy,
    UsageEvent, UsagePoint, UsageQuery, UsageTotal, to_i64, to_u64,
};
use crate::policy::{BudgetId, CounterKey, NanoUsd, Price, Unit};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/postgres_0001_init.sql")),
    (2, include_str!("migrations/postgres_0002_policy.sql")),
    (
        3,
        include_str!("migrations/postgres_0003_cache_write_1h.sql"),
    ),
    (4, include_str!("migrations/postgres_0004_audit.sql")),
    (5, include_str!("migrations/postgres_0005_leases.sql")),
    (6, include_str!("migrations/postgres_0006_retention.sql")),
];

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    config: Arc<tokio_postgres::Config>,
    /// This process's lease holder id.
    holder: Arc<str>,
    /// The server supports LISTEN/NOTIFY (CockroachDB, for one, does not): policy changes are
    /// then announced to every replica at commit instead of waiting for their next poll.
    notify: Arc<AtomicBool>,
}

/// Used amount (tokens or nano-USD) of one counter from bucket $3 on, every unexpired lease on it
/// for epoch $4, and this holder's ($5) part of those, at $6.
pub(crate) const LEASE_VIEW_TOKENS: &str = "SELECT \
     (SELECT COALESCE(SUM(tokens), 0)::int8 FROM tb_window_counters WHERE budget_id = $1 AND member = $2 AND bucket_start >= $3), \
     (SELECT COALESCE(SUM(amount), 0)::int8 FROM tb_leases WHERE budget_id = $1 AND member = $2 AND epoch = $4 AND expires_ms > $6), \
     (SELECT COALESCE(SUM(amount), 0)::int8 FROM tb_leases WHERE budget_id = $1 AND member = $2 AND epoch = $4 AND expires_ms > $6 AND holder = $5)";
const LEASE_VIEW_NANOS: &str = "SELECT \
     (SELECT COALESCE(SUM(cost_nanos), 0)::int8 FROM tb_window_counters WHERE budget_id = $1 AND member = $2 AND bucket_start >= $3), \
     (SELECT COALESCE(SUM(amount), 0)::int8 FROM tb_leases WHERE budget_id = $1 AND member = $2 AND epoch = $4 AND expires_ms > $6), \
     (SELECT COALESCE(SUM(amount), 0)::int8 FROM tb_leases WHERE budget_id = $1 AND member = $2 AND epoch = $4 AND expires_ms > $6 AND holder = $5)";
/// Retention: the oldest events before $1, at most $2 at a time (by the `ts_ms` indexes).
/// `= ANY(ARRAY(…))` makes the delete look each row up by key instead of joining the table.
pub(crate) const PURGE_USAGE: &str = "DELETE FROM tb_usage_events WHERE event_id = ANY(ARRAY( \
     SELECT event_id FROM tb_usage_events WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2))";
pub(crate) const PURGE_DENIES: &str = "DELETE FROM tb_deny_events WHERE event_id = ANY(ARRAY( \
     SELECT event_id FROM tb_deny_events WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2))";

/// Expired leases are deleted after an hour, lock rows a day after their last grant.
const LEASE_KEEP_EXPIRED_MS: i64 = 3_600_000;
const LEASE_KEEP_HEADS_MS: i64 = 86_400_000;

/// Policy changes are announced on the `tokenbudget_policy` channel.
const NOTIFY_POLICY: &str = "NOTIFY tokenbudget_policy";
const LISTEN_POLICY: &str = "LISTEN tokenbudget_policy";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn db_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION {
            return StoreError::Conflict(db.message().to_string());
        }
        return StoreError::Unavailable(format!("{}: {}", db.code().code(), db.message()));
    }
    StoreError::Unavailable(e.to_string())
}

impl PgStore {
    pub async fn connect(url: &str, pool_size: usize) -> Result<PgStore> {
        let cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid database URL: {e}")))?;
        let mgr = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(pool_size.max(1))
            .wait_timeout(Some(std::time::Duration::from_secs(5)))
            .create_timeout(Some(std::time::Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(unavailable)?;
        let store = PgStore {
            pool,
            config: Arc::new(cfg),
            holder: Arc::from(uuid::Uuid::now_v7().to_string()),
            notify: Arc::new(AtomicBool::new(false)),
        };
        // A down server is not fatal: the replica starts from its snapshot and the writer keeps
        // trying. Whether NOTIFY works is learnt here or when the listener first connects.
        match store.client().await {
            Ok(c) => store.notify.store(
                c.batch_execute(NOTIFY_POLICY).await.is_ok(),
                Ordering::Release,
            ),
            Err(e) => tracing::warn!(error = %e, "Postgres unreachable at start"),
        }
        Ok(store)
    }

    /// Calls `changed` whenever another connection commits a policy change, until the returned
    /// task is aborted; reconnects after failures (and calls `changed`, since a notification may
    /// have been missed meanwhile). Nothing happens on servers without LISTEN/NOTIFY; the
    /// writer's poll covers them.
    pub fn listen(
        &self,
        changed: impl Fn() + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let cfg = Arc::clone(&self.config);
        let notify = Arc::clone(&self.notify);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match cfg.connect(NoTls).await {
                    Ok((client, mut conn)) => {
                        let listened = {
                            let mut listen = std::pin::pin!(client.batch_execute(LISTEN_POLICY));
                            // The connection must be driven for LISTEN itself to complete.
                            loop {
                                tokio::select! {
                                    r = &mut listen => break Some(r),
                                    m = std::future::poll_fn(|cx| conn.poll_message(cx)) => {
                                        if !matches!(m, Some(Ok(_))) {
                                            break None;
                                        }
                                    }
                                }
                            }
                        };
                        if let Some(Err(e)) = &listened
                            && e.as_db_error().is_some()
                        {
                            tracing::info!(error = %e, "no LISTEN/NOTIFY on this server; policy changes arrive by polling");
                            return;
                        }
                        if let Some(Ok(())) = listened {
                            notify.store(true, Ordering::Release);
                            backoff = Duration::from_millis(200);
                            changed();
                            while let Some(Ok(m)) =
                                std::future::poll_fn(|cx| conn.poll_message(cx)).await
                            {
                                if let tokio_postgres::AsyncMessage::Notification(_) = m {
                                    changed();
                                }
                            }
                        }
                        tracing::warn!("policy notification connection lost; reconnecting");
                        drop(client);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open the policy notification connection")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }

    #[cfg(test)]
    pub(crate) async fn reopen(&self) -> Result<PgStore> {
        let c = &self.config;
        let host = match c.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let url = format!(
            "postgres://{}@{host}:{}/{}",
            c.get_user().unwrap_or("postgres"),
            c.get_ports().first().copied().unwrap_or(5432),
            c.get_dbname().unwrap_or("postgres")
        );
        PgStore::connect(&url, 4).await
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub async fn acquire_lease(&self, r: &LeaseRequest) -> Result<LeaseGrant> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let (b, m, h) = (&*r.key.budget.0, &*r.key.member, &*self.holder);
        // The head row is the lock: one grant at a time per counter and window, on any replica.
        tx.execute(
            "INSERT INTO tb_lease_heads (budget_id, member, epoch, touched_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (budget_id, member, epoch) DO UPDATE SET touched_ms = EXCLUDED.touched_ms",
            &[&b, &m, &r.epoch, &r.now_ms],
        )
        .await
        .map_err(db_err)?;
        // One statement, so used amounts and leases come from one snapshot.
        let sql = match r.unit {
            Unit::Tokens => LEASE_VIEW_TOKENS,
            Unit::Usd => LEASE_VIEW_NANOS,
        };
        let row = tx
            .query_one(sql, &[&b, &m, &r.oldest, &r.epoch, &h, &r.now_ms])
            .await
            .map_err(db_err)?;
        let (used, leased, mine) = (to_u64(row.get(0)), to_u64(row.get(1)), to_u64(row.get(2)));
        let granted = r.grant(used, leased);
        if granted > 0 {
            tx.execute(
                "INSERT INTO tb_leases (budget_id, member, epoch, holder, amount, expires_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (budget_id, member, epoch, holder) DO UPDATE SET \
                   amount = CASE WHEN tb_leases.expires_ms > $7 THEN tb_leases.amount ELSE 0 END + EXCLUDED.amount, \
                   expires_ms = EXCLUDED.expires_ms",
                &[&b, &m, &r.epoch, &h, &to_i64(granted), &r.expires_ms, &r.now_ms],
            )
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(LeaseGrant {
            granted,
            used,
            others: leased.saturating_sub(mine),
        })
    }

    pub async fn purge_events(&self, before_ms: i64, limit: i64) -> Result<u64> {
        let c = self.client().await?;
        let usage = c
            .execute(PURGE_USAGE, &[&before_ms, &limit])
            .await
            .map_err(db_err)?;
        let denies = c
            .execute(PURGE_DENIES, &[&before_ms, &limit])
            .await
            .map_err(db_err)?;
        Ok(usage + denies)
    }

    pub async fn release_lease(&self, key: &CounterKey, epoch: i64, amount: u64) -> Result<()> {
        let c = self.client().await?;
        c.execute(
            "UPDATE tb_leases SET amount = GREATEST(amount - $5, 0) \
             WHERE budget_id = $1 AND member = $2 AND epoch = $3 AND holder = $4",
            &[
                &&*key.budget.0,
                &&*key.member,
                &epoch,
                &&*self.holder,
                &to_i64(amount),
            ],
        )
        .await
        .map_err(db_err)?;
        Ok(())
    }

    pub async fn renew_leases(
        &self,
        leases: &[(CounterKey, i64)],
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Vec<(CounterKey, i64)>> {
        let c = self.client().await?;
        let b: Vec<&str> = leases.iter().map(|(k, _)| &*k.budget.0).collect();
        let m: Vec<&str> = leases.iter().map(|(k, _)| &*k.member).collect();
        let e: Vec<i64> = leases.iter().map(|(_, e)| *e).collect();
        let rows = c
            .query(
                "UPDATE tb_leases AS l SET expires_ms = $5 \
                 FROM UNNEST($1::text[], $2::text[], $3::int8[]) AS q(budget_id, member, epoch) \
                 WHERE l.budget_id = q.budget_id AND l.member = q.member AND l.epoch = q.epoch \
                   AND l.holder = $4 AND l.expires_ms > $6 \
                 RETURNING l.budget_id, l.member, l.epoch",
                &[&b, &m, &e, &&*self.holder, &expires_ms, &now_ms],
            )
            .await
            .map_err(db_err)?;
        c.execute(
            "DELETE FROM tb_leases WHERE expires_ms < $1",
            &[&(now_ms - LEASE_KEEP_EXPIRED_MS)],
        )
        .await
        .map_err(db_err)?;
        c.execute(
            "DELETE FROM tb_lease_heads WHERE touched_ms < $1",
            &[&(now_ms - LEASE_KEEP_HEADS_MS)],
        )
        .await
        .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let (b, m): (String, String) = (r.get(0), r.get(1));
                (
                    CounterKey {
                        budget: BudgetId(b.into()),
                        member: m.into(),
                    },
                    r.get(2),
                )
            })
            .collect())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(unavailable)
    }

    pub async fn migrate(&self) -> Result<()> {
        let mut c = self.client().await?;
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS tb_schema (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
        )
        .await
        .map_err(db_err)?;
        for (version, sql) in MIGRATIONS {
            let tx = c.transaction().await.map_err(db_err)?;
            let applied = tx
                .query_opt(
                    "SELECT version FROM tb_schema WHERE version = $1",
                    &[version],
                )
                .await
                .map_err(db_err)?;
            if applied.is_some() {
                continue;
            }
            tx.batch_execute(sql).await.map_err(db_err)?;
            tx.execute(
                "INSERT INTO tb_schema (version, applied_at_ms) VALUES ($1, 0) ON CONFLICT (version) DO NOTHING",
                &[version],
            )
            .await
            .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
        }
        Ok(())
    }

    pub async fn policy_version(&self) -> Result<i64> {
        let c = self.client().await?;
        let row = c
            .query_one("SELECT version FROM tb_policy_version WHERE id = 1", &[])
            .await
            .map_err(db_err)?;
        Ok(row.get(0))
    }

    pub async fn load_policy(&self) -> Result<PolicyRows> {
        let mut c = self.client().await?;
        // One snapshot: the version and the rows it describes.
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db_err)?;
        let version: i64 = tx
            .query_one("SELECT version FROM tb_policy_version WHERE id = 1", &[])
            .await
            .map_err(db_err)?
            .get(0);
        let rows = tx
            .query(
                "SELECT id, name, subject_kind, subject_name, scope, models, limit_unit, limit_value, \
                 window_unit, window_every, action, is_override, enabled, window_kind FROM tb_budgets ORDER BY name",
                &[],
            )
            .await
            .map_err(db_err)?;
        let mut budgets = Vec::with_capacity(rows.len());
        for r in rows {
            budgets.push(
                BudgetRow {
                    id: r.get(0),
                    name: r.get(1),
                    subject_kind: r.get(2),
                    subject_name: r.get(3),
                    scope: r.get(4),
                    models: r.get(5),
                    limit_unit: r.get(6),
                    limit_value: r.get(7),
                    window_unit: r.get(8),
                    window_every: i64::from(r.get::<_, i32>(9)),
                    action: r.get(10),
                    is_override: r.get(11),
                    enabled: r.get(12),
                    window_kind: r.get(13),
                }
                .into_budget()?,
            );
        }
        let prices = tx
            .query(
                "SELECT model, effective_from_ms, input_nanos, output_nanos, cache_read_nanos, cache_write_nanos, cache_write_1h_nanos \
                 FROM tb_prices ORDER BY model, effective_from_ms",
                &[],
            )
            .await
            .map_err(db_err)?
            .into_iter()
            .map(|r| PriceRow {
                model: r.get(0),
                effective_from_ms: r.get(1),
                price: Price {
                    input: NanoUsd(to_u64(r.get(2))),
                    output: NanoUsd(to_u64(r.get(3))),
                    cache_read: NanoUsd(to_u64(r.get(4))),
                    cache_write: NanoUsd(to_u64(r.get(5))),
                    cache_write_1h: NanoUsd(to_u64(r.get(6))),
                },
            })
            .collect();
        let members = tx
            .query(
                "SELECT group_name, principal FROM tb_group_members ORDER BY 1, 2",
                &[],
            )
            .await
            .map_err(db_err)?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        tx.commit().await.map_err(db_err)?;
        Ok(PolicyRows {
            version,
            budgets,
            prices,
            members,
        })
    }

    pub async fn load_counters(
        &self,
        windows: &[(BudgetId, i64)],
    ) -> Result<Vec<(CounterKey, i64, Amount)>> {
        let c = self.client().await?;
        let ids: Vec<&str> = windows.iter().map(|(b, _)| &*b.0).collect();
        let buckets: Vec<i64> = windows.iter().map(|(_, s)| *s).collect();
        let rows = c
            .query(LOAD_COUNTERS, &[&ids, &buckets])
            .await
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let id: String = r.get(0);
                let member: String = r.get(1);
                (
                    CounterKey {
                        budget: BudgetId(id.into()),
                        member: member.into(),
                    },
                    r.get(2),
                    Amount {
                        tokens: to_u64(r.get(3)),
                        nanos: to_u64(r.get(4)),
                    },
                )
            })
            .collect())
    }

    pub async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let mut outcome = BatchOutcome::default();

        if !batch.debits.is_empty() {
            let ev: Vec<&UsageEvent> = batch.debits.iter().map(|d| &d.event).collect();
            let col_s = |f: fn(&UsageEvent) -> &str| ev.iter().map(|e| f(e)).collect::<Vec<&str>>();
            let col_i = |f: fn(&UsageEvent) -> i64| ev.iter().map(|e| f(e)).collect::<Vec<i64>>();
            let ids = col_s(|e| &e.event_id);
            let inserted = tx
                .query(
                    "INSERT INTO tb_usage_events (event_id, request_id, ts_ms, principal, model, family, \
                       input_tokens, cache_read_tokens, cache_write_tokens, output_tokens, reasoning_tokens, \
                       cost_nanos, estimated, outcome, unpriced, cache_write_1h_tokens) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], \
                       $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::bool[], $14::text[], $15::bool[], $16::int8[]) \
                     ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
                    &[
                        &ids,
                        &col_s(|e| &e.request_id),
                        &col_i(|e| e.ts_ms),
                        &col_s(|e| &e.principal),
                        &col_s(|e| &e.model),
                        &col_s(|e| &e.family),
                        &col_i(|e| to_i64(e.input)),
                        &col_i(|e| to_i64(e.cache_read)),
                        &col_i(|e| to_i64(e.cache_write)),
                        &col_i(|e| to_i64(e.output)),
                        &col_i(|e| to_i64(e.reasoning)),
                        &col_i(|e| to_i64(e.cost.0)),
                        &ev.iter().map(|e| e.estimated).collect::<Vec<bool>>(),
                        &col_s(|e| &e.outcome),
                        &ev.iter().map(|e| e.unpriced).collect::<Vec<bool>>(),
                        &col_i(|e| to_i64(e.cache_write_1h)),
                    ],
                )
                .await
                .map_err(db_err)?;
            let new: std::collections::HashSet<String> =
                inserted.into_iter().map(|r| r.get(0)).collect();
            outcome.inserted = new.len();
            outcome.duplicates = batch.debits.len() - new.len();
            let agg = Aggregates::of(
                batch
                    .debits
                    .iter()
                    .filter(|d| new.contains(&d.event.event_id)),
            );

            if !agg.counters.is_empty() {
                let (mut b, mut s, mut m, mut t, mut n) = (vec![], vec![], vec![], vec![], vec![]);
                for ((budget, bucket, member), a) in &agg.counters {
                    b.push(budget.as_str());
                    s.push(*bucket);
                    m.push(member.as_str());
                    t.push(to_i64(a.tokens));
                    n.push(to_i64(a.nanos));
                }
                tx.execute(
                    "INSERT INTO tb_window_counters (budget_id, bucket_start, member, tokens, cost_nanos) \
                     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[]) \
                     ON CONFLICT (budget_id, bucket_start, member) DO UPDATE SET \
                       tokens = tb_window_counters.tokens + EXCLUDED.tokens, \
                       cost_nanos = tb_window_counters.cost_nanos + EXCLUDED.cost_nanos",
                    &[&b, &s, &m, &t, &n],
                )
                .await
                .map_err(db_err)?;
            }
            if !agg.hourly.is_empty() {
                let (mut h, mut p, mut m, mut r, mut t, mut n) =
                    (vec![], vec![], vec![], vec![], vec![], vec![]);
                for ((hour, principal, model), (req, tok, nanos)) in &agg.hourly {
                    h.push(*hour);
                    p.push(principal.as_str());
                    m.push(model.as_str());
                    r.push(to_i64(*req));
                    t.push(to_i64(*tok));
                    n.push(to_i64(*nanos));
                }
                tx.execute(
                    "INSERT INTO tb_usage_hourly (hour_start, principal, model, requests, tokens, cost_nanos) \
                     SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[]) \
                     ON CONFLICT (hour_start, principal, model) DO UPDATE SET \
                       requests = tb_usage_hourly.requests + EXCLUDED.requests, \
                       tokens = tb_usage_hourly.tokens + EXCLUDED.tokens, \
                       cost_nanos = tb_usage_hourly.cost_nanos + EXCLUDED.cost_nanos",
                    &[&h, &p, &m, &r, &t, &n],
                )
                .await
                .map_err(db_err)?;
            }
            if !agg.seen.is_empty() {
                let (mut k, mut n, mut t) = (vec![], vec![], vec![]);
                for ((kind, name), ts) in &agg.seen {
                    k.push(*kind);
                    n.push(name.as_str());
                    t.push(*ts);
                }
                tx.execute(
                    "INSERT INTO tb_seen (kind, name, last_ms) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[]) \
                     ON CONFLICT (kind, name) DO UPDATE SET last_ms = GREATEST(tb_seen.last_ms, EXCLUDED.last_ms)",
                    &[&k, &n, &t],
                )
                .await
                .map_err(db_err)?;
            }
            if !agg.leases.is_empty() {
                // The debits this replica's leases covered are now used: the leases shrink by as
                // much, in the same transaction, so used + leases never double counts them.
                let (mut b, mut m, mut e, mut u) = (vec![], vec![], vec![], vec![]);
                for ((budget, member, epoch), used) in &agg.leases {
                    b.push(budget.as_str());
                    m.push(member.as_str());
                    e.push(*epoch);
                    u.push(to_i64(*used));
                }
                tx.execute(
                    "UPDATE tb_leases AS l SET amount = GREATEST(l.amount - q.used, 0) \
                     FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[]) AS q(budget_id, member, epoch, used) \
                     WHERE l.budget_id = q.budget_id AND l.member = q.member AND l.epoch = q.epoch AND l.holder = $5",
                    &[&b, &m, &e, &u, &&*self.holder],
                )
                .await
                .map_err(db_err)?;
            }
        }

        if !batch.denies.is_empty() {
            let d = &batch.denies;
            let s = |f: fn(&DenyEvent) -> &str| d.iter().map(&f).collect::<Vec<&str>>();
            let i = |f: fn(&DenyEvent) -> i64| d.iter().map(&f).collect::<Vec<i64>>();
            tx.execute(
                "INSERT INTO tb_deny_events (event_id, request_id, ts_ms, principal, model, budget_name, reason, unit, used, limit_value) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[]) \
                 ON CONFLICT (event_id) DO NOTHING",
                &[
                    &s(|e| &e.event_id),
                    &s(|e| &e.request_id),
                    &i(|e| e.ts_ms),
                    &s(|e| &e.principal),
                    &s(|e| &e.model),
                    &s(|e| &e.budget_name),
                    &s(|e| &e.reason),
                    &s(|e| &e.unit),
                    &i(|e| to_i64(e.used)),
                    &i(|e| to_i64(e.limit)),
                ],
            )
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(outcome)
    }

    pub async fn create_budget(&self, b: &crate::policy::Budget, audit: &AuditEntry) -> Result<()> {
        let now_ms = audit.ts_ms;
        let r = BudgetRow::from_budget(b);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        tx.execute(
            "INSERT INTO tb_budgets (id, name, subject_kind, subject_name, scope, models, limit_unit, limit_value, \
               window_unit, window_every, action, is_override, enabled, created_at_ms, updated_at_ms, window_kind) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14, $15)",
            &[
                &r.id, &r.name, &r.subject_kind, &r.subject_name, &r.scope, &r.models, &r.limit_unit,
                &r.limit_value, &r.window_unit, &(r.window_every as i32), &r.action, &r.is_override,
                &r.enabled, &now_ms, &r.window_kind,
            ],
        )
        .await
        .map_err(|e| match db_err(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("a budget named {:?} already exists", r.name)),
            other => other,
        })?;
        record_change(&tx, audit, self.notify.load(Ordering::Acquire)).await?;
        tx.commit().await.map_err(db_err)
    }

    pub async fn delete_budget(&self, id: &BudgetId, audit: &AuditEntry) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let n = tx
            .execute("DELETE FROM tb_budgets WHERE id = $1", &[&&*id.0])
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("budget {:?}", audit.target)));
        }
        record_change(&tx, audit, self.notify.load(Ordering::Acquire)).await?;
        tx.commit().await.map_err(db_err)
    }

    pub async fn set_price(&self, row: &PriceRow, audit: &AuditEntry) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let p = &row.price;
        tx.execute(
            "INSERT INTO tb_prices (model, effective_from_ms, input_nanos, output_nanos, cache_read_nanos, cache_write_nanos, cache_write_1h_nanos) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (model, effective_from_ms) DO UPDATE SET input_nanos = EXCLUDED.input_nanos, \
               output_nanos = EXCLUDED.output_nanos, cache_read_nanos = EXCLUDED.cache_read_nanos, \
               cache_write_nanos = EXCLUDED.cache_write_nanos, cache_write_1h_nanos = EXCLUDED.cache_write_1h_nanos",
            &[
                &row.model,
                &row.effective_from_ms,
                &to_i64(p.input.0),
                &to_i64(p.output.0),
                &to_i64(p.cache_read.0),
                &to_i64(p.cache_write.0),
                &to_i64(p.cache_write_1h.0),
            ],
        )
        .await
        .map_err(db_err)?;
        record_change(&tx, audit, self.notify.load(Ordering::Acquire)).await?;
        tx.commit().await.map_err(db_err)
    }

    pub async fn usage_events(
        &self,
        request_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<UsageEvent>> {
        let c = self.client().await?;
        let rows = c
            .query(USAGE_EVENTS, &[&request_id, &limit])
            .await
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|r| UsageEvent {
                event_id: r.get(0),
                request_id: r.get(1),
                ts_ms: r.get(2),
                principal: r.get(3),
                model: r.get(4),
                family: r.get(5),
                input: to_u64(r.get(6)),
                cache_read: to_u64(r.get(7)),
                cache_write: to_u64(r.get(8)),
                output: to_u64(r.get(9)),
                reasoning: to_u64(r.get(10)),
                cost: NanoUsd(to_u64(r.get(11))),
                estimated: r.get(12),
                outcome: r.get(13),
                unpriced: r.get(14),
                cache_write_1h: to_u64(r.get(15)),
            })
            .collect())
    }

    pub async fn deny_events(&self, q: &DenyQuery) -> Result<Vec<DenyEvent>> {
        let c = self.client().await?;
        let rows = c
            .query(
                DENY_EVENTS,
                &[
                    &q.since_ms,
                    &q.until_ms,
                    &q.principal,
                    &q.budget,
                    &q.limit,
                    &q.offset,
                ],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|r| DenyEvent {
                event_id: r.get(0),
                request_id: r.get(1),
                ts_ms: r.get(2),
                principal: r.get(3),
                model: r.get(4),
                budget_name: r.get(5),
                reason: r.get(6),
                unit: r.get(7),
                used: to_u64(r.get(8)),
                limit: to_u64(r.get(9)),
            })
            .collect())
    }

    pub async fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT id, ts_ms, actor, action, target, before_json, after_json FROM tb_audit \
                 WHERE ($1::text IS NULL OR target = $1) ORDER BY id DESC LIMIT $2 OFFSET $3",
                &[&q.target, &q.limit, &q.offset],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|r| AuditEntry {
                id: r.get(0),
                ts_ms: r.get(1),
                actor: r.get(2),
                action: r.get(3),
                target: r.get(4),
                before: r.get(5),
                after: r.get(6),
            })
            .collect())
    }

    pub async fn seen(&self, what: Seen, search: &str, limit: i64) -> Result<Vec<String>> {
        let sql = match what {
            Seen::Principals => {
                "SELECT DISTINCT name FROM ( \
                   SELECT name FROM tb_seen WHERE kind = 'principal' \
                   UNION SELECT principal FROM tb_group_members \
                   UNION SELECT subject_kind || ':' || subject_name FROM tb_budgets WHERE subject_kind IN ('user', 'service_principal') \
                 ) n WHERE strpos(lower(name), lower($1)) > 0 ORDER BY name LIMIT $2"
            }
            Seen::Models => {
                "SELECT DISTINCT name FROM ( \
                   SELECT name FROM tb_seen WHERE kind = 'model' UNION SELECT model FROM tb_prices \
                 ) n WHERE strpos(lower(name), lower($1)) > 0 ORDER BY name LIMIT $2"
            }
        };
        let c = self.client().await?;
        let rows = c.query(sql, &[&search, &limit]).await.map_err(db_err)?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    pub async fn update_budget(&self, b: &crate::policy::Budget, audit: &AuditEntry) -> Result<()> {
        let now_ms = audit.ts_ms;
        let r = BudgetRow::from_budget(b);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let n = tx
            .execute(
                "UPDATE tb_budgets SET name = $2, subject_kind = $3, subject_name = $4, scope = $5, models = $6, \
                   limit_unit = $7, limit_value = $8, window_unit = $9, window_every = $10, action = $11, \
                   is_override = $12, enabled = $13, updated_at_ms = $14, window_kind = $15 WHERE id = $1",
                &[
                    &r.id, &r.name, &r.subject_kind, &r.subject_name, &r.scope, &r.models, &r.limit_unit,
                    &r.limit_value, &r.window_unit, &(r.window_every as i32), &r.action, &r.is_override,
                    &r.enabled, &now_ms, &r.window_kind,
                ],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("budget {:?}", r.name)));
        }
        record_change(&tx, audit, self.notify.load(Ordering::Acquire)).await?;
        tx.commit().await.map_err(db_err)
    }

    pub async fn add_member(
        &self,
        group: &str,
        principal: &str,
        audit: &AuditEntry,
    ) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let n = tx
            .execute(
                "INSERT INTO tb_group_members (group_name, principal, created_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (group_name, principal) DO NOTHING",
                &[&group, &principal, &audit.ts_ms],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Ok(false);
        }
        record_change(&tx, audit, self.notify.load(Ordering::Acquire)).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    pub async fn remove_member(
        &self,
        group: &str,
        principal: &str,
        audit: &AuditEntry,
    ) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let n = tx
            .execute(
                "DELETE FROM tb_group_members WHERE group_name = $1 AND principal = $2",
                &[&group, &principal],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!(
                "{principal} in group {group:?}"
            )));
        }
        record_change(&tx, audit, self.notify.load(Ordering::Acquire)).await?;
        tx.commit().await.map_err(db_err)
    }

    pub async fn usage_top(
        &self,
        q: &UsageQuery,
        by: UsageBy,
        limit: i64,
    ) -> Result<Vec<UsageTotal>> {
        let (since, until) = q.hours();
        // One statement per grouping: no SQL is ever assembled at run time.
        let sql = match by {
            UsageBy::Principal => {
                "SELECT principal, SUM(requests)::int8, SUM(tokens)::int8, SUM(cost_nanos)::int8 FROM tb_usage_hourly \
                 WHERE hour_start >= $1 AND hour_start < $2 AND ($3::text[] IS NULL OR principal = ANY($3)) \
                   AND ($4::text IS NULL OR model = $4) \
                 GROUP BY principal ORDER BY 3 DESC, 1 LIMIT $5"
            }
            UsageBy::Model => {
                "SELECT model, SUM(requests)::int8, SUM(tokens)::int8, SUM(cost_nanos)::int8 FROM tb_usage_hourly \
                 WHERE hour_start >= $1 AND hour_start < $2 AND ($3::text[] IS NULL OR principal = ANY($3)) \
                   AND ($4::text IS NULL OR model = $4) \
                 GROUP BY model ORDER BY 3 DESC, 1 LIMIT $5"
            }
        };
        let c = self.client().await?;
        let rows = c
            .query(sql, &[&since, &until, &q.principals, &q.model, &limit])
            .await
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let key: String = r.get(0);
                let (principal, model) = match by {
                    UsageBy::Principal => (key, String::new()),
                    UsageBy::Model => (String::new(), key),
                };
                UsageTotal {
                    principal,
                    model,
                    requests: to_u64(r.get(1)),
                    tokens: to_u64(r.get(2)),
                    cost: NanoUsd(to_u64(r.get(3))),
                }
            })
            .collect())
    }

    pub async fn usage_timeseries(&self, q: &UsageQuery) -> Result<Vec<UsagePoint>> {
        let (since, until) = q.hours();
        let bucket = q.bucket_secs.max(3_600);
        let c = self.client().await?;
        let rows = c
            .query(
                USAGE_TIMESERIES,
                &[
                    &since,
                    &until,
                    &q.principals,
                    &q.model,
                    &bucket,
                    &q.bucket_shift(),
                ],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|r| UsagePoint {
                start: r.get(0),
                model: r.get(1),
                requests: to_u64(r.get(2)),
                tokens: to_u64(r.get(3)),
                cost: NanoUsd(to_u64(r.get(4))),
            })
            .collect())
    }
}

/// Every policy change: bump the version replicas poll, and audit it, in the change's transaction.
async fn record_change(
    tx: &deadpool_postgres::Transaction<'_>,
    a: &AuditEntry,
    notify: bool,
) -> Result<()> {
    if notify {
        // Delivered when (and only if) the change commits.
        tx.batch_execute(NOTIFY_POLICY).await.map_err(db_err)?;
    }
    tx.execute(
        "UPDATE tb_policy_version SET version = version + 1 WHERE id = 1",
        &[],
    )
    .await
    .map_err(db_err)?;
    tx.execute(
        "INSERT INTO tb_audit (ts_ms, actor, action, target, before_json, after_json) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&a.ts_ms, &a.actor, &a.action, &a.target, &a.before, &a.after],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

// The statements the query-plan tests (`store::plans`) explain, named so the tests check the
// very text the store runs.
pub(crate) const LOAD_COUNTERS: &str = "SELECT w.budget_id, w.member, w.bucket_start, w.tokens, w.cost_nanos \
                 FROM tb_window_counters w \
                 JOIN UNNEST($1::text[], $2::int8[]) AS q(budget_id, oldest) \
                   ON w.budget_id = q.budget_id AND w.bucket_start >= q.oldest";
pub(crate) const USAGE_TIMESERIES: &str = "SELECT ((hour_start - $6) / $5) * $5 + $6 AS b, model, SUM(requests)::int8, SUM(tokens)::int8, SUM(cost_nanos)::int8 \
                 FROM tb_usage_hourly WHERE hour_start >= $1 AND hour_start < $2 \
                   AND ($3::text[] IS NULL OR principal = ANY($3)) AND ($4::text IS NULL OR model = $4) \
                 GROUP BY 1, 2 ORDER BY 1, 2";
pub(crate) const DENY_EVENTS: &str = "SELECT event_id, request_id, ts_ms, principal, model, budget_name, reason, unit, used, limit_value \
                 FROM tb_deny_events WHERE ts_ms >= $1 AND ts_ms < $2 \
                   AND ($3::text IS NULL OR principal = $3) AND ($4::text IS NULL OR budget_name = $4) \
                 ORDER BY ts_ms DESC, event_id DESC LIMIT $5 OFFSET $6";
pub(crate) const USAGE_EVENTS: &str = "SELECT event_id, request_id, ts_ms, principal, model, family, input_tokens, cache_read_tokens, \
                   cache_write_tokens, output_tokens, reasoning_tokens, cost_nanos, estimated, outcome, unpriced, cache_write_1h_tokens \
                 FROM (SELECT * FROM tb_usage_events WHERE ($1::text IS NULL OR request_id = $1) \
                       ORDER BY ts_ms DESC, event_id DESC LIMIT $2) e ORDER BY ts_ms, event_id";
