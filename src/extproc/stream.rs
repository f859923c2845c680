//! One Envoy ext_proc stream = one HTTP request. A synchronous, IO-free state machine: each
//! inbound message yields exactly one reply (or none in observability mode); the task in `mod.rs`
//! sends it and, for response body chunks, feeds the chunk to the meter *after* sending.
//!
//! Life of a request: request headers (identity, route) → [buffered request body (model, bounds,
//! stream; maybe inject include_usage)] → decide and reserve → response headers (flip the body to
//! STREAMED for metering; budget headers) → body chunks (metered) → end of stream → settle once.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use ep::processing_request::Request as In;

use super::Shared;
use super::reply;
use super::request::{self, BodyFacts, Family};
use crate::identity::Evidence;
use crate::meter::{Api, BodyFormat, Encoding, Meter, Metered, estimate_tokens};
use crate::policy::{
    Admission, Ask, BudgetStatus, LeaseStep, Principal, Reservation, TokenClasses,
};
use crate::store::DenyEvent;

/// Per-route hints Envoy sends as gRPC initial metadata (`grpc_initial_metadata` on the route).
#[derive(Debug, Clone, Default)]
pub struct RouteHints {
    pub family: Option<(Family, Api)>,
    pub model: Option<String>,
    pub inject_usage: Option<bool>,
}

/// What the task does with a message after computing the reply.
pub enum Step {
    NoReply,
    Reply(ep::ProcessingResponse),
    /// A response body chunk: send the reply, then meter the bytes.
    ReplyThenMeter(ep::ProcessingResponse, Vec<u8>, bool),
    /// Lease mode: ask for these leases, then [`StreamState::resume`] gives the reply.
    AwaitLease(Vec<crate::policy::LeaseNeed>),
}

/// The outcome of a decision.
enum Decided {
    Admitted,
    /// Denied (or refused): the local reply to send.
    Refused(Box<ep::ProcessingResponse>),
    Wait(Vec<crate::policy::LeaseNeed>),
}

/// Which message waits for a lease, and what its reply carries once admitted.
enum Waiting {
    Headers,
    Body(Option<Vec<u8>>),
}

/// How the stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Envoy closed its side cleanly.
    Closed,
    /// The stream failed: client disconnect, reset, Envoy gave up.
    Aborted,
    /// Shutdown's grace period ran out: we stop processing and Envoy finishes the request
    /// without us, so the rest of the response is unseen — it is charged its reserved bound.
    Shutdown,
}

enum Phase {
    /// Waiting for request headers.
    Start,
    /// Buffering the request body before deciding.
    AwaitingBody,
    /// Admitted: holds a reservation (possibly on no budget at all).
    Admitted,
    /// Response headers were 2xx: metering the body.
    Metering,
    /// Nothing left to do (denied, settled, released).
    Done,
}

pub struct StreamState {
    shared: Arc<Shared>,
    hints: RouteHints,
    phase: Phase,
    request_id: String,
    principal: Option<Principal>,
    family: Family,
    api: Api,
    /// The route allows adding `stream_options.include_usage`.
    injectable: bool,
    model: Option<String>,
    body: Vec<u8>,
    facts: BodyFacts,
    prompt_estimate: u64,
    reservation: Reservation,
    binding: Option<BudgetStatus>,
    meter: Option<Meter>,
    /// The response body reached its end (`end_of_stream` on a body or trailers message).
    response_ended: bool,
    /// We added `include_usage` the client did not ask for: withhold the usage-only event.
    strip_usage_event: bool,
    /// The settled debit's sequence number in the ledger, once settled.
    settled_seq: Option<u64>,
    /// Output tokens reserved (the request's bound or the default).
    output_bound: u64,
    /// Lease mode: the message whose reply waits for a lease.
    waiting: Option<Waiting>,
}

fn header_value<'a>(headers: &'a [HeaderValue], name: &str) -> Option<&'a str> {
    let h = headers.iter().find(|h| h.key == name)?;
    if h.raw_value.is_empty() {
        Some(h.value.as_str())
    } else {
        std::str::from_utf8(&h.raw_value).ok()
    }
}

impl StreamState {
    pub fn new(shared: Arc<Shared>, hints: RouteHints) -> Self {
        StreamState {
            shared,
            hints,
            phase: Phase::Start,
            request_id: String::new(),
            principal: None,
            family: Family::OpenAi,
            api: Api::OpenAi,
            injectable: false,
            model: None,
            body: Vec::new(),
            facts: BodyFacts::default(),
            prompt_estimate: 0,
            reservation: Reservation::default(),
            binding: None,
            meter: None,
            response_ended: false,
            strip_usage_event: false,
            settled_seq: None,
            output_bound: 0,
            waiting: None,
        }
    }

    /// The ledger sequence number of this request's debit, once settled.
    pub fn settled_seq(&self) -> Option<u64> {
        self.settled_seq
    }

    /// The reservation outlived `reservation_ttl`: give the budget back now. The stream goes on
    /// and is still charged its usage when it ends.
    pub fn expire_reservation(&mut self) {
        if matches!(self.phase, Phase::Admitted | Phase::Metering) {
            let ledger = &self.shared.ledger;
            ledger.release(&self.reservation);
            for held in &mut self.reservation.entries {
                held.amount = crate::policy::Amount::default();
            }
            ledger.metrics.reservations_expired.inc();
            tracing::warn!(request_id = %self.request_id, "reservation expired on a stream still open");
        }
    }

    /// Bytes this stream holds beyond its fixed size (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.body.capacity() + self.meter.as_ref().map_or(0, Meter::buffered)
    }

    pub fn on_message(&mut self, msg: ep::ProcessingRequest) -> Step {
        let Some(req) = msg.request else {
            // A message with no phase (flow control only) expects no reply.
            return Step::NoReply;
        };
        match req {
            In::RequestHeaders(h) => self.on_request_headers(h, msg.metadata_context.as_ref()),
            In::RequestBody(b) => self.on_request_body(b),
            In::RequestTrailers(_) => Step::Reply(reply::trailers_pass(true)),
            In::ResponseHeaders(h) => Step::Reply(self.on_response_headers(h)),
            In::ResponseBody(b) => {
                let reply = match self
                    .strip_usage_event
                    .then(|| crate::meter::openai::usage_only_event(&b.body))
                {
                    Some(Some(r)) => {
                        let mut shown = Vec::with_capacity(b.body.len() - r.len());
                        shown.extend_from_slice(&b.body[..r.start]);
                        shown.extend_from_slice(&b.body[r.end..]);
                        reply::response_body_replaced(shown)
                    }
                    _ => reply::body_pass(false),
                };
                Step::ReplyThenMeter(reply, b.body, b.end_of_stream)
            }
            In::ResponseTrailers(_) => {
                self.response_ended = true;
                self.finish(End::Closed);
                Step::Reply(reply::trailers_pass(false))
            }
        }
    }

    fn on_request_headers(
        &mut self,
        h: ep::HttpHeaders,
        metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
    ) -> Step {
        let headers = h.headers.map(|m| m.headers).unwrap_or_default();
        let get = |name: &str| header_value(&headers, name);
        self.request_id =
            get("x-request-id").map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned);
        let route = request::route_facts(get(":path").unwrap_or("/"));
        (self.family, self.api) = self.hints.family.unwrap_or((route.family, route.api));
        self.model = self.hints.model.clone().or(route.model);
        self.injectable = route.injectable
            && self.api == Api::OpenAi
            && self
                .hints
                .inject_usage
                .unwrap_or(self.shared.config.inject_include_usage);

        let evidence = Evidence {
            header: &get,
            metadata: metadata.map(|m| &m.filter_metadata),
        };
        self.principal = self.shared.config.identity.resolve(&evidence);
        if self.principal.is_none() {
            self.phase = Phase::Done;
            tracing::debug!(request_id = %self.request_id, "no identity");
            self.shared.ledger.metrics.decisions.no_identity.inc();
            return Step::Reply(reply::no_identity(self.family));
        }
        let has_body = !h.end_of_stream && get(":method") == Some("POST");
        let wants_body =
            self.model.is_none() || self.injectable || self.shared.config.always_read_body;
        if has_body && wants_body {
            let length: Option<u64> = get("content-length").and_then(|v| v.trim().parse().ok());
            match length {
                // Too large to buffer (Envoy would stall or refuse it, and we would hold it all):
                // decide from the headers, with the prompt estimated from its length.
                Some(n) if n > self.shared.config.max_body_bytes => {
                    self.shared.ledger.metrics.bodies_not_read.inc();
                    tracing::info!(request_id = %self.request_id, bytes = n,
                        "request body too large to read; deciding from its length");
                    self.facts = BodyFacts {
                        prompt_bytes: n,
                        choices: 1,
                        ..BodyFacts::default()
                    };
                }
                _ => {
                    self.phase = Phase::AwaitingBody;
                    return Step::Reply(reply::request_headers(Some(reply::buffer_request_body())));
                }
            }
        }
        self.decided(LeaseStep::Acquire, Waiting::Headers)
    }

    /// Turns a decision into the step for the message that asked for it.
    fn decided(&mut self, lease: LeaseStep, waiting: Waiting) -> Step {
        match self.decide(lease) {
            Decided::Admitted => Step::Reply(Self::admitted_reply(waiting)),
            Decided::Refused(r) => Step::Reply(*r),
            Decided::Wait(needs) => {
                self.waiting = Some(waiting);
                Step::AwaitLease(needs)
            }
        }
    }

    fn admitted_reply(waiting: Waiting) -> ep::ProcessingResponse {
        match waiting {
            Waiting::Headers => reply::request_headers(None),
            Waiting::Body(Some(new_body)) => reply::request_body_replaced(new_body),
            Waiting::Body(None) => reply::body_pass(true),
        }
    }

    /// Lease mode: the reply to the message that waited for a lease. `answered`: the store
    /// answered the lease asks (else the budgets' state is unknown and `no_state` decides).
    pub fn resume(&mut self, answered: bool) -> ep::ProcessingResponse {
        let waiting = self.waiting.take().unwrap_or(Waiting::Headers);
        let step = if answered {
            LeaseStep::Final
        } else if self.shared.config.no_state == super::NoState::Allow {
            LeaseStep::Bypass
        } else {
            self.phase = Phase::Done;
            self.shared.ledger.metrics.decisions.no_state.inc();
            return reply::no_state(self.family);
        };
        match self.decide(step) {
            Decided::Admitted => Self::admitted_reply(waiting),
            Decided::Refused(r) => *r,
            // A final decision never waits; should it, the budgets' state is unknown.
            Decided::Wait(_) => {
                self.phase = Phase::Done;
                reply::no_state(self.family)
            }
        }
    }

    fn on_request_body(&mut self, b: ep::HttpBody) -> Step {
        if !matches!(self.phase, Phase::AwaitingBody) {
            return Step::Reply(reply::body_pass(true));
        }
        if self.body.is_empty() {
            self.body = b.body;
        } else {
            self.body.extend_from_slice(&b.body);
        }
        if !b.end_of_stream {
            return Step::Reply(reply::body_pass(true));
        }
        let body = std::mem::take(&mut self.body);
        let mut replaced = None;
        match request::body_facts(&body) {
            Some(facts) => {
                if self.model.is_none() {
                    self.model = facts.model.clone();
                }
                if self.injectable {
                    replaced = request::inject_include_usage(&body, &facts);
                    self.strip_usage_event = replaced.is_some();
                }
                self.facts = facts;
            }
            // Not JSON: the upstream owns that error. Admit against what applies, meter by estimate.
            None => {
                self.facts = BodyFacts {
                    prompt_bytes: body.len() as u64,
                    choices: 1,
                    ..BodyFacts::default()
                }
            }
        }
        self.decided(LeaseStep::Acquire, Waiting::Body(replaced))
    }

    /// Admission from memory. On deny returns the local reply and records the deny event.
    fn decide(&mut self, lease: LeaseStep) -> Decided {
        let cfg = &self.shared.config;
        let Some(principal) = self.principal.as_ref() else {
            return Decided::Admitted;
        };
        if cfg.no_state == super::NoState::Deny && !self.shared.ledger.is_ready() {
            self.phase = Phase::Done;
            self.shared.ledger.metrics.decisions.no_state.inc();
            return Decided::Refused(Box::new(reply::no_state(self.family)));
        }
        self.prompt_estimate = estimate_tokens(self.facts.prompt_bytes);
        let mut output = self.facts.max_output.unwrap_or(cfg.default_output_tokens);
        if let Some(cap) = cfg.max_output_reservation {
            output = output.min(cap);
        }
        let output = output.saturating_mul(self.facts.choices.max(1));
        self.output_bound = output;
        let ask = Ask {
            principal,
            model: self.model.as_deref(),
            estimate: TokenClasses {
                input: self.prompt_estimate,
                output,
                ..Default::default()
            },
            lease,
        };
        let ledger = &self.shared.ledger;
        let started = std::time::Instant::now();
        let admission = ledger.admit(&ask);
        let decisions = &ledger.metrics.decisions;
        ledger
            .metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        let now = ledger.clock().now();
        let (shadow, outcome) = match admission {
            Admission::Pending { needs } => return Decided::Wait(needs),
            Admission::Allowed {
                reservation,
                binding,
                shadow,
                ..
            } => {
                self.reservation = reservation;
                self.binding = binding;
                self.phase = Phase::Admitted;
                decisions.allowed.inc();
                if !shadow.is_empty() {
                    decisions.shadow_would_deny.inc();
                }
                (shadow, Decided::Admitted)
            }
            Admission::Denied { denial, shadow } => {
                self.phase = Phase::Done;
                tracing::info!(request_id = %self.request_id, principal = %principal.key(),
                    budget = %denial.status.name, reason = ?denial.reason, "denied");
                self.record_deny(&denial, "");
                match denial.reason {
                    crate::policy::DenyReason::ModelNotPriced => decisions.denied_unpriced.inc(),
                    _ => decisions.denied.inc(),
                };
                (
                    shadow,
                    Decided::Refused(Box::new(reply::denied(
                        &denial,
                        self.family,
                        &self.request_id,
                        now,
                    ))),
                )
            }
        };
        for d in &shadow {
            tracing::info!(request_id = %self.request_id, budget = %d.status.name, reason = ?d.reason, "shadow budget would deny");
            self.record_deny(d, "shadow:");
        }
        outcome
    }

    fn record_deny(&self, d: &crate::policy::Denial, prefix: &str) {
        let reason = d.reason.as_str();
        let ledger = &self.shared.ledger;
        ledger.record_deny(DenyEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            request_id: self.request_id.clone(),
            ts_ms: ledger.clock().now().timestamp_millis(),
            principal: self
                .principal
                .as_ref()
                .map(Principal::key)
                .unwrap_or_default(),
            model: self.model.clone().unwrap_or_default(),
            budget_name: d.status.name.clone(),
            reason: format!("{prefix}{reason}"),
            unit: d.status.unit.as_str().to_owned(),
            used: d.status.used,
            limit: d.status.limit,
        });
    }

    fn on_response_headers(&mut self, h: ep::HttpHeaders) -> ep::ProcessingResponse {
        if !matches!(self.phase, Phase::Admitted) {
            return reply::response_headers(Vec::new(), None);
        }
        let headers = h.headers.map(|m| m.headers).unwrap_or_default();
        let get = |name: &str| header_value(&headers, name);
        let status: u16 = get(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        let now = self.shared.ledger.clock().now();
        let set = self
            .binding
            .as_ref()
            .filter(|_| self.shared.config.budget_headers != reply::BudgetHeaders::None)
            .map(|b| reply::budget_headers(b, now, self.shared.config.budget_headers))
            .unwrap_or_default();
        if !(200..300).contains(&status) {
            // Upstream error: it carries no usage; the reservation is released.
            self.shared.ledger.release(&self.reservation);
            self.phase = Phase::Done;
            return reply::response_headers(set, None);
        }
        let format = BodyFormat::from_content_type(get("content-type").unwrap_or("").as_bytes());
        let encoding = Encoding::from_header(get("content-encoding").map(str::as_bytes));
        self.meter = Some(Meter::new(
            self.api,
            format,
            encoding,
            self.shared.config.meter,
        ));
        self.phase = Phase::Metering;
        if h.end_of_stream {
            self.response_ended = true;
            self.finish(End::Closed);
            return reply::response_headers(set, None);
        }
        reply::response_headers(set, Some(reply::stream_response_body()))
    }

    /// Meters a response body chunk (its reply was already sent).
    pub fn meter_chunk(&mut self, chunk: &[u8], end_of_stream: bool) {
        if let Some(m) = self.meter.as_mut() {
            m.feed(chunk);
        }
        if end_of_stream {
            self.response_ended = true;
            self.finish(End::Closed);
        }
    }

    /// Settles exactly once, however the stream ended. A stream that closes — even cleanly — before
    /// the response body ended was cut short (Envoy closes its side when the client goes away).
    pub fn finish(&mut self, end: End) {
        let aborted = end != End::Closed || !self.response_ended;
        let metered = match self.phase {
            Phase::Admitted => None,
            Phase::Metering => self.meter.as_mut().map(Meter::finish),
            Phase::Start | Phase::AwaitingBody | Phase::Done => {
                self.phase = Phase::Done;
                return;
            }
        };
        self.phase = Phase::Done;
        self.settle(metered, aborted, end == End::Shutdown);
    }

    /// `unseen_rest`: the response goes on without us (shutdown), so an estimate charges the
    /// reserved output bound rather than only the text seen so far.
    fn settle(&mut self, metered: Option<Metered>, aborted: bool, unseen_rest: bool) {
        let m = metered.unwrap_or_default();
        let (tokens, reasoning, estimated) = match m.usage {
            Some(u) => (
                TokenClasses {
                    input: u.input,
                    cache_read: u.cache_read,
                    cache_write: u.cache_write,
                    cache_write_1h: u.cache_write_1h,
                    output: u.output,
                },
                u.reasoning,
                false,
            ),
            None => {
                let seen = estimate_tokens(m.text_bytes);
                let output = if unseen_rest {
                    seen.max(self.output_bound)
                } else {
                    seen
                };
                (
                    TokenClasses {
                        input: self.prompt_estimate,
                        output,
                        ..Default::default()
                    },
                    0,
                    true,
                )
            }
        };
        let outcome = match (aborted, m.upstream_error, m.usage.is_some()) {
            (true, _, _) => "aborted",
            (false, true, _) => "upstream_error",
            (false, false, true) => "complete",
            (false, false, false) => "no_usage",
        };
        if estimated || m.malformed > 0 {
            tracing::info!(request_id = %self.request_id, outcome, malformed = m.malformed, "settling with estimated usage");
        }
        let principal = self
            .principal
            .as_ref()
            .map(Principal::key)
            .unwrap_or_default();
        let settled = self.shared.ledger.settle(crate::ledger::Settlement {
            reservation: std::mem::take(&mut self.reservation),
            event_id: None,
            request_id: std::mem::take(&mut self.request_id),
            principal,
            model: self.model.clone().unwrap_or_else(|| "unknown".to_owned()),
            family: self.api.as_str(),
            tokens,
            reasoning,
            estimated,
            outcome,
        });
        self.settled_seq = Some(settled.seq);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ep::processing_response::Response as Out;

    use super::*;
    use crate::clock::{ManualClock, SharedClock};
    use crate::extproc::ExtProcConfig;
    use crate::ledger::{Ledger, PolicySettings};
    use crate::policy::{
        Action, Budget, BudgetId, Limit, ModelSet, Scope, Subject, SubjectKind, Tokens,
        UnpricedModel, Window, WindowUnit,
    };
    use crate::store::{PolicyRows, PriceRow};

    fn shared(limit: u64) -> Arc<Shared> {
        let clock: SharedClock = Arc::new(ManualClock::new(
            chrono::DateTime::parse_from_rfc3339("2026-12-03T12:00:00Z")
                .unwrap()
                .with_timezone(&chrono::Utc),
        ));
        let ledger = Ledger::new(
            PolicySettings {
                tz: chrono_tz::UTC,
                unpriced: UnpricedModel::Deny,
                models: Default::default(),
                groups: Vec::new(),
            },
            clock,
            100,
            Arc::default(),
        );
        ledger.install_policy(PolicyRows {
            version: 1,
            budgets: vec![Budget {
                id: BudgetId("b1".into()),
                name: "alice daily".into(),
                subject: Subject {
                    kind: SubjectKind::User,
                    name: "alice".into(),
                },
                scope: Scope::Shared,
                models: ModelSet::All,
                limit: Limit::Tokens(Tokens(limit)),
                window: Window::Calendar {
                    unit: WindowUnit::Day,
                    every: 1,
                },
                action: Action::Enforce,
                is_override: false,
                enabled: true,
            }],
            prices: Vec::<PriceRow>::new(),
            members: Vec::new(),
        });
        ledger.set_ready();
        Arc::new(Shared {
            config: ExtProcConfig::default(),
            ledger,
        })
    }

    fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ep::HttpHeaders {
        ep::HttpHeaders {
            headers: Some(crate::testkit::header_map(pairs)),
            end_of_stream,
            ..Default::default()
        }
    }

    fn msg(r: In) -> ep::ProcessingRequest {
        ep::ProcessingRequest {
            request: Some(r),
            ..Default::default()
        }
    }

    fn reply(step: Step) -> ep::ProcessingResponse {
        match step {
            Step::Reply(r) => r,
            Step::ReplyThenMeter(r, _, _) => r,
            Step::NoReply | Step::AwaitLease(_) => panic!("expected a reply"),
        }
    }

    fn request_headers(user: &str) -> In {
        In::RequestHeaders(headers(
            &[
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                ("x-tokenbudget-principal", user),
                ("x-request-id", "r1"),
            ],
            false,
        ))
    }

    fn body(bytes: &[u8], end_of_stream: bool, response: bool) -> In {
        let b = ep::HttpBody {
            body: bytes.to_vec(),
            end_of_stream,
            ..Default::default()
        };
        if response {
            In::ResponseBody(b)
        } else {
            In::RequestBody(b)
        }
    }

    #[test]
    fn every_message_gets_exactly_one_reply_of_its_own_kind() {
        let sh = shared(10_000);
        let mut s = StreamState::new(Arc::clone(&sh), RouteHints::default());
        let r = reply(s.on_message(msg(request_headers("alice"))));
        assert!(matches!(r.response, Some(Out::RequestHeaders(_))));
        assert_eq!(
            r.mode_override.unwrap().request_body_mode,
            2,
            "BUFFERED to read the model"
        );

        let r = reply(s.on_message(msg(body(
            br#"{"model":"gpt-4o","stream":true,"max_tokens":10,"messages":[]}"#,
            true,
            false,
        ))));
        let Some(Out::RequestBody(b)) = r.response else {
            panic!("{r:?}")
        };
        let common = b.response.unwrap();
        let Some(ep::body_mutation::Mutation::Body(new_body)) =
            common.body_mutation.unwrap().mutation
        else {
            panic!()
        };
        assert!(
            String::from_utf8(new_body)
                .unwrap()
                .contains(r#""include_usage":true"#)
        );

        let r = reply(s.on_message(msg(In::ResponseHeaders(headers(
            &[(":status", "200"), ("content-type", "text/event-stream")],
            false,
        )))));
        let Some(Out::ResponseHeaders(h)) = &r.response else {
            panic!()
        };
        let set = &h
            .response
            .as_ref()
            .unwrap()
            .header_mutation
            .as_ref()
            .unwrap()
            .set_headers;
        assert!(
            set.iter()
                .any(|h| h.header.as_ref().unwrap().key == "x-tokenbudget-remaining")
        );
        assert_eq!(
            r.mode_override.unwrap().response_body_mode,
            1,
            "STREAMED for metering"
        );

        let chunk = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
        let step = s.on_message(msg(body(chunk, false, true)));
        let Step::ReplyThenMeter(r, bytes, eos) = step else {
            panic!()
        };
        let Some(Out::ResponseBody(rb)) = &r.response else {
            panic!()
        };
        let mutation = rb
            .response
            .as_ref()
            .and_then(|c| c.body_mutation.as_ref())
            .and_then(|m| m.mutation.as_ref());
        let Some(ep::body_mutation::Mutation::Body(shown)) = mutation else {
            panic!("usage event not withheld: {r:?}")
        };
        assert_eq!(
            shown.as_slice(),
            b"data: [DONE]\n\n",
            "the client sees the stream without the injected usage event"
        );
        s.meter_chunk(&bytes, eos);
        let r = reply(s.on_message(msg(In::ResponseTrailers(ep::HttpTrailers::default()))));
        assert!(matches!(r.response, Some(Out::ResponseTrailers(_))));
        s.finish(End::Closed);

        let batch = sh.ledger.take_batch(10).batch;
        assert_eq!(batch.debits.len(), 1, "settled exactly once");
        let e = &batch.debits[0].event;
        assert_eq!(
            (e.input, e.output, e.estimated, e.outcome.as_str()),
            (3, 4, false, "complete")
        );
    }

    #[test]
    fn a_response_body_chunk_allocates_nothing_in_our_code() {
        let sh = shared(1_000_000);
        let mut s = StreamState::new(
            Arc::clone(&sh),
            RouteHints {
                model: Some("m".into()),
                inject_usage: Some(false),
                ..Default::default()
            },
        );
        s.on_message(msg(In::RequestHeaders(headers(
            &[
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                ("x-tokenbudget-principal", "alice"),
            ],
            false,
        ))));
        s.on_message(msg(In::ResponseHeaders(headers(
            &[(":status", "200"), ("content-type", "text/event-stream")],
            false,
        ))));
        let event = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        // Messages as Envoy would deliver them (decoding them is prost's allocation, not ours).
        let mut messages: Vec<ep::ProcessingRequest> = (0..200)
            .map(|_| msg(body(&event.repeat(10)[..700], false, true)))
            .collect();
        for m in messages.drain(..10) {
            if let Step::ReplyThenMeter(_, b, eos) = s.on_message(m) {
                s.meter_chunk(&b, eos);
            }
        }
        let info = allocation_counter::measure(|| {
            for m in messages.drain(..) {
                let Step::ReplyThenMeter(reply, b, eos) = s.on_message(m) else {
                    panic!()
                };
                s.meter_chunk(&b, eos);
                drop(reply);
            }
        });
        assert_eq!(
            info.count_total, 0,
            "{} allocations for 190 chunks",
            info.count_total
        );
        assert!(
            s.buffered() < 2048,
            "carry-over per stream: {} bytes",
            s.buffered()
        );
    }

    #[test]
    fn abort_before_the_response_debits_the_prompt_estimate_once() {
        let sh = shared(10_000);
        let mut s = StreamState::new(Arc::clone(&sh), RouteHints::default());
        s.on_message(msg(request_headers("alice")));
        s.on_message(msg(body(
            br#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"12345678"}]}"#,
            true,
            false,
        )));
        s.finish(End::Aborted);
        s.finish(End::Aborted);
        s.finish(End::Closed);
        let batch = sh.ledger.take_batch(10).batch;
        assert_eq!(batch.debits.len(), 1);
        let e = &batch.debits[0].event;
        assert!(e.estimated);
        assert_eq!(e.outcome, "aborted");
        assert_eq!(e.input, (8 + 16_u64).div_ceil(4));
    }

    #[test]
    fn upstream_errors_release_the_reservation_without_a_debit() {
        let sh = shared(10_000);
        let mut s = StreamState::new(
            Arc::clone(&sh),
            RouteHints {
                model: Some("m".into()),
                ..Default::default()
            },
        );
        s.on_message(msg(In::RequestHeaders(headers(
            &[
                (":method", "GET"),
                (":path", "/x"),
                ("x-tokenbudget-principal", "alice"),
            ],
            true,
        ))));
        let key = crate::policy::CounterKey {
            budget: BudgetId("b1".into()),
            member: "".into(),
        };
        let day = Window::Calendar {
            unit: WindowUnit::Day,
            every: 1,
        };
        assert!(
            sh.ledger.peek(&key, &day).1.tokens > 0,
            "reserved while in flight"
        );
        s.on_message(msg(In::ResponseHeaders(headers(
            &[(":status", "503")],
            false,
        ))));
        s.finish(End::Closed);
        assert_eq!(sh.ledger.peek(&key, &day).1.tokens, 0);
        assert!(sh.ledger.take_batch(10).batch.debits.is_empty());
    }

    #[test]
    fn odd_orderings_get_pass_replies_and_no_debit() {
        let sh = shared(100);
        let mut s = StreamState::new(Arc::clone(&sh), RouteHints::default());
        // Body and response messages before (or without) request headers.
        assert!(matches!(
            reply(s.on_message(msg(body(b"x", true, false)))).response,
            Some(Out::RequestBody(_))
        ));
        assert!(matches!(
            reply(s.on_message(msg(In::ResponseHeaders(headers(
                &[(":status", "200")],
                false
            )))))
            .response,
            Some(Out::ResponseHeaders(_))
        ));
        let Step::ReplyThenMeter(r, b, eos) = s.on_message(msg(body(b"data: x\n\n", true, true)))
        else {
            panic!()
        };
        assert!(matches!(r.response, Some(Out::ResponseBody(_))));
        s.meter_chunk(&b, eos);
        assert!(matches!(
            s.on_message(ep::ProcessingRequest::default()),
            Step::NoReply
        ));
        s.finish(End::Aborted);
        assert!(sh.ledger.take_batch(10).batch.is_empty());
    }

    #[test]
    fn no_identity_is_refused_and_denies_are_recorded() {
        let sh = shared(50);
        let mut s = StreamState::new(Arc::clone(&sh), RouteHints::default());
        let r = reply(s.on_message(msg(In::RequestHeaders(headers(
            &[(":method", "POST"), (":path", "/v1/chat/completions")],
            false,
        )))));
        let Some(Out::ImmediateResponse(i)) = r.response else {
            panic!()
        };
        assert_eq!(i.status.unwrap().code, 401);

        let mut s = StreamState::new(
            Arc::clone(&sh),
            RouteHints {
                model: Some("m".into()),
                inject_usage: Some(false),
                ..Default::default()
            },
        );
        let r = reply(s.on_message(msg(request_headers("alice"))));
        assert!(
            r.mode_override.is_none(),
            "model known and no injection: no body needed"
        );
        let Some(Out::ImmediateResponse(i)) = r.response else {
            panic!("{r:?}")
        };
        assert_eq!(
            i.status.unwrap().code,
            429,
            "default 1024 output tokens never fit 50"
        );
        let batch = sh.ledger.take_batch(10).batch;
        assert_eq!(batch.denies.len(), 1);
        assert_eq!(batch.denies[0].reason, "never_fits");
    }
}
