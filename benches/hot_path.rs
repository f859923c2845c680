//! Criterion benchmarks of the per-request hot path: the usage scanner per API family (bytes/s
//! over realistic streams fed in 16 KiB chunks, the HTTP/2 DATA frame size), and the admission
//! decision from memory with 10 matching budgets. Numbers go to BENCHMARKS.md.

#![allow(clippy::panic)] // bench set-up: a broken fixture must fail loudly

use std::hint::black_box;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokenbudget::meter::eventstream::encode_frame;
use tokenbudget::meter::{Api, BodyFormat, Encoding, Meter, MeterLimits};
use tokenbudget::policy::{
    Action, Admission, Ask, Budget, BudgetId, Counters, LeaseStep, Limit, ModelSet, Policy,
    PriceBook, Principal, Scope, Subject, SubjectKind, TokenClasses, Tokens, UnpricedModel, Window,
    WindowUnit,
};

/// A realistic stream: `n` content events then the usage event, as each provider writes them.
fn stream(api: Api, n: usize) -> (BodyFormat, Vec<u8>) {
    let mut s = Vec::new();
    match api {
        Api::OpenAi => {
            for i in 0..n {
                s.extend(format!("data: {{\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1733000000,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_abc\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n").bytes());
            }
            s.extend(b"data: {\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":350,\"total_tokens\":1550,\"prompt_tokens_details\":{\"cached_tokens\":1024},\"completion_tokens_details\":{\"reasoning_tokens\":128}}}\n\ndata: [DONE]\n\n");
            (BodyFormat::Sse, s)
        }
        Api::Anthropic => {
            s.extend(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":1800,\"output_tokens\":1}}}\n\n");
            for i in 0..n {
                s.extend(format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" token{i}\"}}}}\n\n").bytes());
            }
            s.extend(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":512}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
            (BodyFormat::Sse, s)
        }
        Api::OpenAiResponses => {
            for i in 0..n {
                s.extend(format!("event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{i},\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\" token{i}\"}}\n\n").bytes());
            }
            s.extend(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"status\":\"completed\",\"usage\":{\"input_tokens\":1200,\"output_tokens\":350}}}\n\n");
            (BodyFormat::Sse, s)
        }
        Api::Gemini => {
            for i in 0..n {
                s.extend(format!("data: {{\"candidates\":[{{\"content\":{{\"role\":\"model\",\"parts\":[{{\"text\":\" token{i}\"}}]}},\"index\":0}}],\"usageMetadata\":{{\"promptTokenCount\":7477,\"candidatesTokenCount\":{i},\"totalTokenCount\":{}}},\"modelVersion\":\"gemini-2.5-pro\"}}\n\n", 7477 + i).bytes());
            }
            (BodyFormat::Sse, s)
        }
        Api::Bedrock => {
            for i in 0..n {
                let payload = format!(
                    "{{\"contentBlockIndex\":0,\"delta\":{{\"text\":\" token{i}\"}},\"p\":\"abcdefghijkl\"}}"
                );
                s.extend(encode_frame(
                    &[
                        (":event-type", "contentBlockDelta"),
                        (":content-type", "application/json"),
                        (":message-type", "event"),
                    ],
                    payload.as_bytes(),
                ));
            }
            s.extend(encode_frame(&[(":event-type", "metadata"), (":message-type", "event")], br#"{"usage":{"inputTokens":30,"outputTokens":256,"totalTokens":286},"metrics":{"latencyMs":1}}"#));
            (BodyFormat::EventStream, s)
        }
    }
}

fn scanner(c: &mut Criterion) {
    let mut g = c.benchmark_group("usage_scanner");
    for api in [
        Api::OpenAi,
        Api::Anthropic,
        Api::OpenAiResponses,
        Api::Gemini,
        Api::Bedrock,
    ] {
        let (format, body) = stream(api, 4000);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(api.as_str(), |b| {
            b.iter(|| {
                let mut m = Meter::new(api, format, Encoding::Identity, MeterLimits::default());
                for chunk in body.chunks(16 * 1024) {
                    m.feed(black_box(chunk));
                }
                black_box(m.finish())
            })
        });
    }
    // A 1 MB embeddings-like JSON body: only its tail is searched.
    let mut json = b"{\"object\":\"list\",\"data\":[{\"embedding\":[".to_vec();
    while json.len() < 1 << 20 {
        json.extend_from_slice(b"0.0123456,");
    }
    json.extend_from_slice(b"0.1]}],\"usage\":{\"prompt_tokens\":8,\"total_tokens\":8}}");
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("openai_json_1mb", |b| {
        b.iter(|| {
            let mut m = Meter::new(
                Api::OpenAi,
                BodyFormat::Json,
                Encoding::Identity,
                MeterLimits::default(),
            );
            for chunk in json.chunks(16 * 1024) {
                m.feed(black_box(chunk));
            }
            black_box(m.finish())
        })
    });
    g.finish();
}

fn decision_policy() -> (Policy, Principal) {
    let budget = |i: usize, kind: SubjectKind, name: &str| Budget {
        id: BudgetId(Arc::from(format!("b{i}"))),
        name: format!("budget {i}"),
        subject: Subject {
            kind,
            name: name.into(),
        },
        scope: Scope::Shared,
        models: if i.is_multiple_of(2) {
            ModelSet::All
        } else {
            ModelSet::only(["gpt-4o", "gpt-4o-mini"])
        },
        limit: Limit::Tokens(Tokens(u64::MAX / 4)),
        window: match i % 3 {
            0 => Window::Calendar {
                unit: WindowUnit::Day,
                every: 1,
            },
            1 => Window::Calendar {
                unit: WindowUnit::Month,
                every: 1,
            },
            _ => Window::Rolling {
                unit: WindowUnit::Hour,
                every: 1,
            },
        },
        action: Action::Enforce,
        is_override: false,
        enabled: true,
    };
    let mut budgets: Vec<Budget> = (0..10)
        .map(|i| match i % 3 {
            0 => budget(i, SubjectKind::User, "alice"),
            1 => budget(i, SubjectKind::Group, "ml"),
            _ => budget(i, SubjectKind::Everyone, ""),
        })
        .collect();
    // Budgets of other principals, which must be skipped.
    budgets.extend((10..100).map(|i| budget(i, SubjectKind::User, "someone-else")));
    let policy = Policy::new(
        budgets,
        PriceBook::default(),
        chrono_tz::UTC,
        UnpricedModel::Allow,
    );
    let alice = Principal::user("alice").with_groups(["ml", "eng"]);
    (policy, alice)
}

/// The request the decision benches admit: 500 prompt tokens, 1000 output, `gpt-4o`.
fn decision_ask(alice: &Principal) -> Ask<'_> {
    Ask {
        principal: alice,
        model: Some("gpt-4o"),
        estimate: TokenClasses {
            input: 500,
            output: 1000,
            ..Default::default()
        },
        lease: LeaseStep::Acquire,
    }
}

fn decision_now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-12-03T12:00:00Z")
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

fn decision(c: &mut Criterion) {
    let (policy, alice) = decision_policy();
    let ask = decision_ask(&alice);
    let now = decision_now();
    let mut counters = Counters::default();
    assert_eq!(policy.matching(&alice, Some("gpt-4o")).len(), 10);
    c.bench_function("decision_admit_release_10_budgets_of_100", |b| {
        b.iter(|| {
            if let Admission::Allowed { reservation, .. } =
                counters.admit(&policy, black_box(&ask), now)
            {
                counters.release(&reservation);
            }
        })
    });
}

/// One whole non-streaming request through the per-stream state machine, as Envoy sends it:
/// request headers (identity from the JWT payload in metadata), the buffered request body,
/// response headers, the response body with its usage — decided, metered and settled.
fn request_lifecycle(c: &mut Criterion) {
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use ep::processing_request::Request as In;
    use tokenbudget::extproc::{ExtProcConfig, RouteHints, Shared, Step, StreamState};

    let spec = |t: &str| -> Budget {
        let s: tokenbudget::policy::BudgetSpec =
            toml::from_str(t).unwrap_or_else(|e| panic!("{e}"));
        s.to_budget(&format!("b-{}", t.len()))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let mut prices = Vec::new();
    for (model, effective_from_ms, price) in tokenbudget::policy::prices::default_prices()
        .into_iter()
        .map(|(m, p)| (m, 0, p))
    {
        prices.push(tokenbudget::store::PriceRow {
            model,
            effective_from_ms,
            price,
        });
    }
    let rows = tokenbudget::store::PolicyRows {
        version: 1,
        budgets: vec![
            spec(
                "name='everyone'\nsubject='everyone'\nlimit_tokens=1000000000000000\nwindow='day'",
            ),
            spec("name='alice usd'\nsubject='user:alice'\nlimit_usd='100000000'\nwindow='month'"),
        ],
        prices,
        members: Vec::new(),
    };
    let ledger =
        tokenbudget::testkit::ready_ledger(rows, Arc::new(tokenbudget::clock::SystemClock));
    let shared = Arc::new(Shared {
        config: ExtProcConfig::default(),
        ledger: Arc::clone(&ledger),
    });
    let hdr = tokenbudget::testkit::header_map;
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    let payload = Struct {
        fields: [("sub".to_string(), s("alice")), ("iss".into(), s("demo"))].into(),
    };
    let jwt = Struct {
        fields: [(
            "jwt_payload".to_string(),
            Value {
                kind: Some(Kind::StructValue(payload)),
            },
        )]
        .into(),
    };
    let metadata = Metadata {
        filter_metadata: [("envoy.filters.http.jwt_authn".to_string(), jwt)].into(),
        ..Default::default()
    };
    let msg = |r: In, md: Option<Metadata>| ep::ProcessingRequest {
        request: Some(r),
        metadata_context: md,
        ..Default::default()
    };
    let messages = vec![
        msg(
            In::RequestHeaders(ep::HttpHeaders {
                headers: Some(hdr(&[
                    (":method", "POST"),
                    (":path", "/v1/chat/completions"),
                    (":authority", "llm"),
                    ("content-type", "application/json"),
                    ("content-length", "96"),
                    ("x-request-id", "0d1c0a52-6c1f-4e4d-9d0a-5f8c2b1e7a11"),
                ])),
                end_of_stream: false,
                ..Default::default()
            }),
            Some(metadata),
        ),
        msg(
            In::RequestBody(ep::HttpBody {
                body: br#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"Say hello"}]}"#.to_vec(),
                end_of_stream: true,
                ..Default::default()
            }),
            None,
        ),
        msg(
            In::ResponseHeaders(ep::HttpHeaders {
                headers: Some(hdr(&[(":status", "200"), ("content-type", "application/json")])),
                end_of_stream: false,
                ..Default::default()
            }),
            None,
        ),
        msg(
            In::ResponseBody(ep::HttpBody {
                body: br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#.to_vec(),
                end_of_stream: true,
                ..Default::default()
            }),
            None,
        ),
    ];
    let mut n = 0u64;
    c.bench_function("request_lifecycle_json_2_budgets", |b| {
        b.iter(|| {
            let mut state = StreamState::new(Arc::clone(&shared), RouteHints::default());
            for m in messages.iter().cloned() {
                match state.on_message(m) {
                    Step::ReplyThenMeter(r, body, eos) => {
                        black_box(r);
                        state.meter_chunk(&body, eos);
                    }
                    other => {
                        black_box(other);
                    }
                }
            }
            n += 1;
            if n.is_multiple_of(4096) {
                tokenbudget::testkit::drain_ledger(&ledger);
            }
        })
    });
    c.bench_function("request_lifecycle_messages_clone_only", |b| {
        b.iter(|| black_box(messages.clone()))
    });
}

/// The decision path's tail: admit + release of 10 matching budgets (of 100), timed one by one,
/// the caller's matches cached. Criterion reports the mean; this prints the percentiles.
fn decision_percentiles(c: &mut Criterion) {
    let (policy, alice) = decision_policy();
    let ask = decision_ask(&alice);
    let now = decision_now();
    let mut counters = Counters::default();
    let mut one = || {
        let t = std::time::Instant::now();
        if let Admission::Allowed { reservation, .. } =
            counters.admit(&policy, black_box(&ask), now)
        {
            counters.release(&reservation);
        }
        t.elapsed()
    };
    for _ in 0..10_000 {
        one();
    }
    let mut samples: Vec<std::time::Duration> = (0..1_000_000).map(|_| one()).collect();
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    eprintln!(
        "decision (admit + release, 10 of 100 budgets, 1 000 000 timed one by one): p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1]
    );
    c.bench_function("decision_timed_individually", |b| {
        b.iter(|| black_box(one()))
    });
}

/// Encoding settled debits for the journal (every debit is encoded once, off the request path).
fn debit_encoding(c: &mut Criterion) {
    use tokenbudget::ledger::journal::{Record, encode_records};
    use tokenbudget::policy::{Amount, CounterDelta, CounterKey, NanoUsd};
    use tokenbudget::store::{Debit, UsageEvent};
    let records: Vec<(u64, Record)> = (0..1000u64)
        .map(|i| {
            (
                i,
                Record::Debit(Debit {
                    event: UsageEvent {
                        event_id: format!("0193a7c2-5f1e-7c3a-9d2b-{i:012}"),
                        request_id: format!("0d1c0a52-6c1f-4e4d-9d0a-{i:012}"),
                        ts_ms: 1_796_300_000_000 + i as i64,
                        principal: format!("user:someone-{}", i % 50),
                        model: "gpt-4o-mini".into(),
                        family: "openai".into(),
                        input: 900 + i,
                        cache_read: 128,
                        cache_write: 0,
                        cache_write_1h: 0,
                        output: 250,
                        reasoning: 0,
                        cost: NanoUsd(180_000 + i),
                        estimated: false,
                        outcome: "complete".into(),
                        unpriced: false,
                    },
                    deltas: (0..3)
                        .map(|b| CounterDelta {
                            key: CounterKey {
                                budget: BudgetId(Arc::from(format!(
                                    "0193a7c2-0000-7000-8000-00000000000{b}"
                                ))),
                                member: Arc::from(""),
                            },
                            bucket: 1_796_256_000,
                            amount: Amount {
                                tokens: 1278 + i,
                                nanos: 180_000 + i,
                            },
                            lease: None,
                        })
                        .collect(),
                }),
            )
        })
        .collect();
    let mut out = Vec::with_capacity(1 << 20);
    let mut g = c.benchmark_group("debit_encoding");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("journal_1000_debits", |b| {
        b.iter(|| {
            out.clear();
            encode_records(black_box(&records), &mut out).unwrap_or_default();
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    scanner,
    decision,
    decision_percentiles,
    request_lifecycle,
    debit_encoding
);
criterion_main!(benches);
