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

/// Size of one page of the working set; equal to the x86 page size so that one of our pages is
/// one guest page (the unit in which migration tracks and resends dirty memory).
pub const PAGE_SIZE: usize = 4096;
/// Header: index, generation, checksum, each a little-endian u64.
pub const HEADER_SIZE: usize = 24;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// What page bodies contain. Pattern bodies compress to almost nothing (they exercise
/// compression and zero-page paths favourably); random bodies are incompressible, the worst case
/// for a migration's bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Pattern,
    Random,
}

impl Fill {
    /// Name as used on the kernel command line (`ferry.fill=`).
    pub fn name(self) -> &'static str {
        match self {
            Fill::Pattern => "pattern",
            Fill::Random => "random",
        }
    }
}

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

/// Generation page `index` must hold after `writes` round-robin writes over `pages` pages
/// (0 = never written yet).
pub fn expected_generation(writes: u64, pages: u64, index: u64) -> u64 {
    if pages == 0 {
        return 0;
    }
    writes / pages + u64::from(index < writes % pages)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Seed of a page's body; never zero, since xorshift would be stuck at zero.
fn seed(index: u64, generation: u64) -> u64 {
    splitmix64(index ^ splitmix64(generation)) | 1
}

/// Generator of the body words of page `(index, generation)`.
struct BodyWords {
    fill: Fill,
    state: u64,
}

impl BodyWords {
    fn new(fill: Fill, index: u64, generation: u64) -> Self {
        BodyWords {
            fill,
            state: seed(index, generation),
        }
    }

    #[inline]
    fn next_word(&mut self) -> u64 {
        match self.fill {
            Fill::Pattern => self.state,
            Fill::Random => {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                x
            }
        }
    }
}

#[inline]
fn fnv_step(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(FNV_PRIME)
}

/// FNV-1a over the body's little-endian 64-bit words (word-wise rather than byte-wise: eight
/// times fewer multiplications, which matters under TCG emulation).
#[cfg(test)]
pub fn checksum(body: &[u8]) -> u64 {
    body.chunks_exact(8).fold(FNV_OFFSET, |h, c| {
        fnv_step(h, u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
    })
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Writes page content for `(index, generation)`.
pub fn write_page(page: &mut [u8; PAGE_SIZE], fill: Fill, index: u64, generation: u64) {
    let mut words = BodyWords::new(fill, index, generation);
    let mut hash = FNV_OFFSET;
    for chunk in page[HEADER_SIZE..].chunks_exact_mut(8) {
        let w = words.next_word();
        chunk.copy_from_slice(&w.to_le_bytes());
        hash = fnv_step(hash, w);
    }
    page[0..8].copy_from_slice(&index.to_le_bytes());
    page[8..16].copy_from_slice(&generation.to_le_bytes());
    page[16..24].copy_from_slice(&hash.to_le_bytes());
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
    let stored_sum = read_u64(page, 16);
    let mut words = BodyWords::new(fill, index, generation);
    let mut hash = FNV_OFFSET;
    let mut body_ok = true;
    for chunk in page[HEADER_SIZE..].chunks_exact(8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        hash = fnv_step(hash, w);
        body_ok &= w == words.next_word();
    }
    if hash != stored_sum {
        return Err(PageFault::Checksum);
    }
    if !body_ok {
        return Err(PageFault::Body);
    }
    Ok(())
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

    #[test]
    fn expected_generation_counts_round_robin_with_wrap() {
        let p = 4;
        assert_eq!(expected_generation(0, p, 0), 0);
        assert_eq!(expected_generation(1, p, 0), 1);
        assert_eq!(expected_generation(1, p, 1), 0);
        assert_eq!(expected_generation(4, p, 3), 1);
        // writes 0..=9: pages 0,1 got three writes, pages 2,3 two.
        assert_eq!(expected_generation(10, p, 0), 3);
        assert_eq!(expected_generation(10, p, 1), 3);
        assert_eq!(expected_generation(10, p, 2), 2);
        assert_eq!(expected_generation(10, p, 3), 2);
        assert_eq!(expected_generation(5, 0, 0), 0);
    }

    #[test]
    fn expected_generation_matches_simulation() {
        for pages in 1..7u64 {
            let mut gens = vec![0u64; pages as usize];
            for k in 0..50u64 {
                gens[(k % pages) as usize] = k / pages + 1;
                for (i, g) in gens.iter().enumerate() {
                    assert_eq!(expected_generation(k + 1, pages, i as u64), *g);
                }
            }
        }
    }

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
