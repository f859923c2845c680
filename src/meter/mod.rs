//! PURE. Reading token usage out of response bodies as they stream past.
//!
//! A [`Meter`] is fed each body chunk after the chunk's reply has been sent. It undoes content
//! encoding incrementally (gzip, deflate, br: the decoder writes straight into the parser, so
//! memory stays bounded whatever the ratio), then frames the body by its format — SSE events
//! ([`sse`]), AWS event-stream frames ([`eventstream`]), or the bounded tail of a JSON body —
//! and decodes only the pieces that can carry usage, found by a byte search for the usage key
//! followed by an object, into small structs ([`openai`], [`anthropic`], [`gemini`],
//! [`bedrock`]). Other events are only measured for the streamed-text estimate.
//!
//! **Boundary:** imports nothing from the rest of the crate; knows formats, not budgets.

pub mod anthropic;
pub mod bedrock;
pub mod eventstream;
#[cfg(test)]
pub(crate) mod fixtures;
#[doc(hidden)]
pub mod fuzz;
pub mod gemini;
pub mod json;
pub mod openai;
pub mod sse;

use std::io::Write;
use std::sync::LazyLock;

use base64::Engine;
use memchr::memmem;

static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static USAGE_METADATA_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usageMetadata\""));
static METRICS_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"amazon-bedrock-invocationMetrics\""));
static CONTENT_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"content\""));
static TEXT_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"text\""));
static DELTA_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"delta\""));
static FINISH_REASON_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"finishReason\""));
static BYTES_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"bytes\""));

/// Token usage of one request, normalised across providers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens not served from cache and not written to it.
    pub input: u64,
    pub cache_read: u64,
    /// Cache writes (Anthropic 5-minute writes, or writes the provider does not split).
    pub cache_write: u64,
    /// Anthropic 1-hour cache writes (priced separately).
    pub cache_write_1h: u64,
    /// Visible and reasoning output.
    pub output: u64,
    /// Informational: the part of `output` spent reasoning.
    pub reasoning: u64,
}

impl Usage {
    /// What token budgets count: input + cache reads + cache writes + output.
    pub fn total(&self) -> u64 {
        self.input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_write)
            .saturating_add(self.cache_write_1h)
            .saturating_add(self.output)
    }
}

/// Rough token count of text: four bytes a token, rounded up. Used only where no provider count
/// exists (prompt estimates, aborted streams), and such usage is flagged `estimated`.
pub fn estimate_tokens(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

/// The API dialect whose usage format a response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI chat and legacy completions, embeddings, and every compatible server (Databricks,
    /// vLLM, TGI, Gemini's OpenAI endpoint).
    OpenAi,
    /// The OpenAI Responses API (`/v1/responses`).
    OpenAiResponses,
    /// Anthropic Messages (also on Vertex, and inside Bedrock `InvokeModel`).
    Anthropic,
    /// Gemini API and Vertex `generateContent` / `streamGenerateContent`.
    Gemini,
    /// Bedrock Converse / ConverseStream.
    Bedrock,
}

impl Api {
    pub fn parse(s: &str) -> Option<Api> {
        Some(match s {
            "openai" => Api::OpenAi,
            "openai-responses" => Api::OpenAiResponses,
            "anthropic" => Api::Anthropic,
            "gemini" => Api::Gemini,
            "bedrock" => Api::Bedrock,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::OpenAiResponses => "openai-responses",
            Api::Anthropic => "anthropic",
            Api::Gemini => "gemini",
            Api::Bedrock => "bedrock",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Sse,
    Json,
    /// `application/vnd.amazon.eventstream`.
    EventStream,
    /// Anything else: measured, never parsed.
    Opaque,
}

impl BodyFormat {
    /// From the response `content-type` (parameters ignored, case-insensitive).
    pub fn from_content_type(ct: &[u8]) -> BodyFormat {
        let end = memchr::memchr(b';', ct).unwrap_or(ct.len());
        let mime = ct[..end].trim_ascii();
        if mime.eq_ignore_ascii_case(b"text/event-stream") {
            BodyFormat::Sse
        } else if mime.eq_ignore_ascii_case(b"application/json") {
            BodyFormat::Json
        } else if mime.eq_ignore_ascii_case(b"application/vnd.amazon.eventstream") {
            BodyFormat::EventStream
        } else {
            BodyFormat::Opaque
        }
    }
}

/// The response `content-encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    /// An encoding we cannot undo (e.g. zstd): the body is measured, never parsed.
    Unsupported,
}

impl Encoding {
    pub fn from_header(v: Option<&[u8]>) -> Encoding {
        match v.map(<[u8]>::trim_ascii) {
            None | Some(b"") => Encoding::Identity,
            Some(e) if e.eq_ignore_ascii_case(b"identity") => Encoding::Identity,
            Some(e) if e.eq_ignore_ascii_case(b"gzip") || e.eq_ignore_ascii_case(b"x-gzip") => {
                Encoding::Gzip
            }
            Some(e) if e.eq_ignore_ascii_case(b"deflate") => Encoding::Deflate,
            Some(e) if e.eq_ignore_ascii_case(b"br") => Encoding::Brotli,
            Some(_) => Encoding::Unsupported,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct MeterLimits {
    /// Largest SSE event or event-stream frame kept whole; beyond it only its tail is searched.
    pub max_event: usize,
    /// Bytes of a JSON body's (or an oversized event's) tail kept to find its usage.
    pub json_tail: usize,
}

impl Default for MeterLimits {
    fn default() -> Self {
        MeterLimits {
            max_event: 256 * 1024,
            json_tail: 64 * 1024,
        }
    }
}

/// What the meter saw by the end of a body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metered {
    /// The provider's own count, if the body carried one.
    pub usage: Option<Usage>,
    /// Bytes of generated text seen (for estimates when `usage` is missing).
    pub text_bytes: u64,
    /// Bytes after decompression.
    pub body_bytes: u64,
    /// The body ended the way its format ends (`[DONE]`, a terminal event, a complete document).
    pub complete: bool,
    /// The provider reported an error mid-stream (Anthropic `error`, an event-stream exception).
    pub upstream_error: bool,
    /// Usage-looking pieces that did not decode, oversized events, corrupt frames or encoding.
    pub malformed: u32,
}

/// The parsing core behind any decompressor: decompressed bytes arrive through `Write`.
#[derive(Debug)]
struct Core {
    api: Api,
    format: BodyFormat,
    framer: sse::SseFramer,
    frames: eventstream::EventStreamDecoder,
    tail: Vec<u8>,
    tail_cap: usize,
    anthropic: anthropic::Accumulator,
    scratch: Vec<u8>,
    /// Gemini: the last two `usageMetadata` objects seen, last first, decoded at the end (every
    /// chunk may carry one and only the last is the total; the one before stands in for a last
    /// one that does not decode).
    last_usage: [Vec<u8>; 2],
    seen: Metered,
}

impl Write for Core {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Core {
    fn feed(&mut self, chunk: &[u8]) {
        self.seen.body_bytes += chunk.len() as u64;
        match self.format {
            BodyFormat::Sse => {
                let (api, seen, acc) = (self.api, &mut self.seen, &mut self.anthropic);
                let last_usage = &mut self.last_usage;
                self.framer.feed(chunk, &mut |ev| {
                    on_sse_event(api, seen, acc, last_usage, ev.name, ev.data)
                });
            }
            BodyFormat::EventStream => {
                let (seen, acc, scratch) = (&mut self.seen, &mut self.anthropic, &mut self.scratch);
                self.frames
                    .feed(chunk, &mut |f| on_frame(seen, acc, scratch, f));
            }
            BodyFormat::Json => json::keep_tail(&mut self.tail, chunk, self.tail_cap),
            BodyFormat::Opaque => {}
        }
    }

    fn finish(&mut self) -> Metered {
        match self.format {
            BodyFormat::Sse => {
                self.seen.malformed += self.framer.oversized;
                let [last, before] = &self.last_usage;
                if !last.is_empty() {
                    let decoded = gemini::decode_usage(last);
                    if decoded.is_none() {
                        self.seen.malformed += 1;
                    }
                    self.seen.usage = decoded.or_else(|| gemini::decode_usage(before));
                }
                if self.seen.usage.is_none() {
                    // Events too large to keep whole (Responses API terminal events embed the
                    // whole response): their tails were kept, and usage sits at the end.
                    let tail = self.framer.take_oversized_tail();
                    if !tail.is_empty() {
                        self.seen.usage = usage_in_json(self.api, &mut self.anthropic, &tail);
                    }
                }
                if self.api == Api::Anthropic {
                    self.seen.usage = self.seen.usage.or_else(|| self.anthropic.usage());
                }
            }
            BodyFormat::EventStream => {
                self.seen.malformed += self.frames.corrupt;
                if self.seen.usage.is_none() {
                    self.seen.usage = self.anthropic.usage();
                }
            }
            BodyFormat::Json => {
                self.seen.text_bytes = self.seen.body_bytes;
                match usage_in_json(self.api, &mut self.anthropic, &self.tail) {
                    Some(u) => {
                        self.seen.usage = Some(u);
                        self.seen.complete = true;
                    }
                    None => self.seen.malformed += u32::from(self.seen.body_bytes > 0),
                }
            }
            BodyFormat::Opaque => self.seen.text_bytes = self.seen.body_bytes,
        }
        self.seen
    }
}

/// The usage of a JSON document (or the tail of one), for `api`, falling back to the other
/// dialects' shapes when the route's one is absent.
fn usage_in_json(api: Api, acc: &mut anthropic::Accumulator, bytes: &[u8]) -> Option<Usage> {
    let last = |f: &memmem::Finder<'_>| json::last_object_after_key(bytes, f).map(|r| &bytes[r]);
    let try_api = |a: Api, acc: &mut anthropic::Accumulator| -> Option<Usage> {
        match a {
            Api::OpenAi => last(&USAGE_KEY).and_then(openai::decode_usage),
            Api::OpenAiResponses => last(&USAGE_KEY).and_then(openai::decode_responses_usage),
            Api::Anthropic => {
                let obj = last(&USAGE_KEY)?;
                acc.merge(obj).then(|| acc.usage()).flatten()
            }
            Api::Gemini => last(&USAGE_METADATA_KEY).and_then(gemini::decode_usage),
            Api::Bedrock => last(&USAGE_KEY)
                .and_then(bedrock::decode_usage)
                .or_else(|| last(&METRICS_KEY).and_then(bedrock::decode_invocation_metrics)),
        }
    };
    try_api(api, acc).or_else(|| {
        [
            Api::OpenAi,
            Api::OpenAiResponses,
            Api::Anthropic,
            Api::Gemini,
            Api::Bedrock,
        ]
        .into_iter()
        .filter(|a| *a != api)
        .find_map(|a| try_api(a, &mut anthropic::Accumulator::default()))
    })
}

/// The SSE `event:` name, or when the event has none, the `"type"` its JSON data starts with.
fn event_type<'a>(name: &'a [u8], data: &'a [u8]) -> &'a [u8] {
    if !name.is_empty() {
        return name;
    }
    let Some(rest) = data
        .strip_prefix(b"{\"type\":")
        .map(<[u8]>::trim_ascii_start)
    else {
        return b"";
    };
    let Some(rest) = rest.strip_prefix(b"\"") else {
        return b"";
    };
    memchr::memchr(b'"', rest).map_or(b"", |end| &rest[..end])
}

fn on_sse_event(
    api: Api,
    seen: &mut Metered,
    acc: &mut anthropic::Accumulator,
    last_usage: &mut [Vec<u8>; 2],
    name: &[u8],
    data: &[u8],
) {
    match api {
        Api::OpenAi => {
            if data == b"[DONE]" {
                seen.complete = true;
            } else if json::has_object_after_key(data, &USAGE_KEY) {
                match json::last_object_after_key(data, &USAGE_KEY)
                    .and_then(|r| openai::decode_usage(&data[r]))
                {
                    Some(u) => seen.usage = Some(u),
                    None => seen.malformed += 1,
                }
            } else {
                // Chat deltas carry `content`, legacy completions `text`.
                seen.text_bytes += (json::string_len_after_key(data, &CONTENT_KEY)
                    + json::string_len_after_key(data, &TEXT_KEY))
                    as u64;
            }
        }
        Api::OpenAiResponses => match event_type(name, data) {
            // Text deltas are most of the stream and never carry usage.
            b"response.output_text.delta" | b"response.reasoning_summary_text.delta" => {
                seen.text_bytes += json::string_len_after_key(data, &DELTA_KEY) as u64;
            }
            kind => {
                if json::has_object_after_key(data, &USAGE_KEY) {
                    match json::last_object_after_key(data, &USAGE_KEY)
                        .and_then(|r| openai::decode_responses_usage(&data[r]))
                    {
                        Some(u) => seen.usage = Some(u),
                        None => seen.malformed += 1,
                    }
                } else {
                    seen.text_bytes += json::string_len_after_key(data, &DELTA_KEY) as u64;
                }
                match kind {
                    b"response.completed" | b"response.incomplete" => seen.complete = true,
                    b"response.failed" | b"error" => seen.upstream_error = true,
                    _ => {}
                }
            }
        },
        Api::Anthropic => match event_type(name, data) {
            // Usage rides only on message_start and message_delta (and events of unknown type).
            b"content_block_delta" => {
                seen.text_bytes += json::string_len_after_key(data, &TEXT_KEY) as u64
            }
            b"ping" | b"content_block_start" | b"content_block_stop" => {}
            b"message_stop" => seen.complete = true,
            b"error" => seen.upstream_error = true,
            _ => {
                if json::has_object_after_key(data, &USAGE_KEY) {
                    let merged = json::last_object_after_key(data, &USAGE_KEY)
                        .is_some_and(|r| acc.merge(&data[r]));
                    if !merged {
                        seen.malformed += 1;
                    }
                } else {
                    seen.text_bytes += json::string_len_after_key(data, &TEXT_KEY) as u64;
                }
            }
        },
        Api::Gemini | Api::Bedrock => {
            // Kept, not decoded: only the stream's last one counts (decoded in `finish`).
            if let Some(r) = json::last_object_after_key(data, &USAGE_METADATA_KEY) {
                last_usage.swap(0, 1);
                last_usage[0].clear();
                last_usage[0].extend_from_slice(&data[r]);
            }
            seen.text_bytes += json::string_len_after_key(data, &TEXT_KEY) as u64;
            if FINISH_REASON_KEY.find(data).is_some() {
                seen.complete = true;
            }
        }
    }
}

fn on_frame(
    seen: &mut Metered,
    acc: &mut anthropic::Accumulator,
    scratch: &mut Vec<u8>,
    f: eventstream::Frame<'_>,
) {
    if f.message_type == b"exception" {
        seen.upstream_error = true;
        return;
    }
    match f.event_type {
        b"metadata" => {
            match json::last_object_after_key(f.payload, &USAGE_KEY)
                .and_then(|r| bedrock::decode_usage(&f.payload[r]))
            {
                Some(u) => seen.usage = Some(u),
                None => seen.malformed += 1,
            }
            seen.complete = true;
        }
        b"chunk" => {
            // InvokeModel: {"bytes": "<base64 of the model's own event JSON>"}.
            let Some(r) = json::string_value_after_key(f.payload, &BYTES_KEY) else {
                return;
            };
            scratch.clear();
            if base64::engine::general_purpose::STANDARD
                .decode_vec(&f.payload[r], scratch)
                .is_err()
            {
                seen.malformed += 1;
                return;
            }
            let data: &[u8] = scratch;
            if let Some(m) = json::last_object_after_key(data, &METRICS_KEY)
                .and_then(|r| bedrock::decode_invocation_metrics(&data[r]))
            {
                seen.usage = Some(m);
            }
            on_sse_event(
                Api::Anthropic,
                seen,
                acc,
                &mut Default::default(),
                b"",
                data,
            );
            if let Some(u) = acc.usage() {
                seen.usage = Some(u);
            }
        }
        _ => seen.text_bytes += json::string_len_after_key(f.payload, &TEXT_KEY) as u64,
    }
}

/// Undoes the content encoding in front of the parsing core.
// Identity is the common case: boxing its core would cost an allocation per stream.
#[allow(clippy::large_enum_variant)]
enum Decoding {
    Identity(Core),
    Gzip(Box<flate2::write::MultiGzDecoder<Core>>),
    Deflate(Box<flate2::write::ZlibDecoder<Core>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Core>>),
}

impl std::fmt::Debug for Decoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoding::Identity(_) => "identity",
            Decoding::Gzip(_) => "gzip",
            Decoding::Deflate(_) => "deflate",
            Decoding::Brotli(_) => "br",
        })
    }
}

#[derive(Debug)]
pub struct Meter {
    decoding: Decoding,
    /// The encoding failed: the rest of the body is only counted.
    broken: bool,
}

impl Meter {
    pub fn new(api: Api, format: BodyFormat, encoding: Encoding, limits: MeterLimits) -> Self {
        let format = if encoding == Encoding::Unsupported {
            BodyFormat::Opaque
        } else {
            format
        };
        let core = Core {
            api,
            format,
            framer: sse::SseFramer::with_tail(limits.max_event, limits.json_tail),
            frames: eventstream::EventStreamDecoder::new(limits.max_event.max(64 * 1024)),
            tail: Vec::new(),
            tail_cap: limits.json_tail,
            anthropic: anthropic::Accumulator::default(),
            scratch: Vec::new(),
            last_usage: [Vec::new(), Vec::new()],
            seen: Metered::default(),
        };
        let decoding = match encoding {
            Encoding::Identity | Encoding::Unsupported => Decoding::Identity(core),
            Encoding::Gzip => Decoding::Gzip(Box::new(flate2::write::MultiGzDecoder::new(core))),
            Encoding::Deflate => Decoding::Deflate(Box::new(flate2::write::ZlibDecoder::new(core))),
            Encoding::Brotli => Decoding::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(core, 4096),
            )),
        };
        Meter {
            decoding,
            broken: false,
        }
    }

    fn core(&self) -> &Core {
        match &self.decoding {
            Decoding::Identity(c) => c,
            Decoding::Gzip(d) => d.get_ref(),
            Decoding::Deflate(d) => d.get_ref(),
            Decoding::Brotli(d) => d.get_ref(),
        }
    }

    fn core_mut(&mut self) -> &mut Core {
        match &mut self.decoding {
            Decoding::Identity(c) => c,
            Decoding::Gzip(d) => d.get_mut(),
            Decoding::Deflate(d) => d.get_mut(),
            Decoding::Brotli(d) => d.get_mut(),
        }
    }

    /// Bytes held between chunks (decompressor windows excluded).
    pub fn buffered(&self) -> usize {
        let c = self.core();
        c.framer.buffered() + c.frames.buffered() + c.tail.len() + c.scratch.capacity()
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.broken {
            return;
        }
        let ok = match &mut self.decoding {
            Decoding::Identity(c) => {
                c.feed(chunk);
                true
            }
            Decoding::Gzip(d) => d.write_all(chunk).is_ok(),
            Decoding::Deflate(d) => d.write_all(chunk).is_ok(),
            Decoding::Brotli(d) => d.write_all(chunk).is_ok(),
        };
        if !ok {
            self.broken = true;
            self.core_mut().seen.malformed += 1;
        }
    }

    /// The body has ended (or was cut off): report what was seen.
    pub fn finish(&mut self) -> Metered {
        if !self.broken {
            let flushed = match &mut self.decoding {
                Decoding::Identity(_) => true,
                Decoding::Gzip(d) => d.try_finish().is_ok(),
                Decoding::Deflate(d) => d.try_finish().is_ok(),
                Decoding::Brotli(d) => d.flush().is_ok(),
            };
            if !flushed {
                self.core_mut().seen.malformed += 1;
            }
        }
        self.core_mut().finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT_STREAM: &[u8] = b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":350,\"total_tokens\":1550,\"prompt_tokens_details\":{\"cached_tokens\":1024},\"completion_tokens_details\":{\"reasoning_tokens\":128}}}\n\n\
data: [DONE]\n\n";

    const CHAT_USAGE: Usage = Usage {
        input: 176,
        cache_read: 1024,
        cache_write: 0,
        cache_write_1h: 0,
        output: 350,
        reasoning: 128,
    };

    fn meter_split(
        format: BodyFormat,
        body: &[u8],
        cuts: &[usize],
        limits: MeterLimits,
    ) -> Metered {
        let mut m = Meter::new(Api::OpenAi, format, Encoding::Identity, limits);
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&body.len())) {
            m.feed(&body[last..c]);
            last = c;
        }
        m.finish()
    }

    #[test]
    fn gemini_takes_the_last_usage_and_the_one_before_when_the_last_is_broken() {
        let event = |usage: &str| {
            format!(
                "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"Hi\"}}]}}}}],\"usageMetadata\":{usage}}}\r\n\r\n"
            )
        };
        let run = |usages: &[&str]| {
            let mut m = Meter::new(
                Api::Gemini,
                BodyFormat::Sse,
                Encoding::Identity,
                MeterLimits::default(),
            );
            for u in usages {
                m.feed(event(u).as_bytes());
            }
            m.finish()
        };
        let early = r#"{"promptTokenCount":10,"candidatesTokenCount":1}"#;
        let total = r#"{"promptTokenCount":10,"candidatesTokenCount":7}"#;
        let seen = run(&[early, early, total]);
        assert_eq!(seen.usage.map(|u| (u.input, u.output)), Some((10, 7)));
        assert_eq!(seen.malformed, 0);
        assert_eq!(seen.text_bytes, 6);
        // A last object that does not decode: the one before stands in, and it is counted.
        let seen = run(&[early, total, r#"{"promptTokenCount":"ten"}"#]);
        assert_eq!(seen.usage.map(|u| (u.input, u.output)), Some((10, 7)));
        assert_eq!(seen.malformed, 1);
        assert_eq!(run(&[]).usage, None);
    }

    #[test]
    fn chat_stream_usage_at_every_split() {
        for i in 0..=CHAT_STREAM.len() {
            let got = meter_split(BodyFormat::Sse, CHAT_STREAM, &[i], MeterLimits::default());
            assert_eq!(got.usage, Some(CHAT_USAGE), "split at {i}");
            assert!(got.complete);
            assert_eq!(got.text_bytes, 8);
            assert_eq!(got.malformed, 0);
        }
    }

    #[test]
    fn cut_stream_reports_text_but_no_usage() {
        let cut = &CHAT_STREAM[..CHAT_STREAM.len() - 60];
        let got = meter_split(BodyFormat::Sse, cut, &[], MeterLimits::default());
        assert_eq!(got.usage, None);
        assert!(!got.complete);
        assert_eq!(got.text_bytes, 8);
    }

    #[test]
    fn truncated_usage_json_is_malformed_not_a_panic() {
        let body = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":\n\ndata: {\"usage\":{\"prompt_tokens\":\"x\"}}\n\n";
        let got = meter_split(BodyFormat::Sse, body, &[], MeterLimits::default());
        assert_eq!(got.usage, None);
        assert_eq!(got.malformed, 2);
    }

    #[test]
    fn json_body_usage_from_the_tail_at_every_split() {
        let body = br#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello \"usage\": {"}}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;
        let want = Usage {
            input: 9,
            output: 12,
            ..Usage::default()
        };
        for i in 0..=body.len() {
            let got = meter_split(BodyFormat::Json, body, &[i], MeterLimits::default());
            assert_eq!(got.usage, Some(want), "split at {i}");
        }
        // A body far larger than the tail (embeddings) still yields its usage, in bounded memory.
        let mut big = br#"{"object":"list","data":[{"embedding":["#.to_vec();
        for _ in 0..50_000 {
            big.extend_from_slice(b"0.0123,");
        }
        big.extend_from_slice(br#"0.1]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#);
        let limits = MeterLimits {
            json_tail: 1024,
            ..MeterLimits::default()
        };
        let mut m = Meter::new(Api::OpenAi, BodyFormat::Json, Encoding::Identity, limits);
        for c in big.chunks(700) {
            m.feed(c);
            assert!(m.buffered() <= 2 * 1024);
        }
        assert_eq!(
            m.finish().usage,
            Some(Usage {
                input: 8,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn content_type_picks_the_parser() {
        assert_eq!(
            BodyFormat::from_content_type(b"text/event-stream; charset=utf-8"),
            BodyFormat::Sse
        );
        assert_eq!(
            BodyFormat::from_content_type(b"Application/JSON"),
            BodyFormat::Json
        );
        assert_eq!(
            BodyFormat::from_content_type(b"text/plain"),
            BodyFormat::Opaque
        );
    }
}

#[cfg(test)]
mod allocation_tests {
    use super::*;

    /// A long stream of `events` content events plus the usage event, in 512-byte chunks so
    /// events straddle chunk boundaries.
    fn long_stream(api: Api, events: usize) -> Vec<u8> {
        let mut s = Vec::new();
        for i in 0..events {
            let ev = match api {
                Api::Anthropic => format!(
                    "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"token {i} \"}}}}\n\n"
                ),
                _ => format!(
                    "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
                ),
            };
            s.extend_from_slice(ev.as_bytes());
        }
        match api {
            Api::Anthropic => s.extend_from_slice(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":5,\"output_tokens\":900}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
            _ => s.extend_from_slice(b"data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":900,\"total_tokens\":905}}\n\ndata: [DONE]\n\n"),
        }
        s
    }

    /// After the first chunks sized the carry-over buffers, metering allocates nothing per chunk,
    /// usage event included (measured per thread by a counting global allocator).
    #[test]
    fn metering_allocates_nothing_per_chunk_in_the_steady_state() {
        for api in [Api::OpenAi, Api::Anthropic] {
            let body = long_stream(api, 2000);
            let chunks: Vec<&[u8]> = body.chunks(512).collect();
            let mut m = Meter::new(
                api,
                BodyFormat::Sse,
                Encoding::Identity,
                MeterLimits::default(),
            );
            for c in &chunks[..20] {
                m.feed(c);
            }
            let info = allocation_counter::measure(|| {
                for c in &chunks[20..] {
                    m.feed(c);
                }
            });
            assert_eq!(
                info.count_total,
                0,
                "{api:?}: {} allocations over {} chunks",
                info.count_total,
                chunks.len() - 20
            );
            let seen = m.finish();
            assert_eq!(seen.usage.map(|u| u.output), Some(900), "{api:?}");
        }
    }
}
