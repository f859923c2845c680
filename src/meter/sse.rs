//! Incremental Server-Sent Events framing over arbitrary body chunks.
//!
//! Chunks split lines and events anywhere (HTTP/2 DATA frames, HTTP/1 reads). The framer carries
//! over at most one unfinished line (bounded by `max_event`), handles `\n`, `\r\n` and `\r`
//! terminators (even when a `\r\n` pair is split across chunks), `:` comments, multi-line `data:`
//! and `event:` names. Its buffers are reused, so after the first events it allocates nothing.
//! An event larger than the cap is not dispatched and is counted in [`SseFramer::oversized`]; the
//! last `tail_cap` bytes of the latest such event are kept, because the usage of a Responses API
//! terminal event (which embeds the whole response) sits at its end.

use memchr::memchr2;

/// The longest event name kept; longer names are truncated (no provider comes close).
const MAX_EVENT_NAME: usize = 64;

#[derive(Debug)]
pub struct SseFramer {
    partial: Vec<u8>,
    data: Vec<u8>,
    data_lines: u32,
    event: [u8; MAX_EVENT_NAME],
    event_len: usize,
    /// The current line (and so its event) went past `max_event`: skip to the event's end.
    overflow: bool,
    /// The previous chunk ended in `\r`: a `\n` at the start of the next one ends nothing.
    after_cr: bool,
    max_event: usize,
    /// Tail of the latest oversized event.
    over_tail: Vec<u8>,
    tail_cap: usize,
    pub oversized: u32,
}

/// One dispatched event: its `event:` name (empty if none) and its joined `data:` lines.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub name: &'a [u8],
    pub data: &'a [u8],
}

impl SseFramer {
    pub fn new(max_event: usize) -> Self {
        SseFramer::with_tail(max_event, 0)
    }

    /// As `new`, keeping the last `tail_cap` bytes of an oversized event.
    pub fn with_tail(max_event: usize, tail_cap: usize) -> Self {
        SseFramer {
            partial: Vec::new(),
            data: Vec::new(),
            data_lines: 0,
            event: [0; MAX_EVENT_NAME],
            event_len: 0,
            overflow: false,
            after_cr: false,
            max_event,
            over_tail: Vec::new(),
            tail_cap,
            oversized: 0,
        }
    }

    /// Bytes currently held between chunks.
    pub fn buffered(&self) -> usize {
        self.partial.len() + self.data.len() + self.over_tail.len()
    }

    /// The tail of the latest oversized event (empty if none).
    pub fn take_oversized_tail(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.over_tail)
    }

    /// An event went over the cap: start its tail with what was held.
    fn start_overflow(&mut self, more: &[u8]) {
        self.over_tail.clear();
        let held = std::mem::take(&mut self.data);
        super::json::keep_tail(&mut self.over_tail, &held, self.tail_cap);
        self.data = held;
        self.data.clear();
        let partial = std::mem::take(&mut self.partial);
        super::json::keep_tail(&mut self.over_tail, &partial, self.tail_cap);
        self.partial = partial;
        self.partial.clear();
        super::json::keep_tail(&mut self.over_tail, more, self.tail_cap);
    }

    /// Feeds one chunk; calls `on_event` for every event completed by it.
    pub fn feed(&mut self, mut chunk: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while !chunk.is_empty() {
            let Some(i) = memchr2(b'\n', b'\r', chunk) else {
                self.carry(chunk);
                return;
            };
            let line_end = i;
            let mut next = i + 1;
            if chunk[i] == b'\r' {
                match chunk.get(i + 1) {
                    Some(b'\n') => next = i + 2,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            // Fast path, the common case: a whole one-line event (`data: …` then an empty line)
            // inside this chunk is dispatched straight from it, without copying.
            if self.partial.is_empty()
                && !self.overflow
                && self.data_lines == 0
                && let Some(v) = chunk[..line_end].strip_prefix(b"data:")
            {
                let value = v.strip_prefix(b" ").unwrap_or(v);
                let blank_end = match (chunk.get(next), chunk.get(next + 1)) {
                    (Some(b'\n'), _) => Some(next + 1),
                    (Some(b'\r'), Some(b'\n')) => Some(next + 2),
                    (Some(b'\r'), Some(_)) => Some(next + 1),
                    _ => None,
                };
                if let Some(end) = blank_end
                    && value.len() < self.max_event
                {
                    on_event(Event {
                        name: &self.event[..self.event_len],
                        data: value,
                    });
                    self.event_len = 0;
                    chunk = &chunk[end..];
                    continue;
                }
            }
            if self.partial.is_empty() && !self.overflow {
                self.line(&chunk[..line_end], on_event);
            } else {
                self.carry(&chunk[..line_end]);
                if self.overflow {
                    self.end_overflowing_line();
                } else {
                    let line = std::mem::take(&mut self.partial);
                    self.line(&line, on_event);
                    self.partial = line;
                    self.partial.clear();
                }
            }
            chunk = &chunk[next..];
        }
    }

    fn carry(&mut self, bytes: &[u8]) {
        if self.overflow {
            super::json::keep_tail(&mut self.over_tail, bytes, self.tail_cap);
            return;
        }
        if self.partial.len() + self.data.len() + bytes.len() > self.max_event {
            self.overflow = true;
            self.start_overflow(bytes);
            return;
        }
        self.partial.extend_from_slice(bytes);
    }

    /// An oversized line ended: the rest of its event is dropped too.
    fn end_overflowing_line(&mut self) {
        self.overflow = false;
        self.oversized += 1;
        self.data.clear();
        self.data_lines = u32::MAX; // poison: dispatch nothing for this event
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        if line.is_empty() {
            if self.data_lines > 0 && self.data_lines != u32::MAX {
                on_event(Event {
                    name: &self.event[..self.event_len],
                    data: &self.data,
                });
            }
            self.data.clear();
            self.data_lines = 0;
            self.event_len = 0;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.data_lines == u32::MAX {
                    return;
                }
                if self.data.len() + value.len() + 1 > self.max_event {
                    self.oversized += 1;
                    self.start_overflow(value);
                    self.data_lines = u32::MAX;
                    return;
                }
                if self.data_lines > 0 {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.data_lines += 1;
            }
            b"event" => {
                let n = value.len().min(MAX_EVENT_NAME);
                self.event[..n].copy_from_slice(&value[..n]);
                self.event_len = n;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[u8], split_at: &[usize], cap: usize) -> (Vec<(String, String)>, u32) {
        let mut f = SseFramer::new(cap);
        let mut out = Vec::new();
        let mut last = 0;
        let mut cuts: Vec<usize> = split_at.to_vec();
        cuts.push(input.len());
        for cut in cuts {
            f.feed(&input[last..cut], &mut |e| {
                out.push((
                    String::from_utf8_lossy(e.name).into_owned(),
                    String::from_utf8_lossy(e.data).into_owned(),
                ))
            });
            last = cut;
        }
        (out, f.oversized)
    }

    #[test]
    fn frames_events_with_every_line_ending() {
        let input = b": keep-alive\n\nevent: a\ndata: one\n\nDATA: ignored\ndata:two\ndata: lines\r\n\r\ndata: three\r\rid: 7\ndata: [DONE]\n\n";
        let want = vec![
            ("a".to_string(), "one".to_string()),
            ("".to_string(), "two\nlines".to_string()),
            ("".to_string(), "three".to_string()),
            ("".to_string(), "[DONE]".to_string()),
        ];
        let (whole, _) = events(input, &[], 1 << 20);
        assert_eq!(whole, want);
        for i in 0..=input.len() {
            let (split, _) = events(input, &[i], 1 << 20);
            assert_eq!(split, want, "split at {i}");
        }
        for i in 0..input.len() {
            for j in i..=input.len() {
                assert_eq!(events(input, &[i, j], 1 << 20).0, want, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn oversized_events_are_dropped_and_framing_recovers() {
        let big = format!("data: {}\n\ndata: small\n\n", "x".repeat(100));
        for i in 0..=big.len() {
            let (ev, oversized) = events(big.as_bytes(), &[i], 32);
            assert_eq!(
                ev,
                vec![("".to_string(), "small".to_string())],
                "split at {i}"
            );
            assert_eq!(oversized, 1);
        }
    }

    #[test]
    fn buffers_stay_bounded_on_endless_lines() {
        let mut f = SseFramer::new(1024);
        for _ in 0..1000 {
            f.feed(&[b'a'; 4096], &mut |_| panic!("no event"));
            assert!(f.buffered() <= 1024);
        }
    }
}
