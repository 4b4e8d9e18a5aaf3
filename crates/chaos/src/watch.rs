//! Where the guest really runs, from the guest itself: the heartbeat lines each host's QEMU
//! prints on its serial port, read live on both hosts.
//!
//! The server's record and the agents' reports are what is under test, so they cannot be the
//! judge. A paused QEMU (the destination before `cont`, the source at switchover) prints
//! nothing; a running one prints every 10 ms. So a copy "runs" on a host when that host's
//! counter advanced within [`RUN_WINDOW`].
//!
//! Two checks say "two copies":
//! - concurrency, sampled every [`SAMPLE`]: both hosts' counters advanced within the window at
//!   the same sample, for longer than one window (a clean handover shows both for at most one
//!   window: the source's last beats and the destination's first are less than a window apart);
//! - divergence: both hosts printed the same counter values. One guest counts once; the same
//!   numbers on two hosts mean two copies ran from one state, even if not at the same instant
//!   (a source resumed after the destination ran). A line torn at switchover may repeat one
//!   number, so [`SHARED_TOLERANCE`] are allowed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_lab::serial::SerialMonitor;
use serde::Serialize;
use tokio::task::JoinHandle;

/// How often both hosts are sampled.
pub const SAMPLE: Duration = Duration::from_millis(100);
/// A copy runs if its counter advanced within this long.
pub const RUN_WINDOW: Duration = Duration::from_millis(300);
/// Counter values both hosts may print without it meaning two copies (a torn line).
pub const SHARED_TOLERANCE: usize = 2;

/// What the watcher saw over a whole cell.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchReport {
    /// The longest stretch during which both hosts ran, ms (sampled).
    pub both_running_ms: u64,
    /// Counter values printed on both hosts.
    pub shared_counters: usize,
    /// Beats read per host.
    pub beats: [usize; 2],
    /// Whether the two-copies rule fired (see the module doc).
    pub two_copies: bool,
}

#[derive(Debug, Default)]
struct Shared {
    /// Per host: every counter with its arrival.
    beats: [Vec<(Instant, u64)>; 2],
    /// Consecutive samples with both running, now and at most.
    both_now: u32,
    both_max: u32,
    stop: bool,
}

/// Follows one guest's serial ports on both hosts until [`Watcher::stop`].
pub struct Watcher {
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

impl Watcher {
    /// Starts watching the serial sockets `sockets[0]` (hv1) and `sockets[1]` (hv2). A socket
    /// that does not exist yet (the destination not started) or was closed (QEMU quit) is
    /// tried again at every sample.
    pub fn start(sockets: [PathBuf; 2]) -> Watcher {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let s = shared.clone();
        let task = tokio::spawn(async move { sample_loop(sockets, s).await });
        Watcher { shared, task }
    }

    /// The host index whose copy runs now, if exactly one does; `None` if none runs.
    /// (Both running is reported by the final report, not here.)
    pub fn running(&self) -> Vec<usize> {
        let s = self.shared.lock().expect("watch lock");
        let now = Instant::now();
        (0..2)
            .filter(|&h| runs(&s.beats[h], now))
            .collect::<Vec<_>>()
    }

    /// The newest counter seen on any host.
    pub fn last_counter(&self) -> Option<u64> {
        let s = self.shared.lock().expect("watch lock");
        s.beats.iter().filter_map(|b| b.last().map(|x| x.1)).max()
    }

    /// Waits until some host's copy runs (a guest has booted), or `timeout`.
    pub async fn wait_running(&self, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(&h) = self.running().first() {
                return Some(h);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(SAMPLE).await;
        }
    }

    /// Stops watching and judges.
    pub async fn stop(self) -> WatchReport {
        self.shared.lock().expect("watch lock").stop = true;
        let _ = self.task.await;
        let s = self.shared.lock().expect("watch lock");
        let sets: Vec<BTreeSet<u64>> = s
            .beats
            .iter()
            .map(|b| b.iter().map(|x| x.1).collect())
            .collect();
        let shared_counters = sets[0].intersection(&sets[1]).count();
        let window_samples = (RUN_WINDOW.as_millis() / SAMPLE.as_millis()) as u32;
        WatchReport {
            both_running_ms: u64::from(s.both_max) * SAMPLE.as_millis() as u64,
            shared_counters,
            beats: [s.beats[0].len(), s.beats[1].len()],
            two_copies: s.both_max > window_samples || shared_counters > SHARED_TOLERANCE,
        }
    }
}

/// Whether the newest beat in `beats` arrived within the run window and the counter moved.
fn runs(beats: &[(Instant, u64)], now: Instant) -> bool {
    let Some(&(at, counter)) = beats.last() else {
        return false;
    };
    if now.duration_since(at) > RUN_WINDOW {
        return false;
    }
    // Advanced: some earlier beat within the window shows a smaller counter, or the newest
    // beat is itself recent enough to be a step (10 ms beats: one beat is a step).
    beats
        .iter()
        .rev()
        .take_while(|(t, _)| now.duration_since(*t) <= RUN_WINDOW)
        .any(|&(_, c)| c < counter)
        || beats.len() == 1
        || beats[beats.len() - 2].1 < counter
}

async fn sample_loop(sockets: [PathBuf; 2], shared: Arc<Mutex<Shared>>) {
    let mut monitors: [Option<SerialMonitor>; 2] = [None, None];
    // Beats already copied out of each monitor.
    let mut copied = [0usize; 2];
    let mut tick = tokio::time::interval(SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for h in 0..2 {
            let ended = monitors[h].as_ref().is_some_and(|m| m.is_finished());
            if monitors[h].is_none() || ended {
                // One attempt per sample; keep what the old reader read.
                if let Some(old) = monitors[h].take() {
                    let beats = old.beats();
                    let mut s = shared.lock().expect("watch lock");
                    s.beats[h].extend(beats[copied[h]..].iter().map(|b| (b.at, b.counter)));
                }
                copied[h] = 0;
                monitors[h] = SerialMonitor::connect(&sockets[h], Duration::ZERO)
                    .await
                    .ok();
            }
        }
        let mut s = shared.lock().expect("watch lock");
        for h in 0..2 {
            if let Some(m) = &monitors[h] {
                let beats = m.beats();
                s.beats[h].extend(beats[copied[h]..].iter().map(|b| (b.at, b.counter)));
                copied[h] = beats.len();
            }
        }
        let now = Instant::now();
        if runs(&s.beats[0], now) && runs(&s.beats[1], now) {
            s.both_now += 1;
            s.both_max = s.both_max.max(s.both_now);
        } else {
            s.both_now = 0;
        }
        if s.stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64, c: u64) -> (Instant, u64) {
        (base + Duration::from_millis(ms), c)
    }

    #[test]
    fn a_recent_advancing_counter_runs_and_a_silent_one_does_not() {
        let base = Instant::now();
        let beats = vec![at(base, 0, 1), at(base, 10, 2)];
        assert!(runs(&beats, base + Duration::from_millis(100)));
        assert!(!runs(&beats, base + Duration::from_millis(400)));
        assert!(!runs(&[], base));
    }

    #[test]
    fn a_repeated_counter_is_not_running() {
        let base = Instant::now();
        let beats = vec![at(base, 0, 5), at(base, 10, 5)];
        assert!(!runs(&beats, base + Duration::from_millis(20)));
    }
}
