//! Issue "core sidecar end to end": budgets enforced through real Envoy, usage metered from the
//! fake model's streams and debited exactly, on Postgres and on SQLite.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokenbudget::policy::{
    Action, Budget, BudgetId, Limit, ModelSet, Scope, Subject, SubjectKind, Tokens, Window,
    WindowUnit,
};

use crate::harness::{Backend, Stack, eventually, jwt, read_all};

fn user_budget(name: &str, user: &str, tokens: u64) -> Budget {
    Budget {
        id: BudgetId(Arc::from(format!("id-{name}"))),
        name: name.into(),
        subject: Subject {
            kind: SubjectKind::User,
            name: user.into(),
        },
        scope: Scope::Shared,
        models: ModelSet::All,
        limit: Limit::Tokens(Tokens(tokens)),
        window: Window::Calendar {
            unit: WindowUnit::Day,
            every: 1,
        },
        action: Action::Enforce,
        is_override: false,
        enabled: true,
    }
}

fn chat_body(stream: bool, max_tokens: u64) -> serde_json::Value {
    json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Say hello"}]})
}

/// Streams until the budget is spent; checks every debit against what the fake model reported,
/// then the 429 and that the model was not called for it.
async fn daily_budget_is_debited_exactly_then_denied(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack
        .create_budget(&user_budget("alice daily", "alice", 1000))
        .await;

    let mut ok = 0;
    for _ in 0..4 {
        let resp = stack
            .chat("alice", chat_body(true, 150))
            .header("x-fake-usage", "100,150,20,30")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-tokenbudget-unit"], "tokens");
        assert_eq!(resp.headers()["x-tokenbudget-limit"], "1000");
        assert!(resp.headers().contains_key("ratelimit-policy"));
        let body = read_all(resp).await;
        assert!(body.contains("[DONE]"), "stream ended: {body}");
        assert!(body.contains("word0"), "content passes: {body}");
        assert!(
            !body.contains("\"usage\":{"),
            "the usage chunk we asked for on the client's behalf is withheld: {body}"
        );
        ok += 1;
    }
    assert_eq!(ok, 4);

    // The store holds exactly what the fake model reported, per request id.
    let events = stack.events(4).await;
    assert_eq!(events.len(), 4);
    for e in &events {
        let seen = stack
            .fake
            .by_request_id(&e.request_id)
            .expect("event matches an upstream request");
        assert!(
            seen.include_usage,
            "include_usage was injected for {}",
            e.request_id
        );
        let (prompt, completion, cached, reasoning) = seen.usage_sent.unwrap();
        assert_eq!(
            (e.input + e.cache_read, e.cache_read, e.output, e.reasoning),
            (prompt, cached, completion, reasoning)
        );
        assert!(!e.estimated);
        assert_eq!(e.outcome, "complete");
        assert_eq!(e.principal, "user:alice");
        assert_eq!(e.model, "gpt-4o-mini");
        assert!(e.cost.0 > 0, "gpt-4o-mini is priced");
    }

    // 1000 used: the next request is refused by Envoy's local reply, and never reaches the model.
    let calls = stack.fake.count();
    let resp = stack
        .chat("alice", chat_body(true, 150))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let h = resp.headers().clone();
    assert_eq!(h["x-should-retry"], "false");
    assert_eq!(h["content-type"], "application/json");
    let retry_after: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry_after));
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "0");
    assert!(h.contains_key("x-ratelimit-reset-tokens"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["tokenbudget"]["budget"], "alice daily");
    assert_eq!(body["error"]["tokenbudget"]["used"], "1000");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("alice daily")
    );
    assert_eq!(
        stack.fake.count(),
        calls,
        "a denied request must not reach the model"
    );

    // The deny is recorded; another user is unaffected.
    let store = stack.store.clone();
    eventually("deny event stored", Duration::from_secs(5), || {
        let s = store.clone();
        async move {
            s.deny_events(&tokenbudget::store::DenyQuery::recent(10))
                .await
                .map(|d| d.iter().any(|d| d.principal == "user:alice"))
                .unwrap_or(false)
        }
    })
    .await;
    let resp = stack
        .chat("bob", chat_body(false, 10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    read_all(resp).await;

    // Envoy saw a well-behaved server: no spurious or missing replies, no failed streams.
    let stat = |n: &str| format!("http.llm.ext_proc.tokenbudget.{n}");
    assert!(stack.envoy.stat(&stat("streams_started")).await >= 6);
    assert_eq!(stack.envoy.stat(&stat("spurious_msgs_received")).await, 0);
    assert_eq!(stack.envoy.stat(&stat("streams_failed")).await, 0);
    assert_eq!(stack.envoy.stat(&stat("message_timeouts")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_budget_is_debited_exactly_then_denied_on_postgres() {
    daily_budget_is_debited_exactly_then_denied(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_budget_is_debited_exactly_then_denied_on_sqlite() {
    daily_budget_is_debited_exactly_then_denied(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_exceed_the_reservation_rule() {
    let stack = Stack::start(Backend::Postgres).await;
    stack
        .create_budget(&user_budget("carol", "carol", 1000))
        .await;
    // Each request reserves its prompt estimate + 90 output tokens; streams are held open 300 ms
    // so all 50 are in flight together and none settles before the others are decided.
    let sends = (0..50).map(|_| {
        stack
            .chat("carol", chat_body(true, 90))
            .header("x-fake-usage", "5,40")
            .header("x-fake-first-delay-ms", "300")
            .send()
    });
    let responses = futures_util::future::join_all(sends).await;
    let mut admitted = 0u64;
    let mut requested = None;
    for r in responses {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => {
                read_all(r).await;
                admitted += 1;
            }
            429 => {
                let body: serde_json::Value = r.json().await.unwrap();
                let req: u64 = body["error"]["tokenbudget"]["requested"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                requested = Some(req);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let estimate = requested.expect("some requests were denied");
    assert!(estimate >= 90);
    let allowed = 1000 / estimate;
    assert!(
        admitted <= allowed,
        "admitted {admitted} > {allowed} allowed by reservations of {estimate}"
    );
    assert!(admitted >= 1);
    let events = stack.events(admitted as usize).await;
    let debited: u64 = events.iter().map(|e| e.tokens()).sum();
    println!(
        "concurrency: 50 requests, estimate {estimate} tokens, admitted {admitted} (rule allows {allowed}), debited {debited} tokens of 1000"
    );
    assert_eq!(debited, admitted * 45);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_sidecar_loses_and_doubles_no_debit() {
    let mut stack = Stack::start(Backend::Sqlite).await;
    for _ in 0..5 {
        let r = stack
            .chat("dave", chat_body(true, 50))
            .header("x-fake-usage", "7,11")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        read_all(r).await;
    }
    stack.restart_sidecar().await;
    // Envoy reconnects to the new process on the same port.
    let client = stack.client.clone();
    let url = stack.envoy.url("/v1/chat/completions");
    eventually(
        "Envoy reaches the restarted sidecar",
        Duration::from_secs(10),
        || {
            let c = client.clone();
            let u = url.clone();
            async move {
                let r = c
                    .post(u)
                    .bearer_auth(jwt("probe", &[]))
                    .json(&chat_body(false, 5))
                    .send()
                    .await;
                matches!(r, Ok(r) if r.status() == 200)
            }
        },
    )
    .await;
    for _ in 0..5 {
        let r = stack
            .chat("dave", chat_body(false, 50))
            .header("x-fake-usage", "7,11")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        read_all(r).await;
    }
    let events: Vec<_> = stack
        .events(11)
        .await
        .into_iter()
        .filter(|e| e.principal == "user:dave")
        .collect();
    assert_eq!(events.len(), 10, "every acknowledged debit is stored once");
    let mut ids: Vec<_> = events.iter().map(|e| e.request_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10);
    assert!(events.iter().all(|e| e.tokens() == 18 && !e.estimated));
    let q = tokenbudget::store::UsageQuery {
        since_ms: 0,
        until_ms: i64::MAX / 2,
        ..Default::default()
    };
    let totals = stack
        .store
        .usage_top(&q, tokenbudget::store::UsageBy::Principal, 100)
        .await
        .unwrap();
    let dave = totals.iter().find(|t| t.principal == "user:dave").unwrap();
    assert_eq!((dave.requests, dave.tokens), (10, 180));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_are_ignored_and_no_identity_is_401() {
    let stack = Stack::start(Backend::Sqlite).await;
    // No JWT, only a claimed identity header: Envoy strips it, so there is no identity.
    let r = stack
        .client
        .post(stack.envoy.url("/v1/chat/completions"))
        .header("x-tokenbudget-principal", "admin")
        .json(&chat_body(false, 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(stack.fake.count(), 0);

    // A real caller claiming to be someone else is charged as themselves.
    let r = stack
        .chat("erin", chat_body(false, 5))
        .header("x-tokenbudget-principal", "frank")
        .header("x-tokenbudget-groups", "admins")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    read_all(r).await;
    let events = stack.events(1).await;
    assert_eq!(events[0].principal, "user:erin");
    let seen = &stack.fake.requests()[0];
    assert_eq!(
        seen.principal_header, None,
        "identity headers never reach the upstream"
    );
    assert_eq!(
        seen.authorization, None,
        "the caller's JWT is not forwarded"
    );
    assert_eq!(
        seen.accept_encoding, None,
        "accept-encoding is stripped so bodies are meterable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_settle_once_as_flagged_estimates() {
    let stack = Stack::start(Backend::Sqlite).await;
    // Usage chunk with truncated JSON.
    let r = stack
        .chat("gina", chat_body(true, 50))
        .header("x-fake-malformed", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    read_all(r).await;
    // Upstream cuts the stream mid-way.
    let r = stack
        .chat("gina", chat_body(true, 50))
        .header("x-fake-cut-after", "2")
        .send()
        .await
        .unwrap();
    let _ = r.text().await; // truncated: an error or a short body
    // The sidecar keeps serving.
    let r = stack
        .chat("gina", chat_body(true, 50))
        .header("x-fake-usage", "3,4")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    read_all(r).await;

    let events = stack.events(3).await;
    assert_eq!(
        events.len(),
        3,
        "each request settled exactly once: {events:#?}"
    );
    let estimated: Vec<_> = events.iter().filter(|e| e.estimated).collect();
    assert_eq!(estimated.len(), 2, "{events:#?}");
    assert!(
        estimated.iter().all(|e| e.output > 0 && e.input > 0),
        "estimates count prompt and streamed text: {estimated:#?}"
    );
    assert!(
        estimated.iter().any(|e| e.outcome == "aborted"),
        "the cut stream is an abort: {estimated:#?}"
    );
    assert!(estimated.iter().any(|e| e.outcome == "no_usage"));
    let exact: Vec<_> = events.iter().filter(|e| !e.estimated).collect();
    assert_eq!(exact[0].tokens(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abort_mid_stream_is_debited_once_with_what_was_seen() {
    let stack = Stack::start(Backend::Sqlite).await;
    let mut r = stack
        .chat("hank", chat_body(true, 50))
        .header("x-fake-chunks", "50")
        .header("x-fake-delay-ms", "20")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(r); // the client goes away mid-stream
    let events = stack.events(1).await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert!(e.estimated);
    assert_eq!(e.outcome, "aborted");
    assert!(
        e.output >= 1 && e.output < 50 * 2,
        "output estimated from the text seen: {e:?}"
    );
    // Exactly once, even after the upstream finishes or gives up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stack.store.usage_events(None, 100).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_databricks_and_upstream_errors() {
    let stack = Stack::start(Backend::Sqlite).await;
    stack
        .create_budget(&user_budget("ivy", "ivy", 10_000))
        .await;
    // Non-streaming JSON: usage from the body.
    let r = stack
        .chat("ivy", chat_body(false, 50))
        .header("x-fake-usage", "12,34,2,5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let remaining: u64 = r.headers()["x-tokenbudget-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining < 10_000,
        "remaining reflects this request's reservation"
    );
    read_all(r).await;
    // Databricks serving endpoint: the model is the endpoint name from the path.
    let r = stack
        .client
        .post(stack.envoy.url("/serving-endpoints/databricks-llama-4/invocations"))
        .bearer_auth(jwt("ivy", &[]))
        .header("x-fake-usage", "8,9")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    read_all(r).await;
    // An upstream error releases the reservation and debits nothing.
    let r = stack
        .chat("ivy", chat_body(false, 50))
        .header("x-fake-status", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    read_all(r).await;

    let events = stack.events(2).await;
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(
        (
            events[0].input,
            events[0].cache_read,
            events[0].output,
            events[0].reasoning
        ),
        (10, 2, 34, 5)
    );
    assert_eq!(events[1].model, "databricks-llama-4");
    assert_eq!(events[1].tokens(), 17);
    assert!(events.iter().all(|e| !e.estimated));
    // Nothing stays reserved: 10_000 − 46 − 17 remain.
    let r = stack.chat("ivy", chat_body(false, 1)).send().await.unwrap();
    let remaining: u64 = r.headers()["x-tokenbudget-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let reserved_now = 10_000 - 46 - 17 - remaining;
    assert!(
        reserved_now <= 20,
        "only this request's own reservation is held, not the failed one's: {reserved_now}"
    );
}
