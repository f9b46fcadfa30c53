//! SwiGLU's activation `silu(gate)·up` with its own backward against the plain composition of
//! tensor operations, forward and both gradients: on the CPU (the vectorized f32 kernels, with a
//! length that is not a multiple of their step and one long enough to be split between threads)
//! and on wgpu (the composition inside the operation's own backward).

use burn::tensor::activation::sigmoid;
use burn::tensor::{DType, Device, Distribution, Tensor};
use lora_kernels::device::wgpu_device_for_tests;
use lora_kernels::linear::swiglu;

/// Output, `dgate`, `dup` through the operation or the composition, on the CPU in f32.
fn run(device: &Device, gate: &Tensor<3>, up: &Tensor<3>, upstream: &Tensor<3>, fused: bool) -> [Vec<f32>; 3] {
    let on = |t: &Tensor<3>| t.clone().to_device(device);
    let (gate, up) = (on(gate).autodiff().require_grad(), on(up).autodiff().require_grad());
    let out = if fused { swiglu(gate.clone(), up.clone()) } else { gate.clone() * sigmoid(gate.clone()) * up.clone() };
    let grads = (out.clone() * on(upstream).autodiff()).sum().backward();
    let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let grad = |t: &Tensor<3>| host(t.grad(&grads).expect("a gradient"));
    [host(out.inner()), grad(&gate), grad(&up)]
}

fn check(device: &Device, shape: [usize; 3], tolerance: f32) {
    let cpu = Device::flex();
    // Wide enough that the exponential meets large negative and positive arguments.
    let random = |std: f64| Tensor::<3>::random(shape, Distribution::Normal(0.0, std), (&cpu, DType::F32));
    let (gate, up, upstream) = (random(8.0), random(1.0), random(1.0));
    let got = run(device, &gate, &up, &upstream, true);
    let want = run(device, &gate, &up, &upstream, false);
    for (name, (g, w)) in ["out", "dgate", "dup"].iter().zip(got.iter().zip(&want)) {
        let worst = g.iter().zip(w).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max);
        assert!(worst < tolerance, "{shape:?}: {name} differs from the composition by {worst} (relative)");
    }
}

#[test]
fn swiglu_matches_the_composition_on_the_cpu() {
    check(&Device::flex(), [3, 7, 37], 1e-5);
    check(&Device::flex(), [2, 129, 1536], 1e-5);
}

/// wgpu (lavapipe in CI); skipped without an adapter unless `LORA_REQUIRE_WGPU` is set.
#[test]
fn swiglu_matches_the_composition_on_wgpu() {
    let Some(device) = wgpu_device_for_tests() else { return };
    check(&device, [3, 7, 37], 1e-4);
}
