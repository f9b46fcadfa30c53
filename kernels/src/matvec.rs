//! Matrix-vector products for decoding: `x` `[m, k]` · `Wᵀ` with `m` a few rows.
//!
//! A matrix-tile kernel spends a whole `BM`-row tile of work on one row of `x`; at decode time
//! the product is bound by reading `W` once, so here each output is one dot product shared by
//! [`LANES`] invocations reading consecutive elements of its weight row (coalesced), added up
//! through workgroup memory, [`OUTPUTS_PER_CUBE`] outputs per workgroup. The packed 4-bit
//! kernels of `lora-quant` are built on the same layout ([`lane_total`], [`launch_matvec`]).

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Units that share one output.
pub const LANES: u32 = 32;
/// Outputs per workgroup.
pub const OUTPUTS_PER_CUBE: u32 = 8;
/// Rows of `x` up to which a product with a frozen weight takes a matrix-vector kernel.
pub const MATVEC_ROWS: usize = 8;
/// Elements of a weight row each lane reads per loop step, unrolled so that several loads are
/// in flight.
const UNROLL: usize = 8;

pub use reduce::{input, lane_total, matvec_unit, rms_factor};

// In a module of its own: `#[cube]` adds an expansion module beside the function, which
// `missing_docs` would flag.
#[allow(missing_docs)]
mod reduce {
    use super::{LANES, OUTPUTS_PER_CUBE};
    use crate::decode::workgroup_reduce;
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// Adds the partial sums of the [`LANES`] units of each output (the units `UNIT_POS_X` of one
    /// `UNIT_POS_Y`) and returns the total to every one of them.
    #[cube]
    pub fn lane_total(acc: f32) -> f32 {
        let mut shared = Shared::<[f32]>::new_slice(comptime!((LANES * OUTPUTS_PER_CUBE) as usize));
        let unit = UNIT_POS as usize;
        let lane = UNIT_POS_X;
        shared[unit] = acc;
        sync_cube();
        #[unroll]
        for step in 0..5u32 {
            let stride = comptime!(LANES >> (step + 1));
            if lane < stride {
                shared[unit] += shared[unit + stride as usize];
            }
            sync_cube();
        }
        shared[unit - lane as usize]
    }

    /// Element `at` of `x` (column `c` of its row) as a product reads it: as it is, or (`normed`)
    /// RMS-normalized by the row's factor `r` and scaled by `norm[c]`, rounded to the dtype twice
    /// as [`crate::norm::rms_norm`] rounds its output.
    #[cube]
    pub fn input<F: Float>(x: &Tensor<F>, norm: &Tensor<F>, at: usize, c: usize, r: f32, #[comptime] normed: bool) -> f32 {
        let mut v = f32::cast_from(x[at]);
        if comptime!(normed) {
            v = f32::cast_from(F::cast_from(v * r) * norm[c]);
        }
        v
    }

    /// RMSNorm's factor `1/√(mean(x²) + eps)` of row `xrow` (length `k`) of `x`, summed in f32 by
    /// the whole workgroup (every unit must call it) and returned to every unit.
    #[cube]
    pub fn rms_factor<F: Float>(x: &Tensor<F>, xrow: usize, k: usize, eps: f32) -> f32 {
        let units = comptime!((LANES * OUTPUTS_PER_CUBE) as usize);
        let mut red = Shared::<[f32]>::new_slice(units);
        let mut squares = 0f32;
        for c in range_stepped(UNIT_POS as usize, k, units) {
            let v = f32::cast_from(x[xrow + c]);
            squares += v * v;
        }
        let total = workgroup_reduce(&mut red, squares, false);
        1.0f32 / (total / f32::cast_from(k) + eps).sqrt()
    }

    /// This unit's place in a [`super::launch_matvec`] grid: its lane, the output column `n` it
    /// helps compute, and the row `i` of the input.
    #[cube]
    pub fn matvec_unit() -> (usize, usize, usize) {
        (UNIT_POS_X as usize, (CUBE_POS_X * OUTPUTS_PER_CUBE + UNIT_POS_Y) as usize, CUBE_POS_Y as usize)
    }
}

// `rms_factor` sums over a workgroup with `decode::workgroup_reduce`, which covers exactly
// `decode::UNITS` invocations.
const _: () = assert!(crate::decode::UNITS == (LANES * OUTPUTS_PER_CUBE) as usize);

/// The launch of a matrix-vector kernel writing `output` `[m, n]`: workgroups of
/// [`LANES`] × [`OUTPUTS_PER_CUBE`] units, `n / OUTPUTS_PER_CUBE` by `m` of them.
pub fn launch_matvec(output: &CubeTensor) -> (CubeCount, CubeDim) {
    let [m, rows] = output.shape().dims();
    let cubes = (rows as u32).div_ceil(OUTPUTS_PER_CUBE);
    (CubeCount::Static(cubes, m as u32, 1), CubeDim::new_2d(LANES, OUTPUTS_PER_CUBE))
}

/// This lane's part of the dot product of row `xrow` of `x` (read through [`input`]) with row
/// `wrow` of `w` (both of length `k`): consecutive lanes read consecutive elements, [`UNROLL`]
/// loads in flight.
#[cube]
#[allow(clippy::too_many_arguments)]
fn lane_dot<F: Float>(
    x: &Tensor<F>,
    norm: &Tensor<F>,
    r: f32,
    xrow: usize,
    w: &Tensor<F>,
    wrow: usize,
    k: usize,
    lane: usize,
    #[comptime] normed: bool,
) -> f32 {
    let step = comptime!(LANES as usize * UNROLL);
    let mut acc = 0f32;
    let whole = k / step * step;
    for base in range_stepped(0, whole, step) {
        #[unroll]
        for j in 0..UNROLL {
            let c = base + comptime!(j * LANES as usize) + lane;
            acc += input(x, norm, xrow + c, c, r, normed) * f32::cast_from(w[wrow + c]);
        }
    }
    for c in range_stepped(whole + lane, k, comptime!(LANES as usize)) {
        acc += input(x, norm, xrow + c, c, r, normed) * f32::cast_from(w[wrow + c]);
    }
    acc
}

#[cube(launch_unchecked)]
fn dense_matvec_kernel<F: Float>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    residual: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] add: bool,
    #[define(F)] _dtype: ElemType,
) {
    let (lane, n, i) = matvec_unit();
    let (rows, k) = (w.shape(0), w.shape(1));
    let mut acc = 0f32;
    if n < rows {
        acc = lane_dot(x, x, 1f32, i * k, w, n * k, k, lane, false);
    }
    let total = lane_total(acc);
    if lane == 0 && n < rows {
        let mut value = F::cast_from(total);
        if comptime!(add) {
            value += residual[i * rows + n];
        }
        output[i * rows + n] = value;
    }
}

/// The RMSNorm a product takes its input through: the weight `[k]` (in the input's dtype) and
/// the epsilon.
pub type Norm = Option<(CubeTensor, f32)>;

/// Whether the matrix-vector kernels take `norm` as the RMSNorm weight of `x`: one value per
/// column of `x`, in its dtype.
pub fn takes_norm(x: &CubeTensor, norm: &CubeTensor) -> bool {
    norm.dtype == x.dtype && norm.shape().dims::<1>() == [x.shape()[1]]
}

/// The kernel arguments of a [`Norm`]: its weight (`x` standing in when there is none, never
/// read), its epsilon, and whether there is one.
pub fn norm_args(x: &CubeTensor, norm: Norm) -> (CubeTensor, f32, bool) {
    match norm {
        Some((weight, eps)) => (into_contiguous(weight), eps, true),
        None => (into_contiguous(x.clone()), 0.0, false),
    }
}

/// Three products of one input in one launch: output columns `0..nq` from `wq`, then `wk`'s,
/// then `wv`'s (attention's query, key and value projections); with `normed`, of the input's
/// RMSNorm by `norm` and `eps`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn matvec3_kernel<F: Float>(
    x: &Tensor<F>,
    norm: &Tensor<F>,
    wq: &Tensor<F>,
    wk: &Tensor<F>,
    wv: &Tensor<F>,
    output: &mut Tensor<F>,
    eps: f32,
    #[comptime] normed: bool,
    #[define(F)] _dtype: ElemType,
) {
    let (lane, n, i) = matvec_unit();
    let (nq, nk, nv, k) = (wq.shape(0), wk.shape(0), wv.shape(0), x.shape(1));
    let rows = nq + nk + nv;
    let mut r = 1f32;
    if comptime!(normed) {
        r = rms_factor(x, i * k, k, eps);
    }
    let mut acc = 0f32;
    if n < nq {
        acc = lane_dot(x, norm, r, i * k, wq, n * k, k, lane, normed);
    } else if n < nq + nk {
        acc = lane_dot(x, norm, r, i * k, wk, (n - nq) * k, k, lane, normed);
    } else if n < rows {
        acc = lane_dot(x, norm, r, i * k, wv, (n - nq - nk) * k, k, lane, normed);
    }
    let total = lane_total(acc);
    if lane == 0 && n < rows {
        output[i * rows + n] = F::cast_from(total);
    }
}

/// `[x·wqᵀ, x·wkᵀ, x·wvᵀ]` `[m, nq + nk + nv]` for `x` `[m, k]` (or its RMSNorm by `norm`) and
/// the three weights `[n·, k]`, in one launch; all of one float dtype.
pub fn matvec3_t(x: CubeTensor, wq: CubeTensor, wk: CubeTensor, wv: CubeTensor, norm: Norm) -> CubeTensor {
    let [m, _] = x.shape().dims();
    let n = wq.shape()[0] + wk.shape()[0] + wv.shape()[0];
    let output = empty_device_dtype(x.client.clone(), x.device.clone(), Shape::new([m, n]), x.dtype);
    let (count, dim) = launch_matvec(&output);
    let dtype = dtype_to_storage_type(x.dtype);
    let (norm, eps, normed) = norm_args(&x, norm);
    // SAFETY: as for `dense_matvec_t`: every weight has `k` columns and the norm's weight `k`
    // entries (checked by the caller), and each output column reads one row of one weight.
    unsafe {
        matvec3_kernel::launch_unchecked(
            &output.client,
            count,
            dim,
            into_contiguous(x).into_tensor_arg(),
            norm.into_tensor_arg(),
            into_contiguous(wq).into_tensor_arg(),
            into_contiguous(wk).into_tensor_arg(),
            into_contiguous(wv).into_tensor_arg(),
            output.clone().into_tensor_arg(),
            eps,
            normed,
            dtype,
        )
    }
    output
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn swiglu_matvec_kernel<F: Float>(
    x: &Tensor<F>,
    norm: &Tensor<F>,
    gate: &Tensor<F>,
    up: &Tensor<F>,
    output: &mut Tensor<F>,
    eps: f32,
    #[comptime] normed: bool,
    #[define(F)] _dtype: ElemType,
) {
    let (lane, n, i) = matvec_unit();
    let (rows, k) = (gate.shape(0), gate.shape(1));
    let step = comptime!(LANES as usize * UNROLL);
    let mut r = 1f32;
    if comptime!(normed) {
        r = rms_factor(x, i * k, k, eps);
    }
    let mut acc_gate = 0f32;
    let mut acc_up = 0f32;
    if n < rows {
        let (wrow, xrow) = (n * k, i * k);
        let whole = k / step * step;
        for base in range_stepped(0, whole, step) {
            #[unroll]
            for j in 0..UNROLL {
                let c = base + comptime!(j * LANES as usize) + lane;
                let xv = input(x, norm, xrow + c, c, r, normed);
                acc_gate += xv * f32::cast_from(gate[wrow + c]);
                acc_up += xv * f32::cast_from(up[wrow + c]);
            }
        }
        for c in range_stepped(whole + lane, k, comptime!(LANES as usize)) {
            let xv = input(x, norm, xrow + c, c, r, normed);
            acc_gate += xv * f32::cast_from(gate[wrow + c]);
            acc_up += xv * f32::cast_from(up[wrow + c]);
        }
    }
    let g = lane_total(acc_gate);
    let u = lane_total(acc_up);
    if lane == 0 && n < rows {
        output[i * rows + n] = F::cast_from(g / (1.0f32 + (-g).exp()) * u);
    }
}

/// `silu(x·gateᵀ) · (x·upᵀ)` for `x` `[m, k]` (or its RMSNorm by `norm`) and `gate`, `up`
/// `[n, k]` -> `[m, n]`: the SwiGLU block's two products and its activation in one pass over
/// both weights, summed and activated in f32; all of one float dtype.
pub fn swiglu_matvec_t(x: CubeTensor, gate: CubeTensor, up: CubeTensor, norm: Norm) -> CubeTensor {
    let [m, _] = x.shape().dims();
    let n = gate.shape()[0];
    let output = empty_device_dtype(x.client.clone(), x.device.clone(), Shape::new([m, n]), x.dtype);
    let (count, dim) = launch_matvec(&output);
    let dtype = dtype_to_storage_type(x.dtype);
    let (norm, eps, normed) = norm_args(&x, norm);
    // SAFETY: as for `dense_matvec_t`; `gate` and `up` have the same shape and the norm's weight
    // `k` entries (checked by the caller).
    unsafe {
        swiglu_matvec_kernel::launch_unchecked(
            &output.client,
            count,
            dim,
            into_contiguous(x).into_tensor_arg(),
            norm.into_tensor_arg(),
            into_contiguous(gate).into_tensor_arg(),
            into_contiguous(up).into_tensor_arg(),
            output.clone().into_tensor_arg(),
            eps,
            normed,
            dtype,
        )
    }
    output
}

/// `x` `[m, k]` · `wᵀ` (`w` `[n, k]`) -> `[m, n]` in `x`'s dtype, summed in f32, plus
/// `residual` `[m, n]` when given (added after the product is rounded to the dtype, as a
/// separate addition would); all of one float dtype.
pub fn dense_matvec_t(x: CubeTensor, w: CubeTensor, residual: Option<CubeTensor>) -> CubeTensor {
    let [m, _] = x.shape().dims();
    let add = residual.is_some();
    // Without a residual the kernel never reads this argument; `x` stands in (never the output,
    // which a dispatch may not bind for reading and writing at once).
    let residual_arg = into_contiguous(residual.unwrap_or_else(|| x.clone()));
    let n = w.shape()[0];
    let output = empty_device_dtype(x.client.clone(), x.device.clone(), Shape::new([m, n]), x.dtype);
    let (count, dim) = launch_matvec(&output);
    let dtype = dtype_to_storage_type(x.dtype);
    // SAFETY: both operands are made contiguous, `x` has `k` columns as `w` does (checked by
    // the caller), and every index is below `i·k + k` or `n·k + k` for `i < m`, `n < rows`.
    unsafe {
        dense_matvec_kernel::launch_unchecked(
            &output.client,
            count,
            dim,
            into_contiguous(x).into_tensor_arg(),
            into_contiguous(w).into_tensor_arg(),
            residual_arg.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            add,
            dtype,
        )
    }
    output
}
