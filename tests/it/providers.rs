//! Issue "provider coverage": every recorded provider format, streaming and not, metered through
//! real Envoy and debited exactly; aborts, gzip, and the deny shapes of each family.

use std::time::Duration;

use tokenbudget::meter::Usage;
use tokenbudget::testkit::fixtures::{self, Fixture};

use crate::harness::{Backend, Stack, eventually, jwt, read_all, repo_path};

fn fixtures() -> Vec<(String, Fixture)> {
    fixtures::all()
        .into_iter()
        .map(|(name, f, _)| (name, f))
        .collect()
}

/// Sends fixture `name`'s request through Envoy; returns the request id the upstream saw.
async fn send(
    stack: &Stack,
    name: &str,
    f: &Fixture,
    extra: &[(&str, &str)],
) -> (u16, String, String) {
    let before = stack.fake.count();
    let mut req = stack
        .client
        .post(stack.envoy.url(&f.path))
        .bearer_auth(jwt("pat", &[]))
        .header("content-type", "application/json")
        .header("x-fake-fixture", name)
        .body(f.request.clone());
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    let rid = if stack.fake.count() > before {
        stack.fake.requests()[before].request_id.clone()
    } else {
        String::new()
    };
    (status, rid, body)
}

async fn event_of(stack: &Stack, rid: &str) -> tokenbudget::store::UsageEvent {
    let store = stack.store.clone();
    let id = rid.to_owned();
    eventually(
        &format!("usage event for {rid}"),
        Duration::from_secs(5),
        || {
            let (s, id) = (store.clone(), id.clone());
            async move {
                s.usage_events(Some(&id), 10)
                    .await
                    .map(|e| !e.is_empty())
                    .unwrap_or(false)
            }
        },
    )
    .await;
    let mut events = stack.store.usage_events(Some(rid), 10).await.unwrap();
    assert_eq!(events.len(), 1, "debited exactly once: {events:#?}");
    events.remove(0)
}

fn usage_of(e: &tokenbudget::store::UsageEvent) -> Usage {
    Usage {
        input: e.input,
        cache_read: e.cache_read,
        cache_write: e.cache_write,
        cache_write_1h: e.cache_write_1h,
        output: e.output,
        reasoning: e.reasoning,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_format_is_debited_exactly_through_envoy() {
    let stack = Stack::start(Backend::Postgres).await;
    let all = fixtures();
    assert!(all.len() >= 15);
    for (name, f) in &all {
        let (status, rid, body) = send(&stack, name, f, &[]).await;
        assert_eq!(status, 200, "{name}: {body}");
        if name == "openai-chat-stream" {
            assert!(
                body.contains("\"usage\":{"),
                "a client that asked for usage gets it"
            );
        }
        let e = event_of(&stack, &rid).await;
        assert_eq!(usage_of(&e), f.usage.usage(), "{name}");
        assert!(!e.estimated, "{name}");
        let outcome = if f.upstream_error {
            "upstream_error"
        } else {
            "complete"
        };
        assert_eq!(e.outcome, outcome, "{name}");
    }
    // Families and models as the routes name them.
    let ev = stack.store.usage_events(None, 100).await.unwrap();
    let model_of = |fam: &str| {
        ev.iter()
            .filter(|e| e.family == fam)
            .map(|e| e.model.clone())
            .collect::<Vec<_>>()
    };
    assert!(model_of("gemini").contains(&"gemini-2.5-pro".to_string()));
    assert!(model_of("bedrock").contains(&"claude-3-5-sonnet-20241022".to_string()));
    assert!(model_of("openai").contains(&"databricks-meta-llama-3-3-70b-instruct".to_string()));
    assert!(model_of("openai-responses").contains(&"gpt-4.1".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_responses_are_metered() {
    let stack = Stack::start(Backend::Sqlite).await;
    for (name, f) in fixtures().iter().filter(|(n, _)| {
        [
            "openai-chat-stream",
            "anthropic-stream",
            "gemini-stream-array",
            "bedrock-converse-stream",
        ]
        .contains(&n.as_str())
    }) {
        let (status, rid, _) = send(&stack, name, f, &[("x-fake-gzip", "1")]).await;
        assert_eq!(status, 200, "{name}");
        let e = event_of(&stack, &rid).await;
        assert_eq!(usage_of(&e), f.usage.usage(), "{name} gzipped");
        assert!(!e.estimated);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_stream_is_debited_once_with_the_usage_seen_so_far() {
    let stack = Stack::start(Backend::Sqlite).await;
    let all = fixtures();
    let (name, f) = all.iter().find(|(n, _)| n == "anthropic-stream").unwrap();
    // Cut just after message_start (input and cache counts known, output 1 so far).
    let body = std::fs::read(repo_path("tests/fixtures/anthropic-stream.body")).unwrap();
    let cut = body
        .windows(22)
        .position(|w| w == b"event: content_block_s")
        .unwrap();
    let (_, rid, _) = send(&stack, name, f, &[("x-fake-cut-at-byte", &cut.to_string())]).await;
    let e = event_of(&stack, &rid).await;
    assert_eq!(e.outcome, "aborted");
    assert!(!e.estimated, "provider usage seen before the cut");
    assert_eq!(
        (
            e.input,
            e.cache_read,
            e.cache_write,
            e.cache_write_1h,
            e.output
        ),
        (25, 1800, 60, 40, 1)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        stack
            .store
            .usage_events(Some(&rid), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_speak_each_familys_error_shape() {
    let stack = Stack::start(Backend::Sqlite).await;
    let b: tokenbudget::policy::BudgetSpec =
        toml::from_str("name='pat tiny'\nsubject='user:pat'\nlimit_tokens=10\nwindow='day'")
            .unwrap();
    stack.create_budget(&b.to_budget("b-pat").unwrap()).await;
    let all = fixtures();
    let get = |n: &str| all.iter().find(|(x, _)| x == n).unwrap();

    let (name, f) = get("anthropic-stream");
    let (status, _, body) = send(&stack, name, f, &[]).await;
    assert_eq!(status, 429);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["details"]["error_code"], "budget_exceeded");

    let (name, f) = get("gemini");
    let (status, _, body) = send(&stack, name, f, &[]).await;
    assert_eq!(status, 429);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(v["error"]["details"][0]["reason"], "BUDGET_EXCEEDED");

    let (name, f) = get("databricks-stream");
    let (status, _, body) = send(&stack, name, f, &[]).await;
    assert_eq!(status, 429);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error_code"], "REQUEST_LIMIT_EXCEEDED");
    assert_eq!(v["error"]["code"], "budget_exceeded");

    let (name, f) = get("bedrock-converse");
    let r = stack
        .client
        .post(stack.envoy.url(&f.path))
        .bearer_auth(jwt("pat", &[]))
        .header("x-fake-fixture", name.as_str())
        .body(f.request.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-amzn-errortype"], "ThrottlingException");
    read_all(r).await;
    assert_eq!(stack.fake.count(), 0, "no denied request reached the model");
}
