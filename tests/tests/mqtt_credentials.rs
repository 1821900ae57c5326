//! Broker credentials from the environment variables the site file names, end to end against
//! a Mosquitto that requires them.
//!
//! A test binary of its own, with one test that sets the variables before any other thread
//! exists: `std::env::set_var` is unsound while another thread may read the environment,
//! which the other tests' runtimes and controllers do.

use std::time::Duration;

use hil::broker::Broker;
use hil::rig::Rig;
use site_config::SignalFormat;

#[test]
fn credentials_come_from_the_environment_variables_the_site_file_names() {
    let user_var = format!("GRIDSHED_TEST_USER_{}", std::process::id());
    let pass_var = format!("GRIDSHED_TEST_PASS_{}", std::process::id());
    // SAFETY: the only test of this binary sets them before it starts a thread of its own
    // (the harness's main thread only waits for it), and nothing writes them afterwards.
    unsafe {
        std::env::set_var(&user_var, "gateway");
        std::env::set_var(&pass_var, "s3cret-pass");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let Some(started) = Broker::mosquitto_with_password("gateway", "s3cret-pass") else {
            return;
        };
        let (broker, auth_port) = started.expect("mosquitto starts");
        let mut rig = Rig::start_on(broker, "small.toml", |site| {
            site.mqtt.brokers[0].port = auth_port;
            site.mqtt.username_env = Some(user_var.clone());
            site.mqtt.password_env = Some(pass_var.clone());
        })
        .await;
        let from = rig.utility.seen.len();
        rig.signal(
            SignalFormat::Native,
            r#"{"id":"authenticated","kind":"shed","kw":10}"#.to_owned(),
        )
        .await;
        rig.ack(from, "authenticated", "active", Duration::from_secs(5))
            .await;
    });
}
