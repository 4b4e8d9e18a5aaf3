//! Lab network on real namespaces (needs root and iproute2).
//!
//! Every test names its lab with `unique_test_lab_name()` so the tests run in parallel, and
//! owns it through a `LabNet` so a failing assertion still removes its namespaces.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_lab::net::{
    destroy_lab, list_labs, netns_command, remove_orphan_test_labs, tcp_connect_in, tcp_listen_in,
    tcp_throughput, udp_bind_in, unique_test_lab_name, LabNet, NetError,
};

/// Namespaces of `lab` currently on the machine, sorted.
fn lab_namespaces(lab: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let prefix = format!("ferry-{lab}-");
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// Whether one `busybox ping` from `ns` to `addr` gets a reply.
fn ping(ns: &str, addr: Ipv4Addr) -> bool {
    netns_command(ns, "busybox")
        .args(["ping", "-c1", "-W2", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Pings up to three times: the first packet may be lost while bridges learn and ARP resolves.
fn reaches(ns: &str, addr: Ipv4Addr) -> bool {
    (0..3).any(|_| ping(ns, addr))
}

/// Runs `ip -n ns args...` and asserts success.
fn ip_in(ns: &str, args: &[&str]) {
    let status = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .status()
        .expect("run ip");
    assert!(status.success(), "ip -n {ns} {args:?} failed");
}

/// The namespaces a lab of `hosts` hosts must have, sorted.
fn expected_namespaces(lab: &str, hosts: usize) -> Vec<String> {
    let mut names: Vec<String> = (1..=hosts).map(|i| format!("ferry-{lab}-hv{i}")).collect();
    names.push(format!("ferry-{lab}-sw"));
    names.push(format!("ferry-{lab}-client"));
    names.sort();
    names
}

#[test]
fn two_host_lab_connects_migration_and_guest_networks() {
    let lab = unique_test_lab_name();
    let net = LabNet::create(&lab, 2).expect("create lab");
    assert_eq!(lab_namespaces(&lab), expected_namespaces(&lab, 2));
    assert!(list_labs().contains(&lab));

    let hv1 = net.host("hv1").expect("hv1").clone();
    let hv2 = net.host("hv2").expect("hv2").clone();
    assert_eq!(hv2.migration_addr, Ipv4Addr::new(10, 78, 0, 12));
    assert!(
        reaches(&hv1.netns, hv2.migration_addr),
        "hv1 cannot ping hv2"
    );

    // TCP round trip over the migration network, sockets made in the namespaces.
    let listener = tcp_listen_in(&hv2.netns, SocketAddr::from((hv2.migration_addr, 0))).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        peer
    });
    let mut client = tcp_connect_in(&hv1.netns, addr, Duration::from_secs(3)).unwrap();
    client.write_all(b"ferry").unwrap();
    let mut echo = [0u8; 5];
    client.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ferry");
    assert_eq!(server.join().unwrap().ip(), hv1.migration_addr);

    // The guest path client -> brg -> up0 -> br0, with an address standing in for a guest.
    assert_eq!(net.client_addr, Ipv4Addr::new(10, 77, 0, 2));
    ip_in(&hv1.netns, &["addr", "add", "10.77.0.250/24", "dev", "br0"]);
    assert!(reaches(&net.client_netns, Ipv4Addr::new(10, 77, 0, 250)));
    ip_in(&hv1.netns, &["addr", "del", "10.77.0.250/24", "dev", "br0"]);

    // UDP sockets land in the namespace too: binding the migration address works only there.
    let udp = udp_bind_in(&hv1.netns, SocketAddr::from((hv1.migration_addr, 0))).unwrap();
    assert_eq!(udp.local_addr().unwrap().ip(), hv1.migration_addr);

    net.destroy();
    assert!(lab_namespaces(&lab).is_empty());
}

#[test]
fn taps_join_the_guest_bridge_and_removal_is_idempotent() {
    let lab = unique_test_lab_name();
    let net = LabNet::create(&lab, 1).expect("create lab");
    let ns = net.host("hv1").unwrap().netns.clone();
    net.add_tap("hv1", "tap-web1").expect("add tap");
    let out = Command::new("ip")
        .args(["-n", &ns, "-o", "link", "show", "dev", "tap-web1"])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(line.contains("master br0"), "tap not on br0: {line}");
    net.remove_tap("hv1", "tap-web1").expect("remove tap");
    net.remove_tap("hv1", "tap-web1").expect("remove tap again");
}

#[test]
fn destroy_removes_everything_and_is_idempotent() {
    let lab = unique_test_lab_name();
    let net = LabNet::create(&lab, 3).expect("create lab");
    let ns = net.host("hv2").unwrap().netns.clone();
    let mut sleeper = netns_command(&ns, "sleep").arg("60").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    net.destroy();
    assert!(lab_namespaces(&lab).is_empty());
    assert!(!list_labs().contains(&lab));
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "process in the lab was not killed");
    net.destroy();
    destroy_lab(&lab);
    drop(net);
    assert!(lab_namespaces(&lab).is_empty());
}

#[test]
fn lab_dropped_during_panic_is_removed() {
    let lab = unique_test_lab_name();
    let name = lab.clone();
    let result = std::panic::catch_unwind(move || {
        let _net = LabNet::create(&name, 1).expect("create lab");
        assert_eq!(lab_namespaces(&name).len(), 3);
        panic!("test failure inside the lab");
    });
    assert!(result.is_err());
    assert!(lab_namespaces(&lab).is_empty());
}

#[test]
fn creating_over_a_stale_lab_leaves_one_set() {
    let lab = unique_test_lab_name();
    LabNet::create(&lab, 3).expect("create stale lab").leak();
    assert_eq!(lab_namespaces(&lab), expected_namespaces(&lab, 3));
    let net = LabNet::create(&lab, 2).expect("create over stale lab");
    assert_eq!(lab_namespaces(&lab), expected_namespaces(&lab, 2));
    let attached = LabNet::attach(&lab).expect("attach");
    assert_eq!(attached.hosts, net.hosts);
    assert!(!attached.owns_lab());
    drop(attached);
    assert_eq!(
        lab_namespaces(&lab).len(),
        4,
        "attached value removed the lab"
    );
    drop(net);
    assert!(lab_namespaces(&lab).is_empty());
}

#[test]
fn invalid_inputs_give_clear_errors() {
    for bad in ["", "Upper", "under_score", "a/b", "abcdefghijklmnopqrstu"] {
        let err = LabNet::create(bad, 1).unwrap_err();
        assert!(
            matches!(err, NetError::InvalidLabName { .. }),
            "{bad:?}: {err}"
        );
        assert_eq!(err.code(), "invalid-lab-name");
    }
    for count in [0, 9] {
        let err = LabNet::create(&unique_test_lab_name(), count).unwrap_err();
        assert_eq!(err.code(), "invalid-host-count", "{err}");
        println!("{err} ({})", err.hint());
    }
    assert!(matches!(
        LabNet::attach(&unique_test_lab_name()),
        Err(NetError::LabNotFound { .. })
    ));

    let lab = unique_test_lab_name();
    let net = LabNet::create(&lab, 2).expect("create lab");
    let err = net.host("hv7").unwrap_err();
    assert_eq!(err.code(), "unknown-host");
    assert!(err.to_string().contains("hv1, hv2"), "{err}");
    println!("{err} ({})", err.hint());
    assert_eq!(
        net.add_tap("hv9", "tap0").unwrap_err().code(),
        "unknown-host"
    );
    let err = net.add_tap("hv1", "tap-much-too-long").unwrap_err();
    assert_eq!(err.code(), "invalid-tap-name");
    println!("{err} ({})", err.hint());
    assert_eq!(
        net.remove_tap("hv1", "bad name").unwrap_err().code(),
        "invalid-tap-name"
    );
    assert_eq!(
        net.remove_tap("hv1", "up0").unwrap_err().code(),
        "invalid-tap-name",
        "the lab's uplink must not be removable as a tap"
    );
    // A command failure names the command line: the tap exists already.
    net.add_tap("hv1", "tap0").expect("add tap");
    let err = net.add_tap("hv1", "tap0").unwrap_err();
    assert_eq!(err.code(), "lab-command-failed");
    assert!(err.to_string().contains("ip -n"), "{err}");
    println!("{err} ({})", err.hint());
}

#[test]
fn orphan_test_labs_are_removed_and_live_ones_kept() {
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let orphan = format!("t{dead_pid}-0");
    LabNet::create(&orphan, 1).expect("create orphan").leak();
    let live = unique_test_lab_name();
    let net = LabNet::create(&live, 1).expect("create live lab");

    remove_orphan_test_labs();
    assert!(lab_namespaces(&orphan).is_empty(), "orphan lab survived");
    assert_eq!(lab_namespaces(&live).len(), 3, "live lab was removed");
    drop(net);
    destroy_lab(&orphan);
}

#[test]
fn throughput_between_hosts_is_measured() {
    let lab = unique_test_lab_name();
    let net = LabNet::create(&lab, 2).expect("create lab");
    let hv1 = net.host("hv1").unwrap();
    let hv2 = net.host("hv2").unwrap();
    let bps = tcp_throughput(
        &hv1.netns,
        &hv2.netns,
        hv2.migration_addr,
        Duration::from_secs(1),
    )
    .expect("measure throughput");
    println!(
        "tcp throughput hv1 -> hv2: {:.1} MB/s ({:.2} Gbit/s)",
        bps / 1e6,
        bps * 8.0 / 1e9
    );
    assert!(bps > 0.0);
}
