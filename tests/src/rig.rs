//! The whole loop on one machine: a broker, firmware-sim serving a site, the controller, and an
//! MQTT client playing the utility. Everything on free loopback ports; everything stoppable.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use firmware_sim::{Bind, Sim, SimOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use site_config::{BrokerUrl, Site};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::broker::Broker;

/// Which broker a rig runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// A message seen by the test client.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub json: Value,
    pub at: Instant,
}

/// An MQTT client for tests: publishes signals, records everything on the topics it watches.
pub struct Client {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Seen>,
    /// Everything received so far, in order.
    pub seen: Vec<Seen>,
    task: JoinHandle<()>,
}

impl Client {
    /// Connects to `port` and subscribes to `topics`; returns once the subscriptions are acknowledged.
    pub async fn connect(port: u16, topics: &[&str]) -> Client {
        let mut o = MqttOptions::new(unique("hil-utility"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, 256);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let expected = topics.len();
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let resubscribe = client.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut subacks = 0;
            loop {
                match eventloop.poll().await {
                    // Subscribe on every connection the broker does not remember (a broker
                    // restarted in an outage test forgets us).
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                        for t in &topics {
                            let _ = resubscribe.try_subscribe(t.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks >= expected
                            && let Some(r) = ready.take()
                        {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let _ = tx.send(Seen {
                            topic: p.topic,
                            json,
                            at: Instant::now(),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("test client subscribed within 10 s")
            .expect("test client task alive");
        Client {
            client,
            rx,
            seen: Vec::new(),
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue publish");
    }

    /// Waits for a message on `topic` that satisfies `pred`, looking first at what has already
    /// arrived since `from` (an index into [`Client::seen`]).
    pub async fn wait_from(
        &mut self,
        from: usize,
        topic: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Seen {
        if let Some(s) = self.seen[from.min(self.seen.len())..]
            .iter()
            .find(|s| s.topic == topic && pred(&s.json))
        {
            return s.clone();
        }
        let deadline = Instant::now() + limit;
        loop {
            let Ok(Some(s)) = tokio::time::timeout_at(deadline, self.rx.recv()).await else {
                let last: Vec<&Value> = self
                    .seen
                    .iter()
                    .rev()
                    .filter(|s| s.topic == topic)
                    .take(3)
                    .map(|s| &s.json)
                    .collect();
                panic!("no matching message on {topic} within {limit:?}; last seen: {last:#?}");
            };
            self.seen.push(s.clone());
            if s.topic == topic && pred(&s.json) {
                return s;
            }
        }
    }

    /// Takes in whatever has arrived without waiting.
    pub fn drain(&mut self) {
        while let Ok(s) = self.rx.try_recv() {
            self.seen.push(s);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Policy timings sized for tests: half-second minimum on/off times, batches of 8 every 0.3 s,
/// and a 12 s window: the shortest that covers small.toml's GPU swings (0.7 s and 1.5 s
/// periods crest together every 10.5 s), so estimates are warm 12 s after start-up.
pub fn fast_policy(site: &mut Site) {
    site.policy.min_off = Duration::from_millis(500);
    site.policy.min_on = Duration::from_millis(500);
    site.policy.restore_interval = Duration::from_millis(300);
    site.policy.restore_batch_size = 8;
    site.policy.gpu_peak_window = Duration::from_secs(12);
}

/// Fetches `path` from the controller's HTTP endpoint: (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the http endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_owned())
}

/// Gives `site` a journal in a fresh temporary directory; returns the journal's path.
pub fn journal_in_temp(site: &mut Site) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("gridshed-journal"));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("journal.jsonl");
    site.journal = Some(site_config::Journal {
        path: path.clone(),
        max_bytes: 64 << 20,
        keep: 3,
        meter_interval: Duration::from_secs(1),
    });
    path
}

/// Shows the controller's and simulator's logs in test output when RUST_LOG is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A complete hardware-in-loop rig.
pub struct Rig {
    pub broker: Broker,
    pub sim: Sim,
    /// The site as the controller sees it: the simulator's ports, the test broker.
    pub site: Site,
    pub utility: Client,
    /// Where the running controller serves metrics and its status page.
    pub http: Option<std::net::SocketAddr>,
    controller: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Rig {
    /// Starts broker, simulator and controller for `site_file` (in config/sites), after letting
    /// `adjust` change the site (shorter policy times for tests, say). Returns `None` when the
    /// Mosquitto rig is asked for and Mosquitto is not installed (outside CI).
    pub async fn start(
        site_file: &str,
        kind: BrokerKind,
        adjust: impl FnOnce(&mut Site),
    ) -> Option<Rig> {
        let broker = match kind {
            BrokerKind::Embedded => Broker::embedded().expect("embedded broker starts"),
            BrokerKind::Mosquitto => Broker::mosquitto()?.expect("mosquitto starts"),
        };
        Some(Rig::start_on(broker, site_file, adjust).await)
    }

    /// Like [`Rig::start`] on a broker of the test's making. `adjust` sees the site with the
    /// simulator's ports and `broker` as its only broker already set, so it may change the MQTT
    /// settings too (TLS, credentials, a fallback URL).
    pub async fn start_on(broker: Broker, site_file: &str, adjust: impl FnOnce(&mut Site)) -> Rig {
        Rig::start_site(broker, crate::site::load(site_file), adjust).await
    }

    /// Like [`Rig::start_on`] for a site the test has made itself.
    pub async fn start_site(broker: Broker, site: Site, adjust: impl FnOnce(&mut Site)) -> Rig {
        init_logging();
        let options = SimOptions {
            bind: Bind::Ephemeral,
            ..SimOptions::default()
        };
        let sim = Sim::start(&site, options)
            .await
            .expect("firmware-sim starts");
        let mut site = sim.site().clone();
        site.mqtt.brokers = vec![BrokerUrl {
            tls: false,
            host: "127.0.0.1".into(),
            port: broker.port(),
        }];
        site.mqtt.client_id = unique("gridshed");
        site.http = Some(site_config::Http {
            listen: (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        });
        adjust(&mut site);
        let watch = [
            site.mqtt.ack_topic.as_str(),
            site.mqtt.status_topic.as_str(),
        ];
        let utility = Client::connect(broker.port(), &watch).await;
        let mut rig = Rig {
            broker,
            sim,
            site,
            utility,
            http: None,
            controller: None,
        };
        rig.start_controller().await;
        rig
    }

    /// Starts the controller and waits until it has published an online status with a plan.
    pub async fn start_controller(&mut self) {
        let (tx, rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let site = self.site.clone();
        let handle = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            let started = |s: controller::Started| {
                let _ = started_tx.send(s);
            };
            if let Err(e) = controller::run_with(site, shutdown, started).await {
                panic!("controller failed: {e}");
            }
        });
        self.controller = Some((tx, handle));
        self.http = started_rx.await.expect("controller started").http;
        let from = self.utility.seen.len();
        let status = self.site.mqtt.status_topic.clone();
        self.utility
            .wait_from(from, &status, Duration::from_secs(15), |s| {
                s["online"] == true
            })
            .await;
    }

    /// Stops the controller gracefully (outlets stay as they are).
    pub async fn stop_controller(&mut self) {
        if let Some((tx, handle)) = self.controller.take() {
            let _ = tx.send(());
            let _ = handle.await;
        }
    }

    /// Publishes `payload` on the site's signal topic of `format`.
    pub async fn signal(&self, format: site_config::SignalFormat, payload: impl Into<Vec<u8>>) {
        let topic = &self
            .site
            .mqtt
            .signals
            .iter()
            .find(|s| s.format == format)
            .expect("the site has a topic for this format")
            .topic;
        self.utility.publish(topic, payload).await;
    }

    /// Waits for an acknowledgement with `id` and `status` published after index `from`.
    pub async fn ack(&mut self, from: usize, id: &str, status: &str, limit: Duration) -> Value {
        let topic = self.site.mqtt.ack_topic.clone();
        self.utility
            .wait_from(from, &topic, limit, |a| {
                a["id"] == id && a["status"] == status
            })
            .await
            .json
    }

    /// Site meter reading from the simulator, kW.
    pub fn site_kw(&self) -> f64 {
        let name = self.site.meter(self.site.site_meter).name.clone();
        self.sim.meter_kw(&name).expect("site meter")
    }

    /// Number of ASIC outlets whose relay is on.
    pub fn asics_on(&self) -> usize {
        let mut on = 0;
        for a in &self.site.asics {
            let pdu = &self.site.pdu(a.pdu).name;
            if self.sim.outlets(pdu).expect("pdu")[usize::from(a.outlet) - 1].relay_on {
                on += 1;
            }
        }
        on
    }

    /// Writes received by every device that gridshed must never write (GPU rack meters, the
    /// site meter, PDUs that only feed GPU racks).
    pub fn protected_writes(&self) -> u64 {
        self.site
            .devices()
            .filter(|d| self.site.is_protected(*d))
            .map(|d| self.sim.writes(self.site.device_name(d)).expect("device"))
            .sum()
    }

    /// Waits until the controller holds `span` of site readings (baselines and the status
    /// page's chart come from them); returns its `/api/status` then.
    pub async fn readings_for(&self, span: Duration) -> Value {
        let addr = self.http.expect("the rig serves http");
        let deadline = Instant::now() + Duration::from_secs(15) + span;
        loop {
            let (_, body) = http_get(addr, "/api/status").await;
            let view: Value = serde_json::from_str(&body).expect("status json");
            let times: Vec<i64> = view["history"]
                .as_array()
                .map(|h| h.iter().filter_map(|p| p[0].as_i64()).collect())
                .unwrap_or_default();
            if let (Some(first), Some(last)) = (times.first(), times.last())
                && u128::try_from(last - first).unwrap_or(0) >= span.as_millis()
            {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "no {span:?} of readings: {view:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `check` holds on the rig, polling every 10 ms, failing after `limit`.
    pub async fn until(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&Rig) -> bool,
    ) -> Duration {
        let start = Instant::now();
        while !check(self) {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.controller.take() {
            let _ = tx.send(());
            handle.abort();
        }
    }
}
