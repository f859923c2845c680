//! AWS Bedrock usage. Converse / ConverseStream `usage` (`inputTokens` excludes cache reads and
//! writes), and the `amazon-bedrock-invocationMetrics` of `InvokeModel` streams.

use serde::Deserialize;

use super::Usage;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_write_input_tokens: Option<u64>,
}

/// A Converse `usage` object.
pub fn decode_usage(object: &[u8]) -> Option<Usage> {
    let r: RawUsage = serde_json::from_slice(object).ok()?;
    if r.input_tokens.is_none() && r.output_tokens.is_none() {
        return None;
    }
    Some(Usage {
        input: r.input_tokens.unwrap_or(0),
        cache_read: r.cache_read_input_tokens.unwrap_or(0),
        cache_write: r.cache_write_input_tokens.unwrap_or(0),
        output: r.output_tokens.unwrap_or(0),
        ..Usage::default()
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMetrics {
    input_token_count: Option<u64>,
    output_token_count: Option<u64>,
    cache_read_input_token_count: Option<u64>,
    cache_write_input_token_count: Option<u64>,
}

/// An `amazon-bedrock-invocationMetrics` object.
pub fn decode_invocation_metrics(object: &[u8]) -> Option<Usage> {
    let r: RawMetrics = serde_json::from_slice(object).ok()?;
    r.input_token_count.or(r.output_token_count)?;
    Some(Usage {
        input: r.input_token_count.unwrap_or(0),
        cache_read: r.cache_read_input_token_count.unwrap_or(0),
        cache_write: r.cache_write_input_token_count.unwrap_or(0),
        output: r.output_token_count.unwrap_or(0),
        ..Usage::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_excludes_cache_and_totals_add_up() {
        let u = decode_usage(br#"{"inputTokens":30,"outputTokens":256,"totalTokens":2334,"cacheReadInputTokens":2048,"cacheWriteInputTokens":0}"#).unwrap();
        assert_eq!(
            u,
            Usage {
                input: 30,
                cache_read: 2048,
                output: 256,
                ..Usage::default()
            }
        );
        assert_eq!(u.total(), 2334);
        let m = decode_invocation_metrics(
            br#"{"inputTokenCount":12,"outputTokenCount":34,"invocationLatency":1}"#,
        )
        .unwrap();
        assert_eq!((m.input, m.output), (12, 34));
        assert_eq!(decode_usage(b"{}"), None);
    }
}
