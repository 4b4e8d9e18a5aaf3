//! Live migration of lab guests whose disk is on a datastore both lab hosts share (needs root
//! and QEMU; CI has both). The guest writes self-checking blocks to the disk the whole time
//! and verifies every block (and every page of its memory) after each move or abort.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_lab::guest_config::{GuestConfig, GuestDisk};
use ferry_lab::net::unique_test_lab_name;
use ferry_lab::{GuestRequest, Lab, LabError, LabOptions, LabVm};
use ferry_migrate::{AbortHandle, Bandwidth, MigrateError, MigrationParams};
use ferry_qemu::{CacheMode, DiskBus, DiskFormat, DiskSpec};

const SERIAL: &str = "ferry-data";

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
/// write it) per `query-named-block-nodes`.
async fn nodes(vm: &LabVm) -> Vec<(String, bool)> {
    let v = vm
        .qemu
        .qmp()
        .execute_raw(
            "query-named-block-nodes",
            Some(serde_json::json!({"flat": true})),
        )
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node-name"].as_str().unwrap_or("").to_string(),
                n["active"].as_bool().unwrap_or(true),
            )
        })
        .collect()
}

/// The guest's disk writes as it counts them.
async fn disk_writes(lab: &Lab, vm: &LabVm) -> u64 {
    let status = vm.status(lab).await.expect("status answers");
    let disk = status.disk.expect("the guest has its disk");
    assert_eq!(disk.failures, 0, "{disk:?}");
    disk.writes
}

/// The disk node is active on the QEMU that runs the guest, the writer goes on writing, and
/// every block and every page verifies.
async fn assert_disk_and_memory_intact(lab: &Lab, vm: &LabVm, after: &str) {
    let open = nodes(vm).await;
    assert!(
        open.contains(&("ferry-data".to_string(), true)),
        "{after}: the running copy's disk node is active: {open:?}"
    );
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
        .boot_guest("hv1", &guest_with_disk(image))
        .await
        .unwrap();
    assert_disk_and_memory_intact(&lab, &vm, "boot").await;
    for to in ["hv2", "hv1"] {
        let (_abort, signal) = AbortHandle::new();
        lab.migrate(
            &mut vm,
            to,
            &MigrationParams::default(),
            &mut |_| {},
            signal,
        )
        .await
        .expect("migration completes");
        assert_eq!(vm.host, to);
        assert_disk_and_memory_intact(&lab, &vm, &format!("move to {to}")).await;
    }
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_mid_copy_leaves_the_guest_writing_its_disk_on_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab().await;
    let image = qcow2(dir.path(), "d-vm-data.qcow2", "16M");
    let mut vm = lab
        .boot_guest("hv1", &guest_with_disk(image))
        .await
        .unwrap();
    // 4 MiB/s for 256 MiB of RAM: the copy takes far longer than the moment we abort at.
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(4 << 20),
        ..MigrationParams::default()
    };
    let (abort, signal) = AbortHandle::new();
    let mut seen_copying = false;
    let mut observe = |e: &ferry_migrate::SourceEvent| {
        if let ferry_migrate::SourceEvent::Progress(p) = e {
            if p.phase == ferry_migrate::Phase::Precopy && p.transferred_bytes > 1 << 20 {
                seen_copying = true;
                let _ = abort.abort();
            }
        }
    };
    let err = lab
        .migrate(&mut vm, "hv2", &params, &mut observe, signal)
        .await
        .expect_err("aborted");
    assert!(seen_copying, "the abort came during the copy");
    assert!(
        matches!(err, LabError::Migrate(MigrateError::Cancelled)),
        "{err}"
    );
    assert_eq!(vm.host, "hv1");
    assert_disk_and_memory_intact(&lab, &vm, "abort mid-copy").await;

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
        assert_disk_and_memory_intact(&lab, &vm, &format!("cancel at switchover, round {round}"))
            .await;
    }
    lab.stop_guest(vm).await;
}
