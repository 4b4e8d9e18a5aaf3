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
}

impl Drop for SerialMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The heartbeat story across a migration: the longest silence, and whether the counter went
/// on where it stopped (the same guest, not a reboot).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeartbeatGap {
    pub longest_gap: Duration,
    /// True when, in arrival order, every counter is one or two more than the one before: the
    /// guest went on counting. (One beat may be lost when switchover cuts a line in two.)
    pub continuous: bool,
    pub beats: usize,
}

/// Merges the beats seen on several serial ports (source then destination) and measures the
/// longest host-time gap between consecutive beats.
pub fn heartbeat_gap(sources: &[Vec<Beat>]) -> HeartbeatGap {
    let mut all: Vec<Beat> = sources.iter().flatten().copied().collect();
    all.sort_by_key(|b| (b.at, b.counter));
    let mut longest = Duration::ZERO;
    let mut continuous = true;
    for w in all.windows(2) {
        longest = longest.max(w[1].at.saturating_duration_since(w[0].at));
        if w[1].counter <= w[0].counter || w[1].counter > w[0].counter + 2 {
            continuous = false;
        }
    }
    HeartbeatGap {
        longest_gap: longest,
        continuous,
        beats: all.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beats(t0: Instant, list: &[(u64, u64)]) -> Vec<Beat> {
        list.iter()
            .map(|&(ms, c)| Beat {
                at: t0 + Duration::from_millis(ms),
                counter: c,
            })
            .collect()
    }

    #[test]
    fn gap_spans_source_and_destination() {
        let t0 = Instant::now();
        let src = beats(t0, &[(0, 1), (10, 2), (20, 3)]);
        let dst = beats(t0, &[(95, 4), (105, 5)]);
        let g = heartbeat_gap(&[src, dst]);
        assert_eq!(g.longest_gap, Duration::from_millis(75));
        assert!(g.continuous);
        assert_eq!(g.beats, 5);
    }

    #[test]
    fn a_restarted_counter_is_not_continuous() {
        let t0 = Instant::now();
        let src = beats(t0, &[(0, 50), (10, 51)]);
        let dst = beats(t0, &[(500, 1), (510, 2)]);
        assert!(!heartbeat_gap(&[src, dst]).continuous);
    }

    #[test]
    fn a_skipped_counter_is_not_continuous() {
        let t0 = Instant::now();
        let g = heartbeat_gap(&[beats(t0, &[(0, 1), (10, 2), (30, 5)])]);
        assert!(!g.continuous);
        assert_eq!(g.longest_gap, Duration::from_millis(20));
    }
}
