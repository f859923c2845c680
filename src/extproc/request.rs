//! What a request says about its cost: the route's API family and model, and from an
//! OpenAI-style JSON body the model, output bound, `n`, `stream`, and a prompt-size estimate.
//! Also the one body change we make: adding `stream_options.include_usage` so streamed chat
//! responses report usage.

use crate::meter::Api;

/// Whose error shapes a route's callers expect (their SDKs parse them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI and every OpenAI-compatible server (vLLM, TGI).
    OpenAi,
    Anthropic,
    Gemini,
    Bedrock,
    /// Databricks serving endpoints: OpenAI shapes plus Databricks' own `error_code`.
    Databricks,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::OpenAi => "openai",
            Family::Anthropic => "anthropic",
            Family::Gemini => "gemini",
            Family::Bedrock => "bedrock",
            Family::Databricks => "databricks",
        }
    }
}

/// The route's dialect, from a per-route hint (`x-tokenbudget-family` in the ext_proc
/// `grpc_initial_metadata`): `openai`, `openai-responses`, `anthropic`, `gemini`, `bedrock`,
/// `databricks` (also `vllm`, `tgi`: OpenAI-compatible).
pub fn parse_hint(s: &str) -> Option<(Family, Api)> {
    Some(match s {
        "openai" | "vllm" | "tgi" => (Family::OpenAi, Api::OpenAi),
        "openai-responses" => (Family::OpenAi, Api::OpenAiResponses),
        "anthropic" => (Family::Anthropic, Api::Anthropic),
        "gemini" | "vertex" => (Family::Gemini, Api::Gemini),
        "bedrock" => (Family::Bedrock, Api::Bedrock),
        "databricks" => (Family::Databricks, Api::OpenAi),
        _ => return None,
    })
}

/// What the path alone tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFacts {
    pub family: Family,
    pub api: Api,
    /// The model, when the path names it (Databricks, Gemini/Vertex, Vertex Anthropic, Bedrock).
    pub model: Option<String>,
    /// Streamed OpenAI chat/completions may get `stream_options.include_usage` added. Never
    /// the Responses API, embeddings, or another dialect (Bedrock requests are signed).
    pub injectable: bool,
}

impl RouteFacts {
    fn new(family: Family, api: Api, model: Option<String>) -> Self {
        RouteFacts {
            family,
            api,
            model,
            injectable: false,
        }
    }
}

/// Family, dialect and model from the request path.
pub fn route_facts(path: &str) -> RouteFacts {
    let path = path.split(['?', '#']).next().unwrap_or("");
    if let Some(rest) = path.strip_prefix("/serving-endpoints/")
        && let Some(name) = rest.strip_suffix("/invocations")
        && !name.is_empty()
        && !name.contains('/')
    {
        return RouteFacts {
            injectable: true,
            ..RouteFacts::new(Family::Databricks, Api::OpenAi, Some(name.to_owned()))
        };
    }
    // Bedrock: /model/{modelId}/converse[-stream] | /invoke[-with-response-stream]
    if let Some(rest) = path.strip_prefix("/model/")
        && let Some((id, op)) = rest.rsplit_once('/')
        && matches!(
            op,
            "converse" | "converse-stream" | "invoke" | "invoke-with-response-stream"
        )
    {
        return RouteFacts::new(
            Family::Bedrock,
            Api::Bedrock,
            Some(bedrock_model(&percent_decode(id))),
        );
    }
    // Gemini API and Vertex: …/models/{model}:generateContent | :streamGenerateContent,
    // Vertex Anthropic: …/publishers/anthropic/models/{model}:rawPredict | :streamRawPredict.
    if let Some(i) = path.rfind("/models/") {
        let tail = &path[i + "/models/".len()..];
        if let Some((model, verb)) = tail.split_once(':') {
            let model = Some(model.to_owned());
            match verb {
                "generateContent" | "streamGenerateContent" => {
                    return RouteFacts::new(Family::Gemini, Api::Gemini, model);
                }
                "rawPredict" | "streamRawPredict" if path.contains("/publishers/anthropic/") => {
                    return RouteFacts::new(Family::Anthropic, Api::Anthropic, model);
                }
                _ => {}
            }
        }
    }
    if path.ends_with("/messages") {
        return RouteFacts::new(Family::Anthropic, Api::Anthropic, None);
    }
    if path.ends_with("/responses") {
        return RouteFacts::new(Family::OpenAi, Api::OpenAiResponses, None);
    }
    let family = if path.starts_with("/serving-endpoints/") {
        Family::Databricks
    } else {
        Family::OpenAi
    };
    RouteFacts {
        injectable: !path.ends_with("/embeddings"),
        ..RouteFacts::new(family, Api::OpenAi, None)
    }
}

/// Bedrock model id, inference profile or ARN → the provider's model name:
/// `arn:…:inference-profile/us.anthropic.claude-3-5-sonnet-20241022-v2:0` → `claude-3-5-sonnet-20241022`.
pub fn bedrock_model(id: &str) -> String {
    let mut m = id.rsplit('/').next().unwrap_or(id);
    for region in ["us.", "eu.", "apac.", "us-gov.", "global."] {
        if let Some(rest) = m.strip_prefix(region) {
            m = rest;
            break;
        }
    }
    for provider in [
        "anthropic.",
        "meta.",
        "amazon.",
        "mistral.",
        "cohere.",
        "ai21.",
        "deepseek.",
        "openai.",
        "qwen.",
        "writer.",
    ] {
        if let Some(rest) = m.strip_prefix(provider) {
            m = rest;
            break;
        }
    }
    // Version suffix: ":0", "-v1:0", "-v2:0".
    if let Some((base, ver)) = m.rsplit_once(':')
        && ver.bytes().all(|b| b.is_ascii_digit())
    {
        m = base;
        if let Some((b2, v)) = m.rsplit_once("-v")
            && !v.is_empty()
            && v.bytes().all(|b| b.is_ascii_digit())
        {
            m = b2;
        }
    }
    m.to_owned()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (
                (b[i + 1] as char).to_digit(16),
                (b[i + 2] as char).to_digit(16),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a JSON request body tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFacts {
    pub model: Option<String>,
    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens`.
    pub max_output: Option<u64>,
    /// Number of choices generated (`n`, or `best_of` when larger).
    pub choices: u64,
    pub stream: bool,
    /// `stream_options.include_usage` is already true.
    pub includes_usage: bool,
    pub has_stream_options: bool,
    /// Bytes of prompt text (message contents, `prompt`, `input`, `system`).
    pub prompt_bytes: u64,
}

/// Reads a request body. `None` if it is not a JSON object (the upstream will reject it).
///
/// One pass over the bytes with serde's visitors: the fields that matter are read, prompt text is
/// measured without being copied, everything else is skipped — no `serde_json::Value` tree, no
/// allocation but the model name.
pub fn body_facts(body: &[u8]) -> Option<BodyFacts> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let raw = serde::Deserializer::deserialize_map(&mut de, FactsVisitor).ok()?;
    de.end().ok()?;
    Some(BodyFacts {
        model: raw.model,
        max_output: raw
            .max_completion_tokens
            .or(raw.max_tokens)
            .or(raw.max_output_tokens),
        choices: raw.n.unwrap_or(1).max(raw.best_of.unwrap_or(1)).max(1),
        stream: raw.stream.unwrap_or(false),
        includes_usage: raw.include_usage,
        has_stream_options: raw.has_stream_options,
        // Each message carries a few tokens of framing.
        prompt_bytes: raw.prompt_bytes + 16 * raw.messages,
    })
}

#[derive(Default)]
struct RawFacts {
    model: Option<String>,
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    n: Option<u64>,
    best_of: Option<u64>,
    stream: Option<bool>,
    include_usage: bool,
    has_stream_options: bool,
    prompt_bytes: u64,
    messages: u64,
}

struct FactsVisitor;

impl<'de> serde::de::Visitor<'de> for FactsVisitor {
    type Value = RawFacts;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawFacts, A::Error> {
        use serde::de::IgnoredAny;
        let mut f = RawFacts::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "model" => {
                    f.model = map
                        .next_value::<Lenient<std::borrow::Cow<'de, str>>>()?
                        .0
                        .map(std::borrow::Cow::into_owned)
                }
                "max_completion_tokens" => {
                    f.max_completion_tokens = map.next_value::<Lenient<u64>>()?.0
                }
                "max_tokens" => f.max_tokens = map.next_value::<Lenient<u64>>()?.0,
                "max_output_tokens" => f.max_output_tokens = map.next_value::<Lenient<u64>>()?.0,
                "n" => f.n = map.next_value::<Lenient<u64>>()?.0,
                "best_of" => f.best_of = map.next_value::<Lenient<u64>>()?.0,
                "stream" => f.stream = map.next_value::<Lenient<bool>>()?.0,
                "stream_options" => {
                    let o = map.next_value::<StreamOptions>()?;
                    f.has_stream_options = o.present;
                    f.include_usage = o.include_usage;
                }
                "messages" => {
                    let t = map.next_value::<TextBytes>()?;
                    f.prompt_bytes += t.bytes;
                    f.messages = t.items;
                }
                "prompt" | "input" | "system" | "contents" => {
                    f.prompt_bytes += map.next_value::<TextBytes>()?.bytes
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(f)
    }
}

/// A value of type `T` if it is one, else nothing (whatever it was is skipped).
struct Lenient<T>(Option<T>);

/// A scalar as found, or `Other` for anything else (skipped without allocating).
enum Scalar {
    U(u64),
    I(i64),
    B(bool),
    Other,
}

impl<'de> serde::Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::U(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::I(v))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::B(v))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Scalar, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Scalar, A::Error> {
                while m
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for Lenient<u64> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Lenient(match Scalar::deserialize(d)? {
            Scalar::U(v) => Some(v),
            Scalar::I(v) => u64::try_from(v).ok(),
            _ => None,
        }))
    }
}

impl<'de> serde::Deserialize<'de> for Lenient<bool> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Lenient(match Scalar::deserialize(d)? {
            Scalar::B(v) => Some(v),
            _ => None,
        }))
    }
}

impl<'de> serde::Deserialize<'de> for Lenient<std::borrow::Cow<'de, str>> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Lenient<std::borrow::Cow<'de, str>>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Lenient(Some(std::borrow::Cow::Borrowed(v))))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Lenient(Some(std::borrow::Cow::Owned(v.to_owned()))))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<Self::Value, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                while m
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Lenient(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `stream_options`: present (not null), and whether `include_usage` is true.
struct StreamOptions {
    present: bool,
    include_usage: bool,
}

impl<'de> serde::Deserialize<'de> for StreamOptions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StreamOptions;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<StreamOptions, E> {
                Ok(StreamOptions {
                    present: false,
                    include_usage: false,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<StreamOptions, A::Error> {
                let mut include_usage = false;
                while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                    if k == "include_usage" {
                        include_usage = m.next_value::<Lenient<bool>>()?.0.unwrap_or(false);
                    } else {
                        m.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(StreamOptions {
                    present: true,
                    include_usage,
                })
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<StreamOptions, E> {
                Ok(StreamOptions {
                    present: true,
                    include_usage: false,
                })
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<StreamOptions, E> {
                Ok(StreamOptions {
                    present: true,
                    include_usage: false,
                })
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<StreamOptions, E> {
                Ok(StreamOptions {
                    present: true,
                    include_usage: false,
                })
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<StreamOptions, E> {
                Ok(StreamOptions {
                    present: true,
                    include_usage: false,
                })
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<StreamOptions, E> {
                Ok(StreamOptions {
                    present: true,
                    include_usage: false,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<StreamOptions, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(StreamOptions {
                    present: true,
                    include_usage: false,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Bytes of text in a prompt-like value, measured in place: strings, arrays of them, and the
/// `content`, `text` and `parts` fields of objects (content parts). `items`: the length of a
/// top-level array (messages). Nothing is copied.
#[derive(Default)]
struct TextBytes {
    bytes: u64,
    items: u64,
}

impl<'de> serde::Deserialize<'de> for TextBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> serde::de::Visitor<'de> for TextVisitor {
    type Value = TextBytes;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any value")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TextBytes, E> {
        Ok(TextBytes {
            bytes: v.len() as u64,
            items: 0,
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<TextBytes, A::Error> {
        let mut t = TextBytes::default();
        while let Some(x) = s.next_element::<TextBytes>()? {
            t.bytes += x.bytes;
            t.items += 1;
        }
        Ok(t)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<TextBytes, A::Error> {
        let mut t = TextBytes::default();
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            if matches!(k.as_ref(), "content" | "text" | "parts") {
                t.bytes += m.next_value::<TextBytes>()?.bytes;
            } else {
                m.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(t)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<TextBytes, E> {
        Ok(TextBytes::default())
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<TextBytes, E> {
        Ok(TextBytes::default())
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<TextBytes, E> {
        Ok(TextBytes::default())
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<TextBytes, E> {
        Ok(TextBytes::default())
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<TextBytes, E> {
        Ok(TextBytes::default())
    }
}

/// The body with `"stream_options":{"include_usage":true}` added, when the body streams and has
/// no `stream_options` (a body that has them is left to the client's choice). The insertion is
/// textual, right after the opening brace, so every other byte is preserved.
pub fn inject_include_usage(body: &[u8], facts: &BodyFacts) -> Option<Vec<u8>> {
    if !facts.stream || facts.includes_usage || facts.has_stream_options {
        return None;
    }
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let rest = &body[open + 1..];
    let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
    let mut out = Vec::with_capacity(body.len() + FIELD.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(FIELD);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn routes_tell_family_dialect_and_model() {
        let check =
            |path: &str, family: Family, api: Api, model: Option<&str>, injectable: bool| {
                let f = route_facts(path);
                assert_eq!(
                    (f.family, f.api, f.model.as_deref(), f.injectable),
                    (family, api, model, injectable),
                    "{path}"
                );
            };
        check(
            "/serving-endpoints/llama-70b/invocations?x=1",
            Family::Databricks,
            Api::OpenAi,
            Some("llama-70b"),
            true,
        );
        check(
            "/serving-endpoints/chat/completions",
            Family::Databricks,
            Api::OpenAi,
            None,
            true,
        );
        check(
            "/v1/chat/completions",
            Family::OpenAi,
            Api::OpenAi,
            None,
            true,
        );
        check("/v1/completions", Family::OpenAi, Api::OpenAi, None, true);
        check("/v1/embeddings", Family::OpenAi, Api::OpenAi, None, false);
        check(
            "/v1/responses",
            Family::OpenAi,
            Api::OpenAiResponses,
            None,
            false,
        );
        check(
            "/v1/messages",
            Family::Anthropic,
            Api::Anthropic,
            None,
            false,
        );
        check(
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            Family::Gemini,
            Api::Gemini,
            Some("gemini-2.5-pro"),
            false,
        );
        check(
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent",
            Family::Gemini,
            Api::Gemini,
            Some("gemini-2.5-flash"),
            false,
        );
        check(
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict",
            Family::Anthropic,
            Api::Anthropic,
            Some("claude-sonnet-4-5@20250929"),
            false,
        );
        check(
            "/model/us.anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse-stream",
            Family::Bedrock,
            Api::Bedrock,
            Some("claude-3-5-sonnet-20241022"),
            false,
        );
        check(
            "/serving-endpoints//invocations",
            Family::Databricks,
            Api::OpenAi,
            None,
            true,
        );
    }

    #[test]
    fn bedrock_ids_profiles_and_arns_name_one_model() {
        for id in [
            "anthropic.claude-3-5-sonnet-20241022-v2:0",
            "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-20241022-v2:0",
        ] {
            assert_eq!(bedrock_model(id), "claude-3-5-sonnet-20241022", "{id}");
        }
        assert_eq!(
            bedrock_model("meta.llama3-3-70b-instruct-v1:0"),
            "llama3-3-70b-instruct"
        );
        assert_eq!(percent_decode("a%3Ab%2"), "a:b%2");
    }

    /// The first version, over a `serde_json::Value` tree: the one-pass reader must agree.
    fn reference_facts(body: &[u8]) -> Option<BodyFacts> {
        fn text_bytes(v: &Value) -> u64 {
            match v {
                Value::String(s) => s.len() as u64,
                Value::Array(a) => a.iter().map(text_bytes).sum(),
                Value::Object(o) => ["content", "text", "parts"]
                    .iter()
                    .filter_map(|k| o.get(*k))
                    .map(text_bytes)
                    .sum(),
                _ => 0,
            }
        }
        let v: Value = serde_json::from_slice(body).ok()?;
        let obj = v.as_object()?;
        let u = |k: &str| obj.get(k).and_then(Value::as_u64);
        let stream_options = obj.get("stream_options");
        let mut prompt_bytes = 0;
        for key in ["messages", "prompt", "input", "system", "contents"] {
            if let Some(x) = obj.get(key) {
                prompt_bytes += text_bytes(x);
            }
        }
        if let Some(Value::Array(msgs)) = obj.get("messages") {
            prompt_bytes += 16 * msgs.len() as u64;
        }
        Some(BodyFacts {
            model: obj.get("model").and_then(Value::as_str).map(str::to_owned),
            max_output: u("max_completion_tokens")
                .or_else(|| u("max_tokens"))
                .or_else(|| u("max_output_tokens")),
            choices: u("n").unwrap_or(1).max(u("best_of").unwrap_or(1)).max(1),
            stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
            includes_usage: stream_options
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            has_stream_options: stream_options.is_some_and(|o| !o.is_null()),
            prompt_bytes,
        })
    }

    #[test]
    fn the_one_pass_body_reader_agrees_with_a_full_parse() {
        for body in [
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"model":"g\u0070t-4o\n","max_tokens":7,"stream":true,"stream_options":null}"#,
            r#"{"model":7,"max_tokens":-5,"n":1.5,"best_of":3,"stream":"yes","stream_options":{}}"#,
            r#"{"stream_options":{"include_usage":true,"x":[1,{"a":2}]},"stream":true}"#,
            r#"{"stream_options":"on","max_output_tokens":99,"max_completion_tokens":null}"#,
            r#"{"messages":[{"content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"data:x"}}]},{"content":null},"loose"],"system":[{"text":"sys"}]}"#,
            r#"{"contents":[{"role":"user","parts":[{"text":"gemini"}]}],"input":["a","bb"],"prompt":"p"}"#,
            r#"{"model":"a","model":"b","max_tokens":1,"max_tokens":2}"#,
            r#"{"nested":{"model":"no","messages":["x"]},"model":"yes"}"#,
            r#"{}"#,
            r#"[1]"#,
            r#"{"model":"x""#,
            r#"{"model":"x"} trailing"#,
            r#"not json"#,
        ] {
            assert_eq!(
                body_facts(body.as_bytes()),
                reference_facts(body.as_bytes()),
                "{body}"
            );
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("model".to_string()),
            Just("max_tokens".to_string()),
            Just("n".to_string()),
            Just("stream".to_string()),
            Just("stream_options".to_string()),
            Just("include_usage".to_string()),
            Just("messages".to_string()),
            Just("content".to_string()),
            Just("text".to_string()),
            Just("parts".to_string()),
            Just("prompt".to_string()),
            "[a-z]{1,4}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((key.clone(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn any_json_body_reads_the_same_as_a_full_parse(v in json_value()) {
            let body = serde_json::to_vec(&v).unwrap();
            proptest::prop_assert_eq!(body_facts(&body), reference_facts(&body));
        }
    }

    #[test]
    fn body_facts_read_model_bounds_and_prompt() {
        let f = body_facts(
            br#"{"model":"gpt-4o","max_tokens":100,"max_completion_tokens":50,"n":2,"stream":true,
                 "messages":[{"role":"user","content":"Hello there"},{"role":"user","content":[{"type":"text","text":"abc"}]}]}"#,
        )
        .unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
        assert_eq!(f.max_output, Some(50));
        assert_eq!(f.choices, 2);
        assert!(f.stream && !f.includes_usage && !f.has_stream_options);
        assert_eq!(f.prompt_bytes, 11 + 3 + 32);
        assert_eq!(body_facts(b"[1,2]"), None);
        assert_eq!(body_facts(b"{\"model\":"), None);
    }

    #[test]
    fn include_usage_is_injected_only_when_streaming_without_options() {
        let body = br#"  {"model":"m","stream":true}"#;
        let out = inject_include_usage(body, &body_facts(body).unwrap()).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(v["model"], "m");
        for unchanged in [
            &br#"{"model":"m","stream":false}"#[..],
            br#"{"model":"m"}"#,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        ] {
            assert_eq!(
                inject_include_usage(unchanged, &body_facts(unchanged).unwrap()),
                None
            );
        }
    }
}
