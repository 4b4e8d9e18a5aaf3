//! Host side of the test guest's protocols: the control line protocol (port 7778), heartbeat
//! lines from the serial console, and echo probes (port 7777).
//!
//! Sockets are always created by the caller and passed in, because in the lab they must be
//! opened inside the client's network namespace; this module never decides where it connects
//! from.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

mod disk;

pub use disk::{
    disk_verify, parse_disk_verify, BadBlock, BadKind, DiskStatus, DiskVerifyReport, UnknownWrite,
    WriteOutcome,
};

/// Errors talking to the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest control connection failed: {0} (is the guest up and its port reachable?)")]
    Io(#[from] io::Error),
    #[error("guest did not answer `{command}` within {timeout:?} (guest paused or network cut?)")]
    Timeout { command: String, timeout: Duration },
    #[error("guest closed the control connection before answering `{command}`")]
    Closed { command: String },
    #[error("guest refused `{command}`: {reply}")]
    Refused { command: String, reply: String },
    #[error("cannot parse guest reply {reply:?}: {reason}")]
    Parse { reply: String, reason: String },
}

/// Sends one command to a guest's control port at `addr`, connecting from inside network
/// namespace `netns` (the lab's client namespace), as a user of the VM would reach it.
pub async fn control_in(
    netns: &str,
    addr: SocketAddr,
    command: &str,
) -> Result<String, GuestError> {
    let ns = netns.to_string();
    let stream = tokio::task::spawn_blocking(move || {
        crate::net::tcp_connect_in(&ns, addr, Duration::from_secs(5))
    })
    .await
    .map_err(|e| GuestError::Io(io::Error::other(e.to_string())))??;
    stream.set_nonblocking(true)?;
    control(tokio::net::TcpStream::from_std(stream)?, command).await
}

/// Like [`control_in`], retrying until the guest answers or `patience` runs out: for a guest
/// that is still booting or just moved. Returns the last error when it never answered.
pub async fn control_in_within(
    netns: &str,
    addr: SocketAddr,
    command: &str,
    patience: Duration,
) -> Result<String, GuestError> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match control_in(netns, addr, command).await {
            Ok(reply) => return Ok(reply),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Sends one command line and returns the guest's `ok ...` reply line (trimmed). `verify`
/// walks the whole working set, so it gets 30 s, and `disk-verify` reads the whole disk (tens
/// of MiB through an emulated device), so it gets 120 s; everything else 5 s.
pub async fn control(stream: tokio::net::TcpStream, command: &str) -> Result<String, GuestError> {
    let command = command.trim();
    let timeout = match command {
        "verify" => Duration::from_secs(30),
        "disk-verify" => Duration::from_secs(120),
        _ => Duration::from_secs(5),
    };
    let exchange = async {
        let mut stream = BufReader::new(stream);
        stream
            .get_mut()
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        let mut line = String::new();
        let n = stream.read_line(&mut line).await?;
        Ok::<_, io::Error>((n, line))
    };
    let (n, line) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| GuestError::Timeout {
            command: command.to_string(),
            timeout,
        })??;
    if n == 0 {
        return Err(GuestError::Closed {
            command: command.to_string(),
        });
    }
    let reply = line.trim().to_string();
    if reply == "ok" || reply.starts_with("ok ") {
        Ok(reply)
    } else {
        Err(GuestError::Refused {
            command: command.to_string(),
            reply,
        })
    }
}

/// Runs `status` and parses it.
pub async fn status(stream: tokio::net::TcpStream) -> Result<GuestStatus, GuestError> {
    parse_status(&control(stream, "status").await?)
}

/// Runs `verify` and parses it.
pub async fn verify(stream: tokio::net::TcpStream) -> Result<VerifyReport, GuestError> {
    parse_verify(&control(stream, "verify").await?)
}

/// The guest's counters, from `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// Guest CLOCK_MONOTONIC, ms.
    pub uptime_ms: u64,
    /// Heartbeat lines printed so far.
    pub heartbeat: u64,
    /// Page writes done (`N`).
    pub writes: u64,
    /// Completed rounds over the working set (the initial fill is round 1).
    pub rounds: u64,
    /// Pages in the working set.
    pub pages: u64,
    pub rate_mib_s: u64,
    /// TCP echo connections accepted.
    pub echo_tcp: u64,
    /// UDP datagrams echoed.
    pub echo_udp: u64,
    /// The disk writer's counters; `None` without a (working) disk.
    #[serde(default)]
    pub disk: Option<DiskStatus>,
}

/// Result of the guest checking its whole working set, from `verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub errors: u64,
    /// First page that failed, if any.
    pub first_error: Option<u64>,
}

fn parse_error(reply: &str, reason: impl Into<String>) -> GuestError {
    GuestError::Parse {
        reply: reply.to_string(),
        reason: reason.into(),
    }
}

/// `key=value` pairs after the leading `ok`.
fn fields(reply: &str) -> Result<Vec<(&str, &str)>, GuestError> {
    let mut words = reply.split_whitespace();
    if words.next() != Some("ok") {
        return Err(parse_error(reply, "reply does not start with `ok`"));
    }
    Ok(words.filter_map(|w| w.split_once('=')).collect())
}

fn field_u64(reply: &str, fields: &[(&str, &str)], key: &str) -> Result<u64, GuestError> {
    let value = fields
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| parse_error(reply, format!("missing field `{key}`")))?;
    value
        .parse()
        .map_err(|_| parse_error(reply, format!("field `{key}` is not a number: {value:?}")))
}

/// Parses a `status` reply; unknown extra fields are ignored so the guest can grow.
pub fn parse_status(reply: &str) -> Result<GuestStatus, GuestError> {
    let f = fields(reply)?;
    Ok(GuestStatus {
        uptime_ms: field_u64(reply, &f, "uptime_ms")?,
        heartbeat: field_u64(reply, &f, "heartbeat")?,
        writes: field_u64(reply, &f, "writes")?,
        rounds: field_u64(reply, &f, "rounds")?,
        pages: field_u64(reply, &f, "pages")?,
        rate_mib_s: field_u64(reply, &f, "rate_mib_s")?,
        echo_tcp: field_u64(reply, &f, "echo_tcp")?,
        echo_udp: field_u64(reply, &f, "echo_udp")?,
        disk: disk::parse_disk_status(reply, &f)?,
    })
}

/// Parses a `verify` reply (`first_error=-` means none).
pub fn parse_verify(reply: &str) -> Result<VerifyReport, GuestError> {
    let f = fields(reply)?;
    let first_error = match f.iter().find(|(k, _)| *k == "first_error") {
        Some((_, "-")) => None,
        Some(_) => Some(field_u64(reply, &f, "first_error")?),
        None => return Err(parse_error(reply, "missing field `first_error`")),
    };
    Ok(VerifyReport {
        checked: field_u64(reply, &f, "checked")?,
        errors: field_u64(reply, &f, "errors")?,
        first_error,
    })
}

/// Parses a console line `ferry-hb <counter> <guest_ms>`; `None` for any other line. Tolerates
/// junk before the marker (serial lines may be glued to kernel output).
pub fn parse_heartbeat(line: &str) -> Option<(u64, u64)> {
    let at = line.find("ferry-hb ")?;
    let mut words = line[at..].split_whitespace().skip(1);
    let counter = words.next()?.parse().ok()?;
    let guest_ms = words.next()?.parse().ok()?;
    Some((counter, guest_ms))
}

/// Writes `payload` and reads the same bytes back: proves an established TCP connection to the
/// echo service still carries data (e.g. across a switchover).
pub fn tcp_echo_roundtrip(stream: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back)?;
    if back != payload {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "echo returned different bytes than were sent",
        ));
    }
    Ok(())
}

/// Magic prefix of probe datagrams, so stray datagrams are not counted as replies.
const PROBE_MAGIC: &[u8; 8] = b"ferryudp";

/// What a UDP echo probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EchoReport {
    pub sent: u64,
    /// Distinct sequence numbers answered.
    pub received: u64,
    /// Longest time between two consecutive replies, after the first reply: the outage a
    /// client of the guest would have seen.
    pub longest_gap_ms: f64,
    pub lost: u64,
}

#[derive(Default)]
struct ProbeState {
    replies: HashSet<u64>,
    last_reply: Option<Instant>,
    longest_gap: Duration,
}

/// A UDP echo probe running in background threads: a datagram with a sequence number every
/// interval, replies recorded as they come. Measures the client-visible outage of a migration.
pub struct EchoProbe {
    stop: Arc<AtomicBool>,
    sender: Option<JoinHandle<u64>>,
    receiver: Option<JoinHandle<()>>,
    state: Arc<Mutex<ProbeState>>,
    interval: Duration,
}

impl EchoProbe {
    /// Starts probing `target` from `socket` (already bound, in the right namespace).
    pub fn start(
        socket: UdpSocket,
        target: SocketAddr,
        interval: Duration,
    ) -> io::Result<EchoProbe> {
        let interval = interval.max(Duration::from_millis(1));
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let send_socket = socket.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(ProbeState::default()));

        let stop_tx = Arc::clone(&stop);
        let sender = std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut next = Instant::now();
            while !stop_tx.load(Ordering::Relaxed) {
                let mut msg = [0u8; 16];
                msg[..8].copy_from_slice(PROBE_MAGIC);
                msg[8..].copy_from_slice(&seq.to_be_bytes());
                // A send error (e.g. no route during the switchover) counts as a lost probe.
                let _ = send_socket.send_to(&msg, target);
                seq += 1;
                next += interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            seq
        });

        let stop_rx = Arc::clone(&stop);
        let state_rx = Arc::clone(&state);
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            // Keeps receiving briefly after stop so in-flight replies still count.
            let mut stop_seen: Option<Instant> = None;
            loop {
                if stop_rx.load(Ordering::Relaxed) {
                    let since = *stop_seen.get_or_insert_with(Instant::now);
                    if since.elapsed() > interval.max(Duration::from_millis(100)) {
                        return;
                    }
                }
                let Ok((n, _)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if n != 16 || &buf[..8] != PROBE_MAGIC {
                    continue;
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&buf[8..16]);
                let now = Instant::now();
                let mut st = state_rx.lock().unwrap_or_else(|e| e.into_inner());
                if st.replies.insert(u64::from_be_bytes(seq)) {
                    if let Some(last) = st.last_reply {
                        st.longest_gap = st.longest_gap.max(now - last);
                    }
                    st.last_reply = Some(now);
                }
            }
        });

        Ok(EchoProbe {
            stop,
            sender: Some(sender),
            receiver: Some(receiver),
            state,
            interval,
        })
    }

    /// The probe interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Stops sending, waits briefly for in-flight replies and reports.
    pub fn stop(mut self) -> EchoReport {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.take().and_then(|h| h.join().ok()).unwrap_or(0);
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let received = st.replies.iter().filter(|&&s| s < sent).count() as u64;
        EchoReport {
            sent,
            received,
            longest_gap_ms: st.longest_gap.as_secs_f64() * 1000.0,
            lost: sent.saturating_sub(received),
        }
    }
}

impl Drop for EchoProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parses_and_ignores_extra_fields() {
        let s = parse_status(
            "ok uptime_ms=1234 heartbeat=99 writes=8192 rounds=2 pages=4096 rate_mib_s=8 \
             echo_tcp=1 echo_udp=5 extra=x",
        )
        .unwrap();
        assert_eq!(s.uptime_ms, 1234);
        assert_eq!(s.rounds, 2);
        assert_eq!(s.echo_udp, 5);
        assert!(parse_status("ok uptime_ms=1").is_err());
        assert!(parse_status("err unknown-command: x").is_err());
        assert!(parse_status("ok uptime_ms=x heartbeat=1").is_err());
    }

    #[test]
    fn verify_parses() {
        assert_eq!(
            parse_verify("ok checked=4096 errors=0 first_error=-").unwrap(),
            VerifyReport {
                checked: 4096,
                errors: 0,
                first_error: None
            }
        );
        assert_eq!(
            parse_verify("ok checked=4096 errors=2 first_error=5")
                .unwrap()
                .first_error,
            Some(5)
        );
        assert!(parse_verify("ok checked=1 errors=0").is_err());
    }

    #[test]
    fn heartbeat_lines() {
        assert_eq!(parse_heartbeat("ferry-hb 12 3456"), Some((12, 3456)));
        assert_eq!(parse_heartbeat("junk\rferry-hb 1 2\r"), Some((1, 2)));
        assert_eq!(parse_heartbeat("ferry-guest ready ip=none"), None);
        assert_eq!(parse_heartbeat("ferry-hb x 2"), None);
        assert_eq!(parse_heartbeat("ferry-hb 1"), None);
    }

    #[test]
    fn echo_probe_against_local_echo() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let done2 = Arc::clone(&done);
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !done2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                }
            }
        });
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let probe = EchoProbe::start(client, target, Duration::from_millis(5)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let report = probe.stop();
        done.store(true, Ordering::Relaxed);
        echo.join().unwrap();
        assert!(report.sent >= 10, "{report:?}");
        assert_eq!(report.lost, 0, "{report:?}");
        assert_eq!(report.received, report.sent);
        assert!(report.longest_gap_ms > 0.0);
    }

    #[test]
    fn tcp_roundtrip_against_local_echo() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => s.write_all(&buf[..n]).unwrap(),
                }
            }
        });
        let mut stream = TcpStream::connect(addr).unwrap();
        tcp_echo_roundtrip(&mut stream, b"hello ferry").unwrap();
        drop(stream);
        echo.join().unwrap();
    }

    #[tokio::test]
    async fn control_roundtrip_and_refusal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (s, _) = listener.accept().await.unwrap();
                let mut s = BufReader::new(s);
                let mut line = String::new();
                s.read_line(&mut line).await.unwrap();
                let reply = if line.trim() == "verify" {
                    "ok checked=3 errors=0 first_error=-\n".to_string()
                } else {
                    format!("err unknown-command: {}\n", line.trim())
                };
                s.get_mut().write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let r = verify(tokio::net::TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        assert_eq!(r.checked, 3);
        let e = control(tokio::net::TcpStream::connect(addr).await.unwrap(), "nope")
            .await
            .unwrap_err();
        assert!(matches!(e, GuestError::Refused { .. }), "{e}");
        server.await.unwrap();
    }
}
