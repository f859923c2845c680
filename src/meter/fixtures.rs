//! Replays every provider fixture in `tests/fixtures/` through the meter: whole, split at every
//! byte offset, split at every pair of offsets for small bodies, and compressed (gzip, br) in
//! small pieces. Each must give exactly the fixture's usage.

use std::io::Write;

use super::{Api, BodyFormat, Encoding, Meter, MeterLimits, Metered};
use crate::testkit::fixtures::{Fixture, all};

fn run(f: &Fixture, encoding: Encoding, pieces: &[&[u8]]) -> Metered {
    let api = Api::parse(&f.api).unwrap();
    let mut m = Meter::new(
        api,
        BodyFormat::from_content_type(f.content_type.as_bytes()),
        encoding,
        MeterLimits::default(),
    );
    for p in pieces {
        m.feed(p);
    }
    m.finish()
}

#[test]
fn every_fixture_meters_exactly_at_every_split() {
    let fixtures = all();
    assert!(fixtures.len() >= 14, "fixtures found: {}", fixtures.len());
    for (name, f, body) in &fixtures {
        let want = Some(f.usage.usage());
        let whole = run(f, Encoding::Identity, &[body]);
        assert_eq!(whole.usage, want, "{name}");
        assert_eq!(whole.upstream_error, f.upstream_error, "{name}");
        assert_eq!(whole.malformed, 0, "{name}: {whole:?}");
        assert!(whole.text_bytes > 0, "{name}: streamed text measured");
        for i in 0..=body.len() {
            assert_eq!(
                run(f, Encoding::Identity, &[&body[..i], &body[i..]]).usage,
                want,
                "{name} split at {i}"
            );
        }
        if body.len() <= 1000 {
            for i in (0..=body.len()).step_by(7) {
                for j in (i..=body.len()).step_by(5) {
                    let got = run(
                        f,
                        Encoding::Identity,
                        &[&body[..i], &body[i..j], &body[j..]],
                    )
                    .usage;
                    assert_eq!(got, want, "{name} split at {i},{j}");
                }
            }
        }
    }
}

#[test]
fn compressed_fixtures_meter_the_same() {
    for (name, f, body) in all() {
        let want = Some(f.usage.usage());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&body).unwrap();
        let gz = gz.finish().unwrap();
        let mut br = Vec::new();
        {
            let mut w = brotli_writer(&mut br);
            w.write_all(&body).unwrap();
        }
        for (encoding, bytes) in [(Encoding::Gzip, &gz), (Encoding::Brotli, &br)] {
            for size in [1, 7, 64, 4096] {
                let pieces: Vec<&[u8]> = bytes.chunks(size).collect();
                let got = run(&f, encoding, &pieces);
                assert_eq!(got.usage, want, "{name} {encoding:?} in {size}-byte pieces");
                assert_eq!(got.malformed, 0, "{name} {encoding:?}");
            }
        }
    }
}

/// A minimal brotli encoder for tests: stored (uncompressed) meta-blocks, which every decoder
/// must accept. Enough to exercise the streaming decoder without an encoder dependency.
fn brotli_writer(out: &mut Vec<u8>) -> impl Write + '_ {
    struct Stored<'a>(&'a mut Vec<u8>, Vec<u8>);
    impl Write for Stored<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Drop for Stored<'_> {
        fn drop(&mut self) {
            *self.0 = brotli_stored(&self.1);
        }
    }
    Stored(out, Vec::new())
}

/// RFC 7932 stream: WBITS=16, then uncompressed meta-blocks of ≤ 65536 bytes, then an empty last
/// meta-block.
fn brotli_stored(data: &[u8]) -> Vec<u8> {
    let mut bits = BitWriter::default();
    bits.put(0, 1); // WBITS = 16
    for chunk in data.chunks(65536) {
        bits.put(0, 1); // ISLAST = 0
        bits.put(0, 2); // MNIBBLES = 4
        bits.put((chunk.len() - 1) as u64, 16); // MLEN - 1
        bits.put(1, 1); // ISUNCOMPRESSED
        bits.align();
        bits.bytes.extend_from_slice(chunk);
    }
    bits.put(1, 1); // ISLAST
    bits.put(1, 1); // ISLASTEMPTY
    bits.align();
    bits.bytes
}

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    used: u32,
}

impl BitWriter {
    fn put(&mut self, v: u64, n: u32) {
        for i in 0..n {
            if self.used == 0 {
                self.bytes.push(0);
            }
            let last = self.bytes.len() - 1;
            self.bytes[last] |= (((v >> i) & 1) as u8) << self.used;
            self.used = (self.used + 1) % 8;
        }
    }

    fn align(&mut self) {
        self.used = 0;
    }
}
