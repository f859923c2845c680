//! Keeping untrusted callers out: identity headers never reach tokenbudget from clients through
//! any shipped Envoy config, the admin API has no way around its tokens, SQL is never assembled
//! from strings, and hostile sizes (bodies, headers, streams) are bounded.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{
    ADMIN_TOKEN, Backend, Envoy, Stack, VIEWER_TOKEN, envoy_bin, read_all, repo_path,
};

/// Envoy's own view of a config (its `/config_dump`), with its ports moved out of the way.
async fn config_dump(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text
        .replace("port_value: 9901 }", "port_value: 0 }")
        .replace("port_value: 10000 }", "port_value: 0 }");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(&cfg, text).unwrap();
    let admin_file = dir.path().join("admin.txt");
    let mut child = std::process::Command::new(envoy_bin())
        .arg("-c")
        .arg(&cfg)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "critical",
        ])
        .arg("--admin-address-path")
        .arg(&admin_file)
        .env("OPENAI_API_KEY", "unused")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let af = admin_file.clone();
    crate::harness::eventually("Envoy admin address", Duration::from_secs(20), || {
        let ok = std::fs::read_to_string(&af)
            .map(|s| !s.trim().is_empty())
            .unwrap_or(false);
        async move { ok }
    })
    .await;
    let admin = std::fs::read_to_string(&admin_file)
        .unwrap()
        .trim()
        .to_string();
    let dump: Value = reqwest::get(format!("http://{admin}/config_dump"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    dump
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_envoy_config_strips_identity_headers_before_any_filter_reads_them() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_path("envoy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let dump = config_dump(&path).await;
        let listeners = dump["configs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["static_listeners"].as_array())
            .flatten();
        let mut chains = 0;
        for l in listeners {
            for chain in l["listener"]["filter_chains"].as_array().unwrap() {
                for f in chain["filters"].as_array().unwrap() {
                    let Some(filters) = f["typed_config"]["http_filters"].as_array() else {
                        continue;
                    };
                    chains += 1;
                    let first = &filters[0];
                    assert_eq!(
                        first["name"],
                        "envoy.filters.http.header_mutation",
                        "{}: the first HTTP filter must strip identity headers",
                        path.display()
                    );
                    let removed: Vec<&str> =
                        first["typed_config"]["mutations"]["request_mutations"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .filter_map(|m| m["remove"].as_str())
                            .collect();
                    for h in [
                        "x-tokenbudget-principal",
                        "x-tokenbudget-groups",
                        "x-tokenbudget-principal-kind",
                    ] {
                        assert!(removed.contains(&h), "{}: {h} not removed", path.display());
                    }
                    let names: Vec<&str> =
                        filters.iter().filter_map(|f| f["name"].as_str()).collect();
                    let ext = names
                        .iter()
                        .position(|n| *n == "envoy.filters.http.ext_proc")
                        .unwrap();
                    assert!(
                        ext > 0 && names[..ext].contains(&"envoy.filters.http.header_mutation")
                    );
                }
            }
        }
        assert!(
            chains >= 1,
            "{}: no HTTP connection manager found",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 3, "{checked} configs");

    // And through real Envoy, with both shipped postures: a forged header is not an identity.
    let stack = Stack::start(Backend::Sqlite).await;
    let (fake_addr, _fake) = crate::fake_model::start().await.unwrap();
    for cfg in ["envoy/demo.yaml", "envoy/demo-fail-open.yaml"] {
        let envoy = Envoy::start(cfg, fake_addr, stack.sidecar().grpc_addr).await;
        let r = stack
            .client
            .post(envoy.url("/v1/chat/completions"))
            .header("x-tokenbudget-principal", "the-ceo")
            .header("x-tokenbudget-groups", "admins")
            .json(&json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            401,
            "{cfg}: a forged identity header was honoured"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_auth_cannot_be_bypassed() {
    let stack = Stack::start(Backend::Sqlite).await;
    let c = &stack.client;
    let base = format!("http://{}", stack.sidecar().admin_addr);
    // Paths that might normalise to a protected route, without a token: never data.
    for path in [
        "/api/v1/budgets",
        "/api/v1//budgets",
        "/api/v1/./budgets",
        "/api/v1/%62udgets",
        "/api/v1/budgets/",
        "/api/v1/openapi.json/../budgets",
        "/api/v1/budgets?token=tb_test_admin_token_0123456789",
        "/api/v1/budgets?access_token=tb_test_admin_token_0123456789",
        "/API/V1/budgets",
        "/api/v1/audit",
        "/api/v1/me",
    ] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        let code = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert!(
            matches!(code, 401 | 404),
            "GET {path} without a token: {code} {body}"
        );
        assert!(!body.contains("tester"), "GET {path} leaked data: {body}");
    }
    // Malformed credentials: 401, never 500.
    let long = "x".repeat(64 * 1024);
    for auth in [
        "Bearer".to_string(),
        "Bearer ".to_string(),
        format!("Bearer  {ADMIN_TOKEN}x"),
        format!("Bearer {ADMIN_TOKEN} extra"),
        format!("Basic {ADMIN_TOKEN}"),
        format!("Bearer {long}"),
    ] {
        let r = c
            .get(format!("{base}/api/v1/budgets"))
            .header("authorization", auth.as_str())
            .send()
            .await
            .unwrap();
        assert!(
            matches!(r.status().as_u16(), 401 | 431),
            "{}: {}",
            &auth[..auth.len().min(30)],
            r.status()
        );
    }
    // No method trick turns a read token into a write, or no token into anything.
    let spec = json!({"name": "sneaky", "subject": "everyone", "limit_tokens": 1, "window": "day"});
    for (m, token) in [
        (Method::POST, None),
        (Method::POST, Some(VIEWER_TOKEN)),
        (Method::PUT, Some(VIEWER_TOKEN)),
    ] {
        let mut r = c
            .request(m.clone(), format!("{base}/api/v1/budgets"))
            .header("x-http-method-override", "GET")
            .json(&spec);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let code = r.send().await.unwrap().status().as_u16();
        assert!(
            matches!(code, 401 | 403 | 405),
            "{m} with {token:?}: {code}"
        );
    }
    let r = c
        .request(Method::OPTIONS, format!("{base}/api/v1/budgets"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // Nothing was created by any of it.
    let v = stack.get_json("/budgets").await;
    assert!(!v.to_string().contains("sneaky"), "{v}");
    let audit = stack.get_json("/audit").await;
    assert!(!audit.to_string().contains("sneaky"));
}

/// Every statement our store code sends is a literal or a named constant: nothing is formatted
/// into SQL, so nothing a caller sends can become SQL.
#[test]
fn store_sql_is_never_assembled_from_strings() {
    let calls = [
        ".execute(",
        ".query(",
        ".query_one(",
        ".query_opt(",
        ".prepare(",
        ".prepare_cached(",
        ".batch_execute(",
        ".query_row(",
        ".execute_batch(",
        ".query_map(",
    ];
    let keywords = [
        "SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP", "NOTIFY", "LISTEN",
        " FROM ", " WHERE ",
    ];
    let mut seen = 0;
    for file in ["src/store/postgres.rs", "src/store/sqlite.rs"] {
        let src = std::fs::read_to_string(repo_path(file)).unwrap();
        for (i, _) in src.match_indices("format!(") {
            let around = &src[i..(i + 200).min(src.len())];
            assert!(
                !keywords.iter().any(|k| around.contains(k)),
                "{file}: SQL built with format!: {around}"
            );
        }
        for call in calls {
            for (i, _) in src.match_indices(call) {
                let arg = src[i + call.len()..].trim_start();
                let first: String = arg
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '"' || *c == '&')
                    .collect();
                let ok = first.starts_with('"')
                    || first
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    || first == "sql"
                    || first == "params"
                    || first.starts_with('[')
                    || call == ".query_map(";
                assert!(
                    ok,
                    "{file}: {call} with a non-literal statement: {}",
                    &arg[..arg.len().min(60)]
                );
                seen += 1;
            }
        }
        // Every `sql` binding is chosen among literals or constants.
        for (i, _) in src.match_indices("let sql = ") {
            let rhs = src[i + 10..].trim_start();
            assert!(
                rhs.starts_with("match ") || rhs.starts_with('"'),
                "{file}: let sql = {}",
                &rhs[..rhs.len().min(40)]
            );
        }
    }
    assert!(
        seen > 50,
        "only {seen} statements found: the scan is broken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_header_floods_and_pathological_streams_are_bounded() {
    let stack = Stack::start(Backend::Sqlite).await;
    // A body within admission.max_body_bytes is read; a larger one is not buffered at all — the
    // request is decided from its headers, its prompt estimated from content-length.
    for (who, mib) in [("bulk-read", 3usize), ("bulk-unread", 6)] {
        let text = "y".repeat(mib << 20);
        let r = stack
            .chat(who, json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": text}]}))
            .header("x-fake-usage", "1,2")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{who}");
        read_all(r).await;
    }
    assert_eq!(stack.sidecar().ledger.metrics.bodies_not_read.get(), 1);
    let seen = stack.fake.requests();
    assert_eq!(seen.len(), 2, "both reached the model");
    assert_eq!(stack.events(2).await.len(), 2);

    // A header flood is refused by Envoy's codec (431, or the connection closed) before any
    // filter: neither tokenbudget nor the model sees it.
    let decided = stack.sidecar().ledger.metrics.decisions.allowed.get();
    let mut req = stack.chat(
        "flood",
        json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": []}),
    );
    for i in 0..120 {
        req = req.header(format!("x-flood-{i}"), "z".repeat(1000));
    }
    match req.send().await {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    assert_eq!(
        stack.sidecar().ledger.metrics.decisions.allowed.get(),
        decided
    );
    assert_eq!(stack.fake.count(), 2);

    // One 8 MiB SSE event: passed through whole, metered with bounded memory (the meter keeps at
    // most metering.max_event_bytes of it), settled once by estimate since no usage can be read.
    let r = stack
        .chat(
            "patho",
            json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 5, "messages": []}),
        )
        .header("x-fake-huge-event", (8 << 20).to_string())
        .header("x-fake-chunks", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = read_all(r).await;
    assert!(body.len() > 8 << 20, "the whole event passed through");
    assert!(body.contains("[DONE]"));
    let events = stack.events(3).await;
    let e = events.iter().find(|e| e.principal == "user:patho").unwrap();
    // The usage chunk after the huge event is still found: the framer recovers at the next event.
    assert!(!e.estimated, "{e:?}");
    assert_eq!(stack.sidecar().extproc.active_streams(), 0);
    // Still serving.
    let r = stack
        .chat(
            "after",
            json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": []}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
