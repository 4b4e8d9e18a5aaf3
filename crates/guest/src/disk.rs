//! The self-verifying disk: a write counter in guest memory and the blocks it implies.
//!
//! The model is the memory writer's (pages.rs): write `k` stores block `k % blocks` with
//! generation `k / blocks + 1`, and the count `N` of acknowledged writes says which generation
//! every block must hold ([`expected_generation`]). `N` lives in guest RAM and so migrates
//! with the guest; the blocks travel with the disk. A verify after a migration therefore
//! proves that memory and disk arrived from the same instant: a lost write reads back stale or
//! zero, a disk that got ahead of memory reads back a newer generation.
//!
//! First pass: the disk must be fresh (all zero) at boot. Blocks the writer has not reached
//! yet must still be zero (generation 0), so verification is exact from the first second; the
//! writer does not pre-fill, because filling 64 MiB with durable 4 KiB writes under TCG takes
//! minutes.
//!
//! Failed writes: `N` advances only when the device acknowledged the write. A write that
//! returned an error (EIO while the device is stopped or read-only, ...) may have reached the
//! disk wholly, partly or not at all, so its outcome is unknown: the block is recorded as the
//! pending [`Attempt`] before the write is issued, and the writer retries the same write (same
//! block, same generation) until it succeeds. Until then the verifier accepts either the old
//! or the new generation for that one block and reports which it found. Writes are issued one
//! at a time, so at most one block is ever in that state. Recording the attempt before the
//! write also covers a snapshot of guest memory taken while the write is in flight.

use std::io;

use crate::block::{inspect, write_block, Bad, BLOCK_SIZE};
use crate::pages::Page;
use crate::pattern::{expected_generation, Fill};

/// Blocks read per request while verifying: large reads are much faster than 4 KiB ones under
/// emulation (one virtio round trip each).
const VERIFY_CHUNK: usize = 64;
/// Bad blocks listed in a report; the count covers all of them.
pub const MAX_LISTED: usize = 8;

/// Where blocks go. Writes must be durable once they return `Ok`: that is what lets the write
/// count stand for the disk's content.
pub trait BlockDevice: Send {
    /// Writes `block` at block position `index`; returns once the device acknowledged it.
    fn write_block(&mut self, index: u64, block: &Page) -> io::Result<()>;
    /// Reads `buf.len()` consecutive blocks starting at `first`, from the device itself (not
    /// a cache the guest kernel keeps).
    fn read_blocks(&mut self, first: u64, buf: &mut [Page]) -> io::Result<()>;
    /// How writes are made durable: `direct` (O_DIRECT) or `sync` (write + fdatasync).
    fn mode(&self) -> &'static str;
}

/// A write that was issued but not acknowledged: block `index` holds `generation - 1` or
/// `generation` (or, if the device misbehaved, something else, which verify reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub index: u64,
    pub generation: u64,
}

/// One block that failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadBlock {
    pub index: u64,
    pub bad: Bad,
    pub expected: u64,
    pub found_generation: Option<u64>,
    pub found_index: Option<u64>,
}

/// What verify found at the block of an unacknowledged write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownOutcome {
    pub attempt: Attempt,
    /// `Some(true)`: the new generation, `Some(false)`: the old one, `None`: neither (also
    /// counted as an error).
    pub landed: Option<bool>,
}

/// Result of checking every block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskReport {
    pub checked: u64,
    pub errors: u64,
    /// The write count the check was made against.
    pub writes: u64,
    pub first_bad: Vec<BadBlock>,
    pub unknown: Option<UnknownOutcome>,
}

impl DiskReport {
    fn record(&mut self, bad: BadBlock) {
        self.errors += 1;
        if self.first_bad.len() < MAX_LISTED {
            self.first_bad.push(bad);
        }
    }
}

/// The disk, its write count and the write in doubt.
pub struct Disk {
    dev: Box<dyn BlockDevice>,
    blocks: u64,
    nonce: u64,
    fill: Fill,
    writes: u64,
    attempt: Option<Attempt>,
    failures: u64,
    buf: Box<Page>,
}

impl Disk {
    /// A disk of `blocks` blocks (at least one) on `dev`, assumed fresh (all zero).
    pub fn new(dev: Box<dyn BlockDevice>, blocks: u64, nonce: u64, fill: Fill) -> Self {
        Disk {
            dev,
            blocks: blocks.max(1),
            nonce,
            fill,
            writes: 0,
            attempt: None,
            failures: 0,
            buf: Box::new(Page([0; BLOCK_SIZE])),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Acknowledged writes (`N`).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Writes that returned an error.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    pub fn attempt(&self) -> Option<Attempt> {
        self.attempt
    }

    pub fn mode(&self) -> &'static str {
        self.dev.mode()
    }

    /// Performs write `N` (or retries it, after a failure). `N` advances only on success.
    pub fn write_next(&mut self) -> io::Result<()> {
        let k = self.writes;
        let attempt = Attempt {
            index: k % self.blocks,
            generation: k / self.blocks + 1,
        };
        self.attempt = Some(attempt);
        write_block(
            &mut self.buf,
            self.fill,
            self.nonce,
            attempt.index,
            attempt.generation,
        );
        match self.dev.write_block(attempt.index, &self.buf) {
            Ok(()) => {
                self.writes = k + 1;
                self.attempt = None;
                Ok(())
            }
            Err(e) => {
                self.failures += 1;
                Err(e)
            }
        }
    }

    /// Test hook: puts the previous generation's (whole, self-consistent) content back into
    /// `index`, as a lost write would leave it. Returns the generation written.
    pub fn make_stale(&mut self, index: u64) -> Result<u64, String> {
        if index >= self.blocks {
            return Err(format!(
                "block {index} out of range (blocks={})",
                self.blocks
            ));
        }
        if self.attempt.is_some_and(|a| a.index == index) {
            return Err(format!("block {index} has a write in doubt"));
        }
        let current = expected_generation(self.writes, self.blocks, index);
        if current == 0 {
            return Err(format!("block {index} not written yet"));
        }
        let stale = current - 1;
        if stale == 0 {
            *self.buf = Page([0; BLOCK_SIZE]);
        } else {
            write_block(&mut self.buf, self.fill, self.nonce, index, stale);
        }
        self.dev
            .write_block(index, &self.buf)
            .map_err(|e| format!("write failed: {e}"))?;
        Ok(stale)
    }

    /// Reads every block and checks it against the generation `N` implies.
    pub fn verify(&mut self) -> DiskReport {
        let mut report = DiskReport {
            checked: 0,
            errors: 0,
            writes: self.writes,
            first_bad: Vec::new(),
            unknown: None,
        };
        let mut chunk: Vec<Page> = Vec::new();
        chunk.resize_with(VERIFY_CHUNK, || Page([0; BLOCK_SIZE]));
        let mut first = 0;
        while first < self.blocks {
            let n = (self.blocks - first).min(VERIFY_CHUNK as u64) as usize;
            if self.dev.read_blocks(first, &mut chunk[..n]).is_ok() {
                for (i, block) in chunk[..n].iter().enumerate() {
                    self.check_one(&mut report, first + i as u64, Some(block));
                }
            } else {
                // Find out which blocks are unreadable, one by one.
                for i in 0..n as u64 {
                    let index = first + i;
                    let ok = self.dev.read_blocks(index, &mut chunk[..1]).is_ok();
                    self.check_one(&mut report, index, ok.then_some(&chunk[0]));
                }
            }
            first += n as u64;
        }
        report
    }

    /// Checks block `index` (`None`: it could not be read) into `report`.
    fn check_one(&self, report: &mut DiskReport, index: u64, block: Option<&Page>) {
        report.checked += 1;
        let expected = expected_generation(self.writes, self.blocks, index);
        let Some(block) = block else {
            report.record(BadBlock {
                index,
                bad: Bad::Unreadable,
                expected,
                found_generation: None,
                found_index: None,
            });
            return;
        };
        let content = inspect(&block.0, self.fill, self.nonce, index);
        let in_doubt = self.attempt.filter(|a| a.index == index);
        let verdict = match in_doubt {
            Some(attempt) => {
                let found = content.generation();
                let landed = if found == Some(attempt.generation) {
                    Some(true)
                } else if found == Some(attempt.generation - 1) {
                    Some(false)
                } else {
                    None
                };
                report.unknown = Some(UnknownOutcome { attempt, landed });
                // Judged against the new generation when it is neither.
                match landed {
                    Some(_) => Ok(()),
                    None => content.judge(attempt.generation).map(|_| ()),
                }
            }
            None => content.judge(expected),
        };
        if let Err(bad) = verdict {
            let (found_generation, found_index) = content.found(index);
            report.record(BadBlock {
                index,
                bad,
                expected: in_doubt.map_or(expected, |a| a.generation),
                found_generation,
                found_index,
            });
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What the next writes to a [`MemDevice`] do.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Fault {
        None,
        /// Fail without touching the block.
        FailBefore,
        /// Store the block, then report failure (the outcome a caller cannot know).
        FailAfter,
    }

    /// A device in memory whose blocks and write faults the test controls.
    pub struct MemDevice {
        pub blocks: Arc<Mutex<Vec<Page>>>,
        pub fault: Arc<Mutex<Fault>>,
        pub unreadable: Arc<Mutex<Option<u64>>>,
    }

    impl BlockDevice for MemDevice {
        fn write_block(&mut self, index: u64, block: &Page) -> io::Result<()> {
            let fault = *self.fault.lock().unwrap();
            if fault != Fault::FailBefore {
                self.blocks.lock().unwrap()[index as usize].0 = block.0;
            }
            match fault {
                Fault::None => Ok(()),
                _ => Err(io::Error::from_raw_os_error(5)),
            }
        }

        fn read_blocks(&mut self, first: u64, buf: &mut [Page]) -> io::Result<()> {
            let bad = *self.unreadable.lock().unwrap();
            if bad.is_some_and(|b| (first..first + buf.len() as u64).contains(&b)) {
                return Err(io::Error::from_raw_os_error(5));
            }
            let blocks = self.blocks.lock().unwrap();
            for (i, page) in buf.iter_mut().enumerate() {
                page.0 = blocks[first as usize + i].0;
            }
            Ok(())
        }

        fn mode(&self) -> &'static str {
            "mem"
        }
    }

    pub struct Handles {
        pub blocks: Arc<Mutex<Vec<Page>>>,
        pub fault: Arc<Mutex<Fault>>,
        pub unreadable: Arc<Mutex<Option<u64>>>,
    }

    pub fn mem_disk(count: usize, fill: Fill) -> (Disk, Handles) {
        let mut v = Vec::new();
        v.resize_with(count, || Page([0; BLOCK_SIZE]));
        let h = Handles {
            blocks: Arc::new(Mutex::new(v)),
            fault: Arc::new(Mutex::new(Fault::None)),
            unreadable: Arc::new(Mutex::new(None)),
        };
        let dev = MemDevice {
            blocks: Arc::clone(&h.blocks),
            fault: Arc::clone(&h.fault),
            unreadable: Arc::clone(&h.unreadable),
        };
        (Disk::new(Box::new(dev), count as u64, 42, fill), h)
    }

    fn write_n(d: &mut Disk, n: u64) {
        for _ in 0..n {
            d.write_next().unwrap();
        }
    }

    #[test]
    fn first_pass_expects_zeros_beyond_the_count() {
        let (mut d, _h) = mem_disk(100, Fill::Pattern);
        let r = d.verify();
        assert_eq!((r.checked, r.errors, r.writes), (100, 0, 0));
        write_n(&mut d, 30);
        let r = d.verify();
        assert_eq!((r.checked, r.errors, r.writes), (100, 0, 30));
        // Over several rounds, with a final partial round; more blocks than one chunk.
        write_n(&mut d, 250);
        assert_eq!(d.writes(), 280);
        let r = d.verify();
        assert_eq!((r.errors, r.unknown), (0, None), "{r:?}");
    }

    #[test]
    fn stale_zero_torn_and_ahead_blocks_are_reported() {
        let (mut d, h) = mem_disk(10, Fill::Random);
        write_n(&mut d, 25); // blocks 0..5 at generation 3, 5..10 at 2
        assert_eq!(d.make_stale(3), Ok(2));
        {
            let mut b = h.blocks.lock().unwrap();
            b[6] = Page([0; BLOCK_SIZE]);
            let other = b[8].0;
            b[7].0[..512].copy_from_slice(&other[..512]); // header of block 8 -> misplaced
            b[9].0[1000] ^= 0xff; // torn
        }
        let mut ahead = Page([0; BLOCK_SIZE]);
        write_block(&mut ahead, Fill::Random, 42, 1, 4);
        h.blocks.lock().unwrap()[1] = ahead;
        let r = d.verify();
        assert_eq!(r.errors, 5, "{r:?}");
        let kinds: Vec<_> = r.first_bad.iter().map(|b| (b.index, b.bad)).collect();
        assert_eq!(
            kinds,
            [
                (1, Bad::Ahead),
                (3, Bad::Stale),
                (6, Bad::Zero),
                (7, Bad::Misplaced),
                (9, Bad::Torn)
            ]
        );
        let stale = r.first_bad[1];
        assert_eq!(
            (stale.expected, stale.found_generation, stale.found_index),
            (3, Some(2), Some(3))
        );
        assert_eq!(r.first_bad[3].found_index, Some(8));
        assert_eq!(r.first_bad[2].found_generation, None);
    }

    #[test]
    fn failed_write_does_not_count_and_is_retried() {
        let (mut d, h) = mem_disk(4, Fill::Pattern);
        write_n(&mut d, 5);
        *h.fault.lock().unwrap() = Fault::FailBefore;
        assert!(d.write_next().is_err());
        assert!(d.write_next().is_err());
        assert_eq!((d.writes(), d.failures()), (5, 2));
        let attempt = Attempt {
            index: 1,
            generation: 2,
        };
        assert_eq!(d.attempt(), Some(attempt));
        let r = d.verify();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(
            r.unknown,
            Some(UnknownOutcome {
                attempt,
                landed: Some(false)
            })
        );
        *h.fault.lock().unwrap() = Fault::None;
        d.write_next().unwrap();
        assert_eq!((d.writes(), d.attempt()), (6, None));
        let r = d.verify();
        assert_eq!((r.errors, r.unknown), (0, None));
    }

    #[test]
    fn unknown_outcome_accepted_both_ways_but_nothing_else() {
        let (mut d, h) = mem_disk(4, Fill::Random);
        write_n(&mut d, 2);
        // The write landed although it reported failure.
        *h.fault.lock().unwrap() = Fault::FailAfter;
        assert!(d.write_next().is_err());
        let r = d.verify();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.unknown.unwrap().landed, Some(true));
        assert_eq!(r.unknown.unwrap().attempt.index, 2);
        // First pass: "old" is zeros.
        h.blocks.lock().unwrap()[2] = Page([0; BLOCK_SIZE]);
        let r = d.verify();
        assert_eq!((r.errors, r.unknown.unwrap().landed), (0, Some(false)));
        // A torn block in doubt is still an error, judged against the new generation.
        let mut torn = Page([0; BLOCK_SIZE]);
        write_block(&mut torn, Fill::Random, 42, 2, 1);
        torn.0[3000] ^= 1;
        h.blocks.lock().unwrap()[2] = torn;
        let r = d.verify();
        assert_eq!(r.errors, 1);
        assert_eq!(r.unknown.unwrap().landed, None);
        assert_eq!(
            (r.first_bad[0].bad, r.first_bad[0].expected),
            (Bad::Torn, 1)
        );
    }

    #[test]
    fn unreadable_blocks_are_pinpointed() {
        let (mut d, h) = mem_disk(130, Fill::Pattern);
        write_n(&mut d, 130);
        *h.unreadable.lock().unwrap() = Some(70);
        let r = d.verify();
        assert_eq!((r.checked, r.errors), (130, 1));
        assert_eq!(
            (r.first_bad[0].index, r.first_bad[0].bad),
            (70, Bad::Unreadable)
        );
    }

    #[test]
    fn report_lists_a_few_and_counts_all() {
        let (mut d, h) = mem_disk(20, Fill::Pattern);
        write_n(&mut d, 20);
        for b in h.blocks.lock().unwrap().iter_mut() {
            b.0[2000] = 7;
        }
        let r = d.verify();
        assert_eq!((r.errors, r.first_bad.len()), (20, MAX_LISTED));
    }

    #[test]
    fn make_stale_limits() {
        let (mut d, _h) = mem_disk(4, Fill::Pattern);
        assert!(d.make_stale(0).is_err());
        write_n(&mut d, 4);
        assert_eq!(d.make_stale(0), Ok(0));
        assert_eq!(d.verify().first_bad[0].bad, Bad::Zero);
        assert!(d.make_stale(4).is_err());
    }
}
