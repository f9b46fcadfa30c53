//! The GPU attention kernels (`lora_kernels::flash`) against the plain composition of tensor
//! operations, forward and gradients: grouped-query attention, key padding, rows packed with
//! several sequences, sliding windows and sequences that are not a multiple of the kernels'
//! 64-position blocks.
//!
//! On a device without tensor cores (lavapipe in CI) the scalar kernels run; on one with them
//! (`LORA_REQUIRE_MMA` set, as on the lent GPU) the tensor-core kernels must run and are checked
//! too. One test function: the kernels' mode is process-wide.

mod common;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use common::{reference, test_flags};
use lora_kernels::attention::{Masking, attention};
use lora_kernels::device::wgpu_device_for_tests;
use lora_kernels::flash::{self, Mode, Path};

/// Largest difference between the kernels' and the reference's output and gradients, each
/// relative to the reference's largest magnitude: `[out, dq, dk, dv]`, for the key flags of
/// `test_flags` (row 0: three packed sequences; row 1: 3 left pads).
fn relative_errors(device: &Device, dtype: DType, dims: (usize, usize, usize, usize), s: usize, window: Option<usize>) -> [f32; 4] {
    relative_errors_with(device, dtype, dims, s, window, test_flags(dims.0, s), 0.0)
}

/// [`relative_errors`] for the key flags `keys` `[b, s]`, with key `j` multiplied by `1 + growth
/// · j / 64`. The kernels' keys and values are NaN wherever a whole block of 64 positions holds
/// no visible key: the kernels must skip such blocks (the reference, on the clean values, does
/// not read them either). Growing keys make a row's largest score grow from block to block, so
/// that the forward's online softmax moves its reference point and rescales what it summed.
fn relative_errors_with(
    device: &Device,
    dtype: DType,
    (b, h, kv, d): (usize, usize, usize, usize),
    s: usize,
    window: Option<usize>,
    keys: Vec<f32>,
    growth: f32,
) -> [f32; 4] {
    let flag_values: Vec<f32> = keys.iter().map(|&k| k.min(1.0)).collect();
    let flags = Tensor::<2>::from_data(TensorData::new(keys.clone(), [b, s]), (device, DType::F32));
    // Query rows that may see no key (row 1's pads) are defined only as "some average" by the
    // composition and as 0 by the kernels; their outputs never reach a loss, so they are left out.
    let seen = Tensor::<4>::from_data(TensorData::new(flag_values, [b, 1, s, 1]), (device, DType::F32));
    let random = |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), (device, DType::F32)).cast(dtype);
    let ramp: Vec<f32> = (0..s).map(|j| 1.0 + growth * j as f32 / flash::BLOCK as f32).collect();
    let ramp = Tensor::<4>::from_data(TensorData::new(ramp, [1, 1, s, 1]), (device, DType::F32));
    let k0 = (random([b, kv, s, d]).cast(DType::F32) * ramp).cast(dtype);
    let (q0, v0) = (random([b, h, s, d]), random([b, kv, s, d]));
    let hidden_block: Vec<bool> =
        (0..b * s).map(|i| keys[i / s * s..][..s].chunks(flash::BLOCK).nth(i % s / flash::BLOCK).is_some_and(|c| c.iter().all(|&f| f < 0.5))).collect();
    let poison = Tensor::<4, burn::tensor::Bool>::from_data(TensorData::new(hidden_block, [b, 1, s, 1]), device).expand([b, kv, s, d]);
    let poisoned = |t: &Tensor<4>| t.clone().mask_fill(poison.clone(), f32::NAN);
    let upstream = Tensor::<4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), (device, DType::F32)) * seen.clone();
    let grads_of = |kernel: bool| {
        // The reference runs in f32 on the same (rounded) inputs.
        let input = |t: &Tensor<4>| if kernel { t.clone() } else { t.clone().cast(DType::F32) }.autodiff().require_grad();
        let (q, k, v) = (input(&q0), input(&k0), input(&v0));
        let (k_in, v_in) = if kernel { (poisoned(&k), poisoned(&v)) } else { (k.clone(), v.clone()) };
        let out = if kernel {
            attention(q.clone(), k_in, v_in, flags.clone().autodiff(), Masking { window, chunk: 0 })
        } else {
            reference(q.clone(), k_in, v_in, &keys, window)
        };
        let out = out.cast(DType::F32);
        let grads = (out.clone() * upstream.clone().autodiff()).sum().backward();
        let g = |t: &Tensor<4>| t.grad(&grads).expect("a gradient").cast(DType::F32);
        [out.inner() * seen.clone(), g(&q), g(&k), g(&v)]
    };
    let ours = grads_of(true);
    let theirs = grads_of(false);
    let mut errors = [0f32; 4];
    for (e, (a, b)) in errors.iter_mut().zip(ours.into_iter().zip(theirs)) {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        *e = (a - b).abs().max().into_scalar::<f32>() / scale;
    }
    errors
}

fn check(device: &Device, path: Path, dtype: DType, dims: (usize, usize, usize, usize), s: usize, window: Option<usize>) {
    check_with(device, path, dtype, dims, s, window, test_flags(dims.0, s), 0.0);
}

/// The kernels ran on `path` and agree with the reference within 1e-5 (f32) or 2e-2 (f16) of
/// its largest magnitude.
#[allow(clippy::too_many_arguments)]
fn check_with(device: &Device, path: Path, dtype: DType, dims: (usize, usize, usize, usize), s: usize, window: Option<usize>, keys: Vec<f32>, growth: f32) {
    let tolerance = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
    let before = flash::launched(path);
    let errors = relative_errors_with(device, dtype, dims, s, window, keys, growth);
    assert_eq!(flash::launched(path), before + 2, "{path:?}: the kernels did not run (forward and backward) for {dims:?}, s {s}");
    assert!(errors.iter().all(|e| *e < tolerance), "{path:?} {dtype:?} {dims:?} s {s} window {window:?}: out, dq, dk, dv differ by {errors:?} (relative)");
}

#[test]
fn flash_attention_matches_the_composition_on_wgpu() {
    let Some(device) = wgpu_device_for_tests() else { return };
    flash::set_mode(Mode::Scalar);
    // Two query blocks and a partial third; a window that spans block boundaries.
    check(&device, Path::Scalar, DType::F32, (2, 4, 2, 8), 70, None);
    check(&device, Path::Scalar, DType::F32, (2, 4, 2, 8), 150, Some(70));
    // Blocks whose flags cannot meet are skipped: row 0 packs sequences of 70, 130, 40 and 60
    // tokens (then 20 pads), so its third and fourth query blocks skip the first key block;
    // row 1 starts with 130 pads, two whole blocks without a visible key (NaN in the kernels'
    // keys and values, see `relative_errors_with`).
    check_with(&device, Path::Scalar, DType::F32, (2, 4, 2, 8), 320, None, skipping_flags(320), 0.0);
    check_with(&device, Path::Scalar, DType::F32, (2, 4, 2, 8), 320, Some(100), skipping_flags(320), 0.0);
    // Keys that grow along the row (scores up to about 40 at the end): the forward rescales.
    check_with(&device, Path::Scalar, DType::F32, (2, 4, 2, 8), 320, None, test_flags(2, 320), 4.0);
    // Half precision pads the kernels' tiles in workgroup memory, and stages each step's key and
    // value (or query and output-gradient) blocks there, both at once and then one at a time.
    for staging in [2, 1] {
        flash::set_staging(staging);
        check(&device, Path::Scalar, DType::F16, (2, 4, 2, 8), 150, Some(70));
        check_with(&device, Path::Scalar, DType::F16, (2, 4, 2, 8), 320, None, skipping_flags(320), 4.0);
    }
    flash::set_staging(2);

    flash::set_mode(Mode::Mma);
    let before = flash::launched(Path::Mma);
    let errors = relative_errors(&device, DType::F16, (2, 4, 2, 64), 200, None);
    if flash::launched(Path::Mma) == before {
        assert!(std::env::var_os("LORA_REQUIRE_MMA").is_none(), "LORA_REQUIRE_MMA is set but the tensor-core kernels did not run");
        eprintln!("skipped: this device has no 16x16x16 f16 cooperative matrices on planes of 32");
        return;
    }
    assert!(errors.iter().all(|e| *e < 2e-2), "Mma f16 d 64 s 200: out, dq, dk, dv differ by {errors:?} (relative)");
    check(&device, Path::Mma, DType::F16, (2, 8, 2, 128), 192, Some(100));
    check(&device, Path::Mma, DType::F16, (1, 4, 4, 64), 512, None);
    check_with(&device, Path::Mma, DType::F16, (2, 4, 2, 64), 320, None, skipping_flags(320), 0.0);
    check_with(&device, Path::Mma, DType::F16, (2, 4, 2, 64), 320, None, skipping_flags(320), 4.0);
    check_with(&device, Path::Mma, DType::F16, (1, 4, 2, 128), 256, None, test_flags(1, 256), 4.0);
    // Head size 64 stages two blocks at a time; one at a time too (128 always does).
    flash::set_staging(1);
    check_with(&device, Path::Mma, DType::F16, (2, 4, 2, 64), 320, None, skipping_flags(320), 4.0);
    flash::set_staging(2);
}

/// Two rows of `s` flags: packed sequences of 70, 130, 40 and 60 tokens then pads, and 130
/// pads then one sequence.
fn skipping_flags(s: usize) -> Vec<f32> {
    let packed = (0..s).map(|p| match p {
        0..70 => 1.0,
        70..200 => 2.0,
        200..240 => 3.0,
        240..300 => 4.0,
        _ => 0.0,
    });
    packed.chain((0..s).map(|p| if p < 130 { 0.0 } else { 1.0 })).collect()
}
