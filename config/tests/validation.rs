//! Site-file validation: every class of mistake is rejected, and each problem names the file
//! and the exact field path, so `gridshed check` can point at the line to fix.

use std::path::{Path, PathBuf};

use site_config::profile::{Encoding, Profile, RelayTable, WordOrder};
use site_config::{ConfigError, Problem, Site};

/// The name the site text is parsed under; every error must mention it.
const FILE: &str = "sites/test.toml";

/// A small valid site: one site meter, one GPU meter, a PDU group of two, one ASIC group on
/// it, one GPU rack fed from its own PDU, and one native signal topic.
const SITE: &str = r#"
[site]
id = "test"
name = "Test site"
import_limit_kw = 100.0
meter = "site-meter"

[mqtt]
urls = ["mqtt://127.0.0.1:1883"]
client_id = "gridshed-test"
ack_topic = "sites/test/ack"
status_topic = "sites/test/status"

[[mqtt.signals]]
topic = "sites/test/signals"
format = "native"

[[meters]]
name = "site-meter"
host = "127.0.0.1"
port = 15020
profile = "generic-meter"

[[meters]]
name = "gpu-meter"
host = "127.0.0.1"
port = 15021
profile = "generic-meter"

[[pdus]]
name = "pdu"
count = 2
host = "127.0.0.1"
port = 15031
outlets = 8
profile = "generic-pdu"

[[pdus]]
name = "pdu-gpu"
host = "127.0.0.1"
port = 15036
outlets = 8
profile = "generic-pdu"

[[asics]]
pdu = "pdu"
outlets = [1, 8]
model = "S19j Pro"
rated_w = 3250.0
efficiency_j_per_th = 29.5
priority = 2

[[gpu_racks]]
name = "gpu-a"
meter = "gpu-meter"
rated_kw = 40.0
feeds = [{ pdu = "pdu-gpu", outlets = [1, 4] }]
"#;

fn parse(text: &str) -> Result<Site, ConfigError> {
    site_config::parse(Path::new(FILE), text)
}

/// The base site with the first occurrence of `from` replaced by `to`.
fn edit(from: &str, to: &str) -> String {
    edits(&[(from, to)])
}

/// The base site with several replacements applied in order; each must match.
fn edits(changes: &[(&str, &str)]) -> String {
    let mut text = SITE.to_owned();
    for (from, to) in changes {
        assert!(
            text.contains(from),
            "test setup: {from:?} does not occur in the site text"
        );
        text = text.replacen(from, to, 1);
    }
    text
}

/// The base site with `extra` appended (new sections such as `[policy]` or `[[sim.faults]]`).
fn append(extra: &str) -> String {
    format!("{SITE}\n{extra}")
}

/// Inserts an extra `[[asics]]` group before the GPU rack.
fn with_asic_group(group: &str) -> String {
    edit(
        "[[gpu_racks]]",
        &format!("[[asics]]\n{group}\n\n[[gpu_racks]]"),
    )
}

/// Inserts an extra `[[meters]]` declaration (it becomes `meters[2]`).
fn with_meter(meter: &str) -> String {
    edit("[[pdus]]", &format!("[[meters]]\n{meter}\n\n[[pdus]]"))
}

/// Parses `text`, which must fail validation, and returns the error.
fn invalid(text: &str) -> ConfigError {
    match parse(text) {
        Ok(_) => panic!("the site was accepted, but should have been rejected:\n{text}"),
        Err(e) => e,
    }
}

/// Asserts that `text` is rejected with a problem at exactly `path`, that the error names the
/// file, and returns that problem.
fn problem_at(text: &str, path: &str) -> Problem {
    let err = invalid(text);
    let shown = err.to_string();
    assert!(
        shown.contains(FILE),
        "the error does not name the file {FILE}:\n{shown}"
    );
    assert!(
        matches!(err, ConfigError::Invalid { .. }),
        "expected ConfigError::Invalid, got: {err:?}"
    );
    let found = err.problems().iter().find(|p| p.path == path).cloned();
    let Some(problem) = found else {
        panic!("no problem at {path:?}; the problems were:\n{shown}");
    };
    assert!(
        shown.contains(&format!("  {path}: {}", problem.message)),
        "the Display does not list the problem as \"  path: message\":\n{shown}"
    );
    problem
}

fn assert_mentions(problem: &Problem, words: &str) {
    assert!(
        problem.message.contains(words),
        "expected the message at {} to mention {words:?}, got {:?}",
        problem.path,
        problem.message
    );
}

/// A fresh, empty directory under the system temp dir, unique to this process and test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("gridshed-validation-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The base site itself.

#[test]
fn the_minimal_test_site_is_valid() {
    let site = parse(SITE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(site.meters.len(), 2);
    assert_eq!(site.pdus.len(), 3);
    assert_eq!(site.asics.len(), 16);
    assert_eq!(site.gpu_racks.len(), 1);
    assert_eq!(site.gpu_racks[0].feeds.len(), 4);
    assert_eq!(site.meter(site.site_meter).name, "site-meter");
    assert_eq!(site.mqtt.signals.len(), 1);
    assert_eq!(site.source, Path::new(FILE));
}

// ---------------------------------------------------------------------------------------------
// Names that do not resolve.

#[test]
fn an_unknown_site_meter_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit(r#"meter = "site-meter""#, r#"meter = "grid-meter""#),
        "site.meter",
    );
    assert_mentions(&p, "grid-meter");
}

#[test]
fn an_asic_group_on_an_unknown_pdu_is_rejected_naming_the_field() {
    let p = problem_at(&edit(r#"pdu = "pdu""#, r#"pdu = "pdu-9""#), "asics[0].pdu");
    assert_mentions(&p, "pdu-9");
}

#[test]
fn a_gpu_rack_with_an_unknown_meter_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit(r#"meter = "gpu-meter""#, r#"meter = "gpu-meter-7""#),
        "gpu_racks[0].meter",
    );
    assert_mentions(&p, "gpu-meter-7");
}

#[test]
fn a_gpu_feed_on_an_unknown_pdu_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit(r#"{ pdu = "pdu-gpu""#, r#"{ pdu = "pdu-gpu-2""#),
        "gpu_racks[0].feeds[0].pdu",
    );
    assert_mentions(&p, "pdu-gpu-2");
}

#[test]
fn an_unknown_profile_name_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit(r#"profile = "generic-pdu""#, r#"profile = "acme-pdu""#),
        "pdus[0].profile",
    );
    assert_mentions(&p, "acme-pdu");
    // The message lists the profiles that do exist.
    assert_mentions(&p, "generic-pdu");
}

#[test]
fn a_meter_profile_on_a_pdu_is_rejected_naming_the_field() {
    // The second PDU declaration (pdu-gpu) is the one followed by the ASIC group.
    let text = edit(
        "outlets = 8\nprofile = \"generic-pdu\"\n\n[[asics]]",
        "outlets = 8\nprofile = \"generic-meter\"\n\n[[asics]]",
    );
    let p = problem_at(&text, "pdus[1].profile");
    assert_mentions(&p, "meter profile");
}

#[test]
fn a_pdu_profile_on_a_meter_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit(r#"profile = "generic-meter""#, r#"profile = "generic-pdu""#),
        "meters[0].profile",
    );
    assert_mentions(&p, "PDU profile");
}

// ---------------------------------------------------------------------------------------------
// Outlets.

#[test]
fn an_outlet_assigned_to_two_asic_groups_is_rejected_naming_the_field() {
    let text = with_asic_group(
        r#"pdu = "pdu-2"
outlets = [8, 8]
model = "S21"
rated_w = 3500.0
efficiency_j_per_th = 17.5
priority = 1"#,
    );
    let p = problem_at(&text, "asics[1].outlets");
    assert_mentions(&p, "asics[0]");
}

#[test]
fn an_asic_on_a_gpu_feed_outlet_is_rejected_naming_the_field() {
    let text = with_asic_group(
        r#"pdu = "pdu-gpu"
outlets = [4, 8]
model = "S21"
rated_w = 3500.0
efficiency_j_per_th = 17.5
priority = 1"#,
    );
    let p = problem_at(&text, "asics[1].outlets");
    assert_mentions(&p, "gpu-a");
}

#[test]
fn an_asic_outlet_range_beyond_the_pdu_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit("outlets = [1, 8]", "outlets = [1, 9]"),
        "asics[0].outlets",
    );
    assert_mentions(&p, "<= 8");
}

#[test]
fn an_asic_outlet_range_starting_at_zero_is_rejected_naming_the_field() {
    problem_at(
        &edit("outlets = [1, 8]", "outlets = [0, 4]"),
        "asics[0].outlets",
    );
}

#[test]
fn a_reversed_asic_outlet_range_is_rejected_naming_the_field() {
    problem_at(
        &edit("outlets = [1, 8]", "outlets = [6, 2]"),
        "asics[0].outlets",
    );
}

#[test]
fn a_gpu_feed_outlet_range_beyond_the_pdu_is_rejected_naming_the_field() {
    problem_at(
        &edit("outlets = [1, 4] }", "outlets = [5, 9] }"),
        "gpu_racks[0].feeds[0].outlets",
    );
}

#[test]
fn a_members_range_beyond_the_group_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit("pdu = \"pdu\"\n", "pdu = \"pdu\"\nmembers = [2, 3]\n"),
        "asics[0].members",
    );
    assert_mentions(&p, "<= 2");
}

#[test]
fn a_members_range_starting_at_zero_is_rejected_naming_the_field() {
    problem_at(
        &edit("pdu = \"pdu\"\n", "pdu = \"pdu\"\nmembers = [0, 1]\n"),
        "asics[0].members",
    );
}

#[test]
fn members_on_a_single_pdu_is_rejected_naming_the_field() {
    let text = with_asic_group(
        r#"pdu = "pdu-gpu"
members = [1, 1]
outlets = [5, 8]
model = "S21"
rated_w = 3500.0
efficiency_j_per_th = 17.5
priority = 1"#,
    );
    let p = problem_at(&text, "asics[1].members");
    assert_mentions(&p, "single PDU");
}

#[test]
fn a_pdu_with_zero_outlets_is_rejected_naming_the_field() {
    // The feed then lies outside the PDU too; the outlet count is what must be reported.
    problem_at(
        &edit("port = 15036\noutlets = 8", "port = 15036\noutlets = 0"),
        "pdus[1].outlets",
    );
}

#[test]
fn a_pdu_with_more_than_64_outlets_is_rejected_naming_the_field() {
    problem_at(&edit("outlets = 8", "outlets = 65"), "pdus[0].outlets");
}

// ---------------------------------------------------------------------------------------------
// Numbers.

#[test]
fn a_nan_rated_power_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit("rated_w = 3250.0", "rated_w = nan"),
        "asics[0].rated_w",
    );
    assert_mentions(&p, "NaN");
}

#[test]
fn an_infinite_rated_power_is_rejected_naming_the_field() {
    problem_at(
        &edit("rated_w = 3250.0", "rated_w = inf"),
        "asics[0].rated_w",
    );
}

#[test]
fn a_nan_import_limit_is_rejected_naming_the_field() {
    problem_at(
        &edit("import_limit_kw = 100.0", "import_limit_kw = nan"),
        "site.import_limit_kw",
    );
}

#[test]
fn an_infinite_import_limit_is_rejected_naming_the_field() {
    problem_at(
        &edit("import_limit_kw = 100.0", "import_limit_kw = +inf"),
        "site.import_limit_kw",
    );
    problem_at(
        &edit("import_limit_kw = 100.0", "import_limit_kw = -inf"),
        "site.import_limit_kw",
    );
}

#[test]
fn a_negative_import_limit_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit("import_limit_kw = 100.0", "import_limit_kw = -5"),
        "site.import_limit_kw",
    );
    assert_mentions(&p, "-5");
}

#[test]
fn a_zero_import_limit_is_rejected_naming_the_field() {
    problem_at(
        &edit("import_limit_kw = 100.0", "import_limit_kw = 0.0"),
        "site.import_limit_kw",
    );
}

#[test]
fn an_absurd_import_limit_is_rejected_naming_the_field() {
    problem_at(
        &edit("import_limit_kw = 100.0", "import_limit_kw = 5e9"),
        "site.import_limit_kw",
    );
}

#[test]
fn a_zero_efficiency_is_rejected_naming_the_field() {
    problem_at(
        &edit("efficiency_j_per_th = 29.5", "efficiency_j_per_th = 0"),
        "asics[0].efficiency_j_per_th",
    );
}

#[test]
fn an_absurd_rated_power_is_rejected_naming_the_field() {
    problem_at(
        &edit("rated_w = 3250.0", "rated_w = 3250000.0"),
        "asics[0].rated_w",
    );
}

#[test]
fn a_negative_gpu_rack_rating_is_rejected_naming_the_field() {
    problem_at(
        &edit("rated_kw = 40.0", "rated_kw = -40.0"),
        "gpu_racks[0].rated_kw",
    );
}

#[test]
fn a_zero_restore_batch_size_is_rejected_naming_the_field() {
    problem_at(
        &append("[policy]\nrestore_batch_size = 0\n"),
        "policy.restore_batch_size",
    );
}

#[test]
fn a_negative_margin_is_rejected_naming_the_field() {
    problem_at(&append("[policy]\nmargin_kw = -1.0\n"), "policy.margin_kw");
}

#[test]
fn a_nan_simple_level_is_rejected_naming_the_field() {
    problem_at(
        &append(
            "[policy.simple]\nlevel_1 = { action = \"shed\", kw = nan }\nlevel_2 = { action = \"none\" }\nlevel_3 = { action = \"shed_all\" }\n",
        ),
        "policy.simple.level_1.kw",
    );
}

// ---------------------------------------------------------------------------------------------
// Device addresses and names.

#[test]
fn a_bad_host_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit(
            "host = \"127.0.0.1\"\nport = 15036",
            "host = \"pdu gpu.local\"\nport = 15036",
        ),
        "pdus[1].host",
    );
    assert_mentions(&p, "pdu gpu.local");
}

#[test]
fn port_zero_is_rejected_naming_the_field() {
    problem_at(&edit("port = 15031", "port = 0"), "pdus[0].port");
}

#[test]
fn unit_id_zero_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit("port = 15020\n", "port = 15020\nunit_id = 0\n"),
        "meters[0].unit_id",
    );
    assert_mentions(&p, "got 0");
}

#[test]
fn a_timeout_of_zero_is_rejected_naming_the_field() {
    problem_at(
        &edit("port = 15021\n", "port = 15021\ntimeout_ms = 0\n"),
        "meters[1].timeout_ms",
    );
}

#[test]
fn group_ports_running_past_65535_are_rejected_naming_the_field() {
    let p = problem_at(&edit("port = 15031", "port = 65535"), "pdus[0].count");
    assert_mentions(&p, "65535");
}

#[test]
fn a_host_step_group_on_a_host_name_is_rejected_naming_the_field() {
    problem_at(
        &edit(
            "count = 2\nhost = \"127.0.0.1\"",
            "count = 2\nstep = \"host\"\nhost = \"pdus.example.com\"",
        ),
        "pdus[0].host",
    );
}

#[test]
fn duplicate_device_names_are_rejected() {
    let err = invalid(&with_meter(
        "name = \"gpu-meter\"\nhost = \"127.0.0.1\"\nport = 15022\nprofile = \"generic-meter\"",
    ));
    assert!(err.to_string().contains(FILE));
    assert!(
        err.problems()
            .iter()
            .any(|p| p.message.contains("\"gpu-meter\" is used twice")),
        "{err}"
    );
}

#[test]
fn duplicate_device_names_are_rejected_naming_the_field() {
    problem_at(
        &with_meter(
            "name = \"gpu-meter\"\nhost = \"127.0.0.1\"\nport = 15022\nprofile = \"generic-meter\"",
        ),
        "meters[2].name",
    );
}

#[test]
fn a_pdu_named_like_a_group_member_is_rejected_naming_the_field() {
    problem_at(
        &edit(r#"name = "pdu-gpu""#, r#"name = "pdu-2""#),
        "pdus[1].name",
    );
}

#[test]
fn two_devices_on_the_same_host_port_and_unit_are_rejected() {
    let err = invalid(&with_meter(
        "name = \"spare-meter\"\nhost = \"127.0.0.1\"\nport = 15021\nprofile = \"generic-meter\"",
    ));
    assert!(err.to_string().contains(FILE));
    assert!(
        err.problems()
            .iter()
            .any(|p| p.message.contains("both answer at 127.0.0.1:15021 unit 1")),
        "{err}"
    );
}

#[test]
fn two_devices_on_the_same_host_port_and_unit_are_rejected_naming_the_field() {
    problem_at(
        &with_meter(
            "name = \"spare-meter\"\nhost = \"127.0.0.1\"\nport = 15021\nprofile = \"generic-meter\"",
        ),
        "meters[2].port",
    );
}

#[test]
fn two_devices_on_the_same_host_and_port_with_different_unit_ids_are_accepted() {
    let text = with_meter(
        "name = \"spare-meter\"\nhost = \"127.0.0.1\"\nport = 15021\nunit_id = 2\nprofile = \"generic-meter\"",
    );
    let site = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(site.meters.len(), 3);
}

#[test]
fn a_bad_device_name_is_rejected_naming_the_field() {
    problem_at(
        &edit(r#"name = "pdu-gpu""#, r#"name = "pdu gpu""#),
        "pdus[1].name",
    );
}

#[test]
fn a_gpu_rack_on_the_site_meter_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit(r#"meter = "gpu-meter""#, r#"meter = "site-meter""#),
        "gpu_racks[0].meter",
    );
    assert_mentions(&p, "site meter");
}

// ---------------------------------------------------------------------------------------------
// MQTT.

#[test]
fn a_broker_url_with_a_bad_scheme_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit("mqtt://127.0.0.1:1883", "tcp://127.0.0.1:1883"),
        "mqtt.urls[0]",
    );
    assert_mentions(&p, "mqtt://");
}

#[test]
fn a_broker_url_with_credentials_is_rejected_naming_the_field() {
    problem_at(
        &edit(
            "mqtt://127.0.0.1:1883",
            "mqtt://gridshed:s3cret@127.0.0.1:1883",
        ),
        "mqtt.urls[0]",
    );
}

#[test]
fn a_broker_url_with_credentials_is_rejected_without_repeating_the_password() {
    let err = invalid(&edit(
        "mqtt://127.0.0.1:1883",
        "mqtt://gridshed:s3cret@127.0.0.1:1883",
    ));
    assert!(
        !err.to_string().contains("s3cret"),
        "the error repeats the password:\n{err}"
    );
}

#[test]
fn a_broker_url_with_port_zero_is_rejected_naming_the_field() {
    problem_at(
        &edit("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:0"),
        "mqtt.urls[0]",
    );
}

#[test]
fn a_second_bad_fallback_url_is_reported_at_its_own_index() {
    problem_at(
        &edit(
            r#"urls = ["mqtt://127.0.0.1:1883"]"#,
            r#"urls = ["mqtt://127.0.0.1:1883", "http://fallback.example.com"]"#,
        ),
        "mqtt.urls[1]",
    );
}

#[test]
fn three_broker_urls_are_rejected_naming_the_field() {
    problem_at(
        &edit(
            r#"urls = ["mqtt://127.0.0.1:1883"]"#,
            r#"urls = ["mqtt://a.example.com", "mqtt://b.example.com", "mqtt://c.example.com"]"#,
        ),
        "mqtt.urls",
    );
}

#[test]
fn mqtts_without_a_ca_file_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit("mqtt://127.0.0.1:1883", "mqtts://broker.example.com"),
        "mqtt.ca_file",
    );
    assert_mentions(&p, "mqtts://");
}

#[test]
fn a_ca_file_that_does_not_exist_is_rejected_naming_the_field() {
    problem_at(
        &edit(
            "urls = [\"mqtt://127.0.0.1:1883\"]",
            "urls = [\"mqtts://broker.example.com\"]\nca_file = \"certs/no-such-ca.pem\"",
        ),
        "mqtt.ca_file",
    );
}

#[test]
fn a_wildcard_in_a_signal_topic_is_rejected_naming_the_field() {
    problem_at(
        &edit(
            r#"topic = "sites/test/signals""#,
            r#"topic = "sites/+/signals""#,
        ),
        "mqtt.signals[0].topic",
    );
    problem_at(
        &edit(
            r#"topic = "sites/test/signals""#,
            r#"topic = "sites/test/#""#,
        ),
        "mqtt.signals[0].topic",
    );
}

#[test]
fn a_wildcard_in_the_ack_topic_is_rejected_naming_the_field() {
    problem_at(
        &edit(
            r#"ack_topic = "sites/test/ack""#,
            r#"ack_topic = "sites/#""#,
        ),
        "mqtt.ack_topic",
    );
}

#[test]
fn an_ack_topic_equal_to_a_signal_topic_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit(
            r#"ack_topic = "sites/test/ack""#,
            r#"ack_topic = "sites/test/signals""#,
        ),
        "mqtt.ack_topic",
    );
    assert_mentions(&p, "signal topic");
}

#[test]
fn a_status_topic_equal_to_the_ack_topic_is_rejected_naming_the_field() {
    problem_at(
        &edit(
            r#"status_topic = "sites/test/status""#,
            r#"status_topic = "sites/test/ack""#,
        ),
        "mqtt.status_topic",
    );
}

#[test]
fn a_signal_topic_listed_twice_is_rejected_naming_the_field() {
    problem_at(
        &append("[[mqtt.signals]]\ntopic = \"sites/test/signals\"\nformat = \"maestro\"\n"),
        "mqtt.signals[1].topic",
    );
}

#[test]
fn a_bad_environment_variable_name_is_rejected_naming_the_field() {
    let p = problem_at(
        &edit(
            "client_id = \"gridshed-test\"\n",
            "client_id = \"gridshed-test\"\nusername_env = \"MQTT-USER\"\n",
        ),
        "mqtt.username_env",
    );
    assert_mentions(&p, "MQTT-USER");
}

#[test]
fn a_password_env_without_a_username_env_is_rejected_naming_the_field() {
    problem_at(
        &edit(
            "client_id = \"gridshed-test\"\n",
            "client_id = \"gridshed-test\"\npassword_env = \"MQTT_PASSWORD\"\n",
        ),
        "mqtt.password_env",
    );
}

#[test]
fn no_signal_topic_at_all_is_rejected_naming_the_field() {
    problem_at(
        &edit(
            "[[mqtt.signals]]\ntopic = \"sites/test/signals\"\nformat = \"native\"\n",
            "",
        )
        .replacen(
            "status_topic = \"sites/test/status\"\n",
            "status_topic = \"sites/test/status\"\nsignals = []\n",
            1,
        ),
        "mqtt.signals",
    );
}

// ---------------------------------------------------------------------------------------------
// Policy.

#[test]
fn a_curtailing_stale_signal_policy_without_after_s_is_rejected_naming_the_field() {
    let p = problem_at(
        &append("[policy]\nstale_signal = { action = \"curtail\" }\n"),
        "policy.stale_signal.after_s",
    );
    assert_mentions(&p, "curtail");
}

#[test]
fn a_holding_stale_signal_policy_with_after_s_is_rejected_naming_the_field() {
    problem_at(
        &append("[policy]\nstale_signal = { action = \"hold\", after_s = 60.0 }\n"),
        "policy.stale_signal.after_s",
    );
}

#[test]
fn a_curtailing_stale_signal_policy_with_after_s_is_accepted() {
    let site = parse(&append(
        "[policy]\nstale_signal = { action = \"curtail\", after_s = 600.0 }\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        site.policy.stale_signal,
        site_config::StalePolicy::Curtail {
            after: std::time::Duration::from_secs(600)
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Simulation.

#[test]
fn a_valid_sim_fault_is_accepted() {
    let site = parse(&append(
        "[[sim.faults]]\ndevice = \"pdu-2\"\nlatency_ms = 20\nexception = 6\nstuck_outlets = [3]\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(site.sim.faults.len(), 1);
    let (device, faults) = &site.sim.faults[0];
    assert_eq!(site.device_name(*device), "pdu-2");
    assert_eq!(faults.latency_ms, 20);
    assert_eq!(faults.exception, Some(6));
    assert_eq!(faults.stuck_outlets, vec![3]);
}

#[test]
fn an_unknown_sim_fault_field_is_rejected_naming_the_field() {
    let p = problem_at(
        &append("[[sim.faults]]\ndevice = \"pdu-1\"\nstuck_outlet = [3]\n"),
        "sim.faults[0].stuck_outlet",
    );
    assert_mentions(&p, "unknown field");
}

#[test]
fn a_sim_fault_naming_an_unknown_device_is_rejected_naming_the_field() {
    let p = problem_at(
        &append("[[sim.faults]]\ndevice = \"pdu-7\"\n"),
        "sim.faults[0].device",
    );
    assert_mentions(&p, "pdu-7");
}

#[test]
fn a_bad_sim_exception_code_is_rejected_naming_the_field() {
    let p = problem_at(
        &append("[[sim.faults]]\ndevice = \"site-meter\"\nexception = 7\n"),
        "sim.faults[0].exception",
    );
    assert_mentions(&p, "7");
    problem_at(
        &append("[[sim.faults]]\ndevice = \"site-meter\"\nexception = 0\n"),
        "sim.faults[0].exception",
    );
}

#[test]
fn a_stuck_outlet_beyond_the_pdu_is_rejected_naming_the_field() {
    problem_at(
        &append("[[sim.faults]]\ndevice = \"pdu-1\"\nstuck_outlets = [9]\n"),
        "sim.faults[0].stuck_outlets",
    );
}

#[test]
fn a_sim_gpu_entry_for_an_unknown_rack_is_rejected_naming_the_field() {
    problem_at(
        &append("[[sim.gpu]]\nrack = \"gpu-z\"\nbase_kw = 10.0\n"),
        "sim.gpu[0].rack",
    );
}

// ---------------------------------------------------------------------------------------------
// Several problems, unknown fields, missing files.

#[test]
fn several_mistakes_are_all_reported_each_with_its_own_path() {
    let text = edits(&[
        ("import_limit_kw = 100.0", "import_limit_kw = -5"),
        ("port = 15031", "port = 0"),
        (
            r#"topic = "sites/test/signals""#,
            r#"topic = "sites/+/signals""#,
        ),
        ("rated_w = 3250.0", "rated_w = nan"),
    ]);
    let err = invalid(&text);
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "site.import_limit_kw",
        "pdus[0].port",
        "mqtt.signals[0].topic",
        "asics[0].rated_w",
    ] {
        assert!(paths.contains(&expected), "{expected} missing in {paths:?}");
    }
    assert!(err.problems().len() >= 4, "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{FILE}: {} problems:", err.problems().len())),
        "{shown}"
    );
    for p in err.problems() {
        assert!(shown.contains(&format!("  {}: {}", p.path, p.message)));
    }
}

#[test]
fn an_unknown_field_is_a_parse_error_naming_the_field_and_the_file() {
    let err = invalid(&edit("rated_w = 3250.0", "rated_w = 3250.0\nrated_kW = 1"));
    let ConfigError::Parse { file, message } = &err else {
        panic!("expected ConfigError::Parse, got {err:?}");
    };
    assert_eq!(file, FILE);
    assert!(message.contains("rated_kW"), "{message}");
    assert!(err.problems().is_empty());
    let shown = err.to_string();
    assert!(
        shown.contains(FILE) && shown.contains("rated_kW"),
        "{shown}"
    );
}

#[test]
fn an_unknown_top_level_section_is_a_parse_error_naming_it() {
    let err = invalid(&append("[polcy]\nmin_off_s = 5.0\n"));
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains(FILE) && shown.contains("polcy"), "{shown}");
}

#[test]
fn a_missing_file_is_an_io_error_naming_the_path() {
    let dir = TempDir::new("missing-file");
    let path = dir.0.join("no-such-site.toml");
    let err = site_config::load(&path).expect_err("a missing file must not load");
    let ConfigError::Io { file, source } = &err else {
        panic!("expected ConfigError::Io, got {err:?}");
    };
    assert_eq!(file, &path.display().to_string());
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert!(err.to_string().contains(&path.display().to_string()));
}

// ---------------------------------------------------------------------------------------------
// Shipped sites and extra profiles.

#[test]
fn the_shipped_example_sites_load() {
    let small = site_config::load(concat!(env!("CARGO_MANIFEST_DIR"), "/sites/small.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(small.asics.len(), 34);
    assert_eq!(small.gpu_racks.len(), 2);
    let large = site_config::load(concat!(env!("CARGO_MANIFEST_DIR"), "/sites/large.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(large.pdus.len(), 500);
    assert_eq!(large.asics.len(), 12_000);
    assert_eq!(large.gpu_racks.len(), 8);
    // Another vendor's PDUs through a profile file, and GPU load no meter of its own sees.
    let acme = site_config::load(concat!(env!("CARGO_MANIFEST_DIR"), "/sites/acme.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(acme.asics.len(), 96);
    assert_eq!(
        acme.gpu_racks.len(),
        1,
        "a lab rack; the cluster has no meter"
    );
    assert_eq!(acme.sim.base_load_kw, 240.0);
    let pdu = &acme.pdus[0];
    assert_eq!(pdu.profile.name, "acme-pdu");
    assert_eq!(pdu.profile.relays.address, 0x0400);
    assert_eq!(pdu.endpoint.unit_id, 7);
}

/// A PDU of a vendor gridshed has never seen: relays in holding registers far from zero,
/// outlet power as 32-bit signed values, low word first, in tenths of a watt.
const ACME_PDU: &str = r#"
name = "acme-pdu"
kind = "pdu"
description = "Acme switched PDU"

[relays]
table = "holding"
address = 4000
write = "single"
on_value = 255
off_value = 0

[outlet_power]
table = "holding"
address = 5000
stride = 4
encoding = "i32"
unit = "W"
scale = 0.1
word_order = "low_first"
"#;

#[test]
fn a_new_vendor_profile_file_is_usable_by_a_pdu_without_code_changes() {
    let dir = TempDir::new("new-vendor");
    dir.write("acme-pdu.toml", ACME_PDU);
    let text = format!(
        "profiles = [\"acme-pdu.toml\"]\n{}",
        SITE.replacen(
            "outlets = 8\nprofile = \"generic-pdu\"\n\n[[asics]]",
            "outlets = 8\nprofile = \"acme-pdu\"\n\n[[asics]]",
            1
        )
    );
    assert!(text.contains("profile = \"acme-pdu\""));
    let path = dir.write("site.toml", &text);
    let site = site_config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let pdu = &site.pdus[2];
    assert_eq!(pdu.name, "pdu-gpu");
    assert_eq!(pdu.profile.name, "acme-pdu");
    assert_eq!(pdu.profile.relays.table, RelayTable::Holding);
    assert_eq!(pdu.profile.relays.address, 4000);
    assert_eq!(pdu.profile.relays.on_value, 255);
    assert_eq!(pdu.profile.outlet_power.encoding, Encoding::I32);
    assert_eq!(pdu.profile.outlet_power.word_order, WordOrder::LowFirst);
    assert_eq!(pdu.profile.outlet_power.outlet(3).address, 5008);
    // The other PDUs keep the built-in profile.
    assert_eq!(site.pdus[0].profile.name, "generic-pdu");
    // And the file is a profile like any other.
    assert!(matches!(
        Profile::from_toml("acme-pdu.toml", ACME_PDU),
        Ok(Profile::Pdu(_))
    ));
}

#[test]
fn a_profile_file_with_an_unknown_field_is_reported_under_its_profiles_entry() {
    let dir = TempDir::new("bad-profile");
    dir.write(
        "acme-pdu.toml",
        &ACME_PDU.replacen("write = \"single\"", "write = \"single\"\nwirte = 1", 1),
    );
    let text = format!("profiles = [\"acme-pdu.toml\"]\n{SITE}");
    let path = dir.write("site.toml", &text);
    let err = site_config::load(&path).expect_err("the bad profile must be rejected");
    let shown = err.to_string();
    assert!(shown.contains(&path.display().to_string()), "{shown}");
    let p = err
        .problems()
        .iter()
        .find(|p| p.path == "profiles[0]")
        .unwrap_or_else(|| panic!("no problem at profiles[0]:\n{shown}"));
    assert_mentions(p, "wirte");
    assert_mentions(p, "acme-pdu.toml");
}

#[test]
fn a_profile_file_that_does_not_exist_is_reported_under_its_profiles_entry() {
    let dir = TempDir::new("missing-profile");
    let text = format!("profiles = [\"ok.toml\", \"missing.toml\"]\n{SITE}");
    dir.write("ok.toml", ACME_PDU);
    let path = dir.write("site.toml", &text);
    let err = site_config::load(&path).expect_err("the missing profile must be rejected");
    let p = err
        .problems()
        .iter()
        .find(|p| p.path == "profiles[1]")
        .unwrap_or_else(|| panic!("no problem at profiles[1]:\n{err}"));
    assert_mentions(p, "missing.toml");
}

#[test]
fn a_profile_file_redefining_a_builtin_name_is_reported_under_its_profiles_entry() {
    let dir = TempDir::new("dup-profile");
    dir.write(
        "generic.toml",
        &ACME_PDU.replacen("name = \"acme-pdu\"", "name = \"generic-pdu\"", 1),
    );
    let text = format!("profiles = [\"generic.toml\"]\n{SITE}");
    let path = dir.write("site.toml", &text);
    let err = site_config::load(&path).expect_err("the duplicate profile must be rejected");
    assert!(
        err.problems().iter().any(|p| p.path == "profiles[0]"),
        "{err}"
    );
}

#[test]
fn the_same_ip_written_two_ways_is_the_same_endpoint() {
    let text = with_meter(
        "name = \"a\"\nhost = \"::1\"\nport = 15090\nprofile = \"generic-meter\"\n\n[[meters]]\nname = \"b\"\nhost = \"0:0:0:0:0:0:0:1\"\nport = 15090\nprofile = \"generic-meter\"",
    );
    let p = invalid(&text);
    assert!(p.to_string().contains("both answer at"), "{p}");
}

mod hostile {
    use proptest::prelude::*;
    use std::path::Path;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Mutated copies of the reference site file: the loader answers every one with a site
        /// or an error that names the file, and never panics.
        #[test]
        fn mutated_site_files_never_panic(
            edits in proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..6),
        ) {
            let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sites/small.toml")).unwrap();
            let mut bytes = text.into_bytes();
            for (pos, byte, op) in edits {
                let i = (usize::from(pos) * 7) % (bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ if i < bytes.len() => { bytes.remove(i); }
                    _ => {}
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Err(e) = site_config::parse(Path::new("sites/mutated.toml"), &text) {
                prop_assert!(e.to_string().contains("sites/mutated.toml"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Journal.

#[test]
fn a_site_without_a_journal_section_keeps_no_journal() {
    let site = parse(SITE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(site.journal, None);
}

#[test]
fn a_journal_path_is_taken_relative_to_the_site_file_with_defaults() {
    let site = parse(&append("[journal]\npath = \"state/journal.jsonl\"\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    let j = site.journal.expect("journal");
    assert_eq!(j.path, Path::new("sites/state/journal.jsonl"));
    assert_eq!(j.max_bytes, 64 * 1024 * 1024);
    assert_eq!(j.keep, 10);
    assert_eq!(j.meter_interval, std::time::Duration::from_secs(2));
}

#[test]
fn a_journal_with_an_empty_path_is_rejected_naming_the_field() {
    problem_at(&append("[journal]\npath = \" \"\n"), "journal.path");
}

#[test]
fn journal_sizes_and_intervals_out_of_range_are_rejected_naming_the_field() {
    for (line, field) in [
        ("max_mb = 0", "journal.max_mb"),
        ("keep = 0", "journal.keep"),
        ("meter_interval_s = 0.0", "journal.meter_interval_s"),
        ("meter_interval_s = nan", "journal.meter_interval_s"),
        ("meter_interval_s = 7200.0", "journal.meter_interval_s"),
    ] {
        problem_at(
            &append(&format!("[journal]\npath = \"j.jsonl\"\n{line}\n")),
            field,
        );
    }
}

#[test]
fn an_unknown_journal_key_is_rejected() {
    let e = invalid(&append("[journal]\npath = \"j.jsonl\"\nfsync = false\n"));
    assert!(e.to_string().contains("fsync"), "{e}");
}

// Reporting and the HTTP endpoint.

#[test]
fn reporting_defaults_to_a_five_minute_baseline_and_95_percent_compliance() {
    let site = parse(SITE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        site.reporting.baseline_window,
        std::time::Duration::from_secs(300)
    );
    assert_eq!(site.reporting.compliance_pct, 95.0);
    assert_eq!(site.reporting.report_topic, None);
    assert_eq!(site.http, None);
}

#[test]
fn reporting_values_out_of_range_are_rejected_naming_the_field() {
    for (line, field) in [
        ("baseline_window_s = 0.0", "reporting.baseline_window_s"),
        ("baseline_window_s = nan", "reporting.baseline_window_s"),
        ("baseline_window_s = 3601.0", "reporting.baseline_window_s"),
        ("compliance_pct = 0.0", "reporting.compliance_pct"),
        ("compliance_pct = 101.0", "reporting.compliance_pct"),
        ("report_topic = \"sites/#\"", "reporting.report_topic"),
    ] {
        problem_at(&append(&format!("[reporting]\n{line}\n")), field);
    }
}

#[test]
fn a_report_topic_that_is_also_the_ack_topic_is_rejected() {
    let site = parse(SITE).unwrap_or_else(|e| panic!("{e}"));
    let line = format!("[reporting]\nreport_topic = {:?}\n", site.mqtt.ack_topic);
    problem_at(&append(&line), "reporting.report_topic");
}

#[test]
fn the_http_endpoint_binds_loopback_unless_told_otherwise() {
    let site = parse(&append("[http]\nport = 9464\n")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        site.http.expect("http").listen,
        "127.0.0.1:9464".parse().unwrap()
    );
    let site =
        parse(&append("[http]\nport = 0\nbind = \"::1\"\n")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(site.http.expect("http").listen, "[::1]:0".parse().unwrap());
}

#[test]
fn an_http_bind_that_is_not_an_ip_address_is_rejected_naming_the_field() {
    problem_at(
        &append("[http]\nport = 9464\nbind = \"localhost\"\n"),
        "http.bind",
    );
    let e = invalid(&append("[http]\nport = 70000\n")).to_string();
    assert!(e.contains("port = 70000") && e.contains("u16"), "{e}");
}
