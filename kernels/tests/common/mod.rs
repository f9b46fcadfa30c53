//! What the attention tests share: the reference composition and the key flags.

use burn::tensor::{Bool, Tensor, TensorData};
use lora_kernels::attention::key_visible;

/// Key flags `[b, s]` for the tests: row 0 packed with three sequences (flags 1, 2, 3; the
/// last starts at an odd position), every other row one sequence after 3 left pads.
pub fn test_flags(b: usize, s: usize) -> Vec<f32> {
    (0..b * s)
        .map(|i| {
            let (row, p) = (i / s, i % s);
            match row {
                0 => 1.0 + (p >= s / 3) as u8 as f32 + (p > 2 * s / 3) as u8 as f32,
                _ if p < 3 => 0.0,
                _ => 1.0,
            }
        })
        .collect()
}

/// `softmax(q·kᵀ/√d + mask)·v` with every score held, the model's reference path; `keys` the
/// key flags `[b, s]` ([`key_visible`]).
pub fn reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, keys: &[f32], window: Option<usize>) -> Tensor<4> {
    let [b, h, s, d] = q.dims();
    let kv = k.dims()[1];
    let rep = h / kv;
    // Repeat each key/value head for its group of query heads.
    let expand = |t: Tensor<4>| t.unsqueeze_dim::<5>(2).expand([b, kv, rep, s, d]).reshape([b, h, s, d]);
    let (k, v) = (expand(k), expand(v));
    let device = q.device();
    let scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
    let mut flags = Vec::with_capacity(b * s * s);
    for row in 0..b {
        for qi in 0..s {
            for ki in 0..s {
                flags.push(ki > qi || window.is_some_and(|w| qi - ki >= w) || !key_visible(keys[row * s + ki], keys[row * s + qi]));
            }
        }
    }
    let mask = Tensor::<4, Bool>::from_data(TensorData::new(flags, [b, 1, s, s]), &device).expand([b, h, s, s]);
    let probs = burn::tensor::activation::softmax(scores.mask_fill(mask, f32::MIN), 3);
    probs.matmul(v)
}
