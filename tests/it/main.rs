//! The integration suite: one binary, real Envoy + real Postgres/SQLite + the fake model.

mod core;
mod envoy_configs;
mod fake_model;
mod harness;
