//! A real Debian guest (built from Debian's packages by `ferry image build --debian`) as an
//! operator would run it: created with its disk copied onto a datastore (one both hosts share,
//! or one local to its host, which makes every move a block migration), booted from that disk
//! through SeaBIOS, seen through its own qemu-guest-agent, live-migrated hv1 -> hv2 -> hv1
//! while it writes to its disk, shut down cleanly, and then checked from the host: its root
//! filesystem is clean and a file it wrote before the moves is unchanged. Its NIC has a
//! static lab address that Ferry hands it (SMBIOS OEM string, read by the image's
//! `ferry-net` unit): its agent reports it, and the lab's client reaches it there on every host.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::Cluster;
use ferry_agent::DatastoreConfig;
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::migrations::{MigrationOptions, MigrationState};
use ferry_lab::debian_guest::{self, WriterLog};
use ferry_lab::debian_image::{ensure_debian_image, DebianImageOptions, DiskLayout};
use ferry_lab::instance::debian_instance;
use ferry_lab::net::{tcp_connect_in, LabNet};
use ferry_qemu::Ipv4Cidr;
use ferry_qmp::GuestAgent;
use ferry_server::config::Limits;

const VM: &str = "debian";
const BEFORE: &str = "/root/before-the-moves.bin";
const MAC: &str = "52:54:00:de:b1:01";

/// The guest agent socket of the instance on agent `host` (index).
fn qga(c: &Cluster, host: usize, i: &Instance) -> GuestAgent {
    let short: String = i.id.simple().to_string().chars().take(8).collect();
    let path = c.agent_configs[host]
        .state_dir
        .join("run")
        .join(short)
        .join("qga.sock");
    GuestAgent::new(path)
}

/// Whether the client side of the lab network reaches the guest at `addr`: a TCP connection
/// to a port nothing listens on is answered by the guest's kernel with a reset (refused),
/// which needs the guest's address, ARP and routing to work; a timeout or "unreachable"
/// means they do not. Retries for a few seconds (ARP caches after a move).
async fn reach(c: &Cluster, addr: Ipv4Addr, when: &str) {
    let ns = c.lab.client_netns.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ns = ns.clone();
        let result = tokio::task::spawn_blocking(move || {
            tcp_connect_in(&ns, SocketAddr::from((addr, 9)), Duration::from_secs(2))
        })
        .await
        .unwrap();
        match result {
            Ok(_) => return,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the lab client does not reach the guest at {addr} {when}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn host_index(name: &str) -> usize {
    name.trim_start_matches("hv").parse::<usize>().unwrap() - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_guest_boots_from_disk_moves_there_and_back_while_writing_and_stays_clean() {
    debian_moves(Storage::Shared).await;
}

/// Its root disk on storage local to each host: both moves copy the disk live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_guest_with_a_local_root_disk_moves_there_and_back_and_stays_clean() {
    debian_moves(Storage::Local).await;
}

/// Where the guest's disk lives.
#[derive(Clone, Copy, PartialEq)]
enum Storage {
    /// A datastore both hosts mount (same identity).
    Shared,
    /// A datastore `local` of each host's own.
    Local,
}

async fn debian_moves(storage: Storage) {
    let (image, _) =
        tokio::task::spawn_blocking(|| ensure_debian_image(&DebianImageOptions::default()))
            .await
            .unwrap()
            .expect("the Debian image builds from Debian's packages");
    let images = image.path.parent().unwrap().to_path_buf();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(
        shared.path().join(".ferry-datastore-id"),
        "debian-test-shared\n",
    )
    .unwrap();
    let shared_path = shared.path().to_path_buf();
    let locals = tempfile::tempdir().unwrap();
    let locals_path = locals.path().to_path_buf();
    let c = Cluster::start_with(2, Limits::default(), move |config| {
        config.datastores.push(DatastoreConfig {
            name: "debian-images".into(),
            path: images.clone(),
            identity: None,
        });
        config.datastores.push(DatastoreConfig {
            name: "shared".into(),
            path: shared_path.clone(),
            identity: None,
        });
        let local = locals_path.join(&config.name);
        std::fs::create_dir_all(&local).unwrap();
        config.datastores.push(DatastoreConfig {
            name: "local".into(),
            path: local,
            identity: None,
        });
    })
    .await;
    let datastore = match storage {
        Storage::Shared => "shared",
        Storage::Local => "local",
    };

    // The lab has no DHCP server: the guest's address is the one Ferry hands it.
    let address = Ipv4Cidr {
        addr: c.lab.guest_addr(0),
        prefix: LabNet::GUEST_PREFIX,
    };
    // Created like `ferry instance create debian --disk-image IMAGE,copy@shared --boot disk
    // --nic lab,ip=10.77.0.100/24`.
    let created = Instant::now();
    let vm: Instance = c
        .admin
        .post(
            "/v1/instances",
            &debian_instance(VM, "hv1", &image, datastore, 512, MAC, Some(address), true),
        )
        .await
        .expect("created and started");
    assert_eq!(vm.state, InstanceState::Running);
    let disk = &vm.spec.disks[0];
    assert!(disk.managed, "a copy is Ferry's: {disk:?}");
    let ga = qga(&c, 0, &vm);
    let booted = ga
        .wait_ready(Duration::from_secs(300))
        .await
        .expect("the guest agent answers after boot through SeaBIOS");
    eprintln!(
        "Debian booted to its guest agent in {:.1} s ({:.1} s after the create request)",
        booted.as_secs_f64(),
        created.elapsed().as_secs_f64()
    );

    // QEMU serves the guest agent's channel to one client at a time: let the host agent ask.
    drop(ga);
    // The server shows what the guest says about itself (the agent asks every 10 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let os = loop {
        let i: Instance = c.instance(VM).await;
        if let Some(os) = i.guest.and_then(|g| g.os) {
            break os;
        }
        assert!(Instant::now() < deadline, "no guest OS reported");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(os.contains("Debian"), "{os}");
    assert_eq!(
        vm.spec.nics[0].ipv4.as_deref(),
        Some(address.to_string().as_str())
    );
    // The guest configured itself from the SMBIOS string: its own agent reports the address
    // on the NIC with the instance's MAC (networkd may apply it after the agent starts).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let i: Instance = c.instance(VM).await;
        let interfaces = i.guest.map(|g| g.interfaces).unwrap_or_default();
        let nic = interfaces.iter().find(|n| n.mac.as_deref() == Some(MAC));
        if nic.is_some_and(|n| n.addresses.contains(&address.to_string())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest agent never reported {address} on {MAC}: {interfaces:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    reach(&c, address.addr, "on hv1").await;

    let ga = qga(&c, 0, &vm);
    let written = debian_guest::write_random_file(&ga, BEFORE, 4 << 20)
        .await
        .unwrap();
    debian_guest::start_writer(&ga).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(ga);

    let mut writes_seen = 0;
    let mut last = None;
    for to in ["hv2", "hv1"] {
        let m = c.migrate(VM, to, MigrationOptions::default()).await;
        let m = c.wait_end(m.id, Duration::from_secs(600)).await;
        assert_eq!(m.state, MigrationState::Completed, "{m:?}");
        assert_eq!(
            m.copies.len(),
            usize::from(storage == Storage::Local),
            "only a local disk is copied: {:?}",
            m.copies
        );
        last = Some(m.clone());
        let i = c.instance(VM).await;
        assert_eq!(i.host, to);
        let ga = qga(&c, host_index(to), &i);
        ga.wait_ready(Duration::from_secs(30))
            .await
            .expect("the guest agent answers on the destination");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let log: WriterLog = debian_guest::read_writer(&ga).await.unwrap();
        assert!(log.holes.is_empty(), "writes lost moving to {to}: {log:?}");
        assert!(
            log.writes > writes_seen,
            "the guest writes on {to}: {log:?}"
        );
        writes_seen = log.writes;
        reach(&c, address.addr, &format!("after the move to {to}")).await;
        let stats = m.stats.as_ref();
        eprintln!(
            "moved to {to} ({datastore} disk): QEMU's pause {:?} ms, total {:?} ms, longest gap \
             between the guest's disk writes {:.0} ms, {} writes so far",
            stats.map(|s| s.qemu_pause_ms),
            stats.map(|s| s.total_ms),
            log.longest_gap_ms,
            log.writes
        );
        assert_eq!(
            debian_guest::file_sha256(&ga, BEFORE).await.unwrap(),
            written,
            "the file written before the moves reads back identical on {to}"
        );
    }
    // (Each leg's client was dropped with its scope: the host agent may use the channel.)

    // A clean shutdown through the guest agent, then fsck from the host.
    let stopped: Instance = c
        .admin
        .post(&format!("/v1/instances/{VM}/stop"), &())
        .await
        .expect("stopped");
    assert_eq!(stopped.state, InstanceState::Stopped);
    let audit: Vec<serde_json::Value> = c.admin.get("/v1/audit").await.unwrap();
    let stop = audit
        .iter()
        .find(|e| e["action"] == "instance.stop" && e["target"] == VM)
        .expect("the stop is audited");
    assert_eq!(
        stop["detail"]["stopped_by"], "guest-agent",
        "Debian shut down through its own agent: {stop}"
    );
    let path = match storage {
        Storage::Shared => shared.path().join(&disk.image.file),
        Storage::Local => locals.path().join("hv1").join(&disk.image.file),
    };
    let layout = DiskLayout::for_size_gib(image.size_gib).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let (p, s) = (path.clone(), scratch.path().to_path_buf());
    let fsck =
        tokio::task::spawn_blocking(move || debian_guest::fsck_root(&p, "qcow2", &layout, &s))
            .await
            .unwrap()
            .expect("the root filesystem is clean after three hosts and a shutdown");
    eprintln!("{}", fsck.trim());
    assert!(path.exists());
    let _: serde_json::Value = c
        .admin
        .delete(&format!("/v1/instances/{VM}"))
        .await
        .expect("deleted");
    assert!(
        !path.exists(),
        "the copy Ferry made is deleted with the instance"
    );
    assert!(image.path.exists(), "the image it was given stays");
    if storage == Storage::Local {
        // The last move kept the image on hv2 until the cleanup.
        let kept = locals.path().join("hv2").join(&disk.image.file);
        assert!(kept.exists());
        let m = last.unwrap();
        let _: serde_json::Value = c
            .admin
            .post(&format!("/v1/migrations/{}/cleanup", m.id), &())
            .await
            .expect("cleaned up");
        assert!(!kept.exists());
    }
    c.shutdown().await;
}
