//! The per-route examples (`envoy/routes.yaml`) do what their comments say, through real Envoy.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_model;
use crate::harness::{Envoy, eventually, jwt, read_all, sidecar_toml, start_sidecar};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_examples_meter_skip_hint_and_fail_open_as_documented() {
    crate::harness::init_tracing();
    let db = tempfile::tempdir().unwrap();
    let journal = tempfile::tempdir().unwrap();
    let store_toml = format!(
        "sqlite_path = \"{}\"",
        db.path().join("tokenbudget.db").display()
    );
    let clock: tokenbudget::clock::SharedClock = Arc::new(tokenbudget::clock::SystemClock);
    let sidecar = start_sidecar(&sidecar_toml(&store_toml, journal.path(), "", ""), &clock).await;
    let spec: tokenbudget::policy::BudgetSpec = toml::from_str(
        "name='carol daily'\nsubject='user:carol'\nlimit_tokens=100000\nwindow='day'",
    )
    .unwrap();
    sidecar
        .store
        .create_budget(
            &spec.to_budget("b-carol").unwrap(),
            &tokenbudget::store::Actor {
                name: "test".into(),
                ts_ms: 0,
            },
        )
        .await
        .unwrap();
    let ledger = Arc::clone(&sidecar.ledger);
    eventually("the budget is loaded", Duration::from_secs(10), || {
        let l = Arc::clone(&ledger);
        async move { l.policy().budgets.iter().any(|b| b.name == "carol daily") }
    })
    .await;
    let (fake_addr, fake) = fake_model::start().await.unwrap();
    let envoy = Envoy::start("envoy/routes.yaml", fake_addr, sidecar.grpc_addr).await;
    let client = reqwest::Client::new();
    let token = jwt("carol", &[]);
    let streams = || envoy.stat("http.llm.ext_proc.tokenbudget.streams_started");

    // Not an LLM route: no ext_proc stream at all, no identity needed, the upstream answers.
    let before = streams().await;
    let r = client.get(envoy.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-tokenbudget-limit").is_none());
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "gpt-4o-mini");
    assert_eq!(
        streams().await,
        before,
        "the disabled route opened an ext_proc stream"
    );

    // The default route: metered, family from the path, budget headers on the response.
    let r = client
        .post(envoy.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .header("x-fake-usage", "40,2")
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-tokenbudget-limit").is_some());
    read_all(r).await;

    // The Anthropic API mounted under a path we could not recognise: the route's metadata says
    // family anthropic and model claude-sonnet-4-5, and its usage is read the Anthropic way.
    let r = client
        .post(envoy.url("/claude/messages"))
        .bearer_auth(&token)
        .header("x-fake-fixture", "anthropic")
        .json(&json!({"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    read_all(r).await;
    assert!(
        fake.requests().iter().any(|s| s.path == "/v1/messages"),
        "the route rewrote the path upstream"
    );
    assert_eq!(streams().await, before + 2);

    let store = sidecar.store.clone();
    eventually(
        "both metered requests stored",
        Duration::from_secs(10),
        || {
            let st = store.clone();
            async move { st.usage_events(None, 10).await.unwrap().len() >= 2 }
        },
    )
    .await;
    let events = store.usage_events(None, 10).await.unwrap();
    assert_eq!(events.len(), 2, "only the two metered requests: {events:?}");
    let chat = events.iter().find(|e| e.family == "openai").unwrap();
    assert_eq!((chat.input, chat.output, chat.estimated), (40, 2, false));
    let claude = events
        .iter()
        .find(|e| e.family == "anthropic")
        .unwrap_or_else(|| panic!("no anthropic debit: {events:?}"));
    assert_eq!(claude.model, "claude-sonnet-4-5", "the route's model hint");
    assert_eq!(
        (
            claude.input,
            claude.cache_read,
            claude.output,
            claude.estimated
        ),
        (12, 2048, 6, false),
        "usage read with the Anthropic parser"
    );

    // tokenbudget down: the internal route fails open, every other one fails closed.
    sidecar.shutdown().await.unwrap();
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
    let open = client
        .post(envoy.url("/internal/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200, "the fail-open route passes");
    read_all(open).await;
    let closed = client
        .post(envoy.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 503, "every other route fails closed");
    assert!(
        envoy
            .stat("http.llm.ext_proc.tokenbudget.failure_mode_allowed")
            .await
            >= 1
    );
}

/// The tokenbudget.toml inside the Kubernetes ConfigMap is a valid configuration.
#[test]
fn the_kubernetes_configmap_holds_a_valid_config() {
    let manifest = std::fs::read_to_string(crate::harness::repo_path(
        "envoy/kubernetes/tokenbudget.yaml",
    ))
    .unwrap();
    let start = manifest.find("  tokenbudget.toml: |\n").unwrap() + "  tokenbudget.toml: |\n".len();
    let end = start + manifest[start..].find("\n---").unwrap();
    let toml_text: String = manifest[start..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let env = |k: &str| {
        (k == "TOKENBUDGET_DATABASE_URL").then(|| "postgres://tokenbudget@db/tokenbudget".into())
    };
    let cfg = tokenbudget::config::Config::parse(&toml_text, &env)
        .unwrap_or_else(|e| panic!("{e}\n{toml_text}"));
    assert!(cfg.lease.is_some(), "the manifest runs lease mode");
    assert_eq!(cfg.quota_tokens.len(), 1);
    assert_eq!(cfg.grpc_listen.port(), 9002);
}
