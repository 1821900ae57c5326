//! Whether a signal is taken, and as what: the one rule the core follows, and the whole-site
//! simulation's ledger of what the utility asked with it.
//!
//! In order: it must parse; it must not be a replay; an event already held is either sent
//! again unchanged (nothing happens, its end included) or updated; a new event must find room
//! (at most `policy.max_events` held, and the replay memory not full).
//!
//! A signal whose times count from its arrival (a native `duration_s` with no `start`,
//! maestro, OpenADR's "now" start) is the same signal when, read as of the first arrival, it
//! gives back the very directives held: a utility re-sending it as a heartbeat must not push
//! its end back each time.

use jiff::Timestamp;
use site_config::{SignalFormat, Site};

use crate::decide::replay::Replay;
use crate::decide::signal::{self, Context, Rejection, Signal};
use crate::decide::timeline::Timeline;

/// What a taken signal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new event, or a release.
    New,
    /// New content for an event already held.
    Update,
    /// The event already held, sent again: nothing changes.
    Unchanged,
}

/// A signal taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    pub signal: Signal,
    /// The send time its format carries (maestro), for replay protection.
    pub sent_at: Option<Timestamp>,
    pub kind: Kind,
}

/// Reads `payload` (in `format`) against what is held: taken, or refused with a reason.
pub fn admit(
    site: &Site,
    timeline: &Timeline,
    replay: &Replay,
    format: SignalFormat,
    payload: &[u8],
    now: Timestamp,
) -> Result<Admitted, Rejection> {
    let cx = Context::new(site, now);
    let signal = signal::parse(format, payload, &cx)?;
    let sent_at = signal::sent_at(format, payload);
    let refuse = |signal: &Signal, reason: String| Rejection {
        id: signal.id().map(str::to_owned),
        reason,
    };
    if let Err(reason) = replay.check(&signal, sent_at) {
        return Err(refuse(&signal, reason));
    }
    let kind = match &signal {
        Signal::Release { .. } => Kind::New,
        Signal::Event { id, directives } => match timeline.get(id) {
            Some(held) if held == directives.as_slice() || resent(held, format, payload, &cx) => {
                Kind::Unchanged
            }
            Some(_) => Kind::Update,
            None => {
                let max = site.policy.max_events;
                if timeline.len() >= max {
                    return Err(refuse(
                        &signal,
                        format!(
                            "{} events are held already (policy.max_events = {max}); release one first",
                            timeline.len()
                        ),
                    ));
                }
                if let Some(reason) = replay.full(site.policy.replay_window) {
                    return Err(refuse(&signal, reason));
                }
                Kind::New
            }
        },
    };
    Ok(Admitted {
        signal,
        sent_at,
        kind,
    })
}

/// True if `payload`, read as of when the event `held` began, gives back `held`.
fn resent(held: &[signal::Directive], format: SignalFormat, payload: &[u8], cx: &Context) -> bool {
    let Some(first) = held.first() else {
        return false;
    };
    // Only the content counts here: the send time was checked against the real clock.
    let then = Context {
        now: first.start,
        max_skew: jiff::SignedDuration::MAX,
        ..*cx
    };
    matches!(
        signal::parse(format, payload, &then),
        Ok(Signal::Event { directives, .. }) if directives == held
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(max_events: usize) -> Site {
        let mut site = site_config::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/sites/small.toml"
        ))
        .unwrap();
        site.policy.max_events = max_events;
        site
    }

    fn now() -> Timestamp {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    fn take(
        site: &Site,
        timeline: &mut Timeline,
        replay: &Replay,
        json: &str,
    ) -> Result<Kind, String> {
        let a = admit(
            site,
            timeline,
            replay,
            SignalFormat::Native,
            json.as_bytes(),
            now(),
        )
        .map_err(|r| r.reason)?;
        timeline.apply(&a.signal);
        Ok(a.kind)
    }

    #[test]
    fn events_beyond_the_cap_are_refused_with_the_key_to_raise_it() {
        // Issue 13: 2,455 events were held at once and every cycle slowed down.
        let site = site(3);
        let (mut timeline, replay) = (Timeline::new(), Replay::default());
        for k in 0..3 {
            let json = format!(r#"{{"id":"e{k}","kind":"shed","kw":1}}"#);
            assert_eq!(take(&site, &mut timeline, &replay, &json), Ok(Kind::New));
        }
        let err = take(
            &site,
            &mut timeline,
            &replay,
            r#"{"id":"e3","kind":"shed","kw":1}"#,
        )
        .unwrap_err();
        assert!(
            err.contains("3 events are held already (policy.max_events = 3)"),
            "{err}"
        );
        // What is held can still be updated, re-sent and released.
        let update = r#"{"id":"e0","kind":"shed","kw":2}"#;
        assert_eq!(
            take(&site, &mut timeline, &replay, update),
            Ok(Kind::Update)
        );
        assert_eq!(
            take(&site, &mut timeline, &replay, update),
            Ok(Kind::Unchanged)
        );
        let release = r#"{"id":"e0","kind":"release"}"#;
        assert_eq!(take(&site, &mut timeline, &replay, release), Ok(Kind::New));
        let json = r#"{"id":"e3","kind":"shed","kw":1}"#;
        assert_eq!(take(&site, &mut timeline, &replay, json), Ok(Kind::New));
    }

    #[test]
    fn a_full_replay_memory_refuses_new_events_rather_than_forget() {
        let site = site(256);
        let mut timeline = Timeline::new();
        let mut replay = Replay::default();
        for k in 0..crate::decide::replay::CAPACITY {
            replay.ended(&format!("old-{k}"), now());
        }
        let err = take(
            &site,
            &mut timeline,
            &replay,
            r#"{"id":"new","kind":"shed","kw":1}"#,
        )
        .unwrap_err();
        assert!(err.contains("replay window"), "{err}");
        let replayed = take(
            &site,
            &mut timeline,
            &replay,
            r#"{"id":"old-0","kind":"shed","kw":1}"#,
        )
        .unwrap_err();
        assert!(replayed.contains("replayed"), "{replayed}");
    }
}
