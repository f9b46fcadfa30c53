//! The trainable tensors of an adapted model, in one fixed order.

use burn::module::Param;
use burn::tensor::Tensor;
use lora_model::CausalLm;

/// One trainable tensor.
pub enum Trainable<'a> {
    /// An adapter's `A` or `B`.
    Matrix(&'a mut Param<Tensor<2>>),
    /// A DoRA magnitude.
    Vector(&'a mut Param<Tensor<1>>),
}

/// Calls `f` on every trainable tensor: block by block, projection by projection, `A`, `B`,
/// then the magnitude. The order is what optimizer state is saved and restored by.
pub fn for_each_trainable(model: &mut CausalLm, mut f: impl FnMut(Trainable)) {
    for layer in &mut model.model.layers {
        for (_, linear) in layer.projections_mut() {
            let Some(adapter) = &mut linear.adapter else { continue };
            f(Trainable::Matrix(&mut adapter.a));
            f(Trainable::Matrix(&mut adapter.b));
            if let Some(m) = &mut adapter.magnitude {
                f(Trainable::Vector(m));
            }
        }
    }
}

/// Every trainable tensor, flattened, in [`for_each_trainable`] order.
pub fn trainable_tensors(model: &CausalLm) -> Vec<Tensor<1>> {
    let mut out = Vec::new();
    for layer in &model.model.layers {
        for (_, linear) in layer.projections() {
            let Some(adapter) = &linear.adapter else { continue };
            out.push(adapter.a.val().flatten::<1>(0, 1));
            out.push(adapter.b.val().flatten::<1>(0, 1));
            if let Some(m) = &adapter.magnitude {
                out.push(m.val());
            }
        }
    }
    out
}

/// The gradients of block `layer`'s trainable tensors in `grads`, flattened, in
/// [`for_each_trainable`] order; a tensor without a gradient gets zeros.
pub fn layer_gradients(layer: &lora_model::llama::DecoderLayer, grads: &burn::tensor::Gradients) -> Vec<Tensor<1>> {
    let mut out = Vec::new();
    for (_, linear) in layer.projections() {
        let Some(adapter) = &linear.adapter else { continue };
        let flat = |t: Tensor<2>| {
            let n = t.shape().num_elements();
            t.grad(grads).map_or_else(|| Tensor::zeros([n], &t.device()).inner(), |g| g.flatten::<1>(0, 1))
        };
        out.push(flat(adapter.a.val()));
        out.push(flat(adapter.b.val()));
        if let Some(m) = &adapter.magnitude {
            let t = m.val();
            out.push(t.grad(grads).unwrap_or_else(|| Tensor::zeros(t.dims(), &t.device()).inner()));
        }
    }
    out
}

/// Whether block `layer` has any trainable tensor.
pub fn layer_is_trainable(layer: &lora_model::llama::DecoderLayer) -> bool {
    layer.projections().iter().any(|(_, l)| l.adapter.is_some())
}
