//! The trainable tensors of an adapted model, in one fixed order.

use burn::module::Param;
use burn::tensor::Tensor;
use lora_model::CausalLm;

/// One trainable tensor.
pub enum Trainable<'a> {
    /// An adapter's `A`.
    A(&'a mut Param<Tensor<2>>),
    /// An adapter's `B`.
    B(&'a mut Param<Tensor<2>>),
    /// A DoRA magnitude.
    Magnitude(&'a mut Param<Tensor<1>>),
}

impl Trainable<'_> {
    /// Whether LoRA+ gives this tensor the larger learning rate: `B` and the magnitude, as
    /// PEFT's `create_loraplus_optimizer` groups them (`lora_B`, or one dimension).
    pub fn in_lora_plus_group(&self) -> bool {
        !matches!(self, Trainable::A(_))
    }
}

/// Calls `f` on every trainable tensor: block by block, projection by projection, `A`, `B`,
/// then the magnitude. The order is what optimizer state is saved and restored by.
pub fn for_each_trainable(model: &mut CausalLm, mut f: impl FnMut(Trainable)) {
    for (_, adapter) in model.adapters_mut() {
        f(Trainable::A(&mut adapter.a));
        f(Trainable::B(&mut adapter.b));
        if let Some(m) = &mut adapter.magnitude {
            f(Trainable::Magnitude(m));
        }
    }
}

/// The name of every trainable tensor, in [`for_each_trainable`] order, as PEFT names an
/// adapter's tensors: `model.layers.3.self_attn.q_proj.lora_A`, `….lora_B`,
/// `….lora_magnitude_vector`.
pub fn trainable_names(model: &CausalLm) -> Vec<String> {
    let mut out = Vec::new();
    for (module, _, adapter) in model.adapters() {
        out.push(format!("{module}.lora_A"));
        out.push(format!("{module}.lora_B"));
        if adapter.magnitude.is_some() {
            out.push(format!("{module}.lora_magnitude_vector"));
        }
    }
    out
}

/// Every trainable tensor, flattened, in [`for_each_trainable`] order.
pub fn trainable_tensors(model: &CausalLm) -> Vec<Tensor<1>> {
    let mut out = Vec::new();
    for (_, _, adapter) in model.adapters() {
        out.push(adapter.a.val().flatten::<1>(0, 1));
        out.push(adapter.b.val().flatten::<1>(0, 1));
        if let Some(m) = &adapter.magnitude {
            out.push(m.val());
        }
    }
    out
}

/// The gradients of block `layer`'s trainable tensors in `grads`, flattened, on the inner
/// backend, in [`for_each_trainable`] order.
///
/// # Panics
///
/// If a trainable tensor has no gradient: every one takes part in the loss.
pub fn layer_gradients(layer: &lora_model::llama::DecoderLayer, grads: &burn::tensor::Gradients) -> Vec<Tensor<1>> {
    const MISSING: &str = "every trainable tensor takes part in the loss";
    let mut out = Vec::new();
    for adapter in layer.adapters() {
        out.push(adapter.a.val().grad(grads).expect(MISSING).flatten::<1>(0, 1));
        out.push(adapter.b.val().grad(grads).expect(MISSING).flatten::<1>(0, 1));
        if let Some(m) = &adapter.magnitude {
            out.push(m.val().grad(grads).expect(MISSING));
        }
    }
    out
}

/// Whether block `layer` has any trainable tensor.
pub fn layer_is_trainable(layer: &lora_model::llama::DecoderLayer) -> bool {
    layer.adapters().next().is_some()
}
