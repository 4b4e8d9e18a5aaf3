//! Host side of the guest's disk proof: the `disk-verify` report and the disk fields of
//! `status` (guest side: crates/guest/src/disk_service.rs).
//!
//! The guest counts its acknowledged block writes in memory; `disk-verify` reads every block
//! back and compares it with what that count implies, so after a migration it proves memory
//! and disk arrived from the same instant.

use serde::{Deserialize, Serialize};

use super::{control, field_u64, fields, parse_error, GuestError};
use crate::guest_config::DiskIo;

/// Runs `disk-verify` and parses it.
pub async fn disk_verify(stream: tokio::net::TcpStream) -> Result<DiskVerifyReport, GuestError> {
    parse_disk_verify(&control(stream, "disk-verify").await?)
}

/// The disk writer's counters, from `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// How writes are made durable: O_DIRECT, or write + fdatasync.
    pub io: DiskIo,
    /// Blocks in use.
    pub blocks: u64,
    /// Acknowledged block writes (the count verify checks against).
    pub writes: u64,
    /// Completed rounds over the blocks (the first pass is round 1).
    pub rounds: u64,
    pub rate_blocks_s: u64,
    /// Stopped by `disk-pause`.
    pub paused: bool,
    /// Writes that returned an error (each one is retried).
    pub failures: u64,
    /// The last write failed and has not been retried successfully yet.
    pub in_doubt: bool,
    /// errno of the last failure (0: none yet; -1: not an OS error).
    pub errno: i64,
}

/// What is wrong with a block, as the guest names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadKind {
    /// Zeros where a write was acknowledged: the write is lost.
    Zero,
    /// A whole, older generation: an acknowledged write is lost.
    Stale,
    /// A newer generation than the guest acknowledged (or data where it wrote none): the disk
    /// is ahead of the guest's memory.
    Ahead,
    /// Not the guest's block format.
    Garbage,
    /// The guest's format from another run (a reused or wrong disk).
    Foreign,
    /// A block of this run at the wrong place.
    Misplaced,
    /// Parts of different writes, or damaged content.
    Torn,
    /// Matching checksum but wrong content.
    Forged,
    /// The guest could not read it.
    Unreadable,
    /// A word this host does not know (a newer guest).
    #[serde(other)]
    Other,
}

impl BadKind {
    fn parse(word: &str) -> BadKind {
        match word {
            "zero" => BadKind::Zero,
            "stale" => BadKind::Stale,
            "ahead" => BadKind::Ahead,
            "garbage" => BadKind::Garbage,
            "foreign" => BadKind::Foreign,
            "misplaced" => BadKind::Misplaced,
            "torn" => BadKind::Torn,
            "forged" => BadKind::Forged,
            "unreadable" => BadKind::Unreadable,
            _ => BadKind::Other,
        }
    }
}

/// One block that failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadBlock {
    pub index: u64,
    pub kind: BadKind,
    /// Generation the block must hold (0: zeros).
    pub expected_generation: u64,
    /// Generation its header names, where it has a header of this run.
    pub found_generation: Option<u64>,
    /// Index its header names (differs from `index` for a misplaced block).
    pub found_index: Option<u64>,
}

/// What a write whose outcome the guest could not know (it returned an error) left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteOutcome {
    /// The block still holds the old generation: the write did not land.
    Old,
    /// The write landed although it reported an error.
    New,
    /// Neither (counted as an error and listed in `first_bad`).
    Neither,
}

/// The one block whose last write failed and awaits its retry: either generation is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnknownWrite {
    pub index: u64,
    pub old_generation: u64,
    pub new_generation: u64,
    pub found: WriteOutcome,
}

/// Result of the guest checking every block of its disk, from `disk-verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskVerifyReport {
    /// No block is wrong.
    pub ok: bool,
    pub blocks_checked: u64,
    pub errors: u64,
    /// The guest's count of acknowledged writes the blocks were checked against.
    pub writes: u64,
    pub unknown: Option<UnknownWrite>,
    /// The first few bad blocks (the guest lists at most 8); `errors` counts all.
    pub first_bad: Vec<BadBlock>,
}

fn text_field<'a>(
    reply: &str,
    fields: &[(&str, &'a str)],
    key: &str,
) -> Result<&'a str, GuestError> {
    fields
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| parse_error(reply, format!("missing field `{key}`")))
}

fn number(reply: &str, what: &str, word: &str) -> Result<u64, GuestError> {
    word.parse()
        .map_err(|_| parse_error(reply, format!("{what} is not a number: {word:?}")))
}

fn optional(reply: &str, what: &str, word: &str) -> Result<Option<u64>, GuestError> {
    match word {
        "-" => Ok(None),
        w => number(reply, what, w).map(Some),
    }
}

/// `INDEX:KIND:EXPECTED:FOUND_GEN:FOUND_INDEX`.
fn parse_bad(reply: &str, item: &str) -> Result<BadBlock, GuestError> {
    let parts: Vec<&str> = item.split(':').collect();
    let [index, kind, expected, found_gen, found_index] = parts[..] else {
        return Err(parse_error(reply, format!("bad block entry {item:?}")));
    };
    Ok(BadBlock {
        index: number(reply, "bad block index", index)?,
        kind: BadKind::parse(kind),
        expected_generation: number(reply, "expected generation", expected)?,
        found_generation: optional(reply, "found generation", found_gen)?,
        found_index: optional(reply, "found index", found_index)?,
    })
}

/// `INDEX:OLD:NEW:old|new|neither`.
fn parse_unknown(reply: &str, item: &str) -> Result<UnknownWrite, GuestError> {
    let parts: Vec<&str> = item.split(':').collect();
    let [index, old, new, found] = parts[..] else {
        return Err(parse_error(reply, format!("unknown-write entry {item:?}")));
    };
    let found = match found {
        "old" => WriteOutcome::Old,
        "new" => WriteOutcome::New,
        "neither" => WriteOutcome::Neither,
        other => return Err(parse_error(reply, format!("write outcome {other:?}"))),
    };
    Ok(UnknownWrite {
        index: number(reply, "block index", index)?,
        old_generation: number(reply, "old generation", old)?,
        new_generation: number(reply, "new generation", new)?,
        found,
    })
}

/// Parses a `disk-verify` reply:
/// `ok checked=B errors=E writes=N unknown=-|I:OLD:NEW:OUTCOME first_bad=-|I:KIND:EXP:GEN:IDX,...`.
pub fn parse_disk_verify(reply: &str) -> Result<DiskVerifyReport, GuestError> {
    let f = fields(reply)?;
    let unknown = match text_field(reply, &f, "unknown")? {
        "-" => None,
        item => Some(parse_unknown(reply, item)?),
    };
    let first_bad = match text_field(reply, &f, "first_bad")? {
        "-" => Vec::new(),
        list => list
            .split(',')
            .map(|item| parse_bad(reply, item))
            .collect::<Result<_, _>>()?,
    };
    let errors = field_u64(reply, &f, "errors")?;
    Ok(DiskVerifyReport {
        ok: errors == 0,
        blocks_checked: field_u64(reply, &f, "checked")?,
        errors,
        writes: field_u64(reply, &f, "writes")?,
        unknown,
        first_bad,
    })
}

/// The disk fields of a `status` reply: `None` when the guest has no disk (`disk=-`), its disk
/// failed to start (`disk=error`; `disk-verify` says why) or it predates disks.
pub(super) fn parse_disk_status(
    reply: &str,
    f: &[(&str, &str)],
) -> Result<Option<DiskStatus>, GuestError> {
    match f.iter().find(|(k, _)| *k == "disk") {
        None | Some((_, "-")) | Some((_, "error")) => return Ok(None),
        Some(_) => {}
    }
    let io = match text_field(reply, f, "disk_mode")? {
        "direct" => DiskIo::Direct,
        "sync" => DiskIo::Sync,
        other => return Err(parse_error(reply, format!("disk_mode {other:?}"))),
    };
    let errno = text_field(reply, f, "disk_errno")?;
    Ok(Some(DiskStatus {
        io,
        blocks: field_u64(reply, f, "disk_blocks")?,
        writes: field_u64(reply, f, "disk_writes")?,
        rounds: field_u64(reply, f, "disk_rounds")?,
        rate_blocks_s: field_u64(reply, f, "disk_rate")?,
        paused: field_u64(reply, f, "disk_paused")? != 0,
        failures: field_u64(reply, f, "disk_failures")?,
        in_doubt: field_u64(reply, f, "disk_in_doubt")? != 0,
        errno: errno
            .parse()
            .map_err(|_| parse_error(reply, format!("disk_errno {errno:?}")))?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_client::parse_status;

    #[test]
    fn clean_report() {
        let r = parse_disk_verify("ok checked=16384 errors=0 writes=20000 unknown=- first_bad=-")
            .unwrap();
        assert_eq!(
            r,
            DiskVerifyReport {
                ok: true,
                blocks_checked: 16384,
                errors: 0,
                writes: 20000,
                unknown: None,
                first_bad: Vec::new(),
            }
        );
    }

    #[test]
    fn bad_blocks_and_the_write_in_doubt() {
        let r = parse_disk_verify(
            "ok checked=50 errors=3 writes=120 unknown=20:2:3:neither \
             first_bad=0:stale:3:2:0,7:zero:3:-:-,20:misplaced:3:1:21",
        )
        .unwrap();
        assert!(!r.ok);
        assert_eq!(r.errors, 3);
        assert_eq!(
            r.unknown,
            Some(UnknownWrite {
                index: 20,
                old_generation: 2,
                new_generation: 3,
                found: WriteOutcome::Neither
            })
        );
        assert_eq!(
            r.first_bad[0],
            BadBlock {
                index: 0,
                kind: BadKind::Stale,
                expected_generation: 3,
                found_generation: Some(2),
                found_index: Some(0)
            }
        );
        assert_eq!(r.first_bad[1].kind, BadKind::Zero);
        assert_eq!(r.first_bad[1].found_generation, None);
        assert_eq!(r.first_bad[2].found_index, Some(21));
        let r = parse_disk_verify(
            "ok checked=5 errors=1 writes=5 unknown=4:0:1:new first_bad=1:shredded:1:-:-",
        )
        .unwrap();
        assert_eq!(r.unknown.unwrap().found, WriteOutcome::New);
        assert_eq!(r.first_bad[0].kind, BadKind::Other);
    }

    #[test]
    fn malformed_reports_are_refused() {
        for reply in [
            "err no-disk: no ferry.disk= given",
            "ok checked=5 errors=0 writes=5 first_bad=-",
            "ok checked=5 errors=0 writes=5 unknown=- ",
            "ok checked=5 errors=1 writes=5 unknown=- first_bad=1:zero:1:-",
            "ok checked=5 errors=1 writes=5 unknown=- first_bad=x:zero:1:-:-",
            "ok checked=5 errors=0 writes=5 unknown=1:0:1:maybe first_bad=-",
            "ok checked=5 errors=0 unknown=- first_bad=-",
        ] {
            assert!(parse_disk_verify(reply).is_err(), "{reply}");
        }
    }

    #[test]
    fn status_with_and_without_a_disk() {
        let base = "ok uptime_ms=1 heartbeat=2 writes=3 rounds=1 pages=3 rate_mib_s=8 \
                    echo_tcp=0 echo_udp=0";
        assert_eq!(parse_status(base).unwrap().disk, None);
        assert_eq!(parse_status(&format!("{base} disk=-")).unwrap().disk, None);
        assert_eq!(
            parse_status(&format!("{base} disk=error")).unwrap().disk,
            None
        );
        let s = parse_status(&format!(
            "{base} disk=vdb disk_mode=direct disk_blocks=16384 disk_writes=20000 \
             disk_rounds=1 disk_rate=100 disk_paused=1 disk_failures=2 disk_in_doubt=1 \
             disk_errno=5"
        ))
        .unwrap();
        assert_eq!(
            s.disk,
            Some(DiskStatus {
                io: DiskIo::Direct,
                blocks: 16384,
                writes: 20000,
                rounds: 1,
                rate_blocks_s: 100,
                paused: true,
                failures: 2,
                in_doubt: true,
                errno: 5
            })
        );
        assert!(parse_status(&format!("{base} disk=vdb disk_mode=direct")).is_err());
        assert!(parse_status(&format!("{base} disk=vdb disk_mode=mmap disk_blocks=1")).is_err());
    }
}
