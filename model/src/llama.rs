//! The one transformer definition for Llama, Mistral, Qwen2 and Qwen3.
//!
//! Modules are named after the Hugging Face checkpoint keys (`model.layers.{i}.self_attn.q_proj`),
//! so loading walks the same names the checkpoint uses. Architecture quirks are fields of
//! [`ModelConfig`], never a second copy of the model.

use std::cell::RefCell;

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor, TensorData};

use lora_kernels::attention::key_visible;
use lora_kernels::rope::rotary;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::lora::LoraAdapter;
use crate::rope::Rope;
use crate::weight::{LoadEvent, LoadOptions, QuantizeAtLoad, Weight};
use lora_kernels::tensor::float_dtype;

/// A linear projection `y = x·Wᵀ + b` with `W` stored `[out, in]` as in the checkpoint.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out_features, in_features]`, dense or quantized.
    pub weight: Weight,
    /// `[out_features]`, when the checkpoint has one.
    pub bias: Option<Param<Tensor<1>>>,
    /// A low-rank adapter over the frozen weight.
    pub adapter: Option<LoraAdapter>,
}

impl Linear {
    /// `x` `[batch, seq, in]` -> `[batch, seq, out]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, i] = x.dims();
        let out = self.weight.dims()[0];
        let x = x.reshape([b * s, i]);
        let y = self.weight.matmul_t(x.clone()); // [b*s, out]
        let y = match &self.adapter {
            Some(adapter) => adapter.forward(x, y, &self.weight),
            None => y,
        };
        let y = match &self.bias {
            Some(bias) => y + bias.val().unsqueeze::<2>(),
            None => y,
        };
        y.reshape([b, s, out])
    }

    /// `residual + forward(x)`, `[batch, seq, out]`: for a plain frozen weight one operation
    /// (one kernel for a few rows on a GPU).
    pub fn forward_add(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        let [b, s, i] = x.dims();
        let out = self.weight.dims()[0];
        let flat = |x: Tensor<3>, residual: Tensor<3>| (x.reshape([b * s, i]), residual.reshape([b * s, out]));
        if let Some(w) = self.plain_frozen() {
            let (x, residual) = flat(x, residual);
            return lora_kernels::frozen_linear_add(x, w, residual).reshape([b, s, out]);
        }
        if let Some(q) = self.plain_quant() {
            let (x, residual) = flat(x, residual);
            return q.matmul_t_add(x, residual).reshape([b, s, out]);
        }
        residual + self.forward(x)
    }

    /// The packed weight when this projection is a frozen 4-bit `x·Wᵀ` and nothing else (no
    /// bias, no adapter).
    pub fn plain_quant(&self) -> Option<&lora_quant::QuantWeight> {
        match &self.weight {
            Weight::Quant(q) if self.bias.is_none() && self.adapter.is_none() => Some(q),
            _ => None,
        }
    }

    /// The weight when this projection is a frozen `x·Wᵀ` and nothing else (no bias, no
    /// adapter), dense or dequantized (a transient copy in the compute dtype).
    pub fn frozen_dense(&self) -> Option<Tensor<2>> {
        if self.bias.is_some() || self.adapter.is_some() {
            return None;
        }
        self.weight.frozen_dense()
    }

    /// The weight when this projection is a frozen dense `x·Wᵀ` and nothing else (no bias, no
    /// adapter): what fused operations of several projections may take.
    pub fn plain_frozen(&self) -> Option<Tensor<2>> {
        match &self.weight {
            Weight::Dense(w) if !w.is_require_grad() && self.bias.is_none() && self.adapter.is_none() => Some(w.val()),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn load(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        quantize: Option<QuantizeAtLoad>,
        device: &Device,
        dtype: DType,
        on_event: &mut dyn FnMut(LoadEvent),
    ) -> Result<Self, ModelError> {
        let weight = Weight::load(ckpt, config, prefix, [out, inp], quantize, device, dtype, on_event)?;
        let bias = if bias { Some(Param::from_tensor(ckpt.load(&format!("{prefix}.bias"), [out], device, dtype)?)) } else { None };
        Ok(Self { weight, bias, adapter: None })
    }
}

/// Root-mean-square layer norm, computed in f32 as transformers does.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// `[dim]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl RmsNorm {
    /// Normalizes over the last dimension; any rank, shape unchanged.
    ///
    /// One operation of `lora_kernels::norm` (a kernel each way on a GPU) where the weight has
    /// `x`'s dtype; the composition of differentiable operations otherwise.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let weight = self.weight.val();
        if weight.dtype() == dtype {
            let dims = x.dims();
            let dim = dims[D - 1];
            let rows = x.shape().num_elements() / dim.max(1);
            return lora_kernels::norm::rms_norm(x.reshape([rows, dim]), weight, self.eps as f32).reshape(dims);
        }
        let x32 = to_f32(x);
        let ms = x32.clone().square().mean_dim(D - 1); // [..., 1]
        let normed = x32 * (ms + self.eps).sqrt().recip();
        normed.cast(float_dtype(dtype)) * self.weight.val().unsqueeze::<D>()
    }

    /// The weight and epsilon with which a product may compute this norm of `x` itself: where
    /// the weight has `x`'s dtype (what [`RmsNorm::forward`]'s kernel takes) and nothing asks
    /// for `x`'s gradient.
    fn inside(&self, x: &Tensor<2>) -> Option<(Tensor<1>, f32)> {
        let weight = self.weight.val();
        (weight.dtype() == x.dtype() && !x.is_require_grad()).then_some((weight, self.eps as f32))
    }

    fn load(ckpt: &Checkpoint, name: &str, dim: usize, eps: f64, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        Ok(Self { weight: Param::from_tensor(ckpt.load(name, [dim], device, dtype)?), eps })
    }
}

/// Token embedding table.
#[derive(Module, Debug)]
pub struct Embedding {
    /// `[vocab, hidden]`, dense or quantized.
    pub weight: Weight,
}

impl Embedding {
    /// `tokens` `[batch, seq]` -> `[batch, seq, hidden]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = tokens.dims();
        let hidden = self.weight.dims()[1];
        let ids = tokens.reshape([b * s]);
        let rows = match &self.weight {
            Weight::Dense(w) => w.val().select(0, ids),
            Weight::Quant(q) => q.rows(ids), // only the rows looked up are dequantized
        };
        rows.reshape([b, s, hidden])
    }
}

/// Multi-head attention with grouped-query key/value heads.
#[derive(Module, Debug)]
pub struct Attention {
    /// `[heads * head_dim, hidden]`.
    pub q_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`.
    pub k_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`.
    pub v_proj: Linear,
    /// `[hidden, heads * head_dim]`.
    pub o_proj: Linear,
    /// Qwen3: RMSNorm over each query head.
    pub q_norm: Option<RmsNorm>,
    /// Qwen3: RMSNorm over each key head.
    pub k_norm: Option<RmsNorm>,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

/// How a forward pass masks attention.
#[derive(Debug, Clone, Copy)]
enum AttentionMask<'a> {
    /// Chunked causal attention (`lora_kernels::attention`) over the whole sequence: key padding
    /// `[batch, seq]` (1 real, 0 padding) and the layer's sliding window.
    Chunked { keys: &'a Tensor<2>, window: Option<usize> },
    /// The reference path: `[batch, 1, 1, seq, past + seq]`, true where a query may not look.
    Dense(&'a Tensor<5, Bool>),
    /// One decoded position over the whole cache (`lora_kernels::decode`): `[batch, capacity]`
    /// in f32, 0 where the query looks and `f32::MIN` where not.
    Decode(&'a Tensor<2>),
}

/// Keys and values of one layer, `[batch, kv_heads, capacity, head_dim]` each: positions
/// `0..past` hold the past, the rest is zeros until written.
#[derive(Debug, Clone)]
pub struct LayerCache {
    keys: Tensor<4>,
    values: Tensor<4>,
}

/// One cached forward pass as a layer sees it: its slot, the positions already cached, and the
/// capacity its buffers must have (every layer of a pass gets the same).
struct CacheStep<'a> {
    slot: &'a mut Option<LayerCache>,
    past: usize,
    capacity: usize,
}

/// `buffer` `[b, kv, capacity, d]` (reallocated with the first `past` positions kept when
/// smaller than `capacity`, allocated as zeros when absent) with `fresh` `[b, kv, s, d]`
/// written at `past..past + s`, in place when the buffer is not shared.
fn write_cache(buffer: Option<Tensor<4>>, fresh: Tensor<4>, past: usize, capacity: usize) -> Tensor<4> {
    let [b, kv, s, d] = fresh.dims();
    let buffer = cache_buffer(buffer, [b, kv, d], past, capacity, &fresh.device(), fresh.dtype());
    buffer.slice_assign([0..b, 0..kv, past..past + s, 0..d], fresh)
}

/// `buffer` `[b, kv, capacity, d]` as it is when it holds `capacity` positions, else a new one
/// of zeros with its first `past` positions copied (or of zeros alone when absent).
fn cache_buffer(buffer: Option<Tensor<4>>, [b, kv, d]: [usize; 3], past: usize, capacity: usize, device: &Device, dtype: DType) -> Tensor<4> {
    match buffer {
        Some(t) if t.dims()[2] >= capacity => t,
        old => {
            let zeros = Tensor::<4>::zeros([b, kv, capacity, d], (device, dtype));
            match old {
                Some(t) if past > 0 => zeros.slice_assign([0..b, 0..kv, 0..past, 0..d], t.narrow(2, 0, past)),
                _ => zeros,
            }
        }
    }
}

impl Attention {
    /// `[x·Wqᵀ, x·Wkᵀ, x·Wvᵀ]` `[batch·seq, (heads + 2·kv_heads)·head_dim]` of `x = norm(residual)`
    /// as one product, where that pays: a few rows (decoding) on a GPU, all three projections
    /// plain frozen weights (dense, or 4-bit of one format), no per-head norms. The norm is
    /// computed inside the same kernel where its weight has the input's dtype. `None` elsewhere.
    fn fused_qkv(&self, residual: Tensor<3>, norm: &RmsNorm) -> Option<Tensor<2>> {
        let [b, s, i] = residual.dims();
        if b * s > lora_kernels::matvec::MATVEC_ROWS || residual.device() == Device::flex() || self.q_norm.is_some() || self.k_norm.is_some() {
            return None;
        }
        let residual = residual.reshape([b * s, i]);
        let inside = norm.inside(&residual);
        if let (Some(q), Some(k), Some(v)) = (self.q_proj.plain_quant(), self.k_proj.plain_quant(), self.v_proj.plain_quant()) {
            return match inside {
                Some(norm) => lora_quant::QuantWeight::linear3_t(residual, Some(norm), q, k, v),
                None => lora_quant::QuantWeight::linear3_t(norm.forward(residual), None, q, k, v),
            };
        }
        let (wq, wk, wv) = (self.q_proj.plain_frozen()?, self.k_proj.plain_frozen()?, self.v_proj.plain_frozen()?);
        Some(match inside {
            Some((weight, eps)) => lora_kernels::frozen_norm_linear3(residual, weight, eps, wq, wk, wv),
            None => lora_kernels::frozen_linear3(norm.forward(residual), wq, wk, wv),
        })
    }

    /// `residual` `[batch, seq, hidden]` -> `residual + attention(norm(residual))`.
    ///
    /// `cos`/`sin` are `[seq, head_dim]` for this step's positions.
    ///
    /// With a cache step, this step's keys and values are written into the layer's buffers.
    /// A first step (nothing cached) attends over its own keys with `mask` `[.., s, s]` (or
    /// chunked); a later one over the whole buffer with `mask` `[.., s, capacity]`, so every
    /// decoded token runs on the same shapes until the buffer grows.
    ///
    /// The residual stream is added by the output projection's product (one kernel when
    /// decoding).
    fn forward(&self, residual: Tensor<3>, norm: &RmsNorm, cos: &Tensor<2>, sin: &Tensor<2>, mask: AttentionMask, cache: Option<CacheStep>) -> Tensor<3> {
        let [b, s, _] = residual.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = self.fused_qkv(residual.clone(), norm).map(|t| t.reshape([b, s, h + 2 * kv, d]));
        let (q, mut k, mut v, cache) = match (qkv, cache) {
            (Some(qkv), Some(CacheStep { slot, past, capacity })) => {
                // One product for the three projections; one kernel rotating the query and key
                // heads and writing the keys and values into the cache's buffers.
                let (old_keys, old_values) = slot.take().map_or((None, None), |c| (Some(c.keys), Some(c.values)));
                let (device, dtype) = (qkv.device(), qkv.dtype());
                let keys = cache_buffer(old_keys, [b, kv, d], past, capacity, &device, dtype);
                let values = cache_buffer(old_values, [b, kv, d], past, capacity, &device, dtype);
                let (q, keys, values) = lora_kernels::rope::rotary_cached(qkv, cos.clone(), sin.clone(), keys, values, h, past);
                *slot = Some(LayerCache { keys: keys.clone(), values: values.clone() });
                // A first step attends over its own keys only.
                let (k, v) = if past > 0 { (keys, values) } else { (keys.narrow(2, 0, s), values.narrow(2, 0, s)) };
                (q, k, v, None)
            }
            (Some(qkv), cache) => {
                // One product for the three projections, one kernel rotating the query and key
                // heads ahead of the value heads: [b, h + 2kv, s, d], split by views.
                let all = rotary(qkv, cos.clone(), sin.clone(), h + kv);
                (all.clone().narrow(1, 0, h), all.clone().narrow(1, h, kv), all.narrow(1, h + kv, kv), cache)
            }
            (None, cache) => {
                let x = norm.forward(residual.clone());
                let q = self.q_proj.forward(x.clone()).reshape([b, s, h, d]);
                let k = self.k_proj.forward(x.clone()).reshape([b, s, kv, d]);
                let v = self.v_proj.forward(x).reshape([b, s, kv, d]);
                let q = match &self.q_norm {
                    Some(n) => n.forward(q),
                    None => q,
                };
                let k = match &self.k_norm {
                    Some(n) => n.forward(k),
                    None => k,
                };
                let q = rotary(q, cos.clone(), sin.clone(), h); // [b, h, s, d]
                let k = rotary(k, cos.clone(), sin.clone(), kv); // [b, kv, s, d]
                (q, k, v.swap_dims(1, 2), cache) // v [b, kv, s, d]
            }
        };
        if let Some(CacheStep { slot, past, capacity }) = cache {
            let old = slot.take();
            let (old_keys, old_values) = old.map_or((None, None), |c| (Some(c.keys), Some(c.values)));
            let keys = write_cache(old_keys, k.clone(), past, capacity);
            let values = write_cache(old_values, v.clone(), past, capacity);
            if past > 0 {
                (k, v) = (keys.clone(), values.clone());
            }
            *slot = Some(LayerCache { keys, values });
        }
        if let AttentionMask::Decode(bias) = mask {
            let out = lora_kernels::decode::decode_attention(q, k, v, bias.clone()); // [b, h, 1, d]
            return self.o_proj.forward_add(out.swap_dims(1, 2).reshape([b, s, h * d]), residual);
        }
        if let AttentionMask::Chunked { keys, window } = mask {
            let masking = lora_kernels::attention::Masking { window, chunk: 0 };
            let out = lora_kernels::attention::attention(q, k, v, keys.clone(), masking); // [b, h, s, d]
            return self.o_proj.forward_add(out.swap_dims(1, 2).reshape([b, s, h * d]), residual);
        }
        let AttentionMask::Dense(mask) = mask else { unreachable!("handled above") };
        let t = k.dims()[2];
        let rep = h / kv;
        // Query head i uses key/value head i / rep (transformers' repeat_kv), so grouping the
        // query heads by their kv head lets every group share one key matrix, uncopied.
        let q = q.reshape([b, kv, rep * s, d]);
        let scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt()); // [b, kv, rep*s, t]
        let dtype = scores.dtype();
        let scores = to_f32(scores).reshape([b, kv, rep, s, t]);
        let scores = scores.mask_fill(mask.clone().expand([b, kv, rep, s, t]), f32::MIN);
        let probs = softmax(scores, 4).cast(float_dtype(dtype)).reshape([b, kv, rep * s, t]);
        let out = probs.matmul(v); // [b, kv, rep*s, d]
        let out = out.reshape([b, h, s, d]).swap_dims(1, 2).reshape([b, s, h * d]);
        self.o_proj.forward_add(out, residual)
    }
}

/// The SwiGLU feed-forward block.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `[intermediate, hidden]`.
    pub gate_proj: Linear,
    /// `[intermediate, hidden]`.
    pub up_proj: Linear,
    /// `[hidden, intermediate]`.
    pub down_proj: Linear,
}

impl Mlp {
    /// `residual` `[batch, seq, hidden]` -> `residual + mlp(norm(residual))`.
    fn forward(&self, residual: Tensor<3>, norm: &RmsNorm) -> Tensor<3> {
        // Plain frozen weights: one operation (on a GPU, one pass over both for a few rows, the
        // norm computed in it).
        if let (Some(gate), Some(up)) = (self.gate_proj.plain_frozen(), self.up_proj.plain_frozen()) {
            let [b, s, i] = residual.dims();
            let n = gate.dims()[0];
            let rows = residual.clone().reshape([b * s, i]);
            let h = match norm.inside(&rows).filter(|_| b * s <= lora_kernels::matvec::MATVEC_ROWS && rows.device() != Device::flex()) {
                Some((weight, eps)) => lora_kernels::frozen_norm_swiglu(rows, weight, eps, gate, up),
                None => lora_kernels::frozen_swiglu(norm.forward(rows), gate, up),
            };
            return self.down_proj.forward_add(h.reshape([b, s, n]), residual);
        }
        // Plain frozen 4-bit weights outside training: one operation (on a GPU, one pass over
        // both packed weights for a few rows, the norm computed in it). Under autodiff the
        // products keep their own backward, and the activation its own below.
        if let (Some(gate), Some(up)) = (self.gate_proj.plain_quant(), self.up_proj.plain_quant())
            && !residual.is_require_grad()
        {
            let [b, s, i] = residual.dims();
            let n = gate.dims()[0];
            let rows = residual.clone().reshape([b * s, i]);
            let fused = match norm.inside(&rows) {
                Some(inside) => lora_quant::QuantWeight::swiglu_t(rows, Some(inside), gate, up),
                None => lora_quant::QuantWeight::swiglu_t(norm.forward(rows), None, gate, up),
            };
            if let Some(h) = fused {
                return self.down_proj.forward_add(h.reshape([b, s, n]), residual);
            }
        }
        let x = norm.forward(residual.clone());
        // Both products first, then the activation as one operation (one fused kernel on a GPU,
        // one pass on every core of a CPU).
        let up = self.up_proj.forward(x.clone());
        let gate = self.gate_proj.forward(x);
        self.down_proj.forward_add(lora_kernels::linear::swiglu(gate, up), residual)
    }
}

/// One transformer block: pre-norm attention and pre-norm MLP, each with a residual.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Attention.
    pub self_attn: Attention,
    /// Feed-forward.
    pub mlp: Mlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// Sliding-window width, `None` for full causal attention (0 is never stored).
    pub window: Option<usize>,
}

/// The projection names inside a block, as in the checkpoint (`self_attn.q_proj`, ...).
pub const PROJECTIONS: [&str; 7] =
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

/// What the blocks of one forward pass share: the rotary tables `[seq, head_dim]` (or
/// `[batch·seq, head_dim]` for packed rows) and the key flags `[batch, seq]` of the attention
/// (1 real, 0 padding; in packed rows each sequence's number), on the device and on the host.
#[derive(Debug, Clone)]
pub struct BlockInputs {
    cos: Tensor<2>,
    sin: Tensor<2>,
    keys: Tensor<2>,
    flags: Vec<f32>,
    /// The dense attention masks built so far, by sliding window: one per pass, not one per
    /// block (nor one per block and recomputation).
    masks: RefCell<Vec<(Option<usize>, Tensor<5, Bool>)>>,
}

impl BlockInputs {
    fn new(cos: Tensor<2>, sin: Tensor<2>, flags: Vec<f32>, [batch, seq]: [usize; 2], device: &Device) -> Self {
        let keys = Tensor::from_data(TensorData::new(flags.clone(), [batch, seq]), (device, DType::F32));
        Self { cos, sin, keys, flags, masks: RefCell::new(Vec::new()) }
    }

    /// The dense mask of these keys for `window` ([`build_mask`]), built on its first use.
    fn dense_mask(&self, window: Option<usize>) -> Tensor<5, Bool> {
        let mut masks = self.masks.borrow_mut();
        if let Some((_, mask)) = masks.iter().find(|(w, _)| *w == window) {
            return mask.clone();
        }
        let [b, s] = self.keys.dims();
        let mask = build_mask(b, s, 0, s, window, Some(&self.flags), &self.keys.device());
        masks.push((window, mask.clone()));
        mask
    }
}

impl DecoderLayer {
    /// `x` `[batch, seq, hidden]` -> `[batch, seq, hidden]`: attention then the MLP, each
    /// after its norm and added to the residual stream.
    fn forward(&self, x: Tensor<3>, cos: &Tensor<2>, sin: &Tensor<2>, mask: AttentionMask, cache: Option<CacheStep>) -> Tensor<3> {
        let x = self.self_attn.forward(x, &self.input_layernorm, cos, sin, mask, cache);
        self.mlp.forward(x, &self.post_attention_layernorm)
    }

    /// The adapters of the block's projections, in [`PROJECTIONS`] order.
    pub fn adapters(&self) -> impl Iterator<Item = &LoraAdapter> {
        self.projections().into_iter().filter_map(|(_, linear)| linear.adapter.as_ref())
    }

    /// The block's linear projections, named as in [`PROJECTIONS`].
    pub fn projections(&self) -> [(&'static str, &Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        let p = PROJECTIONS;
        [(p[0], &a.q_proj), (p[1], &a.k_proj), (p[2], &a.v_proj), (p[3], &a.o_proj), (p[4], &m.gate_proj), (p[5], &m.up_proj), (p[6], &m.down_proj)]
    }

    /// The block's linear projections, mutable, named as in [`PROJECTIONS`].
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let p = PROJECTIONS;
        [
            (p[0], &mut a.q_proj),
            (p[1], &mut a.k_proj),
            (p[2], &mut a.v_proj),
            (p[3], &mut a.o_proj),
            (p[4], &mut m.gate_proj),
            (p[5], &mut m.up_proj),
            (p[6], &mut m.down_proj),
        ]
    }
}

/// The transformer body under the `model.` prefix.
#[derive(Module, Debug)]
pub struct Backbone {
    /// `model.embed_tokens`.
    pub embed_tokens: Embedding,
    /// `model.layers.{i}`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
}

/// A causal language model: the backbone plus `lm_head` (or tied embeddings).
#[derive(Module, Debug)]
pub struct CausalLm {
    /// `model.`
    pub model: Backbone,
    /// `lm_head`; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    rope: Rope,
    /// Which attention scores full sequences (prefill, training).
    #[module(skip)]
    pub attention: AttentionPath,
}

/// Which attention a forward pass over full sequences uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionPath {
    /// Chunked once a layer's scores reach [`CHUNKED_FROM`] elements, dense below.
    #[default]
    Auto,
    /// The whole masked `[seq, seq]` score matrix (the reference composition).
    Dense,
    /// Chunked queries with recomputation in backward (`lora_kernels::attention`).
    Chunked,
}

/// Score elements per layer (`batch × heads × seq²`) from which [`AttentionPath::Auto`] takes
/// the chunked attention: 4 M, 16 MiB in f32. Below it the dense scores are small and the dense
/// composition is fewer operations.
pub const CHUNKED_FROM: usize = 1 << 22;

impl AttentionPath {
    /// Whether `batch` rows of `seq` positions over `heads` heads on `device` take the chunked
    /// attention. On the CPU `Auto` always does: there it is one kernel per head group on
    /// every core (`lora_kernels::cpu`), faster than the dense composition at every size.
    pub fn chunked(self, batch: usize, heads: usize, seq: usize, device: &Device) -> bool {
        match self {
            Self::Auto => *device == Device::flex() || batch * heads * seq * seq >= CHUNKED_FROM,
            Self::Dense => false,
            Self::Chunked => true,
        }
    }
}

/// Key/value cache for incremental decoding, preallocated.
///
/// Each layer's keys and values live in buffers of a fixed capacity (a [`cache_capacity`]
/// bucket) written in place, and decoding attends over the whole buffer with the unwritten
/// positions masked: the shapes of a decoded token do not change from one token to the next,
/// so nothing is compiled or tuned per token, and nothing is copied but the new position.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
    capacity: usize,
    reserve: usize,
}

impl KvCache {
    /// A cache whose buffers are allocated for at least `positions` positions at the first
    /// step (rounded up to a [`cache_capacity`] bucket), so that a generation of known length
    /// never grows them.
    pub fn with_capacity(positions: usize) -> Self {
        Self { reserve: positions, ..Self::default() }
    }

    /// Number of positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold (0 before the first step).
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// The buffer size for `positions`: powers of two from 256 to 4096, then multiples of 4096. A
/// growing cache takes few distinct shapes (each compiled and tuned once, the tuning kept
/// across runs) and wastes at most half of a small buffer, 4095 positions of a large one.
pub fn cache_capacity(positions: usize) -> usize {
    const STEP: usize = 4096;
    if positions <= STEP { positions.next_power_of_two().max(256) } else { positions.div_ceil(STEP) * STEP }
}

impl CausalLm {
    /// Builds the model from a checkpoint, loading each tensor on `device` in `dtype`.
    ///
    /// `on_tensor` is called once per loaded module (for a progress bar).
    pub fn load(config: &ModelConfig, ckpt: &Checkpoint, device: &Device, dtype: DType, mut on_tensor: impl FnMut(&str)) -> Result<Self, ModelError> {
        Self::load_with(config, ckpt, device, dtype, LoadOptions::default(), |e| {
            if let LoadEvent::Loaded(name) = e {
                on_tensor(name)
            }
        })
    }

    /// Builds the model from a checkpoint with [`LoadOptions`]: quantized MLX layers stay
    /// packed, and float layers are quantized as they are read when asked to.
    pub fn load_with(
        config: &ModelConfig,
        ckpt: &Checkpoint,
        device: &Device,
        dtype: DType,
        options: LoadOptions,
        mut on_event: impl FnMut(LoadEvent),
    ) -> Result<Self, ModelError> {
        let c = config;
        let (hid, inter, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let on_event: &mut dyn FnMut(LoadEvent) = &mut on_event;
        // A checkpoint that is already quantized is loaded as it is.
        let quantize = if c.quantization.is_some() { None } else { options.quantize };
        let quantize_outer = quantize.filter(|_| options.quantize_embeddings);
        let embed_tokens = Embedding { weight: Weight::load(ckpt, c, "model.embed_tokens", [c.vocab_size, hid], quantize_outer, device, dtype, on_event)? };
        on_event(LoadEvent::Loaded("model.embed_tokens"));
        let mut layers = Vec::with_capacity(c.num_layers);
        for (i, window) in c.layer_windows.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut lin = |name: &str, out: usize, inp: usize, bias: bool| {
                Linear::load(ckpt, c, &format!("{p}.{name}"), out, inp, bias, quantize, device, dtype, on_event)
            };
            let norm = |name: &str, dim: usize| RmsNorm::load(ckpt, &format!("{p}.{name}.weight"), dim, c.rms_norm_eps, device, dtype);
            let self_attn = Attention {
                q_proj: lin("self_attn.q_proj", c.num_heads * d, hid, c.qkv_bias)?,
                k_proj: lin("self_attn.k_proj", c.num_kv_heads * d, hid, c.qkv_bias)?,
                v_proj: lin("self_attn.v_proj", c.num_kv_heads * d, hid, c.qkv_bias)?,
                o_proj: lin("self_attn.o_proj", hid, c.num_heads * d, c.o_bias)?,
                q_norm: if c.qk_norm { Some(norm("self_attn.q_norm", d)?) } else { None },
                k_norm: if c.qk_norm { Some(norm("self_attn.k_norm", d)?) } else { None },
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: d,
            };
            let mlp = Mlp {
                gate_proj: lin("mlp.gate_proj", inter, hid, c.mlp_bias)?,
                up_proj: lin("mlp.up_proj", inter, hid, c.mlp_bias)?,
                down_proj: lin("mlp.down_proj", hid, inter, c.mlp_bias)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: norm("input_layernorm", hid)?,
                post_attention_layernorm: norm("post_attention_layernorm", hid)?,
                window: window.filter(|w| *w > 0),
            });
            on_event(LoadEvent::Loaded(&p));
        }
        let norm = RmsNorm::load(ckpt, "model.norm.weight", hid, c.rms_norm_eps, device, dtype)?;
        // Some tied checkpoints still carry a copy of lm_head; the embedding is what is used.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(ckpt, c, "lm_head", c.vocab_size, hid, false, quantize_outer, device, dtype, on_event)?)
        };
        on_event(LoadEvent::Loaded("lm_head"));
        Ok(Self { model: Backbone { embed_tokens, layers, norm }, lm_head, rope: Rope::new(d, c.rope_theta, &c.rope_scaling), attention: AttentionPath::Auto })
    }

    /// Every adapted projection of the blocks, in block then [`PROJECTIONS`] order: its module
    /// path as checkpoints name it (`model.layers.3.self_attn.q_proj`), the projection and its
    /// adapter. The one walk over the adapters that saving, counting and training share.
    pub fn adapters(&self) -> impl Iterator<Item = (String, &Linear, &LoraAdapter)> {
        self.model.layers.iter().enumerate().flat_map(|(i, layer)| {
            layer.projections().into_iter().filter_map(move |(name, linear)| linear.adapter.as_ref().map(|a| (format!("model.layers.{i}.{name}"), linear, a)))
        })
    }

    /// [`Self::adapters`], each adapter mutable.
    pub fn adapters_mut(&mut self) -> impl Iterator<Item = (String, &mut LoraAdapter)> {
        self.model.layers.iter_mut().enumerate().flat_map(|(i, layer)| {
            layer.projections_mut().into_iter().filter_map(move |(name, linear)| linear.adapter.as_mut().map(|a| (format!("model.layers.{i}.{name}"), a)))
        })
    }

    /// The base model: a copy sharing every weight, without a graph, with each adapter
    /// switched off (PEFT's `disable_adapter`). DPO's reference.
    pub fn without_adapters(&self) -> CausalLm {
        let mut base = self.clone().no_grad();
        for layer in &mut base.model.layers {
            for (_, linear) in layer.projections_mut() {
                linear.adapter = None;
            }
        }
        base
    }

    /// Switches adapter dropout on (training) or off (evaluation, generation).
    pub fn set_training(&mut self, training: bool) {
        for (_, adapter) in self.adapters_mut() {
            adapter.training = training;
        }
    }

    /// Seeds every adapter's dropout for one training step: adapter `i`'s mask is a function
    /// of `seed`, `i` and its input's shape alone, so that a block run twice (gradient
    /// checkpointing) drops the same inputs both times, as PyTorch's checkpoint does by
    /// restoring the random state.
    pub fn seed_dropout(&mut self, seed: u64) {
        for (i, (_, adapter)) in self.adapters_mut().enumerate() {
            adapter.dropout_seed = seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        }
    }

    /// Rows × columns of every weight, whether dense or packed: the parameter count.
    pub fn num_weights(&self) -> usize {
        let linear = |l: &Linear| {
            let [o, i] = l.weight.dims();
            o * i + l.bias.as_ref().map_or(0, |b| b.dims()[0])
        };
        let norm = |n: &RmsNorm| n.weight.dims()[0];
        let [v, h] = self.model.embed_tokens.weight.dims();
        let mut total = v * h + norm(&self.model.norm) + self.lm_head.as_ref().map_or(0, linear);
        for layer in &self.model.layers {
            total += layer.projections().iter().map(|(_, l)| linear(l)).sum::<usize>();
            total += norm(&layer.input_layernorm) + norm(&layer.post_attention_layernorm);
            total += layer.self_attn.q_norm.as_ref().map_or(0, norm) + layer.self_attn.k_norm.as_ref().map_or(0, norm);
        }
        total
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.model.norm.weight.val().device()
    }

    /// The compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.model.norm.weight.val().dtype()
    }

    /// Full-sequence forward pass for training and scoring, without a cache.
    ///
    /// `tokens` `[batch, seq]`; `attention_mask`, if given, holds `batch * seq` flags,
    /// row-major, true for real tokens and false for padding. Positions count from 0 in
    /// every row. Returns logits `[batch, seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<2, Int>, attention_mask: Option<&[bool]>) -> Tensor<3> {
        let hidden = self.hidden_states(tokens, attention_mask, None);
        self.logits(hidden)
    }

    /// [`CausalLm::forward`] without the final norm and the head: the last block's output
    /// `[batch, seq, hidden]`, for losses that apply the head themselves.
    pub fn hidden(&self, tokens: Tensor<2, Int>, attention_mask: Option<&[bool]>) -> Tensor<3> {
        self.hidden_states(tokens, attention_mask, None)
    }

    /// Incremental forward pass for generation: appends `tokens` `[batch, new]` to `cache`
    /// and returns the logits of the last position, `[batch, vocab]`.
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<2> {
        let [b, s] = tokens.dims();
        let hidden = self.hidden_states(tokens, None, Some(cache));
        let last = hidden.narrow(1, s - 1, 1); // [b, 1, hidden]
        let logits = self.logits(last);
        let vocab = logits.dims()[2];
        logits.reshape([b, vocab])
    }

    /// The embedded tokens `[batch, seq, hidden]` and what every block of this pass shares,
    /// for running the blocks one at a time ([`Self::block`], [`Self::logits`]): training with
    /// block-level recomputation does. Same conventions as [`Self::forward`].
    pub fn embed(&self, tokens: Tensor<2, Int>, attention_mask: Option<&[bool]>) -> (Tensor<3>, BlockInputs) {
        let [b, s] = tokens.dims();
        let device = tokens.device();
        let x = self.model.embed_tokens.forward(tokens);
        let (cos, sin) = self.rope.tables(0, s, &device, x.dtype());
        (x, BlockInputs::new(cos, sin, key_flags(b, s, attention_mask), [b, s], &device))
    }

    /// [`Self::embed`] for rows packed with several sequences each: `segments` `[batch * seq]`
    /// (row-major) numbers the sequence each position belongs to, 1, 2, ... within a row, 0 for
    /// padding. Each sequence's positions count from 0 and it attends only to itself, so its
    /// hidden states are those it has alone.
    ///
    /// # Panics
    ///
    /// If `segments` does not hold `batch * seq` numbers.
    pub fn embed_packed(&self, tokens: Tensor<2, Int>, segments: &[u32]) -> (Tensor<3>, BlockInputs) {
        let [b, s] = tokens.dims();
        assert_eq!(segments.len(), b * s, "one segment number per position");
        let device = tokens.device();
        let x = self.model.embed_tokens.forward(tokens);
        let (cos, sin) = self.rope.tables_at(segment_positions(segments, s).into_iter(), &device, x.dtype()); // [b·s, d]
        let flags: Vec<f32> = segments.iter().map(|&g| g as f32).collect();
        (x, BlockInputs::new(cos, sin, flags, [b, s], &device))
    }

    /// [`Self::hidden`] for packed rows ([`Self::embed_packed`]).
    pub fn hidden_packed(&self, tokens: Tensor<2, Int>, segments: &[u32]) -> Tensor<3> {
        let (mut x, inputs) = self.embed_packed(tokens, segments);
        for i in 0..self.model.layers.len() {
            x = self.block(i, x, &inputs);
        }
        x
    }

    /// Block `index` on `x` `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub fn block(&self, index: usize, x: Tensor<3>, inputs: &BlockInputs) -> Tensor<3> {
        let layer = &self.model.layers[index];
        let [b, s, _] = x.dims();
        if !self.attention.chunked(b, layer.self_attn.num_heads, s, &x.device()) {
            let mask = inputs.dense_mask(layer.window);
            return layer.forward(x, &inputs.cos, &inputs.sin, AttentionMask::Dense(&mask), None);
        }
        layer.forward(x, &inputs.cos, &inputs.sin, AttentionMask::Chunked { keys: &inputs.keys, window: layer.window }, None)
    }

    /// The head's weight `[vocab, hidden]` when it is a frozen matrix with nothing else to it
    /// (the tied embedding, or an `lm_head` without bias or adapter), dequantized if it is
    /// quantized: what a loss that multiplies by it chunk by chunk (never holding every
    /// position's logits) can take.
    pub fn dense_head(&self) -> Option<Tensor<2>> {
        match &self.lm_head {
            Some(head) => head.frozen_dense(),
            None => self.model.embed_tokens.weight.frozen_dense(),
        }
    }

    /// The final norm and the head: hidden states `[batch, seq, hidden]` -> logits
    /// `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let hidden = self.model.norm.forward(hidden);
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, h] = hidden.dims();
                let w = &self.model.embed_tokens.weight; // [vocab, hidden]
                let vocab = w.dims()[0];
                w.matmul_t(hidden.reshape([b * s, h])).reshape([b, s, vocab])
            }
        }
    }

    /// Runs the blocks; returns the last hidden states `[batch, seq, hidden]` before the final norm.
    fn hidden_states(&self, tokens: Tensor<2, Int>, attention_mask: Option<&[bool]>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [b, s] = tokens.dims();
        let device = tokens.device();
        let past = cache.as_ref().map_or(0, |c| c.len);
        let mut x = self.model.embed_tokens.forward(tokens);
        let dtype = x.dtype();
        let (cos, sin) = self.rope.tables(past, s, &device, dtype);
        let heads = self.model.layers.first().map_or(1, |l| l.self_attn.num_heads);
        // Keys attended to: this step's own on a first step, the whole buffer after it.
        let mut total = s;
        if let Some(c) = cache.as_mut() {
            if c.layers.len() != self.model.layers.len() {
                c.layers = vec![None; self.model.layers.len()];
            }
            if past + s > c.capacity {
                c.capacity = cache_capacity((past + s).max(c.reserve));
            }
            if past > 0 {
                total = c.capacity;
            }
        }
        fn step<'a>(c: &'a mut Option<&mut KvCache>, i: usize) -> Option<CacheStep<'a>> {
            c.as_mut().map(|c| CacheStep { past: c.len, capacity: c.capacity, slot: &mut c.layers[i] })
        }
        if past > 0 && s == 1 && attention_mask.is_none() {
            // A decoded token: one kernel's attention over the whole buffer, the unwritten
            // positions (and those outside a sliding window) biased away.
            let full = decode_bias(b, past, total, None, &device);
            let mut windowed: Option<(usize, Tensor<2>)> = None;
            for (i, layer) in self.model.layers.iter().enumerate() {
                let bias = match layer.window {
                    None => &full,
                    Some(w) => {
                        if windowed.as_ref().is_none_or(|(ww, _)| *ww != w) {
                            windowed = Some((w, decode_bias(b, past, total, Some(w), &device)));
                        }
                        &windowed.as_ref().expect("just built").1
                    }
                };
                x = layer.forward(x, &cos, &sin, AttentionMask::Decode(bias), step(&mut cache, i));
            }
        } else if past == 0 && self.attention.chunked(b, heads, s, &device) {
            let keys = Tensor::from_data(TensorData::new(key_flags(b, s, attention_mask), [b, s]), (&device, DType::F32));
            for (i, layer) in self.model.layers.iter().enumerate() {
                let mask = AttentionMask::Chunked { keys: &keys, window: layer.window };
                x = layer.forward(x, &cos, &sin, mask, step(&mut cache, i));
            }
        } else {
            // At most two distinct masks: full causal and the sliding window.
            let flags = mask_flags(attention_mask);
            let full = build_mask(b, s, past, total, None, flags.as_deref(), &device);
            let mut windowed: Option<(usize, Tensor<5, Bool>)> = None;
            for (i, layer) in self.model.layers.iter().enumerate() {
                let mask = match layer.window {
                    None => &full,
                    Some(w) => {
                        if windowed.as_ref().is_none_or(|(ww, _)| *ww != w) {
                            windowed = Some((w, build_mask(b, s, past, total, Some(w), flags.as_deref(), &device)));
                        }
                        &windowed.as_ref().expect("just built").1
                    }
                };
                x = layer.forward(x, &cos, &sin, AttentionMask::Dense(mask), step(&mut cache, i));
            }
        }
        if let Some(c) = cache {
            c.len += s;
        }
        x
    }
}

/// Each position's place in its packed sequence: counts from 0, again wherever the segment
/// number changes (and at every row's start).
fn segment_positions(segments: &[u32], seq: usize) -> Vec<usize> {
    let mut positions = Vec::with_capacity(segments.len());
    for row in segments.chunks(seq.max(1)) {
        let mut at = 0;
        for (p, g) in row.iter().enumerate() {
            at = if p > 0 && *g == row[p - 1] { at + 1 } else { 0 };
            positions.push(at);
        }
    }
    positions
}

/// Key flags `[batch, seq]` in f32: 1 for a real token, 0 for padding (all 1 without a mask).
fn key_flags(batch: usize, seq: usize, attention_mask: Option<&[bool]>) -> Vec<f32> {
    mask_flags(attention_mask).unwrap_or_else(|| vec![1.0; batch * seq])
}

/// The additive bias `[batch, total]` (f32) of one query at position `past` over the keys at
/// `0..total`: 0 for a key it sees, `f32::MIN` for a later one (unwritten cache) or one outside
/// the sliding window.
fn decode_bias(batch: usize, past: usize, total: usize, window: Option<usize>, device: &Device) -> Tensor<2> {
    let row: Vec<f32> = (0..total).map(|k| if hidden(past, k, window) { f32::MIN } else { 0.0 }).collect();
    let flags: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flags, [batch, total]), (device, DType::F32))
}

/// Whether the query at position `q` may not see the key at `k`: a future key (`k > q`, which
/// covers unwritten cache) or one outside the sliding window (`q - k >= window`).
fn hidden(q: usize, k: usize, window: Option<usize>) -> bool {
    k > q || window.is_some_and(|w| q - k.min(q) >= w)
}

/// The attention mask `[batch, 1, 1, seq, total]` of queries at `past..past + seq` over keys at
/// `0..total`, true where attention is forbidden: future keys (among them every key from
/// `past + seq` on, unwritten cache), keys outside the sliding window (`q - k >= window`), and
/// among this step's keys those that `flags` (`[batch, seq]`, see
/// `lora_kernels::attention::key_visible`) hides: padding, and in packed rows other sequences.
fn build_mask(batch: usize, seq: usize, past: usize, total: usize, window: Option<usize>, flags: Option<&[f32]>, device: &Device) -> Tensor<5, Bool> {
    let mut mask = Vec::with_capacity(batch * seq * total);
    for row in 0..batch {
        for qi in 0..seq {
            let q = past + qi;
            for k in 0..total {
                let unseen = flags.is_some_and(|f| k >= past && k < past + seq && !key_visible(f[row * seq + (k - past)], f[row * seq + qi]));
                mask.push(hidden(q, k, window) || unseen);
            }
        }
    }
    Tensor::<5, Bool>::from_data(TensorData::new(mask, [batch, 1, 1, seq, total]), &device.clone())
}

/// An attention mask's flags as f32 (1 real, 0 padding), as the attention kernels take them.
fn mask_flags(attention_mask: Option<&[bool]>) -> Option<Vec<f32>> {
    attention_mask.map(|m| m.iter().map(|&real| if real { 1.0 } else { 0.0 }).collect())
}

fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32 { x } else { x.cast(FloatDType::F32) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_combines_causal_window_and_padding() {
        let device = Device::flex();
        // One row of 4 tokens, the first is padding, window 2.
        let pad = [0.0, 1.0, 1.0, 1.0];
        let m = build_mask(1, 4, 0, 4, Some(2), Some(&pad), &device);
        let v: Vec<bool> = m.into_data().try_to_vec().unwrap();
        #[rustfmt::skip]
        let expected = [
            true, true, true, true,    // q0: k0 is padding, the rest is future
            true, false, true, true,   // q1: k0 padding
            true, false, false, true,  // q2: k0 outside the window (2 - 0 >= 2)
            true, true, false, false,  // q3: k0, k1 outside the window
        ];
        assert_eq!(v, expected);
    }

    /// Token by token through a cache that grows past its first bucket (256) and is given a
    /// sliding window, against the logits of one cache-free pass over the whole sequence.
    #[test]
    fn decoding_through_a_growing_cache_matches_the_full_pass() {
        decode_against_the_full_pass(&Device::flex());
    }

    /// The same on wgpu, where a step of at most 8 tokens takes the decoding kernels: the
    /// three projections with the norm inside, the rotation writing the cache in place (the
    /// 5-token prompt attending over views of the fresh buffers), attention over the cache.
    #[test]
    fn decoding_on_wgpu_matches_the_full_pass() {
        let Some(device) = crate::device::wgpu_device_for_tests() else { return };
        decode_against_the_full_pass(&device);
    }

    fn decode_against_the_full_pass(device: &Device) {
        let device = device.clone();
        let mut config = crate::Geometry::named("tiny").expect("tiny shape").config();
        config.layer_windows = vec![None, Some(100)];
        let model = CausalLm::load(&config, &Checkpoint::random(&config), &device, DType::F32, |_| {}).unwrap();
        let n = 300;
        let ids: Vec<i64> = (0..n as i64).map(|i| (i * 37 + 11) % config.vocab_size as i64).collect();
        let full = model.forward(Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), &device), None);
        let mut cache = KvCache::default();
        // A prompt of 5, then one token at a time.
        let mut at = 0;
        let mut worst = 0.0f32;
        for len in std::iter::once(5).chain(std::iter::repeat_n(1, n - 5)) {
            let step = Tensor::<2, Int>::from_data(TensorData::new(ids[at..at + len].to_vec(), [1, len]), &device);
            let got = model.forward_cached(step, &mut cache);
            at += len;
            let want = full.clone().narrow(1, at - 1, 1).reshape([1, config.vocab_size]);
            let diff: f32 = (got - want).abs().max().into_scalar();
            worst = worst.max(diff);
        }
        assert_eq!(cache.len(), n);
        assert_eq!(cache.capacity(), 512, "grown from 256 to the next bucket");
        assert!(worst < 1e-4, "cached logits differ from the full pass by {worst}");
    }

    /// Issue 16, packing: two sequences packed in one row, each with its positions from 0 and
    /// attending only to itself, give the hidden states each has alone, on the dense and the
    /// chunked attention.
    #[test]
    fn packed_rows_match_each_sequence_alone() {
        let device = Device::flex();
        let config = crate::Geometry::named("tiny").expect("tiny shape").config();
        let mut model = CausalLm::load(&config, &Checkpoint::random(&config), &device, DType::F32, |_| {}).unwrap();
        let ids = |n: usize, seed: i64| -> Vec<i64> { (0..n as i64).map(|i| (i * 37 + seed) % config.vocab_size as i64).collect() };
        let (a, b) = (ids(7, 3), ids(5, 11));
        let packed: Vec<i64> = a.iter().chain(&b).copied().chain([0, 0]).collect();
        let segments: Vec<u32> = [1; 7].into_iter().chain([2; 5]).chain([0; 2]).collect();
        let alone = |model: &CausalLm, t: &[i64]| model.hidden(Tensor::<2, Int>::from_data(TensorData::new(t.to_vec(), [1, t.len()]), &device), None);
        for path in [AttentionPath::Dense, AttentionPath::Chunked] {
            model.attention = path;
            let model = &model;
            let (want_a, want_b) = (alone(model, &a), alone(model, &b));
            let got = model.hidden_packed(Tensor::<2, Int>::from_data(TensorData::new(packed.clone(), [1, 14]), &device), &segments);
            let diff_a: f32 = (got.clone().narrow(1, 0, 7) - want_a).abs().max().into_scalar();
            let diff_b: f32 = (got.narrow(1, 7, 5) - want_b).abs().max().into_scalar();
            assert!(diff_a < 1e-5 && diff_b < 1e-5, "{path:?}: packed hidden states differ by {diff_a}, {diff_b}");
        }
        assert_eq!(segment_positions(&segments, 14), [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 1]);
    }

    #[test]
    fn cache_buckets_are_few() {
        assert_eq!([1, 256, 257, 4096, 4097, 9000].map(cache_capacity), [256, 256, 512, 4096, 8192, 12288]);
    }

    #[test]
    fn cached_mask_offsets_queries_by_the_past() {
        let device = Device::flex();
        let m = build_mask(1, 1, 3, 4, Some(2), None, &device);
        let v: Vec<bool> = m.into_data().try_to_vec().unwrap();
        assert_eq!(v, [true, true, false, false]);
        // Over a cache of capacity 6: the unwritten positions 4 and 5 are masked too.
        let m = build_mask(1, 1, 3, 6, None, None, &device);
        let v: Vec<bool> = m.into_data().try_to_vec().unwrap();
        assert_eq!(v, [false, false, false, false, true, true]);
    }
}
