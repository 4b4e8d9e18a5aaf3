//! Cold migration of stopped instances with disks on storage the destination does not share:
//! real agents in lab hosts, each with a local datastore of its own (no identity file), real
//! images made with qemu-img and qemu-io, real copies over the lab's migration network.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Cluster;
use ferry_api::checks::{Candidate, CheckStatus};
use ferry_api::instances::{
    CreateInstance, DiskFormat, DiskSpec, ImageRef, Instance, InstanceState,
};
use ferry_api::migrations::{
    CreateMigration, DiskCopyState, Migration, MigrationKind, MigrationOptions, MigrationState,
};
use ferry_server::config::Limits;
use sha2::{Digest, Sha256};

/// A cluster whose hosts each have a datastore `local` at `BASE/HOST`, not shared.
async fn cluster(base: &Path) -> Cluster {
    cluster_cleaning_after(base, 0).await
}

/// Like [`cluster`], with the server's `cold_cleanup_after_s`.
async fn cluster_cleaning_after(base: &Path, cleanup_after_s: u64) -> Cluster {
    let base = base.to_path_buf();
    Cluster::start_with_server(
        2,
        Limits::default(),
        move |config| common::add_local_datastore(config, &base),
        |server| server.cold_cleanup_after_s = cleanup_after_s,
    )
    .await
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new image on `host`'s local datastore, `size` big, with `pattern` written over its
/// first `written` bytes.
fn make_image(
    base: &Path,
    host: &str,
    file: &str,
    format: &str,
    size: &str,
    written: &str,
) -> PathBuf {
    let path = base.join(host).join(file);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&path)
        .arg(size));
    run(Command::new("qemu-io")
        .args(["-f", format, "-c", &format!("write -P 0x5a 0 {written}")])
        .arg(&path));
    path
}

/// SHA-256 of what a guest reads, computed here without Ferry: qemu-img converts the image to
/// a raw file, which is hashed.
fn content_sha256(image: &Path, format: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("content.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(&raw));
    let mut f = std::fs::File::open(&raw).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// A stopped instance on hv1 whose one disk is `file` on hv1's local datastore. The create
/// API does not take disks yet on this branch, so the disk goes into the record directly, as
/// the server writes it when it creates disks.
async fn stopped_vm_with_disk(
    c: &Cluster,
    name: &str,
    k: u8,
    file: &str,
    format: DiskFormat,
    size: u64,
) -> Instance {
    let req = CreateInstance {
        name: name.into(),
        host: Some("hv1".into()),
        spec: c.guest_spec(k, 128, Cluster::small_guest()),
        disks: vec![],
        start: false,
    };
    let i: Instance = c.admin.post("/v1/instances", &req).await.unwrap();
    let mut spec = i.spec.clone();
    spec.disks = vec![DiskSpec {
        id: "disk0".into(),
        image: ImageRef {
            datastore: "local".into(),
            file: file.into(),
        },
        format,
        size_bytes: size,
        bus: Default::default(),
        cache: Default::default(),
        read_only: false,
        serial: None,
        backing: None,
        managed: true,
    }];
    c.server
        .state
        .store
        .set_instance_spec(i.id, &spec)
        .await
        .unwrap();
    c.instance(name).await
}

async fn cold(c: &Cluster, name: &str, options: MigrationOptions) -> Migration {
    c.admin
        .post(
            "/v1/migrations",
            &CreateMigration {
                instance: name.into(),
                destination: Some("hv2".into()),
                options,
                kind: Some(MigrationKind::Cold),
            },
        )
        .await
        .expect("cold migration accepted")
}

/// Waits until the migration's first copy has moved more than `bytes`.
async fn wait_copied(c: &Cluster, id: uuid::Uuid, bytes: u64) -> Migration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = c.migration(id).await;
        if m.copies
            .first()
            .is_some_and(|d| d.state == DiskCopyState::Copying && d.done_bytes > bytes)
        {
            return m;
        }
        assert!(!m.state.is_terminal(), "ended before copying: {m:?}");
        assert!(Instant::now() < deadline, "copy never started: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pids of the `qemu-img convert` processes reading `image`.
fn converts_of(image: &Path) -> Vec<String> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "convert") && args.iter().any(|a| Path::new(a) == image) {
            pids.push(name);
        }
    }
    pids
}

/// The instance is where it was, with its image as it was, and hv2 has nothing left.
async fn assert_untouched(c: &Cluster, name: &str, src: &Path, sum: &str, dst: &Path) {
    let vm = c.instance(name).await;
    assert_eq!((vm.host.as_str(), vm.generation), ("hv1", 0), "{vm:?}");
    assert_eq!(content_sha256(src, "raw"), sum, "source image changed");
    assert!(!dst.exists(), "partial copy left on hv2: {}", dst.display());
    assert!(converts_of(src).is_empty(), "a qemu-img is still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_migration_copies_a_local_disk_and_keeps_the_source_until_cleanup() {
    let base = tempfile::tempdir().unwrap();
    let c = cluster(base.path()).await;
    let src = make_image(
        base.path(),
        "hv1",
        "parked-disk0.qcow2",
        "qcow2",
        "64M",
        "4M",
    );
    let dst = base.path().join("hv2").join("parked-disk0.qcow2");
    let before = content_sha256(&src, "qcow2");
    stopped_vm_with_disk(
        &c,
        "parked",
        0,
        "parked-disk0.qcow2",
        DiskFormat::Qcow2,
        64 << 20,
    )
    .await;

    // `ferry migrate parked --to hv2 --check`: the storage check says what is copied where.
    let checked: Vec<Candidate> = c
        .admin
        .get("/v1/instances/parked/migration-candidates?destination=hv2")
        .await
        .unwrap();
    let storage = checked[0]
        .checks
        .iter()
        .find(|k| k.name == "storage")
        .unwrap();
    // A warning only: the lab's kernel files are on a datastore without an identity file.
    assert_ne!(storage.status, CheckStatus::Fail, "{storage:?}");
    assert!(
        storage
            .message
            .contains("will copy disk disk0 (local:parked-disk0.qcow2, ")
            && storage.message.contains("to datastore local on hv2"),
        "{}",
        storage.message
    );
    assert!(checked[0].fit, "{checked:?}");

    let m = cold(&c, "parked", MigrationOptions::default()).await;
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}\n{log}");
    // The copy, checked independently of Ferry: same content on both hosts.
    assert!(dst.exists(), "no image on hv2");
    assert_eq!(content_sha256(&dst, "qcow2"), before);
    assert_eq!(content_sha256(&src, "qcow2"), before, "the source changed");
    let copy = &m.copies[0];
    assert_eq!(
        (
            copy.disk.as_str(),
            copy.state,
            copy.source_kept,
            copy.size_bytes
        ),
        ("disk0", DiskCopyState::Copied, true, 64 << 20)
    );
    assert_eq!(copy.sha256.as_deref(), Some(before.as_str()));
    assert!(m.cleaned_up_at.is_none());
    for line in [
        "disk disk0: copying local:parked-disk0.qcow2",
        "disk disk0: done: 64.0 MiB in",
        &format!("sha256 {before} equal on hv1 and hv2"),
        "hv1 keeps its copies (local:parked-disk0.qcow2) until `ferry migration cleanup",
    ] {
        assert!(log.contains(line), "no {line:?} in\n{log}");
    }
    let vm = c.instance("parked").await;
    assert_eq!(
        (vm.host.as_str(), vm.generation, vm.state),
        ("hv2", 1, InstanceState::Stopped)
    );
    // QEMU on hv2 opens the copied disk.
    let started: Instance = c
        .admin
        .post("/v1/instances/parked/start", &())
        .await
        .expect("starts on hv2 with its copied disk");
    assert_eq!(started.state, InstanceState::Running);
    let _: Instance = c
        .admin
        .post("/v1/instances/parked/stop", &())
        .await
        .unwrap();

    // Data preserved on both ends until cleanup; then the source copy goes, once.
    assert!(src.exists(), "the source copy must stay until cleanup");
    let cleaned: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cleanup", m.id), &())
        .await
        .unwrap();
    assert!(!src.exists(), "cleanup left the source copy");
    assert!(dst.exists());
    assert!(cleaned.cleaned_up_at.is_some());
    assert!(!cleaned.copies[0].source_kept);
    let again: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cleanup", m.id), &())
        .await
        .unwrap();
    assert_eq!(again.cleaned_up_at, cleaned.cleaned_up_at, "idempotent");
    assert!(c
        .logs(m.id)
        .await
        .contains("removed the source copies on hv1 (local:parked-disk0.qcow2)"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_copy_a_mismatch_or_a_cancel_leaves_the_instance_on_the_source() {
    let base = tempfile::tempdir().unwrap();
    let c = cluster(base.path()).await;
    // 8 MiB/s over 32 MiB of data: about four seconds to act during the copy.
    let slow = MigrationOptions {
        bandwidth_mib_s: Some(8),
        ..MigrationOptions::default()
    };
    let vms = [("killed", 0u8), ("changed", 1), ("cancelled", 2)];
    let mut images = Vec::new();
    for (name, k) in vms {
        let file = format!("{name}-disk0.raw");
        let src = make_image(base.path(), "hv1", &file, "raw", "32M", "32M");
        let sum = content_sha256(&src, "raw");
        stopped_vm_with_disk(&c, name, k, &file, DiskFormat::Raw, 32 << 20).await;
        images.push((src, sum, base.path().join("hv2").join(&file)));
    }

    // The sender is killed mid-copy.
    let (src, sum, dst) = &images[0];
    let m = cold(&c, "killed", slow.clone()).await;
    wait_copied(&c, m.id, 1 << 20).await;
    let pids = converts_of(src);
    assert_eq!(
        pids.len(),
        1,
        "one qemu-img convert reads {}",
        src.display()
    );
    run(Command::new("kill").args(["-9", &pids[0]]));
    let m = c.wait_end(m.id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Failed, "{m:?}");
    assert_eq!(m.error.as_ref().unwrap().code, "copy-failed", "{m:?}");
    assert_eq!(m.copies[0].state, DiskCopyState::Failed);
    assert!(!m.copies[0].source_kept);
    assert_untouched(&c, "killed", src, sum, dst).await;
    let refused = c
        .admin
        .post::<_, Migration>(&format!("/v1/migrations/{}/cleanup", m.id), &())
        .await
        .unwrap_err();
    common::assert_refused(&refused, 409, "migration-not-completed");

    // The source image changes under the copy (after its start was sent): the checksums
    // differ and nothing moves.
    let (src, sum, dst) = &images[1];
    let m = cold(&c, "changed", slow.clone()).await;
    wait_copied(&c, m.id, 8 << 20).await;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(src).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"changed under the copy").unwrap();
        f.sync_all().unwrap();
    }
    let changed_sum = content_sha256(src, "raw");
    assert_ne!(&changed_sum, sum);
    let m = c.wait_end(m.id, Duration::from_secs(60)).await;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Failed, "{m:?}\n{log}");
    assert_eq!(m.error.as_ref().unwrap().code, "checksum-mismatch", "{m:?}");
    assert!(
        log.contains("disk disk0: checksum mismatch: hv1 has sha256"),
        "{log}"
    );
    assert_untouched(&c, "changed", src, &changed_sum, dst).await;

    // A cancel during the copy.
    let (src, sum, dst) = &images[2];
    let m = cold(&c, "cancelled", slow.clone()).await;
    wait_copied(&c, m.id, 1 << 20).await;
    let _: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cancel", m.id), &())
        .await
        .unwrap();
    let m = c.wait_end(m.id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Cancelled, "{m:?}");
    assert_untouched(&c, "cancelled", src, sum, dst).await;

    // After all that, the same instance still migrates.
    let m = cold(&c, "cancelled", MigrationOptions::default()).await;
    let m = c.wait_end(m.id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}");
    assert_eq!(content_sha256(dst, "raw"), *sum);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_lost_in_an_agent_restart_is_started_again() {
    let base = tempfile::tempdir().unwrap();
    let mut c = cluster(base.path()).await;
    let src = make_image(base.path(), "hv1", "phoenix-disk0.raw", "raw", "32M", "32M");
    let sum = content_sha256(&src, "raw");
    let dst = base.path().join("hv2").join("phoenix-disk0.raw");
    stopped_vm_with_disk(
        &c,
        "phoenix",
        0,
        "phoenix-disk0.raw",
        DiskFormat::Raw,
        32 << 20,
    )
    .await;
    let m = cold(
        &c,
        "phoenix",
        MigrationOptions {
            bandwidth_mib_s: Some(8),
            ..MigrationOptions::default()
        },
    )
    .await;
    wait_copied(&c, m.id, 1 << 20).await;
    // The source agent restarts: its copy is gone (and its qemu-img with it).
    let agent = c.agents[0].take().unwrap();
    agent.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !converts_of(&src).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stopped agent's qemu-img still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.agents[0] = Some(
        ferry_agent::start(c.agent_configs[0].clone())
            .await
            .expect("agent restarts"),
    );
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}\n{log}");
    assert!(log.contains("disk disk0: copy lost"), "{log}");
    assert!(log.contains("starting it again (attempt 2 of 3)"), "{log}");
    assert_eq!(content_sha256(&dst, "raw"), sum);
    assert_eq!(content_sha256(&src, "raw"), sum);

    // The destination agent restarts mid-copy: its export and partial image go, the sender
    // fails, and the copy starts again.
    let src = make_image(base.path(), "hv1", "lazarus-disk0.raw", "raw", "32M", "32M");
    let sum = content_sha256(&src, "raw");
    let dst = base.path().join("hv2").join("lazarus-disk0.raw");
    stopped_vm_with_disk(
        &c,
        "lazarus",
        1,
        "lazarus-disk0.raw",
        DiskFormat::Raw,
        32 << 20,
    )
    .await;
    let m = cold(
        &c,
        "lazarus",
        MigrationOptions {
            bandwidth_mib_s: Some(8),
            ..MigrationOptions::default()
        },
    )
    .await;
    wait_copied(&c, m.id, 1 << 20).await;
    let agent = c.agents[1].take().unwrap();
    agent.shutdown().await;
    assert!(!dst.exists(), "the stopped agent left its partial image");
    c.agents[1] = Some(
        ferry_agent::start(c.agent_configs[1].clone())
            .await
            .expect("agent restarts"),
    );
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}\n{log}");
    assert!(log.contains("disk disk0: copy lost"), "{log}");
    assert_eq!(content_sha256(&dst, "raw"), sum);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_copies_go_by_themselves_after_the_configured_delay() {
    let base = tempfile::tempdir().unwrap();
    let c = cluster_cleaning_after(base.path(), 2).await;
    let src = make_image(base.path(), "hv1", "auto-disk0.qcow2", "qcow2", "16M", "1M");
    stopped_vm_with_disk(
        &c,
        "auto",
        0,
        "auto-disk0.qcow2",
        DiskFormat::Qcow2,
        16 << 20,
    )
    .await;
    let m = cold(&c, "auto", MigrationOptions::default()).await;
    let m = c.wait_end(m.id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}");
    assert!(src.exists(), "kept right after the migration");
    let log = c.logs(m.id).await;
    assert!(log.contains("for 2 s, then removed automatically"), "{log}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = c.migration(m.id).await;
        if m.cleaned_up_at.is_some() {
            break m;
        }
        assert!(Instant::now() < deadline, "never cleaned up: {m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!src.exists(), "the source copy is still there");
    assert!(!m.copies[0].source_kept);
    assert!(base.path().join("hv2").join("auto-disk0.qcow2").exists());
    assert!(c.logs(m.id).await.contains("cleanup by automatic cleanup"));
    c.shutdown().await;
}

/// The figures of a cold copy through the lab's migration network: `cargo test -p
/// ferry-server --test cold_disks -- --ignored --nocapture copy_figures`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn copy_figures() {
    let base = tempfile::tempdir().unwrap();
    let c = cluster(base.path()).await;
    make_image(
        base.path(),
        "hv1",
        "sparse-disk0.qcow2",
        "qcow2",
        "1G",
        "1M",
    );
    make_image(base.path(), "hv1", "full-disk0.raw", "raw", "256M", "256M");
    stopped_vm_with_disk(
        &c,
        "sparse",
        0,
        "sparse-disk0.qcow2",
        DiskFormat::Qcow2,
        1 << 30,
    )
    .await;
    stopped_vm_with_disk(&c, "full", 1, "full-disk0.raw", DiskFormat::Raw, 256 << 20).await;
    for name in ["sparse", "full"] {
        let t = Instant::now();
        let m = cold(&c, name, MigrationOptions::default()).await;
        let m = c.wait_end(m.id, Duration::from_secs(300)).await;
        assert_eq!(m.state, MigrationState::Completed, "{m:?}");
        let d = &m.copies[0];
        let lines: Vec<String> = c
            .logs(m.id)
            .await
            .lines()
            .filter(|l| l.contains("disk disk0") || l.contains("check storage"))
            .map(str::to_string)
            .collect();
        println!(
            "{name}: {} MiB virtual copied in {} ms ({:.0} MiB/s); whole migration {:.1} s\n  {}",
            d.size_bytes >> 20,
            d.elapsed_ms,
            (d.size_bytes as f64 / f64::from(1 << 20)) / (d.elapsed_ms.max(1) as f64 / 1000.0),
            t.elapsed().as_secs_f64(),
            lines.join("\n  ")
        );
    }
    c.shutdown().await;
}
