//! A UEFI guest (OVMF, Debian's `ovmf` package) whose NVRAM lives beside its disk on a shared
//! datastore: it boots, moves hv1 -> hv2 with its memory intact, and its NVRAM file goes
//! with the instance when it is deleted.

mod common;

use std::time::Duration;

use common::Cluster;
use ferry_agent::DatastoreConfig;
use ferry_api::instances::{CreateInstance, DiskRequest, FirmwareKind, Instance, InstanceState};
use ferry_api::migrations::{MigrationOptions, MigrationState};
use ferry_server::config::Limits;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uefi_guest_boots_moves_and_takes_its_nvram_along() {
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(
        shared.path().join(".ferry-datastore-id"),
        "uefi-test-shared\n",
    )
    .unwrap();
    let path = shared.path().to_path_buf();
    let c = Cluster::start_with(2, Limits::default(), move |config| {
        config.datastores.push(DatastoreConfig {
            name: "shared".into(),
            path: path.clone(),
            identity: None,
        });
    })
    .await;
    let mut spec = c.guest_spec(3, 256, Cluster::small_guest());
    spec.boot.firmware = FirmwareKind::Uefi;
    let vm: Instance = c
        .admin
        .post(
            "/v1/instances",
            &CreateInstance {
                name: "uefi".into(),
                host: Some("hv1".into()),
                spec,
                disks: vec![DiskRequest {
                    size_bytes: Some(8 << 20),
                    datastore: Some("shared".into()),
                    ..DiskRequest::default()
                }],
                start: true,
            },
        )
        .await
        .expect("a UEFI instance is created and started");
    assert_eq!(vm.state, InstanceState::Running);
    let nvram = vm.spec.boot.nvram.clone().expect("an NVRAM file was made");
    assert_eq!(nvram.datastore, "shared");
    let nvram_path = shared.path().join(&nvram.file);
    assert!(nvram_path.is_file(), "{nvram_path:?}");
    // OVMF under TCG takes a while before it hands over to the kernel.
    c.guest_control(3, "status", Duration::from_secs(180)).await;

    let m = c.migrate("uefi", "hv2", MigrationOptions::default()).await;
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}");
    assert_eq!(c.instance("uefi").await.host, "hv2");
    let report = c.verify(3).await;
    assert!(report.checked > 0 && report.errors == 0, "{report:?}");

    let _: Instance = c
        .admin
        .post("/v1/instances/uefi/stop?force=true", &())
        .await
        .expect("stopped");
    let _: serde_json::Value = c.admin.delete("/v1/instances/uefi").await.expect("deleted");
    assert!(!nvram_path.exists(), "the NVRAM goes with the instance");
    c.shutdown().await;
}
