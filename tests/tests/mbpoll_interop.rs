//! Interop with a Modbus master we did not write: mbpoll (Debian package `mbpoll`) reads and
//! writes firmware-sim. Skipped when mbpoll is missing; required under CI=true.

use std::path::Path;
use std::time::Duration;

use firmware_sim::{Bind, Sim, SimOptions};
use tokio::process::Command;

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn mbpoll(bin: &Path, port: u16, args: &[&str]) -> Run {
    let out = Command::new(bin)
        .args([
            "-m",
            "tcp",
            "-a",
            "1",
            "-0",
            "-1",
            "-o",
            "2",
            "-p",
            &port.to_string(),
        ])
        .args(args.iter().take_while(|a| **a != "--"))
        .arg("127.0.0.1")
        .args(args.iter().skip_while(|a| **a != "--").skip(1))
        .output()
        .await
        .expect("mbpoll runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The values of mbpoll's `[ref]: value` lines.
fn values(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix('[')?.split_once("]:"))
        .filter_map(|(_, v)| v.trim().parse().ok())
        .collect()
}

fn port(sim: &Sim, device: &str) -> u16 {
    hil::modbus::addr(sim.site(), device).port()
}

#[tokio::test]
async fn mbpoll_reads_writes_and_gets_exception_02_from_firmware_sim() {
    let Some(bin) = hil::tools::require("mbpoll") else {
        return;
    };
    let options = SimOptions {
        bind: Bind::Ephemeral,
        ..SimOptions::default()
    };
    let sim = Sim::start(&hil::site::load("small.toml"), options)
        .await
        .unwrap();
    let pdu = port(&sim, "pdu-1");

    let coils = mbpoll(&bin, pdu, &["-t", "0", "-r", "0", "-c", "8"]).await;
    assert!(coils.ok, "{}", coils.stderr);
    assert_eq!(values(&coils.stdout), vec![1.0; 8]);

    let power = mbpoll(&bin, pdu, &["-t", "3", "-r", "100", "-c", "8"]).await;
    assert!(power.ok, "{}", power.stderr);
    let w = values(&power.stdout);
    assert_eq!(w.len(), 8);
    assert!(
        w.iter().all(|p| (3100.0..3400.0).contains(p)),
        "outlet watts {w:?}"
    );

    let meter = mbpoll(
        &bin,
        port(&sim, "site-meter"),
        &["-t", "3:float", "-B", "-r", "0", "-c", "2"],
    )
    .await;
    assert!(meter.ok, "{}", meter.stderr);
    let m = values(&meter.stdout);
    assert!((150.0..180.0).contains(&m[0]), "site kW {m:?}");
    assert!((59.9..60.1).contains(&m[1]), "frequency {m:?}");

    let write = mbpoll(&bin, pdu, &["-t", "0", "-r", "2", "--", "0"]).await;
    assert!(write.ok, "{}", write.stderr);
    assert_eq!(sim.writes("pdu-1").unwrap(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while sim.outlets("pdu-1").unwrap()[2].relay_on {
        assert!(
            tokio::time::Instant::now() < deadline,
            "outlet 3 never switched off"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = mbpoll(&bin, pdu, &["-t", "0", "-r", "0", "-c", "4"]).await;
    assert_eq!(values(&after.stdout), vec![1.0, 1.0, 0.0, 1.0]);

    let bad = mbpoll(&bin, pdu, &["-t", "0", "-r", "50", "-c", "1"]).await;
    assert!(!bad.ok, "reading a coil that does not exist must fail");
    assert!(
        bad.stderr.contains("Illegal data address"),
        "expected exception 02, got: {}",
        bad.stderr
    );
}
