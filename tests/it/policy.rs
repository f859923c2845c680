//! Issue "budget policy model and money": every kind of budget enforced through real Envoy, with
//! the real store (each scenario on Postgres and on SQLite), time injected where windows matter.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokenbudget::clock::{ManualClock, SharedClock};
use tokenbudget::policy::{Budget, BudgetSpec};

use crate::harness::{Backend, Stack, eventually, read_all};

fn budget(spec: &str) -> Budget {
    let spec: BudgetSpec = toml::from_str(spec).unwrap();
    spec.to_budget(&uuid::Uuid::now_v7().to_string()).unwrap()
}

/// A streamed chat request for `model` bounded to `max_tokens`, which the fake answers with
/// `usage` ("prompt,completion[,cached]").
fn body(model: &str, max_tokens: u64) -> serde_json::Value {
    json!({"model": model, "stream": true, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]})
}

async fn send(
    stack: &Stack,
    user: &str,
    groups: &[&str],
    model: &str,
    max_tokens: u64,
    usage: &str,
) -> (u16, serde_json::Value) {
    let r = stack
        .chat_as(user, groups, body(model, max_tokens))
        .header("x-fake-usage", usage)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = read_all(r).await;
    let json = if status == 200 {
        json!(null)
    } else {
        serde_json::from_str(&text).unwrap_or(json!(text))
    };
    (status, json)
}

/// Waits until the sidecar has settled `n` requests (so the next admission sees them).
async fn settled(stack: &Stack, n: u64) {
    let ledger = Arc::clone(&stack.sidecar().ledger);
    eventually(&format!("{n} settled"), Duration::from_secs(5), || {
        let done = ledger.metrics.settled_total() >= n;
        async move { done }
    })
    .await;
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::Postgres).await; })*
        }
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::Sqlite).await; })*
        }
    };
}

on_both!(
    shared_group_pool_is_one_pool_for_all_members,
    per_member_group_limit_applies_to_each_member,
    a_model_list_is_one_pool,
    override_exempts_a_power_user_from_the_group_cap,
    usd_budget_prices_cached_input_exactly,
    unpriced_model_is_denied_under_a_usd_budget,
    shadow_budget_passes_and_records_the_would_block,
    calendar_month_resets_at_the_boundary,
    rolling_window_usage_ages_out,
    config_file_budgets_apply_idempotently,
);

async fn shared_group_pool_is_one_pool_for_all_members(b: Backend) {
    let stack = Stack::start(b).await;
    stack
        .create_budget(&budget(
            "name='ml pool'\nsubject='group:ml'\nlimit_tokens=1000\nwindow='day'",
        ))
        .await;
    assert_eq!(
        send(&stack, "alice", &["ml"], "gpt-4o", 300, "300,300")
            .await
            .0,
        200
    );
    settled(&stack, 1).await;
    assert_eq!(
        send(&stack, "bob", &["ml"], "gpt-4o", 300, "300,300")
            .await
            .0,
        200
    );
    settled(&stack, 2).await;
    // 1200 of 1000 used between them: both are now refused, outsiders are not.
    for who in ["alice", "bob"] {
        let (status, body) = send(&stack, who, &["ml"], "gpt-4o", 10, "1,1").await;
        assert_eq!(status, 429, "{who}");
        assert_eq!(body["error"]["tokenbudget"]["budget"], "ml pool");
        assert_eq!(body["error"]["tokenbudget"]["used"], "1200");
    }
    assert_eq!(
        send(&stack, "carol", &["eng"], "gpt-4o", 10, "1,1").await.0,
        200
    );
}

async fn per_member_group_limit_applies_to_each_member(b: Backend) {
    let stack = Stack::start(b).await;
    stack
        .create_budget(&budget("name='ml each'\nsubject='group:ml'\nscope='per_member'\nlimit_tokens=1000\nwindow='day'"))
        .await;
    assert_eq!(
        send(&stack, "alice", &["ml"], "gpt-4o", 300, "400,400")
            .await
            .0,
        200
    );
    settled(&stack, 1).await;
    assert_eq!(
        send(&stack, "alice", &["ml"], "gpt-4o", 300, "1,1").await.0,
        429
    );
    assert_eq!(
        send(&stack, "bob", &["ml"], "gpt-4o", 300, "400,400")
            .await
            .0,
        200
    );
    let store = stack.store.clone();
    let id = stack.store.get_budget("ml each").await.unwrap().unwrap().id;
    eventually("per-member counters stored", Duration::from_secs(5), || {
        let (s, id) = (store.clone(), id.clone());
        async move {
            let rows = s.load_counters(&[(id, 0)]).await.unwrap();
            let mut members: Vec<String> =
                rows.iter().map(|(k, _, _)| k.member.to_string()).collect();
            members.sort();
            members == ["user:alice", "user:bob"]
        }
    })
    .await;
}

async fn a_model_list_is_one_pool(b: Backend) {
    let stack = Stack::start(b).await;
    stack
        .create_budget(&budget(
            "name='openai pool'\nsubject='user:dan'\nmodels=['gpt-4o','gpt-4o-mini']\nlimit_tokens=1000\nwindow='day'",
        ))
        .await;
    // A dated snapshot counts as its model.
    assert_eq!(
        send(&stack, "dan", &[], "gpt-4o-2024-08-06", 300, "400,400")
            .await
            .0,
        200
    );
    settled(&stack, 1).await;
    let (status, body) = send(&stack, "dan", &[], "gpt-4o-mini", 300, "1,1").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["tokenbudget"]["budget"], "openai pool");
    // A model outside the list is not limited by it.
    assert_eq!(
        send(&stack, "dan", &[], "claude-sonnet-4-5", 300, "1,1")
            .await
            .0,
        200
    );
}

async fn override_exempts_a_power_user_from_the_group_cap(b: Backend) {
    let stack = Stack::start(b).await;
    stack
        .create_budget(&budget(
            "name='ml cap'\nsubject='group:ml'\nlimit_tokens=500\nwindow='day'",
        ))
        .await;
    stack
        .create_budget(&budget("name='erin power'\nsubject='user:erin'\noverride=true\nlimit_tokens=100000\nwindow='day'"))
        .await;
    for i in 0..2 {
        let (status, _) = send(&stack, "erin", &["ml"], "gpt-4o", 300, "300,300").await;
        assert_eq!(status, 200, "erin request {i}");
    }
    settled(&stack, 2).await;
    // erin's 1200 tokens went to her override budget, not the group pool.
    assert_eq!(
        send(&stack, "frank", &["ml"], "gpt-4o", 300, "150,150")
            .await
            .0,
        200
    );
    settled(&stack, 3).await;
    let (status, body) = send(&stack, "frank", &["ml"], "gpt-4o", 300, "1,1").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["tokenbudget"]["budget"], "ml cap");
    assert_eq!(body["error"]["tokenbudget"]["used"], "300");
}

async fn usd_budget_prices_cached_input_exactly(b: Backend) {
    let stack = Stack::start(b).await;
    stack
        .create_budget(&budget(
            "name='gina usd'\nsubject='user:gina'\nlimit_usd='0.01'\nwindow='month'",
        ))
        .await;
    // gpt-4o-mini: $0.15 input, $0.075 cached, $0.60 output per 1M tokens.
    // 10000 prompt of which 8000 cached, 1000 out: 2000×150 + 8000×75 + 1000×600 = 1 500 000 nano-USD.
    assert_eq!(
        send(&stack, "gina", &[], "gpt-4o-mini", 1000, "10000,1000,8000")
            .await
            .0,
        200
    );
    let events = stack.events(1).await;
    assert_eq!(
        (events[0].input, events[0].cache_read, events[0].output),
        (2000, 8000, 1000)
    );
    assert_eq!(events[0].cost.0, 1_500_000);
    assert!(!events[0].unpriced);
    let id = stack
        .store
        .get_budget("gina usd")
        .await
        .unwrap()
        .unwrap()
        .id;
    let rows = stack.store.load_counters(&[(id, 0)]).await.unwrap();
    assert_eq!(rows.iter().map(|(_, _, a)| a.nanos).sum::<u64>(), 1_500_000);
    // The headers speak dollars.
    let r = stack
        .chat("gina", body("gpt-4o-mini", 10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-tokenbudget-unit"], "usd");
    assert_eq!(r.headers()["x-tokenbudget-limit"], "0.01");
    read_all(r).await;
}

async fn unpriced_model_is_denied_under_a_usd_budget(b: Backend) {
    let stack = Stack::start(b).await;
    stack
        .create_budget(&budget(
            "name='hal usd'\nsubject='user:hal'\nlimit_usd='5'\nwindow='month'",
        ))
        .await;
    let (status, body) = send(&stack, "hal", &[], "mystery-model-9", 10, "1,1").await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "model_not_priced");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no price")
    );
    assert_eq!(stack.fake.count(), 0, "never reaches the model");
    // A priced model passes.
    assert_eq!(send(&stack, "hal", &[], "gpt-4o", 10, "1,1").await.0, 200);
}

async fn shadow_budget_passes_and_records_the_would_block(b: Backend) {
    let stack = Stack::start(b).await;
    stack
        .create_budget(&budget(
            "name='watch all'\nsubject='everyone'\naction='shadow'\nlimit_tokens=50\nwindow='day'",
        ))
        .await;
    assert_eq!(
        send(&stack, "ivan", &[], "gpt-4o", 100, "10,10").await.0,
        200
    );
    let store = stack.store.clone();
    eventually("shadow deny recorded", Duration::from_secs(5), || {
        let s = store.clone();
        async move {
            s.deny_events(&tokenbudget::store::DenyQuery::recent(10))
                .await
                .unwrap()
                .iter()
                .any(|d| {
                    d.budget_name == "watch all"
                        && d.reason.starts_with("shadow:")
                        && d.principal == "user:ivan"
                })
        }
    })
    .await;
    assert_eq!(
        stack.events(1).await.len(),
        1,
        "the request was served and metered"
    );
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

async fn calendar_month_resets_at_the_boundary(b: Backend) {
    let clock = ManualClock::new(at("2026-01-31T23:59:00Z"));
    let shared: SharedClock = Arc::new(clock.clone());
    let stack = Stack::start_full(b, "", shared).await;
    stack
        .create_budget(&budget(
            "name='jo monthly'\nsubject='user:jo'\nlimit_tokens=1000\nwindow='month'",
        ))
        .await;
    assert_eq!(
        send(&stack, "jo", &[], "gpt-4o", 300, "400,400").await.0,
        200
    );
    settled(&stack, 1).await;
    let r = stack.chat("jo", body("gpt-4o", 300)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers()["retry-after"],
        "60",
        "one minute to the 1st of February"
    );
    read_all(r).await;
    clock.set(at("2026-02-01T00:00:01Z"));
    assert_eq!(send(&stack, "jo", &[], "gpt-4o", 300, "10,10").await.0, 200);
    let events = stack.events(2).await;
    assert_eq!(
        events[1].ts_ms,
        at("2026-02-01T00:00:01Z").timestamp_millis()
    );
}

async fn rolling_window_usage_ages_out(b: Backend) {
    let t0 = at("2026-03-10T10:00:30Z");
    let clock = ManualClock::new(t0);
    let shared: SharedClock = Arc::new(clock.clone());
    let stack = Stack::start_full(b, "", shared).await;
    stack
        .create_budget(&budget("name='kim rolling'\nsubject='user:kim'\nlimit_tokens=1000\nwindow='hour'\nkind='rolling'"))
        .await;
    assert_eq!(
        send(&stack, "kim", &[], "gpt-4o", 300, "400,400").await.0,
        200
    );
    settled(&stack, 1).await;
    clock.set(at("2026-03-10T10:40:00Z"));
    let r = stack.chat("kim", body("gpt-4o", 300)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    // Usage in the 10:00:00 bucket (60 s buckets) counts until 10:00 + 1 h + 60 s = 11:01:00.
    assert_eq!(r.headers()["retry-after"], (21 * 60).to_string());
    read_all(r).await;
    clock.set(at("2026-03-10T11:00:59Z"));
    assert_eq!(
        send(&stack, "kim", &[], "gpt-4o", 300, "1,1").await.0,
        429,
        "not yet aged out"
    );
    clock.set(at("2026-03-10T11:01:00Z"));
    assert_eq!(
        send(&stack, "kim", &[], "gpt-4o", 300, "1,1").await.0,
        200,
        "aged out"
    );
}

async fn config_file_budgets_apply_idempotently(b: Backend) {
    let extra = "[[budgets]]\nname = \"lee daily\"\nsubject = \"user:lee\"\nlimit_tokens = 100\nwindow = \"day\"\n\
                 [[groups]]\nname = \"ml\"\nmembers = [\"lee\"]\n\
                 [[budgets]]\nname = \"ml from config\"\nsubject = \"group:ml\"\nlimit_tokens = 5000\nwindow = \"week\"\n";
    let mut stack = Stack::start_with(b, extra).await;
    let first = stack.store.list_budgets().await.unwrap();
    assert_eq!(first.len(), 2);
    stack.restart_sidecar().await;
    let second = stack.store.list_budgets().await.unwrap();
    assert_eq!(
        second, first,
        "applied again: same budgets, same ids, no duplicates"
    );
    // Membership from the config file puts lee in ml (the JWT lists no groups).
    let (status, body) = send(&stack, "lee", &[], "gpt-4o", 200, "1,1").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["tokenbudget"]["budget"], "lee daily");
    let ev = stack.sidecar().ledger.policy();
    let lee = tokenbudget::policy::Principal::user("lee");
    assert_eq!(ev.groups_of(&lee), vec!["ml".to_string()]);
    assert_eq!(ev.matching(&lee, Some("gpt-4o")).len(), 2);
}
