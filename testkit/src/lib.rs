//! What the workspace's tests share (a dev-dependency only): the path of the repository's
//! fixtures and the fuzz targets' case budget, mutations and strategies (issue 14, "Fuzzing
//! and hostile files").

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

/// `tests/fixtures/<name>` of the repository.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// A fuzz target's budget: `LORA_FUZZ_CASES` cases (default `cases`) drawn from the seed
/// `LORA_FUZZ_SEED` (default fixed, so every CI run tries the same inputs); a longer local run
/// raises the count and varies the seed.
pub fn budget(cases: u32) -> Config {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = var("LORA_FUZZ_CASES").map_or(cases, |c| c.min(u64::from(u32::MAX)) as u32);
    Config { cases, rng_seed: RngSeed::Fixed(var("LORA_FUZZ_SEED").unwrap_or(0x10ca)), failure_persistence: None, ..Config::default() }
}

/// `bytes` with each `(position, byte)` of `edits` written (positions folded into the first
/// `window` bytes), then `insert`'s bytes put at its position (folded into the length), then
/// cut to `cut` bytes (folded likewise) when given.
pub fn mutate(bytes: &[u8], edits: &[(usize, u8)], window: usize, insert: Option<&(usize, Vec<u8>)>, cut: Option<usize>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(at, b) in edits {
        let n = window.min(out.len()).max(1);
        if let Some(slot) = out.get_mut(at % n) {
            *slot = b;
        }
    }
    if let Some((at, more)) = insert {
        let at = at % (out.len() + 1);
        out.splice(at..at, more.iter().copied());
    }
    if let Some(cut) = cut {
        out.truncate(cut % (out.len() + 1));
    }
    out
}

/// Between `count.start` and `count.end - 1` overwrites: `(position, byte)`.
pub fn edits(count: std::ops::Range<usize>) -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>()), count)
}

/// A position and up to `max - 1` bytes drawn from `alphabet`, for [`mutate`]'s `insert`.
pub fn insert(alphabet: &'static [u8], max: usize) -> impl Strategy<Value = (usize, Vec<u8>)> {
    (any::<usize>(), prop::collection::vec(prop::sample::select(alphabet.to_vec()), 0..max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_in_their_window_and_fold_their_positions() {
        let bytes = b"abcdef";
        assert_eq!(mutate(bytes, &[(7, b'X')], 3, None, None), b"aXcdef");
        assert_eq!(mutate(bytes, &[(1, b'X')], usize::MAX, Some(&(13, b"12".to_vec())), Some(4)), b"aXcd");
        assert_eq!(mutate(bytes, &[], 6, Some(&(2, b"-".to_vec())), None), b"ab-cdef");
        assert_eq!(mutate(b"", &[(5, b'X')], 6, None, Some(9)), b"");
    }
}
