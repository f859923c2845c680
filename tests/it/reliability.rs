//! Scale and reliability: several replicas on one store, store outages, crashes, shutdown, stuck
//! streams, and Envoy's behaviour when tokenbudget is down or slow.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokenbudget::clock::{SharedClock, SystemClock};
use tokenbudget::testkit::TestDb;

use crate::faults::{PrivatePostgres, SidecarProc};
use crate::harness::{ADMIN_TOKEN, Envoy, eventually, jwt, read_all, sidecar_toml, start_sidecar};

fn clock() -> SharedClock {
    Arc::new(SystemClock)
}

/// Waits until `ledger` knows a budget named `name`; returns how long that took.
async fn until_known(
    ledger: &tokenbudget::ledger::Ledger,
    name: &str,
    started: Instant,
) -> Duration {
    loop {
        if ledger.policy().budgets.iter().any(|b| b.name == name) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name} never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_reach_every_replica_within_a_second() {
    // Postgres: announced by NOTIFY at commit. The poll is set to a minute, so only the
    // notification can make it this fast.
    let db = TestDb::create().await.unwrap();
    let store = format!("database_url = \"{}\"", db.url);
    let (ja, jb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let slow_poll = "sync_interval_ms = 60000\nrefresh_interval_ms = 60000";
    let a = start_sidecar(&sidecar_toml(&store, ja.path(), slow_poll, ""), &clock()).await;
    let b = start_sidecar(&sidecar_toml(&store, jb.path(), slow_poll, ""), &clock()).await;
    let http = reqwest::Client::new();
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        let name = format!("notified-{i}");
        let started = Instant::now();
        let r = http
            .post(format!("http://{}/api/v1/budgets", a.admin_addr))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"name": name, "subject": "user:ann", "limit_tokens": 1000, "window": "day"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        worst = worst.max(until_known(&b.ledger, &name, started).await);
    }
    println!("postgres NOTIFY: slowest of 5 budget changes reached the other replica in {worst:?}");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();

    // SQLite: two processes on one file see changes by polling (sync_interval_ms, 500 by default).
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite_path = \"{}\"", dir.path().join("tb.db").display());
    let (ja, jb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let poll = "sync_interval_ms = 500";
    let a = start_sidecar(&sidecar_toml(&store, ja.path(), poll, ""), &clock()).await;
    let b = start_sidecar(&sidecar_toml(&store, jb.path(), poll, ""), &clock()).await;
    let started = Instant::now();
    let r = http
        .post(format!("http://{}/api/v1/budgets", a.admin_addr))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "polled", "subject": "user:ann", "limit_tokens": 1000, "window": "day"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let took = until_known(&b.ledger, "polled", started).await;
    println!("sqlite polling: the change reached the other replica in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// 300 concurrent requests through one Envoy balancing over three replicas on one Postgres,
/// against one budget with room for ~30 of them. Returns (admitted, tokens debited, limit).
async fn race_three_replicas(mode: &str) -> (usize, u64, u64) {
    crate::harness::init_tracing();
    let db = TestDb::create().await.unwrap();
    let store_toml = format!("database_url = \"{}\"", db.url);
    // Production refresh interval, so sync mode shows its real bound.
    let ledger = format!("mode = \"{mode}\"\nrefresh_interval_ms = 1000\nsync_interval_ms = 500");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for d in &dirs {
        replicas
            .push(start_sidecar(&sidecar_toml(&store_toml, d.path(), &ledger, ""), &clock()).await);
    }
    let limit = 3000u64;
    let spec: tokenbudget::policy::BudgetSpec = toml::from_str(&format!(
        "name='shared pool'\nsubject='everyone'\nlimit_tokens={limit}\nwindow='total'"
    ))
    .unwrap();
    replicas[0]
        .store
        .create_budget(
            &spec.to_budget("b-pool").unwrap(),
            &tokenbudget::store::Actor {
                name: "test".into(),
                ts_ms: 0,
            },
        )
        .await
        .unwrap();
    for r in &replicas {
        until_known(&r.ledger, "shared pool", Instant::now()).await;
    }
    let (fake_addr, _fake) = crate::fake_model::start().await.unwrap();
    let grpc: Vec<_> = replicas.iter().map(|r| r.grpc_addr).collect();
    let envoy = Envoy::start_multi("envoy/demo.yaml", fake_addr, &grpc).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(400)
        .build()
        .unwrap();
    let url = envoy.url("/v1/chat/completions");
    let mut set = tokio::task::JoinSet::new();
    for i in 0..300 {
        let (c, u) = (client.clone(), url.clone());
        set.spawn(async move {
            let r = c
                .post(u)
                .bearer_auth(jwt(&format!("racer-{i}"), &[]))
                // Each actual usage (5 + 85) is within its estimate (90 output + the prompt).
                .header("x-fake-usage", "5,85")
                .header("x-fake-first-delay-ms", "300")
                .json(&json!({"model": "gpt-4o-mini", "max_tokens": 90, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            read_all(r).await;
            status
        });
    }
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    while let Some(s) = set.join_next().await {
        *by_status.entry(s.unwrap()).or_default() += 1;
    }
    let admitted = by_status.get(&200).copied().unwrap_or(0);
    assert_eq!(
        admitted + by_status.get(&429).copied().unwrap_or(0),
        300,
        "every request is either served or refused with 429: {by_status:?}"
    );
    let store = replicas[0].store.clone();
    eventually(
        "every admitted request debited",
        Duration::from_secs(10),
        || {
            let s = store.clone();
            async move { s.usage_events(None, 1000).await.unwrap().len() >= admitted }
        },
    )
    .await;
    let events = store.usage_events(None, 1000).await.unwrap();
    assert_eq!(events.len(), admitted);
    let debited: u64 = events.iter().map(|e| e.tokens()).sum();
    assert_eq!(
        envoy
            .stat("http.llm.ext_proc.tokenbudget.streams_failed")
            .await,
        0
    );
    for r in &replicas {
        let m = r.ledger.metrics.encode();
        let lines: Vec<&str> = m.lines().filter(|l| l.contains("lease_grant")).collect();
        println!("{}", lines.join("\n"));
    }
    for r in replicas {
        r.shutdown().await.unwrap();
    }
    (admitted, debited, limit)
}

/// Both modes in one test, one after the other, so neither run loads the machine for the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_the_limit_strictly_in_lease_mode_and_within_the_bound_in_sync_mode() {
    let (admitted, debited, limit) = race_three_replicas("lease").await;
    println!(
        "lease mode: 300 concurrent requests over 3 replicas, {admitted} admitted, {debited} of {limit} tokens debited"
    );
    assert!(debited <= limit, "lease mode overshot: {debited} > {limit}");
    // Leases must not strand the budget: nearly all of the room is used.
    assert!(admitted >= 25, "only {admitted} admitted");

    let (admitted, debited, limit) = race_three_replicas("sync").await;
    println!(
        "sync mode: 300 concurrent requests over 3 replicas, {admitted} admitted, {debited} of {limit} tokens debited"
    );
    // Each replica admits at most the whole limit before it sees the others' usage.
    assert!(
        debited <= 3 * limit,
        "sync mode beyond its bound: {debited} > {}",
        3 * limit
    );
    assert!(admitted >= 30);
}
