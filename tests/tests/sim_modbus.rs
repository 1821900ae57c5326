//! firmware-sim driven over real loopback TCP by a tokio-modbus client, as the controller will.

use std::time::Duration;

use firmware_sim::{Bind, Sim, SimOptions};
use hil::modbus::connect;
use site_config::Faults;
use site_config::profile::{BUILTIN, Profile};
use tokio::time::{Instant, timeout};
use tokio_modbus::ExceptionCode;
use tokio_modbus::client::{Client, Context, Reader, Writer};
use tokio_modbus::prelude::Request;

async fn start(site: &str) -> Sim {
    let options = SimOptions {
        bind: Bind::Ephemeral,
        ..SimOptions::default()
    };
    Sim::start(&hil::site::load(site), options)
        .await
        .expect("sim starts")
}

/// Polls `check` until it holds, failing after `limit`: waiting for a state, not sleeping on hope.
async fn eventually<F: AsyncFnMut() -> bool>(limit: Duration, mut check: F) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn coils(ctx: &mut Context, addr: u16, n: u16) -> Vec<bool> {
    ctx.read_coils(addr, n)
        .await
        .expect("transport")
        .expect("no exception")
}

fn meter_kw(words: &[u16]) -> f64 {
    let Ok(Profile::Meter(m)) = Profile::from_toml("generic-meter", BUILTIN[1].1) else {
        unreachable!()
    };
    m.active_power.decode(words).expect("finite")
}

#[tokio::test]
async fn a_tokio_modbus_client_switches_outlets_and_reads_them_back() {
    let sim = start("small.toml").await;
    let mut pdu = connect(sim.site(), "pdu-1").await;
    assert_eq!(coils(&mut pdu, 0, 8).await, vec![true; 8]);

    pdu.write_multiple_coils(0, &[false, false, false])
        .await
        .unwrap()
        .unwrap();
    // small.toml has a 100 ms relay operate delay.
    eventually(Duration::from_secs(5), async || {
        coils(&mut pdu, 0, 8).await[..3] == [false; 3]
    })
    .await;
    eventually(Duration::from_secs(5), async || {
        let w = pdu.read_input_registers(100, 8).await.unwrap().unwrap();
        w[..3] == [0, 0, 0] && w[3..].iter().all(|&p| p > 3000)
    })
    .await;
    assert_eq!(sim.writes("pdu-1").unwrap(), 1, "one batched write");
    let outlets = sim.outlets("pdu-1").unwrap();
    assert!(!outlets[0].relay_on && outlets[3].relay_on);
    assert_eq!(outlets[0].toggles, 1);
}

#[tokio::test]
async fn the_site_meter_drops_by_what_is_switched_off() {
    let sim = start("small.toml").await;
    let mut meter = connect(sim.site(), "site-meter").await;
    let before = meter_kw(&meter.read_input_registers(0, 2).await.unwrap().unwrap());
    // ASICs 34 (110 kW) + GPU racks about 50 kW + base 5 kW.
    assert!(
        (150.0..180.0).contains(&before),
        "site meter reads {before} kW"
    );

    let mut pdu = connect(sim.site(), "pdu-1").await;
    pdu.write_multiple_coils(0, &[false; 8])
        .await
        .unwrap()
        .unwrap();
    // pdu-1 carries 8 x 3.25 kW; GPU swing and noise move the rest by a few kW.
    eventually(Duration::from_secs(5), async || {
        let now = meter_kw(&meter.read_input_registers(0, 2).await.unwrap().unwrap());
        before - now > 18.0
    })
    .await;
}

#[tokio::test]
async fn bad_requests_get_exact_modbus_exceptions() {
    let sim = start("small.toml").await;
    let mut pdu = connect(sim.site(), "pdu-1").await;
    assert_eq!(
        pdu.read_coils(8, 1).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        pdu.read_discrete_inputs(0, 1).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
    assert_eq!(
        pdu.read_input_registers(100, 126).await.unwrap(),
        Err(ExceptionCode::IllegalDataValue)
    );
    let mut meter = connect(sim.site(), "gpu-meter-1").await;
    assert_eq!(
        meter.write_single_coil(0, false).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
    assert_eq!(
        sim.writes("gpu-meter-1").unwrap(),
        1,
        "a refused write still counts"
    );
    // The connection survives every exception.
    assert_eq!(coils(&mut pdu, 0, 1).await, vec![true]);
}

#[tokio::test]
async fn another_vendors_pdu_is_driven_through_its_profile_alone() {
    let sim = start("small.toml").await;
    let mut pdu = connect(sim.site(), "pdu-legacy").await;
    pdu.write_single_register(1001, 0).await.unwrap().unwrap();
    eventually(Duration::from_secs(5), async || {
        pdu.read_holding_registers(1000, 4).await.unwrap().unwrap() == [1, 0, 1, 1]
    })
    .await;
    assert_eq!(
        pdu.write_multiple_registers(1000, &[0, 0]).await.unwrap(),
        Err(ExceptionCode::IllegalFunction),
        "holding-pdu switches one outlet per write"
    );
    assert_eq!(
        pdu.write_single_register(1000, 7).await.unwrap(),
        Err(ExceptionCode::IllegalDataValue)
    );
}

#[tokio::test]
async fn faults_set_at_run_time_change_how_the_device_answers() {
    let sim = start("small.toml").await;
    let site = sim.site().clone();

    sim.set_faults(
        "pdu-2",
        Faults {
            latency_ms: 200,
            ..Faults::default()
        },
    )
    .unwrap();
    let mut pdu = connect(&site, "pdu-2").await;
    let t = Instant::now();
    coils(&mut pdu, 0, 1).await;
    assert!(t.elapsed() >= Duration::from_millis(200));

    sim.set_faults(
        "pdu-2",
        Faults {
            exception: Some(4),
            ..Faults::default()
        },
    )
    .unwrap();
    assert_eq!(
        pdu.read_coils(0, 1).await.unwrap(),
        Err(ExceptionCode::ServerDeviceFailure)
    );

    sim.set_faults(
        "pdu-2",
        Faults {
            no_reply: true,
            ..Faults::default()
        },
    )
    .unwrap();
    let silent = timeout(Duration::from_millis(300), pdu.read_coils(0, 1)).await;
    assert!(silent.is_err(), "a silent device never answers");

    sim.set_faults(
        "pdu-3",
        Faults {
            disconnect: true,
            ..Faults::default()
        },
    )
    .unwrap();
    let mut dropped = connect(&site, "pdu-3").await;
    assert!(
        dropped.read_coils(0, 1).await.is_err(),
        "the connection is closed instead of an answer"
    );

    sim.set_faults(
        "pdu-4",
        Faults {
            stuck_outlets: vec![3],
            ..Faults::default()
        },
    )
    .unwrap();
    let mut stuck = connect(&site, "pdu-4").await;
    stuck
        .write_multiple_coils(2, &[false, false])
        .await
        .unwrap()
        .unwrap();
    // Outlet 4 moves after the relay delay; outlet 3, commanded in the same write, never does.
    eventually(Duration::from_secs(5), async || {
        !coils(&mut stuck, 3, 1).await[0]
    })
    .await;
    assert_eq!(coils(&mut stuck, 2, 1).await, vec![true]);

    sim.clear_faults();
    let mut healthy = connect(&site, "pdu-3").await;
    assert_eq!(coils(&mut healthy, 0, 1).await, vec![true]);
}

#[tokio::test]
async fn unknown_unit_ids_are_answered_as_a_gateway_would() {
    let sim = start("small.toml").await;
    let mut ctx = connect(sim.site(), "site-meter").await;
    use tokio_modbus::prelude::SlaveContext;
    ctx.set_slave(tokio_modbus::Slave(9));
    assert_eq!(
        ctx.call(Request::ReadInputRegisters(0, 2)).await.unwrap(),
        Err(ExceptionCode::GatewayTargetDevice)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_serves_all_500_pdus_of_the_large_site() {
    let sim = start("large.toml").await;
    let site = sim.site().clone();
    assert_eq!(site.pdus.len(), 500);
    let mut tasks = tokio::task::JoinSet::new();
    for pdu in &site.pdus {
        let (site, name) = (site.clone(), pdu.name.clone());
        tasks.spawn(async move {
            let mut ctx = connect(&site, &name).await;
            assert_eq!(coils(&mut ctx, 0, 24).await, vec![true; 24]);
            ctx.write_single_coil(23, false).await.unwrap().unwrap();
            assert!(
                !coils(&mut ctx, 23, 1).await[0],
                "relay delay is 0 in large.toml"
            );
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("every PDU answers");
    }
    let writes = sim.all_writes();
    assert_eq!(writes.values().sum::<u64>(), 500);
    assert!(
        writes
            .iter()
            .filter(|(n, _)| n.starts_with("gpu"))
            .all(|(_, w)| *w == 0)
    );
}
