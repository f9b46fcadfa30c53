//! The adapter's operation `y + s·(x·Aᵀ)·Bᵀ` against the plain composition of tensor operations,
//! forward and the gradients of all four inputs: on the CPU (flex, the operation's own backward
//! over burn's products) and on wgpu (the thin-product kernels), with sizes that are not
//! multiples of the kernels' rows, columns or unrolled steps, ranks that are not multiples of the
//! reduction's chunk, and both orientations of the row reduction.

use burn::tensor::{DType, Device, Distribution, FloatDType, Tensor};
use lora_kernels::device::wgpu_device_for_tests;
use lora_kernels::lora::{MAX_RANK, lora_add};

/// `(m, k, n, rank)`.
type Case = (usize, usize, usize, usize);

/// The output and the gradients of `x`, `a`, `b`, `y` under the upstream gradient `g`, through
/// the fused operation or the composition, computed in `dtype` on `device`; returned in f32 on
/// the CPU.
fn run(device: &Device, dtype: FloatDType, inputs: &[Tensor<2>; 5], scale: f32, fused: bool) -> [Vec<f32>; 5] {
    let on = |t: &Tensor<2>| t.clone().to_device(device).cast(dtype);
    let [x, a, b, y, g] = inputs;
    let (x, a, b, y) = (on(x).autodiff().require_grad(), on(a).autodiff().require_grad(), on(b).autodiff().require_grad(), on(y).autodiff().require_grad());
    let out = if fused {
        lora_add(x.clone(), a.clone(), b.clone(), y.clone(), scale)
    } else {
        y.clone() + x.clone().matmul(a.clone().transpose()).matmul(b.clone().transpose()) * scale
    };
    let grads = (out.clone() * on(g).autodiff()).sum().backward();
    let host = |t: Tensor<2>| t.cast(FloatDType::F32).into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let grad = |t: &Tensor<2>| host(t.grad(&grads).expect("a gradient"));
    [host(out.inner()), grad(&x), grad(&a), grad(&b), grad(&y)]
}

fn inputs((m, k, n, rank): Case) -> [Tensor<2>; 5] {
    let cpu = Device::flex();
    let random = |shape: [usize; 2], std: f64| Tensor::<2>::random(shape, Distribution::Normal(0.0, std), (&cpu, DType::F32));
    [random([m, k], 1.0), random([rank, k], 0.1), random([n, rank], 0.1), random([m, n], 1.0), random([m, n], 1.0)]
}

/// Largest difference relative to the reference's largest magnitude, per output.
fn relative(got: &[Vec<f32>; 5], want: &[Vec<f32>; 5]) -> [f32; 5] {
    std::array::from_fn(|i| {
        let scale = want[i].iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        got[i].iter().zip(&want[i]).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
    })
}

#[test]
fn lora_add_matches_the_composition_on_the_cpu() {
    let cpu = Device::flex();
    // Ranks of 1, a few and past MAX_RANK (burn's products for every step there).
    for case in [(5, 7, 3, 1), (33, 40, 21, 4), (9, 70, 80, MAX_RANK + 1)] {
        let inputs = inputs(case);
        let want = run(&cpu, FloatDType::F32, &inputs, 2.0, false);
        let got = run(&cpu, FloatDType::F32, &inputs, 2.0, true);
        let diffs = relative(&got, &want);
        assert!(diffs.iter().all(|d| *d < 1e-5), "{case:?}: out, dx, da, db, dy differ by {diffs:?}");
    }
}

/// wgpu (lavapipe in CI); skipped without an adapter unless `LORA_REQUIRE_WGPU` is set. The
/// reference is the f32 composition on the CPU, so the GPU compiles only the kernels under test.
#[test]
fn lora_add_kernels_match_the_composition_on_wgpu() {
    let Some(device) = wgpu_device_for_tests() else { return };
    let cpu = Device::flex();
    // m = 8·37 + 3 rows (partial workgroups of the thin product and of the up-projection, and
    // row slices of the reduction); k = 128·2 + 45 (the unrolled loop and its tail), n = 256 + 14
    // (a partial column block). Rank 9 (two reduction chunks, the second partial) in f32; rank
    // 16 in f16 with k under MAX_RANK, so dA's reduction runs the other way round. Then f16
    // products whose sizes are all multiples of 16, which take the tensor cores where the device
    // has 16×16×16 cooperative matrices (the same kernels as above elsewhere): rank 32 (two
    // accumulators) over 18 column tiles (two per plane in the up-projection) and K split in
    // slices; rank 64 (four accumulators) over 8 column tiles (four per plane).
    let cases = [
        ((299, 301, 270, 9), FloatDType::F32, 1e-5),
        ((70, 40, 300, 16), FloatDType::F16, 5e-3),
        ((96, 160, 288, 32), FloatDType::F16, 5e-3),
        ((48, 64, 128, 64), FloatDType::F16, 5e-3),
    ];
    for (case, dtype, tolerance) in cases {
        let inputs = inputs(case);
        let want = run(&cpu, FloatDType::F32, &inputs, 2.0, false);
        let got = run(&device, dtype, &inputs, 2.0, true);
        let diffs = relative(&got, &want);
        assert!(diffs.iter().all(|d| *d < tolerance), "{case:?} {dtype:?}: out, dx, da, db, dy differ by {diffs:?}");
    }
}
