//! The journal on a simulated disk: the records as the controller's writer would put them in
//! its live file (the same line format, the same rotation to a checkpoint), group commits that
//! make them durable, crashes that lose what was not synced (or tear the last line), and
//! recovery through the controller's own `journal::recover`.

use controller::decide::core::Ack;
use controller::decide::state::{Record, State};
use controller::journal::{self, Recovered};
use jiff::Timestamp;

pub struct Disk {
    site: String,
    /// The live file's complete lines (each with its newline).
    lines: Vec<Vec<u8>>,
    bytes: usize,
    /// Lines on disk for sure.
    synced: usize,
    /// Bytes of the checkpoint the live file began with (the budget starts after it).
    base: usize,
    max_bytes: usize,
    /// The writer's copy of the state, for the checkpoint a rotation starts with.
    state: State,
    /// Acknowledgements waiting for the lines before them to be synced.
    held: Vec<(usize, Ack)>,
    /// A torn last line left by a crash (no newline).
    torn: Option<Vec<u8>>,
    pub rotations: u32,
}

impl Disk {
    pub fn new(site: &str, max_bytes: usize) -> Disk {
        Disk {
            site: site.to_owned(),
            lines: Vec::new(),
            bytes: 0,
            synced: 0,
            base: 0,
            max_bytes,
            state: State::default(),
            held: Vec::new(),
            torn: None,
            rotations: 0,
        }
    }

    /// Writes a record (not yet synced). Rotates past the size limit, as the writer does: the
    /// records so far are synced, and the new live file starts with a checkpoint.
    pub fn record(&mut self, r: &Record, now: Timestamp) {
        self.state.apply(r);
        let mut buf = Vec::new();
        journal::line(&mut buf, r);
        self.bytes += buf.len();
        self.lines.push(buf);
        if self.bytes > self.base + self.max_bytes {
            let mut cp = Vec::new();
            journal::line(&mut cp, &journal::checkpoint(&self.site, now, &self.state));
            self.bytes = cp.len();
            self.base = cp.len();
            self.lines = vec![cp];
            self.synced = 1;
            self.rotations += 1;
            for h in &mut self.held {
                h.0 = 0;
            }
        }
    }

    /// An acknowledgement, sent once everything recorded before it is synced.
    pub fn ack(&mut self, ack: Ack) {
        self.held.push((self.lines.len(), ack));
    }

    /// True when something waits for a sync.
    pub fn unsynced(&self) -> bool {
        self.synced < self.lines.len() || !self.held.is_empty()
    }

    /// A group commit: everything written is on disk; the acknowledgements waiting for it go.
    pub fn sync(&mut self) -> Vec<Ack> {
        self.synced = self.lines.len();
        let synced = self.synced;
        let (go, wait): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(at, _)| *at <= synced);
        self.held = wait;
        go.into_iter().map(|(_, a)| a).collect()
    }

    /// The controller dies: what was not synced is lost, and the last write may be torn.
    /// Returns the acknowledgements that never went out.
    pub fn crash(&mut self, tear: bool) -> Vec<Ack> {
        let lost_line = self.lines.get(self.synced).cloned();
        self.lines.truncate(self.synced);
        self.bytes = self.lines.iter().map(Vec::len).sum();
        self.torn = match (tear, lost_line) {
            (true, Some(l)) if l.len() > 2 => Some(l[..l.len() / 2].to_vec()),
            _ => None,
        };
        self.held.drain(..).map(|(_, a)| a).collect()
    }

    /// The file as a restart reads it.
    fn bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.lines.concat();
        if let Some(t) = &self.torn {
            out.extend_from_slice(t);
        }
        out
    }

    /// What every line written so far (synced or not) gives back: what the core's state must
    /// equal.
    pub fn replay(&self) -> Recovered {
        let (rec, _) = journal::recover(std::io::Cursor::new(self.lines.concat()), "simulated")
            .expect("reading memory cannot fail");
        rec
    }

    /// A restart at `now`: reads the file as `journal::open` does (a torn line is cut off), and
    /// begins the new run with a checkpoint of what it found.
    pub fn reopen(&mut self, now: Timestamp, policy: &site_config::Policy) -> Recovered {
        let (mut rec, _) = journal::recover(std::io::Cursor::new(self.bytes()), "simulated")
            .expect("reading memory cannot fail");
        self.torn = None;
        rec.state
            .replay
            .settle(now, policy.replay_window, policy.max_clock_skew);
        self.state = rec.state.clone();
        let mut cp = Vec::new();
        journal::line(&mut cp, &journal::checkpoint(&self.site, now, &rec.state));
        self.bytes += cp.len();
        self.lines.push(cp);
        self.synced = self.lines.len();
        rec
    }
}
