//! The admin REST API against a running sidecar: authentication and roles, validation errors
//! naming the field, pagination, the audit log, and reports that reflect real traffic through
//! Envoy.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

use crate::harness::{Backend, Stack, VIEWER_TOKEN, eventually, read_all};

async fn body(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A problem document with `status` whose first error names `field`.
async fn problem(r: reqwest::Response, status: u16, field: Option<&str>) -> Value {
    assert_eq!(
        r.headers()["content-type"],
        "application/problem+json",
        "{r:?}"
    );
    let (code, v) = body(r).await;
    assert_eq!(code.as_u16(), status, "{v}");
    assert_eq!(v["status"], status);
    if let Some(f) = field {
        assert_eq!(v["errors"][0]["field"], f, "{v}");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_roles_and_the_openapi_document() {
    let stack = Stack::start(Backend::Sqlite).await;
    let c = &stack.client;
    let url = |p: &str| stack.admin_url(&format!("/api/v1{p}"));

    // No token, a wrong token, a malformed header: 401 with a challenge.
    let r = c.get(url("/budgets")).send().await.unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"tokenbudget\""
    );
    problem(r, 401, None).await;
    let r = c
        .get(url("/budgets"))
        .bearer_auth("tb_wrong")
        .send()
        .await
        .unwrap();
    problem(r, 401, None).await;
    let r = c
        .get(url("/budgets"))
        .header("authorization", "Basic dGVzdDp0ZXN0")
        .send()
        .await
        .unwrap();
    problem(r, 401, None).await;
    // No write without a token either.
    let r = c
        .post(url("/budgets"))
        .json(&json!({"name": "x", "subject": "everyone", "limit_tokens": 1, "window": "day"}))
        .send()
        .await
        .unwrap();
    problem(r, 401, None).await;

    // A viewer reads and checks, but cannot change anything.
    let viewer = |m: Method, p: &str| c.request(m, url(p)).bearer_auth(VIEWER_TOKEN);
    let (code, me) = body(viewer(Method::GET, "/me").send().await.unwrap()).await;
    assert_eq!(code, 200);
    assert_eq!(me, json!({"name": "watcher", "role": "viewer"}));
    assert_eq!(
        viewer(Method::GET, "/budgets")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = viewer(Method::POST, "/check")
        .json(&json!({"principal": "alice", "model": "gpt-4o"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (m, p, b) in [
        (
            Method::POST,
            "/budgets",
            json!({"name": "x", "subject": "everyone", "limit_tokens": 1, "window": "day"}),
        ),
        (Method::DELETE, "/budgets/x", json!(null)),
        (Method::PUT, "/groups/eng/members/alice", json!(null)),
        (
            Method::POST,
            "/prices",
            json!({"model": "m", "input": "1", "output": "2"}),
        ),
    ] {
        let r = viewer(m.clone(), p).json(&b).send().await.unwrap();
        let v = problem(r, 403, None).await;
        assert!(
            v["detail"].as_str().unwrap().contains("viewer"),
            "{m} {p}: {v}"
        );
    }
    let (_, me) = body(stack.api(Method::GET, "/me").send().await.unwrap()).await;
    assert_eq!(me["role"], "admin");

    // The OpenAPI document is public and lists every route with bearer security.
    let (code, doc) = body(c.get(url("/openapi.json")).send().await.unwrap()).await;
    assert_eq!(code, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["servers"][0]["url"], "/api/v1");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for p in [
        "/budgets",
        "/budgets/{name}",
        "/budgets/{name}/status",
        "/status",
        "/check",
        "/prices",
        "/groups",
        "/groups/{group}",
        "/groups/{group}/members/{principal}",
        "/principals",
        "/models",
        "/usage/timeseries",
        "/usage/top",
        "/denies",
        "/audit",
        "/me",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }

    // Unknown API routes are problems too; CORS stays closed without configured origins.
    let r = stack.api(Method::GET, "/nope").send().await.unwrap();
    problem(r, 404, None).await;
    let r = stack
        .api(Method::GET, "/budgets")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_crud_validation_pagination_and_audit() {
    let stack = Stack::start(Backend::Sqlite).await;
    let create = |b: Value| stack.api(Method::POST, "/budgets").json(&b).send();

    let r = create(json!({"name": "eng daily", "subject": "group:eng", "models": ["gpt-4o", "claude-sonnet-4-5"],
        "limit_usd": "25.50", "window": "day"}))
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], "/api/v1/budgets/eng+daily");
    let (_, v) = body(r).await;
    assert_eq!(v["limit_usd"], "25.50");
    assert_eq!(v["kind"], "calendar");
    assert_eq!(v["usage"]["unit"], "usd");
    assert_eq!(v["usage"]["remaining"], "25.50");
    let id = v["id"].as_str().unwrap().to_string();

    // Validation: each error names the field.
    let base = json!({"name": "b", "subject": "user:alice", "limit_tokens": 10, "window": "day"});
    let with = |k: &str, val: Value| {
        let mut b = base.clone();
        b[k] = val;
        b
    };
    for (b, status, field) in [
        (with("subject", json!("team:x")), 422, "subject"),
        (with("window", json!("fortnight")), 422, "window"),
        (with("kind", json!("sliding")), 422, "kind"),
        (with("limit_usd", json!("1")), 422, "limit"),
        (with("limit_tokens", json!(0)), 422, "limit"),
        (with("every", json!(0)), 422, "every"),
        (with("scope", json!("per_member")), 422, "scope"),
        (with("limit_tokens", json!("ten")), 400, "limit_tokens"),
        (with("models", json!(["a", 3])), 400, "models[1]"),
        (with("colour", json!("red")), 400, "colour"),
        (with("name", json!("eng daily")), 409, ""),
    ] {
        let r = create(b.clone()).await.unwrap();
        let field = (!field.is_empty()).then_some(field);
        problem(r, status, field).await;
    }
    let r = stack
        .api(Method::POST, "/budgets")
        .body("name=b")
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .unwrap();
    problem(r, 400, None).await;
    let r = stack
        .api(Method::POST, "/budgets")
        .body("{\"name\": ")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    problem(r, 400, None).await;

    // Pagination and search.
    for n in ["a1", "a2", "a3"] {
        let r = create(with("name", json!(n))).await.unwrap();
        assert_eq!(r.status(), 201);
    }
    let (_, page) = body(
        stack
            .api(Method::GET, "/budgets?limit=2")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let names = |p: &Value| {
        p["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&page), ["a1", "a2"]);
    assert_eq!(page["next_offset"], 2);
    let (_, page) = body(
        stack
            .api(Method::GET, "/budgets?limit=2&offset=2")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(names(&page), ["a3", "eng daily"]);
    assert!(page.get("next_offset").is_none());
    let (_, page) = body(
        stack
            .api(Method::GET, "/budgets?q=SONNET")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(names(&page), ["eng daily"]);
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("offset=-1", "offset"),
    ] {
        let r = stack
            .api(Method::GET, &format!("/budgets?{q}"))
            .send()
            .await
            .unwrap();
        problem(r, 422, Some(field)).await;
    }
    let r = stack
        .api(Method::GET, "/budgets?limit=many")
        .send()
        .await
        .unwrap();
    problem(r, 400, Some("limit")).await;

    // PUT replaces (and renames), PATCH changes some fields; the id is kept.
    let r = stack
        .api(Method::PUT, "/budgets/a1")
        .json(&json!({"name": "alice weekly", "subject": "user:alice", "limit_tokens": 5000, "window": "week"}))
        .send()
        .await
        .unwrap();
    let (code, v) = body(r).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["subject"], "user:alice");
    let r = stack
        .api(Method::PATCH, "/budgets/eng%20daily")
        .json(&json!({"limit_tokens": 100000, "action": "shadow"}))
        .send()
        .await
        .unwrap();
    let (code, v) = body(r).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["limit_tokens"], 100000);
    assert_eq!(v["limit_usd"], Value::Null);
    assert_eq!(v["action"], "shadow");
    assert_eq!(
        v["models"],
        json!(["claude-sonnet-4-5", "gpt-4o"]),
        "kept, sorted"
    );
    let r = stack
        .api(Method::PATCH, "/budgets/eng%20daily")
        .json(&json!({"window": "year"}))
        .send()
        .await
        .unwrap();
    problem(r, 422, Some("window")).await;
    let r = stack
        .api(Method::PATCH, "/budgets/missing")
        .json(&json!({"every": 2}))
        .send()
        .await
        .unwrap();
    problem(r, 404, None).await;
    // The sidecar enforces the change at once.
    let ledger = &stack.sidecar().ledger;
    assert!(
        ledger
            .policy()
            .budgets
            .iter()
            .any(|b| b.name == "alice weekly")
    );

    let r = stack
        .api(Method::DELETE, "/budgets/a2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = stack.api(Method::GET, "/budgets/a2").send().await.unwrap();
    problem(r, 404, None).await;
    let r = stack
        .api(Method::DELETE, "/budgets/a2")
        .send()
        .await
        .unwrap();
    problem(r, 404, None).await;

    // Every change is audited: who, what, before and after.
    let (_, log) = body(
        stack
            .api(Method::GET, "/audit?target=eng%20daily")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let items = log["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{log}");
    assert_eq!(items[0]["action"], "budget.update");
    assert_eq!(items[0]["actor"], "token:tester");
    assert_eq!(items[0]["before"]["limit_usd"], "25.50");
    assert_eq!(items[0]["after"]["limit_tokens"], 100000);
    assert_eq!(items[1]["action"], "budget.create");
    assert!(items[1].get("before").is_none());
    let (_, log) = body(
        stack
            .api(Method::GET, "/audit?limit=1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(log["items"][0]["action"], "budget.delete");
    assert_eq!(log["items"][0]["target"], "a2");
    assert_eq!(log["items"][0]["before"]["name"], "a2");
    assert_eq!(log["next_offset"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_groups_and_pickers() {
    let stack = Stack::start_with(
        Backend::Sqlite,
        "[[groups]]\nname = \"research\"\nmembers = [\"rita\"]\n",
    )
    .await;
    let api = |m: Method, p: &str| stack.api(m, p);

    // A scheduled price version: the list shows the one in force, history shows both.
    let r = api(Method::POST, "/prices")
        .json(&json!({"model": "my-model", "input": "1.50", "output": "6", "effective_from": "2030-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    let (code, v) = body(r).await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["cache_read"], "1.50");
    let r = api(Method::POST, "/prices")
        .json(&json!({"model": "my-model", "input": "1", "output": "4", "cache_read": "0.10"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (_, now) = body(
        api(Method::GET, "/prices?model=my-model")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(now["items"].as_array().unwrap().len(), 1);
    assert_eq!(now["items"][0]["input"], "1.00");
    let (_, hist) = body(
        api(Method::GET, "/prices?model=my-model&history=true")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let inputs: Vec<&str> = hist["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["input"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["1.00", "1.50"]);
    for (b, field) in [
        (
            json!({"model": "m", "input": "abc", "output": "1"}),
            "input",
        ),
        (
            json!({"model": "m", "input": "1", "output": "1", "cache_write": "-1"}),
            "cache_write",
        ),
        (
            json!({"model": "m", "input": "1", "output": "1", "effective_from": "tomorrow"}),
            "effective_from",
        ),
        (json!({"model": " ", "input": "1", "output": "1"}), "model"),
    ] {
        let r = api(Method::POST, "/prices").json(&b).send().await.unwrap();
        problem(r, 422, Some(field)).await;
    }
    let (_, log) = body(
        api(Method::GET, "/audit?target=my-model")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(log["items"][0]["after"]["input"], "1.00");
    assert_eq!(log["items"][0]["before"], Value::Null);

    // Groups: stored members can be added and removed; configured ones are read-only here.
    for p in ["alice", "sp:ci-bot"] {
        let r = api(Method::PUT, &format!("/groups/eng/members/{p}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let (_, g) = body(api(Method::GET, "/groups/eng").send().await.unwrap()).await;
    assert_eq!(
        g["members"],
        json!([
            {"principal": "service_principal:ci-bot", "source": "store"},
            {"principal": "user:alice", "source": "store"}
        ])
    );
    let (_, all) = body(api(Method::GET, "/groups").send().await.unwrap()).await;
    let names: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["eng", "research"]);
    let r = api(Method::DELETE, "/groups/research/members/rita")
        .send()
        .await
        .unwrap();
    problem(r, 409, None).await;
    let r = api(Method::PUT, "/groups/eng/members/user:")
        .send()
        .await
        .unwrap();
    problem(r, 422, Some("principal")).await;
    let r = api(Method::DELETE, "/groups/eng/members/alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = api(Method::DELETE, "/groups/eng/members/alice")
        .send()
        .await
        .unwrap();
    problem(r, 404, None).await;
    let r = api(Method::GET, "/groups/nobody").send().await.unwrap();
    problem(r, 404, None).await;
    // Membership changes reach the policy at once.
    let policy = stack.sidecar().ledger.policy();
    assert_eq!(
        policy.groups_of(&tokenbudget::policy::Principal::user("alice")),
        Vec::<String>::new()
    );
    assert_eq!(
        policy.groups_of(&tokenbudget::policy::Principal::from_key(
            "service_principal:ci-bot",
            vec![]
        )),
        ["eng"]
    );

    // Pickers: principals from memberships (stored and configured), models from prices.
    let (_, p) = body(api(Method::GET, "/principals?q=I").send().await.unwrap()).await;
    assert_eq!(p["items"], json!(["service_principal:ci-bot", "user:rita"]));
    let (_, m) = body(api(Method::GET, "/models?q=MY-mod").send().await.unwrap()).await;
    assert_eq!(m["items"], json!(["my-model"]));
}

async fn reports_reflect_traffic(backend: Backend) {
    let stack = Stack::start(backend).await;
    let api = |m: Method, p: &str| stack.api(m, p);
    for (p, g) in [("alice", "eng"), ("bob", "eng")] {
        let r = api(Method::PUT, &format!("/groups/{g}/members/{p}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let r = api(Method::POST, "/budgets")
        .json(&json!({"name": "eng pool", "subject": "group:eng", "limit_tokens": 1000, "window": "day"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = api(Method::POST, "/budgets")
        .json(&json!({"name": "bob each", "subject": "group:eng", "scope": "per_member", "limit_tokens": 400, "window": "total"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let chat = |user: &'static str, model: &str, usage: &str| {
        let body = json!({"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
        stack
            .chat(user, body)
            .header("x-fake-usage", usage.to_string())
            .send()
    };
    // alice: 300 + 200 tokens; bob: 250. Then bob's next request does not fit his 400.
    for (user, model, usage) in [
        ("alice", "gpt-4o", "250,50,0"),
        ("alice", "gpt-4o-mini", "150,50,0"),
        ("bob", "gpt-4o", "200,50,0"),
    ] {
        let r = chat(user, model, usage).await.unwrap();
        assert_eq!(r.status(), 200);
        read_all(r).await;
    }
    stack.events(3).await;
    let r = stack
        .chat(
            "bob",
            json!({"model": "gpt-4o", "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    read_all(r).await;

    // Status: the shared pool holds 750 of 1000; bob's per-member budget is near its limit.
    let (_, b) = body(
        api(Method::GET, "/budgets/eng%20pool")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(b["usage"]["used"], "750", "{b}");
    assert_eq!(b["usage"]["remaining"], "250");
    assert!((b["usage"]["fraction"].as_f64().unwrap() - 0.75).abs() < 1e-9);
    let (_, st) = body(
        api(Method::GET, "/budgets/bob%20each/status")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let rows: Vec<(&str, &str)> = st["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["member"].as_str().unwrap(), r["used"].as_str().unwrap()))
        .collect();
    assert_eq!(rows, [("user:alice", "500"), ("user:bob", "250")]);
    let (_, near) = body(api(Method::GET, "/status").send().await.unwrap()).await;
    let near: Vec<(&str, &str)> = near["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["budget"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(near, [("bob each", "over")], "alice used 500 of 400");
    let (_, over) = body(
        api(Method::GET, "/status?state=over&principal=bob")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(over["items"].as_array().unwrap().len(), 0, "{over}");
    let (_, all_bob) = body(
        api(Method::GET, "/status?state=all&principal=bob")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(all_bob["items"].as_array().unwrap().len(), 2, "{all_bob}");

    // Dry-run check agrees with the deny.
    let (_, ck) = body(
        api(Method::POST, "/check")
            .json(&json!({"principal": "bob", "model": "gpt-4o", "max_output_tokens": 300}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ck["decision"], "deny", "{ck}");
    assert_eq!(ck["binding"], "bob each");
    assert_eq!(ck["groups"], json!(["eng"]));

    // Denies: who, which budget, when.
    let denies = eventually("the deny recorded", Duration::from_secs(5), || async {
        let (_, d) = body(
            api(Method::GET, "/denies?principal=bob")
                .send()
                .await
                .unwrap(),
        )
        .await;
        d["items"].as_array().is_some_and(|a| !a.is_empty())
    });
    denies.await;
    let (_, d) = body(api(Method::GET, "/denies").send().await.unwrap()).await;
    assert_eq!(d["items"][0]["principal"], "user:bob");
    assert_eq!(d["items"][0]["budget"], "bob each");
    assert_eq!(d["items"][0]["limit"], "400");

    // Usage reports from the rollups: totals, per model, per group, weekly buckets.
    let (_, top) = body(api(Method::GET, "/usage/top").send().await.unwrap()).await;
    let top: Vec<(&str, u64)> = top["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["key"].as_str().unwrap(), r["tokens"].as_u64().unwrap()))
        .collect();
    assert_eq!(top, [("user:alice", 500), ("user:bob", 250)]);
    let (_, models) = body(
        api(Method::GET, "/usage/top?by=model&group=eng")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(models["items"][0]["key"], "gpt-4o");
    assert_eq!(models["items"][0]["tokens"], 550);
    assert_eq!(models["items"][0]["requests"], 2);
    let (_, ts) = body(
        api(
            Method::GET,
            "/usage/timeseries?bucket=week&metric=usd&principal=alice",
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    let points = ts["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{ts}");
    let tokens: u64 = points.iter().map(|p| p["tokens"].as_u64().unwrap()).sum();
    assert_eq!(tokens, 500);
    assert!(points.iter().all(|p| p["value"].as_f64().unwrap() > 0.0));
    let (_, none) = body(
        api(Method::GET, "/usage/top?group=nobody")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(none["items"], json!([]));
    for (q, field) in [
        ("since=yesterday", "since"),
        (
            "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
            "since",
        ),
        (
            "since=2000-01-01T00:00:00Z&until=2026-01-01T00:00:00Z",
            "bucket",
        ),
    ] {
        let r = api(Method::GET, &format!("/usage/timeseries?{q}"))
            .send()
            .await
            .unwrap();
        problem(r, 422, Some(field)).await;
    }
    let r = api(Method::GET, "/usage/timeseries?bucket=month")
        .send()
        .await
        .unwrap();
    problem(r, 400, Some("bucket")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reflect_traffic_on_postgres() {
    reports_reflect_traffic(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reflect_traffic_on_sqlite() {
    reports_reflect_traffic(Backend::Sqlite).await;
}
