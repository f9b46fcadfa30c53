//! Rotary position embeddings, with Llama 3 and linear frequency scaling.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::config::RopeScaling;

/// Llama 3.1's divisor of one inverse frequency `freq`: 1 where the wavelength is shorter
/// than `old / high`, `factor` where it is longer than `old / low`, a smooth blend between.
/// llama.cpp stores these divisors as the `rope_freqs` tensor.
pub fn llama3_divisor(freq: f64, factor: f64, low: f64, high: f64, old: f64) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < old / high {
        1.0
    } else if wavelen > old / low {
        factor
    } else {
        let smooth = (old / wavelen - low) / (high - low);
        1.0 / ((1.0 - smooth) / factor + smooth)
    }
}

/// Rotary frequencies of one model; cos/sin tables are built for the positions in use.
#[derive(Debug, Clone)]
pub struct Rope {
    /// One inverse frequency per pair of dimensions, `[head_dim / 2]`.
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for `head_dim`, base `theta`, and the given scaling, computed as
    /// transformers does (in f32).
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let base = theta as f32;
        let mut inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        match *scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor as f32),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                for f in &mut inv_freq {
                    let freq = *f as f64;
                    *f = (freq / llama3_divisor(freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)) as f32;
                }
            }
        }
        Self { inv_freq }
    }

    /// `cos` and signed `sin` tables for positions `start..start + len`, each `[len, head_dim]`,
    /// the frequency halves repeated as in transformers' `rotate_half` convention; the first
    /// half of `sin` is negated, as `lora_kernels::rope::rotary` takes it.
    pub fn tables(&self, start: usize, len: usize, device: &Device, dtype: DType) -> (Tensor<2>, Tensor<2>) {
        self.tables_at(start..start + len, device, dtype)
    }

    /// [`Rope::tables`] for any positions, one table row each: `[positions, head_dim]`.
    pub fn tables_at(&self, positions: impl ExactSizeIterator<Item = usize>, device: &Device, dtype: DType) -> (Tensor<2>, Tensor<2>) {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        let len = positions.len();
        let mut cos = Vec::with_capacity(len * dim);
        let mut sin = Vec::with_capacity(len * dim);
        for p in positions {
            let pos = p as f32;
            for sign in [-1.0f32, 1.0] {
                for &f in &self.inv_freq {
                    let angle = pos * f;
                    cos.push(angle.cos());
                    sin.push(sign * angle.sin());
                }
            }
        }
        // Converted on the host: an upload in the compute dtype, no cast kernel per step.
        let make = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [len, dim]).convert_dtype(dtype), (device, dtype));
        (make(cos), make(sin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let scaling = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 };
        let plain = Rope::new(128, 500_000.0, &RopeScaling::None);
        let scaled = Rope::new(128, 500_000.0, &scaling);
        // Highest frequency: wavelength 2π < 2048, unchanged.
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        // Lowest frequency: wavelength far above 8192, divided by 8.
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] * 8.0 - plain.inv_freq[last]).abs() < 1e-12);
        // In between, the smoothed value lies between the two.
        let mid = plain
            .inv_freq
            .iter()
            .position(|f| {
                let w = 2.0 * std::f32::consts::PI / f;
                w > 2048.0 && w < 8192.0
            })
            .unwrap();
        assert!(scaled.inv_freq[mid] < plain.inv_freq[mid]);
        assert!(scaled.inv_freq[mid] > plain.inv_freq[mid] / 8.0);
    }
}
