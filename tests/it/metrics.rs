//! `/metrics` is scraped after real traffic through Envoy and its numbers match what was sent.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Backend, Stack, eventually, read_all};

/// The value of one sample line (`name{labels} value`), 0 if absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_metrics_match_the_traffic_sent() {
    let stack = Stack::start(Backend::Sqlite).await;
    let b: tokenbudget::policy::BudgetSpec =
        toml::from_str("name='quinn'\nsubject='user:quinn'\nlimit_tokens=1000\nwindow='day'")
            .unwrap();
    stack.create_budget(&b.to_budget("b-quinn").unwrap()).await;
    let body = |max: u64| json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": max, "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let r = stack
            .chat("quinn", body(100))
            .header("x-fake-usage", "100,200,40")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        read_all(r).await;
    }
    let ledger = Arc::clone(&stack.sidecar().ledger);
    eventually("3 settled", Duration::from_secs(5), || {
        let n = ledger.metrics.settled_total();
        async move { n >= 3 }
    })
    .await;
    // 900 used: a 100-token request no longer fits.
    let r = stack.chat("quinn", body(100)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    read_all(r).await;
    // An unknown model under no USD budget: allowed, settled, labelled "other".
    let r = stack
        .chat(
            "rae",
            json!({"model": "my-own-model-xyz", "max_tokens": 5, "messages": []}),
        )
        .header("x-fake-usage", "1,2")
        .send()
        .await
        .unwrap();
    read_all(r).await;
    let r = stack
        .client
        .post(stack.envoy.url("/v1/chat/completions"))
        .json(&body(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let url = format!("http://{}/metrics", stack.sidecar().admin_addr);
    let client = stack.client.clone();
    eventually(
        "events written and streams closed",
        Duration::from_secs(5),
        || {
            let (c, u) = (client.clone(), url.clone());
            async move {
                let t = c.get(u).send().await.unwrap().text().await.unwrap();
                sample(&t, "tokenbudget_events_written_total") >= 4.0
                    && sample(&t, "tokenbudget_active_streams") == 0.0
            }
        },
    )
    .await;
    let r = stack.client.get(&url).send().await.unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let t = r.text().await.unwrap();
    assert_eq!(
        sample(&t, "tokenbudget_decisions_total{outcome=\"allowed\"}"),
        4.0
    );
    assert_eq!(
        sample(&t, "tokenbudget_decisions_total{outcome=\"denied\"}"),
        1.0
    );
    assert_eq!(
        sample(&t, "tokenbudget_decisions_total{outcome=\"no_identity\"}"),
        1.0
    );
    assert_eq!(
        sample(&t, "tokenbudget_settled_total{outcome=\"complete\"}"),
        4.0
    );
    // 3 × (100 prompt of which 40 cached, 200 out) for gpt-4o-mini.
    assert_eq!(
        sample(
            &t,
            "tokenbudget_tokens_total{model=\"gpt-4o-mini\",class=\"input\"}"
        ),
        180.0
    );
    assert_eq!(
        sample(
            &t,
            "tokenbudget_tokens_total{model=\"gpt-4o-mini\",class=\"cache_read\"}"
        ),
        120.0
    );
    assert_eq!(
        sample(
            &t,
            "tokenbudget_tokens_total{model=\"gpt-4o-mini\",class=\"output\"}"
        ),
        600.0
    );
    // Cost: 3 × (60 × $0.15 + 40 × $0.075 + 200 × $0.60) per 1M tokens = 3 × 132 000 nano-USD.
    assert_eq!(
        sample(
            &t,
            "tokenbudget_cost_nanodollars_total{model=\"gpt-4o-mini\"}"
        ),
        396_000.0
    );
    assert_eq!(
        sample(
            &t,
            "tokenbudget_tokens_total{model=\"other\",class=\"output\"}"
        ),
        2.0
    );
    assert_eq!(sample(&t, "tokenbudget_settled_unpriced_total"), 1.0);
    assert!(sample(&t, "tokenbudget_decision_seconds_count") >= 5.0);
    // quinn's first decision scans the budgets, the next three reuse it; rae's is a scan.
    assert_eq!(
        sample(&t, "tokenbudget_match_cache_total{result=\"hit\"}"),
        3.0
    );
    assert_eq!(
        sample(&t, "tokenbudget_match_cache_total{result=\"miss\"}"),
        2.0
    );
    assert!(sample(&t, "tokenbudget_batches_total") >= 1.0);
    assert!(
        !t.contains("quinn") && !t.contains("my-own-model"),
        "no principal or client-chosen model in labels"
    );

    // Every series the shipped Grafana dashboard queries exists in a real scrape.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::harness::repo_path("deploy/grafana/tokenbudget.json"))
            .unwrap(),
    )
    .unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("tokenbudget_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.push(name);
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    for name in &queried {
        assert!(
            t.lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the dashboard queries {name}, which /metrics does not expose"
        );
    }
}
