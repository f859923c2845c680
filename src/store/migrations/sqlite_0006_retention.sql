-- v6: names seen in traffic, kept apart from the usage rows so the admin pickers never scan them
-- (and so usage rows can be purged after store.retention_days while the names stay known).
CREATE TABLE IF NOT EXISTS tb_seen (
    kind     TEXT NOT NULL,     -- principal | model
    name     TEXT NOT NULL,
    last_ms  BIGINT NOT NULL,
    PRIMARY KEY (kind, name)
);
INSERT INTO tb_seen (kind, name, last_ms)
    SELECT 'principal', principal, MAX(hour_start) * 1000 FROM tb_usage_hourly GROUP BY principal
    ON CONFLICT (kind, name) DO NOTHING;
INSERT INTO tb_seen (kind, name, last_ms)
    SELECT 'model', model, MAX(hour_start) * 1000 FROM tb_usage_hourly GROUP BY model
    ON CONFLICT (kind, name) DO NOTHING;
