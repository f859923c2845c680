//! The QuotaService (`proto/tokenbudget/v1/quota.proto`): the budgets Envoy traffic is admitted
//! against, for callers outside Envoy. Served on the gRPC port next to ext_proc.
//!
//! A reservation made here is the same thing an Envoy request holds while its response streams:
//! admitted from memory against every matching budget (through leases in lease mode), charged
//! with the actual usage at commit through the same ledger, debited once per request id.
//!
//! **Invariant:** a reservation is in exactly one of `held` (counts against its budgets) or gone
//! (committed, released or expired: its hold was given back once). A debit's event id is
//! `quota:{calling token}:{request id}`: a retried commit or LogUsage this replica has charged
//! is answered from `charged` and charges nothing, and the store keeps only the first debit of
//! an event id in any case (a retry to another replica, or after a restart).
//! **Boundary:** callers are authenticated by bearer token; which principal a call names is the
//! caller's word, so quota tokens go to trusted services only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::admin::auth::{AdminToken, Role};
use crate::ledger::{Ledger, Settlement};
use crate::policy::budget::{ModelSet, principal_key};
use crate::policy::{
    Admission, Ask, BudgetStatus, Denial, LeaseStep, Principal, Reservation, TokenClasses,
};

pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("tokenbudget.v1");
}

use pb::quota_service_server::QuotaServiceServer;

/// Largest token count a call may name: far above any context window, far below overflow.
const MAX_TOKENS: u64 = 1_000_000_000;

/// How long a charged request id is remembered (answers to retried commits).
const REMEMBER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct QuotaConfig {
    /// Admin tokens (admin: every call; viewer: Check and GetBalance) and quota tokens (every
    /// call, recorded with `Role::Admin`).
    pub tokens: Arc<[AdminToken]>,
    pub default_output_tokens: u64,
    pub max_output_reservation: Option<u64>,
    pub reservation_ttl: Duration,
    /// Refuse (UNAVAILABLE) while no budget state is known, as ext_proc does with `no_state = deny`.
    pub deny_without_state: bool,
}

/// A reservation's hold, until commit, release or expiry.
struct Held {
    reservation: Reservation,
    principal: Principal,
    model: String,
    expires_ms: i64,
}

/// A reservation that expired: its hold is given back, but a late commit still charges it.
struct Lapsed {
    principal: Principal,
    model: String,
    forget_ms: i64,
}

#[derive(Default)]
struct Book {
    held: HashMap<String, Held>,
    lapsed: HashMap<String, Lapsed>,
    /// Debits charged here, by event id: (cost in nano-USD, forget at).
    charged: HashMap<String, (u64, i64)>,
    /// Reservation ids committed or released here: the event id (empty for a release), forget at.
    closed: HashMap<String, (String, i64)>,
}

pub struct Quota {
    ledger: Arc<Ledger>,
    cfg: QuotaConfig,
    book: Mutex<Book>,
}

impl Quota {
    pub fn new(ledger: Arc<Ledger>, cfg: QuotaConfig) -> Arc<Quota> {
        Arc::new(Quota {
            ledger,
            cfg,
            book: Mutex::default(),
        })
    }

    pub fn server(self: &Arc<Self>) -> QuotaServiceServer<Service> {
        QuotaServiceServer::new(Service(Arc::clone(self)))
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> i64 {
        self.ledger.clock().now().timestamp_millis()
    }

    /// When an answer given now may be forgotten.
    fn forget_at(&self) -> i64 {
        self.now_ms() + REMEMBER.as_millis() as i64
    }

    /// Gives back the holds of reservations past their expiry and forgets old answers. Run
    /// periodically by [`sweep_every`].
    pub fn sweep(&self) {
        let now = self.now_ms();
        let forget = self.forget_at();
        let mut book = self.book();
        let expired: Vec<(String, Held)> =
            book.held.extract_if(|_, h| h.expires_ms <= now).collect();
        for (id, h) in expired {
            self.ledger.release(&h.reservation);
            tracing::info!(reservation_id = %id, principal = %h.principal.key(), "quota reservation expired");
            book.lapsed.insert(
                id,
                Lapsed {
                    principal: h.principal,
                    model: h.model,
                    forget_ms: forget,
                },
            );
        }
        book.lapsed.retain(|_, l| l.forget_ms > now);
        book.charged.retain(|_, (_, at)| *at > now);
        book.closed.retain(|_, (_, at)| *at > now);
    }

    /// The calling token's name.
    fn authorize<T>(&self, req: &Request<T>, write: bool) -> Result<String, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("a bearer token is required"))?;
        let caller = crate::admin::auth::authenticate(&self.cfg.tokens, token)
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if write && caller.role != Role::Admin {
            return Err(Status::permission_denied(format!(
                "token {:?} may only Check and GetBalance",
                caller.name
            )));
        }
        Ok(caller.name)
    }

    fn ready(&self) -> Result<(), Status> {
        if self.cfg.deny_without_state && !self.ledger.is_ready() {
            return Err(Status::unavailable(
                "no budget state is known yet (the store has not answered since start)",
            ));
        }
        Ok(())
    }

    /// The ask of a Check or Reserve call.
    fn estimate(&self, input: u64, max_output: Option<u64>) -> Result<TokenClasses, Status> {
        let mut output = max_output.unwrap_or(self.cfg.default_output_tokens);
        if let Some(cap) = self.cfg.max_output_reservation {
            output = output.min(cap);
        }
        if input > MAX_TOKENS || output > MAX_TOKENS {
            return Err(invalid(
                "input_tokens",
                format!("token counts are at most {MAX_TOKENS}"),
            ));
        }
        Ok(TokenClasses {
            input,
            output,
            ..Default::default()
        })
    }

    /// Admits `ask` (waiting for leases in lease mode), reserving its estimate when allowed.
    async fn admit(
        &self,
        principal: &Principal,
        model: &str,
        estimate: TokenClasses,
    ) -> Result<Admission, Status> {
        let ask = |lease| Ask {
            principal,
            model: Some(model),
            estimate,
            lease,
        };
        Ok(match self.ledger.admit(&ask(LeaseStep::Acquire)) {
            Admission::Pending { needs } => {
                let step = if self.ledger.acquire_leases(needs).await {
                    LeaseStep::Final
                } else if self.cfg.deny_without_state {
                    return Err(Status::unavailable(
                        "the store did not grant a lease in time; retry shortly",
                    ));
                } else {
                    LeaseStep::Bypass
                };
                self.ledger.admit(&ask(step))
            }
            decided => decided,
        })
    }

    fn verdict(&self, admission: &Admission) -> pb::Verdict {
        let now = self.ledger.clock().now();
        match admission {
            Admission::Allowed { binding, .. } => pb::Verdict {
                decision: pb::Decision::Allow.into(),
                binding: binding.as_ref().map(|b| balance(b, "")),
                ..Default::default()
            },
            Admission::Denied { denial, .. } => deny_verdict(denial, now),
            Admission::Pending { .. } => pb::Verdict {
                decision: pb::Decision::Deny.into(),
                reason: "exhausted".into(),
                message: "no lease could be granted".into(),
                ..Default::default()
            },
        }
    }

    /// Charges `usage` for the caller's `request_id`, once, against `reservation` (`None`: the
    /// budgets that match now, without a hold). Returns (charged now, cost).
    #[allow(clippy::too_many_arguments)]
    fn charge(
        &self,
        book: &mut Book,
        caller: &str,
        request_id: &str,
        reservation: Option<Reservation>,
        principal: &Principal,
        model: String,
        usage: &pb::Usage,
    ) -> (bool, u64) {
        // One debit per (calling token, request id): the store keeps the first of an event id.
        let event_id = event_id(caller, request_id);
        if let Some((cost, _)) = book.charged.get(&event_id) {
            if let Some(r) = &reservation {
                self.ledger.release(r);
            }
            return (false, *cost);
        }
        let reservation = reservation.unwrap_or_else(|| {
            self.ledger.unreserved(&Ask {
                principal,
                model: Some(&model),
                estimate: TokenClasses::default(),
                lease: LeaseStep::Bypass,
            })
        });
        let settled = self.ledger.settle(Settlement {
            reservation,
            event_id: Some(event_id.clone()),
            request_id: request_id.to_owned(),
            principal: principal.key(),
            model,
            family: "quota",
            tokens: TokenClasses {
                input: usage.input_tokens,
                cache_read: usage.cache_read_tokens,
                cache_write: usage.cache_write_tokens,
                cache_write_1h: 0,
                output: usage.output_tokens,
            },
            reasoning: usage.reasoning_tokens,
            estimated: false,
            outcome: "complete",
        });
        book.charged
            .insert(event_id, (settled.cost.0, self.forget_at()));
        (true, settled.cost.0)
    }
}

/// The store's idempotency key of a QuotaService debit.
fn event_id(caller: &str, request_id: &str) -> String {
    format!("quota:{caller}:{request_id}")
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

fn principal_of(p: Option<pb::Principal>) -> Result<Principal, Status> {
    let p = p.ok_or_else(|| invalid("principal", "is required"))?;
    let key = principal_key(&p.principal).map_err(|e| invalid("principal.principal", e))?;
    if p.groups.iter().any(|g| g.trim().is_empty()) {
        return Err(invalid("principal.groups", "group names must not be empty"));
    }
    Ok(Principal::from_key(&key, p.groups))
}

fn model_of(model: &str) -> Result<&str, Status> {
    let m = model.trim();
    if m.is_empty() {
        return Err(invalid("model", "is required"));
    }
    Ok(m)
}

fn usage_of(u: Option<pb::Usage>) -> Result<pb::Usage, Status> {
    let u = u.ok_or_else(|| invalid("usage", "is required"))?;
    for (field, v) in [
        ("usage.input_tokens", u.input_tokens),
        ("usage.output_tokens", u.output_tokens),
        ("usage.cache_read_tokens", u.cache_read_tokens),
        ("usage.cache_write_tokens", u.cache_write_tokens),
        ("usage.reasoning_tokens", u.reasoning_tokens),
    ] {
        if v > MAX_TOKENS {
            return Err(invalid(field, format!("at most {MAX_TOKENS}")));
        }
    }
    Ok(u)
}

fn request_id_of(id: &str) -> Result<String, Status> {
    let id = id.trim();
    if id.is_empty() || id.len() > 200 {
        return Err(invalid("request_id", "1 to 200 characters"));
    }
    Ok(id.to_owned())
}

fn balance(s: &BudgetStatus, member: &str) -> pb::Balance {
    pb::Balance {
        budget: s.name.clone(),
        unit: s.unit.as_str().into(),
        limit: s.limit,
        used: s.used,
        reserved: s.reserved,
        remaining: s.remaining(),
        resets_at_unix_ms: s.resets_at.map_or(0, |t| t.timestamp_millis()),
        window: s.window.to_string(),
        action: s.action.as_str().into(),
        member: member.to_owned(),
    }
}

fn deny_verdict(d: &Denial, now: chrono::DateTime<chrono::Utc>) -> pb::Verdict {
    let retry = match d.reason {
        crate::policy::DenyReason::Exhausted => d.status.reset_after(now).unwrap_or(0),
        _ => 0,
    };
    pb::Verdict {
        decision: pb::Decision::Deny.into(),
        reason: d.reason.as_str().into(),
        binding: Some(balance(&d.status, "")),
        retry_after_seconds: u32::try_from(retry).unwrap_or(u32::MAX),
        message: crate::extproc::reply::deny_message(d),
    }
}

/// Gives back expired reservations every second until the process ends.
pub async fn sweep_every(quota: Arc<Quota>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        quota.sweep();
    }
}

/// The tonic service: a handle on [`Quota`].
#[derive(Clone)]
pub struct Service(Arc<Quota>);

#[tonic::async_trait]
impl pb::quota_service_server::QuotaService for Service {
    async fn check(
        &self,
        req: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let q = &self.0;
        q.authorize(&req, false)?;
        q.ready()?;
        let r = req.into_inner();
        let principal = principal_of(r.principal)?;
        let model = model_of(&r.model)?;
        let estimate = q.estimate(r.input_tokens, r.max_output_tokens)?;
        let ev = q.ledger.evaluate(&Ask {
            principal: &principal,
            model: Some(model),
            estimate,
            lease: LeaseStep::Bypass,
        });
        Ok(Response::new(pb::CheckResponse {
            verdict: Some(q.verdict(&ev.outcome())),
        }))
    }

    async fn reserve(
        &self,
        req: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let q = &self.0;
        q.authorize(&req, true)?;
        q.ready()?;
        let r = req.into_inner();
        let principal = principal_of(r.principal)?;
        let model = model_of(&r.model)?.to_owned();
        let estimate = q.estimate(r.input_tokens, r.max_output_tokens)?;
        let admission = q.admit(&principal, &model, estimate).await?;
        let verdict = q.verdict(&admission);
        // A Reserve is a decision like an Envoy request's (`tokenbudget_decisions_total`).
        let decisions = &q.ledger.metrics.decisions;
        let Admission::Allowed { reservation, .. } = admission else {
            if let Admission::Denied { denial, .. } = &admission {
                match denial.reason {
                    crate::policy::DenyReason::ModelNotPriced => decisions.denied_unpriced.inc(),
                    _ => decisions.denied.inc(),
                };
                record_deny(&q.ledger, &principal, &model, denial);
            }
            return Ok(Response::new(pb::ReserveResponse {
                verdict: Some(verdict),
                ..Default::default()
            }));
        };
        decisions.allowed.inc();
        let ttl = match r.ttl_seconds {
            0 => q.cfg.reservation_ttl,
            s => Duration::from_secs(u64::from(s)).min(q.cfg.reservation_ttl),
        };
        let expires_ms = q.now_ms() + ttl.as_millis() as i64;
        let id = format!("rsv_{}", uuid::Uuid::now_v7().simple());
        q.book().held.insert(
            id.clone(),
            Held {
                reservation,
                principal,
                model,
                expires_ms,
            },
        );
        Ok(Response::new(pb::ReserveResponse {
            verdict: Some(verdict),
            reservation_id: id,
            expires_at_unix_ms: expires_ms,
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let q = &self.0;
        let caller = q.authorize(&req, true)?;
        let r = req.into_inner();
        let id = r.reservation_id.trim().to_owned();
        if id.is_empty() {
            return Err(invalid("reservation_id", "is required"));
        }
        let request_id = if r.request_id.trim().is_empty() {
            id.clone()
        } else {
            request_id_of(&r.request_id)?
        };
        let usage = usage_of(r.usage)?;
        let mut book = q.book();
        let (reservation, principal, model, found) = if let Some(h) = book.held.remove(&id) {
            (Some(h.reservation), h.principal, h.model, true)
        } else if let Some(l) = book.lapsed.remove(&id) {
            (None, l.principal, l.model, false)
        } else if let Some((done, _)) = book.closed.get(&id) {
            if done.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "reservation {id} was released"
                )));
            }
            let cost = book.charged.get(done).map_or(0, |(c, _)| *c);
            return Ok(Response::new(pb::CommitResponse {
                charged: false,
                reservation_found: true,
                cost_nano_usd: cost,
            }));
        } else {
            return Err(Status::not_found(format!(
                "reservation {id} is unknown to this replica; charge the usage with LogUsage"
            )));
        };
        let (charged, cost) = q.charge(
            &mut book,
            &caller,
            &request_id,
            reservation,
            &principal,
            model,
            &usage,
        );
        book.closed
            .insert(id, (event_id(&caller, &request_id), q.forget_at()));
        Ok(Response::new(pb::CommitResponse {
            charged,
            reservation_found: found,
            cost_nano_usd: cost,
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let q = &self.0;
        q.authorize(&req, true)?;
        let id = req.into_inner().reservation_id.trim().to_owned();
        if id.is_empty() {
            return Err(invalid("reservation_id", "is required"));
        }
        let mut book = q.book();
        let released = match book.held.remove(&id) {
            Some(h) => {
                q.ledger.release(&h.reservation);
                book.closed.insert(id, (String::new(), q.forget_at()));
                true
            }
            None => false,
        };
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn log_usage(
        &self,
        req: Request<pb::LogUsageRequest>,
    ) -> Result<Response<pb::LogUsageResponse>, Status> {
        let q = &self.0;
        let caller = q.authorize(&req, true)?;
        let r = req.into_inner();
        let principal = principal_of(r.principal)?;
        let model = model_of(&r.model)?.to_owned();
        let request_id = request_id_of(&r.request_id)?;
        let usage = usage_of(r.usage)?;
        let mut book = q.book();
        let (charged, cost) = q.charge(
            &mut book,
            &caller,
            &request_id,
            None,
            &principal,
            model,
            &usage,
        );
        Ok(Response::new(pb::LogUsageResponse {
            charged,
            cost_nano_usd: cost,
        }))
    }

    async fn get_balance(
        &self,
        req: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let q = &self.0;
        q.authorize(&req, false)?;
        q.ready()?;
        let r = req.into_inner();
        let principal = principal_of(r.principal)?;
        let model = r.model.trim();
        // One model: the budgets that cover it. None: every budget that applies to the
        // principal, whatever models it covers (asked once per model the budgets list).
        let models: Vec<Option<String>> = if model.is_empty() {
            let policy = q.ledger.policy();
            let mut listed: Vec<Option<String>> = vec![None];
            for b in policy.budgets.iter() {
                if let ModelSet::Only(list) = &b.models {
                    listed.extend(list.iter().cloned().map(Some));
                }
            }
            listed.sort();
            listed.dedup();
            listed
        } else {
            vec![Some(model.to_owned())]
        };
        let mut balances: Vec<pb::Balance> = Vec::new();
        for m in &models {
            let ev = q.ledger.evaluate(&Ask {
                principal: &principal,
                model: m.as_deref(),
                estimate: TokenClasses::default(),
                lease: LeaseStep::Bypass,
            });
            for c in &ev.considered {
                if !balances.iter().any(|b| b.budget == c.status.name) {
                    balances.push(balance(&c.status, &c.key.member));
                }
            }
        }
        balances.sort_by(|a, b| a.budget.cmp(&b.budget));
        Ok(Response::new(pb::GetBalanceResponse { balances }))
    }
}

fn record_deny(ledger: &Ledger, principal: &Principal, model: &str, d: &Denial) {
    ledger.record_deny(crate::store::DenyEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        request_id: format!("quota:{}", uuid::Uuid::now_v7().simple()),
        ts_ms: ledger.clock().now().timestamp_millis(),
        principal: principal.key(),
        model: model.to_owned(),
        budget_name: d.status.name.clone(),
        reason: d.reason.as_str().to_owned(),
        unit: d.status.unit.as_str().to_owned(),
        used: d.status.used,
        limit: d.status.limit,
    });
}
