//! The agents' part of encrypted migrations: the source and destination requests carry each
//! half's credentials, the agent writes them owner-only beside the migration's record, gives
//! them to QEMU, and removes them (files, QEMU objects and parameters) when the half ends,
//! completed, failed or cancelled (needs root and QEMU).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_api::agent::{
    AgentInstance, DefineInstance, IncomingReady, PrepareIncoming, RemovedIncoming, SourceState,
    SourceStatus, StartSource,
};
use ferry_api::instances::InstanceState;
use ferry_api::ApiClient;
use ferry_lab::guest_client::{control_in_within, parse_verify};
use ferry_lab::guest_config::{GuestConfig, CONTROL_PORT};
use ferry_lab::image::{ensure_image, ImageOptions};
use ferry_lab::instance::guest_instance_spec;
use ferry_lab::net::{remove_orphan_test_labs, unique_test_lab_name, LabNet};
use ferry_migrate::{Bandwidth, MigrationParams, TlsCredentials, TlsPeer};
use uuid::Uuid;

#[path = "../../lab/tests/common/certs.rs"]
mod certs;
mod common;

use common::{client, config};

/// Kills the QEMUs the agents leave (detached on purpose) when the test ends, also on failure.
struct Reaper(Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for state in &self.0 {
            let Ok(dirs) = std::fs::read_dir(state.join("run")) else {
                continue;
            };
            for d in dirs.flatten() {
                if let Some(pid) = std::fs::read_to_string(d.path().join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    if pid > 1 {
                        // SAFETY: kill(2) has no memory-safety preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
    }
}

fn tls_dir(state: &Path, mid: Uuid) -> PathBuf {
    state.join("migrations").join(format!("{mid}.tls"))
}

/// The half's files are there, owner-only, under QEMU's names.
fn assert_written(state: &Path, mid: Uuid, server: bool) {
    let dir = tls_dir(state, mid);
    let (cert, key) = if server {
        ("server-cert.pem", "server-key.pem")
    } else {
        ("client-cert.pem", "client-key.pem")
    };
    for f in ["ca-cert.pem", cert, key] {
        let meta = std::fs::metadata(dir.join(f))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
}

/// The half's files are gone (the destination's after a completed migration go once QEMU's
/// incoming stream has ended, within moments of `/start`).
async fn assert_gone(state: &Path, mid: Uuid, when: &str) {
    let dir = tls_dir(state, mid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!dir.exists(), "{} still there after {when}", dir.display());
}

async fn assert_guest_intact(lab: &LabNet, ip: Ipv4Addr) {
    let addr = SocketAddr::from((ip, CONTROL_PORT));
    let reply = control_in_within(&lab.client_netns, addr, "verify", Duration::from_secs(60))
        .await
        .expect("verify answers");
    let report = parse_verify(&reply).expect("verify parses");
    assert!(report.checked > 0 && report.errors == 0, "{report:?}");
}

async fn wait_running(c: &ApiClient, id: Uuid) -> AgentInstance {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all: Vec<AgentInstance> = c.get("/v1/instances").await.expect("instances");
        if let Some(i) = all
            .iter()
            .find(|i| i.id == id && i.state == InstanceState::Running)
        {
            return i.clone();
        }
        assert!(Instant::now() < deadline, "instance never running: {all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn poll_until_done(c: &ApiClient, mid: Uuid) -> SourceStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st: SourceStatus = c
            .get(&format!("/v1/migrations/{mid}?after=0&wait_ms=500"))
            .await
            .expect("status");
        if st.state != SourceState::Running {
            return st;
        }
        assert!(Instant::now() < deadline, "migration {mid} never ended");
    }
}

/// One migration as the server drives it, with TLS: destination prepared, source started.
struct Move<'a> {
    mid: Uuid,
    src: &'a ApiClient,
    dst: &'a ApiClient,
}

#[allow(clippy::too_many_arguments)]
async fn start_move<'a>(
    src: &'a ApiClient,
    dst: &'a ApiClient,
    id: Uuid,
    name: &str,
    spec: &ferry_api::instances::InstanceSpec,
    params: &MigrationParams,
    source_tls: TlsCredentials,
    dest_tls: TlsCredentials,
) -> Move<'a> {
    let mid = Uuid::new_v4();
    let ready: IncomingReady = dst
        .post(
            &format!("/v1/migrations/{mid}/incoming"),
            &PrepareIncoming {
                instance_id: id,
                name: name.into(),
                spec: spec.clone(),
                params: params.clone(),
                disks: Vec::new(),
                tls: Some(dest_tls),
            },
        )
        .await
        .expect("incoming");
    let started: SourceStatus = src
        .post(
            &format!("/v1/migrations/{mid}/source"),
            &StartSource {
                instance_id: id,
                destination: ready.addr,
                params: params.clone(),
                disks: Vec::new(),
                tls: Some(source_tls),
            },
        )
        .await
        .expect("source starts");
    assert_eq!(started.state, SourceState::Running);
    Move { mid, src, dst }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_agents_keep_migration_credentials_only_while_the_half_runs() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
    remove_orphan_test_labs();
    let lab = LabNet::create(&unique_test_lab_name(), 2).expect("lab");
    let (image, _) = ensure_image(&ImageOptions::default()).expect("guest image");
    let tmp = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (tmp.path().join("a1"), tmp.path().join("a2"));
    let _reaper = Reaper(vec![dir1.clone(), dir2.clone()]);
    let h1 = lab.host("hv1").unwrap().clone();
    let h2 = lab.host("hv2").unwrap().clone();
    let a1 = ferry_agent::start(config(
        "hv1",
        &dir1,
        Some(h1.netns.clone()),
        h1.migration_addr,
    ))
    .await
    .expect("agent 1");
    let a2 = ferry_agent::start(config(
        "hv2",
        &dir2,
        Some(h2.netns.clone()),
        h2.migration_addr,
    ))
    .await
    .expect("agent 2");
    let (c1, c2) = (client(&a1), client(&a2));
    let addr1 = IpAddr::V4(h1.migration_addr);
    let addr2 = IpAddr::V4(h2.migration_addr);

    let ip = lab.guest_addr(0);
    let id = Uuid::new_v4();
    let name = "tls-vm".to_string();
    let guest = GuestConfig {
        ip: Some((ip, 24)),
        wss_mib: 16,
        rate_mib_s: 8,
        ..GuestConfig::default()
    };
    let spec = guest_instance_spec(&image, &guest, 128, "52:54:00:a9:00:02");
    let path = format!("/v1/instances/{id}");
    let define = DefineInstance {
        name: name.clone(),
        spec: spec.clone(),
    };
    let _: AgentInstance = c1.put(&path, &define).await.expect("define");
    let _: AgentInstance = c1.post(&format!("{path}/start"), &()).await.expect("start");
    wait_running(&c1, id).await;
    assert_guest_intact(&lab, ip).await;

    // Completed, hv1 -> hv2.
    let params = MigrationParams::default();
    let pair = certs::issue_migration_pair(&certs::fresh_id(), addr2);
    let (s, d) = certs::halves(&pair, addr2);
    let m = start_move(&c1, &c2, id, &name, &spec, &params, s, d).await;
    assert_written(&dir2, m.mid, true);
    let done = poll_until_done(m.src, m.mid).await;
    assert_eq!(done.state, SourceState::Completed, "{:?}", done.error);
    assert_gone(&dir1, m.mid, "the source half completed").await;
    let _: AgentInstance = m
        .dst
        .post(&format!("/v1/migrations/{}/confirm", m.mid), &())
        .await
        .expect("confirm");
    let _: AgentInstance = m
        .dst
        .post(&format!("/v1/migrations/{}/start", m.mid), &())
        .await
        .expect("start");
    let _: () = m
        .src
        .post(&format!("/v1/migrations/{}/finish", m.mid), &())
        .await
        .expect("finish");
    assert_gone(&dir2, m.mid, "the guest started on the destination").await;
    wait_running(&c2, id).await;
    assert_guest_intact(&lab, ip).await;

    // Failed, hv2 -> hv1: hv1 expects another source identity, so it refuses hv2's stream.
    let pair = certs::issue_migration_pair(&certs::fresh_id(), addr1);
    let (s, mut d) = certs::halves(&pair, addr1);
    d.peer = TlsPeer::Client {
        identity: "CN=ferry-migration-someone-else-source".into(),
    };
    let m = start_move(&c2, &c1, id, &name, &spec, &params, s, d).await;
    let done = poll_until_done(m.src, m.mid).await;
    assert_eq!(done.state, SourceState::Failed);
    assert_gone(&dir2, m.mid, "the source half failed").await;
    let _: RemovedIncoming = m
        .dst
        .delete(&format!("/v1/migrations/{}/incoming", m.mid))
        .await
        .expect("remove incoming");
    assert_gone(&dir1, m.mid, "the destination was removed").await;
    wait_running(&c2, id).await;
    assert_guest_intact(&lab, ip).await;

    // Cancelled, hv2 -> hv1, slowed down so the cancel comes during the copy.
    let slow = MigrationParams {
        bandwidth: Bandwidth::Limited(4 << 20),
        ..MigrationParams::default()
    };
    let pair = certs::issue_migration_pair(&certs::fresh_id(), addr1);
    let (s, d) = certs::halves(&pair, addr1);
    let m = start_move(&c2, &c1, id, &name, &spec, &slow, s, d).await;
    assert_written(&dir2, m.mid, false);
    assert_written(&dir1, m.mid, true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cancelled: SourceStatus = m
        .src
        .post(&format!("/v1/migrations/{}/cancel", m.mid), &())
        .await
        .expect("cancel");
    assert_eq!(
        cancelled.state,
        SourceState::Cancelled,
        "{:?}",
        cancelled.error
    );
    assert_gone(&dir2, m.mid, "the source half was cancelled").await;
    let _: RemovedIncoming = m
        .dst
        .delete(&format!("/v1/migrations/{}/incoming", m.mid))
        .await
        .expect("remove incoming");
    assert_gone(&dir1, m.mid, "the cancelled destination was removed").await;
    wait_running(&c2, id).await;
    assert_guest_intact(&lab, ip).await;

    // The same source QEMU migrates again, in the clear: nothing of the TLS runs is left in it.
    let mid = Uuid::new_v4();
    let ready: IncomingReady = c1
        .post(
            &format!("/v1/migrations/{mid}/incoming"),
            &PrepareIncoming {
                instance_id: id,
                name: name.clone(),
                spec: spec.clone(),
                params: params.clone(),
                disks: Vec::new(),
                tls: None,
            },
        )
        .await
        .expect("incoming");
    let _: SourceStatus = c2
        .post(
            &format!("/v1/migrations/{mid}/source"),
            &StartSource {
                instance_id: id,
                destination: ready.addr,
                params: params.clone(),
                disks: Vec::new(),
                tls: None,
            },
        )
        .await
        .expect("source starts");
    let done = poll_until_done(&c2, mid).await;
    assert_eq!(done.state, SourceState::Completed, "{:?}", done.error);

    for state in [&dir1, &dir2] {
        let left: Vec<PathBuf> = std::fs::read_dir(state.join("migrations"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "tls"))
            .collect();
        assert!(left.is_empty(), "credentials left: {left:?}");
    }
    a1.shutdown().await;
    a2.shutdown().await;
}
