use super::*;

const LEVELS: [SimpleAction; 3] = [
    SimpleAction::Shed { kw: 30.0 },
    SimpleAction::ImportLimit { kw: 100.0 },
    SimpleAction::ShedAll,
];

fn now() -> Timestamp {
    "2026-11-22T10:00:00Z".parse().unwrap()
}

fn cx() -> Context<'static> {
    Context {
        max_payload_bytes: 16 * 1024,
        simple_levels: &LEVELS,
        max_skew: SignedDuration::from_mins(5),
        now: now(),
    }
}

fn ok(format: SignalFormat, json: &str) -> Signal {
    parse(format, json.as_bytes(), &cx()).unwrap_or_else(|r| panic!("rejected: {}", r.reason))
}

fn rejected(format: SignalFormat, json: &str) -> Rejection {
    match parse(format, json.as_bytes(), &cx()) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(r) => r,
    }
}

fn single(signal: Signal) -> Directive {
    match signal {
        Signal::Event { mut directives, .. } if directives.len() == 1 => directives.remove(0),
        other => panic!("expected one directive, got {other:?}"),
    }
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

// --- native -----------------------------------------------------------------------------------

#[test]
fn native_import_limit_as_documented() {
    let d = single(ok(
        SignalFormat::Native,
        r#"{"id":"evt-42","kind":"import_limit","kw":12000,"start":"2026-11-22T10:00:00Z","duration_s":3600,"priority":1}"#,
    ));
    assert_eq!(d.id, "evt-42");
    assert_eq!(d.action, Action::ImportLimit { kw: 12000.0 });
    assert_eq!(d.start, t("2026-11-22T10:00:00Z"));
    assert_eq!(d.end, Some(t("2026-11-22T11:00:00Z")));
    assert_eq!(d.priority, 1);
    assert!(!d.emergency);
}

#[test]
fn native_defaults_start_now_until_released_lowest_priority() {
    let d = single(ok(
        SignalFormat::Native,
        r#"{"id":"a","kind":"shed","kw":50}"#,
    ));
    assert_eq!(d.start, now());
    assert_eq!(d.end, None);
    assert_eq!(d.priority, DEFAULT_PRIORITY);
    let d = single(ok(
        SignalFormat::Native,
        r#"{"id":"b","kind":"shed_all","emergency":true}"#,
    ));
    assert_eq!(d.action, Action::ShedAll);
    assert!(d.emergency);
}

#[test]
fn native_release_names_one_event_or_all() {
    assert_eq!(
        ok(SignalFormat::Native, r#"{"id":"evt-42","kind":"release"}"#),
        Signal::Release {
            id: Some("evt-42".into())
        }
    );
    assert_eq!(
        ok(SignalFormat::Native, r#"{"kind":"release"}"#),
        Signal::Release { id: None }
    );
}

#[test]
fn native_rejects_bad_values_with_a_reason_and_the_id() {
    let cases = [
        (r#"{"id":"x","kind":"import_limit","kw":-5}"#, "kw must be"),
        (
            r#"{"id":"x","kind":"import_limit","kw":1e12}"#,
            "kw must be",
        ),
        (
            r#"{"id":"x","kind":"import_limit","kw":"NaN"}"#,
            "invalid native signal",
        ),
        (r#"{"id":"x","kind":"import_limit"}"#, "needs kw"),
        (r#"{"id":"x","kind":"shed","kw":0}"#, "kw must be"),
        (r#"{"id":"x","kind":"shed_all","kw":3}"#, "takes no kw"),
        (r#"{"id":"x","kind":"explode"}"#, "unknown variant"),
        (
            r#"{"id":"x","kind":"shed","kw":5,"duraton_s":60}"#,
            "unknown field",
        ),
        (
            r#"{"id":"x","kind":"shed","kw":5,"duration_s":-1}"#,
            "duration_s must be",
        ),
        (
            r#"{"id":"x","kind":"shed","kw":5,"start":"tomorrow"}"#,
            "RFC 3339",
        ),
        (
            r#"{"id":"x","kind":"shed","kw":5,"start":"2026-11-22T08:00:00Z","duration_s":60}"#,
            "expired",
        ),
        (
            r#"{"id":"x","kind":"shed","kw":5,"start":"2027-01-01T00:00:00Z"}"#,
            "7 days ahead",
        ),
        (
            r#"{"id":"x","kind":"shed","kw":5,"duration_s":1e9}"#,
            "31 days",
        ),
        (r#"{"id":"x","kind":"release","kw":5}"#, "only id"),
    ];
    for (json, reason) in cases {
        let r = rejected(SignalFormat::Native, json);
        assert!(r.reason.contains(reason), "{json}: {}", r.reason);
        assert_eq!(r.id.as_deref(), Some("x"), "{json}");
    }
}

#[test]
fn native_needs_an_id_except_to_release_everything() {
    let r = rejected(SignalFormat::Native, r#"{"kind":"shed","kw":5}"#);
    assert_eq!(r.reason, "id is required");
    let r = rejected(SignalFormat::Native, r#"{"id":"","kind":"shed","kw":5}"#);
    assert!(r.reason.contains("1-128"));
    assert_eq!(r.id, None);
}

#[test]
fn malformed_and_oversize_payloads_are_rejected_before_anything_else() {
    for bytes in [
        &b""[..],
        b"{",
        b"[]",
        b"null",
        b"\xff\xfe",
        b"{\"id\":\"x\",\"kind\":",
    ] {
        for f in [
            SignalFormat::Native,
            SignalFormat::Openadr3,
            SignalFormat::Maestro,
        ] {
            assert!(parse(f, bytes, &cx()).is_err());
        }
    }
    let big = format!(
        r#"{{"id":"x","kind":"shed","kw":5,"pad":"{}"}}"#,
        "a".repeat(20_000)
    );
    let r = rejected(SignalFormat::Native, &big);
    assert!(r.reason.contains("exceeds the limit"), "{}", r.reason);
    assert_eq!(
        r.id, None,
        "an oversize payload is not even read for its id"
    );
    let deep = "[".repeat(10_000);
    assert!(parse(SignalFormat::Openadr3, deep.as_bytes(), &cx()).is_err());
}

// --- maestro ----------------------------------------------------------------------------------

#[test]
fn maestro_zero_curtails_and_hundred_releases() {
    let ts = now().as_second();
    let d = single(ok(
        SignalFormat::Maestro,
        &format!(r#"{{"target":0,"timestamp":{ts}}}"#),
    ));
    assert_eq!(d.action, Action::ShedAll);
    assert_eq!(d.id, MAESTRO_ID);
    assert_eq!(
        ok(
            SignalFormat::Maestro,
            &format!(r#"{{"target":100,"timestamp":{ts}}}"#)
        ),
        Signal::Release {
            id: Some(MAESTRO_ID.into())
        }
    );
}

#[test]
fn maestro_resends_are_identical_so_idempotent() {
    let a = ok(
        SignalFormat::Maestro,
        &format!(r#"{{"target":0,"timestamp":{}}}"#, now().as_second()),
    );
    let b = ok(
        SignalFormat::Maestro,
        &format!(r#"{{"target":0,"timestamp":{}}}"#, now().as_second() + 30),
    );
    assert_eq!(a, b);
}

#[test]
fn maestro_rejects_stale_timestamps_and_odd_targets() {
    let far = now().as_second() - 25 * 3600;
    let r = rejected(
        SignalFormat::Maestro,
        &format!(r#"{{"target":0,"timestamp":{far}}}"#),
    );
    assert!(r.reason.contains("24 h"), "{}", r.reason);
    let r = rejected(
        SignalFormat::Maestro,
        &format!(r#"{{"target":50,"timestamp":{}}}"#, now().as_second()),
    );
    assert!(r.reason.contains("target must be"), "{}", r.reason);
    let r = rejected(SignalFormat::Maestro, r#"{"target":0,"timestamp":1e300}"#);
    assert!(
        r.reason.contains("out of range") || r.reason.contains("ahead"),
        "{}",
        r.reason
    );
}

#[test]
fn maestro_rejects_a_timestamp_further_ahead_than_the_site_allows() {
    // Issue 13: `{"target":100,"timestamp":now+23h}` was taken, and locked maestro out.
    let ahead = now().as_second() + 23 * 3600;
    let r = rejected(
        SignalFormat::Maestro,
        &format!(r#"{{"target":100,"timestamp":{ahead}}}"#),
    );
    assert!(
        r.reason.contains("82800 s ahead") && r.reason.contains("policy.max_clock_skew_s"),
        "{}",
        r.reason
    );
    let within = now().as_second() + 299;
    ok(
        SignalFormat::Maestro,
        &format!(r#"{{"target":100,"timestamp":{within}}}"#),
    );
}

// --- OpenADR 3.1 ------------------------------------------------------------------------------

/// A capacity-limit event in the shape of the OpenADR 3.1 User Guide's example: an import
/// capacity limit over consecutive one-hour intervals.
const CAPACITY_LIMIT: &str = r#"{
  "objectType": "EVENT",
  "programID": "capacity-program",
  "eventName": "import-capacity-limit",
  "id": "ev-cap-1",
  "priority": 2,
  "payloadDescriptors": [
    {"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KW"}
  ],
  "intervalPeriod": {"start": "2026-11-22T10:00:00Z", "duration": "PT1H"},
  "intervals": [
    {"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [150.0]}]},
    {"id": 1, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [120.0]}]},
    {"id": 2, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [150.0]}]}
  ]
}"#;

/// A SIMPLE event in the shape of the User Guide's example: a level that starts now and lasts
/// indefinitely until the VTN deletes it.
const SIMPLE_NOW: &str = r#"{
  "id": "ev-simple-1",
  "programID": "simple-program",
  "eventName": "simple-level",
  "intervalPeriod": {"start": "0001-01-01T00:00:00Z", "duration": "P9999Y"},
  "intervals": [{"id": 0, "payloads": [{"type": "SIMPLE", "values": [2]}]}]
}"#;

#[test]
fn openadr_capacity_limit_intervals_follow_each_other() {
    let Signal::Event { id, directives } = ok(SignalFormat::Openadr3, CAPACITY_LIMIT) else {
        panic!()
    };
    assert_eq!(id, "ev-cap-1");
    let windows: Vec<_> = directives
        .iter()
        .map(|d| (d.interval, d.start, d.end, d.action))
        .collect();
    assert_eq!(
        windows,
        vec![
            (
                0,
                t("2026-11-22T10:00:00Z"),
                Some(t("2026-11-22T11:00:00Z")),
                Action::ImportLimit { kw: 150.0 }
            ),
            (
                1,
                t("2026-11-22T11:00:00Z"),
                Some(t("2026-11-22T12:00:00Z")),
                Action::ImportLimit { kw: 120.0 }
            ),
            (
                2,
                t("2026-11-22T12:00:00Z"),
                Some(t("2026-11-22T13:00:00Z")),
                Action::ImportLimit { kw: 150.0 }
            ),
        ]
    );
    assert!(directives.iter().all(|d| d.priority == 2 && !d.emergency));
}

#[test]
fn openadr_simple_level_maps_through_the_site_policy_and_starts_now_indefinitely() {
    let d = single(ok(SignalFormat::Openadr3, SIMPLE_NOW));
    assert_eq!(
        d.action,
        Action::ImportLimit { kw: 100.0 },
        "level 2 in LEVELS"
    );
    assert_eq!(d.start, now());
    assert_eq!(d.end, None);
    let level0 = SIMPLE_NOW.replace("\"values\": [2]", "\"values\": [0]");
    let Signal::Event { directives, .. } = ok(SignalFormat::Openadr3, &level0) else {
        panic!()
    };
    assert!(directives.is_empty(), "level 0 is normal operation");
}

#[test]
fn openadr_notifications_create_update_and_delete() {
    let create = format!(r#"{{"objectType":"EVENT","operation":"CREATE","object":{SIMPLE_NOW}}}"#);
    let update = create.replace("CREATE", "UPDATE");
    assert_eq!(
        ok(SignalFormat::Openadr3, &create),
        ok(SignalFormat::Openadr3, &update)
    );
    let delete = format!(r#"{{"objectType":"EVENT","operation":"DELETE","object":{SIMPLE_NOW}}}"#);
    assert_eq!(
        ok(SignalFormat::Openadr3, &delete),
        Signal::Release {
            id: Some("ev-simple-1".into())
        }
    );
    let program = r#"{"objectType":"PROGRAM","operation":"CREATE","object":{"id":"p"}}"#;
    assert!(
        rejected(SignalFormat::Openadr3, program)
            .reason
            .contains("not EVENT")
    );
}

#[test]
fn openadr_dispatch_setpoint_caps_import_in_its_units() {
    let ev = r#"{"id":"d","payloadDescriptors":[{"payloadType":"DISPATCH_SETPOINT","units":"MW"}],
      "intervalPeriod":{"start":"2026-11-22T10:30:00Z","duration":"PT15M"},
      "intervals":[{"id":0,"payloads":[{"type":"DISPATCH_SETPOINT","values":[0.25]}]}]}"#;
    let d = single(ok(SignalFormat::Openadr3, ev));
    assert_eq!(d.action, Action::ImportLimit { kw: 250.0 });
    assert_eq!(d.end, Some(t("2026-11-22T10:45:00Z")));
}

#[test]
fn openadr_priority_zero_is_an_emergency() {
    let ev = SIMPLE_NOW.replace(
        "\"id\": \"ev-simple-1\",",
        "\"id\": \"e\", \"priority\": 0,",
    );
    assert!(single(ok(SignalFormat::Openadr3, &ev)).emergency);
}

#[test]
fn openadr_rejects_what_it_cannot_honour() {
    let cases = [
        (
            CAPACITY_LIMIT.replace("2026-11-22T10:00:00Z", "2026-11-21T10:00:00Z"),
            "expired",
        ),
        (CAPACITY_LIMIT.replace("PT1H", "one hour"), "ISO 8601"),
        (CAPACITY_LIMIT.replace("[150.0]", "[-150.0]"), "kw must be"),
        (
            CAPACITY_LIMIT.replace("[150.0]", "[150.0, 3]"),
            "exactly one value",
        ),
        (CAPACITY_LIMIT.replace("\"KW\"", "\"BTU\""), "units"),
        (
            CAPACITY_LIMIT.replace("IMPORT_CAPACITY_LIMIT\", \"values", "PRICE\", \"values"),
            "no supported payload",
        ),
        (SIMPLE_NOW.replace("[2]", "[7]"), "SIMPLE level"),
        (
            SIMPLE_NOW.replace("\"id\": \"ev-simple-1\",", ""),
            "event id is required",
        ),
        (
            CAPACITY_LIMIT.replace("\"priority\": 2", "\"priority\": -1"),
            "priority",
        ),
    ];
    for (json, reason) in cases {
        let r = rejected(SignalFormat::Openadr3, &json);
        assert!(
            r.reason.contains(reason),
            "expected {reason:?}: {}",
            r.reason
        );
    }
}

#[test]
fn openadr_drops_intervals_already_over_and_keeps_the_rest() {
    let ev = CAPACITY_LIMIT.replace("2026-11-22T10:00:00Z", "2026-11-22T08:30:00Z");
    let Signal::Event { directives, .. } = ok(SignalFormat::Openadr3, &ev) else {
        panic!()
    };
    assert_eq!(
        directives.iter().map(|d| d.interval).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

// --- hostile input ----------------------------------------------------------------------------

mod hostile {
    use super::*;
    use proptest::prelude::*;

    /// Valid signals of every format, to mutate.
    fn seeds() -> Vec<(SignalFormat, String)> {
        vec![
            (
                SignalFormat::Native,
                r#"{"id":"evt-42","kind":"import_limit","kw":12000,"start":"2026-11-22T10:00:00Z","duration_s":3600,"priority":1}"#.into(),
            ),
            (SignalFormat::Native, r#"{"id":"a","kind":"shed_all","emergency":true}"#.into()),
            (SignalFormat::Openadr3, CAPACITY_LIMIT.into()),
            (SignalFormat::Openadr3, SIMPLE_NOW.into()),
            (SignalFormat::Maestro, format!(r#"{{"target":0,"timestamp":{}}}"#, now().as_second())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic_and_rejections_carry_a_reason(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            f in 0usize..3,
        ) {
            let format = [SignalFormat::Native, SignalFormat::Openadr3, SignalFormat::Maestro][f];
            if let Err(r) = parse(format, &bytes, &cx()) {
                prop_assert!(!r.reason.is_empty());
            }
        }

        #[test]
        fn mutated_valid_signals_never_panic_and_accepted_ones_are_sane(
            seed in 0usize..5,
            edits in proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..8),
        ) {
            let (format, text) = &seeds()[seed];
            let mut bytes = text.clone().into_bytes();
            for (pos, byte, op) in edits {
                let i = usize::from(pos) % (bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ if i < bytes.len() => { bytes.remove(i); }
                    _ => {}
                }
            }
            match parse(*format, &bytes, &cx()) {
                Err(r) => prop_assert!(!r.reason.is_empty()),
                Ok(Signal::Event { directives, .. }) => {
                    for d in directives {
                        if let Action::ImportLimit { kw } | Action::Shed { kw } = d.action {
                            prop_assert!(kw.is_finite() && (0.0..=MAX_KW).contains(&kw));
                        }
                        prop_assert!(d.end.is_none_or(|e| e > d.start && e > now()));
                    }
                }
                Ok(Signal::Release { .. }) => {}
            }
        }
    }
}
