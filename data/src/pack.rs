//! Packing: several rows in one sequence, each still on its own.
//!
//! Rows (each cut to the sequence length first) are packed into sequences of at most that
//! length by best-fit decreasing, as TRL's `pack_dataset(strategy="bfd")`: longest row first,
//! each into the sequence it fills most, a new sequence where none has room. A packed sequence
//! records where each row begins ([`Example::starts`]); the model numbers its rows
//! (`Batch::segments`) so that each attends only to itself with its positions from 0, and a row's
//! first token is never a target (nothing of its own predicts it). Every row's loss is then what
//! it is unpacked, and the padding that batches of short rows of different lengths carry is gone.

use std::collections::BTreeSet;

use crate::dataset::Example;

/// `examples` packed into sequences of at most `capacity` tokens, each row cut to `capacity`
/// first. Sequences come in the order they were opened (the longest rows first); rows keep
/// their own targets, shifted, less their first token.
pub fn pack(examples: &[Example], capacity: usize) -> Vec<Example> {
    let capacity = capacity.max(1);
    let len = |i: usize| examples[i].tokens.len().min(capacity);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(len(i)));
    // (room left, sequence): the best fit for a row of n is the first entry at or above (n, 0).
    let mut room: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut bins: Vec<(Vec<usize>, usize)> = Vec::new(); // rows, tokens used
    for i in order {
        let n = len(i);
        let bin = match room.range((n, 0)..).next().copied() {
            Some(entry) => {
                room.remove(&entry);
                entry.1
            }
            None => {
                bins.push((Vec::new(), 0));
                bins.len() - 1
            }
        };
        bins[bin].0.push(i);
        bins[bin].1 += n;
        if bins[bin].1 < capacity {
            room.insert((capacity - bins[bin].1, bin));
        }
    }
    bins.into_iter().map(|(rows, used)| concat(examples, &rows, used, capacity)).collect()
}

/// The rows `rows` of `examples`, each cut to `capacity`, as one sequence of `used` tokens.
fn concat(examples: &[Example], rows: &[usize], used: usize, capacity: usize) -> Example {
    let mut tokens = Vec::with_capacity(used);
    let mut targets = Vec::new();
    let mut starts = Vec::with_capacity(rows.len());
    for &i in rows {
        let ex = &examples[i];
        let n = ex.tokens.len().min(capacity);
        let at = tokens.len();
        starts.push(at);
        tokens.extend_from_slice(&ex.tokens[..n]);
        for r in &ex.targets {
            let (start, end) = (r.start.max(1), r.end.min(n));
            if start < end {
                targets.push(at + start..at + end);
            }
        }
    }
    Example { tokens, targets, starts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, first: u32, offset: usize) -> Example {
        Example::from_offset((first..first + n as u32).collect(), offset)
    }

    #[test]
    fn best_fit_decreasing_fills_sequences_and_keeps_every_row_whole() {
        // Lengths 6, 5, 4, 3, 2 into sequences of 8: 6+2, 5+3, 4.
        let rows: Vec<Example> = [4, 6, 2, 5, 3].iter().enumerate().map(|(i, &n)| row(n, 100 * i as u32, 0)).collect();
        let packed = pack(&rows, 8);
        let lens: Vec<usize> = packed.iter().map(|e| e.tokens.len()).collect();
        assert_eq!(lens, [8, 8, 4]);
        assert_eq!(packed[0].starts, [0, 6]);
        assert_eq!(packed[0].tokens, [100, 101, 102, 103, 104, 105, 200, 201]);
        // Each row's targets, less its first token, shifted to where it lies.
        assert_eq!(packed[0].targets, [1..6, 7..8]);
        let total: usize = packed.iter().map(|e| e.tokens.len()).sum();
        assert_eq!(total, 20, "every token of every row is somewhere");
    }

    #[test]
    fn long_rows_are_cut_and_masked_prompts_keep_their_offset() {
        let rows = vec![row(12, 0, 0), row(4, 50, 2)];
        let packed = pack(&rows, 10);
        assert_eq!(packed.len(), 2);
        assert_eq!(packed[0].tokens.len(), 10, "cut to the sequence length");
        assert_eq!(packed[1].targets, vec![2..4usize]);
        assert_eq!(packed.iter().map(|e| e.targets_within(usize::MAX)).sum::<usize>(), 9 + 2);
    }

    #[test]
    fn packing_is_a_pure_function_of_the_rows() {
        let rows: Vec<Example> = (0..50).map(|i| row(1 + (i * 7) % 13, i as u32, 0)).collect();
        assert_eq!(pack(&rows, 16), pack(&rows, 16));
        assert!(pack(&rows, 16).iter().all(|e| e.tokens.len() <= 16));
    }
}
