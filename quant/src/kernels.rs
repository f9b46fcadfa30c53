//! CubeCL kernels for packed weights: they run on every CubeCL runtime (wgpu through
//! Vulkan, Metal or DX12, and cuda).
//!
//! - [`affine_dequantize`] and [`nf4_dequantize`] turn one layer's packed words into its
//!   dense weight in a single pass, one unit per weight. Large products (prefill and
//!   training) multiply that with the backend's tuned matmul.
//! - [`affine_matvec`] and [`nf4_matvec`] compute `x·Wᵀ` for a few rows of `x` (decoding)
//!   straight from the packed words: 32 units share one output, each reads whole words
//!   (consecutive units, consecutive words), and the partial sums meet in shared memory.
//!   They read bits/8 bytes per weight instead of 2, which is what decoding is bound by.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;
use lora_kernels::matvec::{LANES, Norm, input, lane_total, launch_matvec, matvec_unit, norm_args, rms_factor};

/// Whether [`affine_matvec`] handles `bits`: codes must not cross words.
pub fn matvec_supports(bits: usize) -> bool {
    32 % bits == 0
}

#[cube(launch_unchecked)]
fn affine_dequantize_kernel<F: Float>(
    packed: &Tensor<u32>,
    scales: &Tensor<F>,
    biases: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] bits: u32,
    #[comptime] group_size: usize,
    #[define(F)] _dtype: ElemType,
) {
    let pos = ABSOLUTE_POS;
    if pos >= output.len() {
        terminate!();
    }
    let cols = output.shape(1);
    let row = pos / cols;
    let col = pos % cols;
    let bit = col * comptime!(bits as usize);
    let word = row * packed.shape(1) + bit / 32;
    let shift = u32::cast_from(bit % 32);
    let mut code = packed[word] >> shift;
    if shift + bits > 32 {
        code |= packed[word + 1] << (32 - shift);
    }
    code &= comptime!((1u32 << bits) - 1);
    let group = row * scales.shape(1) + col / group_size;
    output[pos] = F::cast_from(code) * scales[group] + biases[group];
}

#[cube(launch_unchecked)]
fn nf4_dequantize_kernel<F: Float>(packed: &Tensor<u32>, absmax: &Tensor<f32>, levels: &Tensor<f32>, output: &mut Tensor<F>, #[define(F)] _dtype: ElemType) {
    let pos = ABSOLUTE_POS;
    if pos >= output.len() {
        terminate!();
    }
    let code = (packed[pos / 8] >> u32::cast_from((pos % 8) * 4)) & 15;
    output[pos] = F::cast_from(levels[code as usize] * absmax[pos / 64]);
}

/// `output[at]` = the product `total` rounded to the dtype, plus `residual[at]` when `add` (after
/// the rounding, as a separate addition would).
#[cube]
fn write_output<F: Float>(output: &mut Tensor<F>, residual: &Tensor<F>, at: usize, total: f32, #[comptime] add: bool) {
    let mut value = F::cast_from(total);
    if comptime!(add) {
        value += residual[at];
    }
    output[at] = value;
}

/// This lane's part of row `i` of `x` (read through `input`: as it is, or RMS-normalized by
/// the factor `r` and scaled by `norm` when `normed`) times row `n` of the affine weight:
/// consecutive lanes read consecutive words.
#[cube]
#[allow(clippy::too_many_arguments)]
fn affine_lane_dot<F: Float>(
    x: &Tensor<F>,
    norm: &Tensor<F>,
    r: f32,
    packed: &Tensor<u32>,
    scales: &Tensor<F>,
    biases: &Tensor<F>,
    n: usize,
    i: usize,
    lane: usize,
    #[comptime] bits: u32,
    #[comptime] group_size: usize,
    #[comptime] normed: bool,
) -> f32 {
    let per_word = comptime!((32 / bits) as usize);
    let mask = comptime!((1u32 << bits) - 1);
    let (words, k, groups) = (packed.shape(1), x.shape(1), scales.shape(1));
    let mut acc = 0f32;
    for w in range_stepped(lane, words, comptime!(LANES as usize)) {
        let word = packed[n * words + w];
        let k0 = w * per_word;
        let base = i * k + k0;
        let mut dot = 0f32;
        let mut sum = 0f32;
        #[unroll]
        for j in 0..per_word {
            let xv = input(x, norm, base + j, k0 + j, r, normed);
            dot += xv * f32::cast_from((word >> comptime!(j as u32 * bits)) & mask);
            sum += xv;
        }
        let group = n * groups + k0 / group_size;
        acc += f32::cast_from(scales[group]) * dot + f32::cast_from(biases[group]) * sum;
    }
    acc
}

/// This lane's part of row `i` of `x` (read through `input`, as [`affine_lane_dot`] reads it)
/// times row `n` of the NF4 weight.
#[cube]
#[allow(clippy::too_many_arguments)]
fn nf4_lane_dot<F: Float>(
    x: &Tensor<F>,
    norm: &Tensor<F>,
    r: f32,
    packed: &Tensor<u32>,
    absmax: &Tensor<f32>,
    levels: &Tensor<f32>,
    n: usize,
    i: usize,
    lane: usize,
    #[comptime] normed: bool,
) -> f32 {
    let (words, k) = (packed.shape(1), x.shape(1));
    let mut acc = 0f32;
    for w in range_stepped(lane, words, comptime!(LANES as usize)) {
        let word = packed[n * words + w];
        let k0 = w * 8;
        let base = i * k + k0;
        let mut dot = 0f32;
        #[unroll]
        for j in 0..8u32 {
            let code = (word >> comptime!(j * 4)) & 15;
            dot += input(x, norm, base + j as usize, k0 + j as usize, r, normed) * levels[code as usize];
        }
        acc += absmax[(n * k + k0) / 64] * dot;
    }
    acc
}

#[cube(launch_unchecked)]
fn affine_matvec_kernel<F: Float>(
    x: &Tensor<F>,
    packed: &Tensor<u32>,
    scales: &Tensor<F>,
    biases: &Tensor<F>,
    residual: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] bits: u32,
    #[comptime] group_size: usize,
    #[comptime] add: bool,
    #[define(F)] _dtype: ElemType,
) {
    let (lane, n, i) = matvec_unit();
    let rows = packed.shape(0);
    let mut acc = 0f32;
    if n < rows {
        acc = affine_lane_dot(x, x, 1f32, packed, scales, biases, n, i, lane, bits, group_size, false);
    }
    let total = lane_total(acc);
    if lane == 0 && n < rows {
        write_output(output, residual, i * rows + n, total, add);
    }
}

#[cube(launch_unchecked)]
fn nf4_matvec_kernel<F: Float>(
    x: &Tensor<F>,
    packed: &Tensor<u32>,
    absmax: &Tensor<f32>,
    levels: &Tensor<f32>,
    residual: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] add: bool,
    #[define(F)] _dtype: ElemType,
) {
    let (lane, n, i) = matvec_unit();
    let rows = packed.shape(0);
    let mut acc = 0f32;
    if n < rows {
        acc = nf4_lane_dot(x, x, 1f32, packed, absmax, levels, n, i, lane, false);
    }
    let total = lane_total(acc);
    if lane == 0 && n < rows {
        write_output(output, residual, i * rows + n, total, add);
    }
}

/// RMSNorm's factor of row `i` of `x` when `normed` (every unit of the workgroup calls it), else 1.
#[cube]
fn row_factor<F: Float>(x: &Tensor<F>, i: usize, eps: f32, #[comptime] normed: bool) -> f32 {
    let mut r = 1f32;
    if comptime!(normed) {
        let k = x.shape(1);
        r = rms_factor(x, i * k, k, eps);
    }
    r
}

/// `output[at]` = `silu(g)·u` of the two products' totals, in f32, rounded once.
#[cube]
fn write_swiglu<F: Float>(output: &mut Tensor<F>, at: usize, g: f32, u: f32) {
    output[at] = F::cast_from(g / (1.0f32 + (-g).exp()) * u);
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn affine_swiglu_kernel<F: Float>(
    x: &Tensor<F>,
    norm: &Tensor<F>,
    gate: &Tensor<u32>,
    gate_scales: &Tensor<F>,
    gate_biases: &Tensor<F>,
    up: &Tensor<u32>,
    up_scales: &Tensor<F>,
    up_biases: &Tensor<F>,
    output: &mut Tensor<F>,
    eps: f32,
    #[comptime] normed: bool,
    #[comptime] bits: u32,
    #[comptime] group_size: usize,
    #[define(F)] _dtype: ElemType,
) {
    let (lane, n, i) = matvec_unit();
    let rows = gate.shape(0);
    let r = row_factor(x, i, eps, normed);
    let mut g = 0f32;
    let mut u = 0f32;
    if n < rows {
        g = affine_lane_dot(x, norm, r, gate, gate_scales, gate_biases, n, i, lane, bits, group_size, normed);
        u = affine_lane_dot(x, norm, r, up, up_scales, up_biases, n, i, lane, bits, group_size, normed);
    }
    let g = lane_total(g);
    let u = lane_total(u);
    if lane == 0 && n < rows {
        write_swiglu(output, i * rows + n, g, u);
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn nf4_swiglu_kernel<F: Float>(
    x: &Tensor<F>,
    norm: &Tensor<F>,
    gate: &Tensor<u32>,
    gate_absmax: &Tensor<f32>,
    up: &Tensor<u32>,
    up_absmax: &Tensor<f32>,
    levels: &Tensor<f32>,
    output: &mut Tensor<F>,
    eps: f32,
    #[comptime] normed: bool,
    #[define(F)] _dtype: ElemType,
) {
    let (lane, n, i) = matvec_unit();
    let rows = gate.shape(0);
    let r = row_factor(x, i, eps, normed);
    let mut g = 0f32;
    let mut u = 0f32;
    if n < rows {
        g = nf4_lane_dot(x, norm, r, gate, gate_absmax, levels, n, i, lane, normed);
        u = nf4_lane_dot(x, norm, r, up, up_absmax, levels, n, i, lane, normed);
    }
    let g = lane_total(g);
    let u = lane_total(u);
    if lane == 0 && n < rows {
        write_swiglu(output, i * rows + n, g, u);
    }
}

/// Attention's three input projections from packed words in one launch: output columns `0..nq`
/// from `q`, then `k`'s, then `v`'s.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn affine_matvec3_kernel<F: Float>(
    x: &Tensor<F>,
    norm: &Tensor<F>,
    q: &Tensor<u32>,
    q_scales: &Tensor<F>,
    q_biases: &Tensor<F>,
    k: &Tensor<u32>,
    k_scales: &Tensor<F>,
    k_biases: &Tensor<F>,
    v: &Tensor<u32>,
    v_scales: &Tensor<F>,
    v_biases: &Tensor<F>,
    output: &mut Tensor<F>,
    eps: f32,
    #[comptime] normed: bool,
    #[comptime] bits: u32,
    #[comptime] group_size: usize,
    #[define(F)] _dtype: ElemType,
) {
    let (lane, n, i) = matvec_unit();
    let (nq, nk, nv) = (q.shape(0), k.shape(0), v.shape(0));
    let rows = nq + nk + nv;
    let r = row_factor(x, i, eps, normed);
    let mut acc = 0f32;
    if n < nq {
        acc = affine_lane_dot(x, norm, r, q, q_scales, q_biases, n, i, lane, bits, group_size, normed);
    } else if n < nq + nk {
        acc = affine_lane_dot(x, norm, r, k, k_scales, k_biases, n - nq, i, lane, bits, group_size, normed);
    } else if n < rows {
        acc = affine_lane_dot(x, norm, r, v, v_scales, v_biases, n - nq - nk, i, lane, bits, group_size, normed);
    }
    let total = lane_total(acc);
    if lane == 0 && n < rows {
        output[i * rows + n] = F::cast_from(total);
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn nf4_matvec3_kernel<F: Float>(
    x: &Tensor<F>,
    norm: &Tensor<F>,
    q: &Tensor<u32>,
    q_absmax: &Tensor<f32>,
    k: &Tensor<u32>,
    k_absmax: &Tensor<f32>,
    v: &Tensor<u32>,
    v_absmax: &Tensor<f32>,
    levels: &Tensor<f32>,
    output: &mut Tensor<F>,
    eps: f32,
    #[comptime] normed: bool,
    #[define(F)] _dtype: ElemType,
) {
    let (lane, n, i) = matvec_unit();
    let (nq, nk, nv) = (q.shape(0), k.shape(0), v.shape(0));
    let rows = nq + nk + nv;
    let r = row_factor(x, i, eps, normed);
    let mut acc = 0f32;
    if n < nq {
        acc = nf4_lane_dot(x, norm, r, q, q_absmax, levels, n, i, lane, normed);
    } else if n < nq + nk {
        acc = nf4_lane_dot(x, norm, r, k, k_absmax, levels, n - nq, i, lane, normed);
    } else if n < rows {
        acc = nf4_lane_dot(x, norm, r, v, v_absmax, levels, n - nq - nk, i, lane, normed);
    }
    let total = lane_total(acc);
    if lane == 0 && n < rows {
        output[i * rows + n] = F::cast_from(total);
    }
}

fn launch_elementwise(output: &CubeTensor) -> (CubeCount, CubeDim) {
    let n = output.shape().num_elements();
    let cube_dim = CubeDim::new(&output.client, n);
    (calculate_cube_count_elemwise(&output.client, n, cube_dim), cube_dim)
}

fn empty(like: &CubeTensor, shape: [usize; 2], dtype: DType) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), Shape::new(shape), dtype)
}

/// Launches `$kernel` over the cubes `$grid(&$output)` gives, on `$inputs` made
/// contiguous, then `$output`, then the kernel's comptime arguments, and returns `$output`.
/// The kernels are unchecked: each caller says why every index they read is in bounds.
macro_rules! launch {
    ($kernel:ident, $grid:ident, [$($input:ident),+], $output:expr, $($comptime:expr),+) => {{
        let output: CubeTensor = $output;
        let (count, dim) = $grid(&output);
        $(let $input = into_contiguous($input).into_tensor_arg();)+
        // SAFETY: the caller's, above the call.
        unsafe { $kernel::launch_unchecked(&output.client, count, dim, $($input,)+ output.clone().into_tensor_arg(), $($comptime),+) }
        output
    }};
}

/// The dense affine weight `[n, k]` from words `[n, k·bits/32]`, in the scales' dtype.
pub fn affine_dequantize(packed: CubeTensor, scales: CubeTensor, biases: CubeTensor, bits: usize, group_size: usize) -> CubeTensor {
    let [rows, words] = packed.shape().dims();
    let output = empty(&packed, [rows, words * 32 / bits], scales.dtype);
    let dtype = dtype_to_storage_type(output.dtype);
    // In bounds: the words hold exactly k·bits bits per row (checked when the weight was
    // built) and scales/biases one value per group.
    launch!(affine_dequantize_kernel, launch_elementwise, [packed, scales, biases], output, bits as u32, group_size, dtype)
}

/// The dense NF4 weight `[n, k]` in `dtype` from words `[n, k/8]` and f32 absmax values
/// `[n·k/64]`.
pub fn nf4_dequantize(packed: CubeTensor, absmax: CubeTensor, levels: CubeTensor, dtype: DType) -> CubeTensor {
    let [rows, words] = packed.shape().dims();
    let output = empty(&packed, [rows, words * 8], dtype);
    // In bounds: `absmax` holds one value per 64 weights and `levels` 16; codes are 4 bits.
    launch!(nf4_dequantize_kernel, launch_elementwise, [packed, absmax, levels], output, dtype_to_storage_type(dtype))
}

/// `x` `[m, k]` · `Wᵀ` -> `[m, n]` straight from the affine words, plus `residual` `[m, n]`
/// when given; `bits` divides 32.
pub fn affine_matvec(
    x: CubeTensor,
    packed: CubeTensor,
    scales: CubeTensor,
    biases: CubeTensor,
    bits: usize,
    group_size: usize,
    residual: Option<CubeTensor>,
) -> CubeTensor {
    assert!(matvec_supports(bits), "affine_matvec: {bits}-bit codes cross words");
    let output = empty(&x, [x.shape()[0], packed.shape()[0]], x.dtype);
    let dtype = dtype_to_storage_type(x.dtype);
    let (add, residual) = residual_arg(residual, &x);
    // In bounds: as for `affine_dequantize`; `x` has k columns, k = words·32/bits, and the
    // residual is read only when given, at the output's indices.
    launch!(affine_matvec_kernel, launch_matvec, [x, packed, scales, biases, residual], output, bits as u32, group_size, add, dtype)
}

/// `x` `[m, k]` · `Wᵀ` -> `[m, n]` straight from the NF4 words, plus `residual` `[m, n]` when
/// given.
pub fn nf4_matvec(x: CubeTensor, packed: CubeTensor, absmax: CubeTensor, levels: CubeTensor, residual: Option<CubeTensor>) -> CubeTensor {
    let output = empty(&x, [x.shape()[0], packed.shape()[0]], x.dtype);
    let dtype = dtype_to_storage_type(x.dtype);
    let (add, residual) = residual_arg(residual, &x);
    // In bounds: as for `nf4_dequantize`; `x` has k = words·8 columns, and the residual is
    // read only when given, at the output's indices.
    launch!(nf4_matvec_kernel, launch_matvec, [x, packed, absmax, levels, residual], output, add, dtype)
}

/// Whether a residual is added, and the tensor bound in its place: without one the kernel never
/// reads it and `x` stands in (never the output, which a dispatch may not bind for reading and
/// writing at once).
fn residual_arg(residual: Option<CubeTensor>, x: &CubeTensor) -> (bool, CubeTensor) {
    match residual {
        Some(r) => (true, r),
        None => (false, x.clone()),
    }
}

/// `silu(x·gateᵀ)·(x·upᵀ)` `[m, n]` for `x` `[m, k]` straight from two affine weights of one
/// shape and format (the SwiGLU block's products and activation in one launch, summed and
/// activated in f32); `bits` divides 32.
#[allow(clippy::too_many_arguments)]
pub fn affine_swiglu(
    x: CubeTensor,
    gate: CubeTensor,
    gate_scales: CubeTensor,
    gate_biases: CubeTensor,
    up: CubeTensor,
    up_scales: CubeTensor,
    up_biases: CubeTensor,
    bits: usize,
    group_size: usize,
    norm: Norm,
) -> CubeTensor {
    assert!(matvec_supports(bits), "affine_swiglu: {bits}-bit codes cross words");
    let output = empty(&x, [x.shape()[0], gate.shape()[0]], x.dtype);
    let dtype = dtype_to_storage_type(x.dtype);
    let (norm, eps, normed) = norm_args(&x, norm);
    // In bounds: as for `affine_matvec`, for each of the two weights (of one shape); the norm's
    // weight has one entry per column of `x` (checked by the caller).
    launch!(
        affine_swiglu_kernel,
        launch_matvec,
        [x, norm, gate, gate_scales, gate_biases, up, up_scales, up_biases],
        output,
        eps,
        normed,
        bits as u32,
        group_size,
        dtype
    )
}

/// [`affine_swiglu`] for two NF4 weights of one shape.
pub fn nf4_swiglu(
    x: CubeTensor,
    gate: CubeTensor,
    gate_absmax: CubeTensor,
    up: CubeTensor,
    up_absmax: CubeTensor,
    levels: CubeTensor,
    norm: Norm,
) -> CubeTensor {
    let output = empty(&x, [x.shape()[0], gate.shape()[0]], x.dtype);
    let dtype = dtype_to_storage_type(x.dtype);
    let (norm, eps, normed) = norm_args(&x, norm);
    // In bounds: as for `nf4_matvec`, for each of the two weights (of one shape); the norm's
    // weight as for `affine_swiglu`.
    launch!(nf4_swiglu_kernel, launch_matvec, [x, norm, gate, gate_absmax, up, up_absmax, levels], output, eps, normed, dtype)
}

/// `[x·Qᵀ, x·Kᵀ, x·Vᵀ]` `[m, nq + nk + nv]` for `x` `[m, k]` straight from three affine weights
/// of one format and width, in one launch; `bits` divides 32.
#[allow(clippy::too_many_arguments)]
pub fn affine_matvec3(x: CubeTensor, q: [CubeTensor; 3], k: [CubeTensor; 3], v: [CubeTensor; 3], bits: usize, group_size: usize, norm: Norm) -> CubeTensor {
    assert!(matvec_supports(bits), "affine_matvec3: {bits}-bit codes cross words");
    let rows = q[0].shape()[0] + k[0].shape()[0] + v[0].shape()[0];
    let output = empty(&x, [x.shape()[0], rows], x.dtype);
    let dtype = dtype_to_storage_type(x.dtype);
    let ([q, q_scales, q_biases], [k, k_scales, k_biases], [v, v_scales, v_biases]) = (q, k, v);
    let (norm, eps, normed) = norm_args(&x, norm);
    // In bounds: as for `affine_matvec`, for each weight's own rows; the norm's weight has one
    // entry per column of `x` (checked by the caller).
    launch!(
        affine_matvec3_kernel,
        launch_matvec,
        [x, norm, q, q_scales, q_biases, k, k_scales, k_biases, v, v_scales, v_biases],
        output,
        eps,
        normed,
        bits as u32,
        group_size,
        dtype
    )
}

/// [`affine_matvec3`] for three NF4 weights (words and absmax each, one set of levels).
pub fn nf4_matvec3(x: CubeTensor, q: [CubeTensor; 2], k: [CubeTensor; 2], v: [CubeTensor; 2], levels: CubeTensor, norm: Norm) -> CubeTensor {
    let rows = q[0].shape()[0] + k[0].shape()[0] + v[0].shape()[0];
    let output = empty(&x, [x.shape()[0], rows], x.dtype);
    let dtype = dtype_to_storage_type(x.dtype);
    let ([q, q_absmax], [k, k_absmax], [v, v_absmax]) = (q, k, v);
    let (norm, eps, normed) = norm_args(&x, norm);
    // In bounds: as for `nf4_matvec`, for each weight's own rows; the norm's weight as for
    // `affine_matvec3`.
    launch!(nf4_matvec3_kernel, launch_matvec, [x, norm, q, q_absmax, k, k_absmax, v, v_absmax, levels], output, eps, normed, dtype)
}
