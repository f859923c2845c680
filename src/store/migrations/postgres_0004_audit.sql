-- v4: the audit log of administrative changes, written in the same transaction as the change.
CREATE TABLE IF NOT EXISTS tb_audit (
    id           BIGSERIAL PRIMARY KEY,
    ts_ms        BIGINT NOT NULL,
    actor        TEXT NOT NULL,    -- token name (api), cli:USER, or config
    action       TEXT NOT NULL,    -- budget.create, budget.update, budget.delete, price.set, group.add, group.remove
    target       TEXT NOT NULL,    -- budget name, model, or group
    before_json  TEXT,             -- NULL when the change created the target
    after_json   TEXT              -- NULL when the change deleted the target
);
CREATE INDEX IF NOT EXISTS tb_audit_target ON tb_audit (target, id);
-- Deny lists filtered by principal or budget, newest first.
CREATE INDEX IF NOT EXISTS tb_deny_events_principal ON tb_deny_events (principal, ts_ms);
CREATE INDEX IF NOT EXISTS tb_deny_events_budget ON tb_deny_events (budget_name, ts_ms);
