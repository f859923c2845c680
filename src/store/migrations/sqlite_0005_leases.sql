-- v5: lease mode. Each replica holds a slice of a budget counter's headroom; the store keeps
-- used + the sum of unexpired leases within the limit. A head row per (counter, epoch) is the lock
-- that serialises grants; a lease row per holder (a replica's process) says how much it holds.
CREATE TABLE IF NOT EXISTS tb_lease_heads (
    budget_id   TEXT NOT NULL,
    member      TEXT NOT NULL,
    epoch       BIGINT NOT NULL,   -- calendar window start (epoch seconds), 0 for rolling and total
    touched_ms  BIGINT NOT NULL,
    PRIMARY KEY (budget_id, member, epoch)
);
CREATE TABLE IF NOT EXISTS tb_leases (
    budget_id   TEXT NOT NULL,
    member      TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    holder      TEXT NOT NULL,     -- one tokenbudget process (a UUID per start)
    amount      BIGINT NOT NULL,   -- in the budget's unit: tokens or nano-USD
    expires_ms  BIGINT NOT NULL,
    PRIMARY KEY (budget_id, member, epoch, holder)
);
CREATE INDEX IF NOT EXISTS tb_leases_holder ON tb_leases (holder);
CREATE INDEX IF NOT EXISTS tb_leases_expires ON tb_leases (expires_ms);
