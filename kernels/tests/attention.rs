//! The chunked attention against the plain composition of tensor operations (the whole masked
//! score matrix), forward and gradients, with GQA, a sliding window, key padding, rows packed
//! with several sequences and chunks that do not divide the sequence.

mod common;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use common::{reference, test_flags};
use lora_kernels::attention::{Masking, attention};
use lora_kernels::device::wgpu_device_for_tests;

fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

fn check(device: &Device, tolerance: f32, s: usize, configs: &[(Option<usize>, usize)]) {
    let (b, h, kv, d) = (2, 4, 2, 8);
    let keys = test_flags(b, s); // row 0: three packed sequences; row 1: 3 left pads
    let flags = Tensor::<2>::from_data(TensorData::new(keys.clone(), [b, s]), (device, DType::F32));
    for &(window, chunk) in configs {
        let random = |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), (device, DType::F32));
        let (q0, k0, v0) = (random([b, h, s, d]), random([b, kv, s, d]), random([b, kv, s, d]));
        // Query rows that may see no key (row 1's pads: every key up to them is padding) are
        // defined only as "some average"; their outputs never reach a loss, so they are left out.
        let seen = Tensor::<4>::from_data(TensorData::new(keys.iter().map(|&k| k.min(1.0)).collect::<Vec<_>>(), [b, 1, s, 1]), (device, DType::F32));
        let upstream = random([b, h, s, d]) * seen.clone();
        let grads_of = |chunked: bool| {
            let q = q0.clone().autodiff().require_grad();
            let k = k0.clone().autodiff().require_grad();
            let v = v0.clone().autodiff().require_grad();
            let out = if chunked {
                attention(q.clone(), k.clone(), v.clone(), flags.clone().autodiff(), Masking { window, chunk })
            } else {
                reference(q.clone(), k.clone(), v.clone(), &keys, window)
            };
            let grads = (out.clone() * upstream.clone().autodiff()).sum().backward();
            let g = |t: &Tensor<4>| t.grad(&grads).expect("a gradient");
            (out.inner() * seen.clone(), g(&q), g(&k), g(&v))
        };
        let (o1, dq1, dk1, dv1) = grads_of(true);
        let (o2, dq2, dk2, dv2) = grads_of(false);
        let diffs = [max_diff(o1, o2), max_diff(dq1, dq2), max_diff(dk1, dk2), max_diff(dv1, dv2)];
        assert!(diffs.iter().all(|x| *x < tolerance), "window {window:?}, chunk {chunk}: out, dq, dk, dv differ by {diffs:?}");
    }
}

#[test]
fn chunked_attention_matches_the_full_score_matrix_on_the_cpu() {
    check(&Device::flex(), 1e-5, 11, &[(None, 4), (Some(3), 5), (None, 0), (Some(6), 1)]);
}

/// Sequences longer than the CPU kernel's block of queries (128), with and without a window
/// that spans a block boundary.
#[test]
fn long_sequences_match_the_full_score_matrix_on_the_cpu() {
    check(&Device::flex(), 1e-4, 300, &[(None, 0), (Some(150), 0)]);
}

/// wgpu (lavapipe in CI), one case; skipped without an adapter unless `LORA_REQUIRE_WGPU` is set.
#[test]
fn chunked_attention_matches_the_full_score_matrix_on_wgpu() {
    let Some(device) = wgpu_device_for_tests() else { return };
    // One case: each new shape compiles kernels anew, which is slow on lavapipe.
    check(&device, 1e-4, 11, &[(Some(3), 5)]);
}
