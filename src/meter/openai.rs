//! OpenAI-shaped usage: chat completions (streamed chunks and JSON bodies), and every server that
//! speaks that dialect (Databricks serving endpoints, vLLM, TGI, Gemini's OpenAI endpoint).
//!
//! `prompt_tokens` includes `prompt_tokens_details.cached_tokens` and `completion_tokens`
//! includes reasoning, so: `input = prompt − cached`, `cache_read = cached`, `output = completion`.

use serde::Deserialize;

use super::Usage;

#[derive(Debug, Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
    /// Some compatible servers report cache writes here.
    cache_write_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

/// Decodes an OpenAI `usage` object. `None` if it is not one (no token counts at all).
pub fn decode_usage(object: &[u8]) -> Option<Usage> {
    let raw: RawUsage = serde_json::from_slice(object).ok()?;
    if raw.prompt_tokens.is_none() && raw.completion_tokens.is_none() {
        return None;
    }
    let prompt = raw.prompt_tokens.unwrap_or(0);
    let (cached, cache_write) = raw.prompt_tokens_details.map_or((0, 0), |d| {
        (
            d.cached_tokens.unwrap_or(0),
            d.cache_write_tokens.unwrap_or(0),
        )
    });
    let cached = cached.min(prompt);
    Some(Usage {
        input: prompt - cached,
        cache_read: cached,
        cache_write,
        output: raw.completion_tokens.unwrap_or(0),
        reasoning: raw
            .completion_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0),
        ..Usage::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_cached_and_reasoning_tokens() {
        let u = decode_usage(
            br#"{"prompt_tokens":1200,"completion_tokens":350,"total_tokens":1550,"prompt_tokens_details":{"cached_tokens":1024},"completion_tokens_details":{"reasoning_tokens":128}}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            Usage {
                input: 176,
                cache_read: 1024,
                cache_write: 0,
                cache_write_1h: 0,
                output: 350,
                reasoning: 128
            }
        );
        assert_eq!(u.total(), 1550);
    }

    #[test]
    fn rejects_objects_without_counts() {
        assert_eq!(decode_usage(br#"{"foo":1}"#), None);
        assert_eq!(decode_usage(br#"{"prompt_tokens":"x"}"#), None);
        assert_eq!(decode_usage(b"not json"), None);
    }
}

#[derive(Debug, Deserialize)]
struct RawResponsesUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<InputDetails>,
    output_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Deserialize)]
struct InputDetails {
    cached_tokens: Option<u64>,
    cache_write_tokens: Option<u64>,
}

/// Decodes a Responses API `usage` object: `input_tokens` includes
/// `input_tokens_details.cached_tokens`, `output_tokens` includes reasoning.
pub fn decode_responses_usage(object: &[u8]) -> Option<Usage> {
    let raw: RawResponsesUsage = serde_json::from_slice(object).ok()?;
    if raw.input_tokens.is_none() && raw.output_tokens.is_none() {
        return None;
    }
    let input = raw.input_tokens.unwrap_or(0);
    let (cached, write) = raw.input_tokens_details.map_or((0, 0), |d| {
        (
            d.cached_tokens.unwrap_or(0),
            d.cache_write_tokens.unwrap_or(0),
        )
    });
    let cached = cached.min(input);
    Some(Usage {
        input: input - cached,
        cache_read: cached,
        cache_write: write,
        output: raw.output_tokens.unwrap_or(0),
        reasoning: raw
            .output_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0),
        ..Usage::default()
    })
}

#[cfg(test)]
mod responses_tests {
    use super::*;

    #[test]
    fn responses_usage_normalises_like_chat() {
        let u = decode_responses_usage(
            br#"{"input_tokens":1200,"input_tokens_details":{"cached_tokens":1024},"output_tokens":350,"output_tokens_details":{"reasoning_tokens":128},"total_tokens":1550}"#,
        )
        .unwrap();
        assert_eq!(
            (u.input, u.cache_read, u.output, u.reasoning),
            (176, 1024, 350, 128)
        );
        assert_eq!(decode_responses_usage(br#"{"prompt_tokens":1}"#), None);
    }
}

#[derive(Deserialize)]
struct UsageOnlyProbe {
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    usage: Option<serde::de::IgnoredAny>,
}

/// The byte range, within `chunk`, of a complete usage-only chat event (`data: {…"choices":[],
/// "usage":{…}}` and its blank line), so it can be withheld from a client that did not ask for
/// usage. `None` when the chunk has no such event or holds only part of it.
pub fn usage_only_event(chunk: &[u8]) -> Option<std::ops::Range<usize>> {
    static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    super::json::objects_after_key(chunk, &USAGE).find_map(|at| {
        let line_start = chunk[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if !chunk[line_start..].starts_with(b"data:") {
            return None;
        }
        // The event must end inside the chunk: its line, then an empty line.
        let nl = line_start + memchr::memchr(b'\n', &chunk[line_start..])?;
        let end = match chunk.get(nl + 1) {
            Some(b'\n') => nl + 2,
            Some(b'\r') if chunk.get(nl + 2) == Some(&b'\n') => nl + 3,
            _ => return None,
        };
        let data = chunk[line_start + 5..nl].trim_ascii();
        let probe: UsageOnlyProbe = serde_json::from_slice(data).ok()?;
        let no_choices = probe.choices.is_none_or(|c| c.is_empty());
        (no_choices && probe.usage.is_some()).then_some(line_start..end)
    })
}

#[cfg(test)]
mod usage_only_tests {
    use super::*;

    #[test]
    fn finds_only_complete_usage_only_events() {
        let usage = b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
        let mut chunk =
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\n".to_vec();
        let start = chunk.len();
        chunk.extend_from_slice(usage);
        chunk.extend_from_slice(b"data: [DONE]\n\n");
        assert_eq!(usage_only_event(&chunk), Some(start..start + usage.len()));
        // choices null or absent (compatible servers) count; a content chunk that carries usage does not.
        assert!(
            usage_only_event(b"data: {\"choices\":null,\"usage\":{\"prompt_tokens\":1}}\n\n")
                .is_some()
        );
        assert!(usage_only_event(b"data: {\"usage\":{\"prompt_tokens\":1}}\r\n\r\n").is_some());
        assert_eq!(
            usage_only_event(
                b"data: {\"choices\":[{\"index\":0}],\"usage\":{\"prompt_tokens\":1}}\n\n"
            ),
            None
        );
        // Cut before its end: left alone.
        assert_eq!(usage_only_event(&usage[..usage.len() - 1]), None);
        assert_eq!(usage_only_event(&usage[10..]), None);
    }
}
