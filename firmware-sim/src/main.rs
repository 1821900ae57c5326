//! `firmware-sim --config SITE.toml`: serve every device of a site file until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use firmware_sim::{Bind, Sim, SimOptions};

/// Simulated PDUs and meters for a gridshed site file, on loopback Modbus TCP.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The site file to serve.
    #[arg(long)]
    config: PathBuf,
    /// Added to every port in the site file.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    port_offset: i32,
    /// Physics step in milliseconds.
    #[arg(long, default_value_t = 50)]
    tick_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let site = site_config::load(&args.config)?;
    let options = SimOptions {
        bind: Bind::AsConfigured {
            port_offset: args.port_offset,
        },
        tick: Duration::from_millis(args.tick_ms.max(1)),
    };
    let sim = Sim::start(&site, options)
        .await
        .context("starting the simulator")?;
    let s = sim.site();
    let ports: Vec<u16> = s.devices().map(|d| s.device_endpoint(d).port).collect();
    tracing::info!(
        site = %s.id,
        pdus = s.pdus.len(),
        meters = s.meters.len(),
        asics = s.asics.len(),
        ports = %format!("{}..={}", ports.iter().min().unwrap_or(&0), ports.iter().max().unwrap_or(&0)),
        "serving"
    );
    // Readiness line for scripts: every listener is bound once this is printed.
    println!("ready {} devices", ports.len());
    shutdown_signal().await;
    tracing::info!("stopping");
    sim.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
