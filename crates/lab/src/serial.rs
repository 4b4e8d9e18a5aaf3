//! Reads a guest's serial port live, timestamping each heartbeat as it arrives on the host.
//!
//! The guest's own clock cannot measure a migration pause (its clock stops while paused), so
//! gaps are measured by the host's clock between heartbeat lines received from the source's
//! serial port and then the destination's.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::guest_client::parse_heartbeat;

/// One heartbeat as seen by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    pub at: Instant,
    pub counter: u64,
}

#[derive(Debug, Default)]
struct SerialLog {
    beats: Vec<Beat>,
    /// Non-heartbeat lines, for "ready" markers and diagnostics.
    lines: Vec<String>,
}

/// A live reader of one QEMU serial socket. Dropping it stops the reader.
#[derive(Debug)]
pub struct SerialMonitor {
    log: Arc<Mutex<SerialLog>>,
    task: JoinHandle<()>,
}

impl SerialMonitor {
    /// Connects to QEMU's serial socket (retrying while QEMU creates it).
    pub async fn connect(path: &Path, timeout: Duration) -> std::io::Result<SerialMonitor> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let log = Arc::new(Mutex::new(SerialLog::default()));
        let writer = log.clone();
        let task = tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let now = Instant::now();
                let mut log = writer.lock().expect("serial log lock");
                match parse_heartbeat(&line) {
                    Some((counter, _guest_ms)) => log.beats.push(Beat { at: now, counter }),
                    None => {
                        if log.lines.len() < 10_000 {
                            log.lines.push(line)
                        }
                    }
                }
            }
        });
        Ok(SerialMonitor { log, task })
    }

    pub fn beats(&self) -> Vec<Beat> {
        self.log.lock().expect("serial log lock").beats.clone()
    }

    pub fn last_beat(&self) -> Option<Beat> {
        self.log
            .lock()
            .expect("serial log lock")
            .beats
            .last()
            .copied()
    }

    /// Whether the port was read to its end (QEMU quit or closed the socket): a watcher that
    /// follows a host across QEMU restarts then connects again.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The non-heartbeat lines so far (boot messages, the ready line, warnings).
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().expect("serial log lock").lines.clone()
    }

    /// Waits until a line containing `marker` has been printed; returns that line.
    pub async fn wait_for_line(&self, marker: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(marker)) {
                return Some(l);
            }
            if Instant::now() >= deadline || self.task.is_finished() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the heartbeat counter passes `counter`: proof that the guest runs.
    pub async fn wait_beat_after(&self, counter: u64, timeout: Duration) -> Option<Beat> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(b) = self.last_beat().filter(|b| b.counter > counter) {
                return Some(b);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    /// Every beat the port delivered, read to its end: call it after the QEMU process exited
    /// (its socket then closes), so lines still in the socket are not lost. Waits at most
    /// `timeout` for the end; a reader still going after that is stopped.
    pub async fn finish(mut self, timeout: Duration) -> Vec<Beat> {
        if tokio::time::timeout(timeout, &mut self.task).await.is_err() {
            self.task.abort();
        }
        self.beats()
    }
}

impl Drop for SerialMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The beats one host's serial port delivered, in the order it delivered them. A guest's story
/// across migrations is one of these per host it ran on, oldest first: the order within a
/// port is the guest's own, while arrival times across two ports can interleave when one
/// reader is slower than the other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostBeats {
    pub host: String,
    pub beats: Vec<Beat>,
    /// When that host's QEMU had exited, if it has.
    pub exited_at: Option<Instant>,
}

impl HostBeats {
    pub fn new(host: impl Into<String>, beats: Vec<Beat>) -> HostBeats {
        HostBeats {
            host: host.into(),
            beats,
            exited_at: None,
        }
    }

    /// The beats of a host whose QEMU exited at `at`.
    pub fn exited(host: impl Into<String>, beats: Vec<Beat>, at: Instant) -> HostBeats {
        HostBeats {
            exited_at: Some(at),
            ..HostBeats::new(host, beats)
        }
    }

    /// Beats that reached the reader more than `after` past the QEMU's exit: what a reader
    /// stopped after a fixed wait would have lost.
    pub fn late(&self, after: Duration) -> usize {
        self.exited_at.map_or(0, |exit| {
            self.beats.iter().filter(|b| b.at > exit + after).count()
        })
    }
}

/// The heartbeat story across a migration: the longest silence, and whether the counter went
/// on where it stopped (the same guest, not a reboot, not stale memory).
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatGap {
    pub longest_gap: Duration,
    /// True when every counter is one or two more than the one before, host after host: the
    /// guest went on counting. (One beat may be lost when switchover cuts a line in two.)
    pub continuous: bool,
    pub beats: usize,
    /// Beats of one host that reached the host's reader after the next host's first beat:
    /// what a merge by arrival time would have put out of order.
    pub reordered: usize,
    /// Beats read more than 50 ms after their QEMU exited: what a reader dropped 50 ms after
    /// the exit (the harness before issue 18) would have lost.
    pub late: usize,
    /// The first place the counter broke, with the beats around it.
    pub first_break: Option<BeatBreak>,
}

/// The beats around a break in the counter, for a failure message that says what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct BeatBreak {
    /// (host, counter, arrival in ms after the first beat) for up to four beats on each side;
    /// the break is between `around[at - 1]` and `around[at]`.
    pub around: Vec<(String, u64, f64)>,
    pub at: usize,
}

impl std::fmt::Display for HeartbeatGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} beats, longest gap {:.1} ms, {}, {} reordered across hosts, {} read >50 ms after exit",
            self.beats,
            self.longest_gap.as_secs_f64() * 1000.0,
            if self.continuous {
                "continuous"
            } else {
                "BROKEN"
            },
            self.reordered,
            self.late
        )?;
        if let Some(b) = &self.first_break {
            write!(f, "; around the break (host counter +ms):")?;
            for (i, (host, counter, ms)) in b.around.iter().enumerate() {
                let mark = if i == b.at { " |" } else { "" };
                write!(f, "{mark} {host} {counter} +{ms:.1}")?;
            }
        }
        Ok(())
    }
}

/// Follows the beats host after host (each host's in delivery order) and measures the longest
/// host-time gap between consecutive beats; a beat delivered late by a slow reader counts as
/// no gap, never as a break.
pub fn heartbeat_gap(hosts: &[HostBeats]) -> HeartbeatGap {
    let all: Vec<(&str, Beat)> = hosts
        .iter()
        .flat_map(|h| h.beats.iter().map(move |b| (h.host.as_str(), *b)))
        .collect();
    let reordered = hosts
        .windows(2)
        .map(|w| match w[1].beats.first() {
            Some(next) => w[0].beats.iter().filter(|b| b.at > next.at).count(),
            None => 0,
        })
        .sum();
    let mut longest = Duration::ZERO;
    let mut first_break = None;
    for (i, w) in all.windows(2).enumerate() {
        let (a, b) = (w[0].1, w[1].1);
        longest = longest.max(b.at.saturating_duration_since(a.at));
        let broken = b.counter <= a.counter || b.counter > a.counter + 2;
        if broken && first_break.is_none() {
            let t0 = all[0].1.at;
            let from = (i + 1).saturating_sub(4);
            let to = (i + 5).min(all.len());
            first_break = Some(BeatBreak {
                around: all[from..to]
                    .iter()
                    .map(|(h, b)| {
                        let ms = b.at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
                        (h.to_string(), b.counter, ms)
                    })
                    .collect(),
                at: i + 1 - from,
            });
        }
    }
    HeartbeatGap {
        longest_gap: longest,
        continuous: first_break.is_none(),
        beats: all.len(),
        reordered,
        late: hosts
            .iter()
            .map(|h| h.late(Duration::from_millis(50)))
            .sum(),
        first_break,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, t0: Instant, list: &[(u64, u64)]) -> HostBeats {
        let beats = list
            .iter()
            .map(|&(ms, c)| Beat {
                at: t0 + Duration::from_millis(ms),
                counter: c,
            })
            .collect();
        HostBeats::new(name, beats)
    }

    #[test]
    fn gap_spans_source_and_destination() {
        let t0 = Instant::now();
        let src = host("hv1", t0, &[(0, 1), (10, 2), (20, 3)]);
        let dst = host("hv2", t0, &[(95, 4), (105, 5)]);
        let g = heartbeat_gap(&[src, dst]);
        assert_eq!(g.longest_gap, Duration::from_millis(75));
        assert!(g.continuous);
        assert_eq!(g.beats, 5);
        assert_eq!(g.reordered, 0);
    }

    #[test]
    fn a_restarted_counter_is_not_continuous() {
        let t0 = Instant::now();
        let src = host("hv1", t0, &[(0, 50), (10, 51)]);
        let dst = host("hv2", t0, &[(500, 1), (510, 2)]);
        let g = heartbeat_gap(&[src, dst]);
        assert!(!g.continuous);
        let b = g.first_break.as_ref().expect("a break");
        assert_eq!(b.around[b.at - 1], ("hv1".to_string(), 51, 10.0));
        assert_eq!(b.around[b.at], ("hv2".to_string(), 1, 500.0));
        let text = g.to_string();
        assert!(text.contains("BROKEN"), "{text}");
        assert!(text.contains("hv1 51 +10.0 | hv2 1 +500.0"), "{text}");
    }

    #[test]
    fn beats_read_long_after_their_qemu_exited_are_counted_as_late() {
        let t0 = Instant::now();
        let mut src = host("hv1", t0, &[(0, 1), (10, 2), (90, 3)]);
        src.exited_at = Some(t0 + Duration::from_millis(20));
        assert_eq!(src.late(Duration::from_millis(50)), 1);
        let g = heartbeat_gap(&[src, host("hv2", t0, &[(100, 4)])]);
        assert_eq!(g.late, 1);
        assert!(g.continuous);
    }

    #[test]
    fn a_skipped_counter_is_not_continuous() {
        let t0 = Instant::now();
        let g = heartbeat_gap(&[host("hv1", t0, &[(0, 1), (10, 2), (30, 5)])]);
        assert!(!g.continuous);
        assert_eq!(g.longest_gap, Duration::from_millis(20));
    }

    /// The flaky engine test's harness fault: the source's reader delivered its last beats
    /// after the destination's first one. Merged by arrival time the counter went back; host
    /// after host it is whole, and the late beats are counted, not called a break.
    #[test]
    fn a_source_beat_delivered_after_the_destination_s_first_is_not_a_break() {
        let t0 = Instant::now();
        let src = host("hv1", t0, &[(0, 10), (10, 11), (90, 12)]);
        let dst = host("hv2", t0, &[(80, 13), (95, 14)]);
        let g = heartbeat_gap(&[src, dst]);
        assert!(g.continuous, "{g}");
        assert_eq!(g.reordered, 1);
        assert_eq!(g.longest_gap, Duration::from_millis(80));
    }

    /// The other harness fault: the source's last lines were still in its socket when the
    /// reader was dropped. `finish` reads the port to its end once the writer has gone.
    #[tokio::test]
    async fn finish_reads_the_port_to_its_end() {
        let dir = std::env::temp_dir().join(format!("ferry-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let monitor = SerialMonitor::connect(&path, Duration::from_secs(5))
            .await
            .unwrap();
        let (mut port, _) = listener.accept().await.unwrap();
        use tokio::io::AsyncWriteExt;
        let mut text = String::new();
        for c in 1..=2000 {
            text.push_str(&format!("ferry-hb {c} {c}\n"));
        }
        text.push_str("ferry-hb 2001 2001");
        port.write_all(text.as_bytes()).await.unwrap();
        drop(port);
        let beats = monitor.finish(Duration::from_secs(5)).await;
        assert_eq!(
            beats.len(),
            2001,
            "every line, the unterminated last one too"
        );
        assert_eq!(beats.last().map(|b| b.counter), Some(2001));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
