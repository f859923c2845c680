//! The configuration reference in the README, generated from the config types: every key's
//! default comes from serializing the parsed defaults, and a test holds the key list to the
//! types and the README to [`markdown`] — so the reference cannot drift from the code.
//! `tokenbudget config reference` prints it.

use super::{ENV_OVERRIDES, Raw};

/// One documented key.
pub struct Key {
    pub key: &'static str,
    pub meaning: &'static str,
}

/// Every scalar, list and map key of the file, in the order the README shows them.
pub const KEYS: &[Key] = &[
    k(
        "server.grpc_listen",
        "ext_proc, the QuotaService and gRPC health (`envoy.service.ext_proc.v3.ExternalProcessor`)",
    ),
    k(
        "server.admin_listen",
        "`/healthz`, `/readyz`, `/metrics`, the admin API `/api/v1` and the web UI `/`",
    ),
    k(
        "server.shutdown_grace_seconds",
        "on SIGTERM: how long open streams may finish before the final flush",
    ),
    k(
        "server.grpc_workers",
        "threads serving gRPC: `1` is a current-thread runtime (the cheapest per message, measured); raise it when one core cannot keep up with Envoy's workers",
    ),
    k(
        "store.database_url",
        "`postgres://…`; empty = embedded SQLite",
    ),
    k("store.sqlite_path", "the SQLite file"),
    k("store.pool_size", "Postgres connections"),
    k("store.migrate_on_start", "run migrations at `serve` start"),
    k(
        "store.retention_days",
        "usage and deny events older than this are deleted (hourly rollups, counters and names seen are kept); `0` keeps them forever",
    ),
    k(
        "identity.sources",
        "identity sources, tried in order: `header` (trusted headers, which the shipped Envoy configs strip from clients) and `jwt` (the `jwt_authn` payload)",
    ),
    k(
        "identity.principal_header",
        "trusted header naming the principal",
    ),
    k(
        "identity.groups_header",
        "trusted header listing its groups (comma-separated)",
    ),
    k(
        "identity.kind_header",
        "trusted header whose value `service_principal` marks a service principal",
    ),
    k(
        "identity.jwt_namespace",
        "dynamic-metadata namespace `jwt_authn` writes",
    ),
    k(
        "identity.jwt_payload_key",
        "the key of the payload in it (`payload_in_metadata`; Istio uses the issuer)",
    ),
    k(
        "identity.jwt_principal_claims",
        "claims tried in order for the principal",
    ),
    k(
        "identity.jwt_groups_claim",
        "claim holding the groups (a list or a comma-separated string)",
    ),
    k(
        "identity.jwt_service_principal_claims",
        "JWT claims (e.g. `client_id`) that, when present, make the caller a service principal with that id",
    ),
    k(
        "identity.anonymous",
        "principal for callers without identity (empty: 401)",
    ),
    k("admission.timezone", "IANA zone for calendar windows"),
    k(
        "admission.default_output_tokens",
        "reserved when a request sets no output bound",
    ),
    k(
        "admission.max_output_reservation",
        "cap on the output part of a reservation (`0`: none)",
    ),
    k(
        "admission.unpriced_model",
        "`deny` or `allow` a model without a price under a USD budget",
    ),
    k(
        "admission.inject_include_usage",
        "add `stream_options.include_usage` to streamed OpenAI chat requests",
    ),
    k(
        "admission.always_read_body",
        "buffer the body even when the model is known (better prompt estimates)",
    ),
    k(
        "admission.no_state",
        "a request whose budgets have no known state — the store has not answered since start and there is no local snapshot; in lease mode, no lease while the store is down: `deny` (503, `retry-after: 1`; QuotaService: UNAVAILABLE) or `allow`",
    ),
    k(
        "admission.max_body_bytes",
        "request bodies declared larger are not buffered: the request is decided from its headers (prompt estimated from `content-length`)",
    ),
    k(
        "admission.response_headers",
        "budget headers on allowed responses: `all`, `tokenbudget` (`x-tokenbudget-*` only), `ratelimit` (IETF only) or `none`. With `all` the response-headers reply outgrows HTTP/2's 256-byte write-combining threshold, which costs one more socket write per request (BENCHMARKS.md)",
    ),
    k("metering.max_event_bytes", "largest SSE event kept whole"),
    k(
        "metering.json_tail_bytes",
        "tail of a JSON body kept to find its `usage`",
    ),
    k(
        "ledger.flush_interval_ms",
        "batching window of the store writer (bounds debit visibility)",
    ),
    k("ledger.batch_max", "records per store transaction"),
    k(
        "ledger.queue_capacity",
        "soft cap of queued debits (never dropped; overflow is counted)",
    ),
    k(
        "ledger.sync_interval_ms",
        "poll for budget/price changes (Postgres also announces them at commit with LISTEN/NOTIFY)",
    ),
    k(
        "ledger.refresh_interval_ms",
        "used amounts re-read from the store (what other replicas spent)",
    ),
    k(
        "ledger.journal_dir",
        "local append-only journal of settled debits and the snapshot of the last loaded state; one per replica (it is locked); empty disables both",
    ),
    k(
        "ledger.journal_sync_ms",
        "settled debits are written to the journal (safe from a crash of the process) within 2 ms; this is how often they are also fsynced (safe from a crash of the machine)",
    ),
    k(
        "ledger.durable_settle",
        "hold the end of each response until its debit is in the journal (then no request whose response completed is lost to SIGKILL; adds up to 2 ms to the last chunk)",
    ),
    k(
        "ledger.reservation_ttl_seconds",
        "a stream still open this long gives its reservation back (it is still charged when it ends); also the longest a QuotaService reservation holds",
    ),
    k(
        "ledger.mode",
        "`sync`: replicas admit from their own view, refreshed from the store; `lease`: each replica admits against a slice of the headroom leased from the store — the global limit holds strictly",
    ),
    k(
        "ledger.lease_share_percent",
        "lease mode: each grant also takes this share of what is free",
    ),
    k(
        "ledger.lease_ttl_ms",
        "lease mode: a lease lapses unless renewed (every third of this); idle headroom goes back after half of it",
    ),
    k(
        "ledger.lease_wait_ms",
        "lease mode: how long a request waits for a lease (keep it below Envoy's `message_timeout`)",
    ),
    k("log.level", "tracing filter"),
    k("log.format", "`text` or `json`"),
    k(
        "models.strip_date_suffix",
        "treat `gpt-4o-2024-08-06` as `gpt-4o` for budgets and as a price fallback",
    ),
    k("models.strip_prefixes", "e.g. `[\"openai/\"]`"),
    k(
        "models.aliases",
        "e.g. `{ \"house-model\" = \"gpt-4o-mini\" }`",
    ),
    k(
        "admin.cors_origins",
        "browser origins allowed to call the API (e.g. `[\"https://ops.example.com\"]`); empty: no CORS headers at all",
    ),
];

/// Arrays of tables: entries, not settings; no defaults.
pub const TABLES: &[(&str, &str)] = &[
    (
        "[[groups]]` `name`, `members",
        "group membership (`members = [\"alice\", \"service_principal:app-1\"]`)",
    ),
    (
        "[[budgets]]",
        "budgets applied at start, by name (see Budgets)",
    ),
    (
        "[[admin.tokens]]` `name`, `role`, `sha256",
        "admin API tokens: `role` is `admin` or `viewer`; `sha256` is the hex SHA-256 of the token (`tokenbudget token new`). None configured: the API refuses every request. Admin-role tokens may also call the QuotaService, viewers its Check and GetBalance",
    ),
    (
        "[[quota.tokens]]` `name`, `sha256",
        "QuotaService callers (every call). The name is recorded with each debit's idempotency key",
    ),
];

const fn k(key: &'static str, meaning: &'static str) -> Key {
    Key { key, meaning }
}

/// The defaults of every key, as the parser sees them. (The raw types are plain data: they
/// always serialize; were one not to, the tests below would find every key missing.)
pub fn defaults() -> toml::Table {
    toml::Table::try_from(Raw::default()).unwrap_or_default()
}

/// `section.key` paths of every serialized default (nested tables flattened; maps are leaves).
pub fn default_keys() -> Vec<String> {
    let mut out = Vec::new();
    for (section, v) in defaults() {
        match v {
            toml::Value::Table(t) => {
                for key in t.keys() {
                    out.push(format!("{section}.{key}"));
                }
            }
            _ => out.push(section),
        }
    }
    out
}

fn lookup(table: &toml::Table, key: &str) -> Option<toml::Value> {
    let (section, name) = key.split_once('.')?;
    table.get(section)?.as_table()?.get(name).cloned()
}

fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) if s.is_empty() => "empty".into(),
        toml::Value::String(s) => format!("`{s}`"),
        toml::Value::Table(t) if t.is_empty() => "`{}`".into(),
        other => format!("`{other}`"),
    }
}

/// The README's configuration table.
pub fn markdown() -> String {
    let defaults = defaults();
    let mut out = String::from("| key | default | meaning |\n|---|---|---|\n");
    for k in KEYS {
        let default = lookup(&defaults, k.key).map_or_else(|| "—".into(), |v| show(&v));
        let env = ENV_OVERRIDES
            .iter()
            .find(|(_, key)| *key == k.key)
            .map(|(var, _)| format!(" (env `{var}`)"))
            .unwrap_or_default();
        out.push_str(&format!(
            "| `{}` | {default} | {}{env} |\n",
            k.key, k.meaning
        ));
    }
    for (table, meaning) in TABLES {
        out.push_str(&format!("| `{table}` | none | {meaning} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_the_types_is_documented_and_nothing_else() {
        let mut documented: Vec<String> = KEYS.iter().map(|k| k.key.to_string()).collect();
        let mut actual = default_keys();
        documented.sort();
        actual.sort();
        assert_eq!(documented, actual);
        for (_, key) in ENV_OVERRIDES {
            assert!(documented.iter().any(|k| k == key), "{key}");
        }
    }

    #[test]
    fn the_readme_shows_the_generated_reference() {
        let readme = include_str!("../../README.md");
        let start = "<!-- config-reference:start (generated: `tokenbudget config reference`) -->\n";
        let end = "<!-- config-reference:end -->";
        let from = readme.find(start).expect("README start marker") + start.len();
        let to = readme.find(end).expect("README end marker");
        assert_eq!(
            &readme[from..to],
            markdown(),
            "README's configuration table is stale: paste `tokenbudget config reference`"
        );
    }

    #[test]
    fn defaults_shown_are_the_parsed_defaults() {
        let md = markdown();
        assert!(md.contains("| `server.grpc_listen` | `127.0.0.1:9002` |"));
        assert!(md.contains("| `ledger.lease_wait_ms` | `150` |"));
        assert!(md.contains("| `store.database_url` | empty |"));
        assert!(md.contains("(env `TOKENBUDGET_DATABASE_URL`)"));
        let parsed = super::super::Config::parse("", &|_| None).unwrap();
        assert_eq!(parsed.grpc_listen.to_string(), "127.0.0.1:9002");
    }
}
