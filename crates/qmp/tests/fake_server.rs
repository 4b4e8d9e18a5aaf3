//! The client against a scripted fake QMP server on a unix socket: no QEMU needed.
//! Replies are copied from QEMU 7.2 where it matters.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_qmp::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

/// The server side of one connection.
struct Peer {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Peer {
    async fn send_raw(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }

    async fn send(&mut self, v: Value) {
        self.send_raw(&v.to_string()).await;
    }

    /// Next command from the client, or None at EOF.
    async fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await.unwrap() == 0 {
            return None;
        }
        Some(serde_json::from_str(&line).expect("client sent valid JSON"))
    }

    /// Receives a command, checks its name, returns (id, whole message).
    async fn expect(&mut self, name: &str) -> (Value, Value) {
        let msg = self.recv().await.expect("a command");
        assert_eq!(msg["execute"], name, "unexpected command {msg}");
        assert!(msg["id"].is_u64(), "command without numeric id: {msg}");
        (msg["id"].clone(), msg)
    }

    async fn reply(&mut self, id: &Value, ret: Value) {
        self.send(json!({"return": ret, "id": id})).await;
    }

    async fn greet(&mut self) {
        self.send_raw(GREETING).await;
        let (id, msg) = self.expect("qmp_capabilities").await;
        assert_eq!(msg["arguments"], json!({"enable": ["oob"]}), "{msg}");
        self.reply(&id, json!({})).await;
    }
}

/// Starts a one-connection fake server running `script`; returns the socket path (its
/// tempdir must outlive the test) and the script's task.
fn serve<F, Fut>(script: F) -> (tempfile::TempDir, PathBuf, JoinHandle<()>)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, w) = stream.into_split();
        script(Peer {
            reader: BufReader::new(r),
            writer: w,
        })
        .await;
    });
    (dir, path, task)
}

async fn connect(path: &std::path::Path) -> Qmp {
    Qmp::connect(path, Duration::from_secs(5)).await.unwrap()
}

fn recorded(name: &str) -> Value {
    let path = format!("{}/tests/recorded/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn connect_reads_greeting_and_negotiates() {
    let (_dir, path, server) = serve(|mut p| async move {
        p.greet().await;
        assert!(p.recv().await.is_none(), "client should just disconnect");
    });
    let qmp = connect(&path).await;
    let v = qmp.version();
    assert_eq!((v.major, v.minor, v.micro), (7, 2, 22));
    assert_eq!(v.package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
    assert!(v.at_least(7, 2) && !v.at_least(8, 0));
    assert_eq!(qmp.capabilities(), ["oob"]);
    drop(qmp);
    // Dropping the last clone ends the tasks and closes the socket: the server sees EOF.
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("socket closed after drop")
        .unwrap();
}

#[tokio::test]
async fn events_before_the_greeting_are_skipped_and_garbage_is_refused() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.send(json!({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}))
            .await;
        p.greet().await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    assert_eq!(qmp.version().major, 7);
    drop(qmp);

    let (_dir, path, _server) = serve(|mut p| async move {
        p.send(json!({"return": {}})).await;
        p.recv().await;
    });
    let err = Qmp::connect(&path, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a QMP greeting"), "{err}");
}

#[tokio::test]
async fn typed_command_without_arguments_sends_no_arguments_key() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (id, msg) = p.expect("query-status").await;
        assert!(msg.get("arguments").is_none(), "{msg}");
        p.reply(
            &id,
            json!({"status": "running", "singlestep": false, "running": true}),
        )
        .await;
        let (id, msg) = p.expect("migrate_cancel").await;
        assert!(msg.get("arguments").is_none(), "{msg}");
        p.reply(&id, json!({})).await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    let st = qmp.execute(&QueryStatus).await.unwrap();
    assert!(st.running);
    assert_eq!(st.status, RunState::Running);
    assert_eq!(st.extra["singlestep"], false);
    qmp.execute(&MigrateCancel).await.unwrap();
}

#[tokio::test]
async fn typed_arguments_use_qapi_names() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (id, msg) = p.expect("migrate-set-parameters").await;
        assert_eq!(
            msg["arguments"],
            json!({"max-bandwidth": 1u64 << 30, "downtime-limit": 200, "multifd-compression": "zstd"})
        );
        p.reply(&id, json!({})).await;
        let (id, msg) = p.expect("migrate-set-capabilities").await;
        assert_eq!(
            msg["arguments"],
            json!({"capabilities": [{"capability": "xbzrle", "state": true}]})
        );
        p.reply(&id, json!({})).await;
        let (id, msg) = p.expect("query-cpu-model-expansion").await;
        assert_eq!(
            msg["arguments"],
            json!({"type": "full", "model": {"name": "EPYC"}})
        );
        p.reply(
            &id,
            json!({"model": {"name": "EPYC", "props": {"sse2": true}}}),
        )
        .await;
        let (id, msg) = p.expect("calc-dirty-rate").await;
        assert_eq!(
            msg["arguments"],
            json!({"calc-time": 1, "sample-pages": 512})
        );
        p.reply(&id, json!({})).await;
        let (id, msg) = p.expect("migrate-continue").await;
        assert_eq!(msg["arguments"], json!({"state": "pre-switchover"}));
        p.reply(&id, json!({})).await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    qmp.execute(&MigrateSetParameters {
        max_bandwidth: Some(1 << 30),
        downtime_limit: Some(200),
        multifd_compression: Some("zstd".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    qmp.execute(&MigrateSetCapabilities {
        capabilities: vec![CapabilityState::new(capability::XBZRLE, true)],
    })
    .await
    .unwrap();
    let exp = qmp
        .execute(&QueryCpuModelExpansion::new(
            CpuModelExpansionType::Full,
            "EPYC",
        ))
        .await
        .unwrap();
    assert_eq!(exp.model.props.unwrap()["sse2"], true);
    qmp.execute(&CalcDirtyRate {
        calc_time_unit: None,
        calc_time: 1,
        sample_pages: Some(512),
        mode: None,
    })
    .await
    .unwrap();
    qmp.execute(&MigrateContinue {
        state: MigrationStatus::PreSwitchover,
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn event_between_command_and_reply_is_delivered_and_reply_still_matched() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (id, _) = p.expect("migrate").await;
        // Recorded from QEMU 7.2: the MIGRATION event precedes the reply to `migrate`.
        p.send_raw(r#"{"timestamp": {"seconds": 1795693685, "microseconds": 488707}, "event": "MIGRATION", "data": {"status": "setup"}}"#).await;
        p.reply(&id, json!({})).await;
        p.send_raw(
            r#"{"timestamp": {"seconds": 1795693687, "microseconds": 991754}, "event": "STOP"}"#,
        )
        .await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    let mut events = qmp.events();
    qmp.execute(&Migrate::new("exec:cat > /dev/null"))
        .await
        .unwrap();
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.name, "MIGRATION");
    assert_eq!(ev.migration_status(), Some(MigrationStatus::Setup));
    assert_eq!(ev.timestamp_us, Some(1_795_693_685_488_707));
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.name, events::STOP);
    assert_eq!(ev.data, Value::Null);
}

#[tokio::test]
async fn error_reply_names_command_class_and_desc() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (id, msg) = p.expect("migrate-incoming").await;
        assert_eq!(msg["arguments"], json!({"uri": "tcp:0.0.0.0:4444"}));
        p.send(json!({"id": id, "error": {"class": "GenericError",
            "desc": "Failed to bind socket: Address already in use"}}))
            .await;
        let (id, _) = p.expect("bogus-cmd").await;
        // Recorded from QEMU 7.2.
        p.send(json!({"id": id, "error": {"class": "CommandNotFound",
            "desc": "The command bogus-cmd has not been found"}}))
            .await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    let err = qmp
        .execute(&MigrateIncoming::new("tcp:0.0.0.0:4444"))
        .await
        .unwrap_err();
    assert!(matches!(&err, QmpError::Command { class, .. } if class == "GenericError"));
    assert_eq!(
        err.to_string(),
        "migrate-incoming failed: GenericError: Failed to bind socket: Address already in use"
    );
    assert_eq!(err.command(), Some("migrate-incoming"));
    let err = qmp.execute_raw("bogus-cmd", None).await.unwrap_err();
    assert_eq!(err.class(), Some("CommandNotFound"));
    assert!(!err.is_fatal());
}

#[tokio::test]
async fn malformed_line_is_protocol_error_and_connection_survives() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (_id, _) = p.expect("query-status").await;
        p.send_raw("this is {not json").await;
        let (id, _) = p.expect("query-version").await;
        p.reply(
            &id,
            json!({"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}),
        )
        .await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(
        matches!(&err, QmpError::Protocol { command: Some(c), .. } if c == "query-status"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("query-status") && msg.contains("not JSON"),
        "{msg}"
    );
    let v = qmp.execute(&QueryVersion).await.unwrap();
    assert_eq!(v.qemu.minor, 2);
}

#[tokio::test]
async fn reply_for_unknown_id_is_protocol_error() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let _ = p.expect("query-migrate").await;
        p.send(json!({"return": {}, "id": 999_999})).await;
        p.recv().await;
    });
    let qmp = connect(&path).await.with_timeout(Duration::from_secs(30));
    let started = Instant::now();
    let err = qmp.execute(&QueryMigrate).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "must not hang");
    let msg = err.to_string();
    assert!(
        matches!(err, QmpError::Protocol { .. })
            && msg.contains("query-migrate")
            && msg.contains("unknown id 999999"),
        "{msg}"
    );
}

#[tokio::test]
async fn server_closing_mid_command_fails_waiters_with_closed_promptly() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let _ = p.expect("query-migrate").await;
        let _ = p.expect("query-status").await;
        // Drop both halves: QEMU went away without answering.
    });
    let qmp = connect(&path).await.with_timeout(Duration::from_secs(30));
    let started = Instant::now();
    let other = qmp.clone();
    let (a, b) = tokio::join!(qmp.execute(&QueryMigrate), other.execute(&QueryStatus));
    assert!(matches!(a, Err(QmpError::Closed)), "{a:?}");
    assert!(matches!(b, Err(QmpError::Closed)), "{b:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    tokio::time::timeout(Duration::from_secs(1), qmp.closed())
        .await
        .unwrap();
    assert!(qmp.is_closed());
    // Later commands fail at once too.
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(matches!(err, QmpError::Closed) && err.is_fatal());
    // `quit` treats a closed connection as done.
    qmp.quit().await.unwrap();
}

#[tokio::test]
async fn no_reply_times_out_naming_command_and_late_reply_is_ignored() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (late_id, _) = p.expect("query-migrate").await;
        let (id, _) = p.expect("query-status").await;
        p.reply(&late_id, json!({})).await; // too late: the caller gave up
        p.reply(&id, json!({"status": "paused", "running": false}))
            .await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    let err = qmp
        .clone()
        .with_timeout(Duration::from_millis(200))
        .execute(&QueryMigrate)
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("query-migrate timed out"), "{msg}");
    assert_eq!(qmp.timeout(), DEFAULT_TIMEOUT);
    let st = qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(st.status, RunState::Paused);
}

#[tokio::test]
async fn concurrent_commands_are_matched_by_id_not_order() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (id1, _) = p.expect("query-status").await;
        let (id2, _) = p.expect("query-migrate").await;
        p.reply(&id2, json!({"status": "active"})).await;
        p.reply(&id1, json!({"status": "running", "running": true}))
            .await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    let q2 = qmp.clone();
    let status = tokio::spawn(async move { q2.execute(&QueryStatus).await });
    // Make sure query-status is sent first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mig = qmp.execute(&QueryMigrate).await.unwrap();
    assert_eq!(mig.status, Some(MigrationStatus::Active));
    assert_eq!(status.await.unwrap().unwrap().status, RunState::Running);
}

#[tokio::test]
async fn unknown_enum_values_decode_to_other() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (id, _) = p.expect("query-status").await;
        p.reply(&id, json!({"status": "hibernating", "running": false}))
            .await;
        let (id, _) = p.expect("query-migrate").await;
        p.reply(
            &id,
            json!({"status": "quantum-tunnelling", "brand-new-field": [1, 2], "ram": {"mbps": 1, "new-counter": 5}}),
        )
        .await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    let st = qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(st.status, RunState::Other("hibernating".into()));
    let mig = qmp.execute(&QueryMigrate).await.unwrap();
    let status = mig.status.unwrap();
    assert_eq!(status, MigrationStatus::Other("quantum-tunnelling".into()));
    assert!(!status.is_terminal());
    assert_eq!(mig.extra["brand-new-field"], json!([1, 2]));
    let ram = mig.ram.unwrap();
    assert_eq!(ram.mbps, Some(1.0));
    assert_eq!(ram.extra["new-counter"], 5);
}

#[tokio::test]
async fn recorded_qemu_7_2_active_migration_decodes() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (id, _) = p.expect("query-migrate").await;
        let rec = recorded("query-migrate-active.json");
        p.reply(&id, rec["return"].clone()).await;
        p.recv().await;
    });
    let qmp = connect(&path).await;
    let mig = qmp.execute(&QueryMigrate).await.unwrap();
    assert_eq!(mig.status, Some(MigrationStatus::Active));
    assert_eq!(mig.total_time, Some(2502));
    assert_eq!(mig.expected_downtime, Some(300));
    assert_eq!(mig.setup_time, Some(1));
    assert_eq!(mig.downtime, None);
    let ram = mig.ram.unwrap();
    assert_eq!(ram.total, Some(134_750_208));
    assert_eq!(ram.remaining, Some(133_734_400));
    assert_eq!(ram.transferred, Some(100_719));
    assert_eq!(ram.page_size, Some(4096));
    assert_eq!(ram.dirty_sync_count, Some(1));
    assert!((ram.mbps.unwrap() - 0.32976).abs() < 1e-9);
    assert_eq!(mig.xbzrle_cache.unwrap().cache_size, Some(67_108_864));
    assert!(mig.extra.is_empty(), "{:?}", mig.extra);
}

#[tokio::test]
async fn typed_reply_that_does_not_fit_is_decode_error() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.greet().await;
        let (id, _) = p.expect("query-status").await;
        p.reply(&id, json!({"status": "running"})).await; // `running` missing
        p.recv().await;
    });
    let qmp = connect(&path).await;
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(matches!(err, QmpError::Decode { .. }), "{err:?}");
    assert!(err
        .to_string()
        .starts_with("query-status: cannot decode reply"));
}

#[tokio::test]
async fn connect_retries_until_socket_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let p2 = path.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = UnixListener::bind(&p2).unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (r, w) = stream.into_split();
        let mut p = Peer {
            reader: BufReader::new(r),
            writer: w,
        };
        p.greet().await;
        p.recv().await;
    });
    let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
    assert_eq!(qmp.version().major, 7);
}

#[tokio::test]
async fn connect_timeout_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("never.sock");
    let started = Instant::now();
    let err = Qmp::connect(&path, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("never.sock"), "{err}");
}

#[tokio::test]
async fn bad_greeting_is_protocol_error() {
    let (_dir, path, _server) = serve(|mut p| async move {
        p.send_raw(r#"{"hello": "world"}"#).await;
        p.recv().await;
    });
    let err = Qmp::connect(&path, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("greeting"), "{err}");
}

#[tokio::test]
async fn oob_commands_are_sent_as_exec_oob() {
    let (_dir, path, server) = serve(|mut p| async move {
        p.greet().await;
        let msg = p.recv().await.expect("a command");
        assert_eq!(msg["exec-oob"], "migrate-pause", "{msg}");
        assert!(msg.get("execute").is_none(), "{msg}");
        p.reply(&msg["id"].clone(), json!({})).await;
    });
    let qmp = connect(&path).await;
    qmp.execute_oob(&ferry_qmp::commands::MigratePause {})
        .await
        .unwrap();
    drop(qmp);
    server.await.unwrap();
}
