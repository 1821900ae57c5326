//! `controller`: the gridshed edge controller.
//!
//! - [`signal`]: utility signals (native, OpenADR 3.1, maestro) parsed into directives, purely.
//! - [`timeline`]: the directives in force over time, resolved by priority and restriction.
//! - [`backoff`]: exponential backoff with jitter, shared by the broker and Modbus links.
//! - [`engine`]: the control loop (sense → plan → actuate), acknowledgements and status.
//! - [`mqtt`]: the broker link (rumqttc): persistent session, backoff, last will.
//! - [`modbus`]: one task per Modbus endpoint: polls readings, writes batched setpoints.
//! - [`planner`]: `plan(site, snapshot, timeline, now) -> Plan`, pure and deterministic.
pub mod backoff;
pub mod engine;
pub mod modbus;
pub mod mqtt;
pub mod planner;
pub mod signal;
pub mod timeline;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Runs the controller for `site` until `shutdown` completes: the broker link, one Modbus task
/// per endpoint, and the engine. On shutdown every outlet is left exactly as it is (nothing is
/// switched on the way out) and the status topic says the controller is offline.
pub async fn run(
    site: site_config::Site,
    shutdown: impl Future<Output = ()>,
) -> Result<(), mqtt::MqttError> {
    let site = Arc::new(site);
    // Fail early on missing credentials, before anything is started.
    mqtt::options(&site, 0)?;
    let cancel = CancellationToken::new();
    let (in_tx, in_rx) = mpsc::channel(1024);
    let (out_tx, out_rx) = mpsc::channel(4096);
    let (report_tx, report_rx) = mpsc::channel(8192);
    let (desired_tx, desired_rx) = watch::channel(modbus::Desired::default());

    let mut endpoints = modbus::spawn_endpoints(
        &site,
        modbus::Timing::for_site(&site),
        desired_rx,
        report_tx,
        &cancel,
    );
    let link = tokio::spawn(mqtt::run(
        site.clone(),
        in_tx,
        out_rx,
        mqtt::Backoff::default(),
        cancel.clone(),
    ));
    let engine = engine::Engine::new(site.clone());
    let io = engine::Io {
        inbound: in_rx,
        outbound: out_tx,
        reports: report_rx,
        desired: desired_tx,
    };
    let engine = tokio::spawn(engine.run(io, cancel.clone()));

    shutdown.await;
    tracing::info!("shutting down");
    cancel.cancel();
    let _ = engine.await;
    while endpoints.join_next().await.is_some() {}
    match link.await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}
