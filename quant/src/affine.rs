//! MLX's affine quantization: per group of `group_size` consecutive inputs,
//! `w ≈ scale·q + bias` with `q` in `0 .. 2^bits`.
//!
//! [`quantize`] reproduces `mlx.core.quantize` exactly: the group's range is anchored on
//! its endpoint of larger magnitude so that value is represented exactly (the scale is
//! negative when that endpoint is the maximum), codes are rounded half to even, and all
//! arithmetic is f32. Scales and biases come out in f32; MLX then stores them in the
//! weight's dtype, which the caller does by rounding them the same way.

use crate::error::QuantError;
use crate::pack;

/// Supported bit widths, as MLX's affine mode.
pub const BITS: [usize; 6] = [2, 3, 4, 5, 6, 8];
/// Supported group sizes.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Bits and group size of an affine quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AffineSpec {
    /// Bits per weight: 2, 3, 4, 5, 6 or 8.
    pub bits: usize,
    /// Consecutive inputs sharing one scale and bias: 32, 64 or 128.
    pub group_size: usize,
}

impl AffineSpec {
    /// Checks `bits` and `group_size` against what is supported.
    pub fn new(bits: usize, group_size: usize) -> Result<Self, QuantError> {
        if !BITS.contains(&bits) {
            return Err(QuantError::UnsupportedBits { bits, supported: "2, 3, 4, 5, 6, 8" });
        }
        if !GROUP_SIZES.contains(&group_size) {
            return Err(QuantError::UnsupportedGroupSize { group_size, supported: "32, 64, 128" });
        }
        Ok(Self { bits, group_size })
    }

    /// Whether a matrix with `cols` inputs can be quantized with this group size.
    pub fn fits(&self, cols: usize) -> bool {
        cols > 0 && cols.is_multiple_of(self.group_size)
    }
}

impl Default for AffineSpec {
    /// 4 bits, group 64: mlx-lm's default.
    fn default() -> Self {
        Self { bits: 4, group_size: 64 }
    }
}

/// A matrix quantized on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineQuantized {
    /// `[rows, cols·bits/32]` words, MLX's layout.
    pub packed: Vec<u32>,
    /// `[rows, cols/group_size]`.
    pub scales: Vec<f32>,
    /// `[rows, cols/group_size]`.
    pub biases: Vec<f32>,
}

/// Quantizes a row-major matrix with `cols` inputs per row, as `mlx.core.quantize`.
pub fn quantize(w: &[f32], cols: usize, spec: AffineSpec) -> Result<AffineQuantized, QuantError> {
    if !spec.fits(cols) || !w.len().is_multiple_of(cols) {
        return Err(QuantError::NotDivisible { cols, group_size: spec.group_size });
    }
    use rayon::prelude::*;
    let n_bins = ((1u32 << spec.bits) - 1) as f32;
    let eps = 1e-7f32;
    let groups = w.len() / spec.group_size;
    let mut codes = vec![0u8; w.len()];
    let mut scales = vec![0f32; groups];
    let mut biases = vec![0f32; groups];
    // Groups are independent: quantized in parallel, with the same result as in sequence.
    (w.par_chunks_exact(spec.group_size), codes.par_chunks_exact_mut(spec.group_size), &mut scales, &mut biases).into_par_iter().for_each(
        |(g, out, scale_out, bias_out)| {
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            for &x in g {
                lo = lo.min(x);
                hi = hi.max(x);
            }
            let anchor_min = lo.abs() > hi.abs();
            let mut scale = ((hi - lo) / n_bins).max(eps);
            if !anchor_min {
                scale = -scale;
            }
            let edge = if anchor_min { lo } else { hi };
            let q0 = (edge / scale).round_ties_even();
            let mut bias = 0.0;
            if q0 != 0.0 {
                scale = edge / q0;
                bias = edge;
            }
            for (c, &x) in out.iter_mut().zip(g) {
                *c = ((x - bias) / scale).round_ties_even().clamp(0.0, n_bins) as u8;
            }
            *scale_out = scale;
            *bias_out = bias;
        },
    );
    Ok(AffineQuantized { packed: pack::pack(&codes, cols, spec.bits), scales, biases })
}

/// Dequantizes on the host: `scale·q + bias`, row-major `[rows, cols]`.
pub fn dequantize(packed: &[u32], scales: &[f32], biases: &[f32], cols: usize, spec: AffineSpec) -> Vec<f32> {
    let codes = pack::unpack(packed, cols, spec.bits);
    codes.chunks_exact(spec.group_size).zip(scales.iter().zip(biases)).flat_map(|(g, (&s, &b))| g.iter().map(move |&q| s * f32::from(q) + b)).collect()
}

/// `x·dequant(W)ᵀ` on the host without a dense `W`: `x` is `[m, cols]`, the result
/// `[m, rows]`. Each group contributes `scale·Σ x·q + bias·Σ x`, so codes are read once,
/// straight from the packed words. Parallel over the rows of `W`.
pub fn matmul_t(x: &[f32], m: usize, q: &AffineQuantized, cols: usize, spec: AffineSpec) -> Vec<f32> {
    use rayon::prelude::*;
    let g = spec.group_size;
    let groups = cols / g;
    let rows = q.scales.len() / groups;
    let wpr = pack::words_per_row(cols, spec.bits);
    // Σ x over each group, per row of x.
    let xsum: Vec<f32> = x.chunks_exact(g).map(|c| c.iter().sum()).collect();
    let mut out_t = vec![0.0f32; rows * m]; // [rows, m]
    out_t.par_chunks_mut(m).enumerate().for_each_init(
        || vec![0u8; cols],
        |codes, (r, out)| {
            let words = &q.packed[r * wpr..(r + 1) * wpr];
            // 4 bits, the common case, reads the words directly; other widths unpack first.
            let four = spec.bits == 4;
            if !four {
                pack::unpack_row(words, spec.bits, codes);
            }
            for (i, o) in out.iter_mut().enumerate() {
                let xi = &x[i * cols..(i + 1) * cols];
                let mut acc = 0.0f32;
                for j in 0..groups {
                    let xg = &xi[j * g..(j + 1) * g];
                    let dot = if four {
                        pack::dot_words4(xg, &words[j * g / 8..(j + 1) * g / 8], |c| c as f32)
                    } else {
                        pack::dot_codes(xg, &codes[j * g..(j + 1) * g], f32::from)
                    };
                    acc += q.scales[r * groups + j] * dot + q.biases[r * groups + j] * xsum[i * groups + j];
                }
                *o = acc;
            }
        },
    );
    let mut out = vec![0.0f32; m * rows];
    for r in 0..rows {
        for i in 0..m {
            out[i * rows + r] = out_t[r * m + i];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_bits_and_groups_list_the_supported_ones() {
        let e = AffineSpec::new(7, 64).unwrap_err().to_string();
        assert!(e.contains("7") && e.contains("2, 3, 4, 5, 6, 8"), "{e}");
        let e = AffineSpec::new(4, 48).unwrap_err().to_string();
        assert!(e.contains("48") && e.contains("32, 64, 128"), "{e}");
    }

    #[test]
    fn the_larger_magnitude_endpoint_is_exact() {
        let spec = AffineSpec::new(4, 32).unwrap();
        let mut w: Vec<f32> = (0..32).map(|i| i as f32 * 0.01 - 0.05).collect();
        w[7] = -1.3;
        let q = quantize(&w, 32, spec).unwrap();
        let back = dequantize(&q.packed, &q.scales, &q.biases, 32, spec);
        assert_eq!(back[7], -1.3);
        assert!(q.scales[0] > 0.0);
    }

    #[test]
    fn packed_matmul_equals_dequantize_then_matmul() {
        for bits in BITS {
            let spec = AffineSpec::new(bits, 32).unwrap();
            let (rows, cols, m) = (5, 96, 3);
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5) * 0.4).collect();
            let x: Vec<f32> = (0..m * cols).map(|i| ((i * 104_729 % 1009) as f32 / 1009.0 - 0.45) * 2.0).collect();
            let q = quantize(&w, cols, spec).unwrap();
            let dense = dequantize(&q.packed, &q.scales, &q.biases, cols, spec);
            let got = matmul_t(&x, m, &q, cols, spec);
            for i in 0..m {
                for r in 0..rows {
                    let want: f32 = (0..cols).map(|k| x[i * cols + k] * dense[r * cols + k]).sum();
                    assert!((got[i * rows + r] - want).abs() < 1e-4, "bits {bits}: {} vs {want}", got[i * rows + r]);
                }
            }
        }
    }

    #[test]
    fn rejects_inputs_not_divisible_by_the_group() {
        let spec = AffineSpec::new(4, 64).unwrap();
        assert!(matches!(quantize(&[0.0; 96], 96, spec), Err(QuantError::NotDivisible { cols: 96, .. })));
    }
}
