//! RMSNorm and rotary embeddings with their own backward (`lora_kernels::norm::rms_norm`,
//! `lora_kernels::rope::rotary`) against plain compositions of tracked tensor operations,
//! forward and gradients: the input's, and the norm's weight where it is tracked. On the CPU and
//! on wgpu (lavapipe in CI; the kernels in f32 and f16).

use burn::tensor::{DType, Device, Distribution, FloatDType, Tensor, TensorData};
use lora_kernels::device::wgpu_device_for_tests;
use lora_kernels::norm::rms_norm;
use lora_kernels::rope::rotary;

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Largest `|a − b| / (1 + |b|)`.
fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max)
}

/// The norm as transformers writes it: `x` in f32 over its root mean square, cast back, times
/// the weight.
fn norm_reference(x: Tensor<2>, weight: Tensor<1>, eps: f64) -> Tensor<2> {
    let dtype = x.dtype();
    let x32 = x.cast(FloatDType::F32);
    let ms = x32.clone().square().mean_dim(1);
    let normed = x32 * (ms + eps).sqrt().recip();
    normed.cast(if dtype == DType::F16 { FloatDType::F16 } else { FloatDType::F32 }) * weight.unsqueeze::<2>()
}

/// Output, `dx` and (when `train_weight`) `dweight`, with the operation or the reference.
fn norm_run(device: &Device, dtype: FloatDType, inputs: &[Tensor<2>; 2], weight: &Tensor<1>, train_weight: bool, fused: bool) -> Vec<Vec<f32>> {
    let [x, upstream] = inputs;
    let x = x.clone().to_device(device).cast(dtype).autodiff().require_grad();
    let mut w = weight.clone().to_device(device).cast(dtype).autodiff();
    if train_weight {
        w = w.require_grad();
    }
    let out = if fused { rms_norm(x.clone(), w.clone(), 1e-5) } else { norm_reference(x.clone(), w.clone(), 1e-5) };
    let grads = (out.clone().cast(FloatDType::F32) * upstream.clone().to_device(device).autodiff()).sum().backward();
    let mut got = vec![host(out.inner()), host(x.grad(&grads).expect("dx"))];
    match w.grad(&grads) {
        Some(dw) => got.push(host(dw)),
        None => assert!(!train_weight, "the weight's gradient is missing"),
    }
    got
}

fn check_norm(device: &Device, dtype: FloatDType, tolerance: f32) {
    let cpu = Device::flex();
    // A width that is not a multiple of the workgroup, rows of different scales.
    let (rows, dim) = (6, 300);
    let scales = Tensor::<2>::from_data(TensorData::new((0..rows).map(|r| 0.1 + r as f32).collect::<Vec<_>>(), [rows, 1]), &cpu);
    let x = Tensor::<2>::random([rows, dim], Distribution::Normal(0.0, 1.0), &cpu) * scales;
    let upstream = Tensor::<2>::random([rows, dim], Distribution::Normal(0.0, 1.0), &cpu);
    let weight = Tensor::<1>::random([dim], Distribution::Normal(1.0, 0.3), &cpu);
    for train_weight in [false, true] {
        let got = norm_run(device, dtype, &[x.clone(), upstream.clone()], &weight, train_weight, true);
        let want = norm_run(device, dtype, &[x.clone(), upstream.clone()], &weight, train_weight, false);
        assert_eq!(got.len(), want.len());
        for (name, (g, w)) in ["out", "dx", "dweight"].iter().zip(got.iter().zip(&want)) {
            let e = worst(g, w);
            assert!(e < tolerance, "{dtype:?} trained weight {train_weight}: the norm's {name} differs by {e} (relative)");
        }
    }
}

/// `x` `[b, s, n, d]` rotated the way transformers does (`rotate_half`), heads `0..rotated`,
/// with plain (unsigned) `sin`: `[b, n, s, d]`.
fn rope_reference(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>, rotated: usize) -> Tensor<4> {
    let [_, _, n, d] = x.dims();
    let t = x.swap_dims(1, 2);
    let (head, rest) = (t.clone().narrow(1, 0, rotated), t.narrow(1, rotated, n - rotated));
    let half = Tensor::cat(vec![head.clone().narrow(3, d / 2, d / 2).neg(), head.clone().narrow(3, 0, d / 2)], 3);
    Tensor::cat(vec![head * cos + half * sin, rest], 1)
}

fn check_rope(device: &Device, dtype: FloatDType, tolerance: f32, per_row: bool) {
    let cpu = Device::flex();
    let (b, s, n, d) = (2, 5, 6, 8);
    let rotated = 4;
    let tables = if per_row { b } else { 1 };
    // Positions restart in the second row when the tables are per row (packed sequences).
    let angle = |r: usize, t: usize, j: usize| ((t + 3 * r) as f32) * 0.7 + (j % (d / 2)) as f32 * 0.2;
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for r in 0..tables {
        for t in 0..s {
            for j in 0..d {
                cos.push(angle(r, t, j).cos());
                sin.push(angle(r, t, j).sin());
            }
        }
    }
    let signed: Vec<f32> = sin.iter().enumerate().map(|(i, v)| if i % d < d / 2 { -v } else { *v }).collect();
    let table = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [tables * s, d]), &cpu);
    let (cos, sin, signed) = (table(cos), table(sin), table(signed));
    let x = Tensor::<4>::random([b, s, n, d], Distribution::Normal(0.0, 1.0), &cpu);
    let upstream = Tensor::<4>::random([b, n, s, d], Distribution::Normal(0.0, 1.0), &cpu);
    let run = |fused: bool| {
        let on = |t: &Tensor<2>| t.clone().to_device(device).cast(dtype);
        let input = x.clone().to_device(device).cast(dtype).autodiff().require_grad();
        let out = if fused {
            rotary(input.clone(), on(&cos).autodiff(), on(&signed).autodiff(), rotated)
        } else {
            let expand = |t: &Tensor<2>| on(t).reshape([tables, 1, s, d]).autodiff();
            rope_reference(input.clone(), expand(&cos), expand(&sin), rotated)
        };
        let grads = (out.clone().cast(FloatDType::F32) * upstream.clone().to_device(device).autodiff()).sum().backward();
        assert_eq!(out.dims(), [b, n, s, d]);
        [host(out.inner()), host(input.grad(&grads).expect("dx"))]
    };
    let (got, want) = (run(true), run(false));
    for (name, (g, w)) in ["out", "dx"].iter().zip(got.iter().zip(&want)) {
        let e = worst(g, w);
        assert!(e < tolerance, "{dtype:?} per-row tables {per_row}: the rotation's {name} differs by {e} (relative)");
    }
}

#[test]
fn norm_and_rotary_backward_match_the_composition_on_the_cpu() {
    let cpu = Device::flex();
    check_norm(&cpu, FloatDType::F32, 1e-5);
    check_rope(&cpu, FloatDType::F32, 1e-6, false);
    check_rope(&cpu, FloatDType::F32, 1e-6, true);
}

/// wgpu (lavapipe in CI): the kernels; skipped without an adapter unless `LORA_REQUIRE_WGPU` is
/// set.
#[test]
fn norm_and_rotary_backward_match_the_composition_on_wgpu() {
    let Some(device) = wgpu_device_for_tests() else { return };
    check_norm(&device, FloatDType::F32, 1e-5);
    check_norm(&device, FloatDType::F16, 2e-2);
    for per_row in [false, true] {
        check_rope(&device, FloatDType::F32, 1e-5, per_row);
        check_rope(&device, FloatDType::F16, 1e-2, per_row);
    }
}
