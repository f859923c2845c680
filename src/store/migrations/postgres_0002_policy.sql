-- v2: rolling windows, admin-managed group membership, unpriced usage flag.
ALTER TABLE tb_budgets ADD COLUMN IF NOT EXISTS window_kind TEXT NOT NULL DEFAULT 'calendar';
CREATE TABLE IF NOT EXISTS tb_group_members (
    group_name     TEXT NOT NULL,
    principal      TEXT NOT NULL,   -- principal key: user:alice, service_principal:ID
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (group_name, principal)
);
CREATE INDEX IF NOT EXISTS tb_group_members_principal ON tb_group_members (principal);
ALTER TABLE tb_usage_events ADD COLUMN IF NOT EXISTS unpriced BOOLEAN NOT NULL DEFAULT FALSE;
