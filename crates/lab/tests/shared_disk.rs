//! Live migration of lab guests whose disks are on a datastore both lab hosts share (needs
//! root and QEMU; CI has both).

use std::path::{Path, PathBuf};

use ferry_lab::guest_config::GuestConfig;
use ferry_lab::net::unique_test_lab_name;
use ferry_lab::{GuestRequest, Lab, LabOptions};
use ferry_migrate::{AbortHandle, MigrationParams};
use ferry_qemu::{CacheMode, DiskBus, DiskFormat, DiskSpec};

async fn lab() -> Lab {
    ferry_lab::net::remove_orphan_test_labs();
    Lab::start(LabOptions::new(&unique_test_lab_name(), 2))
        .await
        .expect("lab starts")
}

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
            serial: Some("ferry-data".into()),
            backing: None,
        }],
        config: GuestConfig {
            wss_mib: 32,
            rate_mib_s: 16,
            ..GuestConfig::default()
        },
    }
}

/// The block nodes QEMU has open, by node name, with whether each is active (writable by
/// this QEMU) per `query-named-block-nodes`' `active` flag.
async fn nodes(vm: &ferry_lab::LabVm) -> Vec<(String, bool)> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_with_a_disk_on_shared_storage_migrates_there_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab().await;
    let image = qcow2(dir.path(), "d-vm-data.qcow2", "64M");
    let mut vm = lab
        .boot_guest("hv1", &guest_with_disk(image))
        .await
        .unwrap();
    let before = nodes(&vm).await;
    assert!(
        before.contains(&("ferry-data".to_string(), true)),
        "{before:?}"
    );
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
        let after = nodes(&vm).await;
        assert!(
            after.contains(&("ferry-data".to_string(), true)),
            "{to}: {after:?}"
        );
    }
    lab.stop_guest(vm).await;
}
