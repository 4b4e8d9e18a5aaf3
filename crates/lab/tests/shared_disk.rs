//! Live migration of lab guests whose disk is on a datastore both lab hosts share (needs root
//! and QEMU; CI has both). The guest writes self-checking blocks to the disk the whole time
//! and verifies every block (and every page of its memory) after each move or abort.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_lab::guest_client;
use ferry_lab::guest_config::{GuestConfig, GuestDisk, CONTROL_PORT};
use ferry_lab::net::unique_test_lab_name;
use ferry_lab::{GuestRequest, Lab, LabError, LabOptions, LabVm};
use ferry_migrate::{AbortHandle, Bandwidth, MigrateError, MigrationParams};
use ferry_qemu::{CacheMode, DiskBus, DiskFormat, DiskSpec};
use ferry_qmp::Qmp;

const SERIAL: &str = "ferry-data";
/// The block node QEMU gives the data disk (`ferry_qemu::node_name("data")`).
const DISK_NODE: &str = "ferry-data";

async fn lab() -> Lab {
    ferry_lab::net::remove_orphan_test_labs();
    Lab::start(LabOptions::new(&unique_test_lab_name(), 2))
        .await
        .expect("lab starts")
}

/// A fresh (all-zero) qcow2 image: the guest's writer expects blocks it has not written yet
/// to read as zeros.
fn qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(size)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// A lab guest that dirties memory and writes 200 durable blocks per second to a 16 MiB disk.
fn guest_with_disk(path: PathBuf) -> GuestRequest {
    GuestRequest {
        name: "d-vm".into(),
        memory_mib: 256,
        vcpus: 1,
        disks: vec![DiskSpec {
            id: "data".into(),
            path,
            format: DiskFormat::Qcow2,
            bus: DiskBus::VirtioBlk,
            cache: CacheMode::None,
            read_only: false,
            serial: Some(SERIAL.into()),
            backing: None,
        }],
        config: GuestConfig {
            wss_mib: 32,
            rate_mib_s: 16,
            disk: Some(GuestDisk {
                rate_blocks_s: 200,
                blocks: Some(4096),
                ..GuestDisk::new(SERIAL)
            }),
            ..GuestConfig::default()
        },
    }
}

/// The block nodes QEMU has open, by node name, and whether each is active (this QEMU may
/// write it) per `query-named-block-nodes` (`BlockDeviceInfo.active`, QEMU 10.0 and later);
/// `None` if the monitor does not answer within a second (its QEMU has gone).
async fn nodes(qmp: &Qmp) -> Option<Vec<(String, bool)>> {
    let query = qmp.execute_raw(
        "query-named-block-nodes",
        Some(serde_json::json!({"flat": true})),
    );
    let v = tokio::time::timeout(Duration::from_secs(1), query)
        .await
        .ok()?
        .ok()?;
    Some(
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let active = n["active"]
                    .as_bool()
                    .expect("QEMU 10.0 reports whether each node is active");
                (n["node-name"].as_str().unwrap_or("").to_string(), active)
            })
            .collect(),
    )
}

/// Whether the data disk's nodes (its qcow2 node and the file node under it) are active on
/// this QEMU: QEMU takes the image's write lock only while they are. `None` if the monitor
/// does not answer. Activation is all or nothing per graph, so a mix is a failure.
async fn disk_active(qmp: &Qmp) -> Option<bool> {
    let all = nodes(qmp).await?;
    let disk: Vec<_> = all
        .iter()
        .filter(|(name, _)| name == DISK_NODE || name == &format!("{DISK_NODE}-file"))
        .collect();
    assert_eq!(disk.len(), 2, "the disk's format and file nodes: {all:?}");
    assert_eq!(disk[0].1, disk[1].1, "half-active disk: {all:?}");
    Some(disk[0].1)
}

/// A third process opening the image read-write, as another QEMU or a careless `qemu-img`
/// would, must be refused by QEMU's image locking while a QEMU has the disk active. The open
/// is read-write (qemu-io's default, which asks for the `write` permission at open); the
/// command only reads, so nothing is written even if the lock failed.
fn assert_third_writer_refused(image: &Path, when: &str) {
    let out = qemu_io_rw(image);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("\"write\" lock"),
        "{when}: a third writer was not refused by the image lock ({}): {stderr}",
        out.status
    );
}

fn qemu_io_rw(image: &Path) -> std::process::Output {
    std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read 0 512"])
        .arg(image)
        .output()
        .expect("qemu-io runs")
}

/// What a watcher saw of the disk's activation on both QEMUs during one migration.
#[derive(Debug, Default)]
struct Handover {
    /// Samples with the destination's disk inactive while the source's was active.
    dest_inactive_source_active: u32,
    /// Samples with the destination's disk active and the source's inactive or gone.
    dest_active_source_not: u32,
}

/// Samples the disk's activation on the destination (once the lab has launched it) and then
/// on the source every few milliseconds until `done`, and fails if both are active. The order
/// matters: the destination activates only after the source has inactivated and, in a
/// migration that completes, the source never reactivates after that, so "destination active"
/// followed by "source active" is two writers at once and not a handover between the queries.
async fn watch_handover(lab: &Lab, guest: &str, source: &Qmp, done: &AtomicBool) -> Handover {
    let mut seen = Handover::default();
    while !done.load(Ordering::SeqCst) {
        if let Some(dest) = lab.incoming_qmp(guest) {
            let d = disk_active(&dest).await;
            let s = disk_active(source).await;
            match (d, s) {
                (Some(true), Some(true)) => panic!("both QEMUs have the disk active"),
                (Some(false), Some(true)) => seen.dest_inactive_source_active += 1,
                (Some(true), _) => seen.dest_active_source_not += 1,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

/// The guest's disk writes as it counts them.
async fn disk_writes(lab: &Lab, vm: &LabVm) -> u64 {
    let status = vm.status(lab).await.expect("status answers");
    let disk = status.disk.expect("the guest has its disk");
    assert_eq!(disk.failures, 0, "{disk:?}");
    disk.writes
}

/// The guest's disk writes as it counts them, asked at its address over the guest network
/// (the `LabVm` is lent to the migration meanwhile).
async fn disk_writes_at(lab: &Lab, ip: Ipv4Addr) -> u64 {
    let addr = SocketAddr::from((ip, CONTROL_PORT));
    let line = guest_client::control_in(&lab.net.client_netns, addr, "status")
        .await
        .expect("status answers");
    let status = guest_client::parse_status(&line).expect("a status line");
    let disk = status.disk.expect("the guest has its disk");
    assert_eq!(disk.failures, 0, "{disk:?}");
    disk.writes
}

/// The disk node is active on the QEMU that runs the guest and holds the image's write lock
/// against a third writer, the writer goes on writing, and every block and every page
/// verifies.
async fn assert_disk_and_memory_intact(lab: &Lab, vm: &LabVm, image: &Path, after: &str) {
    assert_eq!(
        disk_active(vm.qemu.qmp()).await,
        Some(true),
        "{after}: the running copy's disk node is active"
    );
    assert_third_writer_refused(image, after);
    let before = disk_writes(lab, vm).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = disk_writes(lab, vm).await;
    assert!(
        later > before,
        "{after}: the guest writes its disk ({before} -> {later})"
    );
    let disk = vm.disk_verify(lab).await.expect("disk-verify answers");
    assert!(
        disk.ok && disk.errors == 0 && disk.blocks_checked == 4096,
        "{after}: {disk:?}"
    );
    let memory = vm.verify(lab).await.expect("verify answers");
    assert_eq!(memory.errors, 0, "{after}: {memory:?}");
    eprintln!(
        "{after}: {} disk writes, {} blocks and {} pages verified",
        disk.writes, disk.blocks_checked, memory.checked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_writing_its_shared_disk_migrates_there_and_back_and_every_block_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab().await;
    let image = qcow2(dir.path(), "d-vm-data.qcow2", "16M");
    let mut vm = lab
        .boot_guest("hv1", &guest_with_disk(image.clone()))
        .await
        .unwrap();
    assert_disk_and_memory_intact(&lab, &vm, &image, "boot").await;
    let name = vm.name.clone();
    for to in ["hv2", "hv1"] {
        let source = vm.qemu.qmp().clone();
        let source_exit = vm.qemu.exit_watch();
        let done = AtomicBool::new(false);
        let (_abort, signal) = AbortHandle::new();
        let (result, seen) = tokio::join!(
            async {
                let result = lab
                    .migrate(
                        &mut vm,
                        to,
                        &MigrationParams::default(),
                        &mut |_| {},
                        signal,
                    )
                    .await;
                done.store(true, Ordering::SeqCst);
                result
            },
            watch_handover(&lab, &name, &source, &done)
        );
        result.expect("migration completes");
        eprintln!("move to {to}: {seen:?}");
        assert!(
            seen.dest_inactive_source_active > 0,
            "move to {to}: the destination was seen waiting with its disk inactive: {seen:?}"
        );
        assert_eq!(vm.host, to);
        assert!(
            source_exit.borrow().is_some() || disk_active(&source).await != Some(true),
            "move to {to}: the source QEMU is gone or has its disk inactive"
        );
        assert_disk_and_memory_intact(&lab, &vm, &image, &format!("move to {to}")).await;
    }
    lab.stop_guest(vm).await;
    // The refusals above were the running QEMU's lock: with no QEMU left the same open works.
    let out = qemu_io_rw(&image);
    assert!(
        out.status.success(),
        "the image opens read-write once the guest is stopped: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_mid_copy_leaves_the_guest_writing_its_disk_on_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab().await;
    let image = qcow2(dir.path(), "d-vm-data.qcow2", "16M");
    let mut vm = lab
        .boot_guest("hv1", &guest_with_disk(image.clone()))
        .await
        .unwrap();
    // 4 MiB/s for 256 MiB of RAM: the copy takes far longer than the moment we abort at.
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(4 << 20),
        ..MigrationParams::default()
    };
    let (abort, signal) = AbortHandle::new();
    let copying = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let mut observe = |e: &ferry_migrate::SourceEvent| {
        if let ferry_migrate::SourceEvent::Progress(p) = e {
            if p.phase == ferry_migrate::Phase::Precopy && p.transferred_bytes > 1 << 20 {
                copying.store(true, Ordering::SeqCst);
            }
        }
    };
    let (name, ip) = (vm.name.clone(), vm.ip);
    let source = vm.qemu.qmp().clone();
    // While the memory copy runs, with the guest still running and writing on the source:
    // only the source has the disk active, and its lock keeps a third writer out. Then abort.
    let (result, checked) = tokio::join!(
        async {
            let result = lab
                .migrate(&mut vm, "hv2", &params, &mut observe, signal)
                .await;
            done.store(true, Ordering::SeqCst);
            result
        },
        async {
            while !copying.load(Ordering::SeqCst) {
                if done.load(Ordering::SeqCst) {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let dest = lab.incoming_qmp(&name).expect("the destination QEMU runs");
            assert_eq!(
                disk_active(&dest).await,
                Some(false),
                "mid-copy: the destination's disk node is inactive"
            );
            assert_eq!(
                disk_active(&source).await,
                Some(true),
                "mid-copy: the source's disk node is active"
            );
            assert_third_writer_refused(&image, "mid-copy");
            let before = disk_writes_at(&lab, ip).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let later = disk_writes_at(&lab, ip).await;
            assert!(
                later > before,
                "mid-copy: the guest writes its disk ({before} -> {later})"
            );
            let _ = abort.abort();
            true
        }
    );
    assert!(checked, "the checks and the abort came during the copy");
    let err = result.expect_err("aborted");
    assert!(
        matches!(err, LabError::Migrate(MigrateError::Cancelled)),
        "{err}"
    );
    assert_eq!(vm.host, "hv1");
    assert_disk_and_memory_intact(&lab, &vm, &image, "abort mid-copy").await;

    // And a cancel at the moment QEMU stops the guest for switchover: whichever side wins,
    // the guest writes its disk where it runs and every block is there.
    for round in 0..4 {
        let to = if vm.host == "hv1" { "hv2" } else { "hv1" };
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
        let cancelled = racer.await.ok().flatten().unwrap_or(false);
        match &result {
            Err(LabError::Migrate(MigrateError::Cancelled)) => assert!(cancelled),
            Ok(_) => assert!(!cancelled, "round {round}: switched over after a cancel"),
            Err(e) => panic!("round {round}: {e}"),
        }
        assert_disk_and_memory_intact(
            &lab,
            &vm,
            &image,
            &format!("cancel at switchover, round {round}"),
        )
        .await;
    }
    lab.stop_guest(vm).await;
}
