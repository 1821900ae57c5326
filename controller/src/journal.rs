//! The journal: an append-only JSON Lines file of every signal taken, every event's end and its
//! measurement, every plan and whether the outlets followed it, device faults, and the meters at
//! a steady pace.
//! It is what the controller resumes from after a restart, and the record an operator hands
//! to the utility for settlement.
//!
//! One thread of its own writes it, so that a slow disk never holds up the control loop: it
//! takes records from a bounded channel, writes whatever has queued, then syncs once (group
//! commit). Each run of the controller, and each file begun by rotation, starts with a
//! checkpoint: the state a restart needs (events in force, ended ids for replay protection,
//! the last switch of every outlet). Recovery applies the live file's records in order, so
//! whatever came after the newest checkpoint is on top of it. The live file and the writer's
//! own copy of the state go through the same [`State::apply`] the engine uses, so what is
//! resumed is what was in force.
//!
//! ```text
//!   demo.jsonl.2        demo.jsonl.1        demo.jsonl (live)
//!   [cp ... plan ...]   [cp ... meters ..]  [cp accepted plan confirmed meters completed ..
//!    ^ every file starts with a checkpoint, so the live file alone is enough to resume
//! ```
//!
//! A crash may cut the last line short; such a line (no newline) is ignored on reading and cut
//! off before writing resumes. Other unreadable lines are counted and skipped, never fatal.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jiff::Timestamp;
use tokio::sync::mpsc;
use tracing::{error, warn};

use crate::decide::mv::Sample;
pub use crate::decide::state::{End, Record, State, Switch};
use crate::series::keep_recent;

#[derive(Debug, thiserror::Error)]
#[error("journal {}: cannot {what}: {source}", path.display())]
pub struct JournalError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: io::Error,
}

/// What was read back at start-up.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub state: State,
    pub records: usize,
    /// Lines that could not be read (corrupt, or written by a newer version).
    pub skipped: usize,
    /// The last line was cut short by a crash.
    pub torn: bool,
    /// The meters of the newest [`SAMPLES_KEPT`] of the file, oldest first: the status page's
    /// chart and the baselines of events that start soon after a restart.
    pub samples: Vec<Sample>,
}

/// How far back from its newest reading recovery keeps the meters.
pub const SAMPLES_KEPT: jiff::SignedDuration = jiff::SignedDuration::from_hours(2);

/// Reads a journal file: its records applied in order onto an empty state. Never fails on
/// content; only on I/O.
pub fn read(path: &Path) -> io::Result<Recovered> {
    let (rec, _) = read_with_length(path)?;
    Ok(rec)
}

/// Like [`read`], with the length of the file up to its last complete line.
fn read_with_length(path: &Path) -> io::Result<(Recovered, u64)> {
    recover(
        BufReader::new(File::open(path)?),
        &path.display().to_string(),
    )
}

/// Reads a journal's lines from `reader` (named `name` in warnings) and applies them in order
/// onto an empty state; with the length up to its last complete line. What a restart does,
/// for a file or for a deterministic simulation's journal in memory.
pub fn recover(mut reader: impl BufRead, name: &str) -> io::Result<(Recovered, u64)> {
    let mut out = Recovered::default();
    let mut samples = std::collections::VecDeque::new();
    let mut line = Vec::new();
    let mut complete: u64 = 0;
    let mut number = 0usize;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        number += 1;
        if line.last() != Some(&b'\n') {
            out.torn = true;
            break;
        }
        complete += n as u64;
        match serde_json::from_slice::<Record>(&line) {
            Ok(r) => {
                out.state.apply(&r);
                out.records += 1;
                if let Some(s) = r.sample() {
                    keep_recent(&mut samples, |s: &Sample| s.at, s.at, SAMPLES_KEPT);
                    samples.push_back(s);
                }
            }
            Err(e) => {
                if out.skipped < 5 {
                    warn!(file = %name, line = number, error = %e, "journal line unreadable; skipped");
                }
                out.skipped += 1;
            }
        }
    }
    out.samples = samples.into();
    Ok((out, complete))
}

/// Every file of a journal: the live one, then the rotated ones newest first.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    for k in 1.. {
        let p = rotated(path, k);
        if !p.exists() {
            break;
        }
        out.push(p);
    }
    out
}

fn rotated(path: &Path, k: u32) -> PathBuf {
    suffixed(path, &k.to_string())
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

/// Where records go: a bounded queue to the journal's thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sender {
    tx: mpsc::Sender<Entry>,
    lost: Arc<AtomicU64>,
}

/// What the journal's thread is given: records to write, and what to do once they are on disk.
#[allow(
    clippy::large_enum_variant,
    reason = "records are nearly every entry: boxing them would allocate once more per record"
)]
enum Entry {
    Record(Record),
    Then(Box<dyn FnOnce() + Send>),
}

impl Sender {
    /// Queues a record without waiting. If the disk has fallen so far behind that the queue
    /// is full, the record is counted as lost and the journal says so in a `gap` record.
    pub fn record(&self, record: Record) {
        if self.tx.try_send(Entry::Record(record)).is_err() {
            let lost = self.lost.fetch_add(1, Ordering::Relaxed) + 1;
            if lost.is_power_of_two() {
                warn!(lost, "journal queue full: records lost");
            }
        }
    }

    /// A sender whose writer never writes (as on a hung disk), and what keeps it so.
    #[cfg(test)]
    pub(crate) fn stalled() -> (Sender, impl Sized) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        (Sender { tx, lost }, rx)
    }

    /// Runs `then` on the journal's thread once every record queued before it is on disk, so
    /// that what it tells the world (an acknowledgement) is never ahead of what a restart will
    /// know. If writing fails (a full disk), it still runs once the write has been tried: the
    /// controller goes on without its disk. If the queue is full, it runs at once.
    pub fn then(&self, then: impl FnOnce() + Send + 'static) {
        if let Err(e) = self.tx.try_send(Entry::Then(Box::new(then)))
            && let Entry::Then(then) = e.into_inner()
        {
            then();
        }
    }
}

/// The journal's writer thread; joined at shutdown so that everything queued reaches the disk.
pub struct Writer {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Waits until every record queued before the last [`Sender`] was dropped is on disk.
    pub fn finish(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Records queued at most before new ones count as lost.
const QUEUE: usize = 16 * 1024;

/// Opens (or creates) the journal of `config`, reads back what it holds, and starts its writer
/// with a checkpoint of that state.
pub fn open(
    config: &site_config::Journal,
    site: &str,
    policy: &site_config::Policy,
    now: Timestamp,
) -> Result<(Sender, Writer, Recovered), JournalError> {
    let path = config.path.clone();
    let fail = |what: &'static str| {
        let path = path.clone();
        move |source| JournalError { path, what, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail("create its directory"))?;
    }
    let next = suffixed(&path, "next");
    // A crash during rotation can leave the new file not yet renamed: finish the rotation.
    if !path.exists() && next.exists() {
        std::fs::rename(&next, &path).map_err(fail("finish an interrupted rotation"))?;
    }
    let mut recovered = Recovered::default();
    let mut length = 0;
    if path.exists() {
        (recovered, length) = read_with_length(&path).map_err(fail("read it"))?;
    } else if rotated(&path, 1).exists() {
        // The live file was lost after rotating: the newest rotated file still holds the state.
        recovered = read(&rotated(&path, 1)).map_err(fail("read its newest rotated file"))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(fail("open it for appending"))?;
    if recovered.torn {
        // Cut the torn line off, or the next record would be glued to it.
        file.set_len(length)
            .map_err(fail("cut off a torn last line"))?;
    }
    // What the engine resumes and what the new file's checkpoint says must be one state.
    recovered
        .state
        .replay
        .settle(now, policy.replay_window, policy.max_clock_skew);
    let state = recovered.state.clone();
    let mut files = Files {
        path: path.clone(),
        file,
        len: length,
        base: 0,
        max_bytes: config.max_bytes,
        keep: config.keep,
        site: site.to_owned(),
    };
    files
        .append(&[checkpoint(site, now, &state)])
        .map_err(fail("write to it"))?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let lost = Arc::new(AtomicU64::new(0));
    let thread = std::thread::Builder::new()
        .name("journal".into())
        .spawn({
            let lost = lost.clone();
            move || write_loop(files, state, rx, lost)
        })
        .map_err(fail("start its writer thread"))?;
    Ok((
        Sender { tx, lost },
        Writer {
            thread: Some(thread),
        },
        recovered,
    ))
}

/// Appends `record` to `buf` as one line.
pub fn line(buf: &mut Vec<u8>, record: &Record) {
    // Records hold plain data (finite numbers, strings): serialising cannot fail.
    if serde_json::to_writer(&mut *buf, record).is_ok() {
        buf.push(b'\n');
    }
}

pub fn checkpoint(site: &str, at: Timestamp, state: &State) -> Record {
    Record::Checkpoint {
        at,
        site: site.to_owned(),
        state: state.clone(),
    }
}

struct Files {
    path: PathBuf,
    file: File,
    /// Bytes in the live file.
    len: u64,
    /// Bytes of the checkpoint the live file began with: a file is full once it holds
    /// `max_bytes` beyond it, so a checkpoint larger than `max_bytes` (many ended ids under a
    /// small `max_mb`) cannot make every record rotate again.
    base: u64,
    max_bytes: u64,
    keep: u32,
    site: String,
}

impl Files {
    /// Writes records, then syncs them to disk.
    fn append(&mut self, records: &[Record]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(256 * records.len());
        for r in records {
            line(&mut buf, r);
        }
        self.write(&buf)
    }

    /// Writes whole lines, then syncs them to disk.
    fn write(&mut self, lines: &[u8]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        self.file.write_all(lines)?;
        self.file.sync_data()?;
        self.len += lines.len() as u64;
        Ok(())
    }

    /// Starts a new live file beginning with a checkpoint of `state`; the old one becomes
    /// `.1`, `.1` becomes `.2`, and so on; the oldest beyond `keep` is dropped.
    ///
    /// The new file is complete and synced before any rename, so a crash at any point leaves
    /// either the old live file, or the new one under `.next` (which [`open`] finishes), and
    /// never a state that is lost.
    fn rotate(&mut self, state: &State) -> io::Result<()> {
        let next = suffixed(&self.path, "next");
        let mut line = serde_json::to_vec(&checkpoint(&self.site, Timestamp::now(), state))
            .map_err(io::Error::other)?;
        line.push(b'\n');
        let mut f = File::create(&next)?;
        f.write_all(&line)?;
        f.sync_all()?;
        for k in (1..self.keep).rev() {
            match std::fs::rename(rotated(&self.path, k), rotated(&self.path, k + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        std::fs::rename(&next, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.len = line.len() as u64;
        self.base = self.len;
        Ok(())
    }
}

/// The writer thread: group commits until every [`Sender`] is gone.
fn write_loop(
    mut files: Files,
    mut state: State,
    mut rx: mpsc::Receiver<Entry>,
    lost: Arc<AtomicU64>,
) {
    let mut batch = Vec::new();
    let mut after = Vec::new();
    let mut failing = false;
    while let Some(first) = rx.blocking_recv() {
        batch.clear();
        let mut entry = Some(first);
        while let Some(e) = entry {
            match e {
                Entry::Record(r) => batch.push(r),
                Entry::Then(f) => after.push(f),
            }
            entry = if batch.len() < 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let gap = lost.swap(0, Ordering::Relaxed);
        if gap > 0 {
            batch.push(Record::Gap {
                at: Timestamp::now(),
                lost: gap,
            });
        }
        // Rotation happens between records, as soon as the live file is full, so a file
        // exceeds `max_bytes` by one record at most and each begins with the state before its
        // first record.
        let mut buf = Vec::new();
        let mut result = Ok(());
        for r in &batch {
            state.apply(r);
            line(&mut buf, r);
            if files.len + buf.len() as u64 > files.base + files.max_bytes {
                result = result.and(files.write(&buf));
                buf.clear();
                if let Err(e) = files.rotate(&state) {
                    error!(file = %files.path.display(), error = %e, "journal rotation failed; appending to the live file");
                    // Try again only after another max_bytes.
                    files.len = 0;
                }
            }
        }
        result = result.and(files.write(&buf));
        // One error line when writing starts failing (a full disk), one when it recovers:
        // the controller goes on controlling either way.
        match result {
            Ok(()) if failing => {
                failing = false;
                warn!(file = %files.path.display(), "journal writes succeed again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                error!(file = %files.path.display(), error = %e, "journal write failed; records are being lost");
            }
            Err(_) => {}
        }
        for then in after.drain(..) {
            then();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::signal::{Action, Directive, Signal};
    use site_config::SignalFormat;
    use std::collections::BTreeMap;
    use std::time::Duration;

    /// The replay window and clock skew of the example site.
    fn policy() -> site_config::Policy {
        site_config::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/sites/small.toml"
        ))
        .unwrap()
        .policy
    }
    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("gridshed-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn config(path: PathBuf, max_bytes: u64) -> site_config::Journal {
        site_config::Journal {
            path,
            max_bytes,
            keep: 3,
            meter_interval: Duration::from_secs(2),
        }
    }

    fn t(s: &str) -> Timestamp {
        format!("2026-11-22T{s}:00Z").parse().unwrap()
    }

    fn accepted(id: &str, at: &str) -> Record {
        Record::Accepted {
            at: t(at),
            topic: Some("sites/demo/signals".into()),
            sent_at: None,
            signal: Signal::Event {
                id: id.into(),
                directives: vec![Directive {
                    id: id.into(),
                    interval: 0,
                    action: Action::ImportLimit { kw: 120.0 },
                    start: t(at),
                    end: Some(t("12:00")),
                    priority: 1,
                    emergency: false,
                    format: SignalFormat::Native,
                }],
            },
        }
    }

    fn completed(id: &str, at: &str, end: End) -> Record {
        Record::Completed {
            at: t(at),
            id: id.into(),
            end,
            site_kw: Some(100.0),
            asic_kw: Some(40.0),
        }
    }

    fn plan(at: &str, pdu: &str, off: &[u16]) -> Record {
        Record::Plan {
            at: t(at),
            generation: 1,
            limit_kw: 120.0,
            budget_kw: 50.0,
            shortfall_kw: 0.0,
            directives: vec!["evt-1".into()],
            off: BTreeMap::from([(pdu.to_owned(), off.to_vec())]),
            on: BTreeMap::new(),
        }
    }

    fn write_all(cfg: &site_config::Journal, records: Vec<Record>) {
        let (tx, writer, _) = open(cfg, "demo", &policy(), t("09:00")).unwrap();
        for r in records {
            tx.record(r);
        }
        drop(tx);
        writer.finish();
    }

    #[test]
    fn what_follows_a_record_runs_only_once_the_record_is_on_disk() {
        let path = dir("then").join("j.jsonl");
        let (tx, writer, _) = open(
            &config(path.clone(), 1 << 20),
            "demo",
            &policy(),
            t("09:00"),
        )
        .unwrap();
        let (seen_tx, seen) = std::sync::mpsc::channel();
        for k in 0..100 {
            tx.record(accepted(&format!("evt-{k}"), "10:00"));
            let (path, seen_tx) = (path.clone(), seen_tx.clone());
            tx.then(move || {
                let text = std::fs::read_to_string(&path).unwrap();
                seen_tx
                    .send((k, text.contains(&format!("\"evt-{k}\""))))
                    .unwrap();
            });
        }
        drop(tx);
        writer.finish();
        let seen: Vec<(usize, bool)> = seen.try_iter().collect();
        assert_eq!(
            seen,
            (0..100).map(|k| (k, true)).collect::<Vec<_>>(),
            "in order, each after its record"
        );
    }

    #[test]
    fn what_was_written_is_what_is_read_back_after_a_restart() {
        let cfg = config(dir("roundtrip").join("j.jsonl"), 1 << 20);
        write_all(
            &cfg,
            vec![
                accepted("evt-1", "10:00"),
                plan("10:00", "pdu-1", &[1, 2]),
                accepted("evt-2", "10:05"),
                completed("evt-2", "10:10", End::Released),
            ],
        );
        let (_, writer, back) = open(&cfg, "demo", &policy(), t("10:20")).unwrap();
        writer.finish();
        assert!(!back.torn);
        assert_eq!(back.skipped, 0);
        assert_eq!(back.records, 5, "a checkpoint and four records");
        let ids: Vec<&str> = back.state.timeline.events().map(|(id, _)| id).collect();
        assert_eq!(ids, vec!["evt-1"]);
        let evt = |id: &str| match accepted(id, "10:30") {
            Record::Accepted { signal, .. } => signal,
            _ => unreachable!(),
        };
        assert!(back.state.replay.check(&evt("evt-1"), None).is_ok());
        assert!(
            back.state.replay.check(&evt("evt-2"), None).is_err(),
            "evt-2 is remembered as ended"
        );
        assert_eq!(
            back.state.switched["pdu-1"][&2],
            Switch {
                on: false,
                at: t("10:00")
            }
        );
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_cut_off_before_writing_resumes() {
        let path = dir("torn").join("j.jsonl");
        let cfg = config(path.clone(), 1 << 20);
        write_all(&cfg, vec![accepted("evt-1", "10:00")]);
        // A crash in the middle of writing the next record.
        let half = serde_json::to_string(&accepted("evt-2", "10:01")).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&half.as_bytes()[..half.len() / 2]).unwrap();
        drop(f);

        let read_back = read(&path).unwrap();
        assert!(read_back.torn);
        assert!(read_back.state.timeline.contains("evt-1"));
        assert!(!read_back.state.timeline.contains("evt-2"));

        let (tx, writer, back) = open(&cfg, "demo", &policy(), t("10:02")).unwrap();
        assert!(back.torn);
        tx.record(accepted("evt-3", "10:03"));
        drop(tx);
        writer.finish();
        let after = read(&path).unwrap();
        assert!(!after.torn);
        assert_eq!(after.skipped, 0, "the torn half was cut off, not glued to");
        assert!(after.state.timeline.contains("evt-3"));
    }

    #[test]
    fn unreadable_lines_are_skipped_and_the_rest_still_count() {
        let path = dir("garbage").join("j.jsonl");
        let line = |r: &Record| serde_json::to_string(r).unwrap() + "\n";
        let text = [
            line(&accepted("evt-1", "10:00")),
            "{\"record\":\"from_the_future\",\"x\":1}\n".into(),
            "\u{0}\u{1}garbage\n".into(),
            line(&accepted("evt-2", "10:01")),
        ]
        .concat();
        std::fs::write(&path, text).unwrap();
        let back = read(&path).unwrap();
        assert_eq!((back.records, back.skipped, back.torn), (2, 2, false));
        assert!(back.state.timeline.contains("evt-1"));
        assert!(back.state.timeline.contains("evt-2"));
    }

    #[test]
    fn rotation_starts_each_file_with_a_checkpoint_and_keeps_the_newest() {
        let path = dir("rotate").join("j.jsonl");
        let cfg = config(path.clone(), 2_000);
        let (tx, writer, _) = open(&cfg, "demo", &policy(), t("09:00")).unwrap();
        tx.record(accepted("evt-1", "10:00"));
        for k in 0..200u16 {
            tx.record(Record::Meters {
                at: t("10:00"),
                site_kw: Some(f64::from(k)),
                asic_kw: None,
                gpu_kw: Some(40.0),
                limit_kw: 120.0,
                shed_kw: 0.0,
            });
        }
        drop(tx);
        writer.finish();
        let all = files(&path);
        assert_eq!(all.len(), 4, "the live file and keep = 3 rotated: {all:?}");
        for f in &all {
            let first = std::fs::read_to_string(f).unwrap();
            let first = first.lines().next().unwrap();
            assert!(
                first.contains("\"record\":\"checkpoint\""),
                "{f:?}: {first}"
            );
            let back = read(f).unwrap();
            assert!(
                back.state.timeline.contains("evt-1"),
                "{f:?} alone resumes the event"
            );
        }
        assert!(std::fs::metadata(&path).unwrap().len() < 4_000);
    }

    /// A full disk (Linux's `/dev/full` answers every write with ENOSPC): the records are lost,
    /// but what waits on them (acknowledgements) still goes out, in order, and the writer
    /// goes on taking records.
    #[test]
    #[cfg(target_os = "linux")]
    fn on_a_full_disk_what_follows_the_records_still_runs() {
        let file = OpenOptions::new().append(true).open("/dev/full").unwrap();
        let files = Files {
            path: PathBuf::from("/dev/full"),
            file,
            len: 0,
            base: 0,
            max_bytes: 1 << 20,
            keep: 1,
            site: "demo".into(),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let lost = lost.clone();
            move || write_loop(files, State::default(), rx, lost)
        });
        let sender = Sender { tx, lost };
        let (ran_tx, ran) = std::sync::mpsc::channel();
        for k in 0..10 {
            sender.record(accepted(&format!("evt-{k}"), "10:00"));
            let ran_tx = ran_tx.clone();
            sender.then(move || ran_tx.send(k).unwrap());
        }
        drop(sender);
        thread.join().expect("the writer survives a full disk");
        assert_eq!(
            ran.try_iter().collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
    }

    /// Regression (the deterministic simulation: a rotation storm): a checkpoint larger than
    /// `max_bytes` (many ended ids under a small `max_mb`) made every record rotate again and
    /// write the whole state anew.
    #[test]
    fn a_checkpoint_larger_than_the_file_limit_does_not_rotate_at_every_record() {
        let path = dir("storm").join("j.jsonl");
        let mut many = Vec::new();
        for k in 0..200 {
            many.push(accepted(&format!("evt-{k}"), "10:00"));
            many.push(completed(&format!("evt-{k}"), "10:01", End::Released));
        }
        write_all(&config(path.clone(), 1 << 20), many);
        let mut cfg = config(path.clone(), 2_000);
        cfg.keep = 50;
        let rotated_before = files(&path).len();
        let (tx, writer, _) = open(&cfg, "demo", &policy(), t("10:02")).unwrap();
        for k in 0..30u16 {
            tx.record(Record::Meters {
                at: t("10:03"),
                site_kw: Some(f64::from(k)),
                asic_kw: None,
                gpu_kw: None,
                limit_kw: 120.0,
                shed_kw: 0.0,
            });
        }
        drop(tx);
        writer.finish();
        let rotations = files(&path).len() - rotated_before;
        assert!(rotations <= 4, "{rotations} rotations for 30 small records");
    }

    #[test]
    fn a_crash_between_the_renames_of_a_rotation_loses_nothing() {
        let path = dir("midrotate").join("j.jsonl");
        let cfg = config(path.clone(), 1 << 20);
        write_all(&cfg, vec![accepted("evt-1", "10:00")]);
        // The state of the disk after `live -> .1` and before `.next -> live`.
        let next = suffixed(&path, "next");
        std::fs::rename(&path, rotated(&path, 1)).unwrap();
        let cp = serde_json::to_string(&checkpoint(
            "demo",
            t("10:01"),
            &read(&rotated(&path, 1)).unwrap().state,
        ))
        .unwrap();
        std::fs::write(&next, cp + "\n").unwrap();
        let (_, writer, back) = open(&cfg, "demo", &policy(), t("10:02")).unwrap();
        writer.finish();
        assert!(back.state.timeline.contains("evt-1"));
        assert!(path.exists() && !next.exists());
    }

    #[test]
    fn a_stale_policy_end_is_not_remembered_as_a_replay_but_a_release_is() {
        let mut s = State::default();
        s.apply(&accepted("evt-1", "10:00"));
        s.apply(&accepted("evt-2", "10:00"));
        s.apply(&completed("evt-1", "10:01", End::Stale));
        s.apply(&completed("evt-2", "10:01", End::Released));
        let again = |id: &str| match accepted(id, "10:02") {
            Record::Accepted { signal, .. } => signal,
            _ => unreachable!(),
        };
        assert!(s.replay.check(&again("evt-1"), None).is_ok());
        assert!(s.replay.check(&again("evt-2"), None).is_err());
        assert!(s.timeline.in_force(t("10:02")).is_empty());
    }
}
