//! The head's cross-entropy with its gradient against `log_softmax` and autodiff's gradient of
//! the weighted NLL sum: on the CPU (the row kernel: a vocabulary that is not a multiple of its
//! vector width, a row of weight 0, logits wide enough to need the max subtracted) and on wgpu
//! (the composition); the same under autodiff.

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Device, Distribution, Int, Tensor, TensorData};
use lora_kernels::device::wgpu_device_for_tests;
use lora_kernels::xent::cross_entropy;

fn check(device: &Device, rows: usize, vocab: usize, tolerance: f32) {
    let cpu = Device::flex();
    let logits = Tensor::<2>::random([rows, vocab], Distribution::Normal(0.0, 30.0), (&cpu, DType::F32)) + 500.0;
    let ids: Vec<i32> = (0..rows).map(|r| ((r * 7919 + 3) % vocab) as i32).collect();
    let weights: Vec<f32> = (0..rows).map(|r| if r == 1 { 0.0 } else { 0.25 + r as f32 / 8.0 }).collect();
    let on = |t: Tensor<2>| t.to_device(device);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [rows, 1]), device);
    let w = on(Tensor::<2>::from_data(TensorData::new(weights.clone(), [rows, 1]), (&cpu, DType::F32)));

    let (nll, grad) = cross_entropy(on(logits.clone()), targets.clone(), w.clone());
    // Under autodiff: the same values, as leaves.
    let (nll_ad, grad_ad) = cross_entropy(on(logits.clone()).autodiff(), targets.clone().autodiff(), w.clone().autodiff());
    assert_eq!(nll_ad.inner().into_data(), nll.clone().into_data());
    assert_eq!(grad_ad.inner().into_data(), grad.clone().into_data());

    let x = on(logits).autodiff().require_grad();
    let want_nll = -log_softmax(x.clone(), 1).gather(1, targets.autodiff());
    let grads = (want_nll.clone() * w.autodiff()).sum().backward();
    let want_grad = x.grad(&grads).expect("a gradient");

    let host = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let (nll, want_nll, grad, want_grad) = (host(nll), host(want_nll.inner()), host(grad), host(want_grad));
    for r in 0..rows {
        if weights[r] != 0.0 {
            let diff = (nll[r] - want_nll[r]).abs() / (1.0 + want_nll[r].abs());
            assert!(diff < tolerance, "row {r}: NLL {} against {}", nll[r], want_nll[r]);
        }
    }
    let worst = grad.iter().zip(&want_grad).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < tolerance, "gradient differs by {worst}");
}

#[test]
fn cross_entropy_matches_log_softmax_on_the_cpu() {
    check(&Device::flex(), 5, 1003, 1e-5);
    check(&Device::flex(), 64, 49_152, 1e-5);
}

/// wgpu (lavapipe in CI); skipped without an adapter unless `LORA_REQUIRE_WGPU` is set.
#[test]
fn cross_entropy_matches_log_softmax_on_wgpu() {
    let Some(device) = wgpu_device_for_tests() else { return };
    check(&device, 5, 1003, 1e-4);
}
