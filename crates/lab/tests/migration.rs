//! Live migration between lab hosts with real QEMU guests (needs root and QEMU; CI has both).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use ferry_lab::guest_client::{tcp_echo_roundtrip, EchoProbe};
use ferry_lab::guest_config::{GuestConfig, ECHO_PORT};
use ferry_lab::net::{tcp_connect_in, tcp_listen_in, udp_bind_in, unique_test_lab_name};
use ferry_lab::{GuestRequest, Lab, LabError, LabOptions, LabVm};
use ferry_migrate::{AbortHandle, Bandwidth, MigrateError, MigrationParams, PortRange};

async fn lab() -> Lab {
    ferry_lab::net::remove_orphan_test_labs();
    Lab::start(LabOptions::new(&unique_test_lab_name(), 2))
        .await
        .expect("lab starts")
}

fn small_guest() -> GuestRequest {
    GuestRequest {
        name: "t-vm".into(),
        memory_mib: 256,
        vcpus: 1,
        disks: vec![],
        config: GuestConfig {
            wss_mib: 32,
            rate_mib_s: 16,
            ..GuestConfig::default()
        },
    }
}

/// Processes running inside a lab host's namespace (QEMU is the only thing we start there).
fn pids_in(lab: &Lab, host: &str) -> Vec<String> {
    let ns = &lab.net.host(host).unwrap().netns;
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn tap_exists(lab: &Lab, host: &str, tap: &str) -> bool {
    let ns = &lab.net.host(host).unwrap().netns;
    Command::new("ip")
        .args(["-n", ns, "link", "show", tap])
        .output()
        .unwrap()
        .status
        .success()
}

/// The counter went on where it stopped, host after host; a failure says where it broke (the
/// beats around it, with host and arrival) and what the guest's own memory check says, so a
/// harness fault and a stale guest can be told apart from CI's output alone.
async fn assert_heartbeat_continuous(lab: &Lab, vm: &LabVm, leg: &str) {
    let gap = vm.heartbeat_gap();
    eprintln!("heartbeats after {leg}: {gap}");
    if !gap.continuous {
        let verify = vm.verify_within(lab, Duration::from_secs(30)).await;
        panic!(
            "after {leg} the heartbeat counter broke: {gap}; the guest's verification: {verify:?}"
        );
    }
}

async fn assert_alive_and_intact(lab: &Lab, vm: &LabVm) {
    // Right after a migration the destination's serial port may not have printed yet: count
    // from the last beat seen anywhere.
    let before = vm
        .serial
        .last_beat()
        .or_else(|| {
            vm.past_beats
                .iter()
                .rev()
                .find_map(|h| h.beats.last().copied())
        })
        .expect("heartbeats seen")
        .counter;
    if vm
        .serial
        .wait_beat_after(before + 20, Duration::from_secs(30))
        .await
        .is_none()
    {
        // Tell a stalled guest from a stalled serial line: the guest's own counters over the
        // network say which.
        let a = vm.status(lab).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = vm.status(lab).await;
        panic!(
            "no new heartbeat on the serial port for 30 s after {before} (last seen: {:?}); guest status over the network, 1 s apart: {a:?} / {b:?}",
            vm.serial.last_beat()
        );
    }
    let report = vm.verify(lab).await.expect("verify answers");
    let pages = u64::from(small_guest().config.wss_mib) * 256;
    assert_eq!(report.checked, pages, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_there_and_back_with_clients_connected_and_memory_intact() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &small_guest()).await.unwrap();
    let echo = SocketAddr::from((vm.ip, ECHO_PORT));
    let ns = lab.net.client_netns.clone();
    let (udp, mut tcp) = tokio::task::spawn_blocking(move || {
        (
            udp_bind_in(&ns, "0.0.0.0:0".parse().unwrap()).unwrap(),
            tcp_connect_in(&ns, echo, Duration::from_secs(5)).unwrap(),
        )
    })
    .await
    .unwrap();
    tcp_echo_roundtrip(&mut tcp, b"hello").unwrap();
    let probe = EchoProbe::start(udp, echo, Duration::from_millis(5)).unwrap();

    let mut samples = Vec::new();
    let (_abort, signal) = AbortHandle::new();
    let out = lab
        .migrate(
            &mut vm,
            "hv2",
            &MigrationParams::default(),
            &mut |e| {
                if let ferry_migrate::SourceEvent::Progress(p) = e {
                    samples.push(p.clone())
                }
            },
            signal,
        )
        .await
        .expect("migration completes");
    assert_eq!(vm.host, "hv2");
    // QEMU stops estimating its pause once it switches over; the outcome keeps the last
    // estimate, so the server can learn how far the pause ran past it on this host pair.
    assert!(
        ferry_migrate::plan::observed_switchover_ms(&out.source).is_some(),
        "the last expected pause is kept: {:?} (samples {:?})",
        out.source.final_progress,
        samples
            .iter()
            .map(|p| p.expected_downtime_ms)
            .collect::<Vec<_>>()
    );
    assert!(out.source.transferred_bytes > 0);
    assert!(out.source.iterations >= 1);
    assert!(!samples.is_empty(), "progress was sampled");
    assert_eq!(
        samples.last().map(|p: &ferry_migrate::Progress| p.percent),
        Some(100.0)
    );
    assert!(pids_in(&lab, "hv1").is_empty(), "source QEMU is gone");
    assert!(!tap_exists(&lab, "hv1", &vm.tap), "source tap is gone");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let echoed = probe.stop();
    assert!(
        echoed.received > 0 && echoed.received + 200 > echoed.sent,
        "{echoed:?}"
    );
    let mut tcp = tokio::task::spawn_blocking(move || {
        tcp_echo_roundtrip(&mut tcp, b"still there").map(|_| tcp)
    })
    .await
    .unwrap()
    .expect("the TCP connection survives the migration");
    assert_heartbeat_continuous(&lab, &vm, "hv1 -> hv2").await;
    assert_alive_and_intact(&lab, &vm).await;

    let (_abort, signal) = AbortHandle::new();
    lab.migrate(
        &mut vm,
        "hv1",
        &MigrationParams::default(),
        &mut |_| {},
        signal,
    )
    .await
    .expect("migration back completes");
    assert_eq!(vm.host, "hv1");
    assert!(pids_in(&lab, "hv2").is_empty());
    tokio::task::spawn_blocking(move || tcp_echo_roundtrip(&mut tcp, b"and back"))
        .await
        .unwrap()
        .expect("the TCP connection survives the way back");
    assert_heartbeat_continuous(&lab, &vm, "hv2 -> hv1").await;
    assert_alive_and_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_the_copy_leaves_the_guest_on_the_source_and_nothing_on_the_destination() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &small_guest()).await.unwrap();
    // 4 MiB/s for 256 MiB of RAM: the copy takes far longer than the moment we abort at.
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(4 << 20),
        ..MigrationParams::default()
    };
    let (abort, signal) = AbortHandle::new();
    let mut seen_copying = false;
    let mut observe = |e: &ferry_migrate::SourceEvent| {
        let ferry_migrate::SourceEvent::Progress(p) = e else {
            return;
        };
        if p.phase == ferry_migrate::Phase::Precopy && p.transferred_bytes > 1 << 20 {
            seen_copying = true;
            abort.abort().expect("the copy has not switched over yet");
        }
    };
    let err = lab
        .migrate(&mut vm, "hv2", &params, &mut observe, signal)
        .await
        .expect_err("aborted");
    assert!(seen_copying, "abort came during the copy");
    assert!(
        matches!(err, LabError::Migrate(MigrateError::Cancelled)),
        "{err}"
    );
    assert_eq!(err.code(), "migration-cancelled");
    assert_eq!(vm.host, "hv1");
    assert_alive_and_intact(&lab, &vm).await;
    assert!(
        pids_in(&lab, "hv2").is_empty(),
        "no QEMU left on the destination"
    );
    assert!(
        !tap_exists(&lab, "hv2", &vm.tap),
        "no tap left on the destination"
    );
    let dest = lab.net.host("hv2").unwrap().clone();
    let port = PortRange::default().first;
    let listener = tokio::task::spawn_blocking(move || {
        tcp_listen_in(&dest.netns, SocketAddr::from((dest.migration_addr, port)))
    })
    .await
    .unwrap();
    assert!(
        listener.is_ok(),
        "the migration port is free again: {listener:?}"
    );
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_destination_port_is_a_clear_error_and_the_next_free_port_is_used() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &small_guest()).await.unwrap();
    let dest = lab.net.host("hv2").unwrap().clone();
    let port = 49200;
    let (ns, addr) = (dest.netns.clone(), dest.migration_addr);
    let _squatter =
        tokio::task::spawn_blocking(move || tcp_listen_in(&ns, SocketAddr::from((addr, port))))
            .await
            .unwrap()
            .unwrap();

    let only_busy = MigrationParams {
        port_range: PortRange {
            first: port,
            last: port,
        },
        ..MigrationParams::default()
    };
    let (_a, signal) = AbortHandle::new();
    let err = lab
        .migrate(&mut vm, "hv2", &only_busy, &mut |_| {}, signal)
        .await
        .expect_err("no free port");
    assert_eq!(err.code(), "migration-port-unavailable", "{err}");
    assert!(err.to_string().contains("49200"), "{err}");
    assert!(err.to_string().contains("stays on the source"), "{err}");
    assert_eq!(vm.host, "hv1");
    assert!(pids_in(&lab, "hv2").is_empty());
    assert_alive_and_intact(&lab, &vm).await;

    let two = MigrationParams {
        port_range: PortRange {
            first: port,
            last: port + 1,
        },
        ..MigrationParams::default()
    };
    let (_a, signal) = AbortHandle::new();
    let out = lab
        .migrate(&mut vm, "hv2", &two, &mut |_| {}, signal)
        .await
        .unwrap();
    assert_eq!(out.destination.port(), port + 1);
    assert_alive_and_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_clear_errors_and_change_nothing() {
    let lab = lab().await;
    let unknown = lab.boot_guest("hv9", &small_guest()).await.unwrap_err();
    assert_eq!(unknown.code(), "unknown-host", "{unknown}");
    assert!(unknown.to_string().contains("hv9"));

    for memory_mib in [0, 10, u32::MAX] {
        let req = GuestRequest {
            memory_mib,
            ..small_guest()
        };
        let err = lab.boot_guest("hv1", &req).await.unwrap_err();
        assert_eq!(err.code(), "invalid-instance-spec", "{memory_mib}: {err}");
        assert!(err.to_string().contains("memory_mib"), "{err}");
    }
    let too_big_wss = GuestRequest {
        config: GuestConfig {
            wss_mib: 4096,
            ..small_guest().config
        },
        ..small_guest()
    };
    assert_eq!(
        lab.boot_guest("hv1", &too_big_wss)
            .await
            .unwrap_err()
            .code(),
        "invalid-request"
    );
    assert!(
        pids_in(&lab, "hv1").is_empty(),
        "nothing was started for bad requests"
    );

    let mut vm = lab.boot_guest("hv1", &small_guest()).await.unwrap();
    let (_a, signal) = AbortHandle::new();
    let err = lab
        .migrate(
            &mut vm,
            "hv9",
            &MigrationParams::default(),
            &mut |_| {},
            signal.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unknown-host");
    let err = lab
        .migrate(
            &mut vm,
            "hv1",
            &MigrationParams::default(),
            &mut |_| {},
            signal.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid-request", "{err}");
    let zero_downtime = MigrationParams {
        downtime_limit_ms: 0,
        ..MigrationParams::default()
    };
    let err = lab
        .migrate(&mut vm, "hv2", &zero_downtime, &mut |_| {}, signal.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid-migration-params", "{err}");
    assert!(pids_in(&lab, "hv2").is_empty());

    // A destination nobody listens at (no such host on the migration network): QEMU's
    // connection fails, the source half reports it and the guest keeps running.
    let nowhere: SocketAddr = "10.78.0.99:49152".parse().unwrap();
    let err = ferry_migrate::source::run_source(
        vm.qemu.qmp(),
        nowhere,
        &MigrationParams::default(),
        &[],
        &mut |_| {},
        signal,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), "migration-failed", "{err}");
    assert_alive_and_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_option_and_sensible_combinations_complete_with_memory_intact() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &small_guest()).await.unwrap();
    let base = MigrationParams::default;
    let cases: Vec<(&str, MigrationParams)> = vec![
        (
            "auto-converge",
            MigrationParams {
                auto_converge: true,
                ..base()
            },
        ),
        (
            "multifd",
            MigrationParams {
                multifd_channels: Some(2),
                ..base()
            },
        ),
        (
            "multifd+zstd",
            MigrationParams {
                multifd_channels: Some(2),
                multifd_compression: Some("zstd".into()),
                ..base()
            },
        ),
        (
            "post-copy allowed",
            MigrationParams {
                postcopy: true,
                ..base()
            },
        ),
        (
            "capped 64 MiB/s, 100 ms",
            MigrationParams {
                bandwidth: Bandwidth::Limited(64 << 20),
                downtime_limit_ms: 100,
                ..base()
            },
        ),
        (
            "xbzrle 32 MiB cache",
            MigrationParams {
                xbzrle_cache_bytes: Some(32 << 20),
                ..base()
            },
        ),
        (
            "auto-converge 30/+20/90 %+xbzrle",
            MigrationParams {
                auto_converge: true,
                throttle_initial_pct: 30,
                throttle_increment_pct: 20,
                max_throttle_pct: 90,
                xbzrle_cache_bytes: Some(16 << 20),
                ..base()
            },
        ),
        (
            "auto-converge+multifd+zstd",
            MigrationParams {
                auto_converge: true,
                multifd_channels: Some(2),
                multifd_compression: Some("zstd".into()),
                ..base()
            },
        ),
    ];
    for (name, params) in cases {
        let to = if vm.host == "hv1" { "hv2" } else { "hv1" };
        let (_abort, signal) = AbortHandle::new();
        let out = lab
            .migrate(&mut vm, to, &params, &mut |_| {}, signal)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(vm.host, to, "{name}");
        assert!(out.source.transferred_bytes > 0, "{name}");
        eprintln!(
            "{name}: {} ms, {} bytes",
            out.source.total_time_ms, out.source.transferred_bytes
        );
        assert_alive_and_intact(&lab, &vm).await;
    }
    lab.stop_guest(vm).await;
}

/// The race of issue "Never two copies": a cancel sent the moment QEMU stops the source for
/// switchover (on its `pre-switchover` event), many times. Each time exactly one side wins:
/// either the cancel (the guest stays, nothing is left on the destination) or the switchover
/// (the cancel is refused as too late and the guest runs on the destination). Never both, and
/// a removed destination never printed a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_at_the_moment_of_switchover_never_leaves_two_copies() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &small_guest()).await.unwrap();
    let (mut cancelled, mut refused) = (0, 0);
    for round in 0..16 {
        let from = vm.host.clone();
        let to = if from == "hv1" { "hv2" } else { "hv1" };
        let (abort, signal) = AbortHandle::new();
        let racer = vm.abort_at_switchover(abort);
        let result = lab
            .migrate(
                &mut vm,
                to,
                &MigrationParams::default(),
                &mut |_| {},
                signal,
            )
            .await;
        let accepted = tokio::time::timeout(Duration::from_secs(5), racer)
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten();
        match (&result, accepted) {
            (Err(LabError::Migrate(MigrateError::Cancelled)), Some(true)) => {
                cancelled += 1;
                assert_eq!(vm.host, from, "round {round}: a cancelled guest stays");
                assert!(
                    pids_in(&lab, to).is_empty(),
                    "round {round}: destination left"
                );
            }
            (Ok(_), Some(false)) => {
                refused += 1;
                assert_eq!(vm.host, to, "round {round}: the switched-over guest moved");
                assert!(
                    pids_in(&lab, &from).is_empty(),
                    "round {round}: source left"
                );
            }
            other => panic!("round {round}: cancel and switchover disagree: {other:?}"),
        }
        assert!(
            vm.stray_beats.is_empty(),
            "round {round}: a removed destination ran the guest: {:?}",
            vm.stray_beats
        );
        assert_eq!(
            pids_in(&lab, "hv1").len() + pids_in(&lab, "hv2").len(),
            1,
            "round {round}: exactly one QEMU"
        );
        assert_heartbeat_continuous(&lab, &vm, &format!("round {round}")).await;
    }
    eprintln!("cancel at switchover: {cancelled} cancelled, {refused} refused as too late");
    assert_alive_and_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

/// The benchmark's ceiling migrates a paused guest: refused unless asked for, then complete,
/// and the guest (paused throughout the copy) runs on the destination with its memory intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_guest_moves_only_when_allowed() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &small_guest()).await.unwrap();
    vm.qemu.qmp().execute(&ferry_qmp::Stop {}).await.unwrap();
    let (_a, signal) = AbortHandle::new();
    let refused = lab
        .migrate(
            &mut vm,
            "hv2",
            &MigrationParams::default(),
            &mut |_| {},
            signal,
        )
        .await
        .expect_err("a paused source is refused by default");
    assert!(
        matches!(
            refused,
            LabError::Migrate(MigrateError::SourceNotRunning(_))
        ),
        "{refused}"
    );
    assert_eq!(vm.host, "hv1");
    // As after any failed migration, the guest runs on the source again: pause it anew.
    vm.qemu.qmp().execute(&ferry_qmp::Stop {}).await.unwrap();
    let status = vm.qemu.qmp().execute(&ferry_qmp::QueryStatus {}).await;
    assert!(!status.unwrap().running);

    let params = MigrationParams {
        allow_paused_source: true,
        ..MigrationParams::default()
    };
    let mut dirty_seen = Vec::new();
    let mut observe = |e: &ferry_migrate::SourceEvent| {
        if let ferry_migrate::SourceEvent::Progress(p) = e {
            dirty_seen.push(p.dirty_rate_bps);
        }
    };
    let (_a, signal) = AbortHandle::new();
    let out = lab
        .migrate(&mut vm, "hv2", &params, &mut observe, signal)
        .await
        .expect("a paused guest migrates when allowed");
    assert_eq!(vm.host, "hv2");
    assert!(
        out.source.transferred_bytes > 32 << 20,
        "its working set moved"
    );
    assert!(
        dirty_seen.iter().all(|d| *d == 0.0),
        "a paused guest dirties nothing: {dirty_seen:?}"
    );
    assert_alive_and_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}
