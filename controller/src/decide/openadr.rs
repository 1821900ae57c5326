//! OpenADR 3.1 reports going upstream: the `reportRequest` a VEN sends its VTN, built from what
//! the site measured. Pure: values in, JSON out.
//!
//! - usage: per interval of the event, `USAGE` (kWh, direct read) and `DEMAND` (mean kW);
//! - availability: `LOAD_SHED_DELTA_AVAILABLE` (kW the site could shed now) over the event's
//!   intervals, sent when an event is taken, before it starts.

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::decide::mv::EventInterval;
use crate::decide::signal::Directive;
use crate::series::round3;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReportRequest {
    pub object_type: &'static str,
    #[serde(rename = "eventID")]
    pub event_id: String,
    pub client_name: String,
    pub report_name: String,
    pub payload_descriptors: Vec<PayloadDescriptor>,
    pub resources: Vec<Resource>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PayloadDescriptor {
    pub object_type: &'static str,
    pub payload_type: &'static str,
    pub reading_type: &'static str,
    pub units: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    pub resource_name: String,
    pub intervals: Vec<Interval>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Interval {
    pub id: u32,
    pub interval_period: IntervalPeriod,
    pub payloads: Vec<ValuesMap>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IntervalPeriod {
    pub start: String,
    pub duration: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ValuesMap {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub values: Vec<f64>,
}

fn descriptor(
    payload_type: &'static str,
    reading_type: &'static str,
    units: &'static str,
) -> PayloadDescriptor {
    PayloadDescriptor {
        object_type: "REPORT_PAYLOAD_DESCRIPTOR",
        payload_type,
        reading_type,
        units,
    }
}

fn period(start: Timestamp, end: Option<Timestamp>) -> IntervalPeriod {
    IntervalPeriod {
        start: start.to_string(),
        duration: match end {
            Some(end) => iso_duration(end.duration_since(start)),
            None => "P9999Y".into(),
        },
    }
}

fn iso_duration(d: SignedDuration) -> String {
    let d = d.max(SignedDuration::ZERO);
    let ms = d.subsec_millis();
    if ms == 0 {
        format!("PT{}S", d.as_secs())
    } else {
        format!("PT{}.{:03}S", d.as_secs(), ms)
    }
}

/// The site's energy and mean power over each interval of OpenADR event `event_id`.
pub fn usage(
    event_id: &str,
    client: &str,
    resource: &str,
    intervals: &[EventInterval],
) -> ReportRequest {
    let intervals = intervals
        .iter()
        .filter_map(|iv| {
            Some(Interval {
                id: iv.id,
                interval_period: period(iv.start, Some(iv.end)),
                payloads: vec![
                    ValuesMap {
                        kind: "USAGE",
                        values: vec![round3(iv.kwh()?)],
                    },
                    ValuesMap {
                        kind: "DEMAND",
                        values: vec![iv.mean_kw?],
                    },
                ],
            })
        })
        .collect();
    ReportRequest {
        object_type: "REPORT",
        event_id: event_id.to_owned(),
        client_name: client.to_owned(),
        report_name: format!("{event_id}-usage"),
        payload_descriptors: vec![
            descriptor("USAGE", "DIRECT_READ", "KWH"),
            descriptor("DEMAND", "MEAN", "KW"),
        ],
        resources: vec![Resource {
            resource_name: resource.to_owned(),
            intervals,
        }],
    }
}

/// The kW the site could shed now, offered over each interval of OpenADR event `event_id`.
pub fn availability(
    event_id: &str,
    client: &str,
    resource: &str,
    directives: &[Directive],
    available_kw: f64,
) -> ReportRequest {
    let intervals = directives
        .iter()
        .map(|d| Interval {
            id: d.interval,
            interval_period: period(d.start, d.end),
            payloads: vec![ValuesMap {
                kind: "LOAD_SHED_DELTA_AVAILABLE",
                values: vec![round3(available_kw)],
            }],
        })
        .collect();
    ReportRequest {
        object_type: "REPORT",
        event_id: event_id.to_owned(),
        client_name: client.to_owned(),
        report_name: format!("{event_id}-availability"),
        payload_descriptors: vec![descriptor("LOAD_SHED_DELTA_AVAILABLE", "FORECAST", "KW")],
        resources: vec![Resource {
            resource_name: resource.to_owned(),
            intervals,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::signal::Action;
    use serde_json::json;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_usage_report_has_usage_and_demand_for_each_interval_in_the_3_1_shape() {
        let intervals = [
            EventInterval {
                id: 0,
                start: t("2026-11-22T10:00:00Z"),
                end: t("2026-11-22T10:15:00Z"),
                mean_kw: Some(120.0),
            },
            EventInterval {
                id: 1,
                start: t("2026-11-22T10:15:00Z"),
                end: t("2026-11-22T10:20:30Z"),
                mean_kw: None, // no reading: left out, never reported as zero
            },
        ];
        let r = usage("evt-1", "demo", "site-meter", &intervals);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({
                "objectType": "REPORT",
                "eventID": "evt-1",
                "clientName": "demo",
                "reportName": "evt-1-usage",
                "payloadDescriptors": [
                    {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": "USAGE",
                     "readingType": "DIRECT_READ", "units": "KWH"},
                    {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": "DEMAND",
                     "readingType": "MEAN", "units": "KW"}
                ],
                "resources": [{
                    "resourceName": "site-meter",
                    "intervals": [{
                        "id": 0,
                        "intervalPeriod": {"start": "2026-11-22T10:00:00Z", "duration": "PT900S"},
                        "payloads": [
                            {"type": "USAGE", "values": [30.0]},
                            {"type": "DEMAND", "values": [120.0]}
                        ]
                    }]
                }]
            })
        );
    }

    #[test]
    fn an_availability_report_offers_the_sheddable_kw_over_each_directive() {
        let d = Directive {
            id: "evt-2".into(),
            interval: 3,
            action: Action::ShedAll,
            start: t("2026-11-22T10:00:00Z"),
            end: None,
            priority: 1,
            emergency: false,
            format: site_config::SignalFormat::Openadr3,
        };
        let v = serde_json::to_value(availability("evt-2", "demo", "site", &[d], 85.25)).unwrap();
        assert_eq!(
            v["payloadDescriptors"][0]["payloadType"],
            "LOAD_SHED_DELTA_AVAILABLE"
        );
        let iv = &v["resources"][0]["intervals"][0];
        assert_eq!(iv["id"], 3);
        assert_eq!(iv["intervalPeriod"]["duration"], "P9999Y");
        assert_eq!(iv["payloads"][0]["values"], json!([85.25]));
    }

    #[test]
    fn durations_are_iso_8601_seconds() {
        assert_eq!(iso_duration(SignedDuration::from_secs(60)), "PT60S");
        assert_eq!(iso_duration(SignedDuration::from_millis(1500)), "PT1.500S");
        assert_eq!(iso_duration(SignedDuration::from_secs(-5)), "PT0S");
    }
}
