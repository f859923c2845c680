//! A fake OpenAI-compatible model server for the tests and the demo: chat completions and
//! Databricks invocations, streaming (SSE, usage in the last chunk only when the request asks for
//! it, like OpenAI) and non-streaming. Each request's behaviour is set by request headers:
//!
//! - `x-fake-usage: PROMPT,COMPLETION[,CACHED[,REASONING]]` — usage to report (default 10,20)
//! - `x-fake-chunks: N` — content chunks in a stream (default 3)
//! - `x-fake-delay-ms: MS` — pause before each chunk; `x-fake-first-delay-ms: MS` — before the headers
//! - `x-fake-cut-after: N` — after N chunks, send half an event and abort the connection
//! - `x-fake-malformed: 1` — send a usage chunk whose JSON is cut off
//! - `x-fake-status: CODE` — answer with this HTTP error
//! - `x-fake-huge-event: BYTES` — stream one SSE event of that many bytes (no line end until its
//!   end, in 64 KiB pieces) before the usage chunk: a pathological stream
//! - `x-fake-fixture: NAME` — answer with `tests/fixtures/NAME.body` (its content type from
//!   `NAME.toml`) in 64-byte pieces; with `x-fake-gzip: 1` gzipped; with
//!   `x-fake-cut-at-byte: N` the connection is cut after N bytes
//!
//! Every request is recorded (`requests()` in process, `GET /_fake/requests` over HTTP).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::{Value, json};

/// What the fake saw and answered, per request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Seen {
    pub request_id: String,
    pub path: String,
    pub model: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// (prompt, completion, cached, reasoning) as reported in the response, if it was.
    pub usage_sent: Option<(u64, u64, u64, u64)>,
    /// Identity headers that reached the upstream (they never should).
    pub principal_header: Option<String>,
    pub authorization: Option<String>,
    pub accept_encoding: Option<String>,
}

#[derive(Clone, Default)]
pub struct FakeModel {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Keep nothing (benchmarks: millions of requests).
    forget: bool,
}

impl FakeModel {
    /// A fake that records nothing.
    pub fn forgetful() -> FakeModel {
        FakeModel {
            forget: true,
            ..FakeModel::default()
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn by_request_id(&self, id: &str) -> Option<Seen> {
        self.requests().into_iter().find(|s| s.request_id == id)
    }
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, fake: FakeModel) -> std::io::Result<()> {
    let app = Router::new()
        .route("/_fake/requests", get(list))
        .route("/v1/models", get(models))
        .route("/{*path}", post(complete))
        // Prompts can be large (images, long documents); the tests send up to 8 MiB.
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(fake);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}

/// Starts on an ephemeral port in the current runtime.
pub async fn start() -> std::io::Result<(SocketAddr, FakeModel)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let fake = FakeModel::default();
    tokio::spawn(serve(listener, fake.clone()));
    Ok((addr, fake))
}

/// `GET /v1/models`: a route that is not an LLM call (the per-route examples leave it unmetered).
async fn models() -> Response {
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}),
    )
}

async fn list(State(fake): State<FakeModel>) -> impl IntoResponse {
    axum::Json(fake.requests())
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn num(h: &HeaderMap, name: &str, default: u64) -> u64 {
    header(h, name)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

async fn complete(
    State(fake): State<FakeModel>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_string();
    let model = req["model"].as_str().map(str::to_owned).or_else(|| {
        path.strip_prefix("/serving-endpoints/")
            .and_then(|r| r.strip_suffix("/invocations"))
            .map(str::to_owned)
    });
    let stream = req["stream"].as_bool().unwrap_or(false);
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let usage: Vec<u64> = header(&headers, "x-fake-usage")
        .unwrap_or("10,20")
        .split(',')
        .map(|v| v.trim().parse().unwrap_or(0))
        .collect();
    let u = |i: usize| usage.get(i).copied().unwrap_or(0);
    let (prompt, completion, cached, reasoning) = (u(0), u(1), u(2), u(3));
    let chunks = num(&headers, "x-fake-chunks", 3);
    let delay = Duration::from_millis(num(&headers, "x-fake-delay-ms", 0));
    let first_delay = Duration::from_millis(num(&headers, "x-fake-first-delay-ms", 0));
    let cut_after = header(&headers, "x-fake-cut-after").and_then(|v| v.parse::<u64>().ok());
    let malformed = header(&headers, "x-fake-malformed") == Some("1");
    let status = num(&headers, "x-fake-status", 200);
    let fixture = header(&headers, "x-fake-fixture").map(str::to_owned);
    let huge = num(&headers, "x-fake-huge-event", 0) as usize;

    let reports_usage = req.is_object()
        && status == 200
        && cut_after.is_none()
        && !malformed
        && (!stream || include_usage);
    let seen = Seen {
        request_id: header(&headers, "x-request-id").unwrap_or("").to_owned(),
        path,
        model: model.clone(),
        stream,
        include_usage,
        usage_sent: reports_usage.then_some((prompt, completion, cached, reasoning)),
        principal_header: header(&headers, "x-tokenbudget-principal").map(str::to_owned),
        authorization: header(&headers, "authorization").map(str::to_owned),
        accept_encoding: header(&headers, "accept-encoding").map(str::to_owned),
    };
    if !fake.forget
        && let Ok(mut s) = fake.seen.lock()
    {
        s.push(seen);
    }
    if let Some(name) = fixture {
        return serve_fixture(&name, &headers).await;
    }
    if !first_delay.is_zero() {
        tokio::time::sleep(first_delay).await;
    }
    if !req.is_object() {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": "invalid JSON body", "type": "invalid_request_error", "param": null, "code": null}}),
        );
    }
    if status != 200 {
        let code = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return json_response(
            code,
            json!({"error": {"message": "fake upstream error", "type": "server_error", "param": null, "code": null}}),
        );
    }
    let model = model.unwrap_or_else(|| "unknown".into());
    let usage_json = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    });
    if !stream {
        return json_response(
            StatusCode::OK,
            json!({
                "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake model."}, "finish_reason": "stop"}],
                "usage": usage_json,
            }),
        );
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        if huge > 0 {
            let mut left = huge;
            let _ = tx.send(Ok(Bytes::from_static(b"data: {\"pad\":\""))).await;
            while left > 0 {
                let n = left.min(64 * 1024);
                left -= n;
                if tx.send(Ok(Bytes::from(vec![b'x'; n]))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Ok(Bytes::from_static(b"\"}\n\n"))).await;
        }
        for i in 0..chunks {
            if cut_after == Some(i) {
                // Cut in the middle of an event, after what was sent reached the wire.
                let _ = tx
                    .send(Ok(Bytes::from_static(
                        b"data: {\"id\":\"chatcmpl-fake\",\"choices\":[{\"delta\":{\"con",
                    )))
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err(std::io::Error::other("fake cut"))).await;
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let chunk = json!({
                "id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": format!("word{i} ")}, "finish_reason": if i + 1 == chunks { Value::from("stop") } else { Value::Null }}],
                "usage": null,
            });
            if tx
                .send(Ok(Bytes::from(format!("data: {chunk}\n\n"))))
                .await
                .is_err()
            {
                return;
            }
        }
        if cut_after.is_some() {
            let _ = tx.send(Err(std::io::Error::other("fake cut"))).await;
            return;
        }
        if malformed {
            let _ = tx
                .send(Ok(Bytes::from_static(
                    b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tok\n\n",
                )))
                .await;
        } else if include_usage {
            let last = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage_json});
            let _ = tx.send(Ok(Bytes::from(format!("data: {last}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn json_response(code: StatusCode, v: Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

/// Serves a recorded provider response from `tests/fixtures/`.
async fn serve_fixture(name: &str, headers: &HeaderMap) -> Response {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (Ok(mut body), Ok(meta)) = (
        std::fs::read(dir.join(format!("{name}.body"))),
        std::fs::read_to_string(dir.join(format!("{name}.toml"))),
    ) else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no fixture {name}")}),
        );
    };
    let content_type = meta
        .lines()
        .find_map(|l| l.strip_prefix("content_type = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or("application/json")
        .to_owned();
    let gzip = header(headers, "x-fake-gzip") == Some("1");
    if gzip {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = enc.write_all(&body);
        body = enc.finish().unwrap_or_default();
    }
    let cut = header(headers, "x-fake-cut-at-byte").and_then(|v| v.parse::<usize>().ok());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let end = cut.unwrap_or(body.len()).min(body.len());
        for piece in body[..end].chunks(64) {
            if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if cut.is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Err(std::io::Error::other("fake cut"))).await;
        }
    });
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type);
    if gzip {
        resp = resp.header("content-encoding", "gzip");
    }
    resp.body(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
