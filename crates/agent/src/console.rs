//! Each instance's serial console output, kept on this host after its QEMU is gone.
//!
//! QEMU appends what the guest prints on its serial port to a log file (the chardev's
//! `logfile`), whether or not anyone reads the socket. Each QEMU process of an instance gets
//! a file of its own, `STATE/consoles/<uuid>/<start unix ms>.log`, outside the run directory
//! (removed with the process) and outside the instance directory (removed when the instance
//! leaves this host): a migration's source keeps what the guest printed before it moved, and
//! the server joins the segments of every host in time order
//! (`GET /v1/instances/{id}/console`). They are removed with the instance (`DELETE`).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use ferry_api::instances::ConsoleSegment;
use tracing::warn;
use uuid::Uuid;

use crate::{Agent, AgentError};

/// Segments kept per instance on one host: each start and each arrival makes one, so a guest
/// restarted in a loop must not fill the disk with their files.
const KEEP_SEGMENTS: usize = 20;

/// The directory of instance `id`'s console segments under `state_dir`.
pub fn console_dir(state_dir: &Path, id: &Uuid) -> PathBuf {
    state_dir.join("consoles").join(id.to_string())
}

/// The segments in `dir`, oldest first: (start in unix ms, path). Files that are not
/// segments are ignored.
pub fn segments(dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut out: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let path = e.path();
                    let ms = path
                        .file_name()?
                        .to_str()?
                        .strip_suffix(".log")?
                        .parse::<i64>()
                        .ok()?;
                    Some((ms, path))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The path of a new segment of `dir` for a QEMU started at `now_ms`, after removing the
/// oldest ones beyond [`KEEP_SEGMENTS`] and the empty ones (an incoming QEMU that never ran
/// the guest prints nothing). A start in the same millisecond as the newest segment gets
/// the next free one, so segments never share a file.
pub fn new_segment(dir: &Path, now_ms: i64) -> PathBuf {
    let existing = segments(dir);
    let mut kept = Vec::new();
    for (ms, path) in existing {
        let empty = std::fs::metadata(&path).is_ok_and(|m| m.len() == 0);
        if empty {
            let _ = std::fs::remove_file(&path);
        } else {
            kept.push((ms, path));
        }
    }
    let excess = (kept.len() + 1).saturating_sub(KEEP_SEGMENTS);
    for (_, path) in kept.drain(..excess) {
        let _ = std::fs::remove_file(&path);
    }
    let newest = kept.last().map(|(ms, _)| *ms).unwrap_or(i64::MIN);
    dir.join(format!("{}.log", now_ms.max(newest.saturating_add(1))))
}

/// The newest `budget` bytes of output in `dir`, as `host`'s segments, older ones first: the
/// server keeps no more than that of all hosts together, so more is never worth sending.
pub fn read_segments(dir: &Path, host: &str, budget: u64) -> Vec<ConsoleSegment> {
    let mut left = budget;
    let mut out = Vec::new();
    for (ms, path) in segments(dir).into_iter().rev() {
        if left == 0 {
            break;
        }
        let (size_bytes, tail) = match read_tail(&path, left) {
            Ok(t) => t,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read a console segment");
                continue;
            }
        };
        if size_bytes == 0 {
            continue;
        }
        left -= tail.len() as u64;
        out.push(ConsoleSegment {
            host: host.to_string(),
            started_at: DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default(),
            size_bytes,
            text: String::from_utf8_lossy(&tail).into_owned(),
        });
    }
    out.reverse();
    out
}

/// The size of `path` and its last `max` bytes.
fn read_tail(path: &Path, max: u64) -> std::io::Result<(u64, Vec<u8>)> {
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let start = size.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity((size - start) as usize);
    f.take(size - start).read_to_end(&mut tail)?;
    Ok((size, tail))
}

impl Agent {
    /// Where the QEMU being started now for instance `id` writes the guest's serial output.
    pub(crate) fn console_segment(&self, id: &Uuid) -> PathBuf {
        new_segment(
            &console_dir(&self.config.state_dir, id),
            Utc::now().timestamp_millis(),
        )
    }

    /// `GET /v1/instances/{id}/console`: this host's segments of the instance, also when it
    /// is no longer defined here (it moved on and its output here is history). An instance
    /// that is neither defined here nor left output here is refused (`instance-not-found`),
    /// so a caller cannot mistake "never ran here" for "printed nothing".
    pub(crate) fn console(
        &self,
        id: &Uuid,
        budget: u64,
    ) -> Result<Vec<ConsoleSegment>, AgentError> {
        let dir = console_dir(&self.config.state_dir, id);
        if self.slot(id).is_err() && !dir.is_dir() {
            return Err(AgentError::InstanceNotFound(*id));
        }
        Ok(read_segments(&dir, &self.config.name, budget))
    }

    /// `DELETE /v1/instances/{id}/console`: forgets the instance's output on this host; the
    /// server asks every host that ran an instance it deletes. Refused while the instance
    /// runs here, whose QEMU is still writing.
    pub(crate) async fn delete_console(&self, id: &Uuid) -> Result<(), AgentError> {
        if let Ok(mut slot) = self.lock_slot(id).await {
            self.reap(&mut slot).await;
            if slot.process.is_some() {
                return Err(AgentError::conflict(
                    "instance-running",
                    format!("instance {id} runs here and still writes its console"),
                    "stop the instance first",
                ));
            }
        }
        self.remove_console(id);
        Ok(())
    }

    /// Removes the instance's console segments, if any.
    fn remove_console(&self, id: &Uuid) {
        let dir = console_dir(&self.config.state_dir, id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "cannot remove console segments");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_named_by_start_and_read_oldest_first_with_their_tails() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("c");
        assert!(read_segments(&d, "hv1", 100).is_empty(), "none yet");
        let first = new_segment(&d, 1_000);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(&first, "boot\nhello\n").unwrap();
        let second = new_segment(&d, 5_000);
        std::fs::write(&second, "after the move\n").unwrap();
        std::fs::write(d.join("notes.txt"), "not a segment").unwrap();
        let read = read_segments(&d, "hv1", 21);
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].text, "hello\n", "the newest bytes of all");
        assert_eq!((read[0].size_bytes, read[0].omitted_bytes()), (11, 5));
        assert_eq!(read[0].started_at.timestamp_millis(), 1_000);
        assert_eq!(read[1].text, "after the move\n");
        assert_eq!(read[1].host, "hv1");
        let newest = read_segments(&d, "hv1", 6);
        assert_eq!(newest.len(), 1, "{newest:?}");
        assert_eq!(newest[0].text, " move\n");
        let whole = read_segments(&d, "hv1", 1 << 20);
        assert_eq!(whole[0].text, "boot\nhello\n");
    }

    #[test]
    fn a_new_segment_drops_empty_and_old_ones_and_never_reuses_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        for ms in 0..KEEP_SEGMENTS as i64 {
            std::fs::write(d.join(format!("{ms}.log")), "x").unwrap();
        }
        std::fs::write(d.join("7.log"), "").unwrap();
        std::fs::write(d.join("100.log"), "z").unwrap();
        let next = new_segment(&d, 50);
        assert_eq!(
            next,
            d.join("101.log"),
            "after the newest, even with a slow clock"
        );
        std::fs::write(&next, "y").unwrap();
        let left: Vec<i64> = segments(&d).into_iter().map(|(ms, _)| ms).collect();
        assert_eq!(left.len(), KEEP_SEGMENTS, "{left:?}");
        assert_eq!(left[0], 1, "the oldest went: {left:?}");
        assert!(!left.contains(&7), "the empty one went: {left:?}");
        assert_eq!(left.last(), Some(&101));
    }
}
