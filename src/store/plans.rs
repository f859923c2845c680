//! The hot queries' plans at scale: with hundreds of thousands of rows in every large table (and
//! statistics gathered), no statement the writer, the refresh or the dashboard runs reads a large
//! table from end to end. The plans are printed (`cargo test plans -- --nocapture`); BENCHMARKS.md
//! keeps a copy and the sizing notes for 100 M events.

use super::{postgres, sqlite};
use crate::testkit::TestDb;

const BIG: [&str; 4] = [
    "tb_usage_events",
    "tb_usage_hourly",
    "tb_window_counters",
    "tb_deny_events",
];

const PG_FILL: &str = "
INSERT INTO tb_usage_events (event_id, request_id, ts_ms, principal, model, family, input_tokens,
    cache_read_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_nanos, estimated,
    outcome, unpriced, cache_write_1h_tokens)
  SELECT 'e' || g, 'r' || g, 1700000000000 + g * 1000, 'user:u' || (g % 1000), 'm' || (g % 5),
    'openai', 1, 0, 0, 1, 0, 1, false, 'complete', false, 0 FROM generate_series(1, 300000) g;
INSERT INTO tb_usage_hourly (hour_start, principal, model, requests, tokens, cost_nanos)
  SELECT 1700000000 + (g / 500) * 3600, 'user:u' || (g % 100), 'm' || (g % 5), 1, 1, 1
  FROM generate_series(1, 300000) g ON CONFLICT DO NOTHING;
INSERT INTO tb_window_counters (budget_id, member, bucket_start, tokens, cost_nanos)
  SELECT 'b' || (g % 1000), 'user:u' || (g % 50), 1700000000 + (g / 50000) * 86400, 1, 1
  FROM generate_series(1, 300000) g ON CONFLICT DO NOTHING;
INSERT INTO tb_deny_events (event_id, request_id, ts_ms, principal, model, budget_name, reason, unit, used, limit_value)
  SELECT 'd' || g, 'r' || g, 1700000000000 + g * 1000, 'user:u' || (g % 1000), 'm', 'b' || (g % 100),
    'exhausted', 'tokens', 1, 1 FROM generate_series(1, 200000) g;
ANALYZE;
";

/// `reads_all(plan, table)`: the plan reads the whole table.
fn assert_indexed(label: &str, plan: &str, reads_all: fn(&str, &str) -> bool) {
    println!("--- {label}\n{plan}");
    for t in BIG {
        assert!(!reads_all(plan, t), "{label}: reads all of {t}:\n{plan}");
    }
}

fn pg_seq_scan(plan: &str, table: &str) -> bool {
    plan.lines().any(|l| {
        l.split_whitespace()
            .collect::<Vec<_>>()
            .windows(4)
            .any(|w| w[0] == "Seq" && w[1] == "Scan" && w[2] == "on" && w[3] == table)
    })
}

/// SQLite says SCAN for a full read, unless it walks an index ("USING ... INDEX").
fn sqlite_scan(plan: &str, table: &str) -> bool {
    plan.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.windows(2).any(|w| w[0] == "SCAN" && w[1] == table) && !l.contains("INDEX")
    })
}

type Param = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

#[tokio::test]
async fn postgres_hot_queries_use_indexes_at_scale() {
    let db = TestDb::create().await.unwrap();
    let store = super::Store::open(&super::StoreTarget::Postgres {
        url: db.url.clone(),
        pool_size: 2,
    })
    .await
    .unwrap();
    store.migrate(0).await.unwrap();
    let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(PG_FILL).await.unwrap();
    let explain = |sql: &'static str, params: Vec<Param>| {
        let c = &c;
        async move {
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let rows = c.query(&format!("EXPLAIN {sql}"), &refs).await.unwrap();
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let none_text: Option<String> = None;
    let none_list: Option<Vec<String>> = None;
    let checks: Vec<(&str, &'static str, Vec<Param>)> = vec![
        (
            "refresh: counters of 3 budgets from their current window",
            postgres::LOAD_COUNTERS,
            vec![
                Box::new(vec!["b1".to_string(), "b2".into(), "b3".into()]),
                Box::new(vec![1_700_500_000i64; 3]),
            ],
        ),
        (
            "lease grant: one counter's used amount and its leases",
            postgres::LEASE_VIEW_TOKENS,
            vec![
                Box::new("b7".to_string()),
                Box::new("user:u7".to_string()),
                Box::new(1_700_000_000i64),
                Box::new(0i64),
                Box::new("h".to_string()),
                Box::new(0i64),
            ],
        ),
        (
            "dashboard: a day of usage per hour and model",
            postgres::USAGE_TIMESERIES,
            vec![
                Box::new(1_700_200_000i64),
                Box::new(1_700_286_400i64),
                Box::new(none_list.clone()),
                Box::new(none_text.clone()),
                Box::new(3600i64),
                Box::new(0i64),
            ],
        ),
        (
            "denies: the newest page of an hour",
            postgres::DENY_EVENTS,
            vec![
                Box::new(1_700_100_000_000i64),
                Box::new(1_700_103_600_000i64),
                Box::new(none_text.clone()),
                Box::new(none_text.clone()),
                Box::new(100i64),
                Box::new(0i64),
            ],
        ),
        (
            "usage events of one request",
            postgres::USAGE_EVENTS,
            vec![Box::new(Some("r777".to_string())), Box::new(10i64)],
        ),
        (
            "usage events: the newest",
            postgres::USAGE_EVENTS,
            vec![Box::new(none_text.clone()), Box::new(100i64)],
        ),
        (
            "retention: the oldest chunk",
            postgres::PURGE_USAGE,
            vec![Box::new(1_700_010_000_000i64), Box::new(10_000i64)],
        ),
    ];
    for (label, sql, params) in checks {
        let plan = explain(sql, params).await;
        assert_indexed(label, &plan, pg_seq_scan);
    }
}

#[tokio::test]
async fn sqlite_hot_queries_use_indexes_at_scale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plans.db");
    let store = super::Store::open(&super::StoreTarget::Sqlite { path: path.clone() })
        .await
        .unwrap();
    store.migrate(0).await.unwrap();
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < 200000)
         INSERT INTO tb_usage_events (event_id, request_id, ts_ms, principal, model, family, input_tokens,
           cache_read_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_nanos, estimated,
           outcome, unpriced, cache_write_1h_tokens)
         SELECT 'e' || x, 'r' || x, 1700000000000 + x * 1000, 'user:u' || (x % 1000), 'm' || (x % 5),
           'openai', 1, 0, 0, 1, 0, 1, 0, 'complete', 0, 0 FROM g;
         WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < 200000)
         INSERT OR IGNORE INTO tb_usage_hourly (hour_start, principal, model, requests, tokens, cost_nanos)
         SELECT 1700000000 + (x / 500) * 3600, 'user:u' || (x % 100), 'm' || (x % 5), 1, 1, 1 FROM g;
         WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < 200000)
         INSERT OR IGNORE INTO tb_window_counters (budget_id, member, bucket_start, tokens, cost_nanos)
         SELECT 'b' || (x % 1000), 'user:u' || (x % 50), 1700000000 + (x / 50000) * 86400, 1, 1 FROM g;
         WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < 100000)
         INSERT INTO tb_deny_events (event_id, request_id, ts_ms, principal, model, budget_name, reason, unit, used, limit_value)
         SELECT 'd' || x, 'r' || x, 1700000000000 + x * 1000, 'user:u' || (x % 1000), 'm', 'b' || (x % 100),
           'exhausted', 'tokens', 1, 1 FROM g;
         ANALYZE;",
    )
    .unwrap();
    let explain = |sql: &str, params: &[&dyn rusqlite::ToSql]| -> String {
        let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = st.query_map(params, |r| r.get::<_, String>(3)).unwrap();
        rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("\n")
    };
    let none: Option<String> = None;
    let checks: Vec<(&str, String)> = vec![
        (
            "refresh: one budget's counters from its current window",
            explain(sqlite::LOAD_COUNTERS, &[&"b1", &1_700_500_000i64]),
        ),
        (
            "lease grant: one counter's used amount and its leases",
            explain(
                sqlite::LEASE_VIEW_TOKENS,
                &[&"b7", &"user:u7", &1_700_000_000i64, &0i64, &"h", &0i64],
            ),
        ),
        (
            "dashboard: a day of usage per hour and model",
            explain(
                sqlite::USAGE_TIMESERIES,
                &[
                    &1_700_200_000i64,
                    &1_700_286_400i64,
                    &none,
                    &none,
                    &3600i64,
                    &0i64,
                ],
            ),
        ),
        (
            "denies: the newest page of an hour",
            explain(
                sqlite::DENY_EVENTS,
                &[
                    &1_700_100_000_000i64,
                    &1_700_103_600_000i64,
                    &none,
                    &none,
                    &100i64,
                    &0i64,
                ],
            ),
        ),
        (
            "usage events of one request",
            explain(sqlite::USAGE_EVENTS_OF_REQUEST, &[&"r777", &10i64]),
        ),
        (
            "usage events: the newest",
            explain(sqlite::USAGE_EVENTS, &[&none, &100i64]),
        ),
        (
            "retention: the oldest chunk",
            explain(sqlite::PURGE_USAGE, &[&1_700_010_000_000i64, &10_000i64]),
        ),
    ];
    for (label, plan) in checks {
        assert_indexed(label, &plan, sqlite_scan);
    }
}
