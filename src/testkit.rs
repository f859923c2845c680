//! Helpers for tests of this crate and of its integration suite: a fresh Postgres database per
//! test. Not used by the binary.

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
