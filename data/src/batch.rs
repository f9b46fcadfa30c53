//! Batches of examples, grouped by token length as mlx-lm's `iterate_batches` groups them, and
//! padded only to the longest sequence of each batch.
//!
//! The examples of global step `step` are a pure function of the step (and the seed), so a
//! run resumed at step `n` sees exactly the batches it would have seen.
//!
//! ```
//! use lora_data::{Batcher, Example, collate};
//!
//! let examples: Vec<Example> = [3, 1, 2, 5]
//!     .iter()
//!     .map(|&n| Example::new(vec![9; n]))
//!     .collect();
//! let lengths: Vec<usize> = examples.iter().map(|e| e.tokens.len()).collect();
//! let batcher = Batcher::new(&lengths, 2, true, 42)?;
//! assert_eq!(batcher.batches_per_epoch(), 2);
//! let batch = collate(&examples, batcher.indices(0), 4);
//! assert_eq!(batch.rows, 2);
//! assert!(batch.lengths == [1, 2] || batch.lengths == [3, 4]);
//! # Ok::<(), lora_data::DataError>(())
//! ```

use std::ops::Range;

use rand::SeedableRng as _;
use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom as _;

use crate::dataset::Example;
use crate::error::DataError;

/// The example indices of every training step.
///
/// With `shuffle` (training, mlx-lm's `iterate_batches`): examples sorted by length (stable),
/// cut into consecutive batches of `batch_size`, the remainder that does not fill a batch
/// dropped; each epoch visits the batches in a random order drawn from `(seed, epoch)` alone.
/// Without `shuffle` (evaluation): file order, consecutive batches, the remainder dropped,
/// the same order every epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batcher {
    batches: Vec<Vec<usize>>,
    shuffle: bool,
    seed: u64,
}

impl Batcher {
    /// Batches over examples of token counts `lengths`.
    pub fn new(lengths: &[usize], batch_size: usize, shuffle: bool, seed: u64) -> Result<Self, DataError> {
        if batch_size == 0 {
            return Err(DataError::ZeroBatchSize);
        }
        if lengths.len() < batch_size {
            return Err(DataError::TooFewExamples { examples: lengths.len(), batch_size });
        }
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        if shuffle {
            order.sort_by_key(|&i| lengths[i]);
        }
        let batches = order.chunks_exact(batch_size).map(<[usize]>::to_vec).collect();
        Ok(Self { batches, shuffle, seed })
    }

    /// Evaluation batches as mlx-lm builds them: examples sorted by length (stable), cut into
    /// consecutive batches of `batch_size`, the remainder dropped, visited in that order.
    pub fn by_length(lengths: &[usize], batch_size: usize) -> Result<Self, DataError> {
        let sorted = Self::new(lengths, batch_size, true, 0)?;
        Ok(Self { shuffle: false, ..sorted })
    }

    /// Batches in one pass over the data: `examples / batch_size`, rounded down.
    pub fn batches_per_epoch(&self) -> usize {
        self.batches.len()
    }

    /// The example indices of global step `step` (0-based); its epoch is
    /// `step / batches_per_epoch()`.
    pub fn indices(&self, step: usize) -> &[usize] {
        let n = self.batches.len();
        let (epoch, position) = (step / n, step % n);
        let batch = if self.shuffle { self.epoch_order(epoch as u64)[position] } else { position };
        &self.batches[batch]
    }

    /// The order in which epoch `epoch` visits the batches: a permutation of
    /// `0..batches_per_epoch()` that depends only on the seed and the epoch (the identity
    /// without `shuffle`).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.batches.len()).collect();
        if self.shuffle {
            // Xoshiro256++ rather than StdRng: its output is fixed by its name, not by the
            // rand release.
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            order.shuffle(&mut rng);
        }
        order
    }
}

/// Examples padded into one `[rows, len]` array.
///
/// The model reads `tokens[r, ..len - 1]` and predicts `tokens[r, 1..]`. Target token `j` of
/// row `r` (`1 <= j < len`) is trained on iff `j < lengths[r]` and `j` lies in one of
/// `targets[r]`: for a masked prompt mlx-lm's `steps >= offset && steps < length` mask, which
/// also leaves out the padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, `[rows, len]` row-major, padded with 0.
    pub tokens: Vec<u32>,
    /// Sequences in the batch.
    pub rows: usize,
    /// Positions per row: the longest truncated sequence.
    pub len: usize,
    /// Per row, the token ranges trained on ([`Example::targets`], not truncated).
    pub targets: Vec<Vec<Range<usize>>>,
    /// Per row, where each sequence packed into it begins ([`Example::starts`]); all empty
    /// without packing.
    pub starts: Vec<Vec<usize>>,
    /// Per row, the sequence's token count after truncation.
    pub lengths: Vec<usize>,
    /// Padded positions: `rows * len - sum(lengths)`.
    pub padding: usize,
}

/// The examples at `indices`, each cut to `max_seq_length` tokens and padded with 0 to the
/// longest of them.
///
/// # Panics
///
/// If an index is out of range of `examples`.
pub fn collate(examples: &[Example], indices: &[usize], max_seq_length: usize) -> Batch {
    let lengths: Vec<usize> = indices.iter().map(|&i| examples[i].tokens.len().min(max_seq_length)).collect();
    let rows = indices.len();
    let len = lengths.iter().copied().max().unwrap_or(0);
    let mut tokens = vec![0; rows * len]; // [rows, len]
    for (row, (&i, &n)) in indices.iter().zip(&lengths).enumerate() {
        tokens[row * len..row * len + n].copy_from_slice(&examples[i].tokens[..n]);
    }
    let targets = indices.iter().map(|&i| examples[i].targets.clone()).collect();
    let starts = indices.iter().map(|&i| examples[i].starts.clone()).collect();
    let padding = rows * len - lengths.iter().sum::<usize>();
    Batch { tokens, rows, len, targets, starts, lengths, padding }
}

/// The lengths of the pairs of preference examples (chosen, rejected, chosen, ...): each
/// pair's longer one. Batches of pairs are cut by these.
pub fn pair_lengths(examples: &[Example]) -> Vec<usize> {
    examples.chunks(2).map(|pair| pair.iter().map(|e| e.tokens.len()).max().unwrap_or(0)).collect()
}

/// The rows of the pairs `pairs` (indices of pairs), the chosen ones first, then the rejected
/// ones in the same order: the order a preference batch is collated in.
pub fn pair_rows(pairs: &[usize]) -> Vec<usize> {
    pairs.iter().map(|&p| 2 * p).chain(pairs.iter().map(|&p| 2 * p + 1)).collect()
}

/// Examples longer than `max_seq_length` tokens, which [`collate`] truncates.
pub fn count_too_long(examples: &[Example], max_seq_length: usize) -> usize {
    examples.iter().filter(|e| e.tokens.len() > max_seq_length).count()
}

/// Examples left with no target once [`collate`] cuts them to `max_seq_length` tokens: the
/// masked prompt reaches the cut.
pub fn count_without_targets(examples: &[Example], max_seq_length: usize) -> usize {
    examples.iter().filter(|e| e.targets_within(max_seq_length) == 0).count()
}

impl Batch {
    /// Whether any row holds several packed sequences.
    pub fn is_packed(&self) -> bool {
        self.starts.iter().any(|s| !s.is_empty())
    }

    /// The sequence number of each of the first `width` positions of every row, `[rows, width]`
    /// row-major: 1, 2, ... for the sequences packed into the row (1 for an unpacked row's
    /// tokens), 0 past the row's tokens.
    pub fn segments(&self, width: usize) -> Vec<u32> {
        let mut out = vec![0u32; self.rows * width];
        for (r, starts) in self.starts.iter().enumerate() {
            let row = &mut out[r * width..(r + 1) * width];
            for (p, g) in row.iter_mut().enumerate().take(self.lengths[r]) {
                *g = starts.iter().filter(|&&s| s <= p).count().max(1) as u32;
            }
        }
        out
    }

    /// Target token `j` of row `r` is trained on (`1 <= j < lengths[r]`, inside one of the
    /// row's target ranges).
    pub fn is_target(&self, r: usize, j: usize) -> bool {
        j >= 1 && j < self.lengths[r] && self.targets[r].iter().any(|t| t.contains(&j))
    }
}

/// The share of padded positions over one epoch of `batcher`'s batches, in `[0, 1]`.
pub fn padding_fraction(examples: &[Example], batcher: &Batcher, max_seq_length: usize) -> f64 {
    let (mut padded, mut total) = (0usize, 0usize);
    for batch in &batcher.batches {
        let lengths = batch.iter().map(|&i| examples[i].tokens.len().min(max_seq_length));
        let longest = lengths.clone().max().unwrap_or(0);
        let positions = batch.len() * longest;
        padded += positions - lengths.sum::<usize>();
        total += positions;
    }
    if total == 0 { 0.0 } else { padded as f64 / total as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(lengths: &[usize]) -> Vec<Example> {
        lengths.iter().enumerate().map(|(i, &n)| Example::from_offset((0..n as u32).map(|t| 100 * (i as u32 + 1) + t).collect(), i)).collect()
    }

    /// Every batch of one epoch, in the order the steps visit them.
    fn epoch(batcher: &Batcher, epoch: usize) -> Vec<Vec<usize>> {
        let n = batcher.batches_per_epoch();
        (epoch * n..(epoch + 1) * n).map(|step| batcher.indices(step).to_vec()).collect()
    }

    #[test]
    fn shuffled_batches_are_length_sorted_buckets_without_the_remainder() {
        let lengths = [5, 1, 4, 1, 3, 2, 9];
        let batcher = Batcher::new(&lengths, 2, true, 7).unwrap();
        assert_eq!(batcher.batches_per_epoch(), 3);
        // Sorted (stable): 1:1 3:1 5:2 4:3 2:4 0:5 6:9; the longest, 6, is left over.
        assert_eq!(batcher.batches, vec![vec![1, 3], vec![5, 4], vec![2, 0]]);
        for e in 0..4 {
            let mut seen = epoch(&batcher, e);
            seen.sort();
            assert_eq!(seen, vec![vec![1, 3], vec![2, 0], vec![5, 4]], "epoch {e} visits each batch once");
        }
    }

    #[test]
    fn epoch_order_depends_on_seed_and_epoch_and_nothing_else() {
        let lengths: Vec<usize> = (0..64).collect();
        let a = Batcher::new(&lengths, 1, true, 1).unwrap();
        let again = Batcher::new(&lengths, 1, true, 1).unwrap();
        let other_seed = Batcher::new(&lengths, 1, true, 2).unwrap();
        for e in 0..3 {
            let order = a.epoch_order(e);
            assert_eq!(order, again.epoch_order(e), "reproducible");
            assert_ne!(order, other_seed.epoch_order(e), "seed matters");
            assert_ne!(order, a.epoch_order(e + 1), "epoch matters");
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..64).collect::<Vec<_>>(), "a permutation");
            // Step -> (epoch, position) -> batch.
            for (position, &b) in order.iter().enumerate() {
                assert_eq!(a.indices(e as usize * 64 + position), &[b][..]);
            }
        }
    }

    /// Regression guard: resuming a checkpoint needs the same order from the same seed, so a
    /// change of generator or shuffle algorithm (a rand upgrade) must show up here.
    #[test]
    fn epoch_order_is_pinned_for_resume() {
        let batcher = Batcher::new(&[1; 8], 1, true, 0).unwrap();
        assert_eq!(batcher.epoch_order(0), PINNED_SEED0_EPOCH0);
        assert_eq!(batcher.epoch_order(1), PINNED_SEED0_EPOCH1);
    }
    const PINNED_SEED0_EPOCH0: [usize; 8] = [3, 0, 5, 4, 6, 1, 2, 7];
    const PINNED_SEED0_EPOCH1: [usize; 8] = [2, 3, 6, 4, 5, 7, 0, 1];

    #[test]
    fn unshuffled_batches_keep_file_order_every_epoch() {
        let batcher = Batcher::new(&[5, 1, 4, 1, 3], 2, false, 7).unwrap();
        assert_eq!(batcher.batches_per_epoch(), 2);
        assert_eq!(epoch(&batcher, 0), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(epoch(&batcher, 3), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(batcher.epoch_order(5), vec![0, 1]);
    }

    #[test]
    fn too_few_examples_or_zero_batch_size_are_errors() {
        let err = Batcher::new(&[1, 2, 3], 4, true, 0).unwrap_err().to_string();
        assert_eq!(err, "the dataset has 3 examples, fewer than batch_size 4");
        assert!(matches!(Batcher::new(&[1], 0, false, 0), Err(DataError::ZeroBatchSize)));
        assert_eq!(Batcher::new(&[1, 2, 3], 3, false, 0).unwrap().batches_per_epoch(), 1);
    }

    #[test]
    fn collate_truncates_and_pads_to_the_longest_row() {
        let ex = examples(&[3, 6, 1]);
        let batch = collate(&ex, &[1, 0, 2], 4);
        assert_eq!((batch.rows, batch.len), (3, 4));
        assert_eq!(batch.lengths, vec![4, 3, 1]);
        assert_eq!(batch.targets, vec![vec![1..6], vec![0..3], vec![1..1]]);
        assert_eq!(batch.padding, 12 - 8);
        #[rustfmt::skip]
        assert_eq!(batch.tokens, vec![
            200, 201, 202, 203,
            100, 101, 102, 0,
            300, 0, 0, 0,
        ]);
        // No rounding up: the longest row sets the width.
        let short = collate(&ex, &[0, 2], 100);
        assert_eq!((short.len, short.padding, short.tokens.len()), (3, 2, 6));
    }

    #[test]
    fn too_long_count_and_padding_fraction() {
        let ex = examples(&[1, 6, 2, 5]);
        let lengths: Vec<usize> = ex.iter().map(|e| e.tokens.len()).collect();
        assert_eq!(count_too_long(&ex, 4), 2);
        assert_eq!(count_too_long(&ex, 6), 0);
        // Sorted: [0:1, 2:2], [3:5, 1:6]: padding 1 + 1 of 2*2 + 2*6.
        let sorted = Batcher::new(&lengths, 2, true, 0).unwrap();
        assert_eq!(padding_fraction(&ex, &sorted, 100), 2.0 / 16.0);
        // Cut to 4: [1, 2], [4, 4]: padding 1 of 4 + 8.
        assert_eq!(padding_fraction(&ex, &sorted, 4), 1.0 / 12.0);
        // File order: [0:1, 1:6], [2:2, 3:5]: padding 5 + 3 of 12 + 10.
        let in_order = Batcher::new(&lengths, 2, false, 0).unwrap();
        assert_eq!(padding_fraction(&ex, &in_order, 100), 8.0 / 22.0);
    }
}
