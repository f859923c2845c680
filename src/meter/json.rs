//! Finding one JSON object inside bytes without decoding the rest: the `"usage": {…}` of a chunk
//! or of the tail of a large body.

use memchr::memmem;

/// The byte range of the object value of the last `"<key>": {` in `bytes`, if complete.
/// A `null` or non-object value is skipped. Strings and escapes are respected when matching braces.
pub fn last_object_after_key(
    bytes: &[u8],
    finder: &memmem::Finder<'_>,
) -> Option<std::ops::Range<usize>> {
    let mut best = None;
    for at in finder.find_iter(bytes) {
        let mut i = at + finder.needle().len();
        i = skip_ws(bytes, i);
        if bytes.get(i) != Some(&b':') {
            continue;
        }
        i = skip_ws(bytes, i + 1);
        if bytes.get(i) != Some(&b'{') {
            continue;
        }
        if let Some(end) = matching_brace(bytes, i) {
            best = Some(i..end + 1);
        }
    }
    best
}

/// Whether `bytes` contains `"<key>"` followed by `:` and an object (cheap pre-filter).
pub fn has_object_after_key(bytes: &[u8], finder: &memmem::Finder<'_>) -> bool {
    objects_after_key(bytes, finder).next().is_some()
}

/// Positions of every `"<key>"` that is followed by `:` and an object.
pub fn objects_after_key<'a>(
    bytes: &'a [u8],
    finder: &'a memmem::Finder<'_>,
) -> impl Iterator<Item = usize> + 'a {
    finder.find_iter(bytes).filter(move |&at| {
        let i = skip_ws(bytes, at + finder.needle().len());
        bytes.get(i) == Some(&b':') && bytes.get(skip_ws(bytes, i + 1)) == Some(&b'{')
    })
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Index of the `}` closing the `{` at `open`, or `None` if the object is cut off.
fn matching_brace(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0u32;
    let mut in_str = false;
    let mut i = open;
    while i < b.len() {
        let c = b[i];
        if in_str {
            match c {
                b'\\' => i += 1,
                b'"' => in_str = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Every string value that follows `"<key>":` in `bytes`, as (range without quotes, length with
/// escapes counted as one byte). A string cut off at the end of `bytes` runs to its end.
fn string_values<'a>(
    bytes: &'a [u8],
    finder: &'a memmem::Finder<'_>,
) -> impl Iterator<Item = (std::ops::Range<usize>, usize)> + 'a {
    finder.find_iter(bytes).filter_map(move |at| {
        let mut i = skip_ws(bytes, at + finder.needle().len());
        if bytes.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(bytes, i + 1);
        if bytes.get(i) != Some(&b'"') {
            return None;
        }
        let start = i + 1;
        let (mut j, mut len) = (start, 0);
        while j < bytes.len() {
            match bytes[j] {
                b'\\' => j += 2,
                b'"' => return Some((start..j, len)),
                _ => j += 1,
            }
            len += 1;
        }
        Some((start..bytes.len(), len))
    })
}

/// Total length of the string values of `"<key>":"…"` (escapes count as one byte), used to
/// estimate streamed text. Cheap: no decoding.
pub fn string_len_after_key(bytes: &[u8], finder: &memmem::Finder<'_>) -> usize {
    string_values(bytes, finder).map(|(_, len)| len).sum()
}

/// The byte range of the first complete string value of `"<key>": "…"`, without its quotes
/// (escapes are not undone).
pub fn string_value_after_key(
    bytes: &[u8],
    finder: &memmem::Finder<'_>,
) -> Option<std::ops::Range<usize>> {
    string_values(bytes, finder)
        .map(|(r, _)| r)
        .find(|r| r.end < bytes.len())
}

/// Appends `chunk` to `tail`, keeping at most about `cap` bytes (between `cap` and `2 × cap`
/// before trimming, so the front is moved rarely). `cap` 0 keeps nothing.
pub fn keep_tail(tail: &mut Vec<u8>, chunk: &[u8], cap: usize) {
    if cap == 0 {
        return;
    }
    if chunk.len() >= cap {
        tail.clear();
        tail.extend_from_slice(&chunk[chunk.len() - cap..]);
        return;
    }
    if tail.len() + chunk.len() > 2 * cap {
        let drop = tail.len() + chunk.len() - cap;
        tail.drain(..drop.min(tail.len()));
    }
    tail.extend_from_slice(chunk);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_complete_object() {
        let f = memmem::Finder::new(b"\"usage\"");
        let b =
            br#"{"usage":null,"x":"\"usage\": {no","usage" : {"a":{"b":"}"},"c":[1,{}]},"z":1}"#;
        let r = last_object_after_key(b, &f).unwrap();
        assert_eq!(&b[r], br#"{"a":{"b":"}"},"c":[1,{}]}"#);
        assert!(has_object_after_key(b, &f));
        assert!(!has_object_after_key(br#"{"usage":null}"#, &f));
        assert_eq!(last_object_after_key(br#"{"usage":{"a":1"#, &f), None);
    }

    #[test]
    fn measures_string_values() {
        let f = memmem::Finder::new(b"\"content\"");
        assert_eq!(
            string_len_after_key(br#"{"delta":{"content":"a\"bc"}}"#, &f),
            4
        );
        assert_eq!(string_len_after_key(br#"{"content":null}"#, &f), 0);
    }
}
