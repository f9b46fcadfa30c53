//! The training loss: the sum of the target tokens' negative log-likelihood divided by the
//! number of target tokens in the batch (mlx-lm's and transformers' token average).

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use lora_data::Batch;
use lora_model::CausalLm;

/// Inputs, targets and the target mask of a batch, on `device`.
pub struct Prepared {
    /// `[rows, len - 1]` token ids fed to the model.
    pub inputs: Tensor<2, Int>,
    /// `[rows, len - 1]` the next token at each position.
    pub targets: Tensor<2, Int>,
    /// `[rows, len - 1]` 1 where the target is trained, else 0.
    pub mask: Tensor<2>,
    /// Number of trained targets.
    pub tokens: usize,
}

/// Splits a batch into inputs and shifted targets. Target `j` (the token at position `j`,
/// predicted from position `j - 1`) is trained when `max(offset, 1) <= j < length`.
pub fn prepare(batch: &Batch, device: &burn::tensor::Device) -> Prepared {
    let (rows, len) = (batch.rows, batch.len);
    let width = len.saturating_sub(1).max(1);
    let mut inputs = vec![0i32; rows * width];
    let mut targets = vec![0i32; rows * width];
    let mut mask = vec![0f32; rows * width];
    let mut tokens = 0;
    for r in 0..rows {
        let row = &batch.tokens[r * len..(r + 1) * len];
        for p in 0..width.min(len.saturating_sub(1)) {
            inputs[r * width + p] = row[p] as i32;
            targets[r * width + p] = row[p + 1] as i32;
            let j = p + 1;
            if j >= batch.offsets[r].max(1) && j < batch.lengths[r] {
                mask[r * width + p] = 1.0;
                tokens += 1;
            }
        }
    }
    Prepared {
        inputs: Tensor::from_data(TensorData::new(inputs, [rows, width]), device),
        targets: Tensor::from_data(TensorData::new(targets, [rows, width]), device),
        mask: Tensor::from_data(TensorData::new(mask, [rows, width]), (device, DType::F32)),
        tokens,
    }
}

/// The batch's mean target NLL (a scalar `[1]` tensor, f32, differentiable) and its number of
/// target tokens.
pub fn batch_loss(model: &CausalLm, batch: &Batch) -> (Tensor<1>, usize) {
    let p = prepare(batch, &model.device());
    let [rows, width] = p.inputs.dims();
    let logits = model.forward(p.inputs, None).cast(FloatDType::F32); // [rows, width, vocab]
    let logp = log_softmax(logits, 2);
    let picked = logp.gather(2, p.targets.reshape([rows, width, 1])).reshape([rows, width]); // [rows, width]
    let nll = -(picked * p.mask).sum();
    (nll / p.tokens.max(1) as f64, p.tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_the_offset_and_length() {
        // Two rows: length 4 with the prompt ending at 2; length 3 unmasked; padded to 5.
        let batch = Batch { tokens: vec![1, 2, 3, 4, 0, 5, 6, 7, 0, 0], rows: 2, len: 5, offsets: vec![2, 0], lengths: vec![4, 3], padding: 3 };
        let p = prepare(&batch, &burn::tensor::Device::flex());
        let mask: Vec<f32> = p.mask.into_data().try_to_vec().unwrap();
        // Row 0 trains targets 2 and 3 (positions 1, 2); row 1 targets 1 and 2.
        assert_eq!(mask, [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(p.tokens, 4);
        let targets: Vec<i32> = p.targets.into_data().convert::<i32>().try_to_vec().unwrap();
        assert_eq!(targets, [2, 3, 4, 0, 6, 7, 0, 0]);
    }
}
