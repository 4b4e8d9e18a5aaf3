//! The agent's pre-flight check endpoints end to end: probe listener and client between two
//! agents over a lab's migration network, CPU model expansion by the real QEMU, and host facts
//! shaped by the lab knobs (needs root and QEMU).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ferry_api::checks::{CpuModelFeatures, ProbeConnect, ProbeListening, ProbeResult};
use ferry_api::hosts::HostFacts;
use ferry_api::ApiClient;
use ferry_lab::net::{remove_orphan_test_labs, unique_test_lab_name, LabNet};

mod common;

use common::{client, config};

async fn connect(c: &ApiClient, addr: &str, token: &str, bandwidth_ms: u64) -> ProbeResult {
    c.post(
        "/v1/probe/connect",
        &ProbeConnect {
            addr: addr.into(),
            token: token.into(),
            bandwidth_ms,
        },
    )
    .await
    .expect("probe connect answers 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_between_two_agents_over_the_migration_network() {
    remove_orphan_test_labs();
    let lab = LabNet::create(&unique_test_lab_name(), 2).expect("lab");
    let tmp = tempfile::tempdir().unwrap();
    let h1 = lab.host("hv1").unwrap().clone();
    let h2 = lab.host("hv2").unwrap().clone();
    let a1 = ferry_agent::start(config(
        "hv1",
        &tmp.path().join("a1"),
        Some(h1.netns.clone()),
        h1.migration_addr,
    ))
    .await
    .expect("agent 1");
    let a2 = ferry_agent::start(config(
        "hv2",
        &tmp.path().join("a2"),
        Some(h2.netns.clone()),
        h2.migration_addr,
    ))
    .await
    .expect("agent 2");
    let (c1, c2) = (client(&a1), client(&a2));

    // hv2 listens on its migration address, in its namespace, on a port of the range.
    let listening: ProbeListening = c2.post("/v1/probe/listen", &()).await.expect("listen");
    let addr: std::net::SocketAddr = listening.addr.parse().unwrap();
    assert_eq!(addr.ip(), std::net::IpAddr::from(h2.migration_addr));
    assert!((49152..=49215).contains(&addr.port()), "{addr}");
    assert!(listening.token.len() >= 16);

    // A wrong token is refused, and does not close the listener for the real client.
    let wrong = connect(&c1, &listening.addr, "not-the-token", 0).await;
    assert!(!wrong.connected, "{wrong:?}");
    assert!(
        wrong.error.is_some() && wrong.latency_ms.is_none(),
        "{wrong:?}"
    );

    let t = Instant::now();
    let r = connect(&c1, &listening.addr, &listening.token, 500).await;
    eprintln!("hv1 -> hv2 probe: {r:?}");
    assert!(r.connected, "{r:?}");
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.latency_ms.unwrap() > 0.0, "{r:?}");
    assert!(r.bandwidth_mbit_s.unwrap() > 0.0, "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // Latency only.
    let listening: ProbeListening = c2.post("/v1/probe/listen", &()).await.expect("listen");
    let r = connect(&c1, &listening.addr, &listening.token, 0).await;
    assert!(r.connected && r.latency_ms.unwrap() > 0.0, "{r:?}");
    assert_eq!(r.bandwidth_mbit_s, None);

    // Nothing listens on port 1 of hv2: not connected, with the reason.
    let closed = format!("{}:1", h2.migration_addr);
    let r = connect(&c1, &closed, "x", 0).await;
    assert!(!r.connected && r.error.is_some(), "{r:?}");

    // The listener closes after 10 s.
    let listening: ProbeListening = c2.post("/v1/probe/listen", &()).await.expect("listen");
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let r = connect(&c1, &listening.addr, &listening.token, 0).await;
    assert!(!r.connected, "{r:?}");

    // Bad input is a 400.
    for (addr, bw) in [(listening.addr.as_str(), 2001), ("nowhere", 0)] {
        let e = c1
            .post::<_, ProbeResult>(
                "/v1/probe/connect",
                &ProbeConnect {
                    addr: addr.into(),
                    token: "t".into(),
                    bandwidth_ms: bw,
                },
            )
            .await
            .unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(400), "bad-request".into()));
    }
    a1.shutdown().await;
    a2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_models_expand_to_cpuinfo_features() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = ferry_agent::start(config("solo", tmp.path(), None, Ipv4Addr::LOCALHOST))
        .await
        .expect("agent starts");
    let c = client(&agent);
    let q: CpuModelFeatures = c.get("/v1/cpu-models/qemu64").await.expect("qemu64");
    assert_eq!(q.model, "qemu64");
    for f in ["sse2", "pni", "lahf_lm", "fpu"] {
        assert!(q.features.iter().any(|x| x == f), "{f} missing: {q:?}");
    }
    let w: CpuModelFeatures = c.get("/v1/cpu-models/Westmere").await.expect("Westmere");
    for f in ["sse4_2", "sse4_1", "aes", "popcnt"] {
        assert!(w.features.iter().any(|x| x == f), "{f} missing: {w:?}");
    }
    // Cached: the second answer does not start QEMU again.
    let t = Instant::now();
    let again: CpuModelFeatures = c.get("/v1/cpu-models/qemu64").await.unwrap();
    assert_eq!(again, q);
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );

    for unknown in ["NoSuchCpu", "qemu64%20x"] {
        let e = c
            .get::<CpuModelFeatures>(&format!("/v1/cpu-models/{unknown}"))
            .await
            .unwrap_err();
        assert_eq!(
            (e.status(), e.code()),
            (Some(404), "cpu-model-unknown".into()),
            "{unknown}"
        );
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facts_honour_reserve_capacity_and_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = ferry_agent::start(config(
        "plain",
        &tmp.path().join("p"),
        None,
        Ipv4Addr::LOCALHOST,
    ))
    .await
    .expect("agent starts");
    let real: HostFacts = client(&plain).get("/v1/facts").await.unwrap();
    plain.shutdown().await;
    assert_eq!(real.ram_reserve_mib, 2048);

    let mut cfg = config("small", &tmp.path().join("s"), None, Ipv4Addr::LOCALHOST);
    cfg.reserve_mib = 256;
    cfg.ram_capacity_mib = Some(1024);
    let masked = real.cpu_flags[0].clone();
    cfg.cpu_flags_mask = vec![masked.clone(), "avx2".into()];
    let small = ferry_agent::start(cfg).await.expect("agent starts");
    let f: HostFacts = client(&small).get("/v1/facts").await.unwrap();
    small.shutdown().await;
    assert_eq!(f.ram_reserve_mib, 256);
    assert_eq!(f.ram_total_mib, 1024);
    assert!(f.ram_free_mib <= 1024 && f.ram_free_mib > 0, "{f:?}");
    assert!(!f.cpu_flags.contains(&masked) && !f.cpu_flags.iter().any(|x| x == "avx2"));
    assert_eq!(
        f.cpu_flags.len(),
        real.cpu_flags
            .iter()
            .filter(|x| **x != masked && *x != "avx2")
            .count()
    );
}
