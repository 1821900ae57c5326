//! `controller`: the gridshed edge controller.
//!
//! One cycle, sense → decide → act, with the deciding kept pure:
//!
//! ```text
//!   sense                          decide (pure)                 act
//!   field::modbus reads ──Reading──▶                ──Orders──▶ field::modbus writes
//!   uplink::mqtt signals ─Inbound──▶ decide::core  ──Ack, Status──▶ uplink::mqtt
//!                                  (via shell)     ──Record──▶ journal
//! ```
//!
//! - [`decide`]: the control core and what it decides with: signals, timeline, replay
//!   protection, device health, outlet tracking and write verification, load estimates, the
//!   planner, measurement. No I/O, no tokio, no clock.
//! - [`shell`]: the async loop around the core: the clock, the channels, applying effects.
//! - [`field`]: Modbus: the request codec ([`field::protocol`], pure) and one task per endpoint.
//! - [`uplink`]: the broker link (rumqttc): persistent session, backoff, last will.
//! - [`journal`]: the append-only record on disk; what a restart resumes.
//! - [`show`]: metrics, the status page, and `gridshed report`.
//! - [`msg`]: the messages these parts exchange (a leaf: it depends on none of them).
//! - [`backoff`], [`series`]: small helpers.
pub mod backoff;
pub mod decide;
pub mod field;
pub mod journal;
pub mod msg;
pub mod series;
pub mod shell;
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
            let (tx, writer, recovered) =
                journal::open(config, &site.id, &site.policy, jiff::Timestamp::now())?;
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
    let (reading_tx, reading_rx) = mpsc::channel(8192);
    let (orders_tx, orders_rx) = watch::channel(msg::Orders::default());

    let mut endpoints = field::modbus::spawn_endpoints(
        &site,
        field::modbus::Timing::for_site(&site),
        orders_rx,
        reading_tx,
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
    let clock = shell::Clock::start();
    telemetry.seed(&resumed.samples);
    let core = decide::core::Core::new(site.clone(), resumed.state, resumed.samples, clock.now());
    let io = shell::Io {
        inbound: in_rx,
        outbound: out_tx,
        readings: reading_rx,
        orders: orders_tx,
    };
    let engine = tokio::spawn(shell::run(
        core,
        site.clone(),
        io,
        journal,
        telemetry.clone(),
        clock,
        cancel.clone(),
    ));
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
