//! The controller's broker link: sessions, reconnection, fallback broker, last will, TLS with
//! client certificates and credentials from the environment.

use std::path::PathBuf;
use std::time::Duration;

use hil::broker::Broker;
use hil::rig::Rig;
use site_config::{BrokerUrl, SignalFormat, TlsFiles};

const SECOND: Duration = Duration::from_secs(1);

async fn shed_works(rig: &mut Rig, id: &str) {
    let from = rig.utility.seen.len();
    rig.signal(
        SignalFormat::Native,
        format!(r#"{{"id":"{id}","kind":"shed","kw":10}}"#),
    )
    .await;
    rig.ack(from, id, "active", 5 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnection_resubscribes_when_the_broker_lost_the_session() {
    let broker = Broker::embedded().expect("broker");
    let mut rig = Rig::start_on(broker, "small.toml", |_| {}).await;
    shed_works(&mut rig, "before").await;
    // The broker restarts with no memory of anyone: the controller must subscribe again.
    rig.broker.stop();
    rig.broker.restart(true).expect("broker restarts");
    let status = rig.site.mqtt.status_topic.clone();
    let ack = rig.site.mqtt.ack_topic.clone();
    rig.utility = hil::rig::Client::connect(rig.broker.port(), &[&ack, &status]).await;
    rig.utility
        .wait_from(0, &status, 10 * SECOND, |s| s["online"] == true)
        .await;
    shed_works(&mut rig, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnection_keeps_the_session_and_receives_signals_sent_meanwhile() {
    let broker = Broker::embedded().expect("broker");
    let mut rig = Rig::start_on(broker, "small.toml", |_| {}).await;
    shed_works(&mut rig, "first").await;
    rig.broker.stop();
    rig.broker.restart(false).expect("broker restarts");
    let status = rig.site.mqtt.status_topic.clone();
    let ack = rig.site.mqtt.ack_topic.clone();
    rig.utility = hil::rig::Client::connect(rig.broker.port(), &[&ack, &status]).await;
    // Published right away, possibly before the controller is back: the session keeps it.
    shed_works(&mut rig, "meanwhile").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_url_is_used_when_the_first_is_unreachable() {
    let broker = Broker::embedded().expect("broker");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut rig = Rig::start_on(broker, "small.toml", |site| {
        let real = site.mqtt.brokers[0].clone();
        site.mqtt.brokers = vec![
            BrokerUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: closed,
            },
            real,
        ];
    })
    .await;
    shed_works(&mut rig, "via-fallback").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_says_offline_and_leaves_every_outlet_as_it_is() {
    let broker = Broker::embedded().expect("broker");
    let mut rig = Rig::start_on(broker, "small.toml", |_| {}).await;
    shed_works(&mut rig, "held").await;
    rig.until(3 * SECOND, "the shed done", |r| {
        r.asics_on() < r.site.asics.len()
    })
    .await;
    let on = rig.asics_on();
    let writes = rig.sim.all_writes();
    let from = rig.utility.seen.len();
    rig.stop_controller().await;
    let status = rig.site.mqtt.status_topic.clone();
    rig.utility
        .wait_from(from, &status, 5 * SECOND, |s| s["online"] == false)
        .await;
    assert_eq!(rig.asics_on(), on);
    assert_eq!(
        rig.sim.all_writes(),
        writes,
        "nothing written on the way out"
    );
}

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gridshed-pki-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "gridshed test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |names: Vec<String>, file: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names.clone()).unwrap();
            // Distinct subjects: a leaf named like its issuer looks self-signed to OpenSSL.
            params
                .distinguished_name
                .push(DnType::CommonName, names[0].as_str());
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        };
        std::fs::write(dir.join("ca.pem"), ca.as_ref().pem()).unwrap();
        leaf(vec!["127.0.0.1".into(), "localhost".into()], "server");
        leaf(vec!["gridshed-gateway".into()], "client");
        // Mosquitto drops root privileges before reading its key.
        for f in ["server.key", "client.key"] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_listener(port: u16, pki: &Pki) -> String {
    let p = |f: &str| pki.path(f).display().to_string();
    format!(
        "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        p("ca.pem"),
        p("server.pem"),
        p("server.key")
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_server_verification_and_a_client_certificate_against_mosquitto() {
    let pki = Pki::new();
    let tls_port = free_port();
    // A plain listener for the test's utility client, a TLS one (client certificate required)
    // for the controller.
    let Some(broker) = Broker::mosquitto_with(&tls_listener(tls_port, &pki)) else {
        return;
    };
    let broker = broker.expect("mosquitto starts");
    let mut rig = Rig::start_on(broker, "small.toml", |site| {
        site.mqtt.brokers = vec![BrokerUrl {
            tls: true,
            host: "127.0.0.1".into(),
            port: tls_port,
        }];
        site.mqtt.tls = Some(TlsFiles {
            ca_file: pki.path("ca.pem"),
            client_auth: Some((pki.path("client.pem"), pki.path("client.key"))),
        });
    })
    .await;
    shed_works(&mut rig, "over-tls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_refuses_a_broker_whose_certificate_the_ca_did_not_sign() {
    let pki = Pki::new();
    let other = Pki {
        dir: std::env::temp_dir().join(format!("gridshed-pki-other-{}", std::process::id())),
    };
    std::fs::create_dir_all(&other.dir).unwrap();
    {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(other.path("ca.pem"), ca.as_ref().pem()).unwrap();
    }
    let tls_port = free_port();
    let Some(broker) = Broker::mosquitto_with(&tls_listener(tls_port, &pki)) else {
        return;
    };
    let broker = broker.expect("mosquitto starts");
    let site = {
        let mut s = hil::site::load("small.toml");
        s.mqtt.brokers = vec![BrokerUrl {
            tls: true,
            host: "127.0.0.1".into(),
            port: tls_port,
        }];
        s.mqtt.client_id = format!("gridshed-wrong-ca-{}", std::process::id());
        s.mqtt.tls = Some(TlsFiles {
            ca_file: other.path("ca.pem"),
            client_auth: Some((pki.path("client.pem"), pki.path("client.key"))),
        });
        s
    };
    let status = site.mqtt.status_topic.clone();
    let mut utility = hil::rig::Client::connect(broker.port(), &[&status]).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(controller::run(site, async {
        let _ = rx.await;
    }));
    let online = tokio::time::timeout(
        3 * SECOND,
        utility.wait_from(0, &status, 60 * SECOND, |s| s["online"] == true),
    )
    .await;
    assert!(online.is_err(), "connected to a broker it cannot verify");
    let _ = tx.send(());
    let _ = run.await;
}

#[tokio::test]
async fn a_missing_credential_variable_stops_the_controller_before_it_starts() {
    let mut site = hil::site::load("small.toml");
    site.mqtt.username_env = Some("GRIDSHED_TEST_SURELY_UNSET_USER".into());
    let err = controller::run(site, std::future::pending())
        .await
        .expect_err("must refuse");
    assert!(
        err.to_string().contains("GRIDSHED_TEST_SURELY_UNSET_USER"),
        "{err}"
    );
}
