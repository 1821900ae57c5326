//! MQTT brokers for tests and the demo, on free loopback ports: an embedded rumqttd (the
//! default: needs nothing installed) or Mosquitto as a child process (the reference broker).
//!
//! rumqttd's `Broker::start()` swallows bind errors and cannot be stopped, so the embedded broker
//! drives rumqttd's `Router` and `Server` itself, on a thread with its own runtime: the first poll
//! of the server binds its listener (an error surfaces there), and dropping the runtime closes
//! every client connection. rumqttd cannot listen on port 0 and say which port it got, so a free
//! port is found first and the bind retried if another process takes it in between.

use std::error::Error as _;
use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};

/// A running broker; stopped when dropped.
pub enum Broker {
    Embedded(Embedded),
    Mosquitto(Mosquitto),
}

impl Broker {
    /// An embedded rumqttd on a free loopback port.
    pub fn embedded() -> io::Result<Broker> {
        let router = RouterHandle::spawn();
        Embedded::start(router, "127.0.0.1:0".parse().expect("literal")).map(Broker::Embedded)
    }

    /// Mosquitto on a free loopback port, or `None` when it is not installed (outside CI).
    pub fn mosquitto() -> Option<io::Result<Broker>> {
        Self::mosquitto_with("")
    }

    /// Mosquitto with extra configuration lines (more listeners, TLS, a password file).
    pub fn mosquitto_with(extra: &str) -> Option<io::Result<Broker>> {
        let bin = crate::tools::require("mosquitto")?;
        Some(Mosquitto::start(bin, None, extra).map(Broker::Mosquitto))
    }

    /// Mosquitto with a second listener, on a free port, that takes only `user` with
    /// `password` (the first stays anonymous, for test clients). Returns the broker and that
    /// port; `None` when Mosquitto or mosquitto_passwd is missing (outside CI).
    pub fn mosquitto_with_password(
        user: &str,
        password: &str,
    ) -> Option<io::Result<(Broker, u16)>> {
        let passwd = crate::tools::require("mosquitto_passwd")?;
        let setup = || -> io::Result<(String, u16)> {
            let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let dir =
                std::env::temp_dir().join(format!("gridshed-passwd-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let file = dir.join("passwd");
            let ok = Command::new(passwd)
                .args(["-b", "-c"])
                .arg(&file)
                .args([user, password])
                .status()?;
            if !ok.success() {
                return Err(io::Error::other("mosquitto_passwd failed"));
            }
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
            }
            // Mosquitto 2: per-listener authentication, for the second listener only.
            let extra = format!(
                "per_listener_settings true\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
                file.display()
            );
            Ok((extra, port))
        };
        let (extra, port) = match setup() {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        Some(Self::mosquitto_with(&extra)?.map(|b| (b, port)))
    }

    pub fn port(&self) -> u16 {
        match self {
            Broker::Embedded(b) => b.addr.port(),
            Broker::Mosquitto(m) => m.port,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }

    /// Stops the broker, keeping what is needed to start it again on the same port (for
    /// outage tests): rumqttd's router (sessions, retained messages) or Mosquitto's config.
    pub fn stop(&mut self) {
        match self {
            Broker::Embedded(b) => b.shutdown(),
            Broker::Mosquitto(m) => m.kill(),
        }
    }

    /// Starts the stopped broker again on the same port. The embedded broker keeps its sessions
    /// unless `forget_sessions`; Mosquitto (persistence off) always forgets them.
    pub fn restart(&mut self, forget_sessions: bool) -> io::Result<()> {
        match self {
            Broker::Embedded(b) => {
                let router = if forget_sessions {
                    RouterHandle::spawn()
                } else {
                    b.router.clone()
                };
                let again = Embedded::start(router, b.addr)?;
                *b = again;
                Ok(())
            }
            Broker::Mosquitto(m) => {
                let again = Mosquitto::start(m.bin.clone(), Some(m.port), &m.extra)?;
                *m = again;
                Ok(())
            }
        }
    }
}

/// A rumqttd router and a way to make servers for it. The router thread lives for the process
/// (rumqttd gives no way to end it); servers come and go.
#[derive(Clone)]
pub struct RouterHandle(Arc<dyn Fn(ServerSettings) -> Server<V4> + Send + Sync>);

impl RouterHandle {
    pub fn spawn() -> RouterHandle {
        let config = RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        // `Router::spawn` returns a sender whose event type rumqttd does not export: keep it in
        // a closure that makes servers.
        let tx = Router::new(0, config).spawn();
        RouterHandle(Arc::new(move |s| Server::new(s, tx.clone(), V4)))
    }
}

fn server_settings(listen: SocketAddr) -> ServerSettings {
    ServerSettings {
        name: "gridshed-embedded".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 5_000,
            // Large enough that the controller, not the broker, is what refuses oversize signals.
            max_payload_size: 1024 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

pub struct Embedded {
    addr: SocketAddr,
    router: RouterHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Embedded {
    /// Starts a server for `router` at `addr`; port 0 picks a free port.
    pub fn start(router: RouterHandle, addr: SocketAddr) -> io::Result<Embedded> {
        if addr.port() != 0 {
            return Self::start_exact(router, addr);
        }
        let mut last = io::Error::other("no free port");
        for _ in 0..10 {
            let port = StdListener::bind(addr)?.local_addr()?.port();
            match Self::start_exact(router.clone(), SocketAddr::new(addr.ip(), port)) {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
                r => return r,
            }
        }
        Err(last)
    }

    fn start_exact(router: RouterHandle, addr: SocketAddr) -> io::Result<Embedded> {
        let mut server = (router.0)(server_settings(addr));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("mqtt-broker-{}", addr.port()))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut serving = Box::pin(async move { server.start(LinkType::Remote).await });
                    // The first poll binds the listener: Ready means it failed, Pending that it
                    // is accepting connections.
                    let first =
                        std::future::poll_fn(|cx| Poll::Ready(serving.as_mut().poll(cx))).await;
                    if let Poll::Ready(result) = first {
                        let err = match result {
                            Err(e) => {
                                let kind = e
                                    .source()
                                    .and_then(|s| s.downcast_ref::<io::Error>())
                                    .map_or(io::ErrorKind::Other, io::Error::kind);
                                io::Error::new(kind, format!("rumqttd: {e}"))
                            }
                            Ok(()) => io::Error::other("rumqttd stopped at once"),
                        };
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                    let _ = ready_tx.send(Ok(()));
                    tokio::select! {
                        _ = serving => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime drops every connection task: clients see the broker go.
                drop(rt);
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Embedded {
                addr,
                router,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other("broker thread ended before binding")),
        }
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Mosquitto as a child process with a config of our own.
pub struct Mosquitto {
    bin: PathBuf,
    port: u16,
    extra: String,
    child: Option<Child>,
    dir: PathBuf,
}

impl Mosquitto {
    /// Starts Mosquitto on `port` (a free one when `None`) with `extra` config lines, and waits
    /// until it logs that it is running.
    pub fn start(bin: PathBuf, port: Option<u16>, extra: &str) -> io::Result<Mosquitto> {
        if let Some(port) = port {
            return Self::start_on(bin, port, extra);
        }
        // A port found free can be taken by another test (every rig binds ephemeral ports)
        // before Mosquitto binds it: then try another.
        let mut attempt = 0;
        loop {
            let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
            match Self::start_on(bin.clone(), port, extra) {
                Err(e) if attempt < 5 && e.to_string().contains("Address already in use") => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_on(bin: PathBuf, port: u16, extra: &str) -> io::Result<Mosquitto> {
        let dir =
            std::env::temp_dir().join(format!("gridshed-mosquitto-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("mosquitto.conf");
        // per_listener_settings must precede every other security setting.
        let (global, rest): (Vec<&str>, Vec<&str>) = extra
            .lines()
            .partition(|l| l.trim_start().starts_with("per_listener_settings"));
        std::fs::write(
            &conf,
            format!(
                "{}\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
                 {}\n",
                global.join("\n"),
                rest.join("\n")
            ),
        )?;
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("no stderr"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut log = String::new();
            let mut told = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !told && line.contains(" running") {
                    let _ = tx.send(Ok(()));
                    told = true;
                }
                if !told {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
            if !told {
                let _ = tx.send(Err(log));
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Mosquitto {
                bin,
                port,
                extra: extra.to_owned(),
                child: Some(child),
                dir,
            }),
            Ok(Err(log)) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(io::Error::other(format!("mosquitto did not start:\n{log}")))
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(io::Error::other(
                    "mosquitto did not report running within 10 s",
                ))
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
