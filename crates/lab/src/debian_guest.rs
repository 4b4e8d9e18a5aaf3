//! Driving the Debian guest from the host through its guest agent: files with known content,
//! a disk writer whose log proves the guest went on writing across a migration, and a
//! read-only fsck of its root filesystem once it is shut down.
//!
//! The Debian guest runs nothing of Ferry's: everything here uses only what any Debian has
//! (`sh`, `date`, `sync`, `sha256sum`), through qemu-guest-agent's `guest-exec`, so the
//! checks hold for a guest OS Ferry did not build.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_qmp::GuestAgent;
use serde::Serialize;

use crate::debian_image::DiskLayout;

/// Where the writer appends its lines inside the guest.
pub const WRITER_LOG: &str = "/var/tmp/ferry-writes.log";
/// Pause between two writes (each a line and a `sync`).
const WRITER_PAUSE_S: &str = "0.02";
/// Longest a guest command may take (TCG on a busy host is slow).
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// A failure talking to the guest or checking its disk, with what was seen.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DebianGuestError(pub String);

fn err(msg: impl Into<String>) -> DebianGuestError {
    DebianGuestError(msg.into())
}

/// Runs `script` with `/bin/sh -c` in the guest; its stdout, or an error with its stderr.
pub async fn sh(ga: &GuestAgent, script: &str) -> Result<String, DebianGuestError> {
    let out = ga
        .run("/bin/sh", &["-c", script], EXEC_TIMEOUT)
        .await
        .map_err(|e| err(format!("guest-exec `{script}`: {e}")))?;
    if !out.success() {
        return Err(err(format!(
            "`{script}` in the guest failed ({:?}): {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `bytes` random bytes to `path` in the guest, durably; returns their SHA-256.
pub async fn write_random_file(
    ga: &GuestAgent,
    path: &str,
    bytes: u64,
) -> Result<String, DebianGuestError> {
    sh(
        ga,
        &format!("head -c {bytes} /dev/urandom > {path} && sync && sha256sum {path}"),
    )
    .await
    .map(|o| first_word(&o))
}

/// SHA-256 of `path` in the guest, read back from the disk (the page cache dropped first).
pub async fn file_sha256(ga: &GuestAgent, path: &str) -> Result<String, DebianGuestError> {
    sh(
        ga,
        &format!("sync && echo 3 > /proc/sys/vm/drop_caches && sha256sum {path}"),
    )
    .await
    .map(|o| first_word(&o))
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_string()
}

/// Starts the disk writer in the background: every 20 ms it appends `SEQ SECONDS.NANOS`
/// (the guest's clock) to [`WRITER_LOG`] and syncs. Right after reading the clock it prints
/// `ferry-hb SEQ 0` on the serial console, the heartbeat line the lab's serial reader times
/// ([`crate::serial::SerialMonitor`]), so the host's clock times the instants the guest's clock
/// stamps: the guest's clock stops while QEMU pauses the guest, so only the host's clock sees
/// a migration's pause in the gaps between writes. The console is opened per line because
/// agetty may hang the port up, which would break a descriptor held open; an error writing it
/// is ignored (the log is what must not miss a line).
pub async fn start_writer(ga: &GuestAgent) -> Result<(), DebianGuestError> {
    sh(ga, &writer_script()).await.map(|_| ())
}

fn writer_script() -> String {
    format!(
        "rm -f {WRITER_LOG}; nohup sh -c 'i=0; while :; do i=$((i+1)); t=$(date +%s.%N); \
         echo \"ferry-hb $i 0\" > /dev/ttyS0; \
         echo \"$i $t\" >> {WRITER_LOG}; sync; sleep {WRITER_PAUSE_S}; done' \
         >/dev/null 2>&1 &"
    )
}

/// The writer's log as the guest has it now.
pub async fn read_writer(ga: &GuestAgent) -> Result<WriterLog, DebianGuestError> {
    WriterLog::parse(&sh(ga, &format!("cat {WRITER_LOG}")).await?)
}

/// What the disk writer's log says: how many writes, whether any went missing, and the
/// longest time between two writes by the guest's clock. That clock stops while QEMU pauses
/// the guest (measured: it falls behind the host's by about the pause at each migration), so
/// the gap is what the guest itself lived through, without the pause; the console heartbeats
/// give the host's view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WriterLog {
    pub writes: u64,
    /// Sequence numbers that should be there and are not, as (after, next) pairs; a pair
    /// whose next is not above its after is a write repeated or replayed.
    pub holes: Vec<(u64, u64)>,
    pub longest_gap_ms: f64,
    /// Sequence number after which the longest gap came.
    pub longest_gap_after: u64,
    /// The median time between two writes: what one turn of the loop (a line, a sync, 20 ms
    /// of sleep) costs this guest when nothing else happens, to read the longest gap against.
    pub median_gap_ms: f64,
}

impl WriterLog {
    /// Parses `SEQ SECONDS.NANOS` lines; a last line cut short by a write in progress is
    /// ignored.
    pub fn parse(text: &str) -> Result<WriterLog, DebianGuestError> {
        let mut entries = Vec::new();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let mut parts = line.split_whitespace();
            let parsed = (|| {
                let seq: u64 = parts.next()?.parse().ok()?;
                let t: f64 = parts.next()?.parse().ok()?;
                Some((seq, t))
            })();
            match parsed {
                Some(e) => entries.push(e),
                None if i + 1 == lines.len() => {}
                None => return Err(err(format!("writer log line {}: '{line}'", i + 1))),
            }
        }
        let mut log = WriterLog {
            writes: entries.len() as u64,
            holes: Vec::new(),
            longest_gap_ms: 0.0,
            longest_gap_after: 0,
            median_gap_ms: 0.0,
        };
        let mut gaps = Vec::new();
        for w in entries.windows(2) {
            let ((a, ta), (b, tb)) = (w[0], w[1]);
            if b != a + 1 {
                log.holes.push((a, b));
            }
            let gap = (tb - ta) * 1000.0;
            gaps.push(gap);
            if gap > log.longest_gap_ms {
                log.longest_gap_ms = gap;
                log.longest_gap_after = a;
            }
        }
        gaps.sort_by(f64::total_cmp);
        log.median_gap_ms = gaps.get(gaps.len() / 2).copied().unwrap_or_default();
        Ok(log)
    }

    /// Writes missing between the first and the last line (a repeated line loses none).
    pub fn lost(&self) -> u64 {
        self.holes
            .iter()
            .map(|&(a, b)| b.saturating_sub(a).saturating_sub(1))
            .sum()
    }
}

/// Checks the root filesystem of a (shut down) Debian disk image read-only with
/// `e2fsck -fn`: the root partition is extracted with `qemu-img dd` into `scratch`, which is
/// removed afterwards. Returns e2fsck's output; an unclean filesystem is an error.
pub fn fsck_root(
    image: &Path,
    format: &str,
    layout: &DiskLayout,
    scratch: &Path,
) -> Result<String, DebianGuestError> {
    let part = scratch.join("root-partition.raw");
    let _ = std::fs::remove_file(&part);
    const MIB: u64 = 1 << 20;
    let (bs, skip, count) = if layout.root.offset_bytes().is_multiple_of(MIB)
        && layout.root.size_bytes().is_multiple_of(MIB)
    {
        (
            MIB,
            layout.root.offset_bytes() / MIB,
            layout.root.size_bytes() / MIB,
        )
    } else {
        (512, layout.root.start_lba, layout.root.sectors)
    };
    let dd = Command::new("qemu-img")
        .args(["dd", "-f", format, "-O", "raw"])
        .arg(format!("bs={bs}"))
        .arg(format!("skip={skip}"))
        .arg(format!("count={count}"))
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", part.display()))
        .output()
        .map_err(|e| err(format!("qemu-img dd: {e}")))?;
    if !dd.status.success() {
        let _ = std::fs::remove_file(&part);
        return Err(err(format!(
            "qemu-img dd of the root partition: {}",
            String::from_utf8_lossy(&dd.stderr).trim()
        )));
    }
    let fsck = Command::new("e2fsck").arg("-fn").arg(&part).output();
    let _ = std::fs::remove_file(&part);
    let fsck = fsck.map_err(|e| err(format!("e2fsck: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    if fsck.status.success() {
        Ok(text)
    } else {
        Err(err(format!(
            "e2fsck -fn found problems ({}): {text}",
            fsck.status
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tells_holes_and_the_longest_gap() {
        let log = WriterLog::parse("1 100.000\n2 100.020\n3 100.540\n5 100.560\n6 100.5").unwrap();
        assert_eq!(log.writes, 5);
        assert_eq!(log.holes, vec![(3, 5)]);
        assert!((log.longest_gap_ms - 520.0).abs() < 0.01, "{log:?}");
        assert_eq!(log.longest_gap_after, 2);
        let cut = WriterLog::parse("1 100.000\n2 100.020\n3 10").unwrap();
        assert_eq!(cut.writes, 3, "a short last line still parses as a number");
        let torn = WriterLog::parse("1 100.000\n2 100.020\n3").unwrap();
        assert_eq!(torn.writes, 2, "a last line cut short is ignored");
        assert!(WriterLog::parse("1 100.0\nx y\n3 100.1\n").is_err());
    }

    #[test]
    fn lost_writes_and_the_median_gap() {
        // 3 lost, 6 and 7 lost, 5 written twice; gaps 20, 40, 20, 0, 60 ms.
        let log = WriterLog::parse("1 1.00\n2 1.02\n4 1.06\n5 1.08\n5 1.08\n8 1.14\n").unwrap();
        assert_eq!(log.holes, vec![(2, 4), (5, 5), (5, 8)]);
        assert_eq!(
            log.lost(),
            3,
            "the repeated 5 loses nothing and does not underflow"
        );
        assert!((log.median_gap_ms - 20.0).abs() < 1e-6, "{log:?}");
        assert!((log.longest_gap_ms - 60.0).abs() < 1e-6, "{log:?}");
        assert_eq!(log.longest_gap_after, 5);
        let empty = WriterLog::parse("").unwrap();
        assert_eq!(
            (empty.writes, empty.lost(), empty.median_gap_ms),
            (0, 0, 0.0)
        );
    }

    #[test]
    fn the_writer_prints_heartbeats_the_serial_reader_parses() {
        let s = writer_script();
        assert!(
            s.contains("t=$(date +%s.%N); echo \"ferry-hb $i 0\" > /dev/ttyS0; echo \"$i $t\""),
            "the heartbeat follows the clock reading at once: {s}"
        );
        assert!(s.contains(&format!(">> {WRITER_LOG}; sync;")), "{s}");
        assert_eq!(
            crate::guest_client::parse_heartbeat("ferry-hb 12 0\r"),
            Some((12, 0))
        );
    }
}
