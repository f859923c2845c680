//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test: each takes
//! arbitrary bytes, drives one parser the way a hostile upstream could, and checks the invariants
//! that must hold whatever the input (no panic, bounded memory).

use super::{
    Api, BodyFormat, Encoding, Meter, MeterLimits, anthropic, bedrock, eventstream, gemini, openai,
    sse,
};

/// Splits `data` into chunks at offsets taken from its first bytes, so the fuzzer explores
/// chunk boundaries as well as content.
fn chunks(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let (cuts, rest) = data.split_at(data.len().min(3));
    let mut out = Vec::new();
    let mut body = rest;
    for c in cuts {
        let at = usize::from(*c) % (body.len() + 1);
        let (a, b) = body.split_at(at);
        out.push(a);
        body = b;
    }
    out.push(body);
    (out, rest)
}

const LIMITS: MeterLimits = MeterLimits {
    max_event: 4096,
    json_tail: 2048,
};

/// SSE framing: every event dispatched lies within the input, and memory stays under the cap.
pub fn sse_framing(data: &[u8]) {
    let (pieces, _) = chunks(data);
    let mut f = sse::SseFramer::with_tail(LIMITS.max_event, LIMITS.json_tail);
    for p in pieces {
        f.feed(p, &mut |ev| assert!(ev.data.len() <= LIMITS.max_event));
        assert!(f.buffered() <= LIMITS.max_event + 2 * LIMITS.json_tail + 1);
    }
}

/// AWS event-stream decoding: frames are bounded; corrupt input stops decoding, never panics.
pub fn aws_eventstream(data: &[u8]) {
    let (pieces, _) = chunks(data);
    let mut d = eventstream::EventStreamDecoder::new(LIMITS.max_event);
    for p in pieces {
        d.feed(p, &mut |f| assert!(f.payload.len() <= LIMITS.max_event));
        assert!(d.buffered() <= LIMITS.max_event);
    }
}

fn meter(api: Api, data: &[u8]) {
    let (pieces, rest) = chunks(data);
    for format in [BodyFormat::Sse, BodyFormat::Json, BodyFormat::EventStream] {
        for encoding in [Encoding::Identity, Encoding::Gzip] {
            let mut m = Meter::new(api, format, encoding, LIMITS);
            for p in &pieces {
                m.feed(p);
                assert!(m.buffered() <= 2 * LIMITS.max_event + 3 * LIMITS.json_tail);
            }
            let seen = m.finish();
            assert!(seen.body_bytes <= rest.len() as u64 || encoding != Encoding::Identity);
        }
    }
}

/// OpenAI chat/completions/embeddings and Responses usage, through the whole meter.
pub fn usage_openai(data: &[u8]) {
    let _ = openai::decode_usage(data);
    let _ = openai::decode_responses_usage(data);
    if let Some(r) = openai::usage_only_event(data) {
        assert!(r.start < r.end && r.end <= data.len());
    }
    meter(Api::OpenAi, data);
    meter(Api::OpenAiResponses, data);
}

/// Anthropic usage merging, through the whole meter.
pub fn usage_anthropic(data: &[u8]) {
    let mut acc = anthropic::Accumulator::default();
    acc.merge(data);
    if let Some(u) = acc.usage() {
        assert!(u.total() >= u.input);
    }
    meter(Api::Anthropic, data);
}

/// Gemini usageMetadata, through the whole meter.
pub fn usage_gemini(data: &[u8]) {
    let _ = gemini::decode_usage(data);
    meter(Api::Gemini, data);
}

/// Bedrock Converse usage and invocation metrics, through the whole meter (event stream too).
pub fn usage_bedrock(data: &[u8]) {
    let _ = bedrock::decode_usage(data);
    let _ = bedrock::decode_invocation_metrics(data);
    meter(Api::Bedrock, data);
}

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name (the corpus directories are named after them).
pub const TARGETS: &[(&str, Target)] = &[
    ("sse_framing", sse_framing),
    ("aws_eventstream", aws_eventstream),
    ("usage_openai", usage_openai),
    ("usage_anthropic", usage_anthropic),
    ("usage_gemini", usage_gemini),
    ("usage_bedrock", usage_bedrock),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in corpus (seeds from the fixtures plus what fuzzing found interesting) replays
    /// without a panic on every test run.
    #[test]
    fn fuzz_corpus_replays_cleanly() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
        let mut total = 0;
        for (name, run) in TARGETS {
            let dir = root.join(name);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            for e in entries {
                let data = std::fs::read(e.unwrap().path()).unwrap();
                run(&data);
                total += 1;
            }
        }
        assert!(total >= TARGETS.len() * 5, "corpus too small: {total}");
    }
}
