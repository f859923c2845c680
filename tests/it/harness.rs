//! The full stack for one test: real Envoy (subprocess, from the cached venv), tokenbudget in
//! process (the library's `app::start`, so tests can restart it and look at its ledger), the fake
//! model, and a fresh store (Postgres database or SQLite file). Everything binds port 0; readiness
//! is waited on with deadlines, never with fixed sleeps.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use tokenbudget::app::{self, Running};
use tokenbudget::clock::{SharedClock, SystemClock};
use tokenbudget::config::Config;
use tokenbudget::policy::Budget;
use tokenbudget::store::{Store, UsageEvent};
use tokenbudget::testkit::TestDb;

use crate::fake_model::{self, FakeModel};

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The Envoy binary: `TOKENBUDGET_ENVOY`, else the venv `./scripts/test` installs.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TOKENBUDGET_ENVOY") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(".cache/tokenbudget/envoy-1.40.0/bin/envoy");
    assert!(
        p.exists(),
        "Envoy 1.40 not found at {}: run ./scripts/test (it installs it) or set TOKENBUDGET_ENVOY",
        p.display()
    );
    p
}

/// The Python with the test tools (grpcio, …): `TOKENBUDGET_PYTHON`, else the venv
/// `./scripts/test` installs (keyed by the hash of `scripts/requirements-test.txt`).
pub fn python_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TOKENBUDGET_PYTHON") {
        return PathBuf::from(p);
    }
    use sha2::Digest;
    let reqs = std::fs::read(repo_path("scripts/requirements-test.txt")).unwrap();
    let key = &hex::encode(sha2::Sha256::digest(&reqs))[..12];
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(format!(".cache/tokenbudget/pytools-{key}/bin/python"));
    assert!(
        p.exists(),
        "the Python test tools are not at {}: run ./scripts/test (it installs them) or set TOKENBUDGET_PYTHON",
        p.display()
    );
    p
}

/// Waits until `check` is true, polling, or fails the test after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The demo HS256 key from `envoy/demo.yaml`.
const DEMO_KEY: &[u8] = b"tokenbudget-demo-signing-key-change-me";

/// A JWT the demo Envoy config accepts, for `sub` with `groups`.
pub fn jwt(sub: &str, groups: &[&str]) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = b64(br#"{"alg":"HS256","typ":"JWT","kid":"demo"}"#);
    let payload = b64(serde_json::json!({"sub": sub, "groups": groups})
        .to_string()
        .as_bytes());
    let signing_input = format!("{header}.{payload}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(DEMO_KEY).unwrap();
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
}

pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Runs a shipped config with its fixed ports replaced: listener and admin by 0, the upstream
    /// and tokenbudget clusters by the given addresses.
    pub async fn start(config: &str, upstream: SocketAddr, tokenbudget: SocketAddr) -> Envoy {
        Envoy::start_multi(config, upstream, &[tokenbudget]).await
    }

    /// As [`Envoy::start`], with the tokenbudget cluster spread over several replicas (Envoy
    /// balances its ext_proc streams round robin).
    pub async fn start_multi(
        config: &str,
        upstream: SocketAddr,
        tokenbudgets: &[SocketAddr],
    ) -> Envoy {
        let text = std::fs::read_to_string(repo_path(config)).unwrap();
        let text = replace_once(&text, "port_value: 9901 }", "port_value: 0 }");
        let text = replace_once(&text, "port_value: 10000 }", "port_value: 0 }");
        let text = replace_once(
            &text,
            "port_value: 8000 }",
            &format!("port_value: {} }}", upstream.port()),
        );
        let endpoint = "        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 9002 } } }";
        let endpoints: Vec<String> = tokenbudgets
            .iter()
            .map(|a| endpoint.replace("port_value: 9002", &format!("port_value: {}", a.port())))
            .collect();
        let text = replace_once(&text, endpoint, &endpoints.join("\n"));
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, text).unwrap();
        let admin_file = dir.path().join("admin.txt");
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&cfg)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut envoy = Envoy {
            child,
            port: 0,
            admin: "127.0.0.1:0".parse().unwrap(),
            _dir: dir,
        };
        let af = admin_file.clone();
        eventually("Envoy admin address", Duration::from_secs(20), || {
            let ok = std::fs::read_to_string(&af)
                .map(|s| !s.trim().is_empty())
                .unwrap_or(false);
            async move { ok }
        })
        .await;
        envoy.admin = std::fs::read_to_string(&admin_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let client = reqwest::Client::new();
        let admin = envoy.admin;
        eventually("Envoy ready", Duration::from_secs(20), || {
            let c = client.clone();
            async move {
                matches!(c.get(format!("http://{admin}/ready")).send().await, Ok(r) if r.status() == 200)
            }
        })
        .await;
        let listeners: serde_json::Value = client
            .get(format!("http://{admin}/listeners?format=json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        envoy.port =
            listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                .as_u64()
                .unwrap() as u16;
        envoy
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// One Envoy counter from the admin stats.
    pub async fn stat(&self, name: &str) -> u64 {
        let text = reqwest::get(format!("http://{}/stats?filter=^{name}$", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "expected exactly one {from:?} in the Envoy config"
    );
    text.replacen(from, to, 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

enum StoreGuard {
    Pg(#[allow(dead_code)] TestDb),
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
}

pub struct Stack {
    pub envoy: Envoy,
    pub sidecar: Option<Running>,
    pub fake: FakeModel,
    pub store: Store,
    pub client: reqwest::Client,
    config: String,
    grpc_addr: SocketAddr,
    clock: SharedClock,
    _guard: StoreGuard,
    _journal: tempfile::TempDir,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Stack {
    pub async fn start(backend: Backend) -> Stack {
        Stack::start_with(backend, "").await
    }

    /// `extra` is appended to the sidecar's TOML config.
    pub async fn start_with(backend: Backend, extra: &str) -> Stack {
        Stack::start_full(backend, extra, Arc::new(SystemClock)).await
    }

    /// With the sidecar reading time from `clock` (a `ManualClock` drives windows in tests).
    pub async fn start_full(backend: Backend, extra: &str, clock: SharedClock) -> Stack {
        Stack::start_all(backend, "", extra, clock).await
    }

    /// `ledger` lines are set in (or override) the sidecar's `[ledger]` table.
    pub async fn start_ledger(backend: Backend, ledger: &str, extra: &str) -> Stack {
        Stack::start_all(backend, ledger, extra, Arc::new(SystemClock)).await
    }

    async fn start_all(backend: Backend, ledger: &str, extra: &str, clock: SharedClock) -> Stack {
        init_tracing();
        let (store_toml, guard) = match backend {
            Backend::Postgres => {
                let db = TestDb::create()
                    .await
                    .expect("test Postgres (TOKENBUDGET_TEST_DATABASE_URL)");
                (format!("database_url = \"{}\"", db.url), StoreGuard::Pg(db))
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("tokenbudget.db");
                (
                    format!("sqlite_path = \"{}\"", path.display()),
                    StoreGuard::Sqlite(dir),
                )
            }
        };
        let journal = tempfile::tempdir().unwrap();
        let config = sidecar_toml(&store_toml, journal.path(), ledger, extra);
        let sidecar = start_sidecar(&config, &clock).await;
        let grpc_addr = sidecar.grpc_addr;
        let store = sidecar.store.clone();
        let (fake_addr, fake) = fake_model::start().await.unwrap();
        let envoy = Envoy::start("envoy/demo.yaml", fake_addr, grpc_addr).await;
        Stack {
            envoy,
            sidecar: Some(sidecar),
            fake,
            store,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            config,
            grpc_addr,
            clock,
            _guard: guard,
            _journal: journal,
        }
    }

    pub fn sidecar(&self) -> &Running {
        self.sidecar.as_ref().unwrap()
    }

    /// Graceful stop (drain, flush), then a new process on the same port and store.
    pub async fn restart_sidecar(&mut self) {
        if let Some(s) = self.sidecar.take() {
            s.shutdown().await.unwrap();
        }
        let config = self.config.replacen(
            "grpc_listen = \"127.0.0.1:0\"",
            &format!("grpc_listen = \"{}\"", self.grpc_addr),
            1,
        );
        let s = start_sidecar(&config, &self.clock).await;
        self.store = s.store.clone();
        self.sidecar = Some(s);
    }

    /// Creates a budget the way the CLI does (in the store) and waits until the sidecar uses it.
    pub async fn create_budget(&self, b: &Budget) {
        self.store
            .create_budget(
                b,
                &tokenbudget::store::Actor {
                    name: "test".into(),
                    ts_ms: 0,
                },
            )
            .await
            .unwrap();
        let ledger = Arc::clone(&self.sidecar().ledger);
        let name = b.name.clone();
        eventually(
            "budget loaded by the sidecar",
            Duration::from_secs(5),
            || {
                let found = ledger.policy().budgets.iter().any(|x| x.name == name);
                async move { found }
            },
        )
        .await;
    }

    /// A chat-completions request through Envoy as `user`.
    pub fn chat(&self, user: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.chat_as(user, &[], body)
    }

    /// A chat-completions request through Envoy as `user`, whose JWT lists `groups`.
    pub fn chat_as(
        &self,
        user: &str,
        groups: &[&str],
        body: serde_json::Value,
    ) -> reqwest::RequestBuilder {
        self.client
            .post(self.envoy.url("/v1/chat/completions"))
            .bearer_auth(jwt(user, groups))
            .json(&body)
    }

    /// Waits until the store holds `n` usage events, and returns them.
    pub async fn events(&self, n: usize) -> Vec<UsageEvent> {
        let store = self.store.clone();
        eventually(
            &format!("{n} usage events in the store"),
            Duration::from_secs(10),
            || {
                let s = store.clone();
                async move {
                    s.usage_events(None, 10_000)
                        .await
                        .map(|e| e.len() >= n)
                        .unwrap_or(false)
                }
            },
        )
        .await;
        self.store.usage_events(None, 10_000).await.unwrap()
    }
}

/// A sidecar config as the tests run it: ports 0 (in process) unless `extra` sets them, fast
/// flushes and syncs, the journal in `journal`, `ledger` added to `[ledger]`, `extra` appended.
pub fn sidecar_toml(store_toml: &str, journal: &Path, ledger: &str, extra: &str) -> String {
    let journal = format!("\"{}\"", journal.display());
    let defaults = [
        ("flush_interval_ms", "20"),
        ("sync_interval_ms", "100"),
        ("refresh_interval_ms", "100"),
        ("journal_dir", journal.as_str()),
    ];
    let set: Vec<&str> = ledger
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    let mut table = String::new();
    for (k, v) in defaults {
        if !set.contains(&k) {
            table.push_str(&format!("{k} = {v}\n"));
        }
    }
    format!(
        "[server]\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace_seconds = 10\n\
         [store]\n{store_toml}\n\
         [ledger]\n{table}{ledger}\n\
         {extra}\n{}",
        admin_tokens_toml()
    )
}

/// The admin API tokens every test stack accepts.
pub const ADMIN_TOKEN: &str = "tb_test_admin_token_0123456789";
pub const VIEWER_TOKEN: &str = "tb_test_viewer_token_0123456789";

fn admin_tokens_toml() -> String {
    let hash = |t: &str| hex::encode(tokenbudget::admin::auth::sha256(t));
    format!(
        "[[admin.tokens]]\nname = \"tester\"\nrole = \"admin\"\nsha256 = \"{}\"\n\
         [[admin.tokens]]\nname = \"watcher\"\nrole = \"viewer\"\nsha256 = \"{}\"\n",
        hash(ADMIN_TOKEN),
        hash(VIEWER_TOKEN)
    )
}

impl Stack {
    /// The sidecar's admin port URL of `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sidecar().admin_addr)
    }

    /// `GET path` (under `/api/v1`) with the admin token, as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.api(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// An admin API request (`path` under `/api/v1`) with the admin token.
    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.admin_url(&format!("/api/v1{path}")))
            .bearer_auth(ADMIN_TOKEN)
    }
}

pub async fn start_sidecar(config: &str, clock: &SharedClock) -> Running {
    let cfg = Config::parse(config, &|_| None).unwrap();
    app::start(cfg, Arc::clone(clock)).await.unwrap()
}

/// Reads a whole streamed response; returns the body text.
pub async fn read_all(resp: reqwest::Response) -> String {
    resp.text().await.unwrap_or_default()
}
