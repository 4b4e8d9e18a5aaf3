//! The cold migration's disk copy over TLS with per-migration credentials, with the real
//! `qemu-nbd` and `qemu-img`: the copy is complete and identical, a receiver with credentials
//! of another CA or an authz for another identity refuses the sender (and the partial image
//! goes), the credential files are gone after every outcome, and a capture of the wire holds
//! no image content (the same capture of a plain copy does, so the test can fail).
//! Needs root, qemu-img/qemu-nbd and tcpdump (CI has them; `scripts/setup` installs them).

#[path = "../../lab/tests/common/certs.rs"]
mod certs;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use certs::{halves, issue_migration_pair};
use ferry_migrate::{TlsCredentials, TlsPeer};
use ferry_qemu::DiskFormat;
use ferry_storage::checksum::{image_checksum, ChecksumOptions};
use ferry_storage::copy::{
    image_size, send, CopyError, CopyTls, ReceiveSpec, Receiver, SendProgress, SendSpec,
};
use tokio::sync::watch;

/// What the capture test writes all over its image: plain bytes of the disk on the wire.
const MARKER: &str = "FERRY-COLD-COPY-MARKER-on-the-disk-only-3b9e";

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private network namespace with its loopback up: the copy's two halves talk in it, so a
/// capture there sees this test's copy only. Deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("ferry-cold-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns(name);
        run("ip", &["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// tcpdump on a namespace's loopback, every TCP packet whole. Killed by its pid if dropped
/// before [`Capture::finish`].
struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &Netns, file: &Path) -> Capture {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", &ns.0, "tcpdump", "-i", "lo", "-n", "-s", "0",
            ])
            .args(["-B", "131072", "-U", "-w"])
            .arg(file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump starts (scripts/setup installs it)");
        // "listening on" once its socket is open: only then can nothing be missed.
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
        // SAFETY: kill with the pid of our own child, not waited for yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
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

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn qemu_img(args: &[&str]) {
    run("qemu-img", args);
}

fn qemu_io(image: &Path, format: &str, command: &str) {
    run(
        "qemu-io",
        &["-f", format, "-c", command, image.to_str().unwrap()],
    );
}

/// Ports searched for: any fixed one may be some connection's ephemeral port.
fn free_port_range(n: u16) -> u16 {
    for first in (40000..48000).step_by(usize::from(n) + 7) {
        let held: Vec<_> = (first..first + n)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return first;
        }
    }
    panic!("no {n} free consecutive ports");
}

/// The two halves' TLS for a fresh migration to 127.0.0.1, their files under `base`.
fn tls_pair(base: &Path) -> (CopyTls, CopyTls) {
    let c = issue_migration_pair(&certs::fresh_id(), LOCALHOST);
    let (source, destination) = halves(&c, LOCALHOST);
    (
        CopyTls {
            credentials: source,
            dir: base.join("send.tls"),
        },
        CopyTls {
            credentials: destination,
            dir: base.join("receive.tls"),
        },
    )
}

fn receive_spec(
    path: &Path,
    size: u64,
    tls: Option<CopyTls>,
    netns: Option<&Netns>,
) -> ReceiveSpec {
    let first_port = if netns.is_some() {
        10809
    } else {
        free_port_range(8)
    };
    ReceiveSpec {
        path: path.into(),
        format: DiskFormat::Qcow2,
        size_bytes: size,
        addr: LOCALHOST,
        first_port,
        last_port: first_port + 7,
        export: "tls-test-export-42".into(),
        netns: netns.map(|n| n.0.clone()),
        start_timeout: Duration::from_secs(10),
        tls,
    }
}

fn send_spec(src: &Path, r: &Receiver, tls: Option<CopyTls>, netns: Option<&Netns>) -> SendSpec {
    SendSpec {
        path: src.into(),
        format: DiskFormat::Qcow2,
        destination: r.addr(),
        export: r.export().into(),
        netns: netns.map(|n| n.0.clone()),
        rate_limit_bps: None,
        stall_timeout: Duration::from_secs(60),
        tls,
    }
}

/// One whole copy of `src` into a new `dst`.
async fn copy(
    src: &Path,
    dst: &Path,
    tls: Option<(CopyTls, CopyTls)>,
    netns: Option<&Netns>,
) -> Result<(), CopyError> {
    let size = image_size(src, DiskFormat::Qcow2).await?.virtual_bytes;
    let (send_tls, receive_tls) = tls.unzip();
    let r = Receiver::start(&receive_spec(dst, size, receive_tls, netns)).await?;
    let (tx, _rx) = watch::channel(SendProgress::default());
    match send(&send_spec(src, &r, send_tls, netns), &tx).await {
        Ok(_) => {
            r.finish().await?;
            Ok(())
        }
        Err(e) => {
            r.abort().await;
            Err(e)
        }
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn source_image(dir: &Path) -> PathBuf {
    let src = dir.join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "256M"]);
    qemu_io(&src, "qcow2", "write -P 0x5a 0 3M");
    qemu_io(&src, "qcow2", "write -P 0xa5 200M 1M");
    src
}

#[tokio::test]
async fn a_tls_copy_is_identical_and_leaves_no_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_image(dir.path());
    let dst = dir.path().join("dst.qcow2");
    let (send_tls, receive_tls) = tls_pair(dir.path());
    let (send_dir, receive_dir) = (send_tls.dir.clone(), receive_tls.dir.clone());
    let size = image_size(&src, DiskFormat::Qcow2)
        .await
        .unwrap()
        .virtual_bytes;
    let r = Receiver::start(&receive_spec(&dst, size, Some(receive_tls), None))
        .await
        .unwrap();
    assert!(r.tls());
    // While the export runs, its files are private and named as QEMU expects.
    assert_eq!(mode(&receive_dir), 0o700);
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        assert_eq!(mode(&receive_dir.join(f)), 0o600, "{f}");
    }
    let (tx, rx) = watch::channel(SendProgress::default());
    send(&send_spec(&src, &r, Some(send_tls), None), &tx)
        .await
        .unwrap();
    assert_eq!(rx.borrow().percent, 100.0);
    assert!(!send_dir.exists(), "the sender's credentials outlived it");
    r.finish().await.unwrap();
    assert!(
        !receive_dir.exists(),
        "the receiver's credentials outlived it"
    );
    let opts = ChecksumOptions::default();
    let a = image_checksum(&src, DiskFormat::Qcow2, &opts, None)
        .await
        .unwrap();
    let b = image_checksum(&dst, DiskFormat::Qcow2, &opts, None)
        .await
        .unwrap();
    assert_eq!(a.sha256, b.sha256);
    assert!(b.read_bytes > 0);
}

/// Credentials of another CA, or an authz for another identity: `qemu-nbd` refuses the
/// sender, the send fails with the tool's words, the partial image and every credential
/// file go.
#[tokio::test]
async fn a_receiver_with_other_credentials_refuses_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_image(dir.path());
    let other_ca = {
        let (_, mut receive) = tls_pair(dir.path());
        receive.dir = dir.path().join("other-receive.tls");
        receive
    };
    let other_identity = {
        let (send, mut receive) = tls_pair(dir.path());
        receive.credentials.peer = TlsPeer::Client {
            identity: "CN=ferry-migration-someone-else-source".into(),
        };
        (send, receive)
    };
    let (send_a, _) = tls_pair(dir.path());
    // The sender trusts the receiver (its CA is in the sender's bundle, next to the one that
    // signed the sender's own certificate, which QEMU checks at its start), but the sender's
    // certificate comes from another CA: only the receiver's check of its client refuses it.
    let foreign_client = {
        let (_, receive) = tls_pair(dir.path());
        let (mut send, _) = tls_pair(dir.path());
        send.credentials.ca_pem =
            format!("{}{}", send.credentials.ca_pem, receive.credentials.ca_pem);
        (send, receive)
    };
    for (what, pair) in [
        ("a receiver of another CA", (send_a, other_ca)),
        ("a receiver for another identity", other_identity),
        ("a client certificate of another CA", foreign_client),
    ] {
        let dirs = [pair.0.dir.clone(), pair.1.dir.clone()];
        let dst = dir.path().join("refused.qcow2");
        let started = Instant::now();
        let err = copy(&src, &dst, Some(pair), None).await.expect_err(what);
        eprintln!("{what}: {err}");
        assert_eq!(err.code(), "storage-tool-failed", "{what}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: the refusal took {:?}",
            started.elapsed()
        );
        assert!(!dst.exists(), "{what}: the partial image was left");
        for d in &dirs {
            assert!(!d.exists(), "{what}: {} left", d.display());
        }
    }
    // The sender's own check: the receiver's credentials on the sending side are refused
    // before anything runs or is written.
    let (_, receive) = tls_pair(dir.path());
    let mut wrong: TlsCredentials = receive.credentials.clone();
    wrong.peer = TlsPeer::Client {
        identity: "CN=x".into(),
    };
    let spec = SendSpec {
        path: src.clone(),
        format: DiskFormat::Qcow2,
        destination: "127.0.0.1:9".parse().unwrap(),
        export: "x".into(),
        netns: None,
        rate_limit_bps: None,
        stall_timeout: Duration::from_secs(5),
        tls: Some(CopyTls {
            credentials: wrong,
            dir: receive.dir.clone(),
        }),
    };
    let (tx, _rx) = watch::channel(SendProgress::default());
    let err = send(&spec, &tx).await.unwrap_err();
    assert_eq!(err.code(), "copy-tls-credentials", "{err}");
    assert!(!receive.dir.exists());
}

/// The wire of a TLS copy holds none of the image's bytes; the wire of the same copy in
/// plain does (so this test can fail).
#[tokio::test]
async fn a_capture_of_a_tls_copy_holds_no_disk_content() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("marked.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "64M"]);
    // The marker, many times over a few MiB, through a raw file converted to qcow2.
    let raw = dir.path().join("marked.raw");
    let mut bytes = Vec::new();
    while bytes.len() < 4 << 20 {
        bytes.extend_from_slice(MARKER.as_bytes());
        bytes.push(b'\n');
    }
    std::fs::write(&raw, &bytes).unwrap();
    std::fs::remove_file(&src).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
    let ns = Netns::new("cap");
    for tls in [true, false] {
        let dst = dir.path().join(format!("copy-{tls}.qcow2"));
        let pcap = dir.path().join(format!("copy-{tls}.pcap"));
        let capture = Capture::start(&ns, &pcap);
        let pair = tls.then(|| tls_pair(dir.path()));
        copy(&src, &dst, pair, Some(&ns)).await.unwrap();
        let wire = capture.finish();
        // The image holds 4 MiB; a few packets the kernel may drop under load.
        assert!(
            wire.len() > 2 << 20,
            "the capture ({} bytes) missed the copy",
            wire.len()
        );
        if tls {
            assert!(
                !contains(&wire, MARKER),
                "the disk's content is on the wire of a TLS copy"
            );
        } else {
            assert!(
                contains(&wire, MARKER),
                "a plain copy's capture lacks the marker: the capture is broken"
            );
        }
        assert!(!dir.path().join("send.tls").exists() && !dir.path().join("receive.tls").exists());
    }
}
