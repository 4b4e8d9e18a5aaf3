//! Block migration: running lab guests whose disks are on a datastore local to their host
//! move live with them. Real agents in lab hosts, real qcow2 images made by the agents, real
//! QEMU mirrors into the destination's NBD export over the lab's migration network. The guest
//! writes self-checking blocks to its disk and dirties its memory the whole time, and verifies
//! both after every move.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Cluster;
use ferry_agent::DatastoreConfig;
use ferry_api::instances::{CacheMode, CreateInstance, DiskRequest, Instance, InstanceState};
use ferry_api::migrations::{DiskCopyState, Migration, MigrationOptions, MigrationState};
use ferry_lab::guest_client;
use ferry_lab::guest_config::{GuestConfig, GuestDisk};
use ferry_server::config::Limits;

const SERIAL: &str = "blk0";

/// A cluster whose hosts each have a datastore `local` at `BASE/HOST` (not shared) and a
/// datastore `shared` at `BASE/shared` that every host mounts (same identity).
async fn cluster(base: &Path) -> Cluster {
    let base = base.to_path_buf();
    std::fs::create_dir_all(base.join("shared")).unwrap();
    Cluster::start_with(2, Limits::default(), move |config| {
        common::add_local_datastore(config, &base);
        config.datastores.push(DatastoreConfig {
            name: "shared".into(),
            path: base.join("shared"),
            identity: Some("block-test-shared".into()),
        });
    })
    .await
}

/// A running lab guest on hv1 with a new 1 GiB qcow2 disk `disk0` on hv1's `local` datastore (and
/// `extra` disks), writing 4096 self-checking blocks (16 MiB) at `rate` per second.
async fn vm_with_local_disk(
    c: &Cluster,
    name: &str,
    k: u8,
    rate: u32,
    extra: Vec<DiskRequest>,
) -> Instance {
    vm_with_disk_cache(c, name, k, rate, extra, CacheMode::None, 1 << 30).await
}

/// [`vm_with_local_disk`] with the disk's cache mode and virtual size.
async fn vm_with_disk_cache(
    c: &Cluster,
    name: &str,
    k: u8,
    rate: u32,
    extra: Vec<DiskRequest>,
    cache: CacheMode,
    size: u64,
) -> Instance {
    let disk = DiskRequest {
        id: Some("disk0".into()),
        datastore: Some("local".into()),
        size_bytes: Some(size),
        serial: Some(SERIAL.into()),
        cache,
        ..serde_json::from_value(serde_json::json!({})).unwrap()
    };
    vm_with_disk(c, name, k, rate, disk, extra).await
}

/// A running lab guest on hv1 whose disk `disk0` is `disk`, writing 4096 self-checking blocks
/// (16 MiB) at its start at `rate` per second.
async fn vm_with_disk(
    c: &Cluster,
    name: &str,
    k: u8,
    rate: u32,
    disk: DiskRequest,
    extra: Vec<DiskRequest>,
) -> Instance {
    let config = GuestConfig {
        disk: Some(GuestDisk {
            rate_blocks_s: rate,
            blocks: Some(4096),
            ..GuestDisk::new(SERIAL)
        }),
        ..Cluster::small_guest()
    };
    let mut disks = vec![disk];
    disks.extend(extra);
    let req = CreateInstance {
        name: name.into(),
        host: Some("hv1".into()),
        spec: c.guest_spec(k, 192, config),
        disks,
        start: true,
    };
    let i: Instance = c.admin.post("/v1/instances", &req).await.unwrap();
    assert_eq!(i.state, InstanceState::Running);
    c.guest_control(k, "status", Duration::from_secs(90)).await;
    i
}

/// Memory and every disk block verify, and the guest keeps writing its disk.
async fn assert_intact(c: &Cluster, k: u8, after: &str) {
    let memory = c.verify(k).await;
    assert!(
        memory.errors == 0 && memory.checked > 0,
        "{after}: memory: {memory:?}"
    );
    let writes = || async {
        let status = c.guest_control(k, "status", Duration::from_secs(10)).await;
        guest_client::parse_status(&status)
            .unwrap()
            .disk
            .expect("the guest has its disk")
    };
    let before = writes().await;
    assert_eq!(before.failures, 0, "{after}: {before:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = writes().await;
    assert!(
        later.writes > before.writes,
        "{after}: the guest writes its disk ({} -> {})",
        before.writes,
        later.writes
    );
    let reply = c
        .guest_control(k, "disk-verify", Duration::from_secs(30))
        .await;
    let disk = guest_client::parse_disk_verify(&reply).unwrap();
    assert!(
        disk.ok && disk.errors == 0 && disk.blocks_checked == 4096,
        "{after}: {disk:?}"
    );
}

/// Where host `host`'s `local` datastore is, under the test's datastore directory `ds`.
fn local(ds: &Path, host: &str) -> PathBuf {
    ds.join(host)
}

/// Bytes `host` has received on its migration interface.
fn rx_bytes(c: &Cluster, host: &str) -> u64 {
    ferry_lab::net::migration_rx_bytes(&c.lab.host(host).unwrap().netns).unwrap()
}

/// What `host` has received on its migration interface once job `m` is past its pre-flight
/// checks (their bandwidth probe sends a lot): the baseline of the job's bytes on the wire.
async fn rx_after_checks(c: &Cluster, m: &Migration, host: &str) -> u64 {
    loop {
        let now = c.migration(m.id).await;
        if now.state != MigrationState::Pending && now.state != MigrationState::Preparing {
            return rx_bytes(c, host);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Moves `vm` to `to` with default options, to its end; returns the ended job and the bytes
/// `to` received on its migration interface after the job's checks.
async fn move_counting_bytes(c: &Cluster, vm: &str, to: &str) -> (Migration, u64) {
    let m = c.migrate(vm, to, MigrationOptions::default()).await;
    let rx = rx_after_checks(c, &m, to).await;
    let m = c.wait_end(m.id, Duration::from_secs(300)).await;
    (m, rx_bytes(c, to) - rx)
}

/// No QEMU, no NBD export and no listening port of the migration range left on `host`.
fn nothing_left_on(c: &Cluster, host: &str) {
    assert_eq!(c.qemus_on(host), 0, "a QEMU is left on {host}");
    let netns = &c.lab.host(host).unwrap().netns;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Htln"])
        .output()
        .unwrap();
    let listening = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !listening
            .lines()
            .any(|l| (49152..=49215).any(|p| l.contains(&format!(":{p} ")))),
        "a port of the migration range still listens on {host}: {listening}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_writing_its_local_disk_moves_there_and_back_and_every_block_verifies() {
    let base = tempfile::tempdir().unwrap();
    let ds = base.path().join("ds");
    let c = cluster(&ds).await;
    let vm = vm_with_local_disk(&c, "blk-vm", 21, 200, vec![]).await;
    assert_eq!(vm.spec.disks[0].image.datastore, "local");
    let file = vm.spec.disks[0].image.file.clone();
    assert_intact(&c, 21, "boot").await;

    let mut previous: Option<Migration> = None;
    for (from, to) in [("hv1", "hv2"), ("hv2", "hv1")] {
        let m = c.migrate("blk-vm", to, MigrationOptions::default()).await;
        let rx_before = rx_after_checks(&c, &m, to).await;
        let m = c.wait_end(m.id, Duration::from_secs(300)).await;
        let log = c.logs(m.id).await;
        assert_eq!(m.state, MigrationState::Completed, "{:?}\n{log}", m.error);
        assert_eq!(m.copies.len(), 1, "{:?}", m.copies);
        let copy = &m.copies[0];
        assert_eq!(
            (copy.state, copy.source_kept),
            (DiskCopyState::Copied, true),
            "{copy:?}"
        );
        assert_eq!(copy.target.as_ref().unwrap().datastore, "local", "{copy:?}");
        for needle in [
            "disk disk0: local:",
            "copy started",
            ": in sync after",
            "copy completed at switchover",
            "until `ferry migration cleanup",
        ] {
            assert!(
                log.contains(needle),
                "{needle:?} missing from the log:\n{log}"
            );
        }
        // The mirror went through the whole disk, but sent only its data: 16 MiB of blocks
        // and the guest's memory cross the wire, not the 1 GiB disk.
        assert!(copy.done_bytes >= 1 << 30, "{copy:?}");
        let received = rx_bytes(&c, to) - rx_before;
        eprintln!(
            "{from} -> {to}: {} MiB on the wire, disk progress {} MiB",
            received >> 20,
            copy.done_bytes >> 20
        );
        assert!(
            received < 400 << 20,
            "{to} received {} MiB for a 1 GiB disk holding 16 MiB",
            received >> 20
        );
        let i = c.instance("blk-vm").await;
        assert_eq!((i.host.as_str(), i.state), (to, InstanceState::Running));
        assert_eq!(i.spec.disks[0].image.datastore, "local");
        assert!(local(&ds, to).join(&file).exists(), "the image is on {to}");
        // The source's image stays until the cleanup.
        assert!(
            local(&ds, from).join(&file).exists(),
            "{from} keeps its image"
        );
        assert_eq!(c.qemus_on(from), 0);
        assert_intact(&c, 21, &format!("move to {to}")).await;
        if let Some(p) = &previous {
            assert!(
                log.contains(&format!("kept the images migration {} left there", p.id)),
                "the stale copy on {to} is removed before the copy back:\n{log}"
            );
        }
        previous = Some(m);
    }
    // The cleanup removes the image the last move left on hv2.
    let last = previous.unwrap();
    let cleaned: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cleanup", last.id), &())
        .await
        .unwrap();
    assert!(cleaned.cleaned_up_at.is_some());
    assert!(!local(&ds, "hv2").join(&file).exists());
    assert!(local(&ds, "hv1").join(&file).exists());
    c.shutdown().await;
}

/// Whether a job reached the moment a test waits for.
type Moment = dyn Fn(&Migration) -> bool;

/// Cancels `m` once `ready` holds for its latest progress; returns the ended job.
async fn cancel_when(c: &Cluster, m: &Migration, ready: impl Fn(&Migration) -> bool) -> Migration {
    c.wait_until(m.id, ready).await;
    let _: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cancel", m.id), &())
        .await
        .unwrap();
    c.wait_end(m.id, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_or_the_budget_in_the_disk_or_memory_copy_leaves_the_guest_and_its_disk_on_the_source(
) {
    let base = tempfile::tempdir().unwrap();
    let ds = base.path().join("ds");
    let c = cluster(&ds).await;
    let vm = vm_with_local_disk(&c, "blk-cancel", 22, 200, vec![]).await;
    let file = vm.spec.disks[0].image.file.clone();
    // 1 MiB/s: the 16 MiB disk takes seconds, the 192 MiB of memory much longer.
    let slow = MigrationOptions {
        bandwidth_mib_s: Some(1),
        ..Default::default()
    };
    let phase = |m: &Migration| m.progress.as_ref().map(|p| p.phase);
    let moments: [(&str, Box<Moment>); 2] = [
        (
            "during the disk copy",
            Box::new(move |m: &Migration| {
                m.progress.as_ref().is_some_and(|p| {
                    p.phase == ferry_migrate::Phase::DiskCopy
                        && p.disks.iter().any(|d| d.copied_bytes > 0)
                })
            }),
        ),
        (
            "after the mirror is in sync, during the memory copy",
            Box::new(move |m: &Migration| phase(m) == Some(ferry_migrate::Phase::Precopy)),
        ),
    ];
    for (attempt, (when, ready)) in moments.into_iter().enumerate() {
        let m = c.migrate("blk-cancel", "hv2", slow.clone()).await;
        let m = cancel_when(&c, &m, ready).await;
        let log = c.logs(m.id).await;
        assert_eq!(
            m.state,
            MigrationState::Cancelled,
            "{when}: {:?}\n{log}",
            m.error
        );
        assert!(
            m.copies
                .iter()
                .all(|c| c.state == DiskCopyState::Failed && !c.source_kept),
            "{when}: {:?}",
            m.copies
        );
        let i = c.instance("blk-cancel").await;
        assert_eq!(
            (
                i.host.as_str(),
                i.state,
                i.spec.disks[0].image.datastore.as_str()
            ),
            ("hv1", InstanceState::Running, "local"),
            "{when}"
        );
        // The partial image stays on hv2 for a retry, which takes it over.
        assert!(
            local(&ds, "hv2").join(&file).exists() && m.copies.iter().all(|c| c.target_kept),
            "{when}: hv2 keeps the partial image: {:?}\n{log}",
            m.copies
        );
        if attempt > 0 {
            assert!(log.contains("is taken over"), "{when}: {log}");
        }
        nothing_left_on(&c, "hv2");
        assert_intact(&c, 22, when).await;
    }
    // The time budget covers the disk copy too: 3 s at 1 MiB/s end the job.
    let short = MigrationOptions {
        budget_s: Some(3),
        ..slow.clone()
    };
    let m = c.migrate("blk-cancel", "hv2", short).await;
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    let log = c.logs(m.id).await;
    let err = m.error.clone().expect("timed out");
    assert_eq!(
        (m.state, err.code.as_str()),
        (MigrationState::Failed, "migration-timeout"),
        "{err:?}\n{log}"
    );
    nothing_left_on(&c, "hv2");
    assert_intact(&c, 22, "budget spent").await;
    // `ferry migration cleanup` of the failed job removes what hv2 kept.
    assert!(local(&ds, "hv2").join(&file).exists(), "{log}");
    let cleaned: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cleanup", m.id), &())
        .await
        .unwrap();
    assert!(cleaned.copies.iter().all(|c| !c.target_kept), "{cleaned:?}");
    assert!(!local(&ds, "hv2").join(&file).exists());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_datastore_too_small_is_refused_and_one_that_fills_up_fails_the_job_with_no_space() {
    let base = tempfile::tempdir().unwrap();
    let ds = base.path().join("ds");
    // A small file system on hv2 of its own: 8 MiB, and one of 160 MiB the test fills.
    let tiny = base.path().join("tiny");
    let small = base.path().join("small");
    for (dir, size) in [(&tiny, "8m"), (&small, "160m")] {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", dir.display());
    }
    struct Unmount(Vec<PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = std::process::Command::new("umount").arg(d).status();
            }
        }
    }
    let _unmount = Unmount(vec![tiny.clone(), small.clone()]);
    let (t, s) = (tiny.clone(), small.clone());
    let ds2 = ds.clone();
    let c = Cluster::start_with(2, Limits::default(), move |config| {
        common::add_local_datastore(config, &ds2);
        if config.name == "hv2" {
            for (name, path) in [("tiny", &t), ("small", &s)] {
                config.datastores.push(DatastoreConfig {
                    name: name.into(),
                    path: path.clone(),
                    identity: None,
                });
            }
        }
    })
    .await;
    // Writeback: tmpfs has no O_DIRECT. 128 MiB: no larger than the 160 MiB datastore.
    let vm = vm_with_disk_cache(
        &c,
        "blk-full",
        23,
        200,
        vec![],
        CacheMode::Writeback,
        128 << 20,
    )
    .await;
    let file = vm.spec.disks[0].image.file.clone();
    let mapped = |ds: &str| MigrationOptions {
        bandwidth_mib_s: Some(2),
        disk_map: [("disk0".to_string(), ds.to_string())].into(),
        ..Default::default()
    };

    // `ferry migrate --check --map-disk disk0=tiny` shows the refusal before any job.
    let storage = c
        .check("blk-full", "hv2", "&map_disk=disk0%3Dtiny", "storage")
        .await;
    assert_eq!(
        storage.status,
        ferry_api::checks::CheckStatus::Fail,
        "{storage:?}"
    );
    assert!(
        storage.message.contains("datastore tiny on hv2"),
        "{storage:?}"
    );
    // Without the map, the check shows the mapping it would use.
    let storage = c.check("blk-full", "hv2", "", "storage").await;
    assert!(
        storage.message.contains("copied live to datastore"),
        "{storage:?}"
    );
    // Refused by the pre-check: 16 MiB and its margin do not fit in 8 MiB.
    let m = c.migrate("blk-full", "hv2", mapped("tiny")).await;
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    let err = m.error.clone().expect("refused");
    assert_eq!(
        (m.state, err.code.as_str()),
        (MigrationState::Failed, "storage"),
        "{err:?}"
    );
    assert!(
        err.message.contains("datastore tiny on hv2"),
        "{}",
        err.message
    );
    assert!(!tiny.join(&file).exists());

    // Fills up during the copy: the test takes the room once the mirror runs.
    let m = c.migrate("blk-full", "hv2", mapped("small")).await;
    c.wait_until(m.id, |now| {
        now.progress
            .as_ref()
            .is_some_and(|p| p.disks.iter().any(|d| d.copied_bytes > 0))
    })
    .await;
    let filler = small.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=200"])
        .arg(format!("of={}", filler.display()))
        .status();
    let m = c.wait_end(m.id, Duration::from_secs(180)).await;
    let log = c.logs(m.id).await;
    let err = m.error.clone().expect("failed");
    assert_eq!(
        (m.state, err.code.as_str()),
        (MigrationState::Failed, "no-space"),
        "{err:?}\n{log}"
    );
    assert!(!err.hint.is_empty());
    std::fs::remove_file(&filler).unwrap();
    assert!(!small.join(&file).exists(), "the partial image is removed");
    let i = c.instance("blk-full").await;
    assert_eq!((i.host.as_str(), i.state), ("hv1", InstanceState::Running));
    nothing_left_on(&c, "hv2");
    assert_intact(&c, 23, "no space").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_instance_copies_only_its_local_disk() {
    let base = tempfile::tempdir().unwrap();
    let ds = base.path().join("ds");
    let c = cluster(&ds).await;
    let shared_disk = DiskRequest {
        id: Some("disk1".into()),
        datastore: Some("shared".into()),
        size_bytes: Some(64 << 20),
        ..serde_json::from_value(serde_json::json!({})).unwrap()
    };
    let vm = vm_with_local_disk(&c, "blk-mixed", 24, 100, vec![shared_disk]).await;
    let shared_file = vm.spec.disks[1].image.clone();
    let m = c
        .migrate("blk-mixed", "hv2", MigrationOptions::default())
        .await;
    let m = c.wait_end(m.id, Duration::from_secs(300)).await;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Completed, "{:?}\n{log}", m.error);
    assert_eq!(
        m.copies.iter().map(|c| c.disk.as_str()).collect::<Vec<_>>(),
        vec!["disk0"],
        "only the local disk is copied"
    );
    let i = c.instance("blk-mixed").await;
    assert_eq!(
        i.spec.disks[1].image, shared_file,
        "the shared disk stays in place"
    );
    assert_intact(&c, 24, "mixed move").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_destination_qemu_killed_during_the_disk_copy_fails_the_job_and_the_guest_stays() {
    let base = tempfile::tempdir().unwrap();
    let ds = base.path().join("ds");
    let c = cluster(&ds).await;
    let vm = vm_with_local_disk(&c, "blk-kill", 25, 200, vec![]).await;
    let file = vm.spec.disks[0].image.file.clone();
    let slow = MigrationOptions {
        bandwidth_mib_s: Some(1),
        ..Default::default()
    };
    let m = c.migrate("blk-kill", "hv2", slow).await;
    c.wait_until(m.id, |now| {
        now.progress.as_ref().is_some_and(|p| {
            p.phase == ferry_migrate::Phase::DiskCopy && p.disks.iter().any(|d| d.copied_bytes > 0)
        })
    })
    .await;
    // Every process in hv2's namespace is its incoming QEMU.
    let ns = &c.lab.host("hv2").unwrap().netns;
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let _ = std::process::Command::new("kill")
            .args(["-9", pid])
            .status();
    }
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    let log = c.logs(m.id).await;
    let err = m.error.clone().expect("failed");
    assert_eq!(m.state, MigrationState::Failed, "{log}");
    eprintln!("destination killed: {}: {}", err.code, err.message);
    assert!(
        ["link-lost", "disk-copy-failed"].contains(&err.code.as_str()),
        "{err:?}\n{log}"
    );
    assert!(!err.hint.is_empty());
    let i = c.instance("blk-kill").await;
    assert_eq!((i.host.as_str(), i.state), ("hv1", InstanceState::Running));
    assert!(!local(&ds, "hv2").join(&file).exists(), "{log}");
    nothing_left_on(&c, "hv2");
    assert_intact(&c, 25, "destination killed").await;
    c.shutdown().await;
}

/// Runs `qemu-img` or `qemu-io` with `args`; panics with its output when it fails.
fn qemu_tool(tool: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_block_migration_is_resumed_and_the_retry_sends_fewer_bytes() {
    let base = tempfile::tempdir().unwrap();
    let ds = base.path().join("ds");
    let c = cluster(&ds).await;
    // 320 MiB of data the guest never touches, behind the 16 MiB its blocks use.
    let file = "resume-data.qcow2";
    let image = local(&ds, "hv1").join(file);
    let path = image.to_str().unwrap();
    qemu_tool("qemu-img", &["create", "-q", "-f", "qcow2", path, "512M"]);
    qemu_tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 64M 320M", path],
    );
    let disk = DiskRequest {
        id: Some("disk0".into()),
        image: Some(path.to_string()),
        serial: Some(SERIAL.into()),
        cache: CacheMode::None,
        ..serde_json::from_value(serde_json::json!({})).unwrap()
    };
    vm_with_disk(&c, "blk-resume", 26, 100, disk, vec![]).await;
    assert_intact(&c, 26, "boot").await;
    let mib = |b: u64| b >> 20;
    let capped = |mib_s: u64| MigrationOptions {
        bandwidth_mib_s: Some(mib_s),
        ..Default::default()
    };

    // 1. Cancelled in the middle of the disk copy: hv2 keeps what arrived.
    let m = c.migrate("blk-resume", "hv2", capped(24)).await;
    let rx = rx_after_checks(&c, &m, "hv2").await;
    let m = cancel_when(&c, &m, |m: &Migration| {
        m.progress
            .as_ref()
            .is_some_and(|p| p.disks.iter().any(|d| d.copied_bytes >= 200 << 20))
    })
    .await;
    let first = rx_bytes(&c, "hv2") - rx;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Cancelled, "{log}");
    assert!(m.copies[0].target_kept, "{:?}\n{log}", m.copies);
    assert!(log.contains("keeps the partial copy"), "{log}");
    assert!(local(&ds, "hv2").join(file).exists());
    nothing_left_on(&c, "hv2");
    assert_intact(&c, 26, "cancelled in the disk copy").await;

    // 2. The retry resumes: it sends what the first attempt had not.
    let (m, resumed) = move_counting_bytes(&c, "blk-resume", "hv2").await;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Completed, "{:?}\n{log}", m.error);
    assert!(
        log.contains("is taken over") && log.contains("copy resumed into"),
        "{log}"
    );
    assert_intact(&c, 26, "resumed move to hv2").await;

    // 3. Side by side, a copy from zero: the same guest back to hv1.
    let (m, full) = move_counting_bytes(&c, "blk-resume", "hv1").await;
    assert_eq!(m.state, MigrationState::Completed, "{:?}", m.error);
    assert_intact(&c, 26, "full move back to hv1").await;
    eprintln!(
        "cancelled mid-copy: {} MiB; resumed: {} MiB; from zero: {} MiB",
        mib(first),
        mib(resumed),
        mib(full)
    );
    assert!(
        resumed + (96 << 20) < full,
        "the resumed copy skips what the cancelled one sent: resumed {} MiB, from zero {} MiB, first attempt {} MiB\n{log}",
        mib(resumed),
        mib(full),
        mib(first)
    );

    // 4. Cancelled in the memory copy, after the whole disk went; the retry sends little of
    //    the disk again.
    let m = c.migrate("blk-resume", "hv2", capped(32)).await;
    let rx = rx_after_checks(&c, &m, "hv2").await;
    let m = cancel_when(&c, &m, |m: &Migration| {
        m.progress
            .as_ref()
            .is_some_and(|p| p.phase == ferry_migrate::Phase::Precopy)
    })
    .await;
    let late = rx_bytes(&c, "hv2") - rx;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Cancelled, "{:?}\n{log}", m.error);
    assert!(m.copies[0].target_kept, "{:?}\n{log}", m.copies);
    let (m, retry) = move_counting_bytes(&c, "blk-resume", "hv2").await;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Completed, "{:?}\n{log}", m.error);
    eprintln!(
        "cancelled in the memory copy: {} MiB; its retry: {} MiB",
        mib(late),
        mib(retry)
    );
    assert!(
        retry + (128 << 20) < late,
        "the retry after the disk was copied resends little: first {} MiB, retry {} MiB\n{log}",
        mib(late),
        mib(retry)
    );
    assert_intact(&c, 26, "resumed after a late cancel").await;

    // The data the guest never touched arrived whole: read back from hv2's image.
    let i = c.instance("blk-resume").await;
    let _: Instance = c
        .admin
        .post(&format!("/v1/instances/{}/stop", i.id), &())
        .await
        .unwrap();
    let on_hv2 = local(&ds, "hv2").join(file);
    let read = qemu_tool(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 64M 320M",
            on_hv2.to_str().unwrap(),
        ],
    );
    assert!(!read.contains("failed"), "{read}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_that_rewrites_its_disk_faster_than_the_passes_gain_gets_a_whole_disk_mirror_and_converges(
) {
    let base = tempfile::tempdir().unwrap();
    let ds = base.path().join("ds");
    let c = cluster(&ds).await;
    // 16 MiB of blocks rewritten at up to 8 MiB/s, against a copy capped at 2 MiB/s.
    vm_with_disk_cache(
        &c,
        "blk-fast",
        27,
        2000,
        vec![],
        CacheMode::Writeback,
        64 << 20,
    )
    .await;
    let capped = MigrationOptions {
        bandwidth_mib_s: Some(2),
        ..Default::default()
    };
    let m = c.migrate("blk-fast", "hv2", capped).await;
    // In sync: the memory copy started.
    let m = cancel_when(&c, &m, |m: &Migration| {
        m.progress
            .as_ref()
            .is_some_and(|p| p.phase == ferry_migrate::Phase::Precopy)
    })
    .await;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Cancelled, "{:?}\n{log}", m.error);
    for needle in [
        "a write-blocking mirror of the whole disk takes over",
        ": in sync after",
    ] {
        assert!(
            log.contains(needle),
            "{needle:?} missing from the log:\n{log}"
        );
    }
    let i = c.instance("blk-fast").await;
    assert_eq!((i.host.as_str(), i.state), ("hv1", InstanceState::Running));
    nothing_left_on(&c, "hv2");
    assert_intact(&c, 27, "cancelled after the whole-disk mirror").await;
    // Deleting the instance removes the partial copy hv2 kept for a retry too.
    let file = i.spec.disks[0].image.file.clone();
    assert!(local(&ds, "hv2").join(&file).exists(), "{log}");
    let _: Instance = c
        .admin
        .post(&format!("/v1/instances/{}/stop", i.id), &())
        .await
        .unwrap();
    let _: Instance = c
        .admin
        .delete(&format!("/v1/instances/{}", i.id))
        .await
        .unwrap();
    assert!(!local(&ds, "hv2").join(&file).exists());
    assert!(!local(&ds, "hv1").join(&file).exists());
    let m = c.migration(m.id).await;
    assert!(m.copies.iter().all(|c| !c.target_kept), "{:?}", m.copies);
    c.shutdown().await;
}
