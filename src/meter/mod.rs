//! PURE. Reading token usage out of response bodies as they stream past.
//!
//! A [`Meter`] is fed each body chunk after the chunk's reply has been sent. For SSE it frames
//! events ([`sse`]) and decodes only events that can carry usage — found by a byte search for
//! `"usage"` followed by an object — into a small struct; other events are only measured for the
//! streamed-text estimate. For JSON bodies it keeps a bounded tail and finds the last `"usage"`
//! object in it at the end. Memory per stream is bounded by the configured caps.
//!
//! **Boundary:** imports nothing from the rest of the crate; knows formats, not budgets.

pub mod json;
pub mod openai;
pub mod sse;

use std::sync::LazyLock;

use memchr::memmem;

static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static CONTENT_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"content\""));

/// Token usage of one request, normalised across providers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens not served from cache.
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
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
            .saturating_add(self.output)
    }
}

/// Rough token count of text: four bytes a token, rounded up. Used only where no provider count
/// exists (prompt estimates, aborted streams), and such usage is flagged `estimated`.
pub fn estimate_tokens(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Sse,
    Json,
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
        } else {
            BodyFormat::Opaque
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct MeterLimits {
    /// Largest SSE event kept whole.
    pub max_event: usize,
    /// Bytes of a JSON body's tail kept to find its usage.
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
    pub body_bytes: u64,
    /// The body ended the way its format ends (`[DONE]`, a complete JSON document).
    pub complete: bool,
    /// Usage-looking events that did not decode, or events over the size cap.
    pub malformed: u32,
}

#[derive(Debug)]
pub struct Meter {
    format: BodyFormat,
    framer: sse::SseFramer,
    tail: Vec<u8>,
    limits: MeterLimits,
    seen: Metered,
}

impl Meter {
    pub fn new(format: BodyFormat, limits: MeterLimits) -> Self {
        Meter {
            format,
            framer: sse::SseFramer::new(limits.max_event),
            tail: Vec::new(),
            limits,
            seen: Metered::default(),
        }
    }

    pub fn format(&self) -> BodyFormat {
        self.format
    }

    /// Bytes held between chunks.
    pub fn buffered(&self) -> usize {
        self.framer.buffered() + self.tail.len()
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.seen.body_bytes += chunk.len() as u64;
        match self.format {
            BodyFormat::Sse => {
                let seen = &mut self.seen;
                self.framer
                    .feed(chunk, &mut |ev| on_sse_event(seen, ev.data));
            }
            BodyFormat::Json => {
                let cap = self.limits.json_tail;
                if chunk.len() >= cap {
                    self.tail.clear();
                    self.tail.extend_from_slice(&chunk[chunk.len() - cap..]);
                } else {
                    if self.tail.len() + chunk.len() > 2 * cap {
                        let drop = self.tail.len() + chunk.len() - cap;
                        self.tail.drain(..drop.min(self.tail.len()));
                    }
                    self.tail.extend_from_slice(chunk);
                }
            }
            BodyFormat::Opaque => {}
        }
    }

    /// The body has ended (or was cut off): report what was seen.
    pub fn finish(&mut self) -> Metered {
        match self.format {
            BodyFormat::Sse => self.seen.malformed += self.framer.oversized,
            BodyFormat::Json => {
                self.seen.text_bytes = self.seen.body_bytes;
                match json::last_object_after_key(&self.tail, &USAGE_KEY) {
                    Some(r) => match openai::decode_usage(&self.tail[r]) {
                        Some(u) => {
                            self.seen.usage = Some(u);
                            self.seen.complete = true;
                        }
                        None => self.seen.malformed += 1,
                    },
                    None => self.seen.malformed += u32::from(self.seen.body_bytes > 0),
                }
            }
            BodyFormat::Opaque => self.seen.text_bytes = self.seen.body_bytes,
        }
        self.seen
    }
}

fn on_sse_event(seen: &mut Metered, data: &[u8]) {
    if data == b"[DONE]" {
        seen.complete = true;
        return;
    }
    if json::has_object_after_key(data, &USAGE_KEY) {
        match json::last_object_after_key(data, &USAGE_KEY)
            .and_then(|r| openai::decode_usage(&data[r]))
        {
            Some(u) => seen.usage = Some(u),
            None => seen.malformed += 1,
        }
        return;
    }
    seen.text_bytes += json::string_len_after_key(data, &CONTENT_KEY) as u64;
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
        output: 350,
        reasoning: 128,
    };

    fn meter_split(
        format: BodyFormat,
        body: &[u8],
        cuts: &[usize],
        limits: MeterLimits,
    ) -> Metered {
        let mut m = Meter::new(format, limits);
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&body.len())) {
            m.feed(&body[last..c]);
            last = c;
        }
        m.finish()
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
        let mut m = Meter::new(BodyFormat::Json, limits);
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
