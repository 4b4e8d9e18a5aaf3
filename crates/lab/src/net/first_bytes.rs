//! What a lab host's migration interface received, millisecond by millisecond: a thread
//! inside the host's namespace reads its receive counter every millisecond.
//!
//! `ip -s link` takes milliseconds per call and runs a process; `/proc/thread-self/net/dev`
//! shows the counters of the reading thread's namespace, so a thread that entered the
//! namespace reads them as a file, cheaply enough to poll. [`RxTrace::first_bytes_after`]
//! then names the moment a stream's first bytes arrived: the interface had received a
//! threshold more than at a given instant (headers included), which leaves out traffic that
//! came before it, such as a bandwidth probe.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lab::HOST_MIGRATION_IF;
use super::sockets::in_netns_background;

/// How often the counter is read.
const POLL: Duration = Duration::from_millis(1);

/// A running recording; see [`record_rx`].
#[derive(Debug)]
pub struct RxRecording {
    done: mpsc::Receiver<RxTrace>,
    stop: Arc<AtomicBool>,
}

impl RxRecording {
    /// Ends the recording and returns it.
    pub fn finish(self) -> RxTrace {
        self.stop.store(true, Ordering::Relaxed);
        self.done.recv().unwrap_or_default()
    }
}

impl Drop for RxRecording {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The counter's changes: (when, bytes received so far), the first entry the start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RxTrace {
    pub samples: Vec<(Instant, u64)>,
}

impl RxTrace {
    /// When the interface had received `threshold` bytes more than it had at `after`.
    pub fn first_bytes_after(&self, after: Instant, threshold: u64) -> Option<Instant> {
        let base = self
            .samples
            .iter()
            .take_while(|(t, _)| *t <= after)
            .last()
            .or(self.samples.first())?
            .1;
        self.samples
            .iter()
            .find(|(t, b)| *t > after && b.saturating_sub(base) >= threshold)
            .map(|(t, _)| *t)
    }
}

/// Starts recording the migration interface of lab namespace `netns`; returns once the
/// starting count is read, so that everything after the call is recorded. The recording
/// ends on [`RxRecording::finish`], or by itself after `within`.
pub fn record_rx(netns: &str, within: Duration) -> io::Result<RxRecording> {
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    let (done_tx, done_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    in_netns_background(netns, move || {
        let mut trace = RxTrace::default();
        match rx_bytes_here() {
            Ok(b) => {
                trace.samples.push((Instant::now(), b));
                let _ = ready_tx.send(Ok(()));
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        }
        let deadline = Instant::now() + within;
        while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(POLL);
            let Ok(b) = rx_bytes_here() else { break };
            if trace.samples.last().is_some_and(|(_, last)| *last != b) {
                trace.samples.push((Instant::now(), b));
            }
        }
        let _ = done_tx.send(trace);
    })?;
    ready_rx
        .recv()
        .map_err(|_| io::Error::other(format!("cannot enter network namespace {netns}")))??;
    Ok(RxRecording {
        done: done_rx,
        stop,
    })
}

/// The migration interface's received bytes in the calling thread's namespace.
fn rx_bytes_here() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    rx_bytes_of(&text, HOST_MIGRATION_IF).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {HOST_MIGRATION_IF} in this namespace"),
        )
    })
}

/// The received bytes of interface `name` in a `/proc/net/dev` table.
fn rx_bytes_of(table: &str, name: &str) -> Option<u64> {
    table.lines().find_map(|line| {
        let (iface, counters) = line.split_once(':')?;
        (iface.trim() == name).then(|| counters.split_whitespace().next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_received_bytes_are_read_from_the_interfaces_line() {
        let table = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:     420       6    0    0    0     0          0         0      420       6    0    0    0     0       0          0\n  \
             mig0: 123456789  9000    0    0    0     0          0         0     5000      40    0    0    0     0       0          0\n";
        assert_eq!(rx_bytes_of(table, "mig0"), Some(123456789));
        assert_eq!(rx_bytes_of(table, "lo"), Some(420));
        assert_eq!(rx_bytes_of(table, "eth0"), None);
    }

    /// A probe's burst before `after` does not count; the stream's bytes after it do.
    #[test]
    fn first_bytes_count_from_the_given_instant() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let trace = RxTrace {
            samples: vec![
                (at(0), 1000),
                (at(10), 5_000_000), // the probe
                (at(50), 5_000_500),
                (at(120), 5_010_000),
                (at(121), 5_200_000), // the stream
            ],
        };
        assert_eq!(trace.first_bytes_after(at(0), 65536), Some(at(10)));
        assert_eq!(trace.first_bytes_after(at(100), 65536), Some(at(121)));
        assert_eq!(trace.first_bytes_after(at(200), 65536), None);
        assert_eq!(RxTrace::default().first_bytes_after(at(0), 1), None);
    }
}
