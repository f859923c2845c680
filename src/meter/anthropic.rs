//! Anthropic Messages usage (also on Vertex `rawPredict` and inside Bedrock `InvokeModel` chunks).
//!
//! `input_tokens` excludes cache reads and writes. In a stream, `message_start.message.usage` is
//! the baseline and each `message_delta.usage` is **cumulative**: per field, the last non-null
//! value wins; fields a delta omits keep the baseline. Never sum.

use serde::Deserialize;

use super::Usage;

#[derive(Debug, Default, Deserialize)]
struct RawUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
}

#[derive(Debug, Default, Deserialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

/// Usage fields seen so far in one response, merged last-non-null-wins.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Accumulator {
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
    write_5m: Option<u64>,
    write_1h: Option<u64>,
}

impl Accumulator {
    /// Merges one `usage` object. False if it is not one.
    pub fn merge(&mut self, object: &[u8]) -> bool {
        let Ok(raw) = serde_json::from_slice::<RawUsage>(object) else {
            return false;
        };
        let is_usage = raw_is_usage(&raw);
        let before = *self;
        let set = |slot: &mut Option<u64>, v: Option<u64>| {
            if v.is_some() {
                *slot = v;
            }
        };
        set(&mut self.input, raw.input_tokens);
        set(&mut self.output, raw.output_tokens);
        set(&mut self.cache_read, raw.cache_read_input_tokens);
        set(&mut self.cache_creation, raw.cache_creation_input_tokens);
        if let Some(cc) = raw.cache_creation {
            set(&mut self.write_5m, cc.ephemeral_5m_input_tokens);
            set(&mut self.write_1h, cc.ephemeral_1h_input_tokens);
        }
        *self != before || is_usage
    }

    pub fn usage(&self) -> Option<Usage> {
        if self.input.is_none() && self.output.is_none() {
            return None;
        }
        // The 5m/1h split when present; else every cache write is a 5-minute write.
        let (w5, w1) = match (self.write_5m, self.write_1h) {
            (None, None) => (self.cache_creation.unwrap_or(0), 0),
            (a, b) => (a.unwrap_or(0), b.unwrap_or(0)),
        };
        Some(Usage {
            input: self.input.unwrap_or(0),
            cache_read: self.cache_read.unwrap_or(0),
            cache_write: w5,
            cache_write_1h: w1,
            output: self.output.unwrap_or(0),
            reasoning: 0,
        })
    }
}

fn raw_is_usage(r: &RawUsage) -> bool {
    r.input_tokens.is_some() || r.output_tokens.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_are_cumulative_and_fall_back_to_the_start() {
        let mut a = Accumulator::default();
        assert!(a.merge(br#"{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":1800,"cache_creation":{"ephemeral_5m_input_tokens":60,"ephemeral_1h_input_tokens":40},"output_tokens":1}"#));
        assert!(a.merge(br#"{"output_tokens":300}"#));
        assert!(
            a.merge(br#"{"output_tokens":512,"input_tokens":null,"cache_read_input_tokens":null}"#)
        );
        assert_eq!(
            a.usage(),
            Some(Usage {
                input: 25,
                cache_read: 1800,
                cache_write: 60,
                cache_write_1h: 40,
                output: 512,
                reasoning: 0
            })
        );
        assert_eq!(
            a.usage().unwrap().total(),
            25 + 1800 + 100 + 512,
            "cache tokens counted once"
        );
    }

    #[test]
    fn unsplit_cache_writes_are_five_minute_writes() {
        let mut a = Accumulator::default();
        a.merge(br#"{"input_tokens":3,"cache_creation_input_tokens":90,"output_tokens":7}"#);
        let u = a.usage().unwrap();
        assert_eq!((u.cache_write, u.cache_write_1h), (90, 0));
        // Input reported only on the delta (some compatible backends).
        let mut b = Accumulator::default();
        b.merge(br#"{"output_tokens":1}"#);
        b.merge(br#"{"input_tokens":11,"output_tokens":20}"#);
        assert_eq!(
            (b.usage().unwrap().input, b.usage().unwrap().output),
            (11, 20)
        );
        assert!(!Accumulator::default().merge(b"nope"));
    }
}
