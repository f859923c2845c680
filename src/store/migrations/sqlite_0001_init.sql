-- tokenbudget schema v1 (SQLite). Same tables as Postgres; booleans are 0/1.
-- Times are epoch milliseconds (ts_ms) or epoch seconds (bucket_start, hour_start), always UTC.
CREATE TABLE IF NOT EXISTS tb_budgets (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    subject_kind   TEXT NOT NULL,
    subject_name   TEXT NOT NULL,
    scope          TEXT NOT NULL,
    models         TEXT,               -- JSON array; NULL = all models
    limit_unit     TEXT NOT NULL,      -- tokens | usd
    limit_value    BIGINT NOT NULL,    -- tokens, or nano-USD
    window_unit    TEXT NOT NULL,      -- hour | day | week | month | total
    window_every   INTEGER NOT NULL,
    action         TEXT NOT NULL,
    is_override    INTEGER NOT NULL,
    enabled        INTEGER NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tb_prices (
    model              TEXT NOT NULL,
    effective_from_ms  BIGINT NOT NULL,
    input_nanos        BIGINT NOT NULL,  -- nano-USD per 1M tokens
    output_nanos       BIGINT NOT NULL,
    cache_read_nanos   BIGINT NOT NULL,
    cache_write_nanos  BIGINT NOT NULL,
    PRIMARY KEY (model, effective_from_ms)
);
CREATE TABLE IF NOT EXISTS tb_policy_version (
    id       INTEGER PRIMARY KEY,
    version  BIGINT NOT NULL
);
INSERT INTO tb_policy_version (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS tb_usage_events (
    event_id            TEXT PRIMARY KEY,
    request_id          TEXT NOT NULL,
    ts_ms               BIGINT NOT NULL,
    principal           TEXT NOT NULL,
    model               TEXT NOT NULL,
    family              TEXT NOT NULL,
    input_tokens        BIGINT NOT NULL,
    cache_read_tokens   BIGINT NOT NULL,
    cache_write_tokens  BIGINT NOT NULL,
    output_tokens       BIGINT NOT NULL,
    reasoning_tokens    BIGINT NOT NULL,
    cost_nanos          BIGINT NOT NULL,
    estimated           INTEGER NOT NULL,
    outcome             TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tb_usage_events_ts ON tb_usage_events (ts_ms);
CREATE INDEX IF NOT EXISTS tb_usage_events_request ON tb_usage_events (request_id);
CREATE TABLE IF NOT EXISTS tb_window_counters (
    budget_id     TEXT NOT NULL,
    member        TEXT NOT NULL,   -- '' for a shared pool, the principal key for per-member
    bucket_start  BIGINT NOT NULL,
    tokens        BIGINT NOT NULL,
    cost_nanos    BIGINT NOT NULL,
    PRIMARY KEY (budget_id, bucket_start, member)
);
CREATE TABLE IF NOT EXISTS tb_usage_hourly (
    hour_start   BIGINT NOT NULL,
    principal    TEXT NOT NULL,
    model        TEXT NOT NULL,
    requests     BIGINT NOT NULL,
    tokens       BIGINT NOT NULL,
    cost_nanos   BIGINT NOT NULL,
    PRIMARY KEY (hour_start, principal, model)
);
CREATE TABLE IF NOT EXISTS tb_deny_events (
    event_id     TEXT PRIMARY KEY,
    request_id   TEXT NOT NULL,
    ts_ms        BIGINT NOT NULL,
    principal    TEXT NOT NULL,
    model        TEXT NOT NULL,
    budget_name  TEXT NOT NULL,
    reason       TEXT NOT NULL,
    unit         TEXT NOT NULL,
    used         BIGINT NOT NULL,
    limit_value  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS tb_deny_events_ts ON tb_deny_events (ts_ms);
