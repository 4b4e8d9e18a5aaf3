//! One end-to-end run against the installed QEMU (`qemu-system-x86_64`, 7.2 in the lab).
//! Skipped with a message when the binary is not on PATH.

use std::process::Stdio;
use std::time::Duration;

use ferry_qmp::*;
use tokio::process::Command;

#[tokio::test]
async fn real_qemu_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let spawned = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    // No quiet skip: CI installs QEMU, and a machine without it must fail loudly here.
    let mut child =
        spawned.expect("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86)");

    // The socket appears a little after the process starts: connect retries.
    let qmp = Qmp::connect(&sock, Duration::from_secs(10)).await.unwrap();
    let v = qmp.version().clone();
    eprintln!("connected to QEMU {v}");
    assert!(v.major >= 7);

    let st = qmp.execute(&QueryStatus).await.unwrap();
    assert!(st.running);
    assert_eq!(st.status, RunState::Running);

    let mig = qmp.execute(&QueryMigrate).await.unwrap();
    assert_eq!(mig.status, None, "no migration yet: {mig:?}");

    let ver = qmp.execute(&QueryVersion).await.unwrap();
    assert_eq!(QemuVersion::from(ver), v);

    let caps = qmp.execute(&QueryMigrateCapabilities).await.unwrap();
    assert!(caps
        .iter()
        .any(|c| c.capability == capability::POSTCOPY_RAM));

    qmp.execute(&MigrateSetParameters {
        max_bandwidth: Some(1 << 30),
        downtime_limit: Some(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let params = qmp.execute(&QueryMigrateParameters).await.unwrap();
    assert_eq!(params.max_bandwidth, Some(1 << 30));
    assert_eq!(params.downtime_limit, Some(200));
    // Everything QEMU 7.2 reports is modelled.
    if v.major == 7 && v.minor == 2 {
        assert!(params.extra.is_empty(), "{:?}", params.extra);
    }

    // A real error reply names the command.
    let err = qmp
        .execute(&MigrateIncoming::new("tcp:127.0.0.1:1"))
        .await
        .unwrap_err();
    eprintln!("expected error: {err}");
    assert!(err
        .to_string()
        .starts_with("migrate-incoming failed: GenericError: "));

    qmp.quit().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("QEMU exits after quit")
        .unwrap();
    assert!(status.success(), "QEMU exit status {status}");
    tokio::time::timeout(Duration::from_secs(2), qmp.closed())
        .await
        .expect("client sees the socket close");
    let _ = child.kill().await;
}
