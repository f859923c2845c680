//! The local append-only journal: every settled debit (and deny event) is written here, in
//! order, before it goes to the store, so that neither a store outage nor a crash loses it.
//!
//! Records are appended by one thread in groups — everything settled while the previous group
//! was being written goes into the next write and the next `fdatasync` — so under load one sync
//! covers many requests. A record is `[len: u32 LE][crc32: u32 LE][JSON]`; files ("segments")
//! are named so that their order is the order of their records. A segment is deleted once the
//! store holds every record in it. At start the journal is read back: every record still there
//! is replayed into the store, where the unique event id makes a replay of a record that was
//! already written a no-op (exactly once).
//!
//! **Invariant:** a record is reported durable only after the `fdatasync` that covered it; a
//! segment is deleted only when every record in it was confirmed written to the store. A torn
//! tail (a crash in the middle of a write, so never reported durable) is cut off at start.
//! **Boundary:** files and bytes only; what a record means is the ledger's and the store's.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::{Debit, DenyEvent};

/// What the journal holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    Debit(Debit),
    Deny(DenyEvent),
}

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 16 << 20;
/// A fully flushed segment is rotated (and deleted) once it holds this much, so that the journal
/// stays small while the store keeps up.
const ROTATE_FLUSHED_BYTES: u64 = 1 << 20;
const HEADER: usize = 8;
/// Larger records cannot be ours: a length beyond this marks a torn or foreign file.
const MAX_RECORD: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal directory {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
    #[error(
        "journal directory {0} is in use by another tokenbudget process (give each replica its own ledger.journal_dir)"
    )]
    Locked(PathBuf),
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Sequence number of the last record in it (0 if none).
    last_seq: u64,
    bytes: u64,
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// Held for the life of the process: one writer per directory.
    _lock: File,
    /// Closed segments, oldest first.
    closed: VecDeque<Segment>,
    current: Option<(File, Segment)>,
    next_name: u64,
    buf: Vec<u8>,
}

impl Journal {
    /// Opens (creating) `dir`, takes its lock, and reads back every record left by an earlier
    /// process, numbered from 1 in order. Torn tails are cut off.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<(u64, Record)>), JournalError> {
        let io_err = |source| JournalError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(io_err)?;
        if lock.try_lock().is_err() {
            return Err(JournalError::Locked(dir.to_owned()));
        }
        let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(io_err)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                let n = p
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".tbj")?
                    .parse()
                    .ok()?;
                Some((n, p))
            })
            .collect();
        names.sort();
        let mut records = Vec::new();
        let mut closed = VecDeque::new();
        let mut seq = 0u64;
        for (_, path) in &names {
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(io_err)?;
            let (found, good) = decode_all(&bytes);
            if good < bytes.len() {
                tracing::warn!(segment = %path.display(), kept = good, dropped = bytes.len() - good,
                    "journal segment has a torn tail (a crash mid-write); cutting it off");
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(good as u64))
                    .map_err(io_err)?;
            }
            for r in found {
                seq += 1;
                records.push((seq, r));
            }
            closed.push_back(Segment {
                path: path.clone(),
                last_seq: seq,
                bytes: good as u64,
            });
        }
        let next_name = names.last().map_or(1, |(n, _)| n + 1);
        let mut journal = Journal {
            dir: dir.to_owned(),
            _lock: lock,
            closed,
            current: None,
            next_name,
            buf: Vec::new(),
        };
        // Segments left empty (every record of them flushed, or none written) go at once.
        journal.flushed(0);
        Ok((journal, records))
    }

    /// Appends `records` (in sequence order) and syncs them to disk.
    pub fn append(&mut self, records: &[(u64, Record)]) -> io::Result<()> {
        self.write(records)?;
        self.sync()
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        match self.current.as_mut() {
            Some((file, _)) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// Appends `records` (in sequence order) without syncing them.
    pub fn write(&mut self, records: &[(u64, Record)]) -> io::Result<()> {
        let Some(&(last_seq, _)) = records.last() else {
            return Ok(());
        };
        self.buf.clear();
        for (_, r) in records {
            encode(r, &mut self.buf)?;
        }
        if self
            .current
            .as_ref()
            .is_some_and(|(_, s)| s.bytes >= SEGMENT_BYTES)
        {
            self.rotate()?;
        }
        if self.current.is_none() {
            let path = self.dir.join(format!("{:020}.tbj", self.next_name));
            self.next_name += 1;
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            // The new file's directory entry must survive a crash too.
            File::open(&self.dir)?.sync_all()?;
            self.current = Some((
                file,
                Segment {
                    path,
                    last_seq: 0,
                    bytes: 0,
                },
            ));
        }
        if let Some((file, seg)) = self.current.as_mut() {
            file.write_all(&self.buf)?;
            seg.bytes += self.buf.len() as u64;
            seg.last_seq = last_seq;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some((file, seg)) = self.current.take() {
            file.sync_all()?;
            self.closed.push_back(seg);
        }
        Ok(())
    }

    /// The store holds every record up to `seq`: delete the segments that hold nothing else.
    pub fn flushed(&mut self, seq: u64) {
        if let Some((_, cur)) = &self.current
            && cur.last_seq <= seq
            && cur.bytes >= ROTATE_FLUSHED_BYTES
        {
            let _ = self.rotate();
        }
        while self.closed.front().is_some_and(|s| s.last_seq <= seq) {
            if let Some(seg) = self.closed.pop_front()
                && let Err(e) = std::fs::remove_file(&seg.path)
            {
                tracing::warn!(segment = %seg.path.display(), error = %e, "cannot delete a flushed journal segment");
            }
        }
    }

    /// Bytes in the journal's segments (flushed or not).
    pub fn bytes(&self) -> u64 {
        self.closed.iter().map(|s| s.bytes).sum::<u64>()
            + self.current.as_ref().map_or(0, |(_, s)| s.bytes)
    }
}

/// How long the journal thread lets a group of records gather before writing it.
const GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// The journal thread. Records are written to the OS in groups, within [`GATHER`] of being
/// settled — from then on a crash of this process (SIGKILL, OOM) loses none of them, and they are
/// reported durable — and synced to the disk (`fdatasync`) at most every `sync_every`, which
/// bounds what a crash of the machine itself can lose. Segments the store has are forgotten.
/// Runs until the ledger stops journaling; returns the journal for the final clean-up.
pub fn run(
    ledger: std::sync::Arc<super::Ledger>,
    mut journal: Journal,
    sync_every: std::time::Duration,
) -> Journal {
    use std::time::{Duration, Instant};
    let m = std::sync::Arc::clone(&ledger.metrics);
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    let sync = |journal: &mut Journal, unsynced: &mut bool, last_sync: &mut Instant| {
        let started = Instant::now();
        if let Err(e) = journal.sync() {
            m.journal_errors.inc();
            tracing::error!(error = %e, "journal sync failed");
        }
        m.journal_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        *unsynced = false;
        *last_sync = Instant::now();
    };
    loop {
        // Woken by the first record of a group (or every 200 ms, to sync and clean up).
        let Some(mut records) = ledger.take_pending(Duration::from_millis(200)) else {
            if unsynced && (ledger.journal_stopping() || last_sync.elapsed() >= sync_every) {
                sync(&mut journal, &mut unsynced, &mut last_sync);
            }
            if ledger.journal_stopping() {
                break;
            }
            journal.flushed(ledger.flushed_seq());
            continue;
        };
        if !ledger.journal_stopping() {
            std::thread::sleep(GATHER);
        }
        if let Some(more) = ledger.take_pending(Duration::ZERO) {
            records.extend(more);
        }
        if let Err(e) = journal.write(&records) {
            // Kept in memory and still written to the store; only crash safety is lost.
            ledger.metrics.journal_errors.inc();
            tracing::error!(error = %e, records = records.len(), "journal write failed");
        }
        unsynced = true;
        ledger.journaled(records);
        if last_sync.elapsed() >= sync_every {
            sync(&mut journal, &mut unsynced, &mut last_sync);
        }
        journal.flushed(ledger.flushed_seq());
        ledger
            .metrics
            .journal_bytes
            .set(i64::try_from(journal.bytes()).unwrap_or(i64::MAX));
    }
    if unsynced {
        sync(&mut journal, &mut unsynced, &mut last_sync);
    }
    journal
}

/// Appends the journal encoding of `records` to `out` (what each group write costs in CPU).
pub fn encode_records(records: &[(u64, Record)], out: &mut Vec<u8>) -> io::Result<()> {
    for (_, r) in records {
        encode(r, out)?;
    }
    Ok(())
}

fn encode(r: &Record, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    serde_json::to_writer(&mut *out, r)?;
    let len = out.len() - start - HEADER;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    let len = u32::try_from(len).map_err(|_| io::Error::other("journal record too large"))?;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Every whole, intact record of a segment, and the length of that good prefix.
fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(head) = bytes.get(at..at + HEADER) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        match serde_json::from_slice(payload) {
            Ok(r) => out.push(r),
            Err(_) => break,
        }
        at += HEADER + len;
    }
    (out, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Amount, BudgetId, CounterDelta, CounterKey, NanoUsd};
    use crate::store::UsageEvent;

    fn debit(i: u64) -> Record {
        Record::Debit(Debit {
            event: UsageEvent {
                event_id: format!("ev-{i}"),
                request_id: format!("rq-{i}"),
                ts_ms: 1_000 + i as i64,
                principal: "user:alice".into(),
                model: "gpt-4o".into(),
                family: "openai".into(),
                input: i,
                cache_read: 0,
                cache_write: 0,
                cache_write_1h: 0,
                output: 2 * i,
                reasoning: 0,
                cost: NanoUsd(7 * i),
                estimated: false,
                outcome: "complete".into(),
                unpriced: false,
            },
            deltas: vec![CounterDelta {
                key: CounterKey {
                    budget: BudgetId("b1".into()),
                    member: "".into(),
                },
                bucket: 86_400,
                amount: Amount {
                    tokens: 3 * i,
                    nanos: 7 * i,
                },
                lease: None,
            }],
        })
    }

    fn numbered(from: u64, n: u64) -> Vec<(u64, Record)> {
        (from..from + n).map(|i| (i, debit(i))).collect()
    }

    #[test]
    fn records_survive_a_restart_in_order_until_flushed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, old) = Journal::open(dir.path()).unwrap();
            assert!(old.is_empty());
            j.append(&numbered(1, 3)).unwrap();
            j.append(&numbered(4, 2)).unwrap();
        }
        let (mut j, old) = Journal::open(dir.path()).unwrap();
        assert_eq!(old, numbered(1, 5));
        // The store took the first five: nothing is replayed after the next restart.
        j.flushed(5);
        j.append(&numbered(6, 1)).unwrap();
        drop(j);
        let (_, old) = Journal::open(dir.path()).unwrap();
        assert_eq!(old.len(), 1, "only the unflushed record is replayed");
        assert_eq!(old[0].1, debit(6));
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            j.append(&numbered(1, 2)).unwrap();
        }
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "tbj"))
            .unwrap();
        let full = std::fs::read(&seg).unwrap();
        // Every cut inside the second record keeps exactly the first.
        let mut one = Vec::new();
        encode(&debit(1), &mut one).unwrap();
        for cut in one.len()..full.len() {
            std::fs::write(&seg, &full[..cut]).unwrap();
            let (j, old) = Journal::open(dir.path()).unwrap();
            assert_eq!(old, numbered(1, 1), "cut at {cut}");
            drop(j);
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), one.len() as u64);
        }
        // A flipped byte fails the checksum: the record is not trusted.
        let mut bad = full.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x20;
        std::fs::write(&seg, &bad).unwrap();
        let (_, old) = Journal::open(dir.path()).unwrap();
        assert_eq!(old, numbered(1, 1));
    }

    #[test]
    fn one_process_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (_j, _) = Journal::open(dir.path()).unwrap();
        assert!(matches!(
            Journal::open(dir.path()),
            Err(JournalError::Locked(_))
        ));
    }

    #[test]
    fn flushed_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        // Enough records to pass the rotation size several times.
        let (mut seq, mut written) = (1, 0u64);
        while written < 3 * ROTATE_FLUSHED_BYTES {
            let before = j.bytes();
            j.append(&numbered(seq, 200)).unwrap();
            written += j.bytes() - before;
            seq += 200;
            j.flushed(seq - 1);
        }
        let segments = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "tbj")
                })
                .count()
        };
        assert!(
            segments() <= 1,
            "flushed segments are removed as they rotate"
        );
        assert!(j.bytes() < ROTATE_FLUSHED_BYTES + (1 << 16));
    }
}
