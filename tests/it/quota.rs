//! The QuotaService over real gRPC: auth, validation, reservations that hold, idempotent commits
//! and LogUsage, expiry, and the Python example client (grpcio) sharing budgets with Envoy.

use std::time::Duration;

use serde_json::{Value, json};
use tokenbudget::quota::pb;
use tokenbudget::quota::pb::quota_service_client::QuotaServiceClient;
use tonic::Code;

use crate::harness::{
    ADMIN_TOKEN, Backend, Stack, VIEWER_TOKEN, eventually, jwt, read_all, repo_path,
};

pub const QUOTA_TOKEN: &str = "tb_test_quota_token_0123456789";

fn quota_toml() -> String {
    format!(
        "[[quota.tokens]]\nname = \"batch-jobs\"\nsha256 = \"{}\"\n",
        hex::encode(tokenbudget::admin::auth::sha256(QUOTA_TOKEN))
    )
}

async fn stack(backend: Backend) -> Stack {
    Stack::start_with(backend, &quota_toml()).await
}

async fn client(s: &Stack) -> QuotaServiceClient<tonic::transport::Channel> {
    QuotaServiceClient::connect(format!("http://{}", s.sidecar().grpc_addr))
        .await
        .unwrap()
}

fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn who(p: &str, groups: &[&str]) -> Option<pb::Principal> {
    Some(pb::Principal {
        principal: p.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    })
}

fn reserve(p: &str, input: u64, output: u64) -> pb::ReserveRequest {
    pb::ReserveRequest {
        principal: who(p, &[]),
        model: "gpt-4o-mini".into(),
        input_tokens: input,
        max_output_tokens: Some(output),
        ttl_seconds: 0,
    }
}

fn check(p: &str, input: u64, output: u64) -> pb::CheckRequest {
    pb::CheckRequest {
        principal: who(p, &[]),
        model: "gpt-4o-mini".into(),
        input_tokens: input,
        max_output_tokens: Some(output),
    }
}

fn usage(input: u64, output: u64) -> Option<pb::Usage> {
    Some(pb::Usage {
        input_tokens: input,
        output_tokens: output,
        ..Default::default()
    })
}

async fn budget(s: &Stack, toml_spec: &str, id: &str) {
    let spec: tokenbudget::policy::BudgetSpec = toml::from_str(toml_spec).unwrap();
    s.create_budget(&spec.to_budget(id).unwrap()).await;
}

fn decision(v: &Option<pb::Verdict>) -> pb::Decision {
    v.as_ref().unwrap().decision()
}

/// What a Check of `input` + `output` tokens for `p` decides now.
async fn checked(
    c: &mut QuotaServiceClient<tonic::transport::Channel>,
    p: &str,
    input: u64,
    output: u64,
) -> pb::Decision {
    let r = c
        .check(authed(QUOTA_TOKEN, check(p, input, output)))
        .await
        .unwrap()
        .into_inner();
    decision(&r.verdict)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_need_a_token_and_viewers_only_read() {
    let s = stack(Backend::Sqlite).await;
    let mut c = client(&s).await;
    let bare = c.check(tonic::Request::new(check("bob", 1, 1))).await;
    assert_eq!(bare.unwrap_err().code(), Code::Unauthenticated);
    let wrong = c.check(authed("tb_not_a_token", check("bob", 1, 1))).await;
    assert_eq!(wrong.unwrap_err().code(), Code::Unauthenticated);
    // Viewers read; they may not hold or charge budget.
    c.check(authed(VIEWER_TOKEN, check("bob", 1, 1)))
        .await
        .unwrap();
    let denied = c.reserve(authed(VIEWER_TOKEN, reserve("bob", 1, 1))).await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    let log = c
        .log_usage(authed(
            VIEWER_TOKEN,
            pb::LogUsageRequest {
                principal: who("bob", &[]),
                model: "gpt-4o-mini".into(),
                request_id: "r".into(),
                usage: usage(1, 1),
            },
        ))
        .await;
    assert_eq!(log.unwrap_err().code(), Code::PermissionDenied);
    // Quota tokens and admin tokens may do everything.
    c.reserve(authed(QUOTA_TOKEN, reserve("bob", 1, 1)))
        .await
        .unwrap();
    c.reserve(authed(ADMIN_TOKEN, reserve("bob", 1, 1)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_name_the_field() {
    let s = stack(Backend::Sqlite).await;
    let mut c = client(&s).await;
    let cases: Vec<(pb::ReserveRequest, &str)> = vec![
        (
            pb::ReserveRequest {
                principal: None,
                ..reserve("x", 1, 1)
            },
            "principal",
        ),
        (
            pb::ReserveRequest {
                model: " ".into(),
                ..reserve("bob", 1, 1)
            },
            "model",
        ),
        (reserve("group:ml", 1, 1), "principal.principal"),
        (reserve("bob", 2_000_000_000, 1), "input_tokens"),
    ];
    for (req, field) in cases {
        let e = c.reserve(authed(QUOTA_TOKEN, req)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let e = c
        .commit(authed(
            QUOTA_TOKEN,
            pb::CommitRequest {
                reservation_id: "rsv_nope".into(),
                request_id: "r1".into(),
                usage: usage(1, 1),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("LogUsage"), "{}", e.message());
    let e = c
        .commit(authed(
            QUOTA_TOKEN,
            pb::CommitRequest {
                reservation_id: "rsv_nope".into(),
                request_id: String::new(),
                usage: None,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

/// Reservations hold budget until committed or released; commits and LogUsage charge once per
/// request id however often they are retried; the store has one row per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_hold_and_commits_charge_once() {
    let s = stack(Backend::Postgres).await;
    budget(
        &s,
        "name='bob total'\nsubject='user:bob'\nlimit_tokens=1000\nwindow='total'",
        "b-bob",
    )
    .await;
    let mut c = client(&s).await;
    let allowed = c
        .reserve(authed(QUOTA_TOKEN, reserve("bob", 400, 400)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decision(&allowed.verdict), pb::Decision::Allow);
    assert!(allowed.reservation_id.starts_with("rsv_"));
    let binding = allowed.verdict.as_ref().unwrap().binding.clone().unwrap();
    assert_eq!(
        (binding.budget.as_str(), binding.reserved, binding.remaining),
        ("bob total", 800, 200)
    );

    // The hold counts: a second request of the same size does not fit while it stands.
    let second = c
        .reserve(authed(QUOTA_TOKEN, reserve("bob", 400, 400)))
        .await
        .unwrap()
        .into_inner();
    let v = second.verdict.unwrap();
    assert_eq!(v.decision(), pb::Decision::Deny);
    assert_eq!(v.reason, "exhausted");
    assert!(v.message.contains("bob total"), "{}", v.message);
    assert!(second.reservation_id.is_empty());
    assert_eq!(v.retry_after_seconds, 0, "a total window never resets");

    // Released, the room is back.
    let released = c
        .release(authed(
            QUOTA_TOKEN,
            pb::ReleaseRequest {
                reservation_id: allowed.reservation_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    let again = c
        .release(authed(
            QUOTA_TOKEN,
            pb::ReleaseRequest {
                reservation_id: allowed.reservation_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.released, "a release is idempotent");
    assert_eq!(checked(&mut c, "bob", 400, 400).await, pb::Decision::Allow);

    // Reserve, commit the actual usage, retry the commit: charged once.
    let r = c
        .reserve(authed(QUOTA_TOKEN, reserve("bob", 400, 400)))
        .await
        .unwrap()
        .into_inner();
    let commit = pb::CommitRequest {
        reservation_id: r.reservation_id.clone(),
        request_id: "job-1".into(),
        usage: usage(120, 80),
    };
    let first = c
        .commit(authed(QUOTA_TOKEN, commit.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(first.charged && first.reservation_found);
    assert!(first.cost_nano_usd > 0, "gpt-4o-mini has a default price");
    let retry = c
        .commit(authed(QUOTA_TOKEN, commit))
        .await
        .unwrap()
        .into_inner();
    assert!(!retry.charged);
    assert_eq!(retry.cost_nano_usd, first.cost_nano_usd);

    // LogUsage: unreserved usage, idempotent by request id.
    let log = pb::LogUsageRequest {
        principal: who("bob", &[]),
        model: "gpt-4o-mini".into(),
        request_id: "job-2".into(),
        usage: usage(30, 20),
    };
    for expect_charged in [true, false] {
        let l = c
            .log_usage(authed(QUOTA_TOKEN, log.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(l.charged, expect_charged);
    }

    let balance = c
        .get_balance(authed(
            VIEWER_TOKEN,
            pb::GetBalanceRequest {
                principal: who("bob", &[]),
                model: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balances.len(), 1);
    let b = &balance.balances[0];
    assert_eq!((b.used, b.reserved, b.remaining), (250, 0, 750));
    assert_eq!((b.unit.as_str(), b.limit), ("tokens", 1000));

    // The store: one row per request id, even though each was sent twice.
    let store = s.store.clone();
    eventually("both debits in the store", Duration::from_secs(10), || {
        let st = store.clone();
        async move { st.usage_events(None, 100).await.unwrap().len() >= 2 }
    })
    .await;
    let mut rows: Vec<(String, u64, String)> = store
        .usage_events(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.request_id.clone(), e.tokens(), e.family))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("job-1".to_string(), 200, "quota".to_string()),
            ("job-2".to_string(), 50, "quota".to_string())
        ]
    );
    // Reserves count as decisions: two allowed, one denied.
    let metrics = s.sidecar().ledger.metrics.encode();
    for (outcome, n) in [("allowed", 2), ("denied", 1)] {
        let line = format!("tokenbudget_decisions_total{{outcome=\"{outcome}\"}} {n}");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    // The refused reservation is a deny event, like Envoy's 429s.
    let denies = store
        .deny_events(&tokenbudget::store::DenyQuery {
            until_ms: i64::MAX,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        denies.iter().any(|d| d.budget_name == "bob total"),
        "{denies:?}"
    );
}

/// A reservation nobody commits gives its hold back after its TTL; a late commit still charges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_reservations_expire_and_late_commits_still_charge() {
    let s = stack(Backend::Sqlite).await;
    budget(
        &s,
        "name='eve total'\nsubject='user:eve'\nlimit_tokens=1000\nwindow='total'",
        "b-eve",
    )
    .await;
    let mut c = client(&s).await;
    let r = c
        .reserve(authed(
            QUOTA_TOKEN,
            pb::ReserveRequest {
                ttl_seconds: 1,
                ..reserve("eve", 500, 400)
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decision(&r.verdict), pb::Decision::Allow);
    assert_eq!(checked(&mut c, "eve", 100, 100).await, pb::Decision::Deny);
    let mut cc = c.clone();
    eventually(
        "the hold lapses after its TTL",
        Duration::from_secs(10),
        || {
            let mut c = cc.clone();
            async move { checked(&mut c, "eve", 100, 100).await == pb::Decision::Allow }
        },
    )
    .await;
    let late = cc
        .commit(authed(
            QUOTA_TOKEN,
            pb::CommitRequest {
                reservation_id: r.reservation_id,
                request_id: "late-1".into(),
                usage: usage(300, 100),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(late.charged);
    assert!(!late.reservation_found);
    let b = cc
        .get_balance(authed(
            QUOTA_TOKEN,
            pb::GetBalanceRequest {
                principal: who("eve", &[]),
                model: "gpt-4o-mini".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.balances[0].used, b.balances[0].reserved), (400, 0));
}

/// The README's Python example (grpcio) reserves, commits (twice) and reads the balance of a
/// group budget that Envoy traffic also spends: both show up in the same budget and the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_shares_budgets_with_envoy_traffic() {
    let python = crate::harness::python_bin();
    let s = stack(Backend::Postgres).await;
    budget(
        &s,
        "name='ml team daily'\nsubject='group:ml'\nlimit_tokens=100000\nwindow='day'",
        "b-ml",
    )
    .await;
    // Envoy traffic first: alice, in group ml by her JWT.
    let r = s
        .client
        .post(s.envoy.url("/v1/chat/completions"))
        .bearer_auth(jwt("alice@example.com", &["ml"]))
        .header("x-fake-usage", "100,50")
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 60, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    read_all(r).await;
    let ledger = std::sync::Arc::clone(&s.sidecar().ledger);
    eventually("Envoy's request settled", Duration::from_secs(10), || {
        let l = std::sync::Arc::clone(&ledger);
        async move {
            l.statuses()
                .iter()
                .any(|(st, _)| st.name == "ml team daily" && st.used == 150)
        }
    })
    .await;

    let grpc = s.sidecar().grpc_addr.to_string();
    let script = repo_path("examples/quota_client.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--target", &grpc, "--principal", "alice@example.com"])
        .args(["--group", "ml", "--model", "gpt-4o-mini"])
        .args(["--input-tokens", "1200", "--max-output-tokens", "300"])
        .args(["--usage", "1180,240", "--request-id", "nightly-batch-7"])
        .env("TOKENBUDGET_QUOTA_TOKEN", QUOTA_TOKEN)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["charged"], true);
    assert_eq!(
        v["retry_charged"], false,
        "a retried commit charges nothing"
    );
    let team = v["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["budget"] == "ml team daily")
        .unwrap_or_else(|| panic!("no team budget in {v}"));
    // Envoy's 150 tokens and the job's 1 420, in one pool.
    assert_eq!(team["used"], 150 + 1420, "{team}");
    assert_eq!(team["reserved"], 0);
    assert_eq!(team["remaining"], 100_000 - 1570);

    // The same budget's status through the admin API, and both requests in the store.
    let store = s.store.clone();
    eventually("both debits in the store", Duration::from_secs(10), || {
        let st = store.clone();
        async move { st.usage_events(None, 100).await.unwrap().len() >= 2 }
    })
    .await;
    let events = store.usage_events(None, 100).await.unwrap();
    assert_eq!(events.len(), 2);
    let job = events
        .iter()
        .find(|e| e.request_id == "nightly-batch-7")
        .unwrap();
    assert_eq!(
        (job.principal.as_str(), job.input, job.output),
        ("user:alice@example.com", 1180, 240)
    );
    let status = s.get_json("/budgets/ml%20team%20daily/status").await;
    assert!(status.to_string().contains("1570"), "{status}");
}
