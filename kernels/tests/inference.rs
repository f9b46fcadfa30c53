//! The inference kernels against the same computation on the CPU: the decode-time
//! matrix-vector product of a frozen weight (a few rows of `x`, widths that are not multiples of
//! the unrolled step or of the outputs per workgroup), the decode-step attention (grouped-query
//! heads, a cache with unwritten positions and a sliding window masked by the bias) and RMSNorm,
//! in f32 and f16. The references run on the CPU, so the GPU compiles only the kernels under
//! test (lavapipe compiles slowly).

use burn::tensor::{DType, Device, Distribution, FloatDType, Tensor, TensorData};
use lora_kernels::decode::decode_attention;
use lora_kernels::device::wgpu_device_for_tests;
use lora_kernels::frozen_linear;
use lora_kernels::matvec::MATVEC_ROWS;
use lora_kernels::norm::rms_norm;
use lora_kernels::rope::rotary_cached;

/// The wgpu device, or `None` (test skipped) without an adapter unless `LORA_REQUIRE_WGPU` is set.
fn gpu() -> Option<Device> {
    wgpu_device_for_tests()
}

fn max_diff(got: Vec<f32>, want: &[f32]) -> f32 {
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn frozen_linear_of_a_few_rows_matches_the_matmul_on_wgpu() {
    let Some(device) = gpu() else { return };
    // k = 2·256 + 37 covers the unrolled loop and its tail; n = 8·5 + 3 a partial workgroup.
    let (k, n) = (549, 43);
    for (m, dtype, tolerance) in [(MATVEC_ROWS, FloatDType::F32, 1e-4), (3, FloatDType::F16, 2e-2)] {
        // The reference on the CPU: the GPU compiles only the kernel under test.
        let cpu = Device::flex();
        let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
        let w = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.05), (&cpu, DType::F32));
        let want: Vec<f32> = x.clone().matmul(w.clone().transpose()).into_data().try_to_vec::<f32>().unwrap();
        let (x, w) = (x.to_device(&device), w.to_device(&device));
        let got = frozen_linear(x.cast(dtype), w.cast(dtype));
        assert_eq!(got.dims(), [m, n]);
        let worst = max_diff(got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want);
        assert!(worst < tolerance, "m {m} {dtype:?}: max difference {worst}");
    }
}

#[test]
fn decode_attention_kernel_matches_the_composition_on_wgpu() {
    let Some(device) = gpu() else { return };
    let cpu = Device::flex();
    // 4 query heads over 2 key/value heads, head_dim 32, a cache of 256 with 200 positions
    // written and a window of 150: keys 50..=199 are seen.
    let (b, h, kv, d, capacity, past, window) = (2, 4, 2, 32, 256, 199, 150);
    let q = Tensor::<4>::random([b, h, 1, d], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let keys = Tensor::<4>::random([b, kv, capacity, d], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let values = Tensor::<4>::random([b, kv, capacity, d], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let row: Vec<f32> = (0..capacity).map(|k| if k > past || past - k.min(past) >= window { f32::MIN } else { 0.0 }).collect();
    let bias = Tensor::<2>::from_data(TensorData::new([row.clone(), row].concat(), [b, capacity]), (&cpu, DType::F32));
    let want = decode_attention(q.clone(), keys.clone(), values.clone(), bias.clone());
    // The CPU composition itself against softmax over the seen keys only.
    let seen = |t: Tensor<4>| t.narrow(2, past + 1 - window, window);
    let scores = q.clone().reshape([b, kv, 2, d]).matmul(seen(keys.clone()).swap_dims(2, 3)) / (d as f32).sqrt();
    let plain = burn::tensor::activation::softmax(scores, 3).matmul(seen(values.clone())).reshape([b, h, 1, d]);
    let worst: f32 = (want.clone() - plain).abs().max().into_scalar();
    assert!(worst < 1e-5, "composition vs plain softmax: {worst}");
    let want: Vec<f32> = want.into_data().try_to_vec::<f32>().unwrap();
    for (dtype, tolerance) in [(FloatDType::F32, 1e-4), (FloatDType::F16, 1e-2)] {
        let on = |t: &Tensor<4>| t.clone().to_device(&device).cast(dtype);
        let got = decode_attention(on(&q), on(&keys), on(&values), bias.clone().to_device(&device));
        assert_eq!(got.dims(), [b, h, 1, d]);
        let worst = max_diff(got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want);
        assert!(worst < tolerance, "{dtype:?}: max difference {worst}");
    }
}

#[test]
fn rms_norm_kernel_matches_the_composition_on_wgpu() {
    let Some(device) = gpu() else { return };
    let cpu = Device::flex();
    // 3 rows of 300: a row is not a multiple of the workgroup.
    let x = Tensor::<2>::random([3, 300], Distribution::Normal(0.5, 2.0), (&cpu, DType::F32));
    let w = Tensor::<1>::random([300], Distribution::Normal(1.0, 0.1), (&cpu, DType::F32));
    let want = rms_norm(x.clone(), w.clone(), 1e-5);
    let plain = x.clone() / (x.clone().square().mean_dim(1) + 1e-5).sqrt() * w.clone().unsqueeze::<2>();
    let worst: f32 = (want.clone() - plain).abs().max().into_scalar();
    assert!(worst < 1e-5, "composition vs plain RMSNorm: {worst}");
    let want: Vec<f32> = want.into_data().try_to_vec::<f32>().unwrap();
    for (dtype, tolerance) in [(FloatDType::F32, 1e-5), (FloatDType::F16, 2e-2)] {
        let got = rms_norm(x.clone().to_device(&device).cast(dtype), w.clone().to_device(&device).cast(dtype), 1e-5);
        let worst = max_diff(got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want);
        assert!(worst < tolerance, "{dtype:?}: max difference {worst}");
    }
}

#[test]
fn swiglu_of_a_few_rows_matches_the_composition_on_wgpu() {
    let Some(device) = gpu() else { return };
    let cpu = Device::flex();
    let (m, k, n) = (2, 549, 43);
    let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let gate = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.05), (&cpu, DType::F32));
    let up = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.05), (&cpu, DType::F32));
    let want = lora_kernels::frozen_swiglu(x.clone(), gate.clone(), up.clone());
    let plain = burn::tensor::activation::silu(x.clone().matmul(gate.clone().transpose())) * x.clone().matmul(up.clone().transpose());
    let worst: f32 = (want.clone() - plain).abs().max().into_scalar();
    assert!(worst < 1e-5, "composition vs plain SwiGLU: {worst}");
    let want: Vec<f32> = want.into_data().try_to_vec::<f32>().unwrap();
    for (dtype, tolerance) in [(FloatDType::F32, 1e-4), (FloatDType::F16, 1e-2)] {
        let on = |t: &Tensor<2>| t.clone().to_device(&device).cast(dtype);
        let got = lora_kernels::frozen_swiglu(on(&x), on(&gate), on(&up));
        assert_eq!(got.dims(), [m, n]);
        let worst = max_diff(got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want);
        assert!(worst < tolerance, "{dtype:?}: max difference {worst}");
    }
}

/// The products that compute the input's RMSNorm inside their kernel (attention's three
/// projections, the SwiGLU block) against the norm and then the products: on the CPU (the
/// composition), and on wgpu in f32 and f16, where they also agree with the norm kernel
/// followed by the products. Rows of different scales, so that each row's own factor counts.
#[test]
fn products_with_the_norm_inside_match_the_norm_then_the_products() {
    // 3 rows take the kernels, 9 (past MATVEC_ROWS) the norm's kernel and then the products.
    for m in [3, MATVEC_ROWS + 1] {
        norm_inside_products(m);
    }
}

fn norm_inside_products(m: usize) {
    let cpu = Device::flex();
    let (k, eps) = (549, 1e-5);
    let scales: Vec<f32> = (0..m).map(|i| 0.5 * 3f32.powi(i as i32 % 4)).collect();
    let scale = Tensor::<2>::from_data(TensorData::new(scales, [m, 1]), (&cpu, DType::F32));
    let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32)) * scale;
    let norm = Tensor::<1>::random([k], Distribution::Normal(1.0, 0.2), (&cpu, DType::F32));
    let w: Vec<Tensor<2>> = [43, 9, 9].iter().map(|&n| Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.05), (&cpu, DType::F32))).collect();
    let normed = rms_norm(x.clone(), norm.clone(), eps);
    let three = |x: Tensor<2>, w: &[Tensor<2>]| lora_kernels::frozen_linear3(x, w[0].clone(), w[1].clone(), w[2].clone());
    let want3: Vec<f32> = three(normed.clone(), &w).into_data().try_to_vec::<f32>().unwrap();
    let want_swiglu: Vec<f32> = lora_kernels::frozen_swiglu(normed, w[1].clone(), w[2].clone()).into_data().try_to_vec::<f32>().unwrap();
    let norm3 = |x: Tensor<2>, norm: Tensor<1>, w: &[Tensor<2>]| lora_kernels::frozen_norm_linear3(x, norm, eps, w[0].clone(), w[1].clone(), w[2].clone());
    let norm_swiglu = |x: Tensor<2>, norm: Tensor<1>, w: &[Tensor<2>]| lora_kernels::frozen_norm_swiglu(x, norm, eps, w[1].clone(), w[2].clone());
    let values = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    assert!(max_diff(values(norm3(x.clone(), norm.clone(), &w)), &want3) < 1e-5, "CPU three products");
    assert!(max_diff(values(norm_swiglu(x.clone(), norm.clone(), &w)), &want_swiglu) < 1e-5, "CPU SwiGLU");
    let Some(device) = gpu() else { return };
    for (dtype, tolerance) in [(FloatDType::F32, 1e-4), (FloatDType::F16, 2e-2)] {
        let on = |t: &Tensor<2>| t.clone().to_device(&device).cast(dtype);
        let (x, norm, w) = (on(&x), norm.clone().to_device(&device).cast(dtype), w.iter().map(on).collect::<Vec<_>>());
        let got3 = values(norm3(x.clone(), norm.clone(), &w));
        let got_swiglu = values(norm_swiglu(x.clone(), norm.clone(), &w));
        assert_eq!(got3.len(), m * 61);
        let worst = max_diff(got3.clone(), &want3);
        assert!(worst < tolerance, "{dtype:?} three products: max difference {worst}");
        let worst = max_diff(got_swiglu.clone(), &want_swiglu);
        assert!(worst < tolerance, "{dtype:?} SwiGLU: max difference {worst}");
        // The norm's kernel and then the products, on the same device: the same roundings.
        let normed = rms_norm(x, norm, eps);
        let apart = max_diff(got3, &values(three(normed.clone(), &w)));
        assert!(apart < 1e-3, "{dtype:?} three products against the norm kernel first: {apart}");
        let apart = max_diff(got_swiglu, &values(lora_kernels::frozen_swiglu(normed, w[1].clone(), w[2].clone())));
        assert!(apart < 1e-3, "{dtype:?} SwiGLU against the norm kernel first: {apart}");
    }
}

#[test]
fn product_plus_residual_of_a_few_rows_matches_on_wgpu() {
    let Some(device) = gpu() else { return };
    let cpu = Device::flex();
    let (m, k, n) = (2, 549, 43);
    let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let w = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.05), (&cpu, DType::F32));
    let r = Tensor::<2>::random([m, n], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let want: Vec<f32> = (x.clone().matmul(w.clone().transpose()) + r.clone()).into_data().try_to_vec::<f32>().unwrap();
    for (dtype, tolerance) in [(FloatDType::F32, 1e-4), (FloatDType::F16, 1e-2)] {
        let on = |t: &Tensor<2>| t.clone().to_device(&device).cast(dtype);
        let got = lora_kernels::frozen_linear_add(on(&x), on(&w), on(&r));
        let worst = max_diff(got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want);
        assert!(worst < tolerance, "{dtype:?}: max difference {worst}");
    }
}

#[test]
fn rotary_kernel_matches_the_composition_on_wgpu() {
    let Some(device) = gpu() else { return };
    let cpu = Device::flex();
    // [b, s, heads, d] in, [b, heads, s, d] out.
    let (b, s, n, d) = (2, 3, 5, 8);
    let x = Tensor::<4>::random([b, s, n, d], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let angles: Vec<f32> = (0..s * d).map(|i| (i / d) as f32 * 0.3 + (i % (d / 2)) as f32 * 0.1).collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().enumerate().map(|(i, a)| if i % d < d / 2 { -a.sin() } else { a.sin() }).collect();
    let cos = Tensor::<2>::from_data(TensorData::new(cos, [s, d]), (&cpu, DType::F32));
    let sin = Tensor::<2>::from_data(TensorData::new(sin, [s, d]), (&cpu, DType::F32));
    let want = lora_kernels::rope::rotary(x.clone(), cos.clone(), sin.clone(), n);
    // rotate_half by hand: [-x₂, x₁].
    let t = x.clone().swap_dims(1, 2);
    let rotated = Tensor::cat(vec![t.clone().narrow(3, d / 2, d / 2).neg(), t.clone().narrow(3, 0, d / 2)], 3);
    let plain_sin = sin.clone()
        * Tensor::<2>::from_data(TensorData::new((0..d).map(|j| if j < d / 2 { -1.0f32 } else { 1.0 }).collect::<Vec<_>>(), [1, d]), (&cpu, DType::F32));
    let plain = t * cos.clone().unsqueeze::<4>() + rotated * plain_sin.unsqueeze::<4>();
    let worst: f32 = (want.clone() - plain).abs().max().into_scalar();
    assert!(worst < 1e-6, "composition vs rotate_half: {worst}");
    let want: Vec<f32> = want.into_data().try_to_vec::<f32>().unwrap();
    for (dtype, tolerance) in [(FloatDType::F32, 1e-5), (FloatDType::F16, 1e-2)] {
        let on = |t: &Tensor<2>| t.clone().to_device(&device).cast(dtype);
        let got = lora_kernels::rope::rotary(x.clone().to_device(&device).cast(dtype), on(&cos), on(&sin), n);
        assert_eq!(got.dims(), [b, n, s, d]);
        let worst = max_diff(got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want);
        assert!(worst < tolerance, "{dtype:?}: max difference {worst}");
        // Only the first 3 heads rotated, the other 2 copied (query and key heads ahead of value
        // heads), on the GPU and in the CPU composition.
        let cpu_partial = lora_kernels::rope::rotary(x.clone(), cos.clone(), sin.clone(), 3);
        let partial = lora_kernels::rope::rotary(x.clone().to_device(&device).cast(dtype), on(&cos), on(&sin), 3);
        let full = Tensor::<4>::from_data(TensorData::new(want.clone(), [b, n, s, d]), (&cpu, DType::F32));
        let expect = Tensor::cat(vec![full.narrow(1, 0, 3), x.clone().swap_dims(1, 2).narrow(1, 3, 2)], 1);
        let worst: f32 = (cpu_partial - expect.clone()).abs().max().into_scalar();
        assert!(worst < 1e-6, "CPU partial rotation: {worst}");
        let expect: Vec<f32> = expect.into_data().try_to_vec::<f32>().unwrap();
        let worst = max_diff(partial.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &expect);
        assert!(worst < tolerance, "{dtype:?} partial: max difference {worst}");
    }
}

/// A decoding step's rotation and cache write in one kernel, against the CPU's composition
/// (the rotation, then the key and value heads assigned into the buffers) and that against
/// the rotation by hand: two rows, two new positions written after three, grouped-query heads.
/// The buffers are written in place only where nothing else holds them: a held buffer keeps its
/// old contents.
#[test]
fn rotary_cached_kernel_matches_the_composition_on_wgpu() {
    let Some(device) = gpu() else { return };
    let cpu = Device::flex();
    let (b, s, heads, kv, d, capacity, past) = (2, 2, 4, 2, 8, 8, 3);
    let n = heads + 2 * kv;
    let x = Tensor::<4>::random([b, s, n, d], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let angles: Vec<f32> = (0..s * d).map(|i| (past + i / d) as f32 * 0.3 + (i % (d / 2)) as f32 * 0.1).collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().enumerate().map(|(i, a)| if i % d < d / 2 { -a.sin() } else { a.sin() }).collect();
    let cos = Tensor::<2>::from_data(TensorData::new(cos, [s, d]), (&cpu, DType::F32));
    let sin = Tensor::<2>::from_data(TensorData::new(sin, [s, d]), (&cpu, DType::F32));
    let keys = Tensor::<4>::random([b, kv, capacity, d], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let values = Tensor::<4>::random([b, kv, capacity, d], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let (want_q, want_k, want_v) = rotary_cached(x.clone(), cos.clone(), sin.clone(), keys.clone(), values.clone(), heads, past);
    // The composition against the plain rotation and assignments.
    let all = lora_kernels::rope::rotary(x.clone(), cos.clone(), sin.clone(), heads + kv);
    let at = [0..b, 0..kv, past..past + s, 0..d];
    let plain_k = keys.clone().slice_assign(at.clone(), all.clone().narrow(1, heads, kv));
    let plain_v = values.clone().slice_assign(at, x.clone().swap_dims(1, 2).narrow(1, heads + kv, kv));
    for (got, plain, what) in [(&want_q, all.narrow(1, 0, heads), "q"), (&want_k, plain_k, "keys"), (&want_v, plain_v, "values")] {
        let worst: f32 = (got.clone() - plain).abs().max().into_scalar();
        assert!(worst < 1e-6, "CPU composition, {what}: {worst}");
    }
    // Tables of one row per batch row and position ([b·s, d], as packed rows give them): the
    // same tables repeated give the same result.
    let rows = |t: &Tensor<2>| Tensor::cat(vec![t.clone(); b], 0);
    let (per_row, _, _) = rotary_cached(x.clone(), rows(&cos), rows(&sin), keys.clone(), values.clone(), heads, past);
    let worst: f32 = (per_row - want_q.clone()).abs().max().into_scalar();
    assert!(worst < 1e-6, "CPU composition with a table per row: {worst}");
    for (dtype, tolerance) in [(FloatDType::F32, 1e-5), (FloatDType::F16, 1e-2)] {
        let on = |t: &Tensor<4>| t.clone().to_device(&device).cast(dtype);
        let on2 = |t: &Tensor<2>| t.clone().to_device(&device).cast(dtype);
        let (per_row, k, _) = rotary_cached(on(&x), on2(&rows(&cos)), on2(&rows(&sin)), on(&keys), on(&values), heads, past);
        let worst = max_diff(per_row.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want_q.clone().into_data().try_to_vec::<f32>().unwrap());
        assert!(worst < tolerance, "{dtype:?} q with a table per row: max difference {worst}");
        let worst = max_diff(k.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want_k.clone().into_data().try_to_vec::<f32>().unwrap());
        assert!(worst < tolerance, "{dtype:?} keys with a table per row: max difference {worst}");
        let held = on(&keys);
        let (q, k, v) = rotary_cached(on(&x), on2(&cos), on2(&sin), held.clone(), on(&values), heads, past);
        assert_eq!(q.dims(), [b, heads, s, d]);
        for (got, want, what) in [(q, &want_q, "q"), (k, &want_k, "keys"), (v, &want_v, "values")] {
            let worst = max_diff(got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want.clone().into_data().try_to_vec::<f32>().unwrap());
            assert!(worst < tolerance, "{dtype:?} {what}: max difference {worst}");
        }
        let untouched = max_diff(held.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &keys.clone().into_data().try_to_vec::<f32>().unwrap());
        assert!(untouched < tolerance, "{dtype:?}: a held buffer was written: {untouched}");
    }
}

/// The greedy pick takes the first of equal largest logits (as `torch.argmax` and the host
/// sampler do) and flags a NaN or an infinity anywhere, on a vocabulary that is not a multiple
/// of the workgroup.
#[test]
fn greedy_pick_takes_the_first_maximum_and_flags_non_finite_logits() {
    let Some(device) = gpu() else { return };
    let vocab = 1000;
    let logits = |set: &[(usize, f32)]| {
        let mut v: Vec<f32> = (0..vocab).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
        for &(i, x) in set {
            v[i] = x;
        }
        Tensor::<2>::from_data(TensorData::new(v, [1, vocab]), (&device, DType::F32))
    };
    let pick = |t: Tensor<2>| lora_kernels::decode::greedy_pick(t).into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    assert_eq!(pick(logits(&[(700, 5.0), (300, 5.0), (999, 4.0)])), [300.0, 0.0]);
    assert_eq!(pick(logits(&[(7, 5.0)]).cast(FloatDType::F16)), [7.0, 0.0]);
    assert_ne!(pick(logits(&[(500, f32::NAN)]))[1], 0.0);
    assert_ne!(pick(logits(&[(501, f32::INFINITY)]))[1], 0.0);
    // The CPU composition agrees.
    let cpu = Device::flex();
    let host = Tensor::<2>::from_data(logits(&[(700, 5.0), (300, 5.0)]).into_data(), (&cpu, DType::F32));
    assert_eq!(lora_kernels::decode::greedy_pick(host).into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), [300.0, 0.0]);
}

#[test]
fn three_products_in_one_launch_match_on_wgpu() {
    let Some(device) = gpu() else { return };
    let cpu = Device::flex();
    let (m, k) = (1, 549);
    let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
    let w: Vec<Tensor<2>> = [43, 9, 9].iter().map(|&n| Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.05), (&cpu, DType::F32))).collect();
    let want: Vec<f32> = Tensor::cat(w.iter().map(|w| x.clone().matmul(w.clone().transpose())).collect(), 1).into_data().try_to_vec::<f32>().unwrap();
    let cpu_got = lora_kernels::frozen_linear3(x.clone(), w[0].clone(), w[1].clone(), w[2].clone());
    assert!(max_diff(cpu_got.into_data().try_to_vec::<f32>().unwrap(), &want) < 1e-5);
    for (dtype, tolerance) in [(FloatDType::F32, 1e-4), (FloatDType::F16, 1e-2)] {
        let on = |t: &Tensor<2>| t.clone().to_device(&device).cast(dtype);
        let got = lora_kernels::frozen_linear3(on(&x), on(&w[0]), on(&w[1]), on(&w[2]));
        assert_eq!(got.dims(), [m, 61]);
        let worst = max_diff(got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &want);
        assert!(worst < tolerance, "{dtype:?}: max difference {worst}");
    }
}
