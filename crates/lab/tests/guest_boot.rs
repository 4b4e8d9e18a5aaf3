//! Boots the real guest image under QEMU (TCG, user-mode networking) and talks to it: proves the
//! image builder, the embedded guest program and the host-side protocol fit together.
//!
//! Needs root and qemu-system-x86_64; skipped (with a message) otherwise. Set `FERRY_CACHE_DIR`
//! to a persistent directory so repeated runs do not download the kernel again.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_lab::guest_client::{self, parse_heartbeat};
use ferry_lab::guest_client::{tcp_echo_roundtrip, EchoProbe};
use ferry_lab::guest_config::{GuestConfig, CONTROL_PORT, ECHO_PORT};
use ferry_lab::image::{ensure_image, ImageOptions};

mod common;
use common::{require_root_and_qemu, QEMU};

/// Kills QEMU when the test ends, whether it passed or failed.
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn read_log(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn heartbeats(log: &str) -> Vec<(u64, u64)> {
    log.lines().filter_map(parse_heartbeat).collect()
}

async fn control(port: u16, command: &str) -> String {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the forwarded control port");
    guest_client::control(stream, command)
        .await
        .unwrap_or_else(|e| panic!("`{command}` failed: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_serves_and_verifies_its_memory() {
    require_root_and_qemu();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache_dir = std::env::var_os("FERRY_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("cache"));
    let opts = ImageOptions {
        cache_dir,
        ..ImageOptions::default()
    };
    let started = Instant::now();
    let (image, rebuilt) = tokio::task::spawn_blocking(move || ensure_image(&opts))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("building the image: {e}"));
    eprintln!(
        "image {} (kernel {}, rebuilt={rebuilt}) in {:?}",
        image.id,
        image.kernel_version,
        started.elapsed()
    );

    let cfg = GuestConfig {
        ip: Some((Ipv4Addr::new(10, 0, 2, 15), 24)),
        gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
        wss_mib: 16,
        rate_mib_s: 8,
        ..GuestConfig::default()
    };
    cfg.validate(256).expect("valid config");
    let port = free_port();
    let echo_port = free_port();
    let log = tmp.path().join("serial.log");
    let boot_started = Instant::now();
    let child = Command::new(QEMU)
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-no-user-config", "-kernel"])
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(cfg.kernel_cmdline())
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{CONTROL_PORT},\
             hostfwd=tcp:127.0.0.1:{echo_port}-:{ECHO_PORT},\
             hostfwd=udp:127.0.0.1:{echo_port}-:{ECHO_PORT}"
        ))
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start qemu");
    let mut qemu = QemuGuard(child);

    // Wait for the ready line.
    let deadline = boot_started + Duration::from_secs(60);
    loop {
        let text = read_log(&log);
        if text.contains("ferry-guest ready") {
            break;
        }
        if let Ok(Some(status)) = qemu.0.try_wait() {
            panic!("qemu exited with {status} before the guest was ready; log:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "guest not ready within 60 s; log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let boot_time = boot_started.elapsed();
    eprintln!("guest ready {boot_time:?} after qemu start");
    let text = read_log(&log);
    let ready = text
        .lines()
        .find(|l| l.contains("ferry-guest ready"))
        .unwrap_or_default();
    assert!(ready.contains("ip=10.0.2.15/24 wss=16 rate=8"), "{ready}");

    // Heartbeats count up by one from 1.
    let first = heartbeats(&text);
    assert!(!first.is_empty(), "no heartbeat before ready; log:\n{text}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = heartbeats(&read_log(&log));
    assert!(later.len() > first.len(), "heartbeat stopped");
    for (i, (counter, _)) in later.iter().enumerate() {
        assert_eq!(*counter, i as u64 + 1, "heartbeat counters not consecutive");
    }
    assert!(
        later.windows(2).all(|w| w[1].1 >= w[0].1),
        "guest clock went back"
    );

    let status = guest_client::parse_status(&control(port, "status").await).expect("status");
    eprintln!("status: {status:?}");
    assert_eq!(status.pages, 4096);
    assert!(status.rounds >= 1 && status.writes >= 4096);
    assert_eq!(status.rate_mib_s, 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status2 = guest_client::parse_status(&control(port, "status").await).expect("status");
    assert!(status2.writes > status.writes, "writer does not write");

    let verify = guest_client::parse_verify(&control(port, "verify").await).expect("verify");
    assert_eq!((verify.checked, verify.errors), (4096, 0), "{verify:?}");

    // Stop the writer so it cannot heal the stale page before `verify` sees it.
    assert_eq!(control(port, "rate 0").await, "ok");
    assert_eq!(control(port, "stale 5").await, "ok");
    let verify = guest_client::parse_verify(&control(port, "verify").await).expect("verify");
    assert!(verify.errors >= 1, "{verify:?}");
    assert_eq!(verify.first_error, Some(5), "{verify:?}");

    // Echo services: a TCP stream and a UDP probe through the port forwards.
    let echo_addr: SocketAddr = ([127, 0, 0, 1], echo_port).into();
    let (tcp_ok, udp) = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(echo_addr).expect("connect echo");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let tcp_ok = (0..3).all(|_| tcp_echo_roundtrip(&mut stream, &payload).is_ok());
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let probe = EchoProbe::start(socket, echo_addr, Duration::from_millis(10)).expect("probe");
        std::thread::sleep(Duration::from_secs(1));
        (tcp_ok, probe.stop())
    })
    .await
    .expect("join");
    eprintln!("udp echo: {udp:?}");
    assert!(tcp_ok, "tcp echo roundtrip failed");
    assert!(udp.received > 0 && udp.received + 5 >= udp.sent, "{udp:?}");
    let status = guest_client::parse_status(&control(port, "status").await).expect("status");
    assert!(
        status.echo_tcp >= 1 && status.echo_udp >= udp.received,
        "{status:?}"
    );

    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let err = guest_client::control(stream, "launch-rockets")
        .await
        .expect_err("unknown command must be refused");
    assert!(
        err.to_string().contains("unknown-command"),
        "unexpected error: {err}"
    );

    drop(qemu);
    eprintln!("boot time (qemu start to ready): {boot_time:?}");
}
