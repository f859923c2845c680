//! The binary's commands, run as a user would: exit codes and messages.

use std::process::Command;

fn tokenbudget(args: &[&str], config: &str, dir: &std::path::Path) -> (i32, String, String) {
    let cfg = dir.join("tb.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenbudget"))
        .args(args)
        .env("TOKENBUDGET_CONFIG", &cfg)
        .env_remove("TOKENBUDGET_DATABASE_URL")
        .env("TOKENBUDGET_SQLITE_PATH", dir.join("tb.db"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_names_the_offending_key_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = tokenbudget(
        &["config", "check"],
        "[admission]\ntimezone = \"Mars/Base\"\n",
        dir.path(),
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("admission.timezone") && err.contains("Mars/Base"),
        "{err}"
    );

    let (code, _, err) = tokenbudget(
        &["config", "check"],
        "[server]\ngrpc_lisen = \"x\"\n",
        dir.path(),
    );
    assert_eq!(code, 64);
    assert!(
        err.contains("server.grpc_lisen") && err.contains("unknown field"),
        "{err}"
    );

    let (code, out, _) = tokenbudget(&["config", "check"], "", dir.path());
    assert_eq!(code, 0);
    assert!(
        out.contains("configuration is valid") && out.contains("127.0.0.1:9002"),
        "{out}"
    );
}

#[test]
fn budgets_are_created_listed_and_deleted_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| tokenbudget(args, "", dir.path());
    let (code, out, err) = run(&[
        "budgets",
        "create",
        "--name",
        "ml pool",
        "--subject",
        "group:ml",
        "--limit-usd",
        "12.50",
        "--window",
        "month",
        "--models",
        "gpt-4o,gpt-4o-mini",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created budget \"ml pool\""));

    let (code, out, _) = run(&["budgets", "list", "--json"]);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["name"], "ml pool");
    assert_eq!(list[0]["limit"]["usd"], "12.50");
    assert_eq!(
        list[0]["models"],
        serde_json::json!(["gpt-4o", "gpt-4o-mini"])
    );

    let (code, _, err) = run(&[
        "budgets",
        "create",
        "--name",
        "ml pool",
        "--subject",
        "user:a",
        "--limit-tokens",
        "5",
        "--window",
        "day",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = run(&[
        "budgets",
        "create",
        "--name",
        "x",
        "--subject",
        "team:a",
        "--limit-tokens",
        "5",
        "--window",
        "day",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--subject") && err.contains("team"), "{err}");
    let (code, _, err) = run(&[
        "budgets",
        "create",
        "--name",
        "x",
        "--subject",
        "user:a",
        "--scope",
        "per_member",
        "--limit-tokens",
        "5",
        "--window",
        "day",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("per_member"), "{err}");
    let (code, _, err) = run(&[
        "budgets",
        "create",
        "--name",
        "x",
        "--subject",
        "user:a",
        "--limit-usd",
        "1.2345678901",
        "--window",
        "day",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--limit-usd"), "{err}");

    let (code, _, _) = run(&["budgets", "delete", "ml pool"]);
    assert_eq!(code, 0);
    let (code, _, err) = run(&["budgets", "delete", "ml pool"]);
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn check_explains_a_decision_for_a_principal_in_three_groups() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let (code, out, err) = tokenbudget(args, "", dir.path());
        assert_eq!(code, 0, "{args:?}: {err}");
        out
    };
    run(&[
        "budgets",
        "create",
        "--name",
        "alice daily",
        "--subject",
        "user:alice",
        "--limit-tokens",
        "5000",
        "--window",
        "day",
    ]);
    run(&[
        "budgets",
        "create",
        "--name",
        "ml pool",
        "--subject",
        "group:ml",
        "--limit-usd",
        "10",
        "--window",
        "month",
        "--models",
        "gpt-4o,gpt-4o-mini",
    ]);
    run(&[
        "budgets",
        "create",
        "--name",
        "eng each",
        "--subject",
        "group:eng",
        "--scope",
        "per_member",
        "--limit-tokens",
        "900",
        "--window",
        "day",
        "--every",
        "7",
        "--kind",
        "rolling",
    ]);
    run(&[
        "budgets",
        "create",
        "--name",
        "everyone watch",
        "--subject",
        "everyone",
        "--limit-tokens",
        "500",
        "--window",
        "hour",
        "--shadow",
    ]);
    run(&[
        "budgets",
        "create",
        "--name",
        "ops claude",
        "--subject",
        "group:ops",
        "--limit-tokens",
        "10",
        "--window",
        "day",
        "--models",
        "claude-sonnet-4-5",
    ]);
    run(&["groups", "add", "eng", "alice"]);

    let out = run(&[
        "check",
        "--principal",
        "alice",
        "--group",
        "ml",
        "--group",
        "ops",
        "--model",
        "gpt-4o-2024-08-06",
        "--input-tokens",
        "200",
        "--max-tokens",
        "800",
    ]);
    assert!(
        out.contains("groups: ml, ops, eng"),
        "identity groups plus stored membership:\n{out}"
    );
    assert!(out.contains("(as gpt-4o)"), "{out}");
    assert!(out.contains("4 matching budget(s)"), "{out}");
    assert!(
        !out.contains("ops claude"),
        "a budget on another model does not match:\n{out}"
    );
    assert!(
        out.contains("* eng each") && out.contains("would deny: never_fits"),
        "the binding budget is marked:\n{out}"
    );
    assert!(
        out.contains("decision   DENY — budget \"eng each\": never_fits (429 status)"),
        "{out}"
    );

    let json: serde_json::Value = serde_json::from_str(&run(&[
        "check",
        "--principal",
        "alice",
        "--group",
        "ml",
        "--group",
        "ops",
        "--model",
        "gpt-4o",
        "--input-tokens",
        "100",
        "--max-tokens",
        "100",
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["decision"], "allow");
    assert_eq!(json["budgets"].as_array().unwrap().len(), 4);
    assert_eq!(
        json["binding"], "eng each",
        "least headroom left: 700 of 900"
    );
    let watch = json["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["budget"] == "everyone watch")
        .unwrap();
    assert_eq!(watch["verdict"], "fits");
    assert_eq!(json["estimate"]["usd"], "0.00125");
}

#[test]
fn prices_groups_updates_and_status_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let (code, out, err) = tokenbudget(args, "", dir.path());
        assert_eq!(code, 0, "{args:?}: {err}");
        out
    };
    // Prices: set with history, export, re-import into a fresh store, identical.
    run(&[
        "prices",
        "set",
        "house-model",
        "--input",
        "1.00",
        "--output",
        "2.00",
        "--effective-from",
        "2026-01-01T00:00:00Z",
    ]);
    run(&[
        "prices",
        "set",
        "house-model",
        "--input",
        "0.50",
        "--output",
        "1.50",
        "--cache-read",
        "0.05",
        "--effective-from",
        "2026-06-01T00:00:00Z",
    ]);
    let hist: serde_json::Value = serde_json::from_str(&run(&[
        "prices",
        "list",
        "--model",
        "house-model",
        "--history",
        "--json",
    ]))
    .unwrap();
    assert_eq!(hist["price"].as_array().unwrap().len(), 2);
    let now: serde_json::Value = serde_json::from_str(&run(&[
        "prices",
        "list",
        "--model",
        "house-model",
        "--json",
    ]))
    .unwrap();
    assert_eq!(now["price"][0]["input"], "0.50");
    let exported = run(&["prices", "export", "--format", "json"]);
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("p.json"), &exported).unwrap();
    let (code, out, err) = tokenbudget(
        &[
            "prices",
            "import",
            other.path().join("p.json").to_str().unwrap(),
        ],
        "",
        other.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("imported"));
    let (_, again, _) = tokenbudget(&["prices", "export", "--format", "json"], "", other.path());
    assert_eq!(again, exported);
    std::fs::write(
        dir.path().join("bad.toml"),
        "[[price]]\nmodel = 'x'\ninput = '1e3'\noutput = '1'\n",
    )
    .unwrap();
    let (code, _, err) = tokenbudget(
        &[
            "prices",
            "import",
            dir.path().join("bad.toml").to_str().unwrap(),
        ],
        "",
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("1e3"), "{err}");

    // Groups.
    run(&["groups", "add", "ml", "alice", "service_principal:app-7"]);
    let members: serde_json::Value =
        serde_json::from_str(&run(&["groups", "list", "ml", "--json"])).unwrap();
    assert_eq!(members.as_array().unwrap().len(), 2);
    run(&["groups", "remove", "ml", "alice"]);
    let (code, _, err) = tokenbudget(&["groups", "remove", "ml", "alice"], "", dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = tokenbudget(&["groups", "add", "ml", "robot:x"], "", dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("robot:x"), "{err}");

    // Update keeps the id; status shows the pool.
    run(&[
        "budgets",
        "create",
        "--name",
        "b1",
        "--subject",
        "everyone",
        "--limit-tokens",
        "100",
        "--window",
        "day",
    ]);
    let before: serde_json::Value =
        serde_json::from_str(&run(&["budgets", "show", "b1", "--json"])).unwrap();
    run(&[
        "budgets",
        "update",
        "b1",
        "--limit-usd",
        "2.50",
        "--window",
        "week",
        "--rename",
        "b2",
    ]);
    let after: serde_json::Value =
        serde_json::from_str(&run(&["budgets", "show", "b2", "--json"])).unwrap();
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["limit"]["usd"], "2.50");
    assert_eq!(after["window"]["unit"], "week");
    let (code, _, err) = tokenbudget(
        &[
            "budgets",
            "update",
            "b2",
            "--scope",
            "per_member",
            "--subject",
            "user:x",
        ],
        "",
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("--scope"), "{err}");
    let status: serde_json::Value =
        serde_json::from_str(&run(&["budgets", "status", "b2", "--json"])).unwrap();
    assert_eq!(status[0]["remaining"], "2.50");
    assert_eq!(status[0]["member"], serde_json::Value::Null);
}
