//! Signal intake and publishing over MQTT (rumqttc).
//!
//! One task polls the event loop and does nothing else that could block it: incoming signals
//! go to the engine with `try_send`, subscriptions are renewed with `try_subscribe`. A second
//! task publishes what the engine sends out. The session is persistent (fixed client id,
//! `clean_session = false`) so signals sent while we reconnect are delivered afterwards; when a
//! CONNACK says the broker lost the session, we subscribe again. rumqttc retries a dead broker
//! in a tight loop, so failures are spaced by exponential backoff with jitter, and a second
//! broker URL, if the site file gives one, is tried after repeated failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, StateError,
    TlsConfiguration, Transport,
};
use site_config::{BrokerUrl, Site};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::msg::{Inbound, Outbound, offline_status};

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("environment variable {0} (named by mqtt.{1}) is not set")]
    MissingEnv(String, &'static str),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub use crate::backoff::Backoff;

impl Default for Backoff {
    fn default() -> Self {
        // Capped at one second so a returning broker is found within about a second.
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }
}

/// Connection options for broker `index` of the site file.
pub fn options(site: &Site, index: usize) -> Result<MqttOptions, MqttError> {
    let m = &site.mqtt;
    let broker: &BrokerUrl = &m.brokers[index.min(m.brokers.len() - 1)];
    let mut o = MqttOptions::new(m.client_id.clone(), broker.host.clone(), broker.port);
    o.set_keep_alive(m.keep_alive);
    o.set_clean_session(false);
    // Oversize signals are refused by the parser with a reason; the transport limit sits well
    // above it so that one large message cannot break the connection.
    let limit = (m.max_payload_bytes * 4).max(64 * 1024) + 1024;
    o.set_max_packet_size(limit, limit);
    o.set_last_will(LastWill::new(
        m.status_topic.clone(),
        offline_status(&site.id),
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user_var) = &m.username_env {
        let user = std::env::var(user_var)
            .map_err(|_| MqttError::MissingEnv(user_var.clone(), "username_env"))?;
        let pass = match &m.password_env {
            Some(v) => {
                std::env::var(v).map_err(|_| MqttError::MissingEnv(v.clone(), "password_env"))?
            }
            None => String::new(),
        };
        o.set_credentials(user, pass);
    }
    if broker.tls
        && let Some(tls) = &m.tls
    {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| MqttError::ReadFile {
                path: p.display().to_string(),
                source,
            })
        };
        let ca = read(&tls.ca_file)?;
        let client_auth = match &tls.client_auth {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        };
        o.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(o)
}

/// Installs the TLS crypto provider (ring) once per process; rumqttc is built without one so
/// that the slow aws-lc build is avoided.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs the MQTT link until `cancel`: signals in to `inbound`, `outbound` out to the broker.
pub async fn run(
    site: Arc<Site>,
    inbound: mpsc::Sender<Inbound>,
    outbound: mpsc::Receiver<Outbound>,
    backoff: Backoff,
    cancel: CancellationToken,
) -> Result<(), MqttError> {
    install_crypto_provider();
    let (client, eventloop) = AsyncClient::new(options(&site, 0)?, 1024);
    let publisher = tokio::spawn(publish(client.clone(), outbound, cancel.clone()));
    let result = poll(site, client.clone(), eventloop, inbound, backoff, cancel).await;
    let _ = publisher.await;
    result
}

async fn publish(
    client: AsyncClient,
    mut outbound: mpsc::Receiver<Outbound>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            m = outbound.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        // Awaiting here is fine: this task is not the one polling the event loop.
        if let Err(e) = client
            .publish(msg.topic, QoS::AtLeastOnce, msg.retain, msg.payload)
            .await
        {
            debug!(error = %e, "publish failed");
        }
    }
}

async fn poll(
    site: Arc<Site>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    inbound: mpsc::Sender<Inbound>,
    backoff: Backoff,
    cancel: CancellationToken,
) -> Result<(), MqttError> {
    let brokers = site.mqtt.brokers.len();
    let mut broker = 0;
    let mut failures: u32 = 0;
    // When the connection was last lost (for the line saying it is back).
    let mut lost_at: Option<Instant> = None;
    // Set after a message too large to read: the next connection is a clean session.
    let mut clean_once = false;
    loop {
        // Cancel-safe: EventLoop::poll may be dropped and called again (rumqttc documents it).
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                match lost_at.take() {
                    Some(at) => info!(
                        broker = %site.mqtt.brokers[broker],
                        session_present = ack.session_present,
                        attempts = failures,
                        down_for = ?at.elapsed(),
                        "connected to broker again"
                    ),
                    None => {
                        info!(broker = %site.mqtt.brokers[broker], session_present = ack.session_present, "connected to broker")
                    }
                }
                failures = 0;
                if std::mem::take(&mut clean_once) {
                    eventloop.mqtt_options.set_clean_session(false);
                }
                if !ack.session_present {
                    for s in &site.mqtt.signals {
                        if let Err(e) = client.try_subscribe(s.topic.clone(), QoS::AtLeastOnce) {
                            warn!(topic = %s.topic, error = %e, "cannot queue subscription");
                        }
                    }
                }
                let _ = inbound.try_send(Inbound::Connected);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let msg = Inbound::Signal {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                };
                // Back-pressure, never a drop: while the engine is behind, the event loop
                // waits here, so the broker holds the rest of a burst (it has already
                // delivered this one, which nothing else would remember).
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    sent = inbound.send(msg) => if sent.is_err() { break },
                }
            }
            Ok(_) => {}
            Err(e) => {
                if too_large(&e) {
                    // A persistent session would have the broker deliver the same unreadable
                    // message after every reconnect, for ever: give that session up.
                    warn!(
                        limit_bytes = eventloop.mqtt_options.max_packet_size(),
                        "a message too large to read arrived (it cannot be acknowledged); reconnecting with a clean session to get past it"
                    );
                    eventloop.mqtt_options.set_clean_session(true);
                    clean_once = true;
                }
                failures = failures.saturating_add(1);
                let down_for = lost_at.get_or_insert_with(Instant::now).elapsed();
                let delay = backoff.delay(failures);
                let logged = worth_a_line(failures);
                if logged {
                    let note = if failures == QUIET_AFTER {
                        "broker unreachable; from now on only attempts 8, 16, 32, ... are logged"
                    } else {
                        "broker unreachable"
                    };
                    warn!(broker = %site.mqtt.brokers[broker], attempt = failures, down_for = ?down_for, retry_in = ?delay, error = %short(&e), "{note}");
                } else {
                    debug!(broker = %site.mqtt.brokers[broker], attempt = failures, retry_in = ?delay, error = %short(&e), "broker unreachable");
                }
                if brokers > 1 && failures.is_multiple_of(3) {
                    broker = (broker + 1) % brokers;
                    eventloop.mqtt_options = options(&site, broker)?;
                    if logged {
                        info!(broker = %site.mqtt.brokers[broker], "trying the other broker");
                    } else {
                        debug!(broker = %site.mqtt.brokers[broker], "trying the other broker");
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    // A clean disconnect: the broker does not publish our last will, and the status topic says
    // what it last said. A crash leaves the will ("online": false).
    let _ = client.try_publish(
        site.mqtt.status_topic.clone(),
        QoS::AtLeastOnce,
        true,
        offline_status(&site.id),
    );
    let _ = client.try_disconnect();
    let flush = async {
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = ev {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
    Ok(())
}

/// Attempts logged one by one before the log goes quiet.
const QUIET_AFTER: u32 = 4;

/// Whether failed attempt `n` (from 1) is logged: the first few, then 8, 16, 32, ... so that an
/// outage of hours writes a dozen lines, not thousands (every attempt is logged at debug).
fn worth_a_line(n: u32) -> bool {
    n <= QUIET_AFTER || n.is_power_of_two()
}

/// True when the broker sent a packet larger than our transport limit.
fn too_large(e: &ConnectionError) -> bool {
    matches!(
        e,
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(_)
        ))
    )
}

/// The error, cut to a readable length (a broker may echo long data in an error).
fn short(e: &ConnectionError) -> String {
    e.to_string().chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_outage_logs_a_few_attempts_then_ever_fewer() {
        let logged: Vec<u32> = (1..=3600).filter(|&n| worth_a_line(n)).collect();
        assert_eq!(
            logged,
            [1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
        );
    }
}
