//! The self-verifying working set.
//!
//! Live migration must deliver guest memory bit for bit, including pages the guest dirtied
//! after they were first sent. To prove that from inside the guest, every page carries a header
//! `{index, generation, checksum}` and a body that is a pure function of `(index, generation)`.
//! The writer keeps a single counter `N` of page writes done; writes go round-robin, so write
//! `k` stores page `k % pages` with generation `k / pages + 1`. From `N` alone the verifier
//! knows which generation every page must hold, so it catches a page that silently went back to
//! older (but internally consistent) content — exactly what a lost dirty-page resend looks like —
//! and not only a torn page.

use crate::pattern::{
    body_seed, check_body, expected_generation, fill_body, read_u64, write_u64, BodyFault, Fill,
};

/// Size of one page of the working set; equal to the x86 page size so that one of our pages is
/// one guest page (the unit in which migration tracks and resends dirty memory).
pub const PAGE_SIZE: usize = 4096;
/// Header: index, generation, checksum, each a little-endian u64.
pub const HEADER_SIZE: usize = 24;

/// One page, aligned so that it coincides with one guest page.
#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE_SIZE]);

/// Why a page failed verification; the first failing check wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFault {
    /// The header names another page: memory landed at the wrong place.
    Index { found: u64 },
    /// Consistent content but from the wrong generation: a stale (or too new) page.
    Generation { expected: u64, found: u64 },
    /// The body does not hash to the stored checksum: a torn page.
    Checksum,
    /// Hash matched but the body differs from the expected content.
    Body,
}

/// Result of checking the whole working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub checked: u64,
    pub errors: u64,
    pub first_error: Option<u64>,
}

/// Writes page content for `(index, generation)`.
pub fn write_page(page: &mut [u8; PAGE_SIZE], fill: Fill, index: u64, generation: u64) {
    let hash = fill_body(&mut page[HEADER_SIZE..], fill, body_seed(index, generation));
    write_u64(page, 0, index);
    write_u64(page, 8, generation);
    write_u64(page, 16, hash);
}

/// Checks one page against the content expected for `(index, generation)`. Generation 0 means
/// "never written": the page must still be all zero.
pub fn check_page(
    page: &[u8; PAGE_SIZE],
    fill: Fill,
    index: u64,
    generation: u64,
) -> Result<(), PageFault> {
    if generation == 0 {
        return if page.iter().all(|&b| b == 0) {
            Ok(())
        } else {
            Err(PageFault::Generation {
                expected: 0,
                found: read_u64(page, 8),
            })
        };
    }
    let found_index = read_u64(page, 0);
    if found_index != index {
        return Err(PageFault::Index { found: found_index });
    }
    let found_gen = read_u64(page, 8);
    if found_gen != generation {
        return Err(PageFault::Generation {
            expected: generation,
            found: found_gen,
        });
    }
    check_body(
        &page[HEADER_SIZE..],
        fill,
        body_seed(index, generation),
        read_u64(page, 16),
    )
    .map_err(|fault| match fault {
        BodyFault::Checksum => PageFault::Checksum,
        BodyFault::Body => PageFault::Body,
    })
}

/// The working set plus the write counter `N`. Both live in guest RAM on purpose: they are
/// what a migration has to carry over.
pub struct Memory {
    pages: Vec<Page>,
    writes: u64,
    fill: Fill,
}

impl Memory {
    /// A zeroed working set of `count` pages (at least one).
    pub fn new(count: usize, fill: Fill) -> Self {
        let count = count.max(1);
        let mut pages = Vec::new();
        pages.resize_with(count, || Page([0; PAGE_SIZE]));
        Memory {
            pages,
            writes: 0,
            fill,
        }
    }

    pub fn page_count(&self) -> u64 {
        self.pages.len() as u64
    }

    /// Page writes done so far (`N`).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Completed rounds over the whole working set; the initial fill is round 1.
    #[cfg(test)]
    pub fn rounds(&self) -> u64 {
        self.writes / self.page_count()
    }

    /// Performs the next `n` round-robin writes.
    pub fn write_batch(&mut self, n: u64) {
        let count = self.page_count();
        for _ in 0..n {
            let k = self.writes;
            let index = k % count;
            write_page(
                &mut self.pages[index as usize].0,
                self.fill,
                index,
                k / count + 1,
            );
            self.writes = k + 1;
        }
    }

    /// Writes until every page holds at least generation 1.
    pub fn fill_first_round(&mut self) {
        let count = self.page_count();
        if self.writes < count {
            self.write_batch(count - self.writes);
        }
    }

    /// Checks every page against the generation `N` implies.
    pub fn verify(&self) -> VerifyOutcome {
        let count = self.page_count();
        let mut outcome = VerifyOutcome {
            checked: 0,
            errors: 0,
            first_error: None,
        };
        for (i, page) in self.pages.iter().enumerate() {
            let index = i as u64;
            let generation = expected_generation(self.writes, count, index);
            outcome.checked += 1;
            if check_page(&page.0, self.fill, index, generation).is_err() {
                outcome.errors += 1;
                outcome.first_error.get_or_insert(index);
            }
        }
        outcome
    }

    /// Checks a single page; for diagnostics and tests.
    #[cfg(test)]
    pub fn check(&self, index: u64) -> Result<(), PageFault> {
        let count = self.page_count();
        let page = &self.pages[(index % count) as usize];
        check_page(
            &page.0,
            self.fill,
            index,
            expected_generation(self.writes, count, index),
        )
    }

    /// Test hook: puts the previous generation's (self-consistent) content back into a page,
    /// simulating a dirty page the migration failed to resend. Returns the generation written.
    pub fn make_stale(&mut self, index: u64) -> Result<u64, String> {
        let count = self.page_count();
        if index >= count {
            return Err(format!("page {index} out of range (pages={count})"));
        }
        let current = expected_generation(self.writes, count, index);
        if current == 0 {
            return Err(format!("page {index} not written yet"));
        }
        let stale = current - 1;
        write_page(&mut self.pages[index as usize].0, self.fill, index, stale);
        Ok(stale)
    }

    /// Raw access for tests that corrupt pages.
    #[cfg(test)]
    pub fn page_mut(&mut self, index: usize) -> &mut [u8; PAGE_SIZE] {
        &mut self.pages[index].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::checksum;

    #[test]
    fn fill_then_verify_ok_for_both_fills() {
        for fill in [Fill::Pattern, Fill::Random] {
            let mut m = Memory::new(8, fill);
            m.fill_first_round();
            assert_eq!(m.writes(), 8);
            assert_eq!(m.rounds(), 1);
            let v = m.verify();
            assert_eq!((v.checked, v.errors, v.first_error), (8, 0, None));
            m.write_batch(13); // wraps around into the third round
            assert_eq!(m.rounds(), 2);
            assert_eq!(m.verify().errors, 0);
        }
    }

    #[test]
    fn unwritten_pages_verify_as_zero() {
        let mut m = Memory::new(4, Fill::Pattern);
        assert_eq!(m.verify().errors, 0);
        m.write_batch(2);
        assert_eq!(m.verify().errors, 0);
    }

    #[test]
    fn torn_page_is_caught() {
        let mut m = Memory::new(8, Fill::Random);
        m.fill_first_round();
        m.page_mut(3)[HEADER_SIZE + 100] ^= 0x40;
        assert_eq!(m.check(3), Err(PageFault::Checksum));
        let v = m.verify();
        assert_eq!((v.errors, v.first_error), (1, Some(3)));
    }

    #[test]
    fn wrong_body_with_forged_checksum_is_caught() {
        let mut m = Memory::new(2, Fill::Pattern);
        m.fill_first_round();
        let page = m.page_mut(1);
        page[HEADER_SIZE] ^= 1;
        let sum = checksum(&page[HEADER_SIZE..]);
        page[16..24].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(m.check(1), Err(PageFault::Body));
    }

    #[test]
    fn stale_page_is_caught() {
        let mut m = Memory::new(8, Fill::Pattern);
        m.fill_first_round();
        m.write_batch(10);
        assert_eq!(m.make_stale(5), Ok(1));
        assert_eq!(
            m.check(5),
            Err(PageFault::Generation {
                expected: 2,
                found: 1
            })
        );
        let v = m.verify();
        assert_eq!((v.errors, v.first_error), (1, Some(5)));
        // The next write of that page heals it.
        m.write_batch(8);
        assert_eq!(m.verify().errors, 0);
    }

    #[test]
    fn stale_first_generation_and_bad_index() {
        let mut m = Memory::new(4, Fill::Random);
        assert!(m.make_stale(0).is_err());
        m.fill_first_round();
        assert_eq!(m.make_stale(0), Ok(0));
        assert_eq!(m.verify().first_error, Some(0));
        assert!(m.make_stale(4).is_err());
    }

    #[test]
    fn misplaced_page_is_caught() {
        let mut m = Memory::new(4, Fill::Pattern);
        m.fill_first_round();
        let copy = m.page_mut(1).to_owned();
        m.page_mut(2).copy_from_slice(&copy);
        assert_eq!(m.check(2), Err(PageFault::Index { found: 1 }));
    }

    #[test]
    fn pattern_is_compressible_and_random_is_not() {
        let mut a = [0u8; PAGE_SIZE];
        write_page(&mut a, Fill::Pattern, 7, 3);
        assert_eq!(a[HEADER_SIZE..HEADER_SIZE + 8], a[PAGE_SIZE - 8..]);
        let mut b = [0u8; PAGE_SIZE];
        write_page(&mut b, Fill::Random, 7, 3);
        assert_ne!(b[HEADER_SIZE..HEADER_SIZE + 8], b[PAGE_SIZE - 8..]);
        assert_eq!(read_u64(&b, 16), checksum(&b[HEADER_SIZE..]));
    }
}
