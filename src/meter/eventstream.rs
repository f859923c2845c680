//! Incremental decoder of the AWS event-stream binary framing (Bedrock `ConverseStream`,
//! `InvokeModelWithResponseStream`).
//!
//! A frame: total length (u32 BE), headers length (u32 BE), prelude CRC32 (of the first 8
//! bytes), headers, payload, message CRC32 (of everything before it). Frames span body chunks; at
//! most one unfinished frame is held, up to `max_frame` bytes. Both CRCs are checked: a frame that
//! fails them, or a length out of bounds, stops decoding for the rest of the body (framing cannot
//! be recovered) and is counted in [`EventStreamDecoder::corrupt`].

/// One decoded frame: the headers we use, and the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// `:message-type`: `event` or `exception`.
    pub message_type: &'a [u8],
    /// `:event-type` (or `:exception-type` for exceptions).
    pub event_type: &'a [u8],
    pub payload: &'a [u8],
}

#[derive(Debug)]
pub struct EventStreamDecoder {
    buf: Vec<u8>,
    max_frame: usize,
    broken: bool,
    pub corrupt: u32,
}

const PRELUDE: usize = 12;
const MIN_FRAME: usize = PRELUDE + 4;

impl EventStreamDecoder {
    pub fn new(max_frame: usize) -> Self {
        EventStreamDecoder {
            buf: Vec::new(),
            max_frame,
            broken: false,
            corrupt: 0,
        }
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds one chunk; calls `on_frame` for each complete, valid frame.
    pub fn feed(&mut self, mut chunk: &[u8], on_frame: &mut impl FnMut(Frame<'_>)) {
        if self.broken {
            return;
        }
        // Complete a frame carried over from earlier chunks.
        if !self.buf.is_empty() {
            let need = match frame_len(&self.buf) {
                Some(n) => n,
                None => {
                    let take = (PRELUDE - self.buf.len()).min(chunk.len());
                    self.buf.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    match frame_len(&self.buf) {
                        Some(n) => n,
                        None => return,
                    }
                }
            };
            if !self.check_len(need) {
                return;
            }
            let take = (need - self.buf.len()).min(chunk.len());
            self.buf.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.buf.len() < need {
                return;
            }
            let frame = std::mem::take(&mut self.buf);
            let ok = self.emit(&frame, on_frame);
            self.buf = frame;
            self.buf.clear();
            if !ok {
                return;
            }
        }
        // Whole frames straight from the chunk, without copying.
        while let Some(need) = frame_len(chunk) {
            if !self.check_len(need) {
                return;
            }
            if chunk.len() < need {
                break;
            }
            if !self.emit(&chunk[..need], on_frame) {
                return;
            }
            chunk = &chunk[need..];
        }
        self.buf.extend_from_slice(chunk);
    }

    fn check_len(&mut self, need: usize) -> bool {
        if need < MIN_FRAME || need > self.max_frame {
            self.fail();
            return false;
        }
        true
    }

    fn fail(&mut self) {
        self.broken = true;
        self.corrupt += 1;
        self.buf = Vec::new();
    }

    /// Validates and emits one whole frame. False if it was corrupt.
    fn emit(&mut self, f: &[u8], on_frame: &mut impl FnMut(Frame<'_>)) -> bool {
        match parse_frame(f) {
            Some(frame) => {
                on_frame(frame);
                true
            }
            None => {
                self.fail();
                false
            }
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The total length of the frame starting at `b`, once its prelude is complete.
fn frame_len(b: &[u8]) -> Option<usize> {
    (b.len() >= PRELUDE).then(|| be32(b) as usize)
}

fn parse_frame(f: &[u8]) -> Option<Frame<'_>> {
    let total = f.len();
    let headers_len = be32(&f[4..8]) as usize;
    if crc32fast::hash(&f[..8]) != be32(&f[8..12]) {
        return None;
    }
    if crc32fast::hash(&f[..total - 4]) != be32(&f[total - 4..]) {
        return None;
    }
    let headers_end = PRELUDE.checked_add(headers_len)?;
    if headers_end > total - 4 {
        return None;
    }
    let mut frame = Frame {
        message_type: b"",
        event_type: b"",
        payload: &f[headers_end..total - 4],
    };
    let mut h = &f[PRELUDE..headers_end];
    while !h.is_empty() {
        let name_len = *h.first()? as usize;
        let name = h.get(1..1 + name_len)?;
        let mut rest = h.get(1 + name_len..)?;
        let kind = *rest.first()?;
        rest = &rest[1..];
        let (value, after): (&[u8], &[u8]) = match kind {
            0 | 1 => (&[], rest),
            2 => (rest.get(..1)?, rest.get(1..)?),
            3 => (rest.get(..2)?, rest.get(2..)?),
            4 => (rest.get(..4)?, rest.get(4..)?),
            5 | 8 => (rest.get(..8)?, rest.get(8..)?),
            6 | 7 => {
                let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
                (rest.get(2..2 + len)?, rest.get(2 + len..)?)
            }
            9 => (rest.get(..16)?, rest.get(16..)?),
            _ => return None,
        };
        match name {
            b":message-type" => frame.message_type = value,
            b":event-type" | b":exception-type" => frame.event_type = value,
            _ => {}
        }
        h = after;
    }
    Some(frame)
}

/// Encodes one frame with string headers (test fixtures and the fake model).
pub fn encode_frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut hb = Vec::new();
    for (name, value) in headers {
        hb.push(name.len() as u8);
        hb.extend_from_slice(name.as_bytes());
        hb.push(7);
        hb.extend_from_slice(&(value.len() as u16).to_be_bytes());
        hb.extend_from_slice(value.as_bytes());
    }
    let total = PRELUDE + hb.len() + payload.len() + 4;
    let mut f = Vec::with_capacity(total);
    f.extend_from_slice(&(total as u32).to_be_bytes());
    f.extend_from_slice(&(hb.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&f);
    f.extend_from_slice(&prelude_crc.to_be_bytes());
    f.extend_from_slice(&hb);
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], cuts: &[usize]) -> (Vec<(String, String, String)>, u32) {
        let mut d = EventStreamDecoder::new(1 << 20);
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            d.feed(&input[last..c], &mut |f| {
                out.push((
                    String::from_utf8_lossy(f.message_type).into_owned(),
                    String::from_utf8_lossy(f.event_type).into_owned(),
                    String::from_utf8_lossy(f.payload).into_owned(),
                ))
            });
            last = c;
        }
        (out, d.corrupt)
    }

    fn stream() -> Vec<u8> {
        let mut s = encode_frame(
            &[
                (":message-type", "event"),
                (":event-type", "messageStart"),
                (":content-type", "application/json"),
            ],
            br#"{"role":"assistant"}"#,
        );
        s.extend(encode_frame(
            &[(":message-type", "event"), (":event-type", "metadata")],
            br#"{"usage":{"inputTokens":30}}"#,
        ));
        s
    }

    #[test]
    fn decodes_frames_split_anywhere() {
        let s = stream();
        let want = vec![
            (
                "event".to_string(),
                "messageStart".to_string(),
                r#"{"role":"assistant"}"#.to_string(),
            ),
            (
                "event".to_string(),
                "metadata".to_string(),
                r#"{"usage":{"inputTokens":30}}"#.to_string(),
            ),
        ];
        for i in 0..=s.len() {
            for j in i..=s.len() {
                assert_eq!(frames(&s, &[i, j]), (want.clone(), 0), "cuts {i},{j}");
            }
        }
    }

    #[test]
    fn a_known_frame_from_an_independent_encoder() {
        // Built with Python's zlib.crc32: the empty-payload frame with header ":event-type"="x".
        let frame: [u8; 32] = [
            0, 0, 0, 32, 0, 0, 0, 16, 0xb9, 0x54, 0xe0, 0x09, 11, b':', b'e', b'v', b'e', b'n',
            b't', b'-', b't', b'y', b'p', b'e', 7, 0, 1, b'x', 0x81, 0xa2, 0x51, 0x2c,
        ];
        let (got, corrupt) = frames(&frame, &[]);
        assert_eq!(corrupt, 0, "{got:?}");
        assert_eq!(got, vec![("".to_string(), "x".to_string(), "".to_string())]);
    }

    #[test]
    fn corrupt_frames_stop_decoding_without_panicking() {
        let mut s = stream();
        let n = s.len();
        s[n - 1] ^= 1; // message CRC of the second frame
        assert_eq!(frames(&s, &[]).1, 1);
        assert_eq!(frames(&s, &[]).0.len(), 1);
        let mut s = stream();
        s[9] ^= 1; // prelude CRC of the first frame
        assert_eq!(frames(&s, &[]), (vec![], 1));
        // A length claiming 4 GiB is refused before any buffering.
        let mut huge = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        huge.extend_from_slice(&crc32fast::hash(&huge).to_be_bytes());
        let mut d = EventStreamDecoder::new(1 << 20);
        d.feed(&huge, &mut |_| panic!("no frame"));
        assert_eq!((d.corrupt, d.buffered()), (1, 0));
    }
}
