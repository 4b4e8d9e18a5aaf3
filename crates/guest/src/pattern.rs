//! Self-checking content, shared by memory pages (pages.rs) and disk blocks (block.rs).
//!
//! Both prove the same thing about different media: each unit carries a body that is a pure
//! function of `(index, generation)` plus a checksum of it, and a single write counter `N` says
//! which generation every unit must hold. Keeping the generator, the checksum and the
//! generation model in one place means memory and disk are judged by exactly the same rules.

/// What bodies contain. Pattern bodies compress to almost nothing (they exercise compression
/// and zero-page paths favourably); random bodies are incompressible, the worst case for a
/// migration's bandwidth.
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

/// Why a body failed its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// The body does not hash to the stored checksum: torn (parts of different writes).
    Checksum,
    /// Hash matched but the body differs from the expected content.
    Body,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Generation unit `index` must hold after `writes` round-robin writes over `units` units
/// (0 = never written yet): write `k` stores unit `k % units` with generation
/// `k / units + 1`.
pub fn expected_generation(writes: u64, units: u64, index: u64) -> u64 {
    if units == 0 {
        return 0;
    }
    writes / units + u64::from(index < writes % units)
}

pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Seed of the body of unit `index` at `generation`; never zero, since xorshift would be stuck
/// at zero. Callers that need bodies unique to a run fold a salt into `index`.
pub fn body_seed(index: u64, generation: u64) -> u64 {
    splitmix64(index ^ splitmix64(generation)) | 1
}

/// Generator of the body words for one seed.
struct BodyWords {
    fill: Fill,
    state: u64,
}

impl BodyWords {
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
    body.chunks_exact(8)
        .fold(FNV_OFFSET, |h, c| fnv_step(h, read_u64(c, 0)))
}

/// Fills `body` (a multiple of 8 bytes) with the content of `seed`; returns its checksum.
pub fn fill_body(body: &mut [u8], fill: Fill, seed: u64) -> u64 {
    let mut words = BodyWords { fill, state: seed };
    let mut hash = FNV_OFFSET;
    for chunk in body.chunks_exact_mut(8) {
        let w = words.next_word();
        chunk.copy_from_slice(&w.to_le_bytes());
        hash = fnv_step(hash, w);
    }
    hash
}

/// Checks `body` against the stored checksum and the content of `seed`, in one pass.
pub fn check_body(body: &[u8], fill: Fill, seed: u64, stored_sum: u64) -> Result<(), BodyFault> {
    let mut words = BodyWords { fill, state: seed };
    let mut hash = FNV_OFFSET;
    let mut body_ok = true;
    for chunk in body.chunks_exact(8) {
        let w = read_u64(chunk, 0);
        hash = fnv_step(hash, w);
        body_ok &= w == words.next_word();
    }
    if hash != stored_sum {
        return Err(BodyFault::Checksum);
    }
    if !body_ok {
        return Err(BodyFault::Body);
    }
    Ok(())
}

/// The little-endian u64 at `bytes[at..at + 8]`.
pub fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

pub fn write_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
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
        // writes 0..=9: units 0,1 got three writes, units 2,3 two.
        assert_eq!(expected_generation(10, p, 0), 3);
        assert_eq!(expected_generation(10, p, 1), 3);
        assert_eq!(expected_generation(10, p, 2), 2);
        assert_eq!(expected_generation(10, p, 3), 2);
        assert_eq!(expected_generation(5, 0, 0), 0);
    }

    #[test]
    fn expected_generation_matches_simulation() {
        for units in 1..7u64 {
            let mut gens = vec![0u64; units as usize];
            for k in 0..50u64 {
                gens[(k % units) as usize] = k / units + 1;
                for (i, g) in gens.iter().enumerate() {
                    assert_eq!(expected_generation(k + 1, units, i as u64), *g);
                }
            }
        }
    }

    #[test]
    fn fill_and_check_agree() {
        for fill in [Fill::Pattern, Fill::Random] {
            let mut body = vec![0u8; 512];
            let sum = fill_body(&mut body, fill, body_seed(3, 7));
            assert_eq!(sum, checksum(&body));
            assert_eq!(check_body(&body, fill, body_seed(3, 7), sum), Ok(()));
            assert_eq!(
                check_body(&body, fill, body_seed(3, 8), sum),
                Err(BodyFault::Body)
            );
            body[100] ^= 1;
            assert_eq!(
                check_body(&body, fill, body_seed(3, 7), sum),
                Err(BodyFault::Checksum)
            );
        }
    }
}
