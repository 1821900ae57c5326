//! One task per Modbus endpoint (host:port), owning its connection, for the PDUs and meters
//! behind it. It decides nothing: every poll interval it reads its devices, whenever the core
//! publishes a new order for one of its PDUs it writes it, and it reports what it read, wrote,
//! or failed to. The core judges (health, verification, retries: `decide::fleet`,
//! `decide::health`).
//!
//! Every call runs under the device's timeout (tokio-modbus has none of its own). After a
//! timeout, a broken connection or an answer that does not fit its request the connection is
//! dropped (transaction ids may be out of step) and opened again with backoff: 100 ms doubling
//! to 5 s, reset only by a correct answer, so a device that accepts connections but answers
//! wrongly is not hammered. A device's exception answer is a fault of that device, not of the
//! connection. Only what the core orders is written: ASIC outlets, never a GPU feed or a meter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use site_config::{DeviceId, MeterId, PduId, Site};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};
use tokio_modbus::client::{Client, Context, tcp};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{Response, Slave};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::field::protocol::{self, Step};
use crate::msg::{Call, DeviceError, Order, Orders, Reading};
use crate::show::metrics::Telemetry;

/// Into how many groups the endpoints' polls are spread over the poll interval.
const POLL_PHASES: u32 = 8;

/// The site meter is read this many times a poll interval: the budget leaves room for the
/// peak of what it shows, and a swinging load's crests are caught only by dense readings.
pub const SITE_METER_READS: u32 = 4;

/// The wait before the next read. The site meter's reads come at random instants, half to one
/// and a half periods apart: GPU training swings are periodic, and reads at a fixed rate near a
/// multiple of theirs hit the same few phases for minutes, so their peak would miss the crests
/// (by up to 30 % of the swing at four reads a cycle) and drift as the phases crawl.
pub fn jittered(period: Duration, site_meter: bool) -> Duration {
    if site_meter {
        period.mul_f64(rand::random_range(0.5..1.5))
    } else {
        period
    }
}

/// Timing of the Modbus side.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub poll_interval: Duration,
    /// Between reconnection attempts.
    pub backoff: Backoff,
}

impl Timing {
    pub fn for_site(site: &Site) -> Timing {
        Timing {
            poll_interval: site.policy.poll_interval,
            backoff: Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
        }
    }
}

/// Starts one task per endpoint of `site`; they run until `cancel`.
pub fn spawn_endpoints(
    site: &Arc<Site>,
    timing: Timing,
    orders: watch::Receiver<Orders>,
    readings: mpsc::Sender<Reading>,
    telemetry: &Arc<Telemetry>,
    cancel: &CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut groups: std::collections::BTreeMap<(String, u16), Vec<DeviceId>> =
        std::collections::BTreeMap::new();
    for id in site.devices() {
        let ep = site.device_endpoint(id);
        groups
            .entry((ep.host.clone(), ep.port))
            .or_default()
            .push(id);
    }
    let mut set = tokio::task::JoinSet::new();
    let n = groups.len().max(1) as u32;
    for (k, ((host, port), devices)) in groups.into_iter().enumerate() {
        // Spread the endpoints' polls over the interval: hundreds of PDUs polled in the same
        // instant would make a burst that a shed arriving then has to queue behind.
        // Eight phases: bursts small enough not to delay a shed, few enough that the wake-ups
        // of a poll round are shared (polling each endpoint at its own instant costs more CPU).
        let phase = timing.poll_interval * ((k as u32 * POLL_PHASES) / n) / POLL_PHASES;
        let mut pdus = Vec::new();
        let mut meters = Vec::new();
        for d in devices {
            match d {
                DeviceId::Pdu(p) => pdus.push(p),
                DeviceId::Meter(m) => meters.push(m),
            }
        }
        let site_meter = meters.contains(&site.site_meter).then_some(site.site_meter);
        let task = Endpoint {
            site_meter,
            site: site.clone(),
            host,
            port,
            done: vec![0; pdus.len()],
            pdus,
            meters,
            timing,
            orders: orders.clone(),
            readings: readings.clone(),
            ctx: None,
            failures: 0,
            next_attempt: Instant::now(),
            telemetry: telemetry.clone(),
        };
        set.spawn(task.run(phase, cancel.clone()));
    }
    set
}

struct Endpoint {
    site: Arc<Site>,
    /// The site meter, when it is behind this endpoint: read more often than the rest.
    site_meter: Option<MeterId>,
    host: String,
    port: u16,
    pdus: Vec<PduId>,
    /// Per PDU (as `pdus`), the id of the last order carried out.
    done: Vec<u64>,
    meters: Vec<MeterId>,
    timing: Timing,
    orders: watch::Receiver<Orders>,
    readings: mpsc::Sender<Reading>,
    ctx: Option<Context>,
    /// Failures since the last correct answer.
    failures: u32,
    next_attempt: Instant,
    telemetry: Arc<Telemetry>,
}

/// A failed call, and whether the connection must go with it.
struct Failed {
    error: DeviceError,
    drop_link: bool,
}

impl Endpoint {
    async fn run(mut self, phase: Duration, cancel: CancellationToken) {
        let ticks_per_poll = if self.site_meter.is_some() {
            SITE_METER_READS
        } else {
            1
        };
        let period = self.timing.poll_interval / ticks_per_poll;
        let mut next = Instant::now() + phase;
        let mut tick: u32 = 0;
        loop {
            // Cancel-safe: each branch only wakes us; the work happens after the select.
            let ordered = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {
                    next = Instant::now() + jittered(period, self.site_meter.is_some());
                    false
                }
                r = self.orders.changed() => {
                    if r.is_err() {
                        return;
                    }
                    true
                }
            };
            if !self.ensure_connected().await {
                continue;
            }
            if !ordered {
                if tick.is_multiple_of(ticks_per_poll) {
                    self.poll_all().await;
                } else if let Some(meter) = self.site_meter {
                    self.read_meter(meter).await;
                }
                tick = tick.wrapping_add(1);
            }
            self.carry_out_orders().await;
        }
    }

    async fn ensure_connected(&mut self) -> bool {
        if self.ctx.is_some() {
            return true;
        }
        if Instant::now() < self.next_attempt {
            return false;
        }
        let limit = self.connect_timeout();
        let connect = Call::CONNECT;
        let result = match self.resolve().await {
            Ok(addr) => match timeout(limit, tcp::connect(addr)).await {
                Ok(Ok(ctx)) => Ok(ctx),
                Ok(Err(e)) => Err(DeviceError::Transport {
                    call: connect,
                    reason: e.to_string(),
                }),
                Err(_) => Err(DeviceError::Timeout {
                    call: connect,
                    limit,
                }),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(ctx) => {
                self.ctx = Some(ctx);
                true
            }
            Err(e) => {
                self.link_down(e).await;
                false
            }
        }
    }

    fn connect_timeout(&self) -> Duration {
        let pdus = self.pdus.iter().map(|p| self.site.pdu(*p).endpoint.timeout);
        let meters = self
            .meters
            .iter()
            .map(|m| self.site.meter(*m).endpoint.timeout);
        pdus.chain(meters).max().unwrap_or(Duration::from_secs(1))
    }

    async fn resolve(&mut self) -> Result<SocketAddr, DeviceError> {
        if let Ok(ip) = self.host.parse() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        let fail = |reason: String| DeviceError::Transport {
            call: Call::CONNECT,
            reason,
        };
        tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| fail(format!("cannot resolve {}: {e}", self.host)))?
            .next()
            .ok_or_else(|| fail(format!("{} resolves to no address", self.host)))
    }

    /// Drops the connection, reports every device behind it unreadable, and schedules the next
    /// attempt with exponential backoff and jitter.
    async fn link_down(&mut self, error: DeviceError) {
        self.ctx = None;
        self.failures = self.failures.saturating_add(1);
        self.next_attempt = Instant::now() + self.timing.backoff.delay(self.failures);
        if self.failures == 1 || self.failures.is_power_of_two() {
            tracing::warn!(endpoint = %format!("{}:{}", self.host, self.port), failures = self.failures, %error, "modbus endpoint unreachable");
        }
        let devices: Vec<DeviceId> = self
            .pdus
            .iter()
            .map(|p| DeviceId::Pdu(*p))
            .chain(self.meters.iter().map(|m| DeviceId::Meter(*m)))
            .collect();
        for device in devices {
            self.report(Reading::ReadFailed {
                device,
                error: error.clone(),
            })
            .await;
        }
    }

    async fn report(&mut self, r: Reading) {
        // The shell drains readings continuously; if it is gone we are shutting down.
        let _ = self.readings.send(r).await;
    }

    /// Sends one request to `unit` under `limit`.
    async fn call(&mut self, unit: u8, limit: Duration, step: &Step) -> Result<Response, Failed> {
        let ctx = self.ctx.as_mut().ok_or_else(|| Failed {
            error: DeviceError::Transport {
                call: step.call,
                reason: "not connected".into(),
            },
            drop_link: true,
        })?;
        ctx.set_slave(Slave(unit));
        let sent = Instant::now();
        let result = timeout(limit, ctx.call(step.request.clone())).await;
        self.telemetry.modbus.observe(sent.elapsed());
        let result = match result {
            Err(_) => {
                return Err(Failed {
                    error: DeviceError::Timeout {
                        call: step.call,
                        limit,
                    },
                    drop_link: true,
                });
            }
            Ok(r) => r,
        };
        // An answer whose header or function does not fit: transaction ids may be out of step.
        let drop_link = result.is_err();
        match protocol::outcome(step.call, result) {
            Ok(r) => {
                self.failures = 0;
                Ok(r)
            }
            Err(error) => Err(Failed { error, drop_link }),
        }
    }

    /// Runs `steps` on `unit`, stopping at the first failure.
    async fn run_steps(
        &mut self,
        unit: u8,
        limit: Duration,
        steps: &[Step],
    ) -> Result<Vec<Response>, Failed> {
        let mut out = Vec::with_capacity(steps.len());
        for s in steps {
            out.push(self.call(unit, limit, s).await?);
        }
        Ok(out)
    }

    /// A device failed: its fault goes to the core; the connection goes too if it must.
    async fn failed(&mut self, device: DeviceId, f: Failed) {
        if f.drop_link {
            self.link_down(f.error).await;
        } else {
            self.report(Reading::ReadFailed {
                device,
                error: f.error,
            })
            .await;
        }
    }

    async fn poll_all(&mut self) {
        for i in 0..self.meters.len() {
            if self.ctx.is_none() {
                return;
            }
            self.read_meter(self.meters[i]).await;
        }
        self.poll_pdus().await;
    }

    async fn read_meter(&mut self, meter: MeterId) {
        let site = self.site.clone();
        let m = site.meter(meter);
        let step = protocol::meter_read(m);
        let result = self
            .run_steps(
                m.endpoint.unit_id,
                m.endpoint.timeout,
                std::slice::from_ref(&step),
            )
            .await
            .and_then(|a| {
                let answer = a.first().ok_or_else(|| Failed {
                    error: DeviceError::Malformed {
                        call: step.call,
                        reason: "no answer".into(),
                    },
                    drop_link: false,
                })?;
                protocol::decode_meter(m, &step, answer).map_err(|error| Failed {
                    error,
                    drop_link: false,
                })
            });
        match result {
            Ok(kw) => self.report(Reading::Meter { meter, kw }).await,
            Err(f) => self.failed(DeviceId::Meter(meter), f).await,
        }
    }

    async fn poll_pdus(&mut self) {
        let site = self.site.clone();
        for i in 0..self.pdus.len() {
            if self.ctx.is_none() {
                return;
            }
            // A new order goes before the rest of the poll (behind a gateway with many PDUs).
            if self.orders.has_changed().unwrap_or(false) {
                self.carry_out_orders().await;
            }
            let pdu = self.pdus[i];
            let p = site.pdu(pdu);
            let result = match protocol::pdu_read(p) {
                Ok(steps) => self
                    .run_steps(p.endpoint.unit_id, p.endpoint.timeout, &steps)
                    .await
                    .and_then(|answers| {
                        protocol::decode_pdu(p, &steps, &answers).map_err(|error| Failed {
                            error,
                            drop_link: false,
                        })
                    }),
                Err(error) => Err(Failed {
                    error,
                    drop_link: false,
                }),
            };
            match result {
                Ok((relays, power_w)) => {
                    self.report(Reading::Pdu {
                        pdu,
                        relays,
                        power_w,
                    })
                    .await
                }
                Err(f) => self.failed(DeviceId::Pdu(pdu), f).await,
            }
        }
    }

    /// Writes every order newer than the last one carried out for each PDU.
    async fn carry_out_orders(&mut self) {
        let orders = self.orders.borrow_and_update().clone();
        for i in 0..self.pdus.len() {
            if self.ctx.is_none() {
                return;
            }
            let pdu = self.pdus[i];
            let Some(order) = orders.get(pdu).cloned() else {
                continue;
            };
            if order.id <= self.done[i] {
                continue;
            }
            self.done[i] = order.id;
            match self.write(pdu, &order).await {
                Ok(()) => {
                    self.report(Reading::Written {
                        pdu,
                        order: order.id,
                    })
                    .await
                }
                Err(f) => {
                    self.report(Reading::WriteFailed {
                        pdu,
                        order: order.id,
                        error: f.error.clone(),
                    })
                    .await;
                    if f.drop_link {
                        self.link_down(f.error).await;
                    }
                }
            }
        }
    }

    async fn write(&mut self, pdu: PduId, order: &Order) -> Result<(), Failed> {
        let site = self.site.clone();
        let p = site.pdu(pdu);
        for step in protocol::order_writes(p, order) {
            let answer = self
                .call(p.endpoint.unit_id, p.endpoint.timeout, &step)
                .await?;
            protocol::check_written(&step, &answer).map_err(|error| Failed {
                error,
                drop_link: false,
            })?;
        }
        Ok(())
    }
}
