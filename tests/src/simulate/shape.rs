//! Random site shapes: tens to 12,000 ASICs, PDUs of two vendors (coils written in runs,
//! holding registers written one by one), metered GPU racks or none, and a large other load
//! that no device meters and that may swing like a training cluster. Written as a site file and
//! loaded through the same validation an operator's file goes through.

use std::fmt::Write as _;
use std::time::Duration;

use rand::Rng;
use rand::rngs::SmallRng;
use site_config::Site;

/// A generated site and what the simulation needs beyond the site file.
#[derive(Debug, Clone)]
pub struct Shape {
    pub site: Site,
    /// The site file, for a failure report.
    pub text: String,
    /// A line saying what it is.
    pub summary: String,
    /// Site load at full power (ASICs rated, GPU racks at their base, other load at its base).
    pub full_kw: f64,
    /// How often the journal rotates: a small live file, so recovery across a rotation is
    /// exercised.
    pub journal_max_bytes: u64,
}

/// The sizes a site may have: (PDUs, outlets per PDU); mostly small, some large.
fn size(rng: &mut SmallRng, large_ok: bool) -> (u32, u16) {
    match rng.random_range(0..100) {
        0..=59 => (rng.random_range(2..=8), rng.random_range(4..=16)),
        60..=89 => (rng.random_range(8..=40), rng.random_range(8..=24)),
        90..=97 => (rng.random_range(40..=120), 24),
        _ if large_ok => (500, 24),
        _ => (rng.random_range(40..=120), 24),
    }
}

/// A random site. `large_ok`: a 12,000-ASIC site may come out.
pub fn generate(rng: &mut SmallRng, large_ok: bool) -> Shape {
    let (pdus, outlets) = size(rng, large_ok);
    let holding_share = rng.random_range(0.0..0.5);
    let holding_pdus = ((f64::from(pdus) * holding_share) as u32).min(pdus - 1);
    let coil_pdus = pdus - holding_pdus;
    let rated_w = [3010.0, 3250.0, 3500.0][rng.random_range(0..3)];
    let asic_kw = f64::from(pdus) * f64::from(outlets) * rated_w / 1000.0;
    // GPU racks: none, or a few metered ones, each fed by its own PDU.
    let racks: u32 = if rng.random_bool(0.4) {
        0
    } else {
        rng.random_range(1..=3)
    };
    let rack_kw: Vec<f64> = (0..racks)
        .map(|_| (asic_kw * rng.random_range(0.05..0.3)).max(10.0).round())
        .collect();
    // Other load: small, or as large as the ASICs (GPU racks behind no meter of their own).
    let other_kw = if rng.random_bool(0.5) {
        (asic_kw * rng.random_range(0.02..0.1)).round()
    } else {
        (asic_kw * rng.random_range(0.3..1.0)).round()
    };
    let other_swing = if rng.random_bool(0.5) {
        (other_kw * rng.random_range(0.0..0.25)).round()
    } else {
        0.0
    };
    let poll_ms: u32 = [250, 500, 1000][rng.random_range(0..3)];
    let window_s = [10.0, 20.0, 30.0, 60.0][rng.random_range(0..4)];
    // Swings within what the window is sized for (README: the window covers the swings and
    // their beats). Mostly one training job across the site (one period); sometimes two,
    // whose beat 1/|1/p1 - 1/p2| is at most half the window.
    let base_period = rng.random_range(0.4..(window_s / 8.0_f64).min(3.0));
    let second_period = {
        let beat = rng.random_range(2.0..(window_s / 2.0));
        1.0 / (1.0 / base_period - 1.0 / beat).max(0.05)
    };
    let period = |rng: &mut SmallRng| {
        if rng.random_bool(0.7) {
            base_period
        } else {
            second_period
        }
    };
    let swing_period = period(rng);
    let gpu_base: Vec<f64> = rack_kw
        .iter()
        .map(|r| (r * rng.random_range(0.4..0.8)).round())
        .collect();
    let full_kw = asic_kw + gpu_base.iter().sum::<f64>() + other_kw;
    let limit_kw = (full_kw * rng.random_range(1.02..1.3)).round();
    let margin = (limit_kw * rng.random_range(0.005..0.03) * 10.0).round() / 10.0;
    let noise_pct = [0.0, 0.5, 1.0, 2.0][rng.random_range(0..4)];
    let relay_delay_ms: u32 = rng.random_range(0..=200);
    let sequence_ms: u32 = if rng.random_bool(0.2) {
        rng.random_range(10..=60)
    } else {
        0
    };
    let timeout_ms: u32 = [300, 500, 1000][rng.random_range(0..3)];
    let min_off = rng.random_range(0.0..30.0_f64).round();
    let min_on = rng.random_range(0.0..30.0_f64).round();
    let batch: u32 = rng.random_range(1..=24);
    let interval = rng.random_range(0.5..10.0_f64);
    // Devices behind gateways: several unit ids on one port.
    let gateway = rng.random_bool(0.2);

    let mut t = String::new();
    let _ = writeln!(
        t,
        "[site]\nid = \"sim\"\nname = \"simulated\"\nimport_limit_kw = {limit_kw}\nmeter = \"site-meter\"\n"
    );
    t += "[mqtt]\nurls = [\"mqtt://127.0.0.1:1883\"]\nclient_id = \"gridshed-sim\"\nack_topic = \"s/ack\"\nstatus_topic = \"s/status\"\n";
    t += "[[mqtt.signals]]\ntopic = \"s/native\"\nformat = \"native\"\n";
    t += "[[mqtt.signals]]\ntopic = \"s/openadr\"\nformat = \"openadr3\"\n";
    t += "[[mqtt.signals]]\ntopic = \"s/maestro\"\nformat = \"maestro\"\n\n";
    t += "[policy.simple]\nlevel_1 = { action = \"shed\", kw = 10.0 }\nlevel_2 = { action = \"none\" }\nlevel_3 = { action = \"shed_all\" }\n\n";
    let _ = writeln!(
        t,
        "[[meters]]\nname = \"site-meter\"\nhost = \"127.0.0.1\"\nport = 20000\ntimeout_ms = {timeout_ms}\nprofile = \"generic-meter\"\n"
    );
    if racks > 0 {
        let _ = writeln!(
            t,
            "[[meters]]\nname = \"gpu-meter\"\ncount = {racks}\nhost = \"127.0.0.1\"\nport = 20001\ntimeout_ms = {timeout_ms}\nprofile = \"generic-meter\"\n"
        );
    }
    let (coil_port, holding_port) = if gateway {
        (21000, 23000)
    } else {
        (22000, 32000)
    };
    let group = |t: &mut String, name: &str, count: u32, port: u32, profile: &str| {
        if gateway {
            // A gateway per 247 PDUs (the unit ids Modbus allows), unit ids 1, 2, ... behind
            // each: PDU groups cannot number unit ids, so one declaration per PDU.
            for k in 1..=count {
                let port = port + (k - 1) / 247;
                let unit = (k - 1) % 247 + 1;
                let _ = writeln!(
                    t,
                    "[[pdus]]\nname = \"{name}-{k}\"\nhost = \"127.0.0.1\"\nport = {port}\nunit_id = {unit}\noutlets = {outlets}\ntimeout_ms = {timeout_ms}\nprofile = \"{profile}\"\n"
                );
            }
        } else {
            let _ = writeln!(
                t,
                "[[pdus]]\nname = \"{name}\"\ncount = {count}\nhost = \"127.0.0.1\"\nport = {port}\noutlets = {outlets}\ntimeout_ms = {timeout_ms}\nprofile = \"{profile}\"\n"
            );
        }
    };
    group(&mut t, "row", coil_pdus, coil_port, "generic-pdu");
    if holding_pdus > 0 {
        group(&mut t, "legacy", holding_pdus, holding_port, "holding-pdu");
    }
    if racks > 0 {
        let _ = writeln!(
            t,
            "[[pdus]]\nname = \"gpu-feed\"\nhost = \"127.0.0.1\"\nport = 20100\noutlets = {}\ntimeout_ms = {timeout_ms}\nprofile = \"generic-pdu\"\n",
            racks * 2
        );
    }
    // ASICs: two efficiency classes in two priority classes, by PDU halves.
    let asic_group = |t: &mut String,
                      pdu: &str,
                      members: Option<(u32, u32)>,
                      eff: f64,
                      prio: u8| {
        let members = members.map_or(String::new(), |(a, b)| format!("members = [{a}, {b}]\n"));
        let _ = writeln!(
            t,
            "[[asics]]\npdu = \"{pdu}\"\n{members}outlets = [1, {outlets}]\nmodel = \"m\"\nrated_w = {rated_w}\nefficiency_j_per_th = {eff}\npriority = {prio}\n"
        );
    };
    if gateway {
        for k in 1..=coil_pdus {
            let (eff, prio) = if k % 2 == 0 { (21.5, 2) } else { (29.5, 2) };
            asic_group(&mut t, &format!("row-{k}"), None, eff, prio);
        }
        for k in 1..=holding_pdus {
            asic_group(&mut t, &format!("legacy-{k}"), None, 34.5, 3);
        }
    } else {
        let half = coil_pdus / 2;
        if half > 0 {
            asic_group(&mut t, "row", Some((1, half)), 29.5, 2);
        }
        asic_group(&mut t, "row", Some((half + 1, coil_pdus)), 17.5, 1);
        if holding_pdus > 0 {
            asic_group(&mut t, "legacy", Some((1, holding_pdus)), 34.5, 3);
        }
    }
    for (k, kw) in rack_kw.iter().enumerate() {
        let r = k + 1;
        let first = k * 2 + 1;
        let _ = writeln!(
            t,
            "[[gpu_racks]]\nname = \"gpu-{r}\"\nmeter = \"gpu-meter-{r}\"\nrated_kw = {kw}\nfeeds = [{{ pdu = \"gpu-feed\", outlets = [{first}, {}] }}]\n",
            first + 1
        );
    }
    let _ = writeln!(
        t,
        "[policy]\nmin_off_s = {min_off}\nmin_on_s = {min_on}\nrestore_batch_size = {batch}\nrestore_interval_s = {interval:.2}\ngpu_peak_window_s = {window_s}\nmargin_kw = {margin}\npoll_interval_ms = {poll_ms}\n"
    );
    let _ = writeln!(
        t,
        "[sim]\nrelay_delay_ms = {relay_delay_ms}\nsequence_step_ms = {sequence_ms}\nnoise_pct = {noise_pct}\nboot_ramp_s = {:.1}\nbase_load_kw = {other_kw}\nother_swing_kw = {other_swing}\nother_period_s = {swing_period:.2}\nseed = {}\n",
        rng.random_range(0.0..3.0_f64),
        rng.random::<u32>()
    );
    for (k, base) in gpu_base.iter().enumerate() {
        let swing = (base * rng.random_range(0.0..0.3)).round();
        let period = period(rng);
        let _ = writeln!(
            t,
            "[[sim.gpu]]\nrack = \"gpu-{}\"\nbase_kw = {base}\nswing_kw = {swing}\nperiod_s = {period:.2}\n",
            k + 1
        );
    }
    let site = site_config::parse(std::path::Path::new("simulated.toml"), &t)
        .unwrap_or_else(|e| panic!("a generated site must be valid: {e}\n{t}"));
    let summary = format!(
        "{} ASICs on {} PDUs ({} holding-register){}, {} GPU racks, other load {other_kw} kW ± {other_swing}, limit {limit_kw} kW, margin {margin} kW, poll {poll_ms} ms, window {window_s} s",
        site.asics.len(),
        pdus,
        holding_pdus,
        if gateway { " behind gateways" } else { "" },
        racks,
    );
    Shape {
        journal_max_bytes: rng.random_range(20_000..200_000),
        site,
        text: t,
        summary,
        full_kw,
    }
}

/// The longest any device takes to answer before it counts as silent.
pub fn max_timeout(site: &Site) -> Duration {
    site.devices()
        .map(|d| site.device_endpoint(d).timeout)
        .max()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn generated_sites_are_valid_and_vary() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut sizes = Vec::new();
        for _ in 0..40 {
            let s = generate(&mut rng, false);
            assert!(!s.site.asics.is_empty());
            sizes.push(s.site.asics.len());
        }
        sizes.sort();
        assert!(sizes[0] < 100 && sizes[39] > 300, "{sizes:?}");
    }
}
