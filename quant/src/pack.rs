//! Packing codes of 2 to 8 bits into u32 words, MLX's layout.
//!
//! Each row is a little-endian bit stream: code `j` occupies bits `j·bits .. (j+1)·bits`
//! of the row, counted from the lowest bit of the first word. For 2, 4 and 8 bits no code
//! crosses a word; for 3, 5 and 6 bits some do. Every 32 codes fill exactly `bits` words,
//! so rows whose length is a multiple of 32 pack without padding.

/// Words needed for `cols` codes of `bits` bits (`cols` a multiple of 32).
pub fn words_per_row(cols: usize, bits: usize) -> usize {
    cols * bits / 32
}

/// Packs `codes` (row-major, `cols` per row, each `< 2^bits`) into words.
pub fn pack(codes: &[u8], cols: usize, bits: usize) -> Vec<u32> {
    debug_assert!(cols.is_multiple_of(32) && codes.len().is_multiple_of(cols));
    let rows = codes.len() / cols;
    let wpr = words_per_row(cols, bits);
    let mut out = vec![0u32; rows * wpr];
    for (row, words) in codes.chunks_exact(cols).zip(out.chunks_exact_mut(wpr)) {
        for (j, &c) in row.iter().enumerate() {
            let bit = j * bits;
            let (w, s) = (bit / 32, bit % 32);
            let c = u64::from(c) << s;
            words[w] |= c as u32;
            if s + bits > 32 {
                words[w + 1] |= (c >> 32) as u32;
            }
        }
    }
    out
}

/// Unpacks one row of `out.len()` codes from its words.
pub fn unpack_row(words: &[u32], bits: usize, out: &mut [u8]) {
    if 32 % bits == 0 {
        let per = 32 / bits;
        let mask = (1u32 << bits) - 1;
        for (w, chunk) in words.iter().zip(out.chunks_exact_mut(per)) {
            for (k, c) in chunk.iter_mut().enumerate() {
                *c = ((w >> (k * bits)) & mask) as u8;
            }
        }
        return;
    }
    let mask = (1u64 << bits) - 1;
    for (j, c) in out.iter_mut().enumerate() {
        let bit = j * bits;
        let (w, s) = (bit / 32, bit % 32);
        let mut v = u64::from(words[w]) >> s;
        if s + bits > 32 {
            v |= u64::from(words[w + 1]) << (32 - s);
        }
        *c = (v & mask) as u8;
    }
}

/// `Σ x[k]·value(codes[k])`, summed in eight lanes so that the compiler vectorizes it.
pub(crate) fn dot_codes(x: &[f32], codes: &[u8], value: impl Fn(u8) -> f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (xc, cc) = (x.chunks_exact(8), codes.chunks_exact(8));
    let tail: f32 = xc.remainder().iter().zip(cc.remainder()).map(|(a, &c)| a * value(c)).sum();
    for (xs, cs) in xc.zip(cc) {
        for l in 0..8 {
            lanes[l] += xs[l] * value(cs[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// [`dot_codes`] straight from 4-bit words: eight codes per word, one per lane.
pub(crate) fn dot_words4(x: &[f32], words: &[u32], value: impl Fn(u32) -> f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    for (xs, &w) in x.chunks_exact(8).zip(words) {
        for l in 0..8 {
            lanes[l] += xs[l] * value((w >> (4 * l)) & 15);
        }
    }
    lanes.iter().sum()
}

/// Unpacks `cols` codes per row from `packed`.
pub fn unpack(packed: &[u32], cols: usize, bits: usize) -> Vec<u8> {
    let wpr = words_per_row(cols, bits);
    let mask = (1u64 << bits) - 1;
    let mut out = Vec::with_capacity(packed.len() / wpr.max(1) * cols);
    for words in packed.chunks_exact(wpr) {
        for j in 0..cols {
            let bit = j * bits;
            let (w, s) = (bit / 32, bit % 32);
            let mut v = u64::from(words[w]) >> s;
            if s + bits > 32 {
                v |= u64::from(words[w + 1]) << (32 - s);
            }
            out.push((v & mask) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_every_width() {
        for bits in [2, 3, 4, 5, 6, 8] {
            let cols = 96;
            let codes: Vec<u8> = (0..3 * cols).map(|i| ((i * 7919 + 13) % (1 << bits)) as u8).collect();
            let packed = pack(&codes, cols, bits);
            assert_eq!(packed.len(), 3 * words_per_row(cols, bits));
            assert_eq!(unpack(&packed, cols, bits), codes, "bits {bits}");
            let mut row = vec![0u8; cols];
            unpack_row(&packed[words_per_row(cols, bits)..2 * words_per_row(cols, bits)], bits, &mut row);
            assert_eq!(row, codes[cols..2 * cols], "bits {bits}");
        }
    }

    #[test]
    fn four_bit_layout_is_lowest_nibble_first() {
        let codes: Vec<u8> = (0..32).map(|i| (i % 16) as u8).collect();
        let packed = pack(&codes, 32, 4);
        assert_eq!(packed[0], 0x7654_3210);
        assert_eq!(packed[1], 0xfedc_ba98);
    }
}
