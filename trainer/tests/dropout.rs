//! Adapter dropout under gradient checkpointing: the recomputed blocks drop the same inputs as
//! the first pass, so the loss and every gradient are those of the run without
//! recomputation (PyTorch's checkpoint restores the random state for the same reason). Before,
//! the recomputation drew new masks, and the gradient belonged to no single dropout draw.

mod common;

use burn::tensor::Device;
use common::{max_diff, model_and_rows};
use lora_data::collate;
use lora_trainer::loss::loss_and_gradients;

fn check(device: Device) {
    let (mut model, rows) = model_and_rows(&device.autodiff(), 0.3);
    model.set_training(true);
    let batch = collate(&rows, &(0..4).collect::<Vec<_>>(), 4096);
    let mut step = |seed: u64, recompute: bool| {
        model.seed_dropout(seed);
        let (loss, _, grads) = loss_and_gradients(&mut model, &batch, recompute, 1.0);
        (loss, grads)
    };
    let (loss, grads) = step(11, false);
    let (loss_r, grads_r) = step(11, true);
    assert!((loss - loss_r).abs() < 1e-5, "loss {loss} without recomputation, {loss_r} with");
    let diff = max_diff(&grads, &grads_r);
    assert!(diff < 1e-5, "gradients differ by {diff} with recomputation");
    // The masks are drawn (another seed, other gradients), and again the same for a seed.
    let (_, other) = step(12, true);
    assert!(max_diff(&grads, &other) > 1e-4, "another seed drops other inputs");
    let (again, grads_again) = step(11, false);
    assert!(again == loss && max_diff(&grads, &grads_again) == 0.0, "a seed gives one draw");
}

#[test]
fn dropout_masks_survive_recomputation_on_the_cpu() {
    check(Device::flex());
}

#[test]
fn dropout_masks_survive_recomputation_on_wgpu() {
    let Some(device) = lora_model::device::wgpu_device_for_tests() else { return };
    check(device);
}
