-- v2 (SQLite): rolling windows, admin-managed group membership, unpriced usage flag.
ALTER TABLE tb_budgets ADD COLUMN window_kind TEXT NOT NULL DEFAULT 'calendar';
CREATE TABLE IF NOT EXISTS tb_group_members (
    group_name     TEXT NOT NULL,
    principal      TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (group_name, principal)
);
CREATE INDEX IF NOT EXISTS tb_group_members_principal ON tb_group_members (principal);
ALTER TABLE tb_usage_events ADD COLUMN unpriced INTEGER NOT NULL DEFAULT 0;
