//! The store contract: one list of behaviours, run against Postgres and SQLite alike, each test on
//! a fresh database. Postgres must be reachable (see `testkit`): these tests fail, never skip.

use std::sync::Arc;

use super::*;
use crate::policy::{Budget, BudgetId, Limit, ModelSet, Scope, Subject, SubjectKind, Tokens};
use crate::testkit::TestDb;

enum Fixture {
    Pg(#[allow(dead_code)] TestDb),
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
}

async fn postgres() -> (Store, Fixture) {
    let db = TestDb::create().await.expect("test Postgres");
    let store = Store::open(&StoreTarget::Postgres {
        url: db.url.clone(),
        pool_size: 4,
    })
    .await
    .unwrap();
    store.migrate(1).await.unwrap();
    (store, Fixture::Pg(db))
}

async fn sqlite() -> (Store, Fixture) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreTarget::Sqlite {
        path: dir.path().join("tb.db"),
    })
    .await
    .unwrap();
    store.migrate(1).await.unwrap();
    (store, Fixture::Sqlite(dir))
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_postgres {
            $(#[tokio::test] async fn $name() { let (s, _f) = super::postgres().await; super::$name(s).await; })*
        }
        mod on_sqlite {
            $(#[tokio::test] async fn $name() { let (s, _f) = super::sqlite().await; super::$name(s).await; })*
        }
    };
}

contract!(
    migrate_is_idempotent_and_seeds_prices,
    budgets_round_trip_and_names_are_unique,
    a_batch_is_applied_once_per_event,
    rollups_sum_per_hour_principal_and_model,
    deny_events_are_recorded,
    prices_keep_their_history,
    every_change_is_audited_with_before_and_after,
    deny_events_filter_and_page_newest_first,
    principals_and_models_seen_are_searchable,
    usage_filters_by_principal_set_and_weeks_start_monday,
    leases_never_exceed_the_limit_across_replicas,
    concurrent_lease_grants_are_serialised,
    old_events_are_purged_but_rollups_counters_and_names_stay,
);

fn who(ts_ms: i64) -> Actor {
    Actor {
        name: "tester".into(),
        ts_ms,
    }
}

fn budget(name: &str) -> Budget {
    Budget {
        id: BudgetId(Arc::from(format!("id-{name}"))),
        name: name.into(),
        subject: Subject {
            kind: SubjectKind::Group,
            name: "ml".into(),
        },
        scope: Scope::PerMember,
        models: ModelSet::only(["gpt-4o", "gpt-4o-mini"]),
        limit: Limit::Tokens(Tokens(1000)),
        window: Window::Calendar {
            unit: WindowUnit::Month,
            every: 1,
        },
        action: Action::Enforce,
        is_override: false,
        enabled: true,
    }
}

fn debit(
    event_id: &str,
    ts_ms: i64,
    principal: &str,
    tokens: u64,
    deltas: Vec<CounterDelta>,
) -> Debit {
    Debit {
        event: UsageEvent {
            event_id: event_id.into(),
            request_id: format!("req-{event_id}"),
            ts_ms,
            principal: principal.into(),
            model: "gpt-4o".into(),
            family: "openai".into(),
            input: tokens / 2,
            cache_read: 0,
            cache_write: 0,
            cache_write_1h: 0,
            output: tokens - tokens / 2,
            reasoning: 0,
            cost: NanoUsd(tokens * 10),
            estimated: false,
            outcome: "complete".into(),
            unpriced: false,
        },
        deltas,
    }
}

fn key(budget: &str, member: &str) -> CounterKey {
    CounterKey {
        budget: BudgetId(Arc::from(budget)),
        member: Arc::from(member),
    }
}

async fn migrate_is_idempotent_and_seeds_prices(s: Store) {
    s.migrate(1).await.unwrap();
    let prices = s.list_prices().await.unwrap();
    assert!(prices.iter().any(|p| p.model == "gpt-4o-mini"));
    let n = prices.len();
    s.migrate(1).await.unwrap();
    assert_eq!(s.list_prices().await.unwrap().len(), n);
}

async fn budgets_round_trip_and_names_are_unique(s: Store) {
    let v0 = s.policy_version().await.unwrap();
    let mut usd = budget("usd");
    usd.limit = Limit::Usd(NanoUsd(500_000_000_000));
    usd.models = ModelSet::All;
    usd.window = Window::Total;
    usd.subject = Subject {
        kind: SubjectKind::Everyone,
        name: String::new(),
    };
    usd.scope = Scope::Shared;
    s.create_budget(&budget("b"), &who(1)).await.unwrap();
    s.create_budget(&usd, &who(1)).await.unwrap();
    assert_eq!(s.list_budgets().await.unwrap(), vec![budget("b"), usd]);
    assert!(s.policy_version().await.unwrap() > v0);

    let dup = Budget {
        id: BudgetId(Arc::from("other")),
        ..budget("b")
    };
    match s.create_budget(&dup, &who(2)).await {
        Err(StoreError::Conflict(msg)) => assert!(msg.contains("\"b\""), "{msg}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(s.delete_budget("b", &who(3)).await.unwrap(), budget("b"));
    assert_eq!(s.list_budgets().await.unwrap().len(), 1);
    assert!(matches!(
        s.delete_budget("b", &who(4)).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn a_batch_is_applied_once_per_event(s: Store) {
    let amount = |t| Amount {
        tokens: t,
        nanos: t * 10,
    };
    let delta = |member: &str, t| CounterDelta {
        key: key("B", member),
        bucket: 100,
        amount: amount(t),
        lease: None,
    };
    let batch = Batch {
        debits: vec![
            debit(
                "e1",
                1_000,
                "user:a",
                30,
                vec![delta("", 30), delta("user:a", 30)],
            ),
            debit("e2", 2_000, "user:b", 50, vec![delta("", 50)]),
        ],
        denies: vec![],
    };
    assert_eq!(
        s.write_batch(&batch).await.unwrap(),
        BatchOutcome {
            inserted: 2,
            duplicates: 0
        }
    );
    // A replay (journal, retry after a lost commit ack) changes nothing.
    let mut replay = batch.clone();
    replay
        .debits
        .push(debit("e3", 3_000, "user:a", 7, vec![delta("", 7)]));
    assert_eq!(
        s.write_batch(&replay).await.unwrap(),
        BatchOutcome {
            inserted: 1,
            duplicates: 2
        }
    );

    assert_eq!(s.counter(&key("B", ""), 100).await.unwrap(), amount(87));
    assert_eq!(
        s.counter(&key("B", "user:a"), 100).await.unwrap(),
        amount(30)
    );
    assert_eq!(
        s.counter(&key("B", ""), 200).await.unwrap(),
        Amount::default()
    );
    let mut loaded = s
        .load_counters(&[(BudgetId(Arc::from("B")), 100)])
        .await
        .unwrap();
    loaded.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        loaded,
        vec![
            (key("B", ""), 100, amount(87)),
            (key("B", "user:a"), 100, amount(30))
        ]
    );

    let events = s.usage_events(None, 10).await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| e.event_id.as_str())
            .collect::<Vec<_>>(),
        ["e1", "e2", "e3"]
    );
    assert_eq!(events[0], batch.debits[0].event);
    let one = s.usage_events(Some("req-e2"), 10).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].tokens(), 50);
}

async fn rollups_sum_per_hour_principal_and_model(s: Store) {
    let hour = 3_600_000;
    let batch = Batch {
        debits: vec![
            debit("a", 10 * hour + 1, "user:a", 10, vec![]),
            debit("b", 10 * hour + 2, "user:a", 20, vec![]),
            debit("c", 11 * hour, "user:b", 5, vec![]),
        ],
        denies: vec![],
    };
    s.write_batch(&batch).await.unwrap();
    s.write_batch(&batch).await.unwrap();
    let all = UsageQuery {
        since_ms: 0,
        until_ms: 100 * hour,
        bucket_secs: 3_600,
        ..UsageQuery::default()
    };
    let total = |principal: &str, model: &str, requests, tokens, nanos| UsageTotal {
        principal: principal.into(),
        model: model.into(),
        requests,
        tokens,
        cost: NanoUsd(nanos),
    };
    assert_eq!(
        s.usage_top(&all, UsageBy::Principal, 10).await.unwrap(),
        vec![
            total("user:a", "", 2, 30, 300),
            total("user:b", "", 1, 5, 50)
        ]
    );
    assert_eq!(
        s.usage_top(&all, UsageBy::Model, 10).await.unwrap(),
        vec![total("", "gpt-4o", 3, 35, 350)]
    );
    let later = UsageQuery {
        since_ms: 11 * hour,
        ..all.clone()
    };
    assert_eq!(
        s.usage_top(&later, UsageBy::Principal, 10).await.unwrap(),
        vec![total("user:b", "", 1, 5, 50)]
    );
    let only_a = UsageQuery {
        principals: Some(vec!["user:a".into()]),
        ..all.clone()
    };
    assert_eq!(
        s.usage_top(&only_a, UsageBy::Model, 10).await.unwrap(),
        vec![total("", "gpt-4o", 2, 30, 300)]
    );
    let series: Vec<(i64, u64, u64)> = s
        .usage_timeseries(&all)
        .await
        .unwrap()
        .iter()
        .map(|p| (p.start, p.requests, p.tokens))
        .collect();
    assert_eq!(series, vec![(36_000, 2, 30), (39_600, 1, 5)]);
}

async fn deny_events_are_recorded(s: Store) {
    let deny = DenyEvent {
        event_id: "d1".into(),
        request_id: "r1".into(),
        ts_ms: 5,
        principal: "user:a".into(),
        model: "gpt-4o".into(),
        budget_name: "alice daily".into(),
        reason: "exhausted".into(),
        unit: "tokens".into(),
        used: 990,
        limit: 1000,
    };
    let batch = Batch {
        debits: vec![],
        denies: vec![deny.clone()],
    };
    s.write_batch(&batch).await.unwrap();
    s.write_batch(&batch).await.unwrap();
    let all = DenyQuery {
        since_ms: 0,
        until_ms: i64::MAX,
        limit: 10,
        ..DenyQuery::default()
    };
    assert_eq!(s.deny_events(&all).await.unwrap(), vec![deny]);
}

async fn prices_keep_their_history(s: Store) {
    let p = |n| Price {
        input: NanoUsd(n),
        output: NanoUsd(2 * n),
        cache_read: NanoUsd(n / 2),
        cache_write: NanoUsd(n),
        cache_write_1h: NanoUsd(3 * n),
    };
    s.set_price(
        &PriceRow {
            model: "m".into(),
            effective_from_ms: 100,
            price: p(10),
        },
        &who(1),
    )
    .await
    .unwrap();
    s.set_price(
        &PriceRow {
            model: "m".into(),
            effective_from_ms: 200,
            price: p(20),
        },
        &who(1),
    )
    .await
    .unwrap();
    s.set_price(
        &PriceRow {
            model: "m".into(),
            effective_from_ms: 200,
            price: p(30),
        },
        &who(1),
    )
    .await
    .unwrap();
    let m: Vec<PriceRow> = s
        .list_prices()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.model == "m")
        .collect();
    assert_eq!(
        m,
        vec![
            PriceRow {
                model: "m".into(),
                effective_from_ms: 100,
                price: p(10)
            },
            PriceRow {
                model: "m".into(),
                effective_from_ms: 200,
                price: p(30)
            },
        ]
    );
}

async fn every_change_is_audited_with_before_and_after(s: Store) {
    let b = budget("audited");
    s.create_budget(&b, &who(10)).await.unwrap();
    let mut changed = b.clone();
    changed.limit = Limit::Tokens(Tokens(42));
    assert_eq!(s.update_budget(&changed, &who(11)).await.unwrap(), b);
    s.delete_budget("audited", &who(12)).await.unwrap();
    assert!(s.add_member("eng", "user:a", &who(13)).await.unwrap());
    // Adding an existing member changes nothing and is not recorded.
    assert!(!s.add_member("eng", "user:a", &who(14)).await.unwrap());
    s.remove_member("eng", "user:a", &who(15)).await.unwrap();

    let q = AuditQuery {
        target: Some("audited".into()),
        limit: 10,
        offset: 0,
    };
    let log = s.audit_log(&q).await.unwrap();
    let actions: Vec<(&str, i64)> = log.iter().map(|e| (e.action.as_str(), e.ts_ms)).collect();
    assert_eq!(
        actions,
        [
            ("budget.delete", 12),
            ("budget.update", 11),
            ("budget.create", 10)
        ]
    );
    assert!(log.iter().all(|e| e.actor == "tester"));
    let doc = |s: &Option<String>| -> serde_json::Value {
        serde_json::from_str(s.as_deref().unwrap()).unwrap()
    };
    let update = &log[1];
    assert_eq!(doc(&update.before)["limit_tokens"], 1000);
    assert_eq!(doc(&update.after)["limit_tokens"], 42);
    assert_eq!(doc(&update.after)["id"], "id-audited");
    assert_eq!(log[2].before, None);
    assert_eq!(log[0].after, None);

    let groups = s
        .audit_log(&AuditQuery {
            target: Some("eng".into()),
            limit: 10,
            offset: 0,
        })
        .await
        .unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_eq!(doc(&groups[1].after)["principal"], "user:a");
    // Pages: newest first, offset skips.
    let page = s
        .audit_log(&AuditQuery {
            target: None,
            limit: 2,
            offset: 1,
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0].action, "group.add");
    assert!(page[0].id > page[1].id);
}

async fn deny_events_filter_and_page_newest_first(s: Store) {
    let deny = |id: &str, ts_ms, principal: &str, budget: &str| DenyEvent {
        event_id: id.into(),
        request_id: format!("r-{id}"),
        ts_ms,
        principal: principal.into(),
        model: "gpt-4o".into(),
        budget_name: budget.into(),
        reason: "exhausted".into(),
        unit: "tokens".into(),
        used: 1,
        limit: 2,
    };
    let batch = Batch {
        debits: vec![],
        denies: vec![
            deny("d1", 10, "user:a", "x"),
            deny("d2", 20, "user:b", "x"),
            deny("d3", 30, "user:a", "y"),
            deny("d4", 40, "user:a", "x"),
        ],
    };
    s.write_batch(&batch).await.unwrap();
    let ids = |v: Vec<DenyEvent>| v.into_iter().map(|d| d.event_id).collect::<Vec<_>>();
    let q = DenyQuery {
        since_ms: 0,
        until_ms: 100,
        limit: 10,
        ..DenyQuery::default()
    };
    assert_eq!(
        ids(s.deny_events(&q).await.unwrap()),
        ["d4", "d3", "d2", "d1"]
    );
    let a = DenyQuery {
        principal: Some("user:a".into()),
        ..q.clone()
    };
    assert_eq!(ids(s.deny_events(&a).await.unwrap()), ["d4", "d3", "d1"]);
    let ax = DenyQuery {
        budget: Some("x".into()),
        ..a.clone()
    };
    assert_eq!(ids(s.deny_events(&ax).await.unwrap()), ["d4", "d1"]);
    let window = DenyQuery {
        since_ms: 20,
        until_ms: 40,
        ..q.clone()
    };
    assert_eq!(ids(s.deny_events(&window).await.unwrap()), ["d3", "d2"]);
    let page = DenyQuery {
        limit: 2,
        offset: 2,
        ..q
    };
    assert_eq!(ids(s.deny_events(&page).await.unwrap()), ["d2", "d1"]);
}

async fn principals_and_models_seen_are_searchable(s: Store) {
    s.write_batch(&Batch {
        debits: vec![debit("e", 1_000, "user:Alice", 5, vec![])],
        denies: vec![],
    })
    .await
    .unwrap();
    s.add_member("eng", "service_principal:ci-bot", &who(1))
        .await
        .unwrap();
    s.create_budget(&budget("b"), &who(1)).await.unwrap();
    let principals = s.seen(Seen::Principals, "", 100).await.unwrap();
    assert!(
        principals.contains(&"user:Alice".to_string()),
        "{principals:?}"
    );
    assert!(principals.contains(&"service_principal:ci-bot".to_string()));
    assert_eq!(
        s.seen(Seen::Principals, "ALI", 10).await.unwrap(),
        ["user:Alice"]
    );
    let models = s.seen(Seen::Models, "gpt-4o", 100).await.unwrap();
    assert!(models.contains(&"gpt-4o".to_string()), "{models:?}");
    assert!(models.iter().all(|m| m.contains("gpt-4o")));
    assert_eq!(s.seen(Seen::Models, "", 3).await.unwrap().len(), 3);
}

async fn usage_filters_by_principal_set_and_weeks_start_monday(s: Store) {
    // 2026-11-30 is a Monday; 2026-12-02 a Wednesday, 2026-12-07 the next Monday.
    let at = |d: &str| {
        chrono::DateTime::parse_from_rfc3339(d)
            .unwrap()
            .timestamp_millis()
    };
    s.write_batch(&Batch {
        debits: vec![
            debit("a", at("2026-11-30T01:00:00Z"), "user:a", 1, vec![]),
            debit("b", at("2026-12-02T12:00:00Z"), "user:b", 2, vec![]),
            debit("c", at("2026-12-07T00:30:00Z"), "user:c", 4, vec![]),
        ],
        denies: vec![],
    })
    .await
    .unwrap();
    let q = UsageQuery {
        since_ms: at("2026-11-01T00:00:00Z"),
        until_ms: at("2027-01-01T00:00:00Z"),
        principals: Some(vec!["user:a".into(), "user:b".into(), "user:c".into()]),
        model: None,
        bucket_secs: 604_800,
    };
    let series: Vec<(i64, u64)> = s
        .usage_timeseries(&q)
        .await
        .unwrap()
        .iter()
        .map(|p| (p.start * 1000, p.tokens))
        .collect();
    assert_eq!(
        series,
        [
            (at("2026-11-30T00:00:00Z"), 3),
            (at("2026-12-07T00:00:00Z"), 4)
        ]
    );
    let ab = UsageQuery {
        principals: Some(vec!["user:a".into(), "user:b".into()]),
        ..q.clone()
    };
    let top = s.usage_top(&ab, UsageBy::Principal, 10).await.unwrap();
    assert_eq!(top.len(), 2);
    let none = UsageQuery {
        principals: Some(vec![]),
        ..q
    };
    assert!(
        s.usage_top(&none, UsageBy::Model, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

fn lease_ask(want: u64, share_permille: u32, now_ms: i64) -> LeaseRequest {
    LeaseRequest {
        key: key("L", ""),
        epoch: 100,
        oldest: 100,
        unit: Unit::Tokens,
        limit: 1000,
        want,
        wish: want,
        share_permille,
        now_ms,
        expires_ms: now_ms + 10_000,
    }
}

async fn leases_never_exceed_the_limit_across_replicas(a: Store) {
    let b = a.reopen().await.unwrap();
    assert_ne!(a.holder(), b.holder());
    let t = 1_000_000;
    // a takes half of what is free, b half of the rest.
    let g = a.acquire_lease(&lease_ask(100, 500, t)).await.unwrap();
    assert_eq!((g.granted, g.used, g.others), (500, 0, 0));
    let g = b.acquire_lease(&lease_ask(100, 500, t)).await.unwrap();
    assert_eq!((g.granted, g.others), (250, 500));
    // 250 free: an ask for 300 gets nothing (no partial grants that cannot be used).
    assert_eq!(
        b.acquire_lease(&lease_ask(300, 0, t))
            .await
            .unwrap()
            .granted,
        0
    );
    // a's debit of 200 moves from its lease to used, in the same transaction.
    let delta = CounterDelta {
        key: key("L", ""),
        bucket: 100,
        amount: Amount {
            tokens: 200,
            nanos: 0,
        },
        lease: Some(crate::policy::LeaseUse {
            epoch: 100,
            unit: Unit::Tokens,
        }),
    };
    let batch = Batch {
        debits: vec![debit("lease-1", t, "user:a", 200, vec![delta])],
        denies: vec![],
    };
    a.write_batch(&batch).await.unwrap();
    // A replay changes nothing.
    a.write_batch(&batch).await.unwrap();
    let g = b.acquire_lease(&lease_ask(250, 0, t)).await.unwrap();
    assert_eq!((g.granted, g.used, g.others), (250, 200, 300));
    assert_eq!(
        b.acquire_lease(&lease_ask(1, 0, t)).await.unwrap().granted,
        0
    );
    // a gives its 300 back: b can have them.
    a.release_lease(&key("L", ""), 100, 300).await.unwrap();
    assert_eq!(
        b.acquire_lease(&lease_ask(300, 0, t))
            .await
            .unwrap()
            .granted,
        300
    );
    // Renewal extends live leases only; once b's lapse, a may take everything not used.
    let renewed = b
        .renew_leases(&[(key("L", ""), 100)], t + 1, t + 5_000)
        .await
        .unwrap();
    assert_eq!(renewed, vec![(key("L", ""), 100)]);
    let later = t + 6_000;
    assert!(
        b.renew_leases(&[(key("L", ""), 100)], later, later + 10_000)
            .await
            .unwrap()
            .is_empty()
    );
    let g = a.acquire_lease(&lease_ask(800, 0, later)).await.unwrap();
    assert_eq!((g.granted, g.used, g.others), (800, 200, 0));
    // Another window of the same budget has its own leases.
    let mut next = lease_ask(1000, 0, later);
    next.epoch = 200;
    next.oldest = 200;
    assert_eq!(b.acquire_lease(&next).await.unwrap().granted, 1000);
}

async fn concurrent_lease_grants_are_serialised(a: Store) {
    let b = a.reopen().await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..24 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        set.spawn(async move {
            s.acquire_lease(&lease_ask(100, 0, 1_000_000))
                .await
                .unwrap()
                .granted
        });
    }
    let mut total = 0;
    while let Some(g) = set.join_next().await {
        total += g.unwrap();
    }
    assert_eq!(total, 1000, "exactly the limit is granted, never more");
}

async fn old_events_are_purged_but_rollups_counters_and_names_stay(s: Store) {
    let delta = |t| CounterDelta {
        key: key("P", ""),
        bucket: 0,
        amount: Amount {
            tokens: t,
            nanos: 0,
        },
        lease: None,
    };
    let hour = 3_600_000;
    let debits = (0..5)
        .map(|i| {
            debit(
                &format!("old-{i}"),
                i * hour,
                &format!("user:old{i}"),
                10,
                vec![delta(10)],
            )
        })
        .chain((0..3).map(|i| {
            debit(
                &format!("new-{i}"),
                100 * hour + i,
                "user:new",
                10,
                vec![delta(10)],
            )
        }))
        .collect();
    s.write_batch(&Batch {
        debits,
        denies: vec![],
    })
    .await
    .unwrap();
    // Chunks of 2: the caller loops until a chunk comes back short.
    let mut purged = 0;
    loop {
        let n = s.purge_events(50 * hour, 2).await.unwrap();
        purged += n;
        if n < 2 {
            break;
        }
    }
    assert_eq!(purged, 5);
    let left = s.usage_events(None, 100).await.unwrap();
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|e| e.event_id.starts_with("new-")));
    // Counters and rollups keep the purged usage; the names stay searchable.
    assert_eq!(s.counter(&key("P", ""), 0).await.unwrap().tokens, 80);
    let q = UsageQuery {
        since_ms: 0,
        until_ms: 200 * hour,
        bucket_secs: 3600,
        ..UsageQuery::default()
    };
    let total: u64 = s
        .usage_timeseries(&q)
        .await
        .unwrap()
        .iter()
        .map(|p| p.requests)
        .sum();
    assert_eq!(total, 8);
    let names = s.seen(Seen::Principals, "old", 10).await.unwrap();
    assert_eq!(names.len(), 5, "{names:?}");
    // A purged event replayed from an old journal is new again to the store: the journal never
    // outlives the retention period (it is emptied as soon as the store has its records).
}
