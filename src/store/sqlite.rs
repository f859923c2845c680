//! Embedded SQLite backend: one file, one connection, WAL journal. Each call runs on tokio's
//! blocking pool, so no async task ever waits on SQLite's file locks.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Aggregates, Amount, AuditEntry, AuditQuery, Batch, BatchOutcome, BudgetRow, DenyEvent,
    DenyQuery, LeaseGrant, LeaseRequest, PolicyRows, PriceRow, Result, Seen, StoreError, UsageBy,
    UsageEvent, UsagePoint, UsageQuery, UsageTotal, to_i64, to_u64,
};
use crate::policy::{Budget, BudgetId, CounterKey, NanoUsd, Price, Unit};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/sqlite_0001_init.sql")),
    (2, include_str!("migrations/sqlite_0002_policy.sql")),
    (3, include_str!("migrations/sqlite_0003_cache_write_1h.sql")),
    (4, include_str!("migrations/sqlite_0004_audit.sql")),
    (5, include_str!("migrations/sqlite_0005_leases.sql")),
    (6, include_str!("migrations/sqlite_0006_retention.sql")),
];

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// This process's lease holder id.
    holder: Arc<str>,
}

/// See the Postgres backend: used amount of a counter from bucket ?3 on, unexpired leases of
/// epoch ?4 at ?6, and holder ?5's part.
pub(crate) const LEASE_VIEW_TOKENS: &str = "SELECT \
     (SELECT COALESCE(SUM(tokens), 0) FROM tb_window_counters WHERE budget_id = ?1 AND member = ?2 AND bucket_start >= ?3), \
     (SELECT COALESCE(SUM(amount), 0) FROM tb_leases WHERE budget_id = ?1 AND member = ?2 AND epoch = ?4 AND expires_ms > ?6), \
     (SELECT COALESCE(SUM(amount), 0) FROM tb_leases WHERE budget_id = ?1 AND member = ?2 AND epoch = ?4 AND expires_ms > ?6 AND holder = ?5)";
const LEASE_VIEW_NANOS: &str = "SELECT \
     (SELECT COALESCE(SUM(cost_nanos), 0) FROM tb_window_counters WHERE budget_id = ?1 AND member = ?2 AND bucket_start >= ?3), \
     (SELECT COALESCE(SUM(amount), 0) FROM tb_leases WHERE budget_id = ?1 AND member = ?2 AND epoch = ?4 AND expires_ms > ?6), \
     (SELECT COALESCE(SUM(amount), 0) FROM tb_leases WHERE budget_id = ?1 AND member = ?2 AND epoch = ?4 AND expires_ms > ?6 AND holder = ?5)";
const LEASE_KEEP_EXPIRED_MS: i64 = 3_600_000;
pub(crate) const PURGE_USAGE: &str = "DELETE FROM tb_usage_events WHERE rowid IN \
     (SELECT rowid FROM tb_usage_events WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2)";
pub(crate) const PURGE_DENIES: &str = "DELETE FROM tb_deny_events WHERE rowid IN \
     (SELECT rowid FROM tb_deny_events WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2)";
const LEASE_KEEP_HEADS_MS: i64 = 86_400_000;

fn db_err(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, msg) = &e
        && f.code == rusqlite::ErrorCode::ConstraintViolation
    {
        return StoreError::Conflict(msg.clone().unwrap_or_else(|| e.to_string()));
    }
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let conn = Connection::open(&path)
                .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
            conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
            )
            .map_err(db_err)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            holder: Arc::from(uuid::Uuid::now_v7().to_string()),
        })
    }

    #[cfg(test)]
    pub(crate) async fn reopen(&self) -> Result<SqliteStore> {
        let path = {
            let c = self
                .conn
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
            c.path().map(std::path::PathBuf::from)
        };
        match path {
            Some(p) => SqliteStore::open(&p).await,
            None => Err(StoreError::Unavailable("in-memory database".into())),
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub async fn acquire_lease(&self, r: &LeaseRequest) -> Result<LeaseGrant> {
        let r = r.clone();
        let holder = Arc::clone(&self.holder);
        self.with(move |c| {
            // IMMEDIATE: the write lock is taken first, so processes sharing the file grant one
            // at a time.
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let (b, m, h) = (&*r.key.budget.0, &*r.key.member, &*holder);
            tx.execute(
                "INSERT INTO tb_lease_heads (budget_id, member, epoch, touched_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (budget_id, member, epoch) DO UPDATE SET touched_ms = excluded.touched_ms",
                params![b, m, r.epoch, r.now_ms],
            )
            .map_err(db_err)?;
            let sql = match r.unit {
                Unit::Tokens => LEASE_VIEW_TOKENS,
                Unit::Usd => LEASE_VIEW_NANOS,
            };
            let (used, leased, mine): (i64, i64, i64) = tx
                .query_row(sql, params![b, m, r.oldest, r.epoch, h, r.now_ms], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .map_err(db_err)?;
            let (used, leased, mine) = (to_u64(used), to_u64(leased), to_u64(mine));
            let granted = r.grant(used, leased);
            if granted > 0 {
                tx.execute(
                    "INSERT INTO tb_leases (budget_id, member, epoch, holder, amount, expires_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (budget_id, member, epoch, holder) DO UPDATE SET \
                       amount = CASE WHEN tb_leases.expires_ms > ?7 THEN tb_leases.amount ELSE 0 END + excluded.amount, \
                       expires_ms = excluded.expires_ms",
                    params![b, m, r.epoch, h, to_i64(granted), r.expires_ms, r.now_ms],
                )
                .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)?;
            Ok(LeaseGrant {
                granted,
                used,
                others: leased.saturating_sub(mine),
            })
        })
        .await
    }

    pub async fn purge_events(&self, before_ms: i64, limit: i64) -> Result<u64> {
        self.with(move |c| {
            let usage = c
                .execute(PURGE_USAGE, params![before_ms, limit])
                .map_err(db_err)?;
            let denies = c
                .execute(PURGE_DENIES, params![before_ms, limit])
                .map_err(db_err)?;
            Ok((usage + denies) as u64)
        })
        .await
    }

    pub async fn release_lease(&self, key: &CounterKey, epoch: i64, amount: u64) -> Result<()> {
        let (key, holder) = (key.clone(), Arc::clone(&self.holder));
        self.with(move |c| {
            c.execute(
                "UPDATE tb_leases SET amount = MAX(amount - ?5, 0) \
                 WHERE budget_id = ?1 AND member = ?2 AND epoch = ?3 AND holder = ?4",
                params![
                    &*key.budget.0,
                    &*key.member,
                    epoch,
                    &*holder,
                    to_i64(amount)
                ],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    pub async fn renew_leases(
        &self,
        leases: &[(CounterKey, i64)],
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Vec<(CounterKey, i64)>> {
        let (leases, holder) = (leases.to_vec(), Arc::clone(&self.holder));
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let mut renewed = Vec::new();
            {
                let mut up = tx
                    .prepare_cached(
                        "UPDATE tb_leases SET expires_ms = ?5 \
                         WHERE budget_id = ?1 AND member = ?2 AND epoch = ?3 AND holder = ?4 AND expires_ms > ?6",
                    )
                    .map_err(db_err)?;
                for (key, epoch) in leases {
                    let n = up
                        .execute(params![&*key.budget.0, &*key.member, epoch, &*holder, expires_ms, now_ms])
                        .map_err(db_err)?;
                    if n == 1 {
                        renewed.push((key, epoch));
                    }
                }
            }
            tx.execute(
                "DELETE FROM tb_leases WHERE expires_ms < ?1",
                [now_ms - LEASE_KEEP_EXPIRED_MS],
            )
            .map_err(db_err)?;
            tx.execute(
                "DELETE FROM tb_lease_heads WHERE touched_ms < ?1",
                [now_ms - LEASE_KEEP_HEADS_MS],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(renewed)
        })
        .await
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Unavailable("sqlite connection poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }

    pub async fn migrate(&self) -> Result<()> {
        self.with(|c| {
            c.execute_batch(
                "CREATE TABLE IF NOT EXISTS tb_schema (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
            )
            .map_err(db_err)?;
            for (version, sql) in MIGRATIONS {
                let tx = c.transaction().map_err(db_err)?;
                let applied: Option<i64> = tx
                    .query_row("SELECT version FROM tb_schema WHERE version = ?1", [version], |r| r.get(0))
                    .optional()
                    .map_err(db_err)?;
                if applied.is_none() {
                    tx.execute_batch(sql).map_err(db_err)?;
                    tx.execute("INSERT INTO tb_schema (version, applied_at_ms) VALUES (?1, 0)", [version])
                        .map_err(db_err)?;
                }
                tx.commit().map_err(db_err)?;
            }
            Ok(())
        })
        .await
    }

    pub async fn policy_version(&self) -> Result<i64> {
        self.with(|c| {
            c.query_row(
                "SELECT version FROM tb_policy_version WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)
        })
        .await
    }

    pub async fn load_policy(&self) -> Result<PolicyRows> {
        self.with(|c| {
            let tx = c.transaction().map_err(db_err)?;
            let version: i64 = tx
                .query_row("SELECT version FROM tb_policy_version WHERE id = 1", [], |r| r.get(0))
                .map_err(db_err)?;
            let mut budgets = Vec::new();
            {
                let mut st = tx
                    .prepare(
                        "SELECT id, name, subject_kind, subject_name, scope, models, limit_unit, limit_value, \
                         window_unit, window_every, action, is_override, enabled, window_kind FROM tb_budgets ORDER BY name",
                    )
                    .map_err(db_err)?;
                let rows = st
                    .query_map([], |r| {
                        Ok(BudgetRow {
                            id: r.get(0)?,
                            name: r.get(1)?,
                            subject_kind: r.get(2)?,
                            subject_name: r.get(3)?,
                            scope: r.get(4)?,
                            models: r.get(5)?,
                            limit_unit: r.get(6)?,
                            limit_value: r.get(7)?,
                            window_unit: r.get(8)?,
                            window_every: r.get(9)?,
                            action: r.get(10)?,
                            is_override: r.get(11)?,
                            enabled: r.get(12)?,
                            window_kind: r.get(13)?,
                        })
                    })
                    .map_err(db_err)?;
                for row in rows {
                    budgets.push(row.map_err(db_err)?.into_budget()?);
                }
            }
            let mut prices = Vec::new();
            {
                let mut st = tx
                    .prepare(
                        "SELECT model, effective_from_ms, input_nanos, output_nanos, cache_read_nanos, cache_write_nanos, cache_write_1h_nanos \
                         FROM tb_prices ORDER BY model, effective_from_ms",
                    )
                    .map_err(db_err)?;
                let rows = st
                    .query_map([], |r| {
                        Ok(PriceRow {
                            model: r.get(0)?,
                            effective_from_ms: r.get(1)?,
                            price: Price {
                                input: NanoUsd(to_u64(r.get(2)?)),
                                output: NanoUsd(to_u64(r.get(3)?)),
                                cache_read: NanoUsd(to_u64(r.get(4)?)),
                                cache_write: NanoUsd(to_u64(r.get(5)?)),
                                cache_write_1h: NanoUsd(to_u64(r.get(6)?)),
                            },
                        })
                    })
                    .map_err(db_err)?;
                for row in rows {
                    prices.push(row.map_err(db_err)?);
                }
            }
            let mut members = Vec::new();
            {
                let mut st = tx
                    .prepare("SELECT group_name, principal FROM tb_group_members ORDER BY 1, 2")
                    .map_err(db_err)?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db_err)?;
                for row in rows {
                    members.push(row.map_err(db_err)?);
                }
            }
            tx.commit().map_err(db_err)?;
            Ok(PolicyRows { version, budgets, prices, members })
        })
        .await
    }

    pub async fn load_counters(
        &self,
        windows: &[(BudgetId, i64)],
    ) -> Result<Vec<(CounterKey, i64, Amount)>> {
        let windows = windows.to_vec();
        self.with(move |c| {
            let mut st = c.prepare_cached(LOAD_COUNTERS).map_err(db_err)?;
            let mut out = Vec::new();
            for (budget, oldest) in windows {
                let rows = st
                    .query_map(params![&*budget.0, oldest], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    })
                    .map_err(db_err)?;
                for row in rows {
                    let (member, bucket, tokens, nanos) = row.map_err(db_err)?;
                    out.push((
                        CounterKey {
                            budget: budget.clone(),
                            member: member.into(),
                        },
                        bucket,
                        Amount {
                            tokens: to_u64(tokens),
                            nanos: to_u64(nanos),
                        },
                    ));
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome> {
        let batch = batch.clone();
        let holder = Arc::clone(&self.holder);
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let mut outcome = BatchOutcome::default();
            let mut new = Vec::with_capacity(batch.debits.len());
            {
                let mut ins = tx
                    .prepare_cached(
                        "INSERT INTO tb_usage_events (event_id, request_id, ts_ms, principal, model, family, \
                           input_tokens, cache_read_tokens, cache_write_tokens, output_tokens, reasoning_tokens, \
                           cost_nanos, estimated, outcome, unpriced, cache_write_1h_tokens) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) \
                         ON CONFLICT (event_id) DO NOTHING",
                    )
                    .map_err(db_err)?;
                for d in &batch.debits {
                    let e = &d.event;
                    let n = ins
                        .execute(params![
                            e.event_id,
                            e.request_id,
                            e.ts_ms,
                            e.principal,
                            e.model,
                            e.family,
                            to_i64(e.input),
                            to_i64(e.cache_read),
                            to_i64(e.cache_write),
                            to_i64(e.output),
                            to_i64(e.reasoning),
                            to_i64(e.cost.0),
                            e.estimated,
                            e.outcome,
                            e.unpriced,
                            to_i64(e.cache_write_1h),
                        ])
                        .map_err(db_err)?;
                    if n == 1 {
                        new.push(d);
                        outcome.inserted += 1;
                    } else {
                        outcome.duplicates += 1;
                    }
                }
                let agg = Aggregates::of(new.into_iter());
                let mut up = tx
                    .prepare_cached(
                        "INSERT INTO tb_window_counters (budget_id, bucket_start, member, tokens, cost_nanos) \
                         VALUES (?1, ?2, ?3, ?4, ?5) \
                         ON CONFLICT (budget_id, bucket_start, member) DO UPDATE SET \
                           tokens = tokens + excluded.tokens, cost_nanos = cost_nanos + excluded.cost_nanos",
                    )
                    .map_err(db_err)?;
                for ((budget, bucket, member), a) in &agg.counters {
                    up.execute(params![budget, bucket, member, to_i64(a.tokens), to_i64(a.nanos)])
                        .map_err(db_err)?;
                }
                let mut hr = tx
                    .prepare_cached(
                        "INSERT INTO tb_usage_hourly (hour_start, principal, model, requests, tokens, cost_nanos) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                         ON CONFLICT (hour_start, principal, model) DO UPDATE SET \
                           requests = requests + excluded.requests, tokens = tokens + excluded.tokens, \
                           cost_nanos = cost_nanos + excluded.cost_nanos",
                    )
                    .map_err(db_err)?;
                for ((hour, principal, model), (req, tok, nanos)) in &agg.hourly {
                    hr.execute(params![hour, principal, model, to_i64(*req), to_i64(*tok), to_i64(*nanos)])
                        .map_err(db_err)?;
                }
                let mut seen = tx
                    .prepare_cached(
                        "INSERT INTO tb_seen (kind, name, last_ms) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (kind, name) DO UPDATE SET last_ms = MAX(last_ms, excluded.last_ms)",
                    )
                    .map_err(db_err)?;
                for ((kind, name), ts) in &agg.seen {
                    seen.execute(params![kind, name, ts]).map_err(db_err)?;
                }
                // Lease mode: what the leases covered is now used; they shrink by as much.
                let mut lease = tx
                    .prepare_cached(
                        "UPDATE tb_leases SET amount = MAX(amount - ?5, 0) \
                         WHERE budget_id = ?1 AND member = ?2 AND epoch = ?3 AND holder = ?4",
                    )
                    .map_err(db_err)?;
                for ((budget, member, epoch), used) in &agg.leases {
                    lease
                        .execute(params![budget, member, epoch, &*holder, to_i64(*used)])
                        .map_err(db_err)?;
                }
                let mut den = tx
                    .prepare_cached(
                        "INSERT INTO tb_deny_events (event_id, request_id, ts_ms, principal, model, budget_name, reason, unit, used, limit_value) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (event_id) DO NOTHING",
                    )
                    .map_err(db_err)?;
                for d in &batch.denies {
                    den.execute(params![
                        d.event_id,
                        d.request_id,
                        d.ts_ms,
                        d.principal,
                        d.model,
                        d.budget_name,
                        d.reason,
                        d.unit,
                        to_i64(d.used),
                        to_i64(d.limit)
                    ])
                    .map_err(db_err)?;
                }
            }
            tx.commit().map_err(db_err)?;
            Ok(outcome)
        })
        .await
    }

    pub async fn create_budget(&self, b: &Budget, audit: &AuditEntry) -> Result<()> {
        let r = BudgetRow::from_budget(b);
        let audit = audit.clone();
        let now_ms = audit.ts_ms;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            tx.execute(
                "INSERT INTO tb_budgets (id, name, subject_kind, subject_name, scope, models, limit_unit, limit_value, \
                   window_unit, window_every, action, is_override, enabled, created_at_ms, updated_at_ms, window_kind) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?15)",
                params![
                    r.id, r.name, r.subject_kind, r.subject_name, r.scope, r.models, r.limit_unit, r.limit_value,
                    r.window_unit, r.window_every, r.action, r.is_override, r.enabled, now_ms, r.window_kind
                ],
            )
            .map_err(|e| match db_err(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("a budget named {:?} already exists", r.name)),
                other => other,
            })?;
            record_change(&tx, &audit)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    pub async fn delete_budget(&self, id: &BudgetId, audit: &AuditEntry) -> Result<()> {
        let id = id.0.to_string();
        let audit = audit.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let n = tx
                .execute("DELETE FROM tb_budgets WHERE id = ?1", [&id])
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("budget {:?}", audit.target)));
            }
            record_change(&tx, &audit)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    pub async fn set_price(&self, row: &PriceRow, audit: &AuditEntry) -> Result<()> {
        let row = row.clone();
        let audit = audit.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let p = row.price;
            tx.execute(
                "INSERT INTO tb_prices (model, effective_from_ms, input_nanos, output_nanos, cache_read_nanos, cache_write_nanos, cache_write_1h_nanos) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (model, effective_from_ms) DO UPDATE SET input_nanos = excluded.input_nanos, \
                   output_nanos = excluded.output_nanos, cache_read_nanos = excluded.cache_read_nanos, \
                   cache_write_nanos = excluded.cache_write_nanos, cache_write_1h_nanos = excluded.cache_write_1h_nanos",
                params![
                    row.model,
                    row.effective_from_ms,
                    to_i64(p.input.0),
                    to_i64(p.output.0),
                    to_i64(p.cache_read.0),
                    to_i64(p.cache_write.0),
                    to_i64(p.cache_write_1h.0)
                ],
            )
            .map_err(db_err)?;
            record_change(&tx, &audit)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    pub async fn usage_events(
        &self,
        request_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<UsageEvent>> {
        let request_id = request_id.map(str::to_owned);
        self.with(move |c| {
            // Two statements: SQLite cannot use the request index under `?1 IS NULL OR …`.
            let sql = match request_id {
                Some(_) => USAGE_EVENTS_OF_REQUEST,
                None => USAGE_EVENTS,
            };
            let mut st = c.prepare(sql).map_err(db_err)?;
            let rows = st
                .query_map(params![request_id, limit], |r| {
                    Ok(UsageEvent {
                        event_id: r.get(0)?,
                        request_id: r.get(1)?,
                        ts_ms: r.get(2)?,
                        principal: r.get(3)?,
                        model: r.get(4)?,
                        family: r.get(5)?,
                        input: to_u64(r.get(6)?),
                        cache_read: to_u64(r.get(7)?),
                        cache_write: to_u64(r.get(8)?),
                        output: to_u64(r.get(9)?),
                        reasoning: to_u64(r.get(10)?),
                        cost: NanoUsd(to_u64(r.get(11)?)),
                        estimated: r.get(12)?,
                        outcome: r.get(13)?,
                        unpriced: r.get(14)?,
                        cache_write_1h: to_u64(r.get(15)?),
                    })
                })
                .map_err(db_err)?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(db_err)
        })
        .await
    }

    pub async fn deny_events(&self, q: &DenyQuery) -> Result<Vec<DenyEvent>> {
        let q = q.clone();
        self.with(move |c| {
            let mut st = c.prepare(DENY_EVENTS).map_err(db_err)?;
            let rows = st
                .query_map(
                    params![
                        q.since_ms,
                        q.until_ms,
                        q.principal,
                        q.budget,
                        q.limit,
                        q.offset
                    ],
                    |r| {
                        Ok(DenyEvent {
                            event_id: r.get(0)?,
                            request_id: r.get(1)?,
                            ts_ms: r.get(2)?,
                            principal: r.get(3)?,
                            model: r.get(4)?,
                            budget_name: r.get(5)?,
                            reason: r.get(6)?,
                            unit: r.get(7)?,
                            used: to_u64(r.get(8)?),
                            limit: to_u64(r.get(9)?),
                        })
                    },
                )
                .map_err(db_err)?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(db_err)
        })
        .await
    }

    pub async fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        let q = q.clone();
        self.with(move |c| {
            let mut st = c
                .prepare(
                    "SELECT id, ts_ms, actor, action, target, before_json, after_json FROM tb_audit \
                     WHERE (?1 IS NULL OR target = ?1) ORDER BY id DESC LIMIT ?2 OFFSET ?3",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map(params![q.target, q.limit, q.offset], |r| {
                    Ok(AuditEntry {
                        id: r.get(0)?,
                        ts_ms: r.get(1)?,
                        actor: r.get(2)?,
                        action: r.get(3)?,
                        target: r.get(4)?,
                        before: r.get(5)?,
                        after: r.get(6)?,
                    })
                })
                .map_err(db_err)?;
            rows.collect::<std::result::Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    pub async fn seen(&self, what: Seen, search: &str, limit: i64) -> Result<Vec<String>> {
        let search = search.to_owned();
        self.with(move |c| {
            let sql = match what {
                Seen::Principals => {
                    "SELECT name FROM ( \
                       SELECT name FROM tb_seen WHERE kind = 'principal' \
                       UNION SELECT principal FROM tb_group_members \
                       UNION SELECT subject_kind || ':' || subject_name FROM tb_budgets WHERE subject_kind IN ('user', 'service_principal') \
                     ) WHERE instr(lower(name), lower(?1)) > 0 ORDER BY name LIMIT ?2"
                }
                Seen::Models => {
                    "SELECT name FROM ( \
                       SELECT name FROM tb_seen WHERE kind = 'model' UNION SELECT model FROM tb_prices \
                     ) WHERE instr(lower(name), lower(?1)) > 0 ORDER BY name LIMIT ?2"
                }
            };
            let mut st = c.prepare(sql).map_err(db_err)?;
            let rows = st
                .query_map(params![search, limit], |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            rows.collect::<std::result::Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    pub async fn update_budget(&self, b: &Budget, audit: &AuditEntry) -> Result<()> {
        let r = BudgetRow::from_budget(b);
        let audit = audit.clone();
        let now_ms = audit.ts_ms;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let n = tx
                .execute(
                    "UPDATE tb_budgets SET name = ?2, subject_kind = ?3, subject_name = ?4, scope = ?5, models = ?6, \
                       limit_unit = ?7, limit_value = ?8, window_unit = ?9, window_every = ?10, action = ?11, \
                       is_override = ?12, enabled = ?13, updated_at_ms = ?14, window_kind = ?15 WHERE id = ?1",
                    params![
                        r.id, r.name, r.subject_kind, r.subject_name, r.scope, r.models, r.limit_unit, r.limit_value,
                        r.window_unit, r.window_every, r.action, r.is_override, r.enabled, now_ms, r.window_kind
                    ],
                )
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("budget {:?}", r.name)));
            }
            record_change(&tx, &audit)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    pub async fn add_member(
        &self,
        group: &str,
        principal: &str,
        audit: &AuditEntry,
    ) -> Result<bool> {
        let (group, principal) = (group.to_owned(), principal.to_owned());
        let audit = audit.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let n = tx
                .execute(
                    "INSERT INTO tb_group_members (group_name, principal, created_at_ms) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (group_name, principal) DO NOTHING",
                    params![group, principal, audit.ts_ms],
                )
                .map_err(db_err)?;
            if n == 0 {
                return Ok(false);
            }
            record_change(&tx, &audit)?;
            tx.commit().map_err(db_err)?;
            Ok(true)
        })
        .await
    }

    pub async fn remove_member(
        &self,
        group: &str,
        principal: &str,
        audit: &AuditEntry,
    ) -> Result<()> {
        let (group, principal) = (group.to_owned(), principal.to_owned());
        let audit = audit.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let n = tx
                .execute(
                    "DELETE FROM tb_group_members WHERE group_name = ?1 AND principal = ?2",
                    params![group, principal],
                )
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!(
                    "{principal} in group {group:?}"
                )));
            }
            record_change(&tx, &audit)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    pub async fn usage_top(
        &self,
        q: &UsageQuery,
        by: UsageBy,
        limit: i64,
    ) -> Result<Vec<UsageTotal>> {
        let (since, until) = q.hours();
        let (principals, model) = (q.principals_json(), q.model.clone());
        self.with(move |c| {
            // One statement per grouping: no SQL is ever assembled at run time.
            let sql = match by {
                UsageBy::Principal => {
                    "SELECT principal, SUM(requests), SUM(tokens), SUM(cost_nanos) FROM tb_usage_hourly \
                     WHERE hour_start >= ?1 AND hour_start < ?2 \
                       AND (?3 IS NULL OR principal IN (SELECT value FROM json_each(?3))) \
                       AND (?4 IS NULL OR model = ?4) \
                     GROUP BY principal ORDER BY 3 DESC, 1 LIMIT ?5"
                }
                UsageBy::Model => {
                    "SELECT model, SUM(requests), SUM(tokens), SUM(cost_nanos) FROM tb_usage_hourly \
                     WHERE hour_start >= ?1 AND hour_start < ?2 \
                       AND (?3 IS NULL OR principal IN (SELECT value FROM json_each(?3))) \
                       AND (?4 IS NULL OR model = ?4) \
                     GROUP BY model ORDER BY 3 DESC, 1 LIMIT ?5"
                }
            };
            let mut st = c.prepare(sql).map_err(db_err)?;
            let rows = st
                .query_map(params![since, until, principals, model, limit], |r| {
                    let key: String = r.get(0)?;
                    let (principal, model) = match by {
                        UsageBy::Principal => (key, String::new()),
                        UsageBy::Model => (String::new(), key),
                    };
                    Ok(UsageTotal {
                        principal,
                        model,
                        requests: to_u64(r.get(1)?),
                        tokens: to_u64(r.get(2)?),
                        cost: NanoUsd(to_u64(r.get(3)?)),
                    })
                })
                .map_err(db_err)?;
            rows.collect::<std::result::Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    pub async fn usage_timeseries(&self, q: &UsageQuery) -> Result<Vec<UsagePoint>> {
        let (since, until) = q.hours();
        let bucket = q.bucket_secs.max(3_600);
        let shift = q.bucket_shift();
        let (principals, model) = (q.principals_json(), q.model.clone());
        self.with(move |c| {
            let mut st = c.prepare(USAGE_TIMESERIES).map_err(db_err)?;
            let rows = st
                .query_map(
                    params![since, until, principals, model, bucket, shift],
                    |r| {
                        Ok(UsagePoint {
                            start: r.get(0)?,
                            model: r.get(1)?,
                            requests: to_u64(r.get(2)?),
                            tokens: to_u64(r.get(3)?),
                            cost: NanoUsd(to_u64(r.get(4)?)),
                        })
                    },
                )
                .map_err(db_err)?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(db_err)
        })
        .await
    }
}

/// Every policy change: bump the version, and audit it, in the change's transaction.
fn record_change(tx: &rusqlite::Transaction<'_>, a: &AuditEntry) -> Result<()> {
    tx.execute(
        "UPDATE tb_policy_version SET version = version + 1 WHERE id = 1",
        [],
    )
    .map_err(db_err)?;
    tx.execute(
        "INSERT INTO tb_audit (ts_ms, actor, action, target, before_json, after_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![a.ts_ms, a.actor, a.action, a.target, a.before, a.after],
    )
    .map_err(db_err)?;
    Ok(())
}

// The statements the query-plan tests (`store::plans`) explain, named so the tests check the
// very text the store runs.
pub(crate) const LOAD_COUNTERS: &str = "SELECT member, bucket_start, tokens, cost_nanos FROM tb_window_counters \
                     WHERE budget_id = ?1 AND bucket_start >= ?2";
pub(crate) const USAGE_TIMESERIES: &str = "SELECT ((hour_start - ?6) / ?5) * ?5 + ?6 AS b, model, SUM(requests), SUM(tokens), SUM(cost_nanos) \
                     FROM tb_usage_hourly WHERE hour_start >= ?1 AND hour_start < ?2 \
                       AND (?3 IS NULL OR principal IN (SELECT value FROM json_each(?3))) \
                       AND (?4 IS NULL OR model = ?4) \
                     GROUP BY 1, 2 ORDER BY 1, 2";
pub(crate) const DENY_EVENTS: &str = "SELECT event_id, request_id, ts_ms, principal, model, budget_name, reason, unit, used, limit_value \
                     FROM tb_deny_events WHERE ts_ms >= ?1 AND ts_ms < ?2 \
                       AND (?3 IS NULL OR principal = ?3) AND (?4 IS NULL OR budget_name = ?4) \
                     ORDER BY ts_ms DESC, event_id DESC LIMIT ?5 OFFSET ?6";
pub(crate) const USAGE_EVENTS: &str = "SELECT event_id, request_id, ts_ms, principal, model, family, input_tokens, cache_read_tokens, \
                       cache_write_tokens, output_tokens, reasoning_tokens, cost_nanos, estimated, outcome, unpriced, cache_write_1h_tokens \
                     FROM (SELECT * FROM tb_usage_events WHERE ?1 IS NULL \
                           ORDER BY ts_ms DESC, event_id DESC LIMIT ?2) ORDER BY ts_ms, event_id";
pub(crate) const USAGE_EVENTS_OF_REQUEST: &str = "SELECT event_id, request_id, ts_ms, principal, model, family, input_tokens, cache_read_tokens, \
                       cache_write_tokens, output_tokens, reasoning_tokens, cost_nanos, estimated, outcome, unpriced, cache_write_1h_tokens \
                     FROM tb_usage_events WHERE request_id = ?1 ORDER BY ts_ms, event_id LIMIT ?2";
