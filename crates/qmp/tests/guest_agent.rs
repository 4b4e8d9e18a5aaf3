//! The guest agent client against a scripted fake agent on a unix socket: the framing of
//! `guest-sync-delimited` (0xFF sentinel, stale bytes and stale ids), timeouts, errors and
//! reconnection, without a guest. Replies are copied from qemu-guest-agent 7.2 where it
//! matters.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_qmp::guest_agent::{GuestAgent, GuestAgentError, IpAddressType, ShutdownMode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// The agent's side of one connection.
struct Peer {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Peer {
    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, v: Value) {
        self.send_bytes(format!("{v}\n").as_bytes()).await;
    }

    /// Next request as raw bytes (without the newline), or None at EOF.
    async fn recv_raw(&mut self) -> Option<Vec<u8>> {
        let mut line = Vec::new();
        if self.reader.read_until(b'\n', &mut line).await.unwrap() == 0 {
            return None;
        }
        line.pop();
        Some(line)
    }

    /// Expects `0xFF` + `guest-sync-delimited`; returns its id.
    async fn expect_sync(&mut self) -> u64 {
        let raw = self.recv_raw().await.expect("a sync request");
        assert_eq!(raw[0], 0xFF, "sync must be preceded by 0xFF");
        let msg: Value = serde_json::from_slice(&raw[1..]).unwrap();
        assert_eq!(msg["execute"], "guest-sync-delimited", "{msg}");
        msg["arguments"]["id"].as_u64().expect("numeric id")
    }

    /// Answers a sync the way the agent does: sentinel, then the id.
    async fn answer_sync(&mut self, id: u64) {
        self.send_bytes(&[0xFF]).await;
        self.send(json!({"return": id})).await;
    }

    async fn sync(&mut self) {
        let id = self.expect_sync().await;
        self.answer_sync(id).await;
    }

    /// Expects a command; returns its arguments (Null when none).
    async fn expect(&mut self, name: &str) -> Value {
        let raw = self.recv_raw().await.expect("a command");
        let msg: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(msg["execute"], name, "unexpected command {msg}");
        assert!(msg.get("id").is_none(), "the agent matches no ids: {msg}");
        msg.get("arguments").cloned().unwrap_or(Value::Null)
    }
}

/// Serves `script` on successive connections (one script call per connection, with its
/// number); returns the socket path (the tempdir must outlive the test) and the task.
fn serve<F, Fut>(script: F) -> (tempfile::TempDir, PathBuf, JoinHandle<()>)
where
    F: Fn(usize, Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(async move {
        let mut n = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let (r, w) = stream.into_split();
            script(
                n,
                Peer {
                    reader: BufReader::new(r),
                    writer: w,
                },
            )
            .await;
            n += 1;
        }
    });
    (dir, path, task)
}

#[tokio::test]
async fn sync_discards_stale_bytes_and_stale_ids() {
    let (_dir, path, _server) = serve(|_, mut p| async move {
        let id = p.expect_sync().await;
        // A previous client's unread reply, half a line, a late answer to another sync...
        p.send_bytes(b"{\"return\": {}}\n{\"return\": {\"pid\"")
            .await;
        p.send_bytes(&[0xFF]).await;
        p.send(json!({"return": id + 1})).await;
        p.send_bytes(b"junk").await;
        // ...then the real answer.
        p.answer_sync(id).await;
        p.expect("guest-ping").await;
        p.send(json!({"return": {}})).await;
        p.expect("guest-get-osinfo").await;
        p.send(
            json!({"return": {"name": "Debian GNU/Linux", "kernel-release": "6.1.0-57-cloud-amd64",
            "version": "12 (bookworm)", "pretty-name": "Debian GNU/Linux 12 (bookworm)",
            "version-id": "12", "machine": "x86_64", "id": "debian", "brand-new": [1]}}),
        )
        .await;
        p.recv_raw().await;
    });
    let agent = GuestAgent::new(&path).with_timeout(Duration::from_secs(5));
    agent.ping().await.unwrap();
    let os = agent.get_osinfo().await.unwrap();
    assert_eq!(os.id.as_deref(), Some("debian"));
    assert_eq!(os.version_id.as_deref(), Some("12"));
    assert_eq!(os.extra["brand-new"], json!([1]));
}

#[tokio::test]
async fn an_agent_that_never_answers_is_not_running_within_the_timeout() {
    let (_dir, path, _server) = serve(|_, mut p| async move {
        // QEMU accepts the connection even without an agent in the guest; nothing answers.
        while p.recv_raw().await.is_some() {}
    });
    let agent = GuestAgent::new(&path).with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = agent.ping().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, GuestAgentError::NotRunning { .. }), "{err:?}");
    assert_eq!(err.code(), "agent-not-running");
    assert!(err.is_transient());
}

#[tokio::test]
async fn a_timed_out_command_forces_a_resync_and_its_late_reply_is_dropped() {
    let (_dir, path, _server) = serve(|_, mut p| async move {
        p.sync().await;
        p.expect("guest-info").await;
        // No answer in time; the client gives up and resyncs. The late reply arrives
        // before the sync's sentinel and must not be taken for the next command's.
        let id = p.expect_sync().await;
        p.send(json!({"return": {"version": "late", "supported_commands": []}}))
            .await;
        p.answer_sync(id).await;
        p.expect("guest-info").await;
        p.send(
            json!({"return": {"version": "7.2.22", "supported_commands": [
            {"enabled": true, "name": "guest-ping", "success-response": true},
            {"enabled": false, "name": "guest-exec", "success-response": true}]}}),
        )
        .await;
        p.recv_raw().await;
    });
    let agent = GuestAgent::new(&path).with_timeout(Duration::from_millis(400));
    let err = agent.info().await.unwrap_err();
    assert!(
        matches!(&err, GuestAgentError::Timeout { command, .. } if command == "guest-info"),
        "{err:?}"
    );
    let agent = agent.with_timeout(Duration::from_secs(5));
    let info = agent.info().await.unwrap();
    assert_eq!(info.version, "7.2.22");
    assert!(info.supports("guest-ping"));
    assert!(
        !info.supports("guest-exec"),
        "disabled commands are not supported"
    );
}

#[tokio::test]
async fn guest_errors_carry_class_and_description() {
    let (_dir, path, _server) = serve(|_, mut p| async move {
        p.sync().await;
        let args = p.expect("guest-exec").await;
        assert_eq!(
            args,
            json!({"path": "/nope", "arg": ["x"], "capture-output": true})
        );
        p.send(json!({"error": {"class": "GenericError",
            "desc": "Guest agent command failed, error was 'Failed to execute child process “/nope” (No such file or directory)'"}}))
            .await;
        p.recv_raw().await;
    });
    let agent = GuestAgent::new(&path);
    let err = agent.exec("/nope", &["x"], true).await.unwrap_err();
    assert_eq!(err.class(), Some("GenericError"));
    assert_eq!(err.code(), "agent-guest-error");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("No such file"), "{err}");
}

#[tokio::test]
async fn run_polls_until_the_process_exits_and_decodes_its_output() {
    let (_dir, path, _server) = serve(|_, mut p| async move {
        p.sync().await;
        let args = p.expect("guest-exec").await;
        assert_eq!(args["path"], "/bin/sh");
        p.send(json!({"return": {"pid": 228}})).await;
        for _ in 0..2 {
            assert_eq!(p.expect("guest-exec-status").await, json!({"pid": 228}));
            p.send(json!({"return": {"exited": false}})).await;
        }
        p.expect("guest-exec-status").await;
        p.send(
            json!({"return": {"exitcode": 3, "err-data": "ZXJyCg==", "out-data": "aGkK",
            "err-truncated": false, "out-truncated": false, "exited": true}}),
        )
        .await;
        p.expect("guest-network-get-interfaces").await;
        p.send(json!({"return": [{"name": "lo", "ip-addresses": [
            {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
            {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}],
            "statistics": {"tx-packets": 0}, "hardware-address": "00:00:00:00:00:00"}]}))
            .await;
        p.recv_raw().await;
    });
    let agent = GuestAgent::new(&path);
    let out = agent
        .run(
            "/bin/sh",
            &["-c", "echo hi; echo err >&2; exit 3"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert!(!out.success());
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"err\n");
    let ifs = agent.network_get_interfaces().await.unwrap();
    assert_eq!(ifs[0].name, "lo");
    assert_eq!(
        ifs[0].hardware_address.as_deref(),
        Some("00:00:00:00:00:00")
    );
    assert_eq!(ifs[0].ip_addresses[1].ip_address_type, IpAddressType::Ipv6);
    assert_eq!(ifs[0].ip_addresses[1].prefix, 128);
}

#[tokio::test]
async fn run_gives_up_at_its_timeout() {
    let (_dir, path, _server) = serve(|_, mut p| async move {
        p.sync().await;
        p.expect("guest-exec").await;
        p.send(json!({"return": {"pid": 7}})).await;
        while p.recv_raw().await.is_some() {
            p.send(json!({"return": {"exited": false}})).await;
        }
    });
    let agent = GuestAgent::new(&path);
    let started = Instant::now();
    let err = agent
        .run("/bin/sleep", &["100"], Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, GuestAgentError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn shutdown_counts_a_closed_socket_or_silence_as_sent_and_reports_errors() {
    let (_dir, path, _server) = serve(|n, mut p| async move {
        p.sync().await;
        let args = p.expect("guest-shutdown").await;
        match n {
            // Powerdown: the guest, and QEMU with it, go away.
            0 => assert_eq!(args, json!({"mode": "powerdown"})),
            // Reboot: nothing comes back.
            1 => {
                assert_eq!(args, json!({"mode": "reboot"}));
                p.recv_raw().await;
            }
            // The guest's shutdown command failed (seen on a guest without dbus).
            _ => {
                p.send(json!({"error": {"class": "GenericError",
                    "desc": "child process has failed to shutdown"}}))
                    .await;
                p.recv_raw().await;
            }
        }
    });
    let agent = GuestAgent::new(&path).with_timeout(Duration::from_secs(5));
    agent.shutdown(ShutdownMode::Powerdown).await.unwrap();

    let quick = GuestAgent::new(&path).with_timeout(Duration::from_millis(500));
    let started = Instant::now();
    quick.shutdown(ShutdownMode::Reboot).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    // The fake serves one connection at a time, like QEMU's chardev.
    drop(quick);

    let agent = GuestAgent::new(&path);
    let err = agent.shutdown(ShutdownMode::Halt).await.unwrap_err();
    assert!(err.to_string().contains("failed to shutdown"), "{err}");
}

#[tokio::test]
async fn a_connection_closed_by_qemu_is_replaced_on_the_next_call() {
    let (_dir, path, _server) = serve(|n, mut p| async move {
        p.sync().await;
        p.expect("guest-ping").await;
        p.send(json!({"return": {}})).await;
        if n > 0 {
            p.recv_raw().await;
        }
        // The first connection ends here, as when QEMU restarts.
    });
    let agent = GuestAgent::new(&path);
    agent.ping().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent.ping().await.unwrap();
}

#[tokio::test]
async fn missing_socket_is_a_transient_connect_error_and_wait_ready_outlasts_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let err = GuestAgent::new(&path).ping().await.unwrap_err();
    assert!(matches!(err, GuestAgentError::Connect { .. }), "{err:?}");
    assert!(err.is_transient());

    // The socket appears late (QEMU starting), and the agent answers only the second sync
    // (still booting when the first one came).
    let late = path.clone();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let listener = UnixListener::bind(&late).unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (r, w) = stream.into_split();
        let mut p = Peer {
            reader: BufReader::new(r),
            writer: w,
        };
        p.expect_sync().await;
        p.sync().await;
        p.expect("guest-ping").await;
        p.send(json!({"return": {}})).await;
        p.recv_raw().await;
    });
    let agent = GuestAgent::new(&path).with_timeout(Duration::from_millis(300));
    let took = agent.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    drop(agent);
    server.await.unwrap();

    let never = GuestAgent::new(dir.path().join("never.sock"));
    let err = never
        .wait_ready(Duration::from_millis(600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "agent-connect");
}

#[tokio::test]
async fn connect_syncs_at_once() {
    let (_dir, path, _server) = serve(|_, mut p| async move {
        p.sync().await;
        p.recv_raw().await;
    });
    GuestAgent::connect(&path, Duration::from_secs(5))
        .await
        .unwrap();
}
