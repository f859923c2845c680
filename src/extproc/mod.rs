//! The Envoy boundary: the `ExternalProcessor` gRPC service.
//!
//! One task and one [`StreamState`] per Envoy stream (= per HTTP request). The task answers every
//! message in order, exactly once (never in observability mode), sends body-chunk replies before
//! metering the chunk, and settles the request when the stream ends however it ends: end of
//! stream, clean close, client abort or reset.
//!
//! **Invariant:** no await on the store, no lock, and no allocation beyond the message itself
//! between receiving a response body chunk and replying to it — except the single chunk whose
//! injected usage-only event is withheld from the client, which is copied once without it.
//! **Boundary:** knows the ledger's `admit`/`settle`/`release`, never the store.

pub mod reply;
pub mod request;
pub mod stream;

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use ep::external_processor_server::ExternalProcessor;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::identity::IdentityConfig;
use crate::ledger::Ledger;
use crate::meter::MeterLimits;
pub use request::Family;
pub use stream::{End, RouteHints, Step, StreamState};

/// Settings of the request path.
#[derive(Debug, Clone)]
pub struct ExtProcConfig {
    pub identity: IdentityConfig,
    /// Output tokens reserved when the request sets no bound.
    pub default_output_tokens: u64,
    /// Caps the output part of a reservation (clients that always send huge `max_tokens`).
    pub max_output_reservation: Option<u64>,
    /// Add `stream_options.include_usage` to streamed OpenAI chat requests that lack it.
    pub inject_include_usage: bool,
    /// Buffer the request body even when the model is known (for prompt estimates).
    pub always_read_body: bool,
    pub meter: MeterLimits,
    /// A stream still open this long after admission gives its reservation back (its usage is
    /// still charged when it ends): a stuck stream must not hold budget forever.
    pub reservation_ttl: std::time::Duration,
    /// Hold the reply to a response's last chunk until its debit is on disk in the journal.
    pub durable_settle: bool,
    /// What to do with a request whose budget state is unknown (see [`NoState`]).
    pub no_state: NoState,
    /// Request bodies declared larger than this are not read: the request is decided from its
    /// headers (prompt estimated from `content-length`; model from the route or path).
    pub max_body_bytes: u64,
}

/// A request whose budgets have no state in memory — the store has not answered since start and
/// there was no local snapshot; in lease mode, a budget with no lease while the store is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoState {
    /// Refuse with 503 and `retry-after: 1` (the default: no request passes unbudgeted).
    Deny,
    /// Let it through; its usage is metered and stored, but no budget counts it if none is
    /// known yet (in lease mode: it is admitted against the last known global usage).
    Allow,
}

impl Default for ExtProcConfig {
    fn default() -> Self {
        ExtProcConfig {
            identity: IdentityConfig::default(),
            default_output_tokens: 1024,
            max_output_reservation: None,
            inject_include_usage: true,
            always_read_body: false,
            meter: MeterLimits::default(),
            reservation_ttl: std::time::Duration::from_secs(3600),
            durable_settle: false,
            no_state: NoState::Deny,
            max_body_bytes: 4 << 20,
        }
    }
}

pub struct Shared {
    pub config: ExtProcConfig,
    pub ledger: Arc<Ledger>,
}

#[derive(Clone)]
pub struct ExtProcService {
    shared: Arc<Shared>,
    /// Turned true when shutdown's grace period is over: open streams stop and settle as aborted.
    abort: watch::Receiver<bool>,
    abort_tx: Arc<watch::Sender<bool>>,
}

impl ExtProcService {
    pub fn new(config: ExtProcConfig, ledger: Arc<Ledger>) -> Self {
        let (abort_tx, abort) = watch::channel(false);
        ExtProcService {
            shared: Arc::new(Shared { config, ledger }),
            abort,
            abort_tx: Arc::new(abort_tx),
        }
    }

    pub fn active_streams(&self) -> i64 {
        self.shared.ledger.metrics.active_streams.get()
    }

    /// Ends every open stream now; each settles as aborted (with its estimate).
    pub fn abort_all(&self) {
        self.abort_tx.send_replace(true);
    }
}

/// Route hints from the gRPC initial metadata Envoy attaches per route.
fn hints(md: &tonic::metadata::MetadataMap) -> RouteHints {
    let get = |k: &str| {
        md.get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    RouteHints {
        family: get("x-tokenbudget-family").and_then(request::parse_hint),
        model: get("x-tokenbudget-model").map(str::to_owned),
        inject_usage: get("x-tokenbudget-inject-usage").map(|v| v == "true"),
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ReceiverStream<Result<ep::ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ep::ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let hints = hints(request.metadata());
        let inbound = request.into_inner();
        // Replies are sent in order and Envoy pipelines body chunks: a few slots suffice.
        let (tx, rx) = mpsc::channel(8);
        let state = StreamState::new(Arc::clone(&self.shared), hints);
        tokio::spawn(run_stream(
            Arc::clone(&self.shared),
            state,
            inbound,
            tx,
            self.abort.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn run_stream(
    shared: Arc<Shared>,
    mut state: StreamState,
    mut inbound: Streaming<ep::ProcessingRequest>,
    tx: mpsc::Sender<Result<ep::ProcessingResponse, Status>>,
    mut abort: watch::Receiver<bool>,
) {
    shared.ledger.metrics.active_streams.inc();
    let ttl = tokio::time::sleep(shared.config.reservation_ttl);
    tokio::pin!(ttl);
    let mut ttl_armed = true;
    let durable = shared.config.durable_settle;
    let end = loop {
        let msg = tokio::select! {
            biased;
            m = inbound.message() => m,
            _ = abort.wait_for(|a| *a) => break End::Shutdown,
            _ = &mut ttl, if ttl_armed => {
                ttl_armed = false;
                state.expire_reservation();
                continue;
            }
        };
        match msg {
            Ok(Some(msg)) => {
                let observe = msg.observability_mode;
                let sent = match state.on_message(msg) {
                    Step::NoReply => true,
                    Step::AwaitLease(needs) => {
                        let answered = shared.ledger.acquire_leases(needs).await;
                        let r = state.resume(answered);
                        observe || tx.send(Ok(r)).await.is_ok()
                    }
                    Step::Reply(r) => observe || tx.send(Ok(r)).await.is_ok(),
                    // The last chunk, when its debit must be on disk before the client sees the end.
                    Step::ReplyThenMeter(r, body, true) if durable => {
                        state.meter_chunk(&body, true);
                        if let Some(seq) = state.settled_seq() {
                            shared.ledger.wait_durable(seq).await;
                        }
                        observe || tx.send(Ok(r)).await.is_ok()
                    }
                    Step::ReplyThenMeter(r, body, eos) => {
                        let ok = observe || tx.send(Ok(r)).await.is_ok();
                        state.meter_chunk(&body, eos);
                        ok
                    }
                };
                if !sent {
                    break End::Aborted;
                }
            }
            // Envoy half-closed: drop our sender (below) so tonic ends the stream with OK.
            Ok(None) => break End::Closed,
            Err(_) => break End::Aborted,
        }
    };
    state.finish(end);
    shared.ledger.metrics.active_streams.dec();
}
