//! A local copy of the last state loaded from the store — policy rows and stored counters — so a
//! replica that restarts while the store is unreachable still knows every budget, price and
//! how much was used, and keeps enforcing them from memory.
//!
//! Written atomically (a temporary file, synced, then renamed over the old one) next to the
//! journal; read only at start when the store cannot be reached. Debits settled after the
//! snapshot was taken are not in it: the journal replays them.
//!
//! **Invariant:** a snapshot that cannot be read whole is not used (a torn or foreign file is
//! ignored with a warning, never half-applied).

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{BudgetRow, PolicyRows, PriceRow, Result, StoreError};
use crate::policy::{Amount, CounterKey};

/// What a replica last loaded from the store.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub taken_ms: i64,
    pub policy: PolicyRows,
    /// Stored counter buckets (budget, member, bucket start, amount).
    pub counters: Vec<(CounterKey, i64, Amount)>,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    taken_ms: i64,
    version: i64,
    budgets: Vec<BudgetRow>,
    prices: Vec<PriceRow>,
    members: Vec<(String, String)>,
    counters: Vec<(CounterKey, i64, Amount)>,
}

const FORMAT: u32 = 1;

impl Snapshot {
    /// Replaces the snapshot at `path`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let disk = OnDisk {
            format: FORMAT,
            taken_ms: self.taken_ms,
            version: self.policy.version,
            budgets: self
                .policy
                .budgets
                .iter()
                .map(BudgetRow::from_budget)
                .collect(),
            prices: self.policy.prices.clone(),
            members: self.policy.members.clone(),
            counters: self.counters.clone(),
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, &disk)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// The snapshot at `path`, if there is a readable one.
    pub fn load(path: &Path) -> Result<Option<Snapshot>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Unavailable(format!("{}: {e}", path.display()))),
        };
        let disk: OnDisk = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
        if disk.format != FORMAT {
            return Err(StoreError::Corrupt(format!(
                "{}: snapshot format {} (this version reads {FORMAT})",
                path.display(),
                disk.format
            )));
        }
        let budgets = disk
            .budgets
            .into_iter()
            .map(BudgetRow::into_budget)
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Snapshot {
            taken_ms: disk.taken_ms,
            policy: PolicyRows {
                version: disk.version,
                budgets,
                prices: disk.prices,
                members: disk.members,
            },
            counters: disk.counters,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BudgetId, NanoUsd, Price};

    #[test]
    fn a_snapshot_reads_back_as_written_and_a_torn_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(Snapshot::load(&path).unwrap().is_none());
        let spec: crate::policy::BudgetSpec =
            toml::from_str("name='alice'\nsubject='user:alice'\nlimit_usd='5.00'\nwindow='day'")
                .unwrap();
        let snap = Snapshot {
            taken_ms: 42,
            policy: PolicyRows {
                version: 7,
                budgets: vec![spec.to_budget("b-1").unwrap()],
                prices: vec![PriceRow {
                    model: "gpt-4o".into(),
                    effective_from_ms: 0,
                    price: Price {
                        input: NanoUsd(2_500_000_000),
                        ..Price::default()
                    },
                }],
                members: vec![("ml".into(), "user:alice".into())],
            },
            counters: vec![(
                CounterKey {
                    budget: BudgetId("b-1".into()),
                    member: "".into(),
                },
                86_400,
                Amount {
                    tokens: 10,
                    nanos: 20,
                },
            )],
        };
        snap.save(&path).unwrap();
        let back = Snapshot::load(&path).unwrap().unwrap();
        assert_eq!(back.taken_ms, 42);
        assert_eq!(back.policy.version, 7);
        assert_eq!(back.policy.budgets, snap.policy.budgets);
        assert_eq!(back.policy.prices, snap.policy.prices);
        assert_eq!(back.policy.members, snap.policy.members);
        assert_eq!(back.counters, snap.counters);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(Snapshot::load(&path), Err(StoreError::Corrupt(_))));
    }
}
