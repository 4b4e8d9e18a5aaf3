//! The disk writer thread and the `disk-*` control commands.
//!
//! The writer holds the disk's lock for one write at a time, so `disk-verify` and `disk-pause`
//! get in between writes, and counters are mirrored in atomics so `status` answers even while
//! a write hangs on a stopped device.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::MAX_DISK_RATE;
use crate::disk::{Disk, DiskReport};
use crate::log;

/// Writer tick: blocks are written in batches this far apart.
const TICK: Duration = Duration::from_millis(10);
/// At most this much missed time is caught up (e.g. after a verify held the disk).
const MAX_BACKLOG_SECS: f64 = 0.1;
/// Pause before retrying a failed write, so a dead device is not hammered.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// A running disk writer and its counters.
pub struct DiskService {
    /// Device name (`vdb`) or path.
    pub label: String,
    pub blocks: u64,
    pub mode: &'static str,
    disk: Mutex<Disk>,
    writes: AtomicU64,
    failures: AtomicU64,
    in_doubt: AtomicBool,
    last_errno: AtomicI32,
    pub rate: AtomicU32,
    paused: AtomicBool,
}

/// The disk as configured: none, one that could not be set up, or a running writer.
pub enum DiskSlot {
    Off,
    Failed(String),
    On(Arc<DiskService>),
}

impl DiskService {
    pub fn new(disk: Disk, label: String, rate: u32) -> Self {
        DiskService {
            label,
            blocks: disk.blocks(),
            mode: disk.mode(),
            writes: AtomicU64::new(disk.writes()),
            failures: AtomicU64::new(0),
            in_doubt: AtomicBool::new(false),
            last_errno: AtomicI32::new(0),
            rate: AtomicU32::new(rate),
            paused: AtomicBool::new(false),
            disk: Mutex::new(disk),
        }
    }

    /// The disk, even if a thread panicked while holding it (blocks are checked anyway).
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One write (or retry); mirrors the counters. Returns whether it succeeded.
    fn write_one(&self) -> bool {
        let mut disk = self.disk();
        let retry = disk.attempt().is_some();
        let result = disk.write_next();
        self.writes.store(disk.writes(), Ordering::Relaxed);
        self.failures.store(disk.failures(), Ordering::Relaxed);
        self.in_doubt
            .store(disk.attempt().is_some(), Ordering::Relaxed);
        match result {
            Ok(()) => {
                if retry {
                    log(&format!(
                        "disk {}: write {} succeeded on retry after {} failures in all",
                        self.label,
                        disk.writes() - 1,
                        disk.failures()
                    ));
                }
                true
            }
            Err(e) => {
                let n = disk.failures();
                self.last_errno
                    .store(e.raw_os_error().unwrap_or(-1), Ordering::Relaxed);
                // 1, 10, 100, ...: visible without flooding the console.
                let digits = n.to_string();
                if digits.starts_with('1') && digits[1..].bytes().all(|b| b == b'0') {
                    log(&format!(
                        "warning: disk {} write {} failed ({n} failures so far): {e}",
                        self.label,
                        disk.writes()
                    ));
                }
                false
            }
        }
    }

    /// `disk-verify`: checks every block; the writer waits meanwhile.
    pub fn verify(&self) -> DiskReport {
        self.disk().verify()
    }

    /// Stops the writer and returns once no write is in flight, so the host may inspect or
    /// damage the disk knowing the guest will not touch it.
    pub fn pause(&self) -> u64 {
        self.paused.store(true, Ordering::Relaxed);
        self.disk().writes()
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    /// `status` fields.
    pub fn status_fields(&self) -> String {
        let writes = self.writes.load(Ordering::Relaxed);
        format!(
            "disk={} disk_mode={} disk_blocks={} disk_writes={writes} disk_rounds={} \
             disk_rate={} disk_paused={} disk_failures={} disk_in_doubt={} disk_errno={}",
            self.label,
            self.mode,
            self.blocks,
            writes / self.blocks.max(1),
            self.rate.load(Ordering::Relaxed),
            u8::from(self.paused.load(Ordering::Relaxed)),
            self.failures.load(Ordering::Relaxed),
            u8::from(self.in_doubt.load(Ordering::Relaxed)),
            self.last_errno.load(Ordering::Relaxed),
        )
    }
}

/// Writes blocks round-robin at the current rate; rate 0 writes every block once as fast as
/// the disk goes, then idles. A failed write is retried (same block, same generation) after
/// [`RETRY_AFTER`].
pub fn spawn_writer(svc: Arc<DiskService>) {
    thread::spawn(move || {
        let mut last = Instant::now();
        let mut credit = 0.0f64;
        loop {
            thread::sleep(TICK);
            let now = Instant::now();
            let elapsed = now.duration_since(last).as_secs_f64();
            last = now;
            if svc.paused.load(Ordering::Relaxed) {
                credit = 0.0;
                continue;
            }
            let rate = svc.rate.load(Ordering::Relaxed);
            let batch = if rate > 0 {
                let per_s = f64::from(rate);
                credit = (credit + elapsed * per_s).min(per_s * MAX_BACKLOG_SECS + 1.0);
                credit.floor()
            } else {
                credit = 0.0;
                svc.blocks
                    .saturating_sub(svc.writes.load(Ordering::Relaxed)) as f64
            };
            let mut done = 0.0;
            // Between writes: stop at once on pause, start over on a new rate.
            while done < batch
                && !svc.paused.load(Ordering::Relaxed)
                && svc.rate.load(Ordering::Relaxed) == rate
            {
                if !svc.write_one() {
                    thread::sleep(RETRY_AFTER);
                    break;
                }
                done += 1.0;
            }
            credit -= done;
        }
    });
}

/// `disk-verify` reply: `ok checked=B errors=E writes=N unknown=U first_bad=L`, where `U` is
/// `-` or `INDEX:OLD:NEW:old|new|neither` (the write in doubt and what it found) and `L` is `-`
/// or comma-separated `INDEX:KIND:EXPECTED:FOUND_GEN:FOUND_INDEX` (`-` where unknown).
pub fn verify_reply(r: &DiskReport) -> String {
    let unknown = r.unknown.map_or_else(
        || "-".to_string(),
        |u| {
            let landed = match u.landed {
                Some(true) => "new",
                Some(false) => "old",
                None => "neither",
            };
            let a = u.attempt;
            format!("{}:{}:{}:{landed}", a.index, a.generation - 1, a.generation)
        },
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let mut list = String::new();
    for b in &r.first_bad {
        if !list.is_empty() {
            list.push(',');
        }
        let _ = write!(
            list,
            "{}:{}:{}:{}:{}",
            b.index,
            b.bad.word(),
            b.expected,
            opt(b.found_generation),
            opt(b.found_index)
        );
    }
    if list.is_empty() {
        list.push('-');
    }
    format!(
        "ok checked={} errors={} writes={} unknown={unknown} first_bad={list}",
        r.checked, r.errors, r.writes
    )
}

/// Answers the `disk-*` commands; `None` for any other command.
pub fn handle_command(slot: &DiskSlot, cmd: &str, arg: Option<&str>) -> Option<String> {
    if !cmd.starts_with("disk-") {
        return None;
    }
    let svc = match slot {
        DiskSlot::On(svc) => svc,
        DiskSlot::Off => return Some("err no-disk: no ferry.disk= given".into()),
        DiskSlot::Failed(why) => return Some(format!("err no-disk: {why}")),
    };
    Some(match (cmd, arg) {
        ("disk-verify", None) => verify_reply(&svc.verify()),
        ("disk-pause", None) => format!("ok writes={}", svc.pause()),
        ("disk-resume", None) => {
            svc.resume();
            "ok".into()
        }
        ("disk-rate", Some(value)) => match value.parse::<u32>() {
            Ok(rate) if rate <= MAX_DISK_RATE => {
                svc.rate.store(rate, Ordering::Relaxed);
                "ok".into()
            }
            _ => format!("err bad-rate: {value} (0..={MAX_DISK_RATE} blocks/s)"),
        },
        ("disk-stale", Some(value)) => match value.parse::<u64>() {
            Ok(index) => match svc.disk().make_stale(index) {
                Ok(g) => format!("ok generation={g}"),
                Err(e) => format!("err bad-block: {e}"),
            },
            Err(_) => format!("err bad-block: {value}"),
        },
        _ => return None,
    })
}

/// `status` fields of the disk: `disk=-` without one, `disk=error` if it failed to start.
pub fn status_fields(slot: &DiskSlot) -> String {
    match slot {
        DiskSlot::Off => "disk=-".into(),
        DiskSlot::Failed(_) => "disk=error".into(),
        DiskSlot::On(svc) => svc.status_fields(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::tests::{mem_disk, Fault};
    use crate::pattern::Fill;

    /// One command line, as the control service splits it.
    fn cmd(slot: &DiskSlot, line: &str) -> Option<String> {
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or("");
        handle_command(slot, name, words.next())
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn commands_without_a_disk() {
        assert_eq!(handle_command(&DiskSlot::Off, "status", None), None);
        let r = handle_command(&DiskSlot::Off, "disk-verify", None).unwrap();
        assert!(r.starts_with("err no-disk"), "{r}");
        let failed = DiskSlot::Failed("no disk with serial \"x\"".into());
        assert!(cmd(&failed, "disk-pause").unwrap().contains("serial"));
        assert_eq!(status_fields(&DiskSlot::Off), "disk=-");
        assert_eq!(status_fields(&failed), "disk=error");
    }

    #[test]
    fn writer_fills_once_at_rate_zero_pauses_and_survives_failures() {
        let (disk, h) = mem_disk(50, Fill::Pattern);
        let svc = Arc::new(DiskService::new(disk, "mem0".into(), 0));
        let slot = DiskSlot::On(Arc::clone(&svc));
        spawn_writer(Arc::clone(&svc));
        wait_for("first pass", || svc.writes.load(Ordering::Relaxed) == 50);
        thread::sleep(Duration::from_millis(50));
        assert_eq!(svc.writes.load(Ordering::Relaxed), 50, "rate 0 writes once");
        let status = status_fields(&slot);
        assert!(
            status.starts_with(
                "disk=mem0 disk_mode=mem disk_blocks=50 disk_writes=50 disk_rounds=1 \
                 disk_rate=0 disk_paused=0 disk_failures=0"
            ),
            "{status}"
        );
        assert_eq!(
            cmd(&slot, "disk-verify").unwrap(),
            "ok checked=50 errors=0 writes=50 unknown=- first_bad=-"
        );

        // Failing device: counted, not advanced, retried; the block in doubt is accepted.
        *h.fault.lock().unwrap() = Fault::FailBefore;
        assert_eq!(cmd(&slot, "disk-rate 1000").unwrap(), "ok");
        wait_for("failures", || svc.failures.load(Ordering::Relaxed) >= 2);
        assert_eq!(svc.writes.load(Ordering::Relaxed), 50);
        assert!(status_fields(&slot).contains("disk_in_doubt=1 disk_errno=5"));
        let reply = cmd(&slot, "disk-verify").unwrap();
        assert_eq!(
            reply,
            "ok checked=50 errors=0 writes=50 unknown=0:1:2:old first_bad=-"
        );
        *h.fault.lock().unwrap() = Fault::None;
        wait_for("recovery", || svc.writes.load(Ordering::Relaxed) > 55);

        let paused = cmd(&slot, "disk-pause").unwrap();
        let n: u64 = paused.strip_prefix("ok writes=").unwrap().parse().unwrap();
        thread::sleep(Duration::from_millis(50));
        assert_eq!(svc.writes.load(Ordering::Relaxed), n, "paused writer wrote");
        assert!(status_fields(&slot).contains("disk_paused=1"));
        let current = crate::pattern::expected_generation(n, 50, 0);
        assert_eq!(
            cmd(&slot, "disk-stale 0").unwrap(),
            format!("ok generation={}", current - 1)
        );
        let reply = cmd(&slot, "disk-verify").unwrap();
        assert_eq!(
            reply,
            format!(
                "ok checked=50 errors=1 writes={n} unknown=- first_bad=0:stale:{current}:{}:0",
                current - 1
            )
        );
        assert!(cmd(&slot, "disk-stale 50")
            .unwrap()
            .starts_with("err bad-block"));
        assert!(cmd(&slot, "disk-rate -1")
            .unwrap()
            .starts_with("err bad-rate"));
        assert_eq!(cmd(&slot, "disk-resume").unwrap(), "ok");
        wait_for("resumed writes", || svc.writes.load(Ordering::Relaxed) > n);
        assert_eq!(cmd(&slot, "disk-bogus"), None);
    }
}
