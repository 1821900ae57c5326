//! `hil`: the hardware-in-loop harness. It starts firmware-sim for a site file on free loopback
//! ports and gives tests what they need to drive and inspect it; the tests live in `tests/`.
//!
//! - [`broker`]: an embedded rumqttd or a Mosquitto child process on a free loopback port.
//! - [`plot`]: the demo's SVG chart of site, ASIC and GPU power against the limit.
//! - [`rig`]: broker + firmware-sim + controller + a utility client, for end-to-end tests.
//! - [`simulate`]: deterministic simulation of whole sites: the controller's pure core against
//!   firmware-sim's physics on virtual time, with faults from a seed and invariants checked.
//! - [`site`]: the example site files, loaded.
//! - [`modbus`]: a tokio-modbus client connected to a simulated device by name.
//! - [`tools`]: third-party programs (mbpoll, mosquitto) that some tests need: skipped when
//!   missing, required when `CI=true`.

/// Generates, for each named `async fn(BrokerKind)` in scope, a module with two tests:
/// `embedded` (rumqttd in process) and `mosquitto` (skipped when Mosquitto is missing, required
/// under CI=true).
#[macro_export]
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name($crate::rig::BrokerKind::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                super::$name($crate::rig::BrokerKind::Mosquitto).await
            }
        }
    )*};
}

pub mod broker;
pub mod plot;
pub mod rig;
pub mod simulate;

pub mod site {
    use std::path::PathBuf;

    /// Path of a file in `config/sites/`.
    pub fn path(name: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/sites")).join(name)
    }

    /// The text of an example site with every device port shifted by `offset` and the broker
    /// URL set to `broker_port`, so the same site can be served and controlled from a file on
    /// free ports; its metrics endpoint, if any, takes a free port.
    pub fn text_with_port_offset(name: &str, offset: u16, broker_port: u16) -> String {
        let text = std::fs::read_to_string(path(name)).expect("site file");
        let mut section = String::new();
        text.lines()
            .map(|line| {
                let t = line.trim_start();
                if t.starts_with('[') {
                    section = t.to_owned();
                }
                if section == "[http]" && t.starts_with("port = ") {
                    return "port = 0".to_owned();
                }
                if let Some(rest) = t.strip_prefix("port = ") {
                    let (num, comment) = rest.split_once(' ').unwrap_or((rest, ""));
                    if let Ok(p) = num.parse::<u16>() {
                        return format!("port = {} {comment}", p + offset);
                    }
                }
                if t.starts_with("urls = ") {
                    return format!("urls = [\"mqtt://127.0.0.1:{broker_port}\"]");
                }
                line.to_owned()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Loads an example site; panics with the config error (tests only).
    pub fn load(name: &str) -> site_config::Site {
        site_config::load(path(name)).unwrap_or_else(|e| panic!("{e}"))
    }
}

pub mod modbus {
    use std::net::SocketAddr;

    use site_config::Site;
    use tokio_modbus::client::{Context, tcp};
    use tokio_modbus::prelude::SlaveContext;

    /// The loopback address a device of `site` answers at.
    pub fn addr(site: &Site, device: &str) -> SocketAddr {
        let id = site
            .device_by_name(device)
            .unwrap_or_else(|| panic!("no device {device:?}"));
        let ep = site.device_endpoint(id);
        let ip = if ep.host == "localhost" {
            "127.0.0.1"
        } else {
            &ep.host
        };
        SocketAddr::new(ip.parse().expect("loopback IP"), ep.port)
    }

    /// A Modbus TCP client talking to `device`'s unit id.
    pub async fn connect(site: &Site, device: &str) -> Context {
        let id = site.device_by_name(device).expect("device");
        let unit = site.device_endpoint(id).unit_id;
        let mut ctx = tcp::connect(addr(site, device)).await.expect("connect");
        ctx.set_slave(tokio_modbus::Slave(unit));
        ctx
    }
}

pub mod tools {
    use std::path::PathBuf;

    /// True under `CI=true` (or `CI=1`): tools that tests may skip without are required.
    pub fn ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
    }

    /// Finds `program` on PATH. When it is missing the test is skipped (returns `None`), except
    /// under `CI=true`, where a missing tool fails the test: CI must have run it.
    pub fn require(program: &str) -> Option<PathBuf> {
        // Debian installs daemons such as mosquitto in sbin, which a non-login PATH may lack.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let sbin = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
        let found = std::env::split_paths(&path)
            .chain(sbin)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file());
        if found.is_none() {
            assert!(
                !ci(),
                "{program} is required under CI=true but is not installed"
            );
            eprintln!("skipping: {program} is not installed (apt-get install {program})");
        }
        found
    }
}
