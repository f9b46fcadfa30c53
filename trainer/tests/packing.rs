//! Issue 16, packing: rows packed several to a sequence give every row the loss it has alone.
//! On the llama fixture with the train_reference adapter (on all 7 projections), the mean
//! target loss and the adapter's gradients of a batch holding every row are the same packed as
//! padded, with and without block recomputation, and so is the evaluation loss, on the CPU and
//! on wgpu (lavapipe in CI).

mod common;

use burn::tensor::Device;
use common::{max_diff, model_and_rows};
use lora_data::{Batcher, collate, pack};
use lora_model::AttentionPath;
use lora_trainer::loss::loss_and_gradients;
use lora_trainer::run::Quiet;
use lora_trainer::{Evaluation, Objective, evaluate};

fn check(device: Device) {
    let (mut model, rows) = model_and_rows(&device.clone().autodiff(), 0.0);
    let longest = rows.iter().map(|e| e.tokens.len()).max().unwrap();
    let packed = pack(&rows, 2 * longest + 3);
    assert!(packed.len() < rows.len() && packed.iter().any(|e| e.starts.len() > 1), "the rows were packed");
    model.set_training(true);
    for attention in [AttentionPath::Dense, AttentionPath::Chunked] {
        model.attention = attention;
        let all_rows = collate(&rows, &(0..rows.len()).collect::<Vec<_>>(), 4096);
        let all_packed = collate(&packed, &(0..packed.len()).collect::<Vec<_>>(), 4096);
        for recompute in [false, true] {
            let (loss, tokens, grads) = loss_and_gradients(&mut model, &all_rows, recompute, 1.0);
            let (loss_p, tokens_p, grads_p) = loss_and_gradients(&mut model, &all_packed, recompute, 1.0);
            assert_eq!(tokens, tokens_p, "{attention:?}: the same targets");
            assert!((loss - loss_p).abs() < 1e-5, "{attention:?} recompute {recompute}: loss {loss} padded, {loss_p} packed");
            let diff = max_diff(&grads, &grads_p);
            assert!(diff < 1e-5, "{attention:?} recompute {recompute}: gradients differ by {diff}");
        }
    }
    // Evaluation packs the rows of the batches it would evaluate unpacked: the same loss, also
    // where batches of 3 leave a remainder out and only some batches are evaluated.
    model.set_training(false);
    model.attention = AttentionPath::Auto;
    for (batch_size, batches) in [(1, None), (3, None), (2, Some(2))] {
        let how = |pack| Evaluation { batch_size, batches, max_seq_length: 4096, pack, objective: Objective::Sft };
        let (alone, tokens) = evaluate(&model, &rows, &how(false), &mut Quiet).unwrap();
        let (together, tokens_p) = evaluate(&model, &rows, &how(true), &mut Quiet).unwrap();
        assert_eq!(tokens, tokens_p, "batch {batch_size}, batches {batches:?}");
        assert!((alone - together).abs() < 1e-5, "batch {batch_size}, batches {batches:?}: evaluation loss {alone} unpacked, {together} packed");
    }
    // The batcher sees packed sequences as rows.
    assert_eq!(Batcher::by_length(&packed.iter().map(|e| e.tokens.len()).collect::<Vec<_>>(), 1).unwrap().batches_per_epoch(), packed.len());
}

#[test]
fn packed_rows_train_and_evaluate_as_padded_ones_on_the_cpu() {
    check(Device::flex());
}

#[test]
fn packed_rows_train_and_evaluate_as_padded_ones_on_wgpu() {
    let Some(device) = lora_model::device::wgpu_device_for_tests() else { return };
    check(device);
}
