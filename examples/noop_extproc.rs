//! A no-op ext_proc server: it answers every message at once and decides nothing. Envoy in front
//! of it shows what the ext_proc protocol itself costs — the floor any ext_proc design stands on,
//! and what `./scripts/bench` holds tokenbudget to.
//!
//! `cargo run --release --example noop_extproc -- ADDR [--pattern P] [--style S] [--runtime R]`
//!
//! - `--pattern tokenbudget` (default): the message pattern tokenbudget asks of Envoy — a POST's
//!   body BUFFERED (one message) at the request headers, a 2xx response's body STREAMED at the
//!   response headers — so the floor exchanges exactly the messages tokenbudget does.
//!   `--pattern headers`: request and response headers only.
//! - `--style stream` (default): replies computed in the response stream itself; `task`: one task
//!   and one channel per Envoy stream.
//! - `--runtime current` (default: one thread) or `multi` (one worker per core).

use std::pin::Pin;

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
    ProcessingMode, processing_mode::BodySendMode,
};
use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use ep::external_processor_server::{ExternalProcessor, ExternalProcessorServer};
use ep::processing_request::Request as In;
use ep::processing_response::Response as Out;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// ReqH → body BUFFERED, ReqB, RespH → 2xx body STREAMED, RespB…
    Tokenbudget,
    /// ReqH (→ body BUFFERED, response headers SKIP, response body STREAMED), ReqB, RespB…
    Lean,
    /// ReqH → body BUFFERED and response headers SKIP, ReqB: the awaited part of a gate whose
    /// response is seen elsewhere (an observability tap, or trailers).
    Gate,
    /// Request and response headers only.
    Headers,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    Stream,
    Task,
}

#[derive(Clone, Copy)]
struct Noop {
    pattern: Pattern,
    style: Style,
}

fn status_2xx(h: &ep::HttpHeaders) -> bool {
    h.headers.as_ref().is_some_and(|m| {
        m.headers.iter().any(|h| {
            h.key == ":status" && (h.raw_value.first() == Some(&b'2') || h.value.starts_with('2'))
        })
    })
}

fn is_post(h: &ep::HttpHeaders) -> bool {
    h.headers.as_ref().is_some_and(|m| {
        m.headers
            .iter()
            .any(|h| h.key == ":method" && (h.raw_value == b"POST" || h.value == "POST"))
    })
}

static SPIN_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn reply(pattern: Pattern, m: ep::ProcessingRequest) -> Option<ep::ProcessingResponse> {
    let spin = SPIN_NS.load(std::sync::atomic::Ordering::Relaxed);
    if spin > 0 {
        let t = std::time::Instant::now();
        while (t.elapsed().as_nanos() as u64) < spin {
            std::hint::spin_loop();
        }
    }
    if m.observability_mode {
        return None;
    }
    let common = || Some(ep::CommonResponse::default());
    let mut mode = None;
    let r = match m.request? {
        In::RequestHeaders(h) => {
            let post = !h.end_of_stream && is_post(&h);
            let buffered = BodySendMode::Buffered as i32;
            let skip = ProcessingMode::default().response_header_mode;
            mode = match pattern {
                Pattern::Tokenbudget if post => Some(ProcessingMode {
                    request_body_mode: buffered,
                    ..Default::default()
                }),
                Pattern::Lean if post => Some(ProcessingMode {
                    request_body_mode: buffered,
                    response_header_mode: envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::HeaderSendMode::Skip as i32,
                    response_body_mode: BodySendMode::Streamed as i32,
                    ..Default::default()
                }),
                Pattern::Gate if post => Some(ProcessingMode {
                    request_body_mode: buffered,
                    response_header_mode: envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::HeaderSendMode::Skip as i32,
                    response_trailer_mode: skip,
                    ..Default::default()
                }),
                _ => None,
            };
            Out::RequestHeaders(ep::HeadersResponse { response: common() })
        }
        In::ResponseHeaders(h) => {
            if pattern == Pattern::Tokenbudget && !h.end_of_stream && status_2xx(&h) {
                mode = Some(ProcessingMode {
                    response_body_mode: BodySendMode::Streamed as i32,
                    ..Default::default()
                });
            }
            Out::ResponseHeaders(ep::HeadersResponse { response: common() })
        }
        In::RequestBody(_) => Out::RequestBody(ep::BodyResponse { response: common() }),
        In::ResponseBody(_) => Out::ResponseBody(ep::BodyResponse { response: common() }),
        In::RequestTrailers(_) => Out::RequestTrailers(ep::TrailersResponse::default()),
        In::ResponseTrailers(_) => Out::ResponseTrailers(ep::TrailersResponse::default()),
    };
    Some(ep::ProcessingResponse {
        response: Some(r),
        mode_override: mode,
        ..Default::default()
    })
}

type Replies = Pin<Box<dyn Stream<Item = Result<ep::ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Noop {
    type ProcessStream = Replies;

    async fn process(
        &self,
        request: Request<Streaming<ep::ProcessingRequest>>,
    ) -> Result<Response<Replies>, Status> {
        let mut inbound = request.into_inner();
        let pattern = self.pattern;
        let out: Replies = match self.style {
            Style::Stream => Box::pin(
                inbound
                    .map_while(|m| m.ok())
                    .filter_map(move |m| reply(pattern, m).map(Ok)),
            ),
            Style::Task => {
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                tokio::spawn(async move {
                    while let Ok(Some(m)) = inbound.message().await {
                        if let Some(r) = reply(pattern, m)
                            && tx.send(Ok(r)).await.is_err()
                        {
                            break;
                        }
                    }
                });
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
            }
        };
        Ok(Response::new(out))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: std::net::SocketAddr = args.next().unwrap_or("127.0.0.1:9003".into()).parse()?;
    let (mut pattern, mut style, mut multi) = (Pattern::Tokenbudget, Style::Stream, false);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match (a.as_str(), v.as_str()) {
            ("--pattern", "tokenbudget") => pattern = Pattern::Tokenbudget,
            ("--pattern", "headers") => pattern = Pattern::Headers,
            ("--pattern", "lean") => pattern = Pattern::Lean,
            ("--pattern", "gate") => pattern = Pattern::Gate,
            ("--style", "stream") => style = Style::Stream,
            ("--style", "task") => style = Style::Task,
            ("--runtime", "current") => multi = false,
            ("--runtime", "multi") => multi = true,
            // Busy work per message, to see how the server's own cost shows through Envoy.
            ("--spin-ns", n) => SPIN_NS.store(n.parse()?, std::sync::atomic::Ordering::Relaxed),
            _ => return Err(format!("unknown argument {a} {v}").into()),
        }
    }
    let rt = if multi {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("no-op ext_proc listening on {}", listener.local_addr()?);
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(1 << 20))
            .initial_connection_window_size(Some(4 << 20))
            .http2_max_pending_accept_reset_streams(Some(100_000))
            .add_service(
                ExternalProcessorServer::new(Noop { pattern, style })
                    .max_decoding_message_size(16 << 20),
            )
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}
