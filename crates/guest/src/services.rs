//! The guest's long-running activities, one thread each: heartbeat, memory writer, TCP and UDP
//! echo, and the status/control service (the disk writer is in disk_service.rs).
//!
//! A migration test watches all of them from outside: the heartbeat shows the guest's clock kept
//! running, the echo services show connections survived, and `verify` (`disk-verify`) shows
//! memory (the disk) arrived intact.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::MAX_RATE_MIB_S;
use crate::disk_service::{self, DiskSlot};
use crate::pages::{Memory, PAGE_SIZE};
use crate::{log, sys};

/// Writer tick: pages are written in batches this far apart.
const WRITER_TICK: Duration = Duration::from_millis(10);
/// The writer never catches up more than this much missed time (e.g. after `verify` paused
/// it), so the rate stays smooth instead of bursting.
const MAX_BACKLOG_SECS: f64 = 0.1;

/// State shared by all services.
pub struct Shared {
    pub memory: Mutex<Memory>,
    /// Mirror of the memory's write counter, so `status` never waits for a running `verify`.
    pub writes: AtomicU64,
    pub pages: u64,
    pub rate_mib_s: AtomicU32,
    pub heartbeat: AtomicU64,
    /// TCP echo connections accepted.
    pub echo_tcp: AtomicU64,
    /// UDP datagrams echoed.
    pub echo_udp: AtomicU64,
    pub disk: DiskSlot,
}

impl Shared {
    pub fn new(memory: Memory, rate_mib_s: u32, disk: DiskSlot) -> Self {
        Shared {
            writes: AtomicU64::new(memory.writes()),
            pages: memory.page_count(),
            memory: Mutex::new(memory),
            rate_mib_s: AtomicU32::new(rate_mib_s),
            heartbeat: AtomicU64::new(0),
            echo_tcp: AtomicU64::new(0),
            echo_udp: AtomicU64::new(0),
            disk,
        }
    }

    /// The memory, even if a thread panicked while holding it (pages are checked anyway).
    pub fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Prints `ferry-hb <counter> <guest_ms>` every `interval`, counter from 1.
pub fn spawn_heartbeat(shared: Arc<Shared>, interval: Duration) {
    thread::spawn(move || {
        let mut next = Instant::now();
        loop {
            let n = shared.heartbeat.fetch_add(1, Ordering::Relaxed) + 1;
            crate::console_line(&format!("ferry-hb {n} {}", sys::monotonic_ms()));
            next += interval;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    });
}

/// Rewrites pages round-robin in batches every `WRITER_TICK` at the current rate
/// (0 = idle).
pub fn spawn_writer(shared: Arc<Shared>) {
    thread::spawn(move || {
        let mut last = Instant::now();
        let mut credit = 0.0f64;
        loop {
            thread::sleep(WRITER_TICK);
            let now = Instant::now();
            let elapsed = now.duration_since(last).as_secs_f64();
            last = now;
            let rate = shared.rate_mib_s.load(Ordering::Relaxed) as f64;
            let pages_per_s = rate * (1024.0 * 1024.0 / PAGE_SIZE as f64);
            if pages_per_s <= 0.0 {
                credit = 0.0;
                continue;
            }
            credit = (credit + elapsed * pages_per_s).min(pages_per_s * MAX_BACKLOG_SECS + 1.0);
            let batch = credit.floor();
            if batch < 1.0 {
                continue;
            }
            credit -= batch;
            let mut mem = shared.memory();
            mem.write_batch(batch as u64);
            shared.writes.store(mem.writes(), Ordering::Relaxed);
        }
    });
}

fn echo_connection(mut stream: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// TCP echo: every byte back, one thread per connection.
pub fn spawn_tcp_echo(shared: Arc<Shared>, listener: TcpListener) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    shared.echo_tcp.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.set_nodelay(true);
                    thread::spawn(move || echo_connection(stream));
                }
                Err(e) => {
                    log(&format!("warning: tcp echo accept: {e}"));
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    });
}

/// UDP echo: each datagram back to its sender.
pub fn spawn_udp_echo(shared: Arc<Shared>, socket: UdpSocket) {
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    if socket.send_to(&buf[..n], peer).is_ok() {
                        shared.echo_udp.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    log(&format!("warning: udp echo: {e}"));
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    });
}

/// Answers one control command with one line (without the newline).
pub fn handle_command(shared: &Shared, line: &str) -> String {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or("");
    let arg = words.next();
    if words.next().is_none() {
        if let Some(reply) = disk_service::handle_command(&shared.disk, cmd, arg) {
            return reply;
        }
    }
    match (cmd, arg) {
        ("status", None) => {
            let writes = shared.writes.load(Ordering::Relaxed);
            format!(
                "ok uptime_ms={} heartbeat={} writes={} rounds={} pages={} rate_mib_s={} \
                 echo_tcp={} echo_udp={} {}",
                sys::monotonic_ms(),
                shared.heartbeat.load(Ordering::Relaxed),
                writes,
                writes / shared.pages.max(1),
                shared.pages,
                shared.rate_mib_s.load(Ordering::Relaxed),
                shared.echo_tcp.load(Ordering::Relaxed),
                shared.echo_udp.load(Ordering::Relaxed),
                disk_service::status_fields(&shared.disk),
            )
        }
        ("verify", None) => {
            // Holding the lock pauses the writer for the duration of the check.
            let outcome = shared.memory().verify();
            let first = outcome
                .first_error
                .map_or_else(|| "-".to_string(), |p| p.to_string());
            format!(
                "ok checked={} errors={} first_error={first}",
                outcome.checked, outcome.errors
            )
        }
        ("rate", Some(value)) => match value.parse::<u32>() {
            Ok(rate) if rate <= MAX_RATE_MIB_S => {
                shared.rate_mib_s.store(rate, Ordering::Relaxed);
                "ok".to_string()
            }
            _ => format!("err bad-rate: {value} (0..={MAX_RATE_MIB_S} MiB/s)"),
        },
        ("stale", Some(value)) => match value.parse::<u64>() {
            Ok(page) => match shared.memory().make_stale(page) {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("err bad-page: {e}"),
            },
            Err(_) => format!("err bad-page: {value}"),
        },
        _ => format!("err unknown-command: {}", line.trim()),
    }
}

fn control_connection(shared: Arc<Shared>, stream: TcpStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut writer = stream;
    let reader = BufReader::new(read_half);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        let mut reply = handle_command(&shared, &line);
        reply.push('\n');
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// Status/control service: line protocol, one reply line per command.
pub fn spawn_control(shared: Arc<Shared>, listener: TcpListener) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let shared = Arc::clone(&shared);
                    thread::spawn(move || control_connection(shared, stream));
                }
                Err(e) => {
                    log(&format!("warning: control accept: {e}"));
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::Fill;

    fn shared() -> Shared {
        let mut m = Memory::new(16, Fill::Pattern);
        m.fill_first_round();
        Shared::new(m, 8, DiskSlot::Off)
    }

    #[test]
    fn commands() {
        let s = shared();
        let status = handle_command(&s, "status");
        assert!(status.starts_with("ok uptime_ms="), "{status}");
        assert!(status.contains(" writes=16 rounds=1 pages=16 rate_mib_s=8 "));
        assert!(status.ends_with(" disk=-"), "{status}");
        assert!(handle_command(&s, "disk-verify").starts_with("err no-disk"));
        assert_eq!(
            handle_command(&s, "verify"),
            "ok checked=16 errors=0 first_error=-"
        );
        assert_eq!(handle_command(&s, "rate 100"), "ok");
        assert_eq!(s.rate_mib_s.load(Ordering::Relaxed), 100);
        assert!(handle_command(&s, "rate 5000").starts_with("err "));
        assert!(handle_command(&s, "rate x").starts_with("err "));
        assert_eq!(handle_command(&s, "stale 5"), "ok");
        assert_eq!(
            handle_command(&s, "verify"),
            "ok checked=16 errors=1 first_error=5"
        );
        assert!(handle_command(&s, "stale 99").starts_with("err bad-page"));
        assert_eq!(
            handle_command(&s, "reboot now"),
            "err unknown-command: reboot now"
        );
        assert_eq!(handle_command(&s, ""), "err unknown-command: ");
    }
}
