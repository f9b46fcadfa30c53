//! QLoRA's NormalFloat4: 16 levels at quantiles of a normal distribution, scaled by one
//! absmax per block of 64 consecutive weights.
//!
//! With double quantization the absmax values are stored in 8 bits as well: the mean of
//! all absmax values of the matrix is subtracted, and each run of 256 of them keeps one
//! f32 scale with signed 8-bit codes (the QLoRA paper stores the second level in 8-bit
//! floats; a linear 8-bit code is used here, with the same block of 256 and the same
//! ~0.127 bits per weight of overhead).

use crate::error::QuantError;
use crate::pack;

/// The 16 NF4 levels, as bitsandbytes defines them (exact 0 at code 7).
pub const LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Weights per absmax.
pub const BLOCK: usize = 64;
/// Absmax values per second-level scale under double quantization.
pub const DQ_BLOCK: usize = 256;

/// Absmax values stored in 8 bits.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One code per absmax, `code - 128` being the signed value; padded with 128 to a
    /// multiple of [`DQ_BLOCK`].
    pub codes: Vec<u8>,
    /// One f32 scale per [`DQ_BLOCK`] codes.
    pub scales: Vec<f32>,
    /// The mean absmax, added back after scaling.
    pub offset: f32,
}

/// A matrix quantized to NF4 on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Quantized {
    /// `[rows, cols/8]` words, 4-bit codes lowest first (the affine 4-bit layout).
    pub packed: Vec<u32>,
    /// `[rows, cols/64]` absmax values, exact (without double quantization).
    pub absmax: Vec<f32>,
    /// The absmax values in 8 bits, with double quantization.
    pub double_quant: Option<DoubleQuant>,
}

impl Nf4Quantized {
    /// The absmax values as they are used for dequantization.
    pub fn effective_absmax(&self) -> Vec<f32> {
        match &self.double_quant {
            None => self.absmax.clone(),
            Some(dq) => (0..self.absmax.len()).map(|i| (f32::from(dq.codes[i]) - 128.0) * dq.scales[i / DQ_BLOCK] + dq.offset).collect(),
        }
    }
}

/// The nearest NF4 code of `x` in [-1, 1] (ties to the lower level).
pub fn nearest(x: f32) -> u8 {
    let mut best = 0;
    for (i, &l) in LEVELS.iter().enumerate().skip(1) {
        if (x - l).abs() < (x - LEVELS[best]).abs() {
            best = i;
        }
    }
    best as u8
}

/// Quantizes a row-major matrix with `cols` inputs per row (a multiple of 64).
pub fn quantize(w: &[f32], cols: usize, double_quant: bool) -> Result<Nf4Quantized, QuantError> {
    if cols == 0 || !cols.is_multiple_of(BLOCK) || !w.len().is_multiple_of(cols) {
        return Err(QuantError::NotDivisible { cols, group_size: BLOCK });
    }
    use rayon::prelude::*;
    let mut codes = vec![0u8; w.len()];
    let mut absmax = vec![0f32; w.len() / BLOCK];
    // Blocks are independent: quantized in parallel, with the same result as in sequence.
    (w.par_chunks_exact(BLOCK), codes.par_chunks_exact_mut(BLOCK), &mut absmax).into_par_iter().for_each(|(block, out, m_out)| {
        let m = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        *m_out = m;
        for (c, &x) in out.iter_mut().zip(block) {
            *c = if m == 0.0 { 7 } else { nearest(x / m) };
        }
    });
    let double_quant = double_quant.then(|| quantize_absmax(&absmax));
    Ok(Nf4Quantized { packed: pack::pack(&codes, cols, 4), absmax, double_quant })
}

fn quantize_absmax(absmax: &[f32]) -> DoubleQuant {
    let offset = absmax.iter().map(|&a| f64::from(a)).sum::<f64>() as f32 / absmax.len().max(1) as f32;
    let padded = absmax.len().div_ceil(DQ_BLOCK) * DQ_BLOCK;
    let mut codes = vec![128u8; padded];
    let mut scales = Vec::with_capacity(padded / DQ_BLOCK);
    for (b, block) in absmax.chunks(DQ_BLOCK).enumerate() {
        let m = block.iter().fold(0.0f32, |m, a| m.max((a - offset).abs()));
        let s = if m == 0.0 { 1.0 } else { m / 127.0 };
        scales.push(s);
        for (i, &a) in block.iter().enumerate() {
            codes[b * DQ_BLOCK + i] = (((a - offset) / s).round().clamp(-127.0, 127.0) + 128.0) as u8;
        }
    }
    DoubleQuant { codes, scales, offset }
}

/// Dequantizes on the host, row-major `[rows, cols]`.
pub fn dequantize(q: &Nf4Quantized, cols: usize) -> Vec<f32> {
    let absmax = q.effective_absmax();
    pack::unpack(&q.packed, cols, 4).chunks_exact(BLOCK).zip(absmax).flat_map(|(b, m)| b.iter().map(move |&c| LEVELS[c as usize] * m)).collect()
}

/// `x·dequant(W)ᵀ` on the host without a dense `W`: `x` `[m, cols]` -> `[m, rows]`, with
/// `absmax` the effective absmax values (see [`Nf4Quantized::effective_absmax`]).
pub fn matmul_t(x: &[f32], m: usize, packed: &[u32], absmax: &[f32], cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let blocks = cols / BLOCK;
    let rows = absmax.len() / blocks;
    let wpr = pack::words_per_row(cols, 4);
    let mut out_t = vec![0.0f32; rows * m];
    out_t.par_chunks_mut(m).enumerate().for_each(|(r, out)| {
        let words = &packed[r * wpr..(r + 1) * wpr];
        for (i, o) in out.iter_mut().enumerate() {
            let xi = &x[i * cols..(i + 1) * cols];
            let mut acc = 0.0f32;
            for b in 0..blocks {
                let xb = &xi[b * BLOCK..(b + 1) * BLOCK];
                let dot = pack::dot_words4(xb, &words[b * BLOCK / 8..(b + 1) * BLOCK / 8], |c| LEVELS[c as usize]);
                acc += absmax[r * blocks + b] * dot;
            }
            *o = acc;
        }
    });
    (0..m * rows).map(|k| out_t[(k % rows) * m + k / rows]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos() * 0.05
            })
            .collect()
    }

    #[test]
    fn levels_map_to_themselves_and_extremes_are_exact() {
        for (i, &l) in LEVELS.iter().enumerate() {
            assert_eq!(nearest(l) as usize, i);
        }
        let mut w = normal(128, 1);
        w[5] = -0.9;
        let q = quantize(&w, 128, false).unwrap();
        let back = dequantize(&q, 128);
        assert_eq!(back[5], -0.9);
    }

    #[test]
    fn every_weight_goes_to_its_nearest_level() {
        let w = normal(64 * 40, 2);
        let q = quantize(&w, 640, false).unwrap();
        let codes = pack::unpack(&q.packed, 640, 4);
        for (i, (&x, &c)) in w.iter().zip(&codes).enumerate() {
            let m = q.absmax[i / BLOCK];
            let d = (x / m - LEVELS[c as usize]).abs();
            assert!(LEVELS.iter().all(|l| (x / m - l).abs() >= d - 1e-7), "weight {i}");
        }
    }

    #[test]
    fn double_quant_keeps_absmax_close() {
        let w = normal(64 * 600, 3);
        let q = quantize(&w, 640, true).unwrap();
        let dq = q.double_quant.as_ref().unwrap();
        assert_eq!(dq.codes.len(), 768);
        assert_eq!(dq.scales.len(), 3);
        for (a, b) in q.absmax.iter().zip(q.effective_absmax()) {
            assert!((a - b).abs() <= dq.scales.iter().fold(0.0f32, |m, s| m.max(*s)) * 0.5 + 1e-7);
        }
        // NF4's round-trip error on gaussian weights: about 0.1 of the block's absmax at most.
        let back = dequantize(&q, 640);
        let err = w.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 0.03, "{err}");
    }

    #[test]
    fn packed_matmul_equals_dequantize_then_matmul() {
        let (rows, cols, m) = (3, 128, 2);
        let w = normal(rows * cols, 4);
        let x = normal(m * cols, 5);
        let q = quantize(&w, cols, true).unwrap();
        let dense = dequantize(&q, cols);
        let got = matmul_t(&x, m, &q.packed, &q.effective_absmax(), cols);
        for i in 0..m {
            for r in 0..rows {
                let want: f32 = (0..cols).map(|k| x[i * cols + k] * dense[r * cols + k]).sum();
                assert!((got[i * rows + r] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn rejects_rows_not_divisible_by_the_block() {
        assert!(matches!(quantize(&[0.0; 96], 96, false), Err(QuantError::NotDivisible { cols: 96, group_size: 64 })));
    }
}
