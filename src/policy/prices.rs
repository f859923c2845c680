//! The default price table shipped with the binary (`default_prices.toml`), and its parser.

use serde::{Deserialize, Serialize};

use super::money::{Price, UsdString};

const DEFAULT_PRICES: &str = include_str!("default_prices.toml");

/// A price table file: `[[price]]` entries (TOML), or `{"price": [...]}` (JSON).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceFile {
    pub price: Vec<PriceEntry>,
}

/// One price, in US dollars per one million tokens, as decimal strings.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    pub model: String,
    pub input: UsdString,
    pub output: UsdString,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read: Option<UsdString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<UsdString>,
    /// Anthropic 1-hour cache writes (default: `cache_write`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h: Option<UsdString>,
    /// RFC 3339 instant the price applies from; absent = from the beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_from: Option<String>,
}

impl PriceEntry {
    pub fn price(&self) -> Price {
        let input = self.input.0;
        Price {
            input,
            output: self.output.0,
            // Without a cache price, cached tokens cost as much as input: never less.
            cache_read: self.cache_read.map_or(input, |u| u.0),
            cache_write: self.cache_write.map_or(input, |u| u.0),
            // 1-hour writes default to the (5-minute) write price.
            cache_write_1h: self
                .cache_write_1h
                .or(self.cache_write)
                .map_or(input, |u| u.0),
        }
    }

    /// `effective_from` in epoch milliseconds (0 when absent).
    pub fn effective_from_ms(&self) -> Result<i64, String> {
        match &self.effective_from {
            None => Ok(0),
            Some(t) => chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| d.timestamp_millis())
                .map_err(|e| format!("price for {}: effective_from {t:?}: {e}", self.model)),
        }
    }

    pub fn new(model: &str, effective_from_ms: i64, p: &Price) -> PriceEntry {
        PriceEntry {
            model: model.to_owned(),
            input: UsdString(p.input),
            output: UsdString(p.output),
            cache_read: Some(UsdString(p.cache_read)),
            cache_write: Some(UsdString(p.cache_write)),
            cache_write_1h: Some(UsdString(p.cache_write_1h)),
            effective_from: (effective_from_ms != 0).then(|| {
                chrono::DateTime::<chrono::Utc>::from_timestamp_millis(effective_from_ms)
                    .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default()
            }),
        }
    }
}

/// Parses a TOML or JSON price file.
pub fn parse_price_file(text: &str, json: bool) -> Result<PriceFile, String> {
    if json {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// Parses a price table in the `default_prices.toml` format (USD per 1M tokens, as strings).
pub fn parse_price_table(text: &str) -> Result<Vec<(String, Price)>, String> {
    let file = parse_price_file(text, false)?;
    Ok(file
        .price
        .into_iter()
        .map(|e| (e.model.clone(), e.price()))
        .collect())
}

/// The shipped default table.
pub fn default_prices() -> Vec<(String, Price)> {
    parse_price_table(DEFAULT_PRICES).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::money::NanoUsd;

    #[test]
    fn the_shipped_table_parses_and_is_exact() {
        let table = parse_price_table(DEFAULT_PRICES).unwrap();
        assert!(table.len() >= 25);
        for family in [
            "gpt-4o",
            "claude-sonnet-4-5",
            "gemini-2.5-pro",
            "databricks-meta-llama-3-3-70b-instruct",
            "llama-3.3-70b-instruct",
        ] {
            assert!(table.iter().any(|(m, _)| m == family), "{family} missing");
        }
        let (_, mini) = table.iter().find(|(m, _)| m == "gpt-4o-mini").unwrap();
        assert_eq!(mini.input, NanoUsd(150_000_000));
        assert_eq!(mini.cache_read, NanoUsd(75_000_000));
        assert_eq!(mini.cache_write, NanoUsd(150_000_000));
    }
}
