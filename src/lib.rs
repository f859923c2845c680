//! tokenbudget: LLM token and dollar budgets enforced behind Envoy, as an ext_proc sidecar.
//!
//! Code map (details and invariants in `ARCHITECTURE.md`):
//! - [`policy`] and [`meter`] are pure: budgets, windows, money, admission arithmetic; usage parsing.
//! - [`identity`] turns what Envoy sends into a principal; [`extproc`] is the Envoy boundary.
//! - [`ledger`] holds admission state in memory and writes debits to the [`store`] in batches.
//! - [`admin`] serves health endpoints; [`app`] wires everything; [`config`] validates settings.

pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod extproc;
pub mod identity;
pub mod ledger;
pub mod meter;
pub mod metrics;
pub mod policy;
pub mod quota;
pub mod store;
#[doc(hidden)]
pub mod testkit;
