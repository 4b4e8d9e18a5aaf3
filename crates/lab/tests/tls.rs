//! Migration streams over TLS with per-migration credentials, proven on the wire: tcpdump in
//! the destination host's namespace records whole live migrations (memory, multifd channels,
//! and block migration's NBD stream) and the capture is searched for what the guest holds in
//! RAM and on its disk. With TLS off the same search finds it, so these tests can fail.
//! Needs root, QEMU and tcpdump (CI has them; `scripts/setup` installs them).

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use certs::{issue_migration_pair, MigrationCreds};
use ferry_lab::guest_config::GuestConfig;
use ferry_lab::net::unique_test_lab_name;
use ferry_lab::{GuestRequest, Lab, LabError, LabMigrateOptions, LabOptions, LabTls, LabVm};
use ferry_migrate::{AbortHandle, Bandwidth, MigrateError, MigrationParams, SourceEvent, TlsPeer};
use ferry_qemu::{CacheMode, DiskBus, DiskFormat, DiskSpec};

/// What is certainly in a lab guest's RAM, and so in a plain migration stream: the kernel's
/// version banner, strings of the static busybox the initramfs unpacks into RAM, and strings
/// of Ferry's own guest program (its ready line and a protocol word).
const RAM_NEEDLES: &[&str] = &["Linux version ", "BusyBox v1.", "ferry-guest ready"];

/// What the block test writes all over its guest's disk before boot (never read by the guest,
/// so it reaches the wire only through the disk copy).
const DISK_MARKER: &str = "FERRY-DISK-MARKER-only-on-the-disk-7d1c";

/// What each half gets from a pair, as lab options.
fn lab_tls(c: &MigrationCreds, destination_addr: IpAddr) -> LabTls {
    let (source, destination) = certs::halves(c, destination_addr);
    LabTls {
        source: Some(source),
        destination: Some(destination),
    }
}

/// The lab's pair of credentials for a migration of `vm` to `to`.
fn tls_to(lab: &Lab, to: &str) -> LabTls {
    let addr = IpAddr::V4(lab.net.host(to).unwrap().migration_addr);
    lab_tls(&issue_migration_pair(&certs::fresh_id(), addr), addr)
}

async fn lab() -> Lab {
    common::require_root_and_qemu();
    let ok = Command::new("tcpdump")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "tcpdump not found: scripts/setup installs it");
    ferry_lab::net::remove_orphan_test_labs();
    Lab::start(LabOptions::new(&unique_test_lab_name(), 2))
        .await
        .expect("lab starts")
}

fn guest(disks: Vec<DiskSpec>) -> GuestRequest {
    GuestRequest {
        name: "tls-vm".into(),
        memory_mib: 192,
        vcpus: 1,
        disks,
        config: GuestConfig {
            wss_mib: 16,
            rate_mib_s: 8,
            ..GuestConfig::default()
        },
    }
}

/// tcpdump on a lab host's migration interface, writing every TCP packet whole to a file.
/// Stopped (and its file read) by [`Capture::finish`]; killed by its pid if dropped earlier.
struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    fn start(lab: &Lab, host: &str, file: &Path) -> Capture {
        let ns = &lab.net.host(host).unwrap().netns;
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-i", "mig0", "-n", "-s", "0",
            ])
            // A large buffer: a migration here runs at gigabits per second.
            .args(["-B", "131072", "-U", "-w"])
            .arg(file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump starts");
        // tcpdump says "listening on" once its socket is open: only then can nothing be missed.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening on") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                eprintln!("tcpdump: {line}");
            }
        });
        let mut capture = Capture {
            child: Some(child),
            file: file.to_path_buf(),
        };
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            capture.kill();
            panic!("tcpdump did not start listening within 20 s");
        }
        capture
    }

    /// Stops tcpdump (SIGINT: it writes out what it buffered) and returns the capture.
    fn finish(mut self) -> Vec<u8> {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill with a pid of our own child, which has not been waited for yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tcpdump did not stop within 20 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::read(&self.file).expect("capture file")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

fn count(haystack: &[u8], needle: &str) -> usize {
    let n = needle.as_bytes();
    haystack.windows(n.len()).filter(|w| *w == n).count()
}

/// How often each needle occurs in a capture.
fn found(capture: &[u8], needles: &[&str]) -> Vec<(String, usize)> {
    needles
        .iter()
        .map(|n| (n.to_string(), count(capture, n)))
        .collect()
}

/// No QEMU keeps the migration's TLS objects or parameters.
async fn assert_no_tls_left(qmp: &ferry_qmp::Qmp) {
    let objects = qmp
        .execute_raw("qom-list", Some(serde_json::json!({"path": "/objects"})))
        .await
        .expect("qom-list");
    let names: Vec<&str> = objects
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("ferry-tls")),
        "TLS objects left in QEMU: {names:?}"
    );
    let params = qmp
        .execute(&ferry_qmp::commands::QueryMigrateParameters)
        .await
        .unwrap();
    assert_eq!(params.tls_creds.as_deref(), Some(""), "tls-creds reset");
    assert_eq!(params.tls_authz.as_deref(), Some(""), "tls-authz reset");
}

fn assert_no_credentials(lab: &Lab, vm: &str, when: &str) {
    for role in ["source", "destination"] {
        let dir = lab.tls_dir(vm, role);
        assert!(
            !dir.exists(),
            "{role} credentials left in {} after {when}",
            dir.display()
        );
    }
}

/// While the stream runs, both halves' credentials are on disk, owner-only, under QEMU's
/// names: checked from the progress callback.
fn check_credentials_on_disk(lab: &Lab, vm: &str) -> Result<(), String> {
    for (role, files) in [
        (
            "source",
            ["ca-cert.pem", "client-cert.pem", "client-key.pem"],
        ),
        (
            "destination",
            ["ca-cert.pem", "server-cert.pem", "server-key.pem"],
        ),
    ] {
        let dir = lab.tls_dir(vm, role);
        for f in files {
            let meta = std::fs::metadata(dir.join(f)).map_err(|e| format!("{role}/{f}: {e}"))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode != 0o600 {
                return Err(format!("{role}/{f} has mode {mode:o}"));
            }
        }
    }
    Ok(())
}

struct Leg {
    capture: Vec<u8>,
    transferred: u64,
    credentials_seen: Option<Result<(), String>>,
}

/// Migrates `vm` to `to` with `opts` while tcpdump records `to`'s migration interface.
async fn captured_migration(
    lab: &Lab,
    vm: &mut LabVm,
    to: &str,
    params: &MigrationParams,
    opts: &LabMigrateOptions,
    dir: &Path,
    name: &str,
) -> Leg {
    let file = dir.join(format!("{name}.pcap"));
    let capture = Capture::start(lab, to, &file);
    let (_abort, signal) = AbortHandle::new();
    let mut credentials_seen = None;
    let vm_name = vm.name.clone();
    let tls = opts.tls.source.is_some();
    let out = lab
        .migrate_with(
            vm,
            to,
            params,
            opts,
            &mut |e| {
                if tls && credentials_seen.is_none() {
                    if let SourceEvent::Progress(p) = e {
                        if p.transferred_bytes > 0 {
                            credentials_seen = Some(check_credentials_on_disk(lab, &vm_name));
                        }
                    }
                }
            },
            signal,
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: the migration completes: {e}"));
    // Let the last segments reach tcpdump's file.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let capture = tokio::task::spawn_blocking(move || capture.finish())
        .await
        .unwrap();
    eprintln!(
        "{name}: {} bytes sent by QEMU, capture {} bytes",
        out.source.transferred_bytes,
        capture.len()
    );
    Leg {
        capture,
        transferred: out.source.transferred_bytes,
        credentials_seen,
    }
}

/// The capture holds the stream: at least most of what QEMU sent went through the interface
/// tcpdump recorded (so "no plaintext found" is not "nothing recorded").
fn assert_captured(leg: &Leg, name: &str) {
    assert!(
        leg.capture.len() as u64 > leg.transferred / 2,
        "{name}: capture of {} bytes for {} bytes sent",
        leg.capture.len(),
        leg.transferred
    );
}

async fn assert_guest_intact(lab: &Lab, vm: &LabVm) {
    let report = vm
        .verify_within(lab, Duration::from_secs(30))
        .await
        .expect("verify answers");
    assert!(report.checked > 0 && report.errors == 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_capture_finds_guest_memory_only_in_plain_migrations() {
    let lab = lab().await;
    let work = tempfile::tempdir().unwrap();
    let mut vm = lab.boot_guest("hv1", &guest(vec![])).await.unwrap();
    let params = MigrationParams::default();

    // Plain: the guest's RAM is on the wire, which is what makes the next legs meaningful.
    let plain = captured_migration(
        &lab,
        &mut vm,
        "hv2",
        &params,
        &LabMigrateOptions::default(),
        work.path(),
        "plain",
    )
    .await;
    assert_captured(&plain, "plain");
    let seen = found(&plain.capture, RAM_NEEDLES);
    eprintln!("plain: found {seen:?}");
    assert!(
        seen.iter().all(|(_, n)| *n > 0),
        "a plain migration shows the guest's memory: {seen:?}"
    );

    // TLS, one stream.
    let opts = LabMigrateOptions {
        tls: tls_to(&lab, "hv1"),
        ..Default::default()
    };
    let leg = captured_migration(&lab, &mut vm, "hv1", &params, &opts, work.path(), "tls").await;
    assert_eq!(vm.host, "hv1");
    assert_captured(&leg, "tls");
    let seen = found(&leg.capture, RAM_NEEDLES);
    assert!(
        seen.iter().all(|(_, n)| *n == 0),
        "plaintext of guest memory in a TLS migration: {seen:?}"
    );
    assert_eq!(
        leg.credentials_seen,
        Some(Ok(())),
        "credentials while copying"
    );
    assert_no_credentials(&lab, &vm.name, "a completed migration");
    assert_no_tls_left(vm.qemu.qmp()).await;
    assert_guest_intact(&lab, &vm).await;

    // TLS with multifd: every channel is encrypted.
    let opts = LabMigrateOptions {
        tls: tls_to(&lab, "hv2"),
        ..Default::default()
    };
    let multifd = MigrationParams {
        multifd_channels: Some(2),
        ..MigrationParams::default()
    };
    let leg = captured_migration(
        &lab,
        &mut vm,
        "hv2",
        &multifd,
        &opts,
        work.path(),
        "tls-multifd",
    )
    .await;
    assert_eq!(vm.host, "hv2");
    assert_captured(&leg, "tls-multifd");
    let seen = found(&leg.capture, RAM_NEEDLES);
    assert!(
        seen.iter().all(|(_, n)| *n == 0),
        "plaintext of guest memory in a TLS multifd migration: {seen:?}"
    );
    assert_no_credentials(&lab, &vm.name, "a completed multifd migration");
    assert_no_tls_left(vm.qemu.qmp()).await;
    assert_guest_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

/// A guest disk of 16 MiB, raw, with [`DISK_MARKER`] written all over its second half.
fn marked_disk(dir: &Path) -> DiskSpec {
    let path = dir.join("data.raw");
    let mut content = vec![0u8; 16 << 20];
    let marker = DISK_MARKER.as_bytes();
    for block in content[8 << 20..].chunks_mut(4096) {
        for (i, b) in block.iter_mut().enumerate() {
            *b = marker[i % marker.len()];
        }
    }
    std::fs::write(&path, content).unwrap();
    DiskSpec {
        id: "data".into(),
        path,
        format: DiskFormat::Raw,
        bus: DiskBus::VirtioBlk,
        cache: CacheMode::None,
        read_only: false,
        serial: None,
        backing: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_capture_of_a_block_migration_shows_neither_disk_nor_memory() {
    let lab = lab().await;
    let work = tempfile::tempdir().unwrap();
    let disk = marked_disk(work.path());
    let mut vm = lab.boot_guest("hv1", &guest(vec![disk])).await.unwrap();
    let params = MigrationParams::default();
    let needles: Vec<&str> = RAM_NEEDLES.iter().copied().chain([DISK_MARKER]).collect();

    let plain = captured_migration(
        &lab,
        &mut vm,
        "hv2",
        &params,
        &LabMigrateOptions {
            copy_disks: true,
            ..Default::default()
        },
        work.path(),
        "block-plain",
    )
    .await;
    assert_captured(&plain, "block-plain");
    let seen = found(&plain.capture, &needles);
    eprintln!("block-plain: found {seen:?}");
    assert!(
        seen.iter().all(|(_, n)| *n > 0),
        "a plain block migration shows the guest's disk and memory: {seen:?}"
    );

    let opts = LabMigrateOptions {
        tls: tls_to(&lab, "hv1"),
        copy_disks: true,
    };
    let leg = captured_migration(
        &lab,
        &mut vm,
        "hv1",
        &params,
        &opts,
        work.path(),
        "block-tls",
    )
    .await;
    assert_eq!(vm.host, "hv1");
    // The disk went too: its marker is in the capture's size (8 MiB of it), not its content.
    assert!(
        leg.capture.len() > 8 << 20,
        "the disk's data crossed the wire: capture of {} bytes",
        leg.capture.len()
    );
    let seen = found(&leg.capture, &needles);
    assert!(
        seen.iter().all(|(_, n)| *n == 0),
        "plaintext in a TLS block migration: {seen:?}"
    );
    assert_eq!(
        leg.credentials_seen,
        Some(Ok(())),
        "credentials while copying"
    );
    assert_no_credentials(&lab, &vm.name, "a completed block migration");
    assert_no_tls_left(vm.qemu.qmp()).await;
    // The disk arrived whole: the image the guest now runs on holds the marker.
    let image = std::fs::read(&vm.spec.disks[0].path).unwrap();
    assert_eq!(
        count(&image[8 << 20..], DISK_MARKER),
        count(
            &std::fs::read(work.path().join("data.raw")).unwrap()[8 << 20..],
            DISK_MARKER
        )
    );
    assert_guest_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

/// One way a receiver is not the one prepared for this migration.
struct Impostor {
    name: &'static str,
    tls: LabTls,
}

fn impostors(lab: &Lab) -> Vec<Impostor> {
    let addr = IpAddr::V4(lab.net.host("hv2").unwrap().migration_addr);
    let right = issue_migration_pair("right", addr);
    let other = issue_migration_pair("other", addr);
    let mut other_ca = lab_tls(&right, addr);
    // A destination with a valid-looking certificate for the right address, from another CA.
    other_ca.destination = lab_tls(&other, addr).destination;
    let mut wrong_authz = lab_tls(&right, addr);
    if let Some(d) = wrong_authz.destination.as_mut() {
        d.peer = TlsPeer::Client {
            identity: "CN=ferry-migration-someone-else-source".into(),
        };
    }
    let mut wrong_name = lab_tls(&right, addr);
    if let Some(s) = wrong_name.source.as_mut() {
        s.peer = TlsPeer::Server {
            hostname: Ipv4Addr::new(10, 78, 0, 99).to_string(),
        };
    }
    let mut plain_receiver = lab_tls(&right, addr);
    plain_receiver.destination = None;
    vec![
        Impostor {
            name: "destination certificate from another CA",
            tls: other_ca,
        },
        Impostor {
            name: "destination allows another source identity",
            tls: wrong_authz,
        },
        Impostor {
            name: "destination certificate not for the address the source expects",
            tls: wrong_name,
        },
        Impostor {
            name: "destination without TLS",
            tls: plain_receiver,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_a_receiver_with_wrong_credentials_gets_nothing_and_the_guest_stays() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &guest(vec![])).await.unwrap();
    let params = MigrationParams {
        completion_timeout: Some(Duration::from_secs(60)),
        ..MigrationParams::default()
    };
    for impostor in impostors(&lab) {
        let (_abort, signal) = AbortHandle::new();
        let opts = LabMigrateOptions {
            tls: impostor.tls,
            ..Default::default()
        };
        let started = Instant::now();
        let err = lab
            .migrate_with(&mut vm, "hv2", &params, &opts, &mut |_| {}, signal)
            .await
            .expect_err(impostor.name);
        eprintln!(
            "{}: refused in {} ms: {err}",
            impostor.name,
            started.elapsed().as_millis()
        );
        assert!(
            matches!(err, LabError::Migrate(MigrateError::Failed(_))),
            "{}: {err}",
            impostor.name
        );
        assert_eq!(vm.host, "hv1", "{}", impostor.name);
        let ns = &lab.net.host("hv2").unwrap().netns;
        let pids = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .unwrap();
        assert!(
            pids.stdout.is_empty(),
            "{}: a QEMU is left on the destination",
            impostor.name
        );
        assert_no_credentials(&lab, &vm.name, impostor.name);
        assert_no_tls_left(vm.qemu.qmp()).await;
        assert_guest_intact(&lab, &vm).await;
    }
    // The right credentials still work afterwards, on the same source QEMU.
    let (_abort, signal) = AbortHandle::new();
    let opts = LabMigrateOptions {
        tls: tls_to(&lab, "hv2"),
        ..Default::default()
    };
    lab.migrate_with(&mut vm, "hv2", &params, &opts, &mut |_| {}, signal)
        .await
        .expect("the prepared destination receives the guest");
    assert_eq!(vm.host, "hv2");
    assert_guest_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_credentials_are_gone_after_a_cancelled_migration() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &guest(vec![])).await.unwrap();
    // 4 MiB/s: the copy lasts far longer than the moment it is cancelled at.
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(4 << 20),
        ..MigrationParams::default()
    };
    let opts = LabMigrateOptions {
        tls: tls_to(&lab, "hv2"),
        ..Default::default()
    };
    let (abort, signal) = AbortHandle::new();
    let mut during = None;
    let vm_name = vm.name.clone();
    let err = lab
        .migrate_with(
            &mut vm,
            "hv2",
            &params,
            &opts,
            &mut |e| {
                if let SourceEvent::Progress(p) = e {
                    if during.is_none() && p.transferred_bytes > 1 << 20 {
                        during = Some(check_credentials_on_disk(&lab, &vm_name));
                        abort.abort().expect("not switched over yet");
                    }
                }
            },
            signal,
        )
        .await
        .expect_err("cancelled");
    assert!(
        matches!(err, LabError::Migrate(MigrateError::Cancelled)),
        "{err}"
    );
    assert_eq!(during, Some(Ok(())), "credentials on disk while copying");
    assert_eq!(vm.host, "hv1");
    assert_no_credentials(&lab, &vm.name, "a cancelled migration");
    assert_no_tls_left(vm.qemu.qmp()).await;
    assert_guest_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_a_broken_post_copy_stream_is_recovered_encrypted() {
    use ferry_migrate::{Phase, TimeoutAction};
    use ferry_qmp::commands::{MigratePause, MigrationStatus, QueryMigrate};
    let lab = lab().await;
    let work = tempfile::tempdir().unwrap();
    let mut req = guest(vec![]);
    req.config.wss_mib = 32;
    req.config.rate_mib_s = 32;
    let mut vm = lab.boot_guest("hv1", &req).await.unwrap();
    // Post-copy after 1 s, the rest sent slowly, so that the stream can be broken while it
    // runs and must be reconnected (`migrate-recover`, `migrate` with `resume`) under TLS.
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(16 << 20),
        postcopy: true,
        postcopy_bandwidth: Some(8 << 20),
        completion_timeout: Some(Duration::from_secs(1)),
        timeout_action: TimeoutAction::Postcopy,
        ..MigrationParams::default()
    };
    let qmp = vm.qemu.qmp().clone();
    let breaker = tokio::spawn(async move {
        for _ in 0..600 {
            let info = qmp.execute(&QueryMigrate {}).await?;
            if info.status == Some(MigrationStatus::PostcopyActive) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                qmp.execute(&MigratePause {}).await?;
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, ferry_qmp::QmpError>(false)
    });
    let capture = Capture::start(&lab, "hv2", &work.path().join("postcopy.pcap"));
    let opts = LabMigrateOptions {
        tls: tls_to(&lab, "hv2"),
        ..Default::default()
    };
    let mut phases = Vec::new();
    let (_abort, signal) = AbortHandle::new();
    let out = lab
        .migrate_with(
            &mut vm,
            "hv2",
            &params,
            &opts,
            &mut |e| {
                if let SourceEvent::Progress(p) = e {
                    phases.push(p.phase);
                }
            },
            signal,
        )
        .await;
    assert!(
        breaker.await.unwrap().expect("QMP answers"),
        "the stream was broken"
    );
    let out = out.unwrap_or_else(|e| panic!("recovered and completed: {e}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let capture = tokio::task::spawn_blocking(move || capture.finish())
        .await
        .unwrap();
    assert_eq!(vm.host, "hv2");
    assert!(phases.contains(&Phase::Postcopy), "{phases:?}");
    let leg = Leg {
        capture,
        transferred: out.source.transferred_bytes,
        credentials_seen: None,
    };
    assert_captured(&leg, "tls-postcopy");
    let seen = found(&leg.capture, RAM_NEEDLES);
    assert!(
        seen.iter().all(|(_, n)| *n == 0),
        "plaintext in a recovered post-copy TLS migration: {seen:?}"
    );
    assert_no_credentials(&lab, &vm.name, "a recovered post-copy migration");
    assert_no_tls_left(vm.qemu.qmp()).await;
    assert_guest_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}
