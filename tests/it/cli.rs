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
