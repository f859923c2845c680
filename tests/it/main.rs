//! The integration suite: one binary, real Envoy + real Postgres/SQLite + the fake model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod api;
mod browser;
mod cli;
mod core;
mod envoy_configs;
mod fake_model;
mod faults;
mod harness;
mod metrics;
mod packaging;
mod policy;
mod providers;
mod quota;
mod reliability;
mod security;
