//! Model names as budgets and prices see them. A request may name a dated snapshot
//! (`gpt-4o-2024-08-06`, `claude-3-5-sonnet-20241022`), a provider-prefixed id (`openai/gpt-4o`)
//! or a local alias; [`ModelAliases::canonical`] maps each to one name.
//!
//! Budgets cover a model if their list holds the name as requested **or** its canonical name, so a
//! budget on `gpt-4o` covers its snapshots, while a budget on one snapshot covers only that one.
//! Prices are looked up the same way, exact name first (a snapshot may be priced differently).

use std::borrow::Cow;
use std::collections::HashMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelAliases {
    /// Exact renames, applied first and again after the other rules.
    pub aliases: HashMap<String, String>,
    /// Prefixes removed (the first that matches), e.g. `openai/`.
    pub strip_prefixes: Vec<String>,
    /// Remove a trailing date: `-YYYY-MM-DD`, `-YYYYMMDD` or `@YYYYMMDD`.
    pub strip_date_suffix: bool,
}

impl ModelAliases {
    pub fn standard() -> Self {
        ModelAliases {
            strip_date_suffix: true,
            ..ModelAliases::default()
        }
    }

    pub fn canonical<'a>(&self, model: &'a str) -> Cow<'a, str> {
        if let Some(a) = self.aliases.get(model) {
            return Cow::Owned(a.clone());
        }
        let mut m = model;
        if let Some(rest) = self
            .strip_prefixes
            .iter()
            .find_map(|p| m.strip_prefix(p.as_str()))
        {
            m = rest;
        }
        if self.strip_date_suffix {
            m = strip_date(m);
        }
        match self.aliases.get(m) {
            Some(a) => Cow::Owned(a.clone()),
            None => Cow::Borrowed(m),
        }
    }
}

fn strip_date(m: &str) -> &str {
    let b = m.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let n = b.len();
    // -YYYY-MM-DD
    if n > 11 && b[n - 11] == b'-' && b[n - 6] == b'-' && b[n - 3] == b'-' {
        let (y, mo, d) = (&b[n - 10..n - 6], &b[n - 5..n - 3], &b[n - 2..]);
        if digits(y) && digits(mo) && digits(d) && plausible(y, mo, d) {
            return &m[..n - 11];
        }
    }
    // -YYYYMMDD or @YYYYMMDD
    if n > 9 && (b[n - 9] == b'-' || b[n - 9] == b'@') {
        let s = &b[n - 8..];
        if digits(s) && plausible(&s[..4], &s[4..6], &s[6..]) {
            return &m[..n - 9];
        }
    }
    m
}

fn plausible(y: &[u8], mo: &[u8], d: &[u8]) -> bool {
    let num = |s: &[u8]| s.iter().fold(0u32, |a, c| a * 10 + u32::from(c - b'0'));
    (2000..=2100).contains(&num(y)) && (1..=12).contains(&num(mo)) && (1..=31).contains(&num(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_prefixes_and_aliases_map_to_one_name() {
        let mut a = ModelAliases::standard();
        a.strip_prefixes = vec!["openai/".into()];
        a.aliases.insert("house-model".into(), "gpt-4o-mini".into());
        for (input, want) in [
            ("gpt-4o-2024-08-06", "gpt-4o"),
            ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
            ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
            ("openai/gpt-4o-2024-08-06", "gpt-4o"),
            ("house-model", "gpt-4o-mini"),
            ("gpt-4o", "gpt-4o"),
            ("o3", "o3"),
            ("model-12345678", "model-12345678"),
            ("gpt-4-0613", "gpt-4-0613"),
            ("x-2024-13-01", "x-2024-13-01"),
        ] {
            assert_eq!(a.canonical(input), want, "{input}");
        }
        assert_eq!(
            ModelAliases::default().canonical("gpt-4o-2024-08-06"),
            "gpt-4o-2024-08-06"
        );
    }
}
