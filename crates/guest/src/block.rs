//! The self-checking disk block.
//!
//! A disk that migrates (copied by a mirror job while the guest keeps writing) must arrive with
//! every write the guest saw complete. Each 4 KiB block therefore says what it is:
//!
//! ```text
//! 0   magic "FERRYDSK"   which blocks are ours at all (garbage vs. our format)
//! 8   run nonce          random per boot: a block left by another run (a reused or wrong
//!                        disk) can never pass as this run's
//! 16  index              where the block belongs: a block copied to the wrong place is caught
//! 24  generation         which write of that block this is (see pattern::expected_generation)
//! 32  checksum           FNV-1a of the body
//! 40  body               pure function of (nonce, index, generation), as for memory pages
//! ```
//!
//! The body depends on every header field, so a block assembled from sectors of two different
//! writes (a torn write) fails its checksum whichever sector carries the header.

use crate::pages::{Page, PAGE_SIZE};
use crate::pattern::{body_seed, check_body, fill_body, read_u64, splitmix64, write_u64};
use crate::pattern::{BodyFault, Fill};

/// One block: a guest page, so the same aligned buffer type serves O_DIRECT.
pub const BLOCK_SIZE: usize = PAGE_SIZE;
/// "FERRYDSK" read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"FERRYDSK");
/// Magic, nonce, index, generation, checksum: little-endian u64s.
pub const HEADER_SIZE: usize = 40;

/// What a block read from the disk holds, judged without knowing which generation it should
/// have (see [`Content::judge`] for that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// All zero: never written (or the write was lost).
    Zero,
    /// A whole block of this run, at its place: holds `generation`.
    Valid { generation: u64 },
    /// Not our format at all.
    Garbage,
    /// Our format, written by another run (another boot, or another guest's disk).
    Foreign { nonce: u64 },
    /// A whole header of this run that names another block.
    Misplaced { index: u64, generation: u64 },
    /// Our header at the right place, but the body does not hash to the checksum: parts of two
    /// writes, or damage.
    Torn { generation: u64 },
    /// The checksum matches but the body is not what `generation` must contain.
    Forged { generation: u64 },
}

/// Why a block does not hold what the write count says it must. Names are the wire words of
/// `disk-verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Zeros where a write was acknowledged.
    Zero,
    /// A whole, older generation: an acknowledged write went missing.
    Stale,
    /// A newer generation than any acknowledged write (or data where none was written): the
    /// disk is ahead of the guest's memory.
    Ahead,
    Garbage,
    Foreign,
    Misplaced,
    Torn,
    Forged,
    /// The read itself failed.
    Unreadable,
}

impl Bad {
    pub fn word(self) -> &'static str {
        match self {
            Bad::Zero => "zero",
            Bad::Stale => "stale",
            Bad::Ahead => "ahead",
            Bad::Garbage => "garbage",
            Bad::Foreign => "foreign",
            Bad::Misplaced => "misplaced",
            Bad::Torn => "torn",
            Bad::Forged => "forged",
            Bad::Unreadable => "unreadable",
        }
    }
}

impl Content {
    /// The generation this content holds, if it is a whole block of ours (0 for zeros).
    pub fn generation(self) -> Option<u64> {
        match self {
            Content::Zero => Some(0),
            Content::Valid { generation } => Some(generation),
            _ => None,
        }
    }

    /// Whether this is exactly `expected` (0 = zeros); otherwise why not.
    pub fn judge(self, expected: u64) -> Result<(), Bad> {
        match self {
            Content::Zero if expected == 0 => Ok(()),
            Content::Zero => Err(Bad::Zero),
            Content::Valid { generation } if generation == expected => Ok(()),
            Content::Valid { generation } if generation < expected => Err(Bad::Stale),
            Content::Valid { .. } => Err(Bad::Ahead),
            Content::Garbage => Err(Bad::Garbage),
            Content::Foreign { .. } => Err(Bad::Foreign),
            Content::Misplaced { .. } => Err(Bad::Misplaced),
            Content::Torn { .. } => Err(Bad::Torn),
            Content::Forged { .. } => Err(Bad::Forged),
        }
    }

    /// Generation and index named by the header, where there is one of ours.
    pub fn found(self, at: u64) -> (Option<u64>, Option<u64>) {
        match self {
            Content::Zero | Content::Garbage | Content::Foreign { .. } => (None, None),
            Content::Valid { generation }
            | Content::Torn { generation }
            | Content::Forged { generation } => (Some(generation), Some(at)),
            Content::Misplaced { index, generation } => (Some(generation), Some(index)),
        }
    }
}

/// Body seed: the nonce is folded into the index so that two runs never share a body.
fn seed(nonce: u64, index: u64, generation: u64) -> u64 {
    body_seed(index ^ splitmix64(nonce), generation)
}

/// Writes the block content of `(nonce, index, generation)` into `block`.
pub fn write_block(block: &mut Page, fill: Fill, nonce: u64, index: u64, generation: u64) {
    let b = &mut block.0;
    let sum = fill_body(&mut b[HEADER_SIZE..], fill, seed(nonce, index, generation));
    write_u64(b, 0, MAGIC);
    write_u64(b, 8, nonce);
    write_u64(b, 16, index);
    write_u64(b, 24, generation);
    write_u64(b, 32, sum);
}

/// Classifies the block read from position `index`.
pub fn inspect(block: &[u8; BLOCK_SIZE], fill: Fill, nonce: u64, index: u64) -> Content {
    if block.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    if read_u64(block, 0) != MAGIC {
        return Content::Garbage;
    }
    let found_nonce = read_u64(block, 8);
    if found_nonce != nonce {
        return Content::Foreign { nonce: found_nonce };
    }
    let found_index = read_u64(block, 16);
    let generation = read_u64(block, 24);
    if found_index != index {
        return Content::Misplaced {
            index: found_index,
            generation,
        };
    }
    let seed = seed(nonce, index, generation);
    match check_body(&block[HEADER_SIZE..], fill, seed, read_u64(block, 32)) {
        Ok(()) => Content::Valid { generation },
        Err(BodyFault::Checksum) => Content::Torn { generation },
        Err(BodyFault::Body) => Content::Forged { generation },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::checksum;

    const NONCE: u64 = 0x1234_5678_9abc_def0;

    fn block(fill: Fill, index: u64, generation: u64) -> Page {
        let mut b = Page([0; BLOCK_SIZE]);
        write_block(&mut b, fill, NONCE, index, generation);
        b
    }

    #[test]
    fn written_blocks_inspect_valid() {
        for fill in [Fill::Pattern, Fill::Random] {
            let b = block(fill, 7, 3);
            assert_eq!(&b.0[..8], b"FERRYDSK");
            assert_eq!(
                inspect(&b.0, fill, NONCE, 7),
                Content::Valid { generation: 3 }
            );
            assert_eq!(read_u64(&b.0, 32), checksum(&b.0[HEADER_SIZE..]));
        }
        assert_eq!(
            inspect(&[0; BLOCK_SIZE], Fill::Pattern, NONCE, 7),
            Content::Zero
        );
    }

    #[test]
    fn torn_block_caught_whichever_sector_is_new() {
        let old = block(Fill::Random, 5, 2);
        let new = block(Fill::Random, 5, 3);
        // Header sector new, rest old; and header sector old, last sector new.
        let mut a = Page(old.0);
        a.0[..512].copy_from_slice(&new.0[..512]);
        assert_eq!(
            inspect(&a.0, Fill::Random, NONCE, 5),
            Content::Torn { generation: 3 }
        );
        let mut b = Page(old.0);
        b.0[BLOCK_SIZE - 512..].copy_from_slice(&new.0[BLOCK_SIZE - 512..]);
        assert_eq!(
            inspect(&b.0, Fill::Random, NONCE, 5),
            Content::Torn { generation: 2 }
        );
        // Pattern bodies too: each generation has its own word.
        let old = block(Fill::Pattern, 5, 2);
        let mut c = block(Fill::Pattern, 5, 3);
        c.0[2048..2560].copy_from_slice(&old.0[2048..2560]);
        assert_eq!(
            inspect(&c.0, Fill::Pattern, NONCE, 5),
            Content::Torn { generation: 3 }
        );
    }

    #[test]
    fn other_runs_places_and_garbage() {
        let b = block(Fill::Pattern, 1, 1);
        assert_eq!(
            inspect(&b.0, Fill::Pattern, NONCE + 1, 1),
            Content::Foreign { nonce: NONCE }
        );
        assert_eq!(
            inspect(&b.0, Fill::Pattern, NONCE, 2),
            Content::Misplaced {
                index: 1,
                generation: 1
            }
        );
        let mut g = Page([0; BLOCK_SIZE]);
        g.0[4000] = 1;
        assert_eq!(inspect(&g.0, Fill::Pattern, NONCE, 0), Content::Garbage);
    }

    #[test]
    fn forged_checksum_is_caught() {
        let mut b = block(Fill::Pattern, 4, 9);
        b.0[HEADER_SIZE] ^= 1;
        let sum = checksum(&b.0[HEADER_SIZE..]);
        write_u64(&mut b.0, 32, sum);
        assert_eq!(
            inspect(&b.0, Fill::Pattern, NONCE, 4),
            Content::Forged { generation: 9 }
        );
    }

    #[test]
    fn judging_against_the_expected_generation() {
        let valid = |generation| Content::Valid { generation };
        assert_eq!(Content::Zero.judge(0), Ok(()));
        assert_eq!(Content::Zero.judge(1), Err(Bad::Zero));
        assert_eq!(valid(3).judge(3), Ok(()));
        assert_eq!(valid(2).judge(3), Err(Bad::Stale));
        assert_eq!(valid(4).judge(3), Err(Bad::Ahead));
        assert_eq!(valid(1).judge(0), Err(Bad::Ahead));
        assert_eq!(Content::Torn { generation: 3 }.judge(3), Err(Bad::Torn));
        assert_eq!(Content::Garbage.judge(0), Err(Bad::Garbage));
        assert_eq!(valid(2).generation(), Some(2));
        assert_eq!(Content::Zero.generation(), Some(0));
        assert_eq!(Content::Torn { generation: 2 }.generation(), None);
        assert_eq!(
            Content::Misplaced {
                index: 9,
                generation: 2
            }
            .found(4),
            (Some(2), Some(9))
        );
        assert_eq!(Content::Zero.found(4), (None, None));
    }
}
