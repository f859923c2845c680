//! Helpers for tests of this crate and of its integration suite: a fresh Postgres database per
//! test, and the provider fixtures. Not used by the binary.

use std::str::FromStr;

/// The Postgres server tests use: `TOKENBUDGET_TEST_DATABASE_URL`, by default the local one.
/// Tests fail (never skip) when it cannot be reached.
pub fn postgres_admin_url() -> String {
    std::env::var("TOKENBUDGET_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database created for one test and dropped when the value is dropped.
pub struct TestDb {
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDb {
    pub async fn create() -> Result<TestDb, String> {
        let admin_url = postgres_admin_url();
        let name = format!("tb_test_{}", uuid::Uuid::now_v7().simple());
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot reach test Postgres at {admin_url}: {e}"))?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| e.to_string())?;
        let mut cfg = tokio_postgres::Config::from_str(&admin_url).map_err(|e| e.to_string())?;
        cfg.dbname(&name);
        let url = pg_url(&cfg, &name);
        Ok(TestDb {
            url,
            name,
            admin_url,
        })
    }
}

fn pg_url(cfg: &tokio_postgres::Config, db: &str) -> String {
    let user = cfg.get_user().unwrap_or("postgres");
    let (host, port) = match (cfg.get_hosts().first(), cfg.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(h)), Some(p)) => (h.clone(), *p),
        _ => ("127.0.0.1".to_string(), 5432),
    };
    format!("postgres://{user}@{host}:{port}/{db}")
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        // Dropping runs outside any runtime the test may be shutting down.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// The provider response fixtures in `tests/fixtures/` (see its README).
#[allow(clippy::panic)] // test support: a broken fixture must fail loudly
pub mod fixtures {
    use std::path::PathBuf;

    use serde::Deserialize;

    use crate::meter::Usage;

    #[derive(Deserialize)]
    pub struct Fixture {
        /// The request path and body that produce the response.
        pub path: String,
        pub request: String,
        pub content_type: String,
        pub api: String,
        #[serde(default)]
        pub upstream_error: bool,
        pub usage: ExpectedUsage,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct ExpectedUsage {
        pub input: u64,
        pub cache_read: u64,
        pub cache_write: u64,
        pub cache_write_1h: u64,
        pub output: u64,
        pub reasoning: u64,
    }

    impl ExpectedUsage {
        pub fn usage(&self) -> Usage {
            Usage {
                input: self.input,
                cache_read: self.cache_read,
                cache_write: self.cache_write,
                cache_write_1h: self.cache_write_1h,
                output: self.output,
                reasoning: self.reasoning,
            }
        }
    }

    pub fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// Every fixture: (name, description, body).
    pub fn all() -> Vec<(String, Fixture, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir()).unwrap_or_else(|e| panic!("fixture: {e}")) {
            let path = entry.unwrap_or_else(|e| panic!("fixture: {e}")).path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path
                    .file_stem()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let fixture: Fixture = toml::from_str(
                    &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture: {e}")),
                )
                .unwrap_or_else(|e| panic!("fixture: {e}"));
                let body = std::fs::read(path.with_extension("body"))
                    .unwrap_or_else(|e| panic!("fixture: {e}"));
                out.push((name, fixture, body));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Envoy's header map of `pairs` (values as `raw_value`, as Envoy sends them).
pub fn header_map(pairs: &[(&str, &str)]) -> envoy_types::pb::envoy::config::core::v3::HeaderMap {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    HeaderMap {
        headers: pairs
            .iter()
            .map(|(k, v)| HeaderValue {
                key: (*k).to_string(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect(),
    }
}

/// A ledger holding `rows` as its policy and ready to admit, without a store (benches and
/// in-process tests of the request path).
pub fn ready_ledger(
    rows: crate::store::PolicyRows,
    clock: crate::clock::SharedClock,
) -> std::sync::Arc<crate::ledger::Ledger> {
    let ledger = crate::ledger::Ledger::new(
        crate::ledger::PolicySettings {
            tz: chrono_tz::UTC,
            unpriced: crate::policy::UnpricedModel::Allow,
            models: crate::policy::ModelAliases::standard(),
            groups: Vec::new(),
        },
        clock,
        1 << 20,
        std::sync::Arc::default(),
    );
    ledger.install_policy(rows);
    ledger.set_ready();
    ledger
}

/// Takes every queued record off `ledger` as if the store had written them; returns how many.
pub fn drain_ledger(ledger: &crate::ledger::Ledger) -> usize {
    let taken = ledger.take_batch(usize::MAX);
    ledger.mark_flushed(&taken);
    taken.batch.len()
}
