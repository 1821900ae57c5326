//! The simulated site at run time: every device of a site file behind loopback Modbus TCP,
//! a physics clock, fault injection and counters, and a handle for tests to look inside.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use site_config::{DeviceId, Faults, Site};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use crate::device::Load;
use crate::handler::{self, Device};
use crate::plant::{self, Answer, SitePhysics, stuck_mask};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("device {device:?}: {reason}")]
    Device { device: String, reason: String },
    #[error(
        "firmware-sim serves loopback only: {host:?} (device {device:?}) is not 127.0.0.0/8, ::1 or localhost"
    )]
    NotLoopback { host: String, device: String },
    #[error("port {port} + offset {offset} for device {device:?} is outside 1..=65535")]
    PortOutOfRange {
        port: u16,
        offset: i32,
        device: String,
    },
    #[error("cannot listen on {addr} (device {device:?}): {source}")]
    Bind {
        addr: SocketAddr,
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("no device named {0:?}")]
    NoSuchDevice(String),
}

/// Where the simulator listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// The ports the site file names, shifted by an offset (for running two sims side by side).
    AsConfigured { port_offset: i32 },
    /// A free port for every endpoint, chosen by the OS; [`Sim::site`] says which.
    Ephemeral,
}

#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    pub bind: Bind,
    /// How often physics advances (relays, ramps, GPU swings, the site meter).
    pub tick: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            bind: Bind::AsConfigured { port_offset: 0 },
            tick: Duration::from_millis(50),
        }
    }
}

/// One simulated device with its faults and counters.
#[derive(Debug)]
pub(crate) struct SimDevice {
    name: String,
    unit_id: u8,
    state: Mutex<Device>,
    faults: Mutex<Faults>,
    /// Write requests received, whatever became of them.
    writes: AtomicU64,
    /// Every request received.
    requests: AtomicU64,
    /// When the last write was answered successfully (for latency measurements).
    last_write: Mutex<Option<Instant>>,
    /// What a frozen meter keeps answering from: its state when it froze.
    frozen: Mutex<Option<Device>>,
}

impl SimDevice {
    fn state(&self) -> MutexGuard<'_, Device> {
        // A poisoned lock only means a test thread panicked while looking; the state is plain data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Freezes (a copy of the device as it is now answers from then on) or thaws it.
    fn freeze(&self, frozen: bool) {
        let snapshot = frozen.then(|| self.state().clone());
        *self.frozen.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }
}

/// A running simulated site. Dropping it stops every server.
#[derive(Debug)]
pub struct Sim {
    site: Site,
    devices: Arc<Vec<Arc<SimDevice>>>,
    by_name: BTreeMap<String, usize>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Sim {
    /// Builds every device of `site`, binds its endpoints and starts serving.
    pub async fn start(site: &Site, options: SimOptions) -> Result<Sim, SimError> {
        let devices = build_devices(site)?;
        // Meters read true values from the first request on.
        let mut plant = SitePhysics::new(site);
        plant.advance(devices.len(), |i| devices[i].state(), 0.0);
        for d in &devices {
            if d.faults().frozen {
                d.freeze(true);
            }
        }
        let mut site = site.clone();
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();

        // One listener per host:port; devices behind it are told apart by unit id.
        let mut endpoints: BTreeMap<(String, u16), Vec<usize>> = BTreeMap::new();
        for (i, id) in site.devices().enumerate() {
            let ep = site.device_endpoint(id);
            endpoints
                .entry((ep.host.clone(), ep.port))
                .or_default()
                .push(i);
        }
        let ids: Vec<DeviceId> = site.devices().collect();
        for ((host, port), members) in endpoints {
            let device = &devices[members[0]].name;
            let ip = loopback_ip(&host).ok_or_else(|| SimError::NotLoopback {
                host: host.clone(),
                device: device.clone(),
            })?;
            let bind_port = match options.bind {
                Bind::Ephemeral => 0,
                Bind::AsConfigured { port_offset } => {
                    let p = i32::from(port) + port_offset;
                    u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
                        SimError::PortOutOfRange {
                            port,
                            offset: port_offset,
                            device: device.clone(),
                        }
                    })?
                }
            };
            let addr = SocketAddr::new(ip, bind_port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| SimError::Bind {
                    addr,
                    device: device.clone(),
                    source,
                })?;
            let actual = listener.local_addr().map_err(|source| SimError::Bind {
                addr,
                device: device.clone(),
                source,
            })?;
            for &m in &members {
                set_port(&mut site, ids[m], actual.port());
            }
            let unit_devices: Arc<[Arc<SimDevice>]> =
                members.iter().map(|&m| devices[m].clone()).collect();
            tasks.spawn(serve(listener, unit_devices, cancel.clone()));
        }

        let devices = Arc::new(devices);
        tasks.spawn(physics(
            plant,
            devices.clone(),
            options.tick,
            cancel.clone(),
        ));
        let by_name = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i))
            .collect();
        Ok(Sim {
            site,
            devices,
            by_name,
            cancel,
            tasks,
        })
    }

    /// The site as served: the site file with the ports actually bound.
    pub fn site(&self) -> &Site {
        &self.site
    }

    fn device(&self, name: &str) -> Result<&SimDevice, SimError> {
        self.by_name
            .get(name)
            .and_then(|&i| self.devices.get(i))
            .map(|d| d.as_ref())
            .ok_or_else(|| SimError::NoSuchDevice(name.to_owned()))
    }

    /// Replaces a device's faults, effective from its next request.
    pub fn set_faults(&self, name: &str, faults: Faults) -> Result<(), SimError> {
        let d = self.device(name)?;
        if let Device::Pdu(pdu) = &mut *d.state() {
            pdu.set_stuck(stuck_mask(&faults.stuck_outlets));
        }
        d.freeze(faults.frozen);
        *d.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
        Ok(())
    }

    /// Clears every fault of every device.
    pub fn clear_faults(&self) {
        for d in self.devices.iter() {
            if let Device::Pdu(pdu) = &mut *d.state() {
                pdu.set_stuck(0);
            }
            *d.faults.lock().unwrap_or_else(|e| e.into_inner()) = Faults::default();
            d.freeze(false);
        }
    }

    /// Write requests the device has received (answered or not).
    pub fn writes(&self, name: &str) -> Result<u64, SimError> {
        Ok(self.device(name)?.writes.load(Ordering::Relaxed))
    }

    /// When the device last answered a write successfully.
    pub fn last_write(&self, name: &str) -> Result<Option<Instant>, SimError> {
        Ok(*self
            .device(name)?
            .last_write
            .lock()
            .unwrap_or_else(|e| e.into_inner()))
    }

    /// Requests of any kind the device has received.
    pub fn requests(&self, name: &str) -> Result<u64, SimError> {
        Ok(self.device(name)?.requests.load(Ordering::Relaxed))
    }

    /// Every device's write count, by name.
    pub fn all_writes(&self) -> BTreeMap<String, u64> {
        self.devices
            .iter()
            .map(|d| (d.name.clone(), d.writes.load(Ordering::Relaxed)))
            .collect()
    }

    /// A PDU's outlets as they are now (outlet 1 first).
    pub fn outlets(&self, pdu: &str) -> Result<Vec<OutletView>, SimError> {
        match &*self.device(pdu)?.state() {
            Device::Pdu(p) => Ok(p
                .outlets()
                .iter()
                .map(|o| OutletView {
                    relay_on: o.relay_on,
                    power_w: o.power_w,
                    toggles: o.toggles,
                    commands: o.commands,
                })
                .collect()),
            Device::Meter(_) => Err(SimError::Device {
                device: pdu.to_owned(),
                reason: "is a meter, not a PDU".into(),
            }),
        }
    }

    /// What a meter reads now, in kW.
    pub fn meter_kw(&self, meter: &str) -> Result<f64, SimError> {
        match &*self.device(meter)?.state() {
            Device::Meter(m) => Ok(m.power_kw()),
            Device::Pdu(_) => Err(SimError::Device {
                device: meter.to_owned(),
                reason: "is a PDU, not a meter".into(),
            }),
        }
    }

    /// ASIC outlets whose relay is off, over all PDUs (no allocation: cheap to poll).
    pub fn asic_relays_off(&self) -> usize {
        self.devices
            .iter()
            .map(|d| match &*d.state() {
                Device::Pdu(p) => p
                    .outlets()
                    .iter()
                    .filter(|o| matches!(o.load, Load::Asic { .. }) && !o.relay_on)
                    .count(),
                Device::Meter(_) => 0,
            })
            .sum()
    }

    /// The latest successful write answered by any device after `since`.
    pub fn last_write_since(&self, since: Instant) -> Option<Instant> {
        self.devices
            .iter()
            .filter_map(|d| *d.last_write.lock().unwrap_or_else(|e| e.into_inner()))
            .filter(|t| *t >= since)
            .max()
    }

    /// A PDU's outlets that are off (1-based numbers).
    pub fn outlets_off(&self, pdu: &str) -> Result<Vec<u16>, SimError> {
        Ok(self
            .outlets(pdu)?
            .iter()
            .enumerate()
            .filter(|(_, o)| !o.relay_on)
            .map(|(i, _)| i as u16 + 1)
            .collect())
    }

    /// Total relay toggles over all PDUs: a measure of chatter.
    pub fn total_toggles(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| match &*d.state() {
                Device::Pdu(p) => p.outlets().iter().map(|o| u64::from(o.toggles)).sum(),
                Device::Meter(_) => 0,
            })
            .sum()
    }

    /// Stops serving and waits for every task to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// A read-only view of one outlet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutletView {
    pub relay_on: bool,
    pub power_w: f64,
    pub toggles: u32,
    pub commands: u32,
}

fn loopback_ip(host: &str) -> Option<IpAddr> {
    if host == "localhost" {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    host.parse::<IpAddr>().ok().filter(IpAddr::is_loopback)
}

fn set_port(site: &mut Site, id: DeviceId, port: u16) {
    match id {
        DeviceId::Pdu(p) => site.pdus[p.0 as usize].endpoint.port = port,
        DeviceId::Meter(m) => site.meters[m.0 as usize].endpoint.port = port,
    }
}

/// Builds every device of the site in [`Site::devices`] order, each with its faults and
/// counters.
fn build_devices(site: &Site) -> Result<Vec<Arc<SimDevice>>, SimError> {
    let devices = plant::devices(site)?;
    Ok(site
        .devices()
        .zip(devices)
        .map(|(id, state)| {
            Arc::new(SimDevice {
                name: site.device_name(id).to_owned(),
                unit_id: site.device_endpoint(id).unit_id,
                state: Mutex::new(state),
                faults: Mutex::new(plant::faults_of(site, id)),
                writes: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                last_write: Mutex::new(None),
                frozen: Mutex::new(None),
            })
        })
        .collect())
}

/// Advances the plant every tick until cancelled.
async fn physics(
    mut plant: SitePhysics,
    devices: Arc<Vec<Arc<SimDevice>>>,
    tick: Duration,
    cancel: CancellationToken,
) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        // Cancel-safe: `tick()` holds no state we would lose.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = Instant::now();
        plant.advance(
            devices.len(),
            |i| devices[i].state(),
            (now - last).as_secs_f64(),
        );
        last = now;
    }
}

async fn serve(listener: TcpListener, devices: Arc<[Arc<SimDevice>]>, cancel: CancellationToken) {
    let server = Server::new(listener);
    let on_connected = |stream: TcpStream, _addr: SocketAddr| {
        let devices = devices.clone();
        async move {
            let _ = stream.set_nodelay(true);
            let dropped = Arc::new(AtomicBool::new(false));
            let service = EndpointService {
                devices,
                dropped: dropped.clone(),
            };
            Ok(Some((
                service,
                Droppable {
                    inner: stream,
                    dropped,
                },
            )))
        }
    };
    let on_error = |err: io::Error| tracing::debug!(%err, "modbus connection ended");
    let _ = server
        .serve_until(&on_connected, on_error, cancel.cancelled_owned())
        .await;
}

/// Answers the requests of one TCP connection for the devices behind one endpoint.
struct EndpointService {
    devices: Arc<[Arc<SimDevice>]>,
    /// Set to make the connection end (the `disconnect` fault).
    dropped: Arc<AtomicBool>,
}

type Served = Result<Option<Response>, ExceptionCode>;

impl tokio_modbus::server::Service for EndpointService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Served> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let device = self
            .devices
            .iter()
            .find(|d| d.unit_id == req.slave)
            .cloned();
        let dropped = self.dropped.clone();
        Box::pin(async move {
            let Some(device) = device else {
                // Unit 0 is broadcast: never answered. Others: the gateway has no such device.
                return if req.slave == 0 {
                    Ok(None)
                } else {
                    Err(ExceptionCode::GatewayTargetDevice)
                };
            };
            device.requests.fetch_add(1, Ordering::Relaxed);
            if handler::is_write(&req.request) {
                device.writes.fetch_add(1, Ordering::Relaxed);
            }
            let faults = device.faults();
            if faults.latency_ms > 0 {
                tokio::time::sleep(Duration::from_millis(u64::from(faults.latency_ms))).await;
            }
            let frozen = device
                .frozen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let answer = plant::answer(&mut device.state(), frozen.as_ref(), &faults, &req.request);
            match answer {
                Answer::Disconnect => {
                    dropped.store(true, Ordering::Relaxed);
                    Ok(None)
                }
                Answer::NoReply => Ok(None),
                Answer::Exception(code) => Err(code),
                Answer::Response(r) => {
                    if handler::is_write(&req.request) {
                        *device.last_write.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Instant::now());
                    }
                    Ok(Some(r))
                }
            }
        })
    }
}

/// A TCP stream that reads as closed once its service asks for the connection to be dropped,
/// which makes tokio-modbus's server loop end and close the socket.
struct Droppable {
    inner: TcpStream,
    dropped: Arc<AtomicBool>,
}

impl AsyncRead for Droppable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.dropped.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Droppable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
