//! `controller`: the gridshed edge controller.
//!
//! Deciding:
//! - [`signal`]: utility signals (native, OpenADR 3.1, maestro) parsed into directives, purely.
//! - [`timeline`]: the directives in force over time, resolved by priority and restriction.
//! - [`replay`]: refuses signals that would bring back an event that has ended.
//! - [`planner`]: `plan(site, snapshot, timeline, now) -> Plan`, pure and deterministic.
//! - [`engine`]: the control loop (sense → plan → actuate), acknowledgements and status.
//!
//! Talking to the world:
//! - [`mqtt`]: the broker link (rumqttc): persistent session, backoff, last will.
//! - [`modbus`]: one task per Modbus endpoint: polls readings, writes batched setpoints.
//! - [`backoff`]: exponential backoff with jitter, shared by the broker and Modbus links.
//! - [`journal`]: the append-only record of signals, plans and readings; what a restart resumes.
//!
//! Measuring and showing:
//! - [`mv`]: measurement and verification: baseline, reduction and compliance of each event.
//! - [`openadr`]: OpenADR 3.1 reports sent upstream (usage, demand, load shed available).
//! - [`series`]: forgetting old readings, rounding what is shown.
//! - [`report`]: `gridshed report`: measured events from a journal, as a table and as CSV.
//! - [`metrics`]: counters, histograms and the last hour of readings, for `/metrics` and `/`.
//! - [`http`]: Prometheus metrics at `/metrics` and the status page at `/`.
pub mod backoff;
pub mod decide;
pub mod engine;
pub mod field;
pub mod journal;
pub mod series;
pub mod show;
pub mod uplink;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Why the controller could not start (or its broker link failed).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Mqtt(#[from] uplink::mqtt::MqttError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Http(#[from] show::http::HttpError),
}

/// What a started controller tells whoever started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// Where metrics and the status page are served (the port chosen, if the site said 0).
    pub http: Option<std::net::SocketAddr>,
}

/// Runs the controller for `site` until `shutdown` completes: the broker link, one Modbus task
/// per endpoint, the engine, and the journal's writer.
///
/// With a journal, the directives it holds are resumed before anything is planned, and the
/// engine reads every outlet before its first plan, so a restart mid-event neither restores an
/// ASIC early nor forgets the event. On shutdown every outlet is left exactly as it is
/// (nothing is switched on the way out), the status topic says the controller is offline, and
/// the journal is on disk.
pub async fn run(
    site: site_config::Site,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    run_with(site, shutdown, |_| {}).await
}

/// [`run`], calling `started` once everything is bound and running.
pub async fn run_with(
    site: site_config::Site,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(Started),
) -> Result<(), RunError> {
    let site = Arc::new(site);
    // Fail early on missing credentials or an unusable journal, before anything is started.
    uplink::mqtt::options(&site, 0)?;
    let (journal, writer, resumed) = match &site.journal {
        Some(config) => {
            let (tx, writer, recovered) = journal::open(config, &site.id, jiff::Timestamp::now())?;
            let events: Vec<&str> = recovered
                .state
                .timeline
                .events()
                .map(|(id, _)| id)
                .collect();
            tracing::info!(
                file = %config.path.display(),
                records = recovered.records,
                skipped = recovered.skipped,
                torn_last_line = recovered.torn,
                ?events,
                "journal read"
            );
            (Some(tx), Some(writer), recovered)
        }
        None => {
            tracing::warn!("no [journal] in the site file: directives will not survive a restart");
            (None, None, journal::Recovered::default())
        }
    };
    let telemetry = Arc::new(show::metrics::Telemetry::default());
    let listener = match site.http {
        Some(h) => Some(show::http::bind(h.listen).await?),
        None => None,
    };
    let cancel = CancellationToken::new();
    let (in_tx, in_rx) = mpsc::channel(1024);
    let (out_tx, out_rx) = mpsc::channel(4096);
    let (report_tx, report_rx) = mpsc::channel(8192);
    let (desired_tx, desired_rx) = watch::channel(field::modbus::Desired::default());

    let mut endpoints = field::modbus::spawn_endpoints(
        &site,
        field::modbus::Timing::for_site(&site),
        desired_rx,
        report_tx,
        &telemetry,
        &cancel,
    );
    let link = tokio::spawn(uplink::mqtt::run(
        site.clone(),
        in_tx,
        out_rx,
        uplink::mqtt::Backoff::default(),
        cancel.clone(),
    ));
    let engine = engine::Engine::new(site.clone(), resumed, journal, telemetry.clone());
    let io = engine::Io {
        inbound: in_rx,
        outbound: out_tx,
        reports: report_rx,
        desired: desired_tx,
    };
    let engine = tokio::spawn(engine.run(io, cancel.clone()));
    let mut http_addr = None;
    let server = listener.map(|l| {
        http_addr = l.local_addr().ok();
        if let Some(addr) = http_addr {
            tracing::info!(url = %format!("http://{addr}/"), metrics = %format!("http://{addr}/metrics"), "status page");
        }
        tokio::spawn(show::http::serve(l, telemetry.clone(), cancel.clone()))
    });
    started(Started { http: http_addr });

    shutdown.await;
    tracing::info!("shutting down");
    cancel.cancel();
    // The engine holds the journal's only sender: once it is gone, the writer drains its queue.
    let _ = engine.await;
    if let Some(writer) = writer {
        let _ = tokio::task::spawn_blocking(move || writer.finish()).await;
    }
    while endpoints.join_next().await.is_some() {}
    if let Some(server) = server {
        let _ = server.await;
    }
    match link.await {
        Ok(r) => Ok(r?),
        Err(_) => Ok(()),
    }
}
