//! Configuration: a TOML file (`--config` or `TOKENBUDGET_CONFIG`), then `TOKENBUDGET_*`
//! environment overrides, validated into [`Config`] before any port is bound. Every error names
//! the key at fault. Unknown keys are errors (a typo must not silently keep a default).

pub mod reference;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::extproc::ExtProcConfig;
use crate::identity::{IdentityConfig, Source};
use crate::ledger::writer::WriterConfig;
use crate::meter::MeterLimits;
use crate::policy::{Budget, BudgetSpec, ModelAliases, UnpricedModel};
use crate::store::StoreTarget;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        message: message.into(),
    }
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    server: RawServer,
    store: RawStore,
    identity: RawIdentity,
    admission: RawAdmission,
    metering: RawMetering,
    ledger: RawLedger,
    log: RawLog,
    models: RawModels,
    #[serde(skip_serializing)]
    groups: Vec<RawGroup>,
    #[serde(skip_serializing)]
    budgets: Vec<BudgetSpec>,
    admin: RawAdmin,
    quota: RawQuota,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawQuota {
    #[serde(skip_serializing)]
    tokens: Vec<RawQuotaToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotaToken {
    name: String,
    /// Hex SHA-256 of the token.
    sha256: String,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    #[serde(skip_serializing)]
    tokens: Vec<RawToken>,
    /// Origins allowed to call the API from a browser page they serve; none by default.
    cors_origins: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    role: String,
    /// Hex SHA-256 of the token (`tokenbudget token new` prints both).
    sha256: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawModels {
    strip_date_suffix: bool,
    strip_prefixes: Vec<String>,
    aliases: std::collections::HashMap<String, String>,
}

impl Default for RawModels {
    fn default() -> Self {
        RawModels {
            strip_date_suffix: true,
            strip_prefixes: Vec::new(),
            aliases: Default::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    /// Principal keys (`user:alice`, `service_principal:ID`); a bare name is a user.
    members: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    grpc_listen: String,
    admin_listen: String,
    shutdown_grace_seconds: u64,
    grpc_workers: usize,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            grpc_listen: "127.0.0.1:9002".into(),
            admin_listen: "127.0.0.1:9090".into(),
            shutdown_grace_seconds: 30,
            grpc_workers: 1,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    database_url: String,
    sqlite_path: String,
    pool_size: usize,
    migrate_on_start: bool,
    retention_days: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            database_url: String::new(),
            sqlite_path: "tokenbudget.db".into(),
            pool_size: 8,
            migrate_on_start: true,
            retention_days: 90,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawIdentity {
    sources: Vec<String>,
    principal_header: String,
    groups_header: String,
    kind_header: String,
    jwt_namespace: String,
    jwt_payload_key: String,
    jwt_principal_claims: Vec<String>,
    jwt_groups_claim: String,
    jwt_service_principal_claims: Vec<String>,
    anonymous: String,
}

impl Default for RawIdentity {
    fn default() -> Self {
        let d = IdentityConfig::default();
        RawIdentity {
            sources: vec!["header".into(), "jwt".into()],
            principal_header: d.principal_header,
            groups_header: d.groups_header,
            kind_header: d.kind_header,
            jwt_namespace: d.jwt_namespace,
            jwt_payload_key: d.jwt_payload_key,
            jwt_principal_claims: d.jwt_principal_claims,
            jwt_groups_claim: d.jwt_groups_claim,
            jwt_service_principal_claims: d.jwt_service_principal_claims,
            anonymous: String::new(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmission {
    timezone: String,
    default_output_tokens: u64,
    max_output_reservation: u64,
    unpriced_model: String,
    inject_include_usage: bool,
    always_read_body: bool,
    no_state: String,
    max_body_bytes: u64,
    response_headers: String,
}

impl Default for RawAdmission {
    fn default() -> Self {
        let d = ExtProcConfig::default();
        RawAdmission {
            timezone: "UTC".into(),
            default_output_tokens: d.default_output_tokens,
            max_output_reservation: 0,
            unpriced_model: "deny".into(),
            inject_include_usage: d.inject_include_usage,
            always_read_body: d.always_read_body,
            no_state: "deny".into(),
            max_body_bytes: d.max_body_bytes,
            response_headers: "all".into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetering {
    max_event_bytes: usize,
    json_tail_bytes: usize,
}

impl Default for RawMetering {
    fn default() -> Self {
        let d = MeterLimits::default();
        RawMetering {
            max_event_bytes: d.max_event,
            json_tail_bytes: d.json_tail,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawLedger {
    flush_interval_ms: u64,
    batch_max: usize,
    queue_capacity: usize,
    sync_interval_ms: u64,
    refresh_interval_ms: u64,
    journal_dir: String,
    journal_sync_ms: u64,
    durable_settle: bool,
    reservation_ttl_seconds: u64,
    mode: String,
    lease_share_percent: u32,
    lease_ttl_ms: u64,
    lease_wait_ms: u64,
}

impl Default for RawLedger {
    fn default() -> Self {
        RawLedger {
            flush_interval_ms: 100,
            batch_max: 1000,
            queue_capacity: 100_000,
            sync_interval_ms: 500,
            refresh_interval_ms: 1000,
            journal_dir: "tokenbudget-journal".into(),
            journal_sync_ms: 1000,
            durable_settle: false,
            reservation_ttl_seconds: 3600,
            mode: "sync".into(),
            lease_share_percent: 20,
            lease_ttl_ms: 10_000,
            lease_wait_ms: 150,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    /// Threads serving ext_proc: 1 (a current-thread runtime, the cheapest per message) or more.
    pub grpc_workers: usize,
    pub store: StoreTarget,
    pub migrate_on_start: bool,
    pub extproc: ExtProcConfig,
    pub timezone: chrono_tz::Tz,
    pub unpriced: UnpricedModel,
    pub writer: WriterConfig,
    pub queue_capacity: usize,
    /// Where settled debits are journaled before the store; `None` disables the journal.
    pub journal_dir: Option<PathBuf>,
    /// The journal syncs at most this often (group commit).
    pub journal_sync: Duration,
    /// Lease mode (`ledger.mode = "lease"`): strict global limits across replicas.
    pub lease: Option<crate::ledger::lease::LeaseConfig>,
    pub log_level: String,
    pub log_format: LogFormat,
    pub models: ModelAliases,
    /// Group membership from the config file: (group, principal key).
    pub groups: Vec<(String, String)>,
    /// Budgets from the config file, applied at startup by name.
    pub budgets: Vec<Budget>,
    /// Admin API tokens (hashes); none means the API refuses every request.
    pub admin_tokens: Vec<crate::admin::auth::AdminToken>,
    /// Browser origins allowed by CORS; empty means no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// QuotaService callers (hashes); admin tokens are accepted too.
    pub quota_tokens: Vec<crate::admin::auth::AdminToken>,
}

/// Environment overrides, applied after the file.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("TOKENBUDGET_DATABASE_URL", "store.database_url"),
    ("TOKENBUDGET_SQLITE_PATH", "store.sqlite_path"),
    ("TOKENBUDGET_GRPC_LISTEN", "server.grpc_listen"),
    ("TOKENBUDGET_ADMIN_LISTEN", "server.admin_listen"),
    ("TOKENBUDGET_TIMEZONE", "admission.timezone"),
    ("TOKENBUDGET_LOG", "log.level"),
    ("TOKENBUDGET_JOURNAL_DIR", "ledger.journal_dir"),
];

impl Config {
    /// What the ledger needs from the config to build policy snapshots.
    pub fn policy_settings(&self) -> crate::ledger::PolicySettings {
        crate::ledger::PolicySettings {
            tz: self.timezone,
            unpriced: self.unpriced,
            models: self.models.clone(),
            groups: self.groups.clone(),
        }
    }

    /// Reads `path` (if any) and applies overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| err("config", format!("cannot read {}: {e}", p.display())))?,
            None => String::new(),
        };
        Config::parse(&text, env)
    }

    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut raw: Raw = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let key = e
                .span()
                .map(|s| locate(text, s.start))
                .unwrap_or_else(|| "config".into());
            err(&key, msg)
        })?;
        for (var, key) in ENV_OVERRIDES {
            if let Some(v) = env(var) {
                match *key {
                    "store.database_url" => raw.store.database_url = v,
                    "store.sqlite_path" => raw.store.sqlite_path = v,
                    "server.grpc_listen" => raw.server.grpc_listen = v,
                    "server.admin_listen" => raw.server.admin_listen = v,
                    "admission.timezone" => raw.admission.timezone = v,
                    "log.level" => raw.log.level = v,
                    "ledger.journal_dir" => raw.ledger.journal_dir = v,
                    _ => {}
                }
            }
        }
        Config::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Config, ConfigError> {
        let addr = |key: &str, v: &str| -> Result<SocketAddr, ConfigError> {
            v.parse().map_err(|_| {
                err(
                    key,
                    format!("expected host:port like 127.0.0.1:9002, got {v:?}"),
                )
            })
        };
        let store = if raw.store.database_url.trim().is_empty() {
            if raw.store.sqlite_path.trim().is_empty() {
                return Err(err(
                    "store.sqlite_path",
                    "must be set when store.database_url is empty",
                ));
            }
            StoreTarget::Sqlite {
                path: PathBuf::from(raw.store.sqlite_path),
            }
        } else {
            let url = raw.store.database_url.trim().to_owned();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(err(
                    "store.database_url",
                    "expected a postgres:// or postgresql:// URL",
                ));
            }
            if raw.store.pool_size == 0 {
                return Err(err("store.pool_size", "must be at least 1"));
            }
            StoreTarget::Postgres {
                url,
                pool_size: raw.store.pool_size,
            }
        };

        let mut sources = Vec::new();
        for s in &raw.identity.sources {
            sources.push(match s.as_str() {
                "header" => Source::Header,
                "jwt" => Source::Jwt,
                other => {
                    return Err(err(
                        "identity.sources",
                        format!("unknown source {other:?}; allowed: header, jwt"),
                    ));
                }
            });
        }
        if sources.is_empty() && raw.identity.anonymous.is_empty() {
            return Err(err(
                "identity.sources",
                "list at least one source, or set identity.anonymous",
            ));
        }
        let lower = |key: &str, v: String| -> Result<String, ConfigError> {
            if v.is_empty()
                || v.bytes()
                    .any(|b| b.is_ascii_uppercase() || b.is_ascii_whitespace())
            {
                return Err(err(key, "header names must be non-empty lower-case"));
            }
            Ok(v)
        };
        let i = raw.identity;
        let identity = IdentityConfig {
            sources,
            principal_header: lower("identity.principal_header", i.principal_header)?,
            groups_header: lower("identity.groups_header", i.groups_header)?,
            kind_header: lower("identity.kind_header", i.kind_header)?,
            jwt_namespace: i.jwt_namespace,
            jwt_payload_key: i.jwt_payload_key,
            jwt_principal_claims: i.jwt_principal_claims,
            jwt_groups_claim: i.jwt_groups_claim,
            jwt_service_principal_claims: i.jwt_service_principal_claims,
            anonymous: (!i.anonymous.is_empty()).then_some(i.anonymous),
        };

        let a = raw.admission;
        let timezone: chrono_tz::Tz = a.timezone.parse().map_err(|_| {
            err(
                "admission.timezone",
                format!(
                    "unknown time zone {:?}; use an IANA name like Europe/Paris",
                    a.timezone
                ),
            )
        })?;
        let unpriced = match a.unpriced_model.as_str() {
            "deny" => UnpricedModel::Deny,
            "allow" => UnpricedModel::Allow,
            other => {
                return Err(err(
                    "admission.unpriced_model",
                    format!("expected deny or allow, got {other:?}"),
                ));
            }
        };
        let no_state = match a.no_state.as_str() {
            "deny" => crate::extproc::NoState::Deny,
            "allow" => crate::extproc::NoState::Allow,
            other => {
                return Err(err(
                    "admission.no_state",
                    format!("expected deny or allow, got {other:?}"),
                ));
            }
        };
        let budget_headers = match a.response_headers.as_str() {
            "all" => crate::extproc::reply::BudgetHeaders::All,
            "tokenbudget" => crate::extproc::reply::BudgetHeaders::Tokenbudget,
            "ratelimit" => crate::extproc::reply::BudgetHeaders::Ratelimit,
            "none" => crate::extproc::reply::BudgetHeaders::None,
            other => {
                return Err(err(
                    "admission.response_headers",
                    format!("expected all, tokenbudget, ratelimit or none, got {other:?}"),
                ));
            }
        };
        if a.max_body_bytes < 1024 {
            return Err(err("admission.max_body_bytes", "must be at least 1024"));
        }
        if raw.metering.max_event_bytes < 1024 {
            return Err(err("metering.max_event_bytes", "must be at least 1024"));
        }
        if raw.metering.json_tail_bytes < 1024 {
            return Err(err("metering.json_tail_bytes", "must be at least 1024"));
        }
        let l = raw.ledger;
        if l.batch_max == 0 {
            return Err(err("ledger.batch_max", "must be at least 1"));
        }
        for (key, v) in [
            ("ledger.flush_interval_ms", l.flush_interval_ms),
            ("ledger.sync_interval_ms", l.sync_interval_ms),
            ("ledger.refresh_interval_ms", l.refresh_interval_ms),
            ("ledger.reservation_ttl_seconds", l.reservation_ttl_seconds),
        ] {
            if v == 0 {
                return Err(err(key, "must be at least 1"));
            }
        }
        if l.journal_sync_ms > 60_000 {
            return Err(err("ledger.journal_sync_ms", "must be at most 60000"));
        }
        if raw.server.grpc_workers == 0 || raw.server.grpc_workers > 256 {
            return Err(err("server.grpc_workers", "must be 1 to 256"));
        }
        let lease = match l.mode.as_str() {
            "sync" => None,
            "lease" => {
                if l.lease_share_percent > 100 {
                    return Err(err("ledger.lease_share_percent", "must be 0 to 100"));
                }
                if l.lease_ttl_ms < 1000 {
                    return Err(err("ledger.lease_ttl_ms", "must be at least 1000"));
                }
                // Keep it below Envoy's ext_proc `message_timeout` (250 ms in our configs):
                // a wait Envoy does not sit out ends in its `status_on_error` instead.
                if l.lease_wait_ms == 0 || l.lease_wait_ms > 10_000 {
                    return Err(err(
                        "ledger.lease_wait_ms",
                        "must be 1 to 10000 (and below Envoy's message_timeout)",
                    ));
                }
                Some(crate::ledger::lease::LeaseConfig {
                    share_permille: l.lease_share_percent * 10,
                    ttl: Duration::from_millis(l.lease_ttl_ms),
                    wait: Duration::from_millis(l.lease_wait_ms),
                })
            }
            other => {
                return Err(err(
                    "ledger.mode",
                    format!("expected sync or lease, got {other:?}"),
                ));
            }
        };
        let log_format = match raw.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "log.format",
                    format!("expected text or json, got {other:?}"),
                ));
            }
        };
        let mut groups = Vec::new();
        for (i, g) in raw.groups.iter().enumerate() {
            if g.name.trim().is_empty() {
                return Err(ConfigError {
                    key: format!("groups[{i}].name"),
                    message: "must not be empty".into(),
                });
            }
            for m in &g.members {
                let key = crate::policy::principal_key(m).map_err(|message| ConfigError {
                    key: format!("groups[{i}].members"),
                    message,
                })?;
                groups.push((g.name.clone(), key));
            }
        }
        let mut budgets = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, spec) in raw.budgets.iter().enumerate() {
            let b = spec
                .to_budget(&uuid::Uuid::now_v7().to_string())
                .map_err(|e| ConfigError {
                    key: format!("budgets[{i}].{}", e.field),
                    message: e.message,
                })?;
            if !names.insert(b.name.clone()) {
                return Err(ConfigError {
                    key: format!("budgets[{i}].name"),
                    message: format!("duplicate budget name {:?}", b.name),
                });
            }
            budgets.push(b);
        }
        let admin_tokens = parse_tokens(
            "admin.tokens",
            raw.admin
                .tokens
                .iter()
                .map(|t| (t.name.as_str(), Some(t.role.as_str()), t.sha256.as_str())),
        )?;
        // QuotaService tokens may make every call: recorded with the admin role.
        let quota_tokens = parse_tokens(
            "quota.tokens",
            raw.quota
                .tokens
                .iter()
                .map(|t| (t.name.as_str(), None, t.sha256.as_str())),
        )?;
        for (i, o) in raw.admin.cors_origins.iter().enumerate() {
            if o == "*" || !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(err(
                    &format!("admin.cors_origins[{i}]"),
                    format!("expected an origin like https://admin.example.com, got {o:?}"),
                ));
            }
        }
        let models = ModelAliases {
            aliases: raw.models.aliases,
            strip_prefixes: raw.models.strip_prefixes,
            strip_date_suffix: raw.models.strip_date_suffix,
        };
        Ok(Config {
            models,
            groups,
            budgets,
            admin_tokens,
            quota_tokens,
            cors_origins: raw.admin.cors_origins,
            grpc_listen: addr("server.grpc_listen", &raw.server.grpc_listen)?,
            admin_listen: addr("server.admin_listen", &raw.server.admin_listen)?,
            shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_seconds),
            grpc_workers: raw.server.grpc_workers,
            store,
            migrate_on_start: raw.store.migrate_on_start,
            extproc: ExtProcConfig {
                identity,
                default_output_tokens: a.default_output_tokens,
                max_output_reservation: (a.max_output_reservation > 0)
                    .then_some(a.max_output_reservation),
                inject_include_usage: a.inject_include_usage,
                always_read_body: a.always_read_body,
                meter: MeterLimits {
                    max_event: raw.metering.max_event_bytes,
                    json_tail: raw.metering.json_tail_bytes,
                },
                reservation_ttl: Duration::from_secs(l.reservation_ttl_seconds),
                durable_settle: l.durable_settle,
                no_state,
                max_body_bytes: a.max_body_bytes,
                budget_headers,
            },
            timezone,
            unpriced,
            writer: WriterConfig {
                flush_interval: Duration::from_millis(l.flush_interval_ms),
                batch_max: l.batch_max,
                sync_interval: Duration::from_millis(l.sync_interval_ms),
                refresh_interval: Duration::from_millis(l.refresh_interval_ms),
                retention: (raw.store.retention_days > 0)
                    .then(|| Duration::from_secs(raw.store.retention_days.saturating_mul(86_400))),
                // With a journal, what the store cannot take at shutdown is already on disk and
                // replayed at the next start: no need to hold the exit for long.
                drain_deadline: if l.journal_dir.trim().is_empty() {
                    Duration::from_secs(raw.server.shutdown_grace_seconds.max(1))
                } else {
                    Duration::from_secs(raw.server.shutdown_grace_seconds.clamp(1, 3))
                },
            },
            queue_capacity: l.queue_capacity,
            lease,
            journal_sync: Duration::from_millis(l.journal_sync_ms),
            journal_dir: (!l.journal_dir.trim().is_empty())
                .then(|| PathBuf::from(l.journal_dir.trim())),
            log_level: raw.log.level,
            log_format,
        })
    }
}

/// The dotted key path of the TOML table/key around byte `offset`, for error messages.
fn locate(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let table = before
        .lines()
        .rev()
        .find_map(|l| {
            let t = l.trim();
            (t.starts_with('[') && t.ends_with(']'))
                .then(|| t.trim_matches(['[', ']']).trim().to_owned())
        })
        .unwrap_or_default();
    let line = text[offset.min(text.len())..].lines().next().unwrap_or("");
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let full_line = text[line_start..].lines().next().unwrap_or(line);
    let key = full_line.split('=').next().unwrap_or("").trim();
    match (table.is_empty(), key.is_empty() || key.starts_with('[')) {
        (true, true) => "config".into(),
        (true, false) => key.into(),
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

/// Bearer tokens of one table (`admin.tokens`, `quota.tokens`): (name, role, hex SHA-256); a
/// table without roles gives every token the admin role.
fn parse_tokens<'a>(
    table: &str,
    entries: impl Iterator<Item = (&'a str, Option<&'a str>, &'a str)>,
) -> Result<Vec<crate::admin::auth::AdminToken>, ConfigError> {
    use crate::admin::auth::{AdminToken, Role, parse_digest};
    let mut tokens: Vec<AdminToken> = Vec::new();
    for (i, (name, role, sha256)) in entries.enumerate() {
        let key = |field: &str| format!("{table}[{i}].{field}");
        let name = name.trim();
        if name.is_empty() {
            return Err(err(&key("name"), "must not be empty"));
        }
        if tokens.iter().any(|x| x.name == name) {
            return Err(err(&key("name"), format!("duplicate token name {name:?}")));
        }
        let role = match role {
            None => Role::Admin,
            Some(r) => Role::parse(r)
                .ok_or_else(|| err(&key("role"), format!("expected admin or viewer, got {r:?}")))?,
        };
        let sha256 = parse_digest(sha256).ok_or_else(|| {
            err(
                &key("sha256"),
                "expected 64 hex digits (the SHA-256 of the token; see `tokenbudget token new`)",
            )
        })?;
        tokens.push(AdminToken {
            name: name.to_string(),
            role,
            sha256,
        });
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn check_error(text: &str, key: &str, contains: &str) {
        let e = Config::parse(text, &no_env).expect_err(text);
        assert_eq!(e.key, key, "{e}");
        assert!(e.message.contains(contains), "{e}");
    }

    #[test]
    fn defaults_are_safe() {
        let c = Config::parse("", &no_env).unwrap();
        assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:9002");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(
            c.store,
            StoreTarget::Sqlite {
                path: "tokenbudget.db".into()
            }
        );
        assert_eq!(c.unpriced, UnpricedModel::Deny);
        assert!(c.extproc.identity.anonymous.is_none());
    }

    #[test]
    fn env_overrides_the_file() {
        let env = |k: &str| {
            (k == "TOKENBUDGET_DATABASE_URL").then(|| "postgres://u@db:5432/tb".to_string())
        };
        let c = Config::parse("[store]\nsqlite_path = \"x.db\"\n", &env).unwrap();
        assert_eq!(
            c.store,
            StoreTarget::Postgres {
                url: "postgres://u@db:5432/tb".into(),
                pool_size: 8
            }
        );
    }

    #[test]
    fn errors_name_the_offending_key() {
        check_error(
            "[server]\ngrpc_listen = \"nope\"\n",
            "server.grpc_listen",
            "host:port",
        );
        check_error(
            "[admission]\ntimezone = \"Mars/Base\"\n",
            "admission.timezone",
            "Mars/Base",
        );
        check_error(
            "[admission]\nunpriced_model = \"free\"\n",
            "admission.unpriced_model",
            "deny or allow",
        );
        check_error(
            "[identity]\nsources = [\"cookie\"]\n",
            "identity.sources",
            "cookie",
        );
        check_error(
            "[store]\ndatabase_url = \"mysql://x\"\n",
            "store.database_url",
            "postgres",
        );
        check_error(
            "[ledger]\nbatch_max = 0\n",
            "ledger.batch_max",
            "at least 1",
        );
        check_error(
            "[server]\ngrpc_port = 1\n",
            "server.grpc_port",
            "unknown field",
        );
        check_error(
            "[admission]\ndefault_output_tokens = \"many\"\n",
            "admission.default_output_tokens",
            "invalid type",
        );
        check_error("[log]\nformat = \"xml\"\n", "log.format", "text or json");
    }
}
