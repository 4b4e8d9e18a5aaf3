//! The agent's half of cold migration copies, through its API as the server drives it: two
//! standalone agents on this machine (migration address 127.0.0.1), each with a local
//! datastore; a crash of an agent mid-copy simulated by starting a second agent on a copy of
//! its state (needs qemu-img, qemu-nbd, qemu-io).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_agent::{AgentConfig, AgentHandle, DatastoreConfig};
use ferry_api::agent::{
    AgentInstance, ChecksumImage, ChecksumState, ChecksumStatus, CleanedUp, CleanupCopies,
    CopyReceiving, CopyState, CopyStatus, DefineInstance, ImageMeasure, MeasureImage, ReceiveCopy,
    SendCopy,
};
use ferry_api::instances::{BootSpec, DiskFormat, DiskSpec, ImageRef, InstanceSpec};
use ferry_api::{ApiClient, ApiError};
use uuid::Uuid;

#[path = "../../lab/tests/common/certs.rs"]
mod certs;
mod common;

use common::{client, config};

fn host(name: &str, root: &Path, ports: &str) -> AgentConfig {
    let store = root.join(format!("{name}-local"));
    std::fs::create_dir_all(&store).unwrap();
    let mut c = config(
        name,
        &root.join(format!("{name}-state")),
        None,
        Ipv4Addr::LOCALHOST,
    );
    c.migration_ports = ports.into();
    c.datastores = vec![DatastoreConfig {
        name: "local".into(),
        path: store,
        identity: None,
    }];
    c
}

fn local(file: &str) -> ImageRef {
    ImageRef {
        datastore: "local".into(),
        file: file.into(),
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn code(e: &ApiError) -> (Option<u16>, String) {
    (e.status(), e.code())
}

/// Live processes whose command line carries `needle`.
fn processes_with(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .count()
}

async fn wait_gone(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_with(needle) > 0 {
        assert!(Instant::now() < deadline, "processes with {needle} remain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn checksum(c: &ApiClient, image: &ImageRef, format: DiskFormat) -> String {
    let body = ChecksumImage {
        image: image.clone(),
        format,
        wait_ms: 5000,
    };
    loop {
        let s: ChecksumStatus = c.post("/v1/disks/checksum", &body).await.unwrap();
        match s.state {
            ChecksumState::Running => continue,
            ChecksumState::Done => return s.sha256.unwrap(),
            ChecksumState::Failed => panic!("checksum failed: {:?}", s.error),
        }
    }
}

async fn wait_sent(c: &ApiClient, mid: Uuid, disk: &str) -> CopyStatus {
    let mut after = None;
    loop {
        let mut path = format!("/v1/copies/{mid}/{disk}?wait_ms=1000");
        if let Some(d) = after {
            path.push_str(&format!("&after_done={d}"));
        }
        let s: CopyStatus = c.get(&path).await.unwrap();
        after = Some(s.done_bytes);
        match s.state {
            CopyState::Sending => {}
            CopyState::Sent => return s,
            other => panic!("copy ended {other:?}: {:?}", s.error),
        }
    }
}

/// A second agent on a copy of `config`'s state directory: what the same agent finds when it
/// restarts after a crash.
async fn restarted_copy_of(
    config: &AgentConfig,
    root: &Path,
    name: &str,
) -> (AgentHandle, PathBuf) {
    let state = root.join(name);
    run(Command::new("cp")
        .arg("-a")
        .arg(&config.state_dir)
        .arg(&state));
    let mut c = config.clone();
    c.state_dir = state.clone();
    (ferry_agent::start(c).await.expect("agent starts"), state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_copy_through_two_agents_and_what_a_restart_cleans() {
    let root = tempfile::tempdir().unwrap();
    let (cfg1, cfg2) = (
        host("hv1", root.path(), "49300-49309"),
        host("hv2", root.path(), "49310-49319"),
    );
    let a1 = ferry_agent::start(cfg1.clone()).await.expect("agent 1");
    let a2 = ferry_agent::start(cfg2.clone()).await.expect("agent 2");
    let (c1, c2) = (client(&a1), client(&a2));
    let src_path = cfg1.datastores[0].path.join("vm-disk0.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&src_path)
        .arg("256M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 4M"])
        .arg(&src_path));
    let image = local("vm-disk0.qcow2");
    let dst_path = cfg2.datastores[0].path.join("vm-disk0.qcow2");

    let measured: ImageMeasure = c1
        .post(
            "/v1/disks/measure",
            &MeasureImage {
                image: image.clone(),
                format: DiskFormat::Qcow2,
            },
        )
        .await
        .unwrap();
    assert_eq!(measured.size_bytes, 256 << 20);
    assert!(measured.allocated_bytes < 16 << 20, "{measured:?}");

    // The server's sequence: receive, send, follow, finish, checksums, commit.
    let mid = Uuid::new_v4();
    let receive = ReceiveCopy {
        image: image.clone(),
        format: DiskFormat::Qcow2,
        size_bytes: measured.size_bytes,
        required_bytes: measured.allocated_bytes,
        tls: None,
    };
    let at: CopyReceiving = c2
        .post(&format!("/v1/copies/{mid}/disk0/receive"), &receive)
        .await
        .unwrap();
    assert!(at.addr.starts_with("127.0.0.1:4931"), "{at:?}");
    let again: CopyReceiving = c2
        .post(&format!("/v1/copies/{mid}/disk0/receive"), &receive)
        .await
        .unwrap();
    assert_eq!(again, at, "receive is idempotent while it runs");
    let receiving: CopyStatus = c2.get(&format!("/v1/copies/{mid}/disk0")).await.unwrap();
    assert_eq!(receiving.state, CopyState::Receiving);
    let send = SendCopy {
        image: image.clone(),
        format: DiskFormat::Qcow2,
        destination: at.addr.clone(),
        export: at.export.clone(),
        rate_limit_bps: None,
        tls: None,
    };
    let _: CopyStatus = c1
        .post(&format!("/v1/copies/{mid}/disk0/send"), &send)
        .await
        .unwrap();
    let sent = wait_sent(&c1, mid, "disk0").await;
    assert_eq!((sent.done_bytes, sent.total_bytes), (256 << 20, 256 << 20));
    let early = c2
        .post::<_, ()>(&format!("/v1/copies/{mid}/disk0/commit"), &())
        .await
        .unwrap_err();
    assert_eq!(code(&early), (Some(409), "copy-not-received".into()));
    let received: CopyStatus = c2
        .post(&format!("/v1/copies/{mid}/disk0/finish"), &())
        .await
        .unwrap();
    assert_eq!(received.state, CopyState::Received);
    wait_gone(&at.export).await;
    let _: CopyStatus = c1
        .post(&format!("/v1/copies/{mid}/disk0/finish"), &())
        .await
        .unwrap();
    let (s1, s2) = tokio::join!(
        checksum(&c1, &image, DiskFormat::Qcow2),
        checksum(&c2, &image, DiskFormat::Qcow2)
    );
    assert_eq!(s1, s2);

    // A received, uncommitted image survives a crash of its agent: the restarted agent can
    // still commit it (or abort it).
    let (a3, _) = restarted_copy_of(&cfg2, root.path(), "hv2-after-crash").await;
    let c3 = client(&a3);
    let kept: CopyStatus = c3.get(&format!("/v1/copies/{mid}/disk0")).await.unwrap();
    assert_eq!(kept.state, CopyState::Received);
    assert!(dst_path.exists());
    a3.shutdown().await;
    let _: () = c2
        .post(&format!("/v1/copies/{mid}/disk0/commit"), &())
        .await
        .unwrap();
    let gone = c2
        .post::<_, ()>(&format!("/v1/copies/{mid}/disk0/abort"), &())
        .await
        .unwrap_err();
    assert_eq!(code(&gone), (Some(404), "copy-not-found".into()));
    assert!(dst_path.exists(), "a committed image is never aborted");

    // Bad requests change nothing.
    let exists = c2
        .post::<_, CopyReceiving>(
            &format!("/v1/copies/{}/disk0/receive", Uuid::new_v4()),
            &receive,
        )
        .await
        .unwrap_err();
    assert_eq!(code(&exists), (Some(409), "copy-target-exists".into()));
    let bad_disk = c2
        .post::<_, CopyReceiving>(&format!("/v1/copies/{mid}/..%2Fx/receive"), &receive)
        .await
        .unwrap_err();
    assert_eq!(bad_disk.status(), Some(400), "{bad_disk}");
    let mut elsewhere = receive.clone();
    elsewhere.image.datastore = "nope".into();
    let unknown = c2
        .post::<_, CopyReceiving>(&format!("/v1/copies/{mid}/disk1/receive"), &elsewhere)
        .await
        .unwrap_err();
    assert_eq!(code(&unknown), (Some(422), "unknown-datastore".into()));
    let mut huge = receive.clone();
    huge.image = local("huge.qcow2");
    huge.required_bytes = u64::MAX / 2;
    let no_room = c2
        .post::<_, CopyReceiving>(&format!("/v1/copies/{mid}/disk1/receive"), &huge)
        .await
        .unwrap_err();
    assert_eq!(code(&no_room), (Some(422), "no-room".into()));
    assert!(!cfg2.datastores[0].path.join("huge.qcow2").exists());
    let nothing: CopyStatus = c1
        .get(&format!("/v1/copies/{}/disk0", Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(nothing.state, CopyState::Unknown);

    // A crash while receiving: the restarted agent kills the export and removes the image.
    let mid2 = Uuid::new_v4();
    let partial = local("partial.raw");
    let at2: CopyReceiving = c2
        .post(
            &format!("/v1/copies/{mid2}/disk0/receive"),
            &ReceiveCopy {
                image: partial.clone(),
                format: DiskFormat::Raw,
                size_bytes: 8 << 20,
                required_bytes: 0,
                tls: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(processes_with(&at2.export), 1, "one qemu-nbd exports it");
    let partial_path = cfg2.datastores[0].path.join("partial.raw");
    assert!(partial_path.exists());
    let (a4, state4) = restarted_copy_of(&cfg2, root.path(), "hv2-crash-receiving").await;
    wait_gone(&at2.export).await;
    assert!(
        !partial_path.exists(),
        "partial image left after the restart"
    );
    assert_eq!(
        std::fs::read_dir(state4.join("copies")).unwrap().count(),
        0,
        "record left"
    );
    a4.shutdown().await;
    // The first agent's own view: its export died; aborting cleans its record.
    let _: () = c2
        .post(&format!("/v1/copies/{mid2}/disk0/abort"), &())
        .await
        .unwrap();

    // Cleanup of the source copy: refused while an instance here uses it, then removed once.
    let spec = InstanceSpec {
        memory_mib: 64,
        vcpus: 1,
        cpu_model: "qemu64".into(),
        machine: "pc".into(),
        boot: BootSpec {
            from: ferry_api::instances::BootFrom::Disk,
            ..BootSpec::default()
        },
        disks: vec![DiskSpec {
            id: "disk0".into(),
            image: image.clone(),
            format: DiskFormat::Qcow2,
            size_bytes: 256 << 20,
            bus: Default::default(),
            cache: Default::default(),
            read_only: false,
            serial: None,
            backing: None,
            managed: true,
        }],
        nics: vec![],
    };
    let vm = Uuid::new_v4();
    let _: AgentInstance = c1
        .put(
            &format!("/v1/instances/{vm}"),
            &DefineInstance {
                name: "vm".into(),
                spec,
            },
        )
        .await
        .unwrap();
    let cleanup = CleanupCopies {
        images: vec![image.clone()],
    };
    let in_use = c1
        .post::<_, CleanedUp>(&format!("/v1/copies/{mid}/cleanup"), &cleanup)
        .await
        .unwrap_err();
    assert_eq!(code(&in_use), (Some(409), "image-in-use".into()));
    assert!(src_path.exists());
    let _: () = c1.delete(&format!("/v1/instances/{vm}")).await.unwrap();
    let done: CleanedUp = c1
        .post(&format!("/v1/copies/{mid}/cleanup"), &cleanup)
        .await
        .unwrap();
    assert_eq!((done.removed.len(), done.missing.len()), (1, 0));
    assert!(!src_path.exists());
    let again: CleanedUp = c1
        .post(&format!("/v1/copies/{mid}/cleanup"), &cleanup)
        .await
        .unwrap();
    assert_eq!((again.removed.len(), again.missing.len()), (0, 1));
    a1.shutdown().await;
    a2.shutdown().await;
}

/// Where an agent keeps a copy half's credentials while it runs.
fn copy_tls_dir(config: &AgentConfig, mid: Uuid, disk: &str) -> PathBuf {
    config
        .state_dir
        .join("copies")
        .join(format!("{mid}-{disk}.tls"))
}

/// The server's sequence with per-migration credentials: the copy runs over TLS through both
/// agents and is identical; a receiver holding another migration's credentials refuses the
/// sender, the copy fails cleanly and abort removes the partial image; every credential
/// directory is gone after both, and one a crash left is removed when the agent starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_disk_copy_through_two_agents() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let (cfg1, cfg2) = (
        host("tls1", root.path(), "49340-49349"),
        host("tls2", root.path(), "49350-49359"),
    );
    let stale = cfg2
        .state_dir
        .join("copies")
        .join(format!("{}-disk0.tls", Uuid::new_v4()));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("server-key.pem"), "left by a crash").unwrap();
    let a1 = ferry_agent::start(cfg1.clone()).await.expect("agent 1");
    let a2 = ferry_agent::start(cfg2.clone()).await.expect("agent 2");
    assert!(!stale.exists(), "stale copy credentials survived the start");
    let (c1, c2) = (client(&a1), client(&a2));
    let src_path = cfg1.datastores[0].path.join("vm-disk0.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&src_path)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 4M"])
        .arg(&src_path));
    let image = local("vm-disk0.qcow2");
    let lo = std::net::IpAddr::V4(Ipv4Addr::LOCALHOST);
    let pair = certs::issue_migration_pair(&certs::fresh_id(), lo);
    let (source_tls, destination_tls) = certs::halves(&pair, lo);

    let mid = Uuid::new_v4();
    let receive = ReceiveCopy {
        image: image.clone(),
        format: DiskFormat::Qcow2,
        size_bytes: 64 << 20,
        required_bytes: 0,
        tls: Some(destination_tls.clone()),
    };
    let at: CopyReceiving = c2
        .post(&format!("/v1/copies/{mid}/disk0/receive"), &receive)
        .await
        .unwrap();
    let dst_dir = copy_tls_dir(&cfg2, mid, "disk0");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dst_dir), 0o700);
    assert_eq!(mode(&dst_dir.join("server-key.pem")), 0o600);
    let send = SendCopy {
        image: image.clone(),
        format: DiskFormat::Qcow2,
        destination: at.addr.clone(),
        export: at.export.clone(),
        rate_limit_bps: None,
        tls: Some(source_tls.clone()),
    };
    let _: CopyStatus = c1
        .post(&format!("/v1/copies/{mid}/disk0/send"), &send)
        .await
        .unwrap();
    wait_sent(&c1, mid, "disk0").await;
    assert!(
        !copy_tls_dir(&cfg1, mid, "disk0").exists(),
        "sender's credentials left"
    );
    let received: CopyStatus = c2
        .post(&format!("/v1/copies/{mid}/disk0/finish"), &())
        .await
        .unwrap();
    assert_eq!(received.state, CopyState::Received);
    assert!(!dst_dir.exists(), "receiver's credentials left");
    let (s1, s2) = tokio::join!(
        checksum(&c1, &image, DiskFormat::Qcow2),
        checksum(&c2, &image, DiskFormat::Qcow2)
    );
    assert_eq!(s1, s2);

    // A receiver with another migration's credentials (another CA, another identity).
    let mid2 = Uuid::new_v4();
    let other = certs::issue_migration_pair(&certs::fresh_id(), lo);
    let (_, other_destination) = certs::halves(&other, lo);
    let refused_image = local("refused.qcow2");
    let at2: CopyReceiving = c2
        .post(
            &format!("/v1/copies/{mid2}/disk0/receive"),
            &ReceiveCopy {
                image: refused_image.clone(),
                tls: Some(other_destination),
                ..receive.clone()
            },
        )
        .await
        .unwrap();
    let _: CopyStatus = c1
        .post(
            &format!("/v1/copies/{mid2}/disk0/send"),
            &SendCopy {
                destination: at2.addr.clone(),
                export: at2.export.clone(),
                ..send.clone()
            },
        )
        .await
        .unwrap();
    let failed = loop {
        let s: CopyStatus = c1
            .get(&format!("/v1/copies/{mid2}/disk0?wait_ms=1000"))
            .await
            .unwrap();
        if s.state != CopyState::Sending {
            break s;
        }
    };
    assert_eq!(failed.state, CopyState::Failed, "{failed:?}");
    let error = failed.error.expect("a failed copy says why");
    assert_eq!(error.code, "storage-tool-failed", "{error:?}");
    let _: () = c2
        .post(&format!("/v1/copies/{mid2}/disk0/abort"), &())
        .await
        .unwrap();
    wait_gone(&at2.export).await;
    assert!(
        !cfg2.datastores[0].path.join("refused.qcow2").exists(),
        "partial image left"
    );
    assert!(!copy_tls_dir(&cfg1, mid2, "disk0").exists());
    assert!(!copy_tls_dir(&cfg2, mid2, "disk0").exists());

    // Credentials for the wrong half are refused before anything starts.
    let wrong = c2
        .post::<_, CopyReceiving>(
            &format!("/v1/copies/{}/disk0/receive", Uuid::new_v4()),
            &ReceiveCopy {
                image: local("wrong-half.qcow2"),
                tls: Some(source_tls),
                ..receive.clone()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(wrong.status(), Some(400), "{wrong}");
    assert!(!cfg2.datastores[0].path.join("wrong-half.qcow2").exists());
    a1.shutdown().await;
    a2.shutdown().await;
}
