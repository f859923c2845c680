-- v3 (SQLite): Anthropic 1-hour cache writes are their own price class and usage column.
ALTER TABLE tb_prices ADD COLUMN cache_write_1h_nanos BIGINT NOT NULL DEFAULT 0;
UPDATE tb_prices SET cache_write_1h_nanos = cache_write_nanos WHERE cache_write_1h_nanos = 0;
ALTER TABLE tb_usage_events ADD COLUMN cache_write_1h_tokens BIGINT NOT NULL DEFAULT 0;
