//! Units of account: [`Tokens`] and [`NanoUsd`]. Integers only; no float touches a cost.
//!
//! Prices are nano-USD per one million tokens, so a cost is
//! `ceil(Σ tokens_c × price_c / 1_000_000)` nano-USD, rounded **once per request, upward**: we never
//! under-charge, and the rounding error is below one nano-dollar per request.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A count of tokens (input + output, cached and reasoning included where a budget counts them).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Tokens(pub u64);

/// An amount of money in billionths of a US dollar.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct NanoUsd(pub u64);

pub const NANOS_PER_USD: u64 = 1_000_000_000;

impl Tokens {
    pub fn saturating_add(self, o: Tokens) -> Tokens {
        Tokens(self.0.saturating_add(o.0))
    }
}

impl NanoUsd {
    pub fn saturating_add(self, o: NanoUsd) -> NanoUsd {
        NanoUsd(self.0.saturating_add(o.0))
    }

    /// Micro-dollars, rounded down: the integer unit of the IETF `RateLimit` headers for USD budgets.
    pub fn micros(self) -> u64 {
        self.0 / 1_000
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid USD amount {input:?}: {reason}")]
pub struct UsdParseError {
    input: String,
    reason: &'static str,
}

impl FromStr for NanoUsd {
    type Err = UsdParseError;

    /// Parses `"12"`, `"12.5"`, `"$0.000000001"`: at most nine decimals, no sign, no exponent.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| UsdParseError {
            input: s.to_owned(),
            reason,
        };
        let t = s.trim();
        let t = t.strip_prefix('$').unwrap_or(t);
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(err("empty"));
        }
        if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(
                "expected digits with an optional decimal point, like 12.50",
            ));
        }
        if frac.len() > 9 {
            return Err(err(
                "more than nine decimal places (the unit is one nano-dollar)",
            ));
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| err("too large"))?
        };
        let mut nanos_frac: u64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            nanos_frac += u64::from(b - b'0') * 10u64.pow(8 - i as u32);
        }
        whole
            .checked_mul(NANOS_PER_USD)
            .and_then(|w| w.checked_add(nanos_frac))
            .map(NanoUsd)
            .ok_or_else(|| err("too large"))
    }
}

impl fmt::Display for NanoUsd {
    /// At least two decimals, up to nine, without trailing zeros: `12.50`, `0.000001234`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / NANOS_PER_USD;
        let frac = self.0 % NANOS_PER_USD;
        let mut digits = format!("{frac:09}");
        while digits.len() > 2 && digits.ends_with('0') {
            digits.pop();
        }
        write!(f, "{whole}.{digits}")
    }
}

impl Serialize for UsdString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UsdString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(UsdString).map_err(serde::de::Error::custom)
    }
}

/// A [`NanoUsd`] that travels as a decimal string (`"500.00"`) in config files and JSON,
/// because JSON numbers invite floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsdString(pub NanoUsd);

/// Per-model prices, in nano-USD per one million tokens of each class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub input: NanoUsd,
    pub output: NanoUsd,
    pub cache_read: NanoUsd,
    pub cache_write: NanoUsd,
    /// Anthropic 1-hour cache writes.
    pub cache_write_1h: NanoUsd,
}

/// Token counts per billing class, as the provider reported them (normalised; see `meter::Usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenClasses {
    /// Uncached prompt tokens.
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub cache_write_1h: u64,
    /// Visible + reasoning output.
    pub output: u64,
}

impl TokenClasses {
    /// What a token budget counts: every class.
    pub fn total(&self) -> Tokens {
        Tokens(
            self.input
                .saturating_add(self.cache_read)
                .saturating_add(self.cache_write)
                .saturating_add(self.cache_write_1h)
                .saturating_add(self.output),
        )
    }
}

impl Price {
    /// The exact cost of `t` at this price, rounded up to the next nano-dollar.
    pub fn cost(&self, t: &TokenClasses) -> NanoUsd {
        let sum: u128 = u128::from(t.input) * u128::from(self.input.0)
            + u128::from(t.cache_read) * u128::from(self.cache_read.0)
            + u128::from(t.cache_write) * u128::from(self.cache_write.0)
            + u128::from(t.cache_write_1h) * u128::from(self.cache_write_1h.0)
            + u128::from(t.output) * u128::from(self.output.0);
        let nanos = sum.div_ceil(1_000_000);
        NanoUsd(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(s: &str) -> NanoUsd {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_dollars_exactly() {
        for (input, nanos, shown) in [
            ("12", 12_000_000_000, "12.00"),
            ("12.5", 12_500_000_000, "12.50"),
            ("$0.000000001", 1, "0.000000001"),
            (".25", 250_000_000, "0.25"),
            ("500.02", 500_020_000_000, "500.02"),
        ] {
            let v = usd(input);
            assert_eq!(v, NanoUsd(nanos), "{input}");
            assert_eq!(v.to_string(), shown, "{input}");
        }
    }

    #[test]
    fn rejects_what_is_not_an_amount() {
        for bad in [
            "",
            "-1",
            "1e3",
            "1.0000000001",
            "abc",
            "1.2.3",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<NanoUsd>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn cost_rounds_up_once_per_request() {
        // gpt-4o-mini-like prices: $0.15 in, $0.60 out, $0.075 cached, per 1M tokens.
        let p = Price {
            input: usd("0.15"),
            output: usd("0.60"),
            cache_read: usd("0.075"),
            cache_write: NanoUsd(0),
            cache_write_1h: NanoUsd(0),
        };
        let t = TokenClasses {
            input: 176,
            cache_read: 1024,
            cache_write: 0,
            cache_write_1h: 0,
            output: 350,
        };
        // 176*150_000_000 + 1024*75_000_000 + 350*600_000_000 = 26_400_000_000 + 76_800_000_000 + 210_000_000_000
        assert_eq!(p.cost(&t), NanoUsd(313_200));
        // One token at $0.15/M is 150 nano-USD exactly; at $0.0000001/M it rounds up to 1.
        assert_eq!(
            p.cost(&TokenClasses {
                input: 1,
                ..Default::default()
            }),
            NanoUsd(150)
        );
        let tiny = Price {
            input: NanoUsd(100),
            ..Default::default()
        };
        assert_eq!(
            tiny.cost(&TokenClasses {
                input: 1,
                ..Default::default()
            }),
            NanoUsd(1)
        );
    }

    #[test]
    fn cost_never_overflows() {
        let p = Price {
            input: NanoUsd(u64::MAX),
            ..Default::default()
        };
        let t = TokenClasses {
            input: u64::MAX,
            ..Default::default()
        };
        assert_eq!(p.cost(&t), NanoUsd(u64::MAX));
    }
}
