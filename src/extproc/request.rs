//! What a request says about its cost: the route's API family and model, and from an
//! OpenAI-style JSON body the model, output bound, `n`, `stream`, and a prompt-size estimate.
//! Also the one body change we make: adding `stream_options.include_usage` so streamed chat
//! responses report usage.

use serde_json::Value;

/// The API dialect of a route: decides the error shape and the usage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI and every OpenAI-compatible server (Databricks, vLLM, TGI).
    OpenAi,
    Anthropic,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::OpenAi => "openai",
            Family::Anthropic => "anthropic",
        }
    }

    pub fn parse(s: &str) -> Option<Family> {
        Some(match s {
            "openai" | "databricks" | "vllm" | "tgi" => Family::OpenAi,
            "anthropic" => Family::Anthropic,
            _ => return None,
        })
    }
}

/// What the path alone tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFacts {
    pub family: Family,
    /// The model, when the path names it (Databricks `/serving-endpoints/{name}/invocations`).
    pub model: Option<String>,
}

pub fn route_facts(path: &str) -> RouteFacts {
    let path = path.split(['?', '#']).next().unwrap_or("");
    if let Some(rest) = path.strip_prefix("/serving-endpoints/")
        && let Some(name) = rest.strip_suffix("/invocations")
        && !name.is_empty()
        && !name.contains('/')
    {
        return RouteFacts {
            family: Family::OpenAi,
            model: Some(name.to_owned()),
        };
    }
    let family = if path.ends_with("/v1/messages") {
        Family::Anthropic
    } else {
        Family::OpenAi
    };
    RouteFacts {
        family,
        model: None,
    }
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
pub fn body_facts(body: &[u8]) -> Option<BodyFacts> {
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
        // Each message carries a few tokens of framing.
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

/// Bytes of text in a prompt-like value: strings, arrays of strings, content parts (`text`,
/// `content` fields). Structure beyond that is not counted.
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

    #[test]
    fn routes_tell_family_and_databricks_model() {
        assert_eq!(
            route_facts("/serving-endpoints/llama-70b/invocations?x=1"),
            RouteFacts {
                family: Family::OpenAi,
                model: Some("llama-70b".into())
            }
        );
        assert_eq!(
            route_facts("/v1/chat/completions"),
            RouteFacts {
                family: Family::OpenAi,
                model: None
            }
        );
        assert_eq!(
            route_facts("/v1/messages"),
            RouteFacts {
                family: Family::Anthropic,
                model: None
            }
        );
        assert_eq!(route_facts("/serving-endpoints//invocations").model, None);
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
