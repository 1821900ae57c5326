//! The imperative shell around the control core ([`crate::decide::core`]): it owns the clock and
//! the channels, hands the core what arrives with the present time, and carries out what the
//! core decides. It decides nothing itself.
//!
//! ```text
//!   broker link ──Inbound──▶ ┐                      ┌─▶ Orders ──watch──▶ field tasks (at once)
//!   field tasks ──Reading──▶ ├─▶ core.input / tick ─┼─▶ Record ─────────▶ journal writer
//!   timer (core.next_wake) ─▶ ┘                      ├─▶ Ack, Report ─────▶ broker, once on disk
//!                                                   └─▶ Status ─────────▶ broker, metrics
//! ```

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use site_config::Site;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::decide::core::{Core, Effect, Input};
use crate::decide::time::{Mono, Now};
use crate::journal;
use crate::msg::{Inbound, Orders, Outbound, Reading};
use crate::show::metrics::Telemetry;

/// The shell's clocks: the wall clock, and tokio's monotonic one (which a test can pause).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    pub fn now(&self) -> Now {
        Now {
            wall: Timestamp::now(),
            mono: Mono::from_duration(self.origin.elapsed()),
        }
    }

    fn instant(&self, mono: Mono) -> Instant {
        self.origin + Duration::from_nanos(u64::try_from(mono.as_nanos()).unwrap_or(0))
    }
}

/// The channels the shell works through.
pub struct Io {
    pub inbound: mpsc::Receiver<Inbound>,
    pub outbound: mpsc::Sender<Outbound>,
    pub readings: mpsc::Receiver<Reading>,
    pub orders: watch::Sender<Orders>,
}

/// Runs `core` until `cancel`. Field devices are left exactly as they are.
pub async fn run(
    mut core: Core,
    site: Arc<Site>,
    mut io: Io,
    journal: Option<journal::Sender>,
    telemetry: Arc<Telemetry>,
    clock: Clock,
    cancel: CancellationToken,
) {
    let out = Effects {
        site,
        journal,
        telemetry,
    };
    loop {
        let wake = clock.instant(core.next_wake(clock.now().mono));
        // Cancel-safe: recv() on mpsc and sleep_until lose nothing when another branch wins.
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(msg) = io.inbound.recv() => {
                let input = match msg {
                    Inbound::Signal { topic, payload } => Input::Signal { topic, payload },
                    Inbound::Connected => Input::BrokerConnected,
                };
                core.input(clock.now(), input);
            }
            Some(r) = io.readings.recv() => {
                core.input(clock.now(), Input::Reading(r));
                // Take in what is already queued: one plan for a burst of readings.
                while let Ok(r) = io.readings.try_recv() {
                    core.input(clock.now(), Input::Reading(r));
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
        let started = Instant::now();
        core.tick(clock.now());
        for effect in core.take_effects() {
            out.apply(effect, &io);
        }
        out.telemetry.cycle.observe(started.elapsed());
    }
    info!("engine stopped; outlets left as they are");
}

/// Where the core's effects go.
struct Effects {
    site: Arc<Site>,
    journal: Option<journal::Sender>,
    telemetry: Arc<Telemetry>,
}

impl Effects {
    fn apply(&self, effect: Effect, io: &Io) {
        match effect {
            // The devices get their orders first: the record can wait, the shed cannot.
            Effect::Orders(orders) => {
                io.orders.send_replace(orders);
            }
            Effect::Record(r) => {
                if let Some(j) = &self.journal {
                    j.record(r);
                }
            }
            Effect::Ack(ack) => {
                if let Some(payload) = to_json(&ack, "acknowledgement") {
                    let msg = Outbound {
                        topic: self.site.mqtt.ack_topic.clone(),
                        payload,
                        retain: false,
                    };
                    send_after_journal(self.journal.as_ref(), &io.outbound, msg, "acknowledgement");
                }
            }
            Effect::Report(report) => {
                let Some(topic) = &self.site.reporting.report_topic else {
                    return;
                };
                if let Some(payload) = to_json(&report, "report") {
                    let msg = Outbound {
                        topic: topic.clone(),
                        payload,
                        retain: false,
                    };
                    send_after_journal(self.journal.as_ref(), &io.outbound, msg, "report");
                }
            }
            Effect::Status {
                status,
                directives,
                publish,
            } => {
                if let Some(payload) = publish.then(|| to_json(&status, "status")).flatten() {
                    let msg = Outbound {
                        topic: self.site.mqtt.status_topic.clone(),
                        payload,
                        retain: true,
                    };
                    if io.outbound.try_send(msg).is_err() {
                        tracing::debug!("outbound queue full; status skipped");
                    }
                }
                self.telemetry.set_status(status, directives);
            }
            Effect::Sample(s) => self.telemetry.push_sample(s),
            Effect::Signal(outcome) => self.telemetry.signal(outcome),
            Effect::Completed(end) => self.telemetry.completed(end),
        }
    }
}

/// `value` as JSON; a value that cannot be written (never expected) is logged, not sent empty.
fn to_json(value: &impl serde::Serialize, what: &str) -> Option<Vec<u8>> {
    match serde_json::to_vec(value) {
        Ok(v) => Some(v),
        Err(e) => {
            error!(error = %e, "cannot serialise the {what}; not sent");
            None
        }
    }
}

/// How long an acknowledgement waits for the journal before it goes out anyway: a disk that
/// hangs (a worn-out SD card) must not silence the site towards the utility.
pub const JOURNAL_WAIT: Duration = Duration::from_secs(2);

/// Sends `msg` once `journal` holds everything recorded before it, so that an acknowledgement
/// or a report never tells the utility what a restart would not know; after [`JOURNAL_WAIT`]
/// if the disk is slower than that; at once without a journal. Acks and reports all go this
/// way, so they keep their order.
pub fn send_after_journal(
    journal: Option<&journal::Sender>,
    out: &mpsc::Sender<Outbound>,
    msg: Outbound,
    what: &'static str,
) {
    fn send(out: &mpsc::Sender<Outbound>, msg: Outbound, what: &str) {
        if out.try_send(msg).is_err() {
            warn!("outbound queue full; {what} dropped");
        }
    }
    fn take(slot: &std::sync::Mutex<Option<Outbound>>) -> Option<Outbound> {
        slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    let Some(journal) = journal else {
        return send(out, msg, what);
    };
    // Whichever comes first, the journal's sync or the deadline, sends it.
    let slot = Arc::new(std::sync::Mutex::new(Some(msg)));
    journal.then({
        let (slot, out) = (slot.clone(), out.clone());
        move || {
            if let Some(msg) = take(&slot) {
                send(&out, msg, what);
            }
        }
    });
    let out = out.clone();
    tokio::spawn(async move {
        tokio::time::sleep(JOURNAL_WAIT).await;
        if let Some(msg) = take(&slot) {
            warn!(waited = ?JOURNAL_WAIT, "the journal is slow: {what} sent before it is on disk");
            send(&out, msg, what);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str) -> Outbound {
        Outbound {
            topic: topic.into(),
            payload: Vec::new(),
            retain: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_waits_for_the_journal_but_not_for_ever() {
        let (journal, _stalled) = journal::Sender::stalled();
        let (out, mut sent) = mpsc::channel(8);
        send_after_journal(Some(&journal), &out, msg("ack"), "acknowledgement");
        tokio::time::sleep(JOURNAL_WAIT - Duration::from_millis(1)).await;
        assert!(
            sent.try_recv().is_err(),
            "held while the journal may yet write"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(sent.try_recv().map(|m| m.topic).as_deref(), Ok("ack"));
        assert!(sent.try_recv().is_err(), "sent once");
    }

    #[tokio::test]
    async fn without_a_journal_an_ack_goes_at_once() {
        let (out, mut sent) = mpsc::channel(8);
        send_after_journal(None, &out, msg("ack"), "acknowledgement");
        assert_eq!(sent.try_recv().map(|m| m.topic).as_deref(), Ok("ack"));
    }
}
