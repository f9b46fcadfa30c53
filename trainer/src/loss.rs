//! The training loss: the sum of the target tokens' negative log-likelihood divided by the
//! number of target tokens in the batch (mlx-lm's and transformers' token average).

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use lora_data::Batch;
use lora_kernels::xent::cross_entropy;
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
    /// For packed rows, `[rows, len - 1]` the sequence number of each input position
    /// ([`Batch::segments`]); `None` otherwise.
    pub segments: Option<Vec<u32>>,
}

impl Prepared {
    /// The model's embedding of the inputs and what its blocks share ([`CausalLm::embed`], or
    /// [`CausalLm::embed_packed`] for packed rows).
    pub(crate) fn embed(&self, model: &CausalLm) -> (Tensor<3>, lora_model::BlockInputs) {
        match &self.segments {
            Some(segments) => model.embed_packed(self.inputs.clone(), segments),
            None => model.embed(self.inputs.clone(), None),
        }
    }

    /// The last block's output `[rows, len - 1, hidden]` ([`CausalLm::hidden`], or
    /// [`CausalLm::hidden_packed`] for packed rows).
    pub(crate) fn hidden(&self, model: &CausalLm) -> Tensor<3> {
        match &self.segments {
            Some(segments) => model.hidden_packed(self.inputs.clone(), segments),
            None => model.hidden(self.inputs.clone(), None),
        }
    }
}

/// Positions a GPU batch is padded to a multiple of: the tensor-core kernels take products whose
/// sizes are multiples of 16 (and the large ones whole tiles), so rows of any length keep them.
/// The padded positions come after every row's last token: causal attention keeps them out of
/// the real positions, and the mask keeps them out of the loss.
pub const GPU_POSITION_MULTIPLE: usize = 16;

/// Splits a batch into inputs and shifted targets. Target `j` (the token at position `j`,
/// predicted from position `j - 1`) is trained when [`Batch::is_target`]. On a GPU the
/// positions are padded to a multiple of [`GPU_POSITION_MULTIPLE`].
pub fn prepare(batch: &Batch, device: &burn::tensor::Device) -> Prepared {
    let (rows, len) = (batch.rows, batch.len);
    let width = len.saturating_sub(1).max(1);
    let width = if *device == burn::tensor::Device::flex() { width } else { width.next_multiple_of(GPU_POSITION_MULTIPLE) };
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
            if batch.is_target(r, j) {
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
        segments: batch.is_packed().then(|| batch.segments(width)),
    }
}

/// Positions per chunk of the head's loss ([`head_loss`]) on the CPU: its `[positions, vocab]`
/// logits in f32 are the largest tensors of a step, and only one chunk's exist at a time.
const HEAD_CHUNK: usize = 256;

/// Logit elements per chunk of the head's loss on a GPU (512 Mi, 2 GiB in f32): the gradient's
/// product `d·W` reduces over the vocabulary into a `[chunk, hidden]` output, which a chunk of
/// a few hundred rows spreads over too few workgroups. Measured on an H100 (1B, 8×512,
/// vocabulary 128256, 2026-12-06): chunks of 256 rows 14,963 tokens/s at 8.84 GiB, 2080 rows
/// 17,776 at 10.43 GiB, the whole 4096 at once 20,359 at 12.26 GiB (the whole logits under
/// autodiff before: 18,845 at 16.17 GiB).
const GPU_HEAD_ELEMENTS: usize = 1 << 29;

/// Positions per chunk of the head's loss for a vocabulary of `vocab` on `device`
/// (`LORA_HEAD_CHUNK` replaces it, for measurements).
fn head_chunk(vocab: usize, device: &burn::tensor::Device) -> usize {
    if let Some(n) = std::env::var("LORA_HEAD_CHUNK").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0) {
        return n;
    }
    if *device == burn::tensor::Device::flex() {
        return HEAD_CHUNK;
    }
    (GPU_HEAD_ELEMENTS / vocab.max(1)).max(HEAD_CHUNK) / GPU_POSITION_MULTIPLE * GPU_POSITION_MULTIPLE
}

/// Calls `each(start, c, logits)` for every chunk of [`head_chunk`] positions of `h`
/// `[positions, width]`: the f32 logits `[c, vocab]` of the frozen head `w` `[vocab, width]`
/// at positions `start..start + c`. Only one chunk's logits exist at a time.
fn for_each_head_chunk(h: &Tensor<2>, w: &Tensor<2>, mut each: impl FnMut(usize, usize, Tensor<2>)) {
    let positions = h.dims()[0];
    let chunk = head_chunk(w.dims()[0], &h.device());
    for start in (0..positions).step_by(chunk) {
        let c = chunk.min(positions - start);
        each(start, c, lora_kernels::frozen_linear(h.clone().narrow(0, start, c), w.clone()).cast(FloatDType::F32));
    }
}

/// Sum of `-log p(target)` over the trained positions: `logits` `[rows, n, vocab]`,
/// `targets` and `mask` `[rows, n]`. A `[1]` f32 tensor.
fn nll_sum(logits: Tensor<3>, targets: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<1> {
    let [rows, n, _] = logits.dims();
    let logp = log_softmax(logits.cast(FloatDType::F32), 2);
    let picked = logp.gather(2, targets.reshape([rows, n, 1])).reshape([rows, n]); // [rows, n]
    -(picked * mask).sum()
}

/// Every position's target NLL `[rows, n]` (f32, without a graph) from the last block's
/// output `hidden` `[rows, n, hidden]` and `targets` `[rows, n]`, the head's logits a chunk of
/// positions at a time as in [`head_loss`].
pub(crate) fn position_nll(model: &CausalLm, hidden: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [rows, n, width] = hidden.dims();
    let hidden = hidden.detach();
    let Some(w) = model.dense_head() else {
        let logp = log_softmax(model.logits(hidden).cast(FloatDType::F32), 2);
        return -logp.gather(2, targets.reshape([rows, n, 1])).reshape([rows, n]).detach();
    };
    let positions = rows * n;
    let h = model.model.norm.forward(hidden).reshape([positions, width]).detach();
    let targets = targets.reshape([positions, 1]);
    // Weight 1 everywhere: a row of weight 0 may give 0 as its NLL.
    let ones = Tensor::<2>::ones([positions, 1], (&h.device(), DType::F32));
    let mut parts = Vec::new();
    for_each_head_chunk(&h, &w, |start, c, logits| {
        parts.push(cross_entropy(logits, targets.clone().narrow(0, start, c), ones.clone().narrow(0, start, c)).0);
    });
    Tensor::cat(parts, 0).reshape([rows, n])
}

/// The summed target NLL of the head over `hidden` `[rows, n, hidden]` (the last block's
/// output), as a `[1]` f32 tensor without a graph, and with `grad_scale` a surrogate: a scalar
/// whose gradient in `hidden` is `grad_scale` times that of the sum divided by `total` (the loss
/// scale of f16 training, applied before anything is rounded to f16, else 1).
///
/// Where the head is a frozen matrix ([`CausalLm::dense_head`], dequantized once if 4-bit),
/// the logits exist only a chunk of positions at a time ([`head_chunk`]): each chunk's log-sum-exp and
/// target logit give its losses, and `(softmax - onehot)·mask·grad_scale/total` times the head
/// gives its part of the gradient at once, so that backward has nothing of the head left to do.
/// Otherwise the whole logits go through `log_softmax` under autodiff, and the surrogate is the
/// scaled mean itself.
fn head_loss(
    model: &CausalLm,
    hidden: Tensor<3>,
    targets: Tensor<2, Int>,
    mask: Tensor<2>,
    total: f64,
    grad_scale: Option<f64>,
) -> (Tensor<1>, Option<Tensor<1>>) {
    let Some(w) = model.dense_head() else {
        let sum = nll_sum(model.logits(hidden), targets, mask);
        return (sum.clone().detach(), grad_scale.map(|scale| scaled(sum / total, scale)));
    };
    let [rows, n, width] = hidden.dims();
    let positions = rows * n;
    let dtype = hidden.dtype();
    let h = model.model.norm.forward(hidden).reshape([positions, width]);
    let values = h.clone().detach();
    let (targets, mask) = (targets.reshape([positions, 1]), mask.reshape([positions, 1]));
    let mut sum = Tensor::<1>::zeros([1], (&values.device(), DType::F32));
    let mut parts = Vec::new();
    for_each_head_chunk(&values, &w, |start, c, logits| {
        let m = mask.clone().narrow(0, start, c);
        let (nll, d) = cross_entropy(logits, targets.clone().narrow(0, start, c), m.clone() * (grad_scale.unwrap_or(1.0) / total));
        sum = sum.clone() + (nll * m).sum();
        if grad_scale.is_some() {
            parts.push(lora_kernels::matmul_frozen(d.cast(dtype), w.clone())); // [c, width]
        }
    });
    let surrogate = grad_scale.map(|_| (h * Tensor::cat(parts, 0).detach()).cast(FloatDType::F32).sum());
    (sum, surrogate)
}

/// The batch's mean target NLL, its number of target tokens, and the gradient of every
/// trainable tensor (flattened, on the inner backend, in [`for_each_trainable`] order) of
/// the loss multiplied by `scale` (the loss scale of f16 training, else 1; see
/// [`crate::scale`]).
///
/// With `recompute`, activations are not kept through the whole network: a first pass
/// without autodiff keeps only each block's input; then the head and each adapted block,
/// last to first, run again with autodiff and are differentiated on their own, the
/// gradient of the block's output carried from one to the next. Peak memory is one block's
/// activations plus the block inputs instead of every block's activations, for a second
/// forward pass. Blocks below the lowest adapted one are never differentiated.
///
/// [`for_each_trainable`]: crate::params::for_each_trainable
pub fn loss_and_gradients(model: &mut CausalLm, batch: &Batch, recompute: bool, scale: f64) -> (f64, usize, Vec<Tensor<1>>) {
    let p = prepare(batch, &model.device());
    let total = p.tokens.max(1) as f64;
    let mask = p.mask.clone();
    let (sum, flat) = weighted_gradients(model, &p, recompute, scale, |_, _| (mask, total));
    (sum / total, p.tokens, flat)
}

/// The gradients of `Σ weight·nll / total` over the positions of `p` (times `scale`), where
/// `weigh` gives the weights `[rows, width]` and `total` from the model and the last block's
/// output (without a graph), once the forward pass has reached it; and `Σ weight·nll`. The
/// token-averaged loss weighs the target mask by the number of targets; the preference
/// objectives weigh each position by the derivative of their loss in its log-probability.
/// See [`loss_and_gradients`] for `recompute`.
pub(crate) fn weighted_gradients(
    model: &mut CausalLm,
    p: &Prepared,
    recompute: bool,
    scale: f64,
    weigh: impl FnOnce(&CausalLm, Tensor<3>) -> (Tensor<2>, f64),
) -> (f64, Vec<Tensor<1>>) {
    if !recompute {
        let hidden = p.hidden(model);
        let (weights, total) = weigh(model, hidden.clone().detach());
        let (sum, surrogate) = head_loss(model, hidden, p.targets.clone(), weights, total, Some(scale));
        let value = sum.into_scalar::<f64>();
        let grads = surrogate.expect("asked for").backward();
        let flat = model.model.layers.iter().flat_map(|l| crate::params::layer_gradients(l, &grads)).collect();
        return (value, flat);
    }
    // 1. Forward without autodiff, keeping each block's input.
    let frozen = model.clone().no_grad();
    let (mut x, inputs) = p.embed(&frozen);
    let blocks = model.model.layers.len();
    let first = (0..blocks).find(|&i| crate::params::layer_is_trainable(&model.model.layers[i])).unwrap_or(blocks);
    let mut saved = Vec::with_capacity(blocks - first);
    for i in 0..blocks {
        if i >= first {
            saved.push(x.clone().detach());
        }
        x = frozen.block(i, x, &inputs).detach();
    }
    drop(frozen);
    // 2. The head: the loss and its gradient at the last hidden state.
    let (weights, total) = weigh(model, x.clone());
    let h = x.require_grad();
    let (sum, surrogate) = head_loss(model, h.clone(), p.targets.clone(), weights, total, Some(scale));
    let value = sum.into_scalar::<f64>();
    let grads = surrogate.expect("asked for").backward();
    let mut upstream = Some(h.grad(&grads).expect("the head depends on its input")); // [rows, width, hidden], inner backend
    // 3. The adapted blocks, last to first.
    let mut per_block: Vec<Vec<Tensor<1>>> = Vec::with_capacity(blocks - first);
    for i in (first..blocks).rev() {
        let input = saved.pop().expect("one input per adapted block").require_grad();
        let out = model.block(i, input.clone(), &inputs);
        let g: Tensor<3> = Tensor::from_inner(upstream.take().expect("set for every block")).cast(FloatDType::F32);
        let surrogate = (out.cast(FloatDType::F32) * g).sum();
        let grads = surrogate.backward();
        per_block.push(crate::params::layer_gradients(&model.model.layers[i], &grads));
        if i > first {
            upstream = Some(input.grad(&grads).expect("the block depends on its input"));
        }
    }
    let flat = per_block.into_iter().rev().flatten().collect();
    (value, flat)
}

/// `loss · scale`, or `loss` itself when the scale is 1.
fn scaled(loss: Tensor<1>, scale: f64) -> Tensor<1> {
    if scale == 1.0 { loss } else { loss * scale }
}

/// The batch's mean target NLL (a scalar `[1]` f32 tensor without a graph) and its number of
/// target tokens.
pub fn batch_loss(model: &CausalLm, batch: &Batch) -> (Tensor<1>, usize) {
    let p = prepare(batch, &model.device());
    let hidden = p.hidden(model); // [rows, width, hidden]
    let (sum, _) = head_loss(model, hidden, p.targets, p.mask, 1.0, None);
    (sum / p.tokens.max(1) as f64, p.tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows: length 4 with the prompt ending at 2; length 3 unmasked; padded to 5.
    fn two_rows() -> Batch {
        Batch {
            tokens: vec![1, 2, 3, 4, 0, 5, 6, 7, 0, 0],
            rows: 2,
            len: 5,
            targets: vec![vec![2..4], vec![0..3]],
            starts: vec![vec![]; 2],
            lengths: vec![4, 3],
            padding: 3,
        }
    }

    /// Packing: each input position carries its sequence's number (0 past the row), and only
    /// a packed row holds more than one.
    #[test]
    fn packed_rows_number_their_sequences() {
        let mut batch = two_rows();
        assert!(prepare(&batch, &burn::tensor::Device::flex()).segments.is_none());
        batch.starts[0] = vec![0, 2];
        batch.targets[0] = std::iter::once(3..4).collect();
        let p = prepare(&batch, &burn::tensor::Device::flex());
        // Row 0: tokens 0-1 the first sequence, 2-3 the second; row 1 one sequence of 3.
        assert_eq!(p.segments.as_deref(), Some(&[1, 1, 2, 2, 1, 1, 1, 0][..]));
        let mask: Vec<f32> = p.mask.into_data().try_to_vec().unwrap();
        assert_eq!(mask, [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn targets_follow_the_offset_and_length() {
        let batch = two_rows();
        let p = prepare(&batch, &burn::tensor::Device::flex());
        let mask: Vec<f32> = p.mask.into_data().try_to_vec().unwrap();
        // Row 0 trains targets 2 and 3 (positions 1, 2); row 1 targets 1 and 2.
        assert_eq!(mask, [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(p.tokens, 4);
        let targets: Vec<i32> = p.targets.into_data().convert::<i32>().try_to_vec().unwrap();
        assert_eq!(targets, [2, 3, 4, 0, 6, 7, 0, 0]);
    }

    #[test]
    fn gpu_positions_are_padded_to_the_multiple_and_masked() {
        let Some(device) = lora_model::device::wgpu_device_for_tests() else { return };
        let batch = two_rows();
        let p = prepare(&batch, &device);
        assert_eq!(p.inputs.dims(), [2, GPU_POSITION_MULTIPLE]);
        let mask: Vec<f32> = p.mask.into_data().try_to_vec().unwrap();
        let trained: Vec<usize> = mask.iter().enumerate().filter(|(_, m)| **m == 1.0).map(|(i, _)| i).collect();
        assert_eq!(trained, [1, 2, GPU_POSITION_MULTIPLE, GPU_POSITION_MULTIPLE + 1]);
        assert_eq!(p.tokens, 4);
    }
}
