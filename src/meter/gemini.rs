//! Gemini / Vertex `usageMetadata`. `promptTokenCount` includes `cachedContentTokenCount`;
//! `candidatesTokenCount` excludes `thoughtsTokenCount`. So: `input = prompt − cached + tool-use
//! prompt`, `cache_read = cached`, `output = candidates + thoughts`, `reasoning = thoughts`.
//! It may appear on every chunk of a stream: the last one is the total.

use serde::Deserialize;

use super::Usage;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawUsage {
    prompt_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    tool_use_prompt_token_count: Option<u64>,
}

pub fn decode_usage(object: &[u8]) -> Option<Usage> {
    let r: RawUsage = serde_json::from_slice(object).ok()?;
    if r.prompt_token_count.is_none() && r.candidates_token_count.is_none() {
        return None;
    }
    let prompt = r.prompt_token_count.unwrap_or(0);
    let cached = r.cached_content_token_count.unwrap_or(0).min(prompt);
    let thoughts = r.thoughts_token_count.unwrap_or(0);
    Some(Usage {
        input: prompt - cached + r.tool_use_prompt_token_count.unwrap_or(0),
        cache_read: cached,
        output: r.candidates_token_count.unwrap_or(0) + thoughts,
        reasoning: thoughts,
        ..Usage::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_tokens_are_output_and_cached_tokens_are_not_input() {
        let u = decode_usage(br#"{"promptTokenCount":7477,"cachedContentTokenCount":1000,"candidatesTokenCount":2060,"thoughtsTokenCount":1939,"totalTokenCount":11476}"#).unwrap();
        assert_eq!(
            u,
            Usage {
                input: 6477,
                cache_read: 1000,
                output: 3999,
                reasoning: 1939,
                ..Usage::default()
            }
        );
        assert_eq!(u.total(), 11476, "matches totalTokenCount");
        assert_eq!(decode_usage(br#"{"promptTokenCount":5}"#).unwrap().input, 5);
        assert_eq!(decode_usage(br#"{"other":1}"#), None);
    }
}
