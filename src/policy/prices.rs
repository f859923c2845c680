//! The default price table shipped with the binary (`default_prices.toml`), and its parser.

use serde::Deserialize;

use super::money::{Price, UsdString};

const DEFAULT_PRICES: &str = include_str!("default_prices.toml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    price: Vec<PriceEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    model: String,
    input: UsdString,
    output: UsdString,
    cache_read: Option<UsdString>,
    cache_write: Option<UsdString>,
}

/// Parses a price table in the `default_prices.toml` format (USD per 1M tokens, as strings).
pub fn parse_price_table(text: &str) -> Result<Vec<(String, Price)>, String> {
    let file: PriceFile = toml::from_str(text).map_err(|e| e.to_string())?;
    Ok(file
        .price
        .into_iter()
        .map(|e| {
            let input = e.input.0;
            (
                e.model,
                Price {
                    input,
                    output: e.output.0,
                    // Without a cache price, cached tokens cost as much as input: never less.
                    cache_read: e.cache_read.map_or(input, |u| u.0),
                    cache_write: e.cache_write.map_or(input, |u| u.0),
                },
            )
        })
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
        assert!(table.len() >= 10);
        let (_, mini) = table.iter().find(|(m, _)| m == "gpt-4o-mini").unwrap();
        assert_eq!(mini.input, NanoUsd(150_000_000));
        assert_eq!(mini.cache_read, NanoUsd(75_000_000));
        assert_eq!(mini.cache_write, NanoUsd(150_000_000));
    }
}
