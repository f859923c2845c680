//! Every Prometheus metric, registered once at start. The request path holds pre-resolved handles
//! (plain atomics); labelled families are touched at decision and settlement, never per chunk.
//! Label values are bounded: outcomes and token classes are fixed sets, and a model is named only
//! when it has a price (any other model string, which a client controls, is `other`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheResult {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenClass {
    model: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Model {
    model: String,
}

/// One model's settlement counters: the five token classes, then cost.
struct ModelCounters {
    classes: [Counter; 5],
    cost: Counter,
}

/// Decisions by outcome, resolved once.
#[derive(Clone, Debug)]
pub struct Decisions {
    pub allowed: Counter,
    pub denied: Counter,
    pub denied_unpriced: Counter,
    pub no_identity: Counter,
    /// Refused because no budget state is known yet (`admission.no_state = "deny"`).
    pub no_state: Counter,
    /// Allowed requests that a shadow budget would have denied.
    pub shadow_would_deny: Counter,
}

pub struct Metrics {
    registry: Registry,
    pub decisions: Decisions,
    /// Time to decide from memory, at the request headers or buffered body.
    pub decision_seconds: Histogram,
    settled: Family<Outcome, Counter>,
    /// Requests settled with our estimate (no provider usage).
    pub estimated: Counter,
    /// Requests settled for a model without a price.
    pub unpriced: Counter,
    tokens: Family<TokenClass, Counter>,
    cost: Family<Model, Counter>,
    /// The token-class and cost counters of each model label, resolved once (a settlement then
    /// costs one map lookup, not six label lookups and six label allocations).
    by_model: std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<ModelCounters>>>,
    pub active_streams: Gauge,
    pub queue_depth: Gauge,
    /// Records per store transaction.
    pub batch_size: Histogram,
    pub batches: Counter,
    pub store_errors: Counter,
    /// Usage events written (new), and replays the store ignored as duplicates.
    pub events_written: Counter,
    pub duplicates: Counter,
    /// Debits queued beyond the soft capacity (kept, never dropped).
    pub queue_overflow: Counter,
    /// Requests decided from their headers because their body was too large to read.
    pub bodies_not_read: Counter,
    /// Reservations given back because their stream outlived `ledger.reservation_ttl_seconds`.
    pub reservations_expired: Counter,
    /// Journal writes that failed (records kept in memory), time per group write + sync, bytes on
    /// disk, and records replayed at start.
    pub journal_errors: Counter,
    pub journal_sync_seconds: Histogram,
    pub journal_bytes: Gauge,
    pub journal_replayed: Counter,
    /// Lease grants that covered what was asked (full) or did not (short: the budget is spent
    /// or held by other replicas).
    lease_full: Counter,
    lease_short: Counter,
    /// Time from a lease ask to the store's answer (one store transaction, plus the queue).
    pub lease_seconds: Histogram,
    /// Decisions whose matching budgets were remembered (hit) or computed (miss).
    match_hits: Counter,
    match_misses: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tokenbudget");
        let decisions_family = Family::<Outcome, Counter>::default();
        let outcome = |o| {
            decisions_family
                .get_or_create(&Outcome { outcome: o })
                .clone()
        };
        let decisions = Decisions {
            allowed: outcome("allowed"),
            denied: outcome("denied"),
            denied_unpriced: outcome("denied_unpriced"),
            no_identity: outcome("no_identity"),
            no_state: outcome("no_state"),
            shadow_would_deny: outcome("shadow_would_deny"),
        };
        registry.register(
            "decisions",
            "Admission decisions by outcome",
            decisions_family,
        );
        let decision_seconds = Histogram::new(exponential_buckets(1e-6, 2.0, 16));
        registry.register(
            "decision_seconds",
            "Time to decide from memory",
            decision_seconds.clone(),
        );
        let settled = Family::<Outcome, Counter>::default();
        registry.register(
            "settled",
            "Requests settled, by how the stream ended",
            settled.clone(),
        );
        let estimated = Counter::default();
        registry.register(
            "settled_estimated",
            "Requests settled with an estimate (no provider usage)",
            estimated.clone(),
        );
        let unpriced = Counter::default();
        registry.register(
            "settled_unpriced",
            "Requests settled for a model without a price",
            unpriced.clone(),
        );
        let tokens = Family::<TokenClass, Counter>::default();
        registry.register(
            "tokens",
            "Tokens settled, by model and class",
            tokens.clone(),
        );
        let cost = Family::<Model, Counter>::default();
        registry.register(
            "cost_nanodollars",
            "Cost settled in nano-USD, by model",
            cost.clone(),
        );
        let active_streams = Gauge::default();
        registry.register(
            "active_streams",
            "Envoy ext_proc streams open",
            active_streams.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Debits and denies waiting to be written",
            queue_depth.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "batch_size",
            "Records per store transaction",
            batch_size.clone(),
        );
        let batches = Counter::default();
        registry.register("batches", "Store transactions written", batches.clone());
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Failed store operations",
            store_errors.clone(),
        );
        let events_written = Counter::default();
        registry.register(
            "events_written",
            "Usage events written to the store",
            events_written.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            "duplicate_events",
            "Replayed usage events the store already had",
            duplicates.clone(),
        );
        let queue_overflow = Counter::default();
        registry.register(
            "queue_overflow",
            "Debits queued beyond the soft capacity",
            queue_overflow.clone(),
        );
        let bodies_not_read = Counter::default();
        registry.register(
            "bodies_not_read",
            "Requests whose body was larger than admission.max_body_bytes: decided from their headers",
            bodies_not_read.clone(),
        );
        let reservations_expired = Counter::default();
        registry.register(
            "reservations_expired",
            "Reservations given back because their stream stayed open past the reservation TTL",
            reservations_expired.clone(),
        );
        let journal_errors = Counter::default();
        registry.register(
            "journal_errors",
            "Journal writes that failed (the records are kept in memory and still written to the store)",
            journal_errors.clone(),
        );
        let journal_sync_seconds = Histogram::new(exponential_buckets(1e-5, 2.0, 16));
        registry.register(
            "journal_sync_seconds",
            "Time to append and sync one group of records to the journal",
            journal_sync_seconds.clone(),
        );
        let journal_bytes = Gauge::default();
        registry.register(
            "journal_bytes",
            "Bytes in the journal's segments",
            journal_bytes.clone(),
        );
        let journal_replayed = Counter::default();
        registry.register(
            "journal_replayed",
            "Records an earlier process left in the journal, replayed at start",
            journal_replayed.clone(),
        );
        let leases = Family::<CacheResult, Counter>::default();
        let lease_full = leases
            .get_or_create(&CacheResult { result: "full" })
            .clone();
        let lease_short = leases
            .get_or_create(&CacheResult { result: "short" })
            .clone();
        registry.register(
            "lease_grants",
            "Lease grants from the store: full (what was asked) or short (the budget is spent or held by other replicas)",
            leases,
        );
        let lease_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 14));
        registry.register(
            "lease_grant_seconds",
            "Time to get a lease grant from the store",
            lease_seconds.clone(),
        );
        let match_cache = Family::<CacheResult, Counter>::default();
        let match_hits = match_cache
            .get_or_create(&CacheResult { result: "hit" })
            .clone();
        let match_misses = match_cache
            .get_or_create(&CacheResult { result: "miss" })
            .clone();
        registry.register(
            "match_cache",
            "Decisions whose matching budgets came from the cache (hit) or a scan of every budget (miss)",
            match_cache,
        );
        Metrics {
            registry,
            match_hits,
            match_misses,
            lease_full,
            lease_short,
            lease_seconds,
            bodies_not_read,
            reservations_expired,
            journal_errors,
            journal_sync_seconds,
            journal_bytes,
            journal_replayed,
            decisions,
            decision_seconds,
            settled,
            estimated,
            unpriced,
            tokens,
            cost,
            by_model: Default::default(),
            active_streams,
            queue_depth,
            batch_size,
            batches,
            store_errors,
            events_written,
            duplicates,
            queue_overflow,
        }
    }

    /// Records one settled request. `model` is `None` for a model without a price.
    #[allow(clippy::too_many_arguments)]
    pub fn settled(
        &self,
        outcome: &'static str,
        model: Option<&str>,
        classes: [(&'static str, u64); 5],
        cost_nanos: u64,
        estimated: bool,
    ) {
        self.settled.get_or_create(&Outcome { outcome }).inc();
        if estimated {
            self.estimated.inc();
        }
        let model = match model {
            Some(m) => m,
            None => {
                self.unpriced.inc();
                "other"
            }
        };
        let handles = self.model_counters(model, classes.map(|(c, _)| c));
        for ((_, n), counter) in classes.iter().zip(&handles.classes) {
            if *n > 0 {
                counter.inc_by(*n);
            }
        }
        if cost_nanos > 0 {
            handles.cost.inc_by(cost_nanos);
        }
    }

    fn model_counters(
        &self,
        model: &str,
        classes: [&'static str; 5],
    ) -> std::sync::Arc<ModelCounters> {
        if let Some(h) = self
            .by_model
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            return std::sync::Arc::clone(h);
        }
        let h = std::sync::Arc::new(ModelCounters {
            classes: classes.map(|class| {
                self.tokens
                    .get_or_create(&TokenClass {
                        model: model.to_owned(),
                        class,
                    })
                    .clone()
            }),
            cost: self
                .cost
                .get_or_create(&Model {
                    model: model.to_owned(),
                })
                .clone(),
        });
        self.by_model
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.to_owned(), std::sync::Arc::clone(&h));
        h
    }

    /// One lease grant.
    pub fn lease_grant(&self, full: bool) {
        if full {
            self.lease_full.inc();
        } else {
            self.lease_short.inc();
        }
    }

    /// One decision's match-cache lookup.
    pub fn match_cache(&self, hit: bool) {
        if hit {
            self.match_hits.inc();
        } else {
            self.match_misses.inc();
        }
    }

    /// Requests settled so far, all outcomes.
    pub fn settled_total(&self) -> u64 {
        ["complete", "aborted", "no_usage", "upstream_error"]
            .into_iter()
            .map(|o| self.settled.get_or_create(&Outcome { outcome: o }).get())
            .sum()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
