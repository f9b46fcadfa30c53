//! The low-rank adapter's path `y + scale·(x·Aᵀ)·Bᵀ` and its backward as four thin products,
//! each one pass over its large operand.
//!
//! With a rank `r` of a few dozen at most, every product of the adapter is bound by memory, not
//! arithmetic: `x·Aᵀ` and `dy·B` read a `[m, k]` activation to produce `[m, r]`; the
//! up-projection `h·Bᵀ` and `dh·A` write a `[m, n]` one from `[m, r]`; `dyᵀ·h` and `dhᵀ·x`
//! reduce a `[m, n]` activation over its rows into `[n, r]`. A general matrix-multiply kernel
//! tiles them as it would a square product and spends most of its time on tiles that are
//! nearly empty; here each has a kernel of its own on the CubeCL backend:
//!
//! - [`LoraOps::thin_linear_t`]: one row of `x` per 32 invocations, each keeping `r` sums over
//!   the columns it reads (coalesced), added up through workgroup memory.
//! - [`LoraOps::low_rank_add`]: one output column per invocation, holding its `r` weights in
//!   registers over [`UP_ROWS`] rows, with the base output `y` added in the same pass.
//! - [`LoraOps::rows_outer`]: one column of the large operand per invocation, summing over a
//!   slice of the rows; a second pass adds the slices.
//!
//! In f16 on a device with 16×16×16 cooperative matrices (tensor cores), where every size is a
//! multiple of 16, the same products run on them instead: one plane per 16-row tile of the
//! large operand, the two reductions split along their long side into slices summed by a
//! second pass, and the up-projection's tile added to `y` through workgroup memory. Only
//! loads and stores are left to cost anything.
//!
//! [`LoraOps::lora_add`] is the forward pass, with a backward of its own under autodiff that
//! keeps `x`, `A`, `B` and the `[m, r]` `h = x·Aᵀ`. On flex, and for ranks above [`MAX_RANK`],
//! each product is burn's matmul.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, Scalar, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;

/// The largest rank the kernels take (each invocation keeps `r` sums in registers); above it,
/// burn's matmul.
pub const MAX_RANK: usize = 64;
/// Rows of `x` per workgroup of the thin product: one per 32 invocations.
pub const THIN_ROWS: usize = 8;
/// Invocations that share one row of the thin product.
const LANES: usize = 32;
/// Columns each lane of the thin product reads per loop step, unrolled so that several loads
/// are in flight.
const UNROLL: usize = 4;
/// Sums of the thin product added up per round through workgroup memory.
const CHUNK: usize = 8;
/// Output columns per workgroup of the up-projection and of the row reduction.
pub const COLUMNS: usize = 256;
/// Rows each invocation of the up-projection writes.
pub const UP_ROWS: usize = 8;
/// Workgroups the row reduction aims for (the GPU's multiprocessors, several times over).
const OUTER_CUBES: usize = 1024;
/// Side of the tensor cores' 16×16×16 cooperative matrices the f16 kernels use.
const MMA: usize = 16;
/// Invocations per workgroup of the tensor-core kernels.
const MMA_UNITS: usize = 128;
/// The most planes a workgroup of [`MMA_UNITS`] holds (planes of 16 invocations or more).
const MMA_PLANES_MAX: usize = MMA_UNITS / 16;
/// Planes (16-row tiles × K slices) the tensor-core reductions aim for.
const MMA_TARGET_PLANES: usize = 2048;
/// The most workgroups along one dimension of a launch.
const MAX_CUBES: usize = 65_535;

/// The adapter's products.
#[backend_extension(Autodiff, Flex, Cube, Fusion)]
pub trait LoraOps: Backend {
    /// `y + scale·(x·aᵀ)·bᵀ`: `x` `[m, k]`, `a` `[r, k]`, `b` `[n, r]`, `y` `[m, n]` ->
    /// `[m, n]`, all of one float dtype. Differentiable in all four.
    #[fusion(dtype = x, shape = Shape::new([x[0], b[0]]))]
    fn lora_add(x: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, y: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let h = Self::thin_linear_t(x, a, 1.0);
        Self::low_rank_add(h, Self::float_transpose(b), y, scale)
    }

    /// `scale·x·wᵀ`: `x` `[m, k]`, a thin `w` `[r, k]` -> `[m, r]`.
    #[fusion(dtype = x, shape = Shape::new([x[0], w[0]]))]
    fn thin_linear_t(x: FloatTensor<Self>, w: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        scaled::<Self>(Self::float_matmul(x, Self::float_transpose(w)), scale)
    }

    /// `y + scale·h·bt`: `h` `[m, r]`, `bt` `[r, n]`, `y` `[m, n]` -> `[m, n]`.
    #[fusion(dtype = h, shape = Shape::new([h[0], bt[1]]))]
    fn low_rank_add(h: FloatTensor<Self>, bt: FloatTensor<Self>, y: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        Self::float_add(y, Self::low_rank(h, bt, scale))
    }

    /// `scale·h·bt`: `h` `[m, r]`, `bt` `[r, n]` -> `[m, n]`.
    #[fusion(dtype = h, shape = Shape::new([h[0], bt[1]]))]
    fn low_rank(h: FloatTensor<Self>, bt: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        scaled::<Self>(Self::float_matmul(h, bt), scale)
    }

    /// `scale·uᵀ·v`: `u` `[m, p]`, `v` `[m, q]` -> `[p, q]`, a sum over the rows (one of `p`, `q`
    /// is the rank).
    #[fusion(dtype = u, shape = Shape::new([u[1], v[1]]))]
    fn rows_outer(u: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        scaled::<Self>(Self::float_matmul(Self::float_transpose(u), v), scale)
    }
}

fn scaled<B: Backend>(t: FloatTensor<B>, scale: f32) -> FloatTensor<B> {
    if scale == 1.0 { t } else { B::float_mul_scalar(t, Scalar::from(scale)) }
}

impl LoraOps for Flex {}

/// Whether the kernels take these float dtypes and rank. `LORA_NO_LORA_KERNELS` set turns them
/// off (burn's matmul for every product), for comparing the two in a benchmark.
fn kernel_takes(dtypes: &[DType], rank: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let first = dtypes[0];
    !*OFF.get_or_init(|| std::env::var_os("LORA_NO_LORA_KERNELS").is_some())
        && (1..=MAX_RANK).contains(&rank)
        && matches!(first, DType::F32 | DType::F16 | DType::BF16)
        && dtypes.iter().all(|d| *d == first)
}

impl LoraOps for burn_cubecl::CubeBackend {
    fn lora_add(x: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, y: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let h = Self::thin_linear_t(x, a, 1.0);
        Self::low_rank_add(h, Self::float_transpose(b), y, scale)
    }

    fn thin_linear_t(x: FloatTensor<Self>, w: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let [m, k] = x.shape().dims();
        let [rank, wk] = w.shape().dims();
        if !kernel_takes(&[x.dtype, w.dtype], rank) || wk != k || m.div_ceil(THIN_ROWS) > MAX_CUBES {
            return scaled::<Self>(Self::float_matmul(x, Self::float_transpose(w)), scale);
        }
        thin(x, w, scale)
    }

    fn low_rank_add(h: FloatTensor<Self>, bt: FloatTensor<Self>, y: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let [m, rank] = h.shape().dims();
        let n = bt.shape()[1];
        if !kernel_takes(&[h.dtype, bt.dtype, y.dtype], rank) || bt.shape()[0] != rank || y.shape().dims::<2>() != [m, n] || m.div_ceil(UP_ROWS) > MAX_CUBES {
            return Self::float_add(y, scaled::<Self>(Self::float_matmul(h, bt), scale));
        }
        up(h, bt, Some(y), scale)
    }

    fn low_rank(h: FloatTensor<Self>, bt: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let [m, rank] = h.shape().dims();
        if !kernel_takes(&[h.dtype, bt.dtype], rank) || bt.shape()[0] != rank || m.div_ceil(UP_ROWS) > MAX_CUBES {
            return scaled::<Self>(Self::float_matmul(h, bt), scale);
        }
        up(h, bt, None, scale)
    }

    fn rows_outer(u: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let ([m, p], [mv, q]) = (u.shape().dims(), v.shape().dims());
        let fallback = |u: FloatTensor<Self>, v: FloatTensor<Self>| scaled::<Self>(Self::float_matmul(Self::float_transpose(u), v), scale);
        if mv != m || m == 0 {
            return fallback(u, v);
        }
        // The rank is the narrow side: `[p, r]` with `u` the large operand, or `[r, q]`.
        if kernel_takes(&[u.dtype, v.dtype], q) && p.div_ceil(COLUMNS) <= MAX_CUBES {
            outer(u, v, true, scale)
        } else if kernel_takes(&[u.dtype, v.dtype], p) && q.div_ceil(COLUMNS) <= MAX_CUBES {
            outer(v, u, false, scale)
        } else {
            fallback(u, v)
        }
    }
}

// In a module of its own: `#[cube]` adds an expansion module beside each function, which
// `missing_docs` would flag. The cooperative-matrix loads and stores take their slices by
// reference as cubecl's own examples write them, which clippy reads as needless borrows.
#[allow(missing_docs, clippy::needless_borrow)]
mod kernels {
    use super::{CHUNK, COLUMNS, LANES, MMA, MMA_PLANES_MAX, THIN_ROWS, UNROLL, UP_ROWS};
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// Row `CUBE_POS_X·THIN_ROWS + UNIT_POS_Y` of `out` `[m, r]` = `scale·x·wᵀ`: the row's 32
    /// lanes read consecutive columns of `x` and keep `r` sums each.
    #[cube(launch_unchecked)]
    pub fn thin_kernel<F: Float>(x: &Tensor<F>, w: &Tensor<F>, out: &mut Tensor<F>, scale: f32, #[comptime] rank: usize, #[define(F)] _dtype: ElemType) {
        let lane = UNIT_POS_X as usize;
        let local = UNIT_POS_Y as usize;
        let first = CUBE_POS_X as usize * THIN_ROWS;
        let row = first + local;
        let (m, k) = (x.shape(0), x.shape(1));
        let mut acc = Array::<f32>::new(rank);
        #[unroll]
        for j in 0..rank {
            acc[j] = 0.0;
        }
        if row < m {
            let xrow = row * k;
            let step = comptime!(LANES * UNROLL);
            let whole = k / step * step;
            for base in range_stepped(0, whole, step) {
                #[unroll]
                for u in 0..UNROLL {
                    let c = base + comptime!(u * LANES) + lane;
                    let xv = f32::cast_from(x[xrow + c]);
                    #[unroll]
                    for j in 0..rank {
                        acc[j] += xv * f32::cast_from(w[j * k + c]);
                    }
                }
            }
            for c in range_stepped(whole + lane, k, comptime!(LANES)) {
                let xv = f32::cast_from(x[xrow + c]);
                #[unroll]
                for j in 0..rank {
                    acc[j] += xv * f32::cast_from(w[j * k + c]);
                }
            }
        }
        // The lanes' sums of CHUNK outputs at a time through workgroup memory, laid out
        // [row][output][lane]; an invocation per (row, output) adds its 32, starting at its own
        // lane so that neighbours read different banks.
        let mut shared = Shared::<[f32]>::new_slice(comptime!(THIN_ROWS * CHUNK * LANES));
        let unit = UNIT_POS as usize;
        #[unroll]
        for chunk in 0..comptime!(rank.div_ceil(CHUNK)) {
            #[unroll]
            for jj in 0..CHUNK {
                if comptime!(chunk * CHUNK + jj < rank) {
                    shared[(local * CHUNK + jj) * LANES + lane] = acc[comptime!(chunk * CHUNK + jj)];
                }
            }
            sync_cube();
            if unit < comptime!(THIN_ROWS * CHUNK) {
                let (r, j) = (first + unit / CHUNK, comptime!(chunk * CHUNK) + unit % CHUNK);
                if r < m && j < rank {
                    let mut total = 0f32;
                    for l in 0..LANES {
                        total += shared[unit * LANES + (l + unit) % LANES];
                    }
                    out[r * rank + j] = F::cast_from(total * scale);
                }
            }
            sync_cube();
        }
    }

    /// Column `CUBE_POS_X·COLUMNS + UNIT_POS_X` of `out` `[m, n]` = `y + scale·h·bt` (`y` only
    /// when `add`) over rows `CUBE_POS_Y·UP_ROWS..`, summed in f32.
    #[cube(launch_unchecked)]
    pub fn up_kernel<F: Float>(
        h: &Tensor<F>,
        bt: &Tensor<F>,
        y: &Tensor<F>,
        out: &mut Tensor<F>,
        scale: f32,
        #[comptime] rank: usize,
        #[comptime] add: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let c = CUBE_POS_X as usize * COLUMNS + UNIT_POS_X as usize;
        let (m, n) = (h.shape(0), bt.shape(1));
        if c < n {
            let mut col = Array::<f32>::new(rank);
            #[unroll]
            for j in 0..rank {
                col[j] = f32::cast_from(bt[j * n + c]) * scale;
            }
            let first = CUBE_POS_Y as usize * UP_ROWS;
            #[unroll]
            for u in 0..UP_ROWS {
                let i = first + u;
                if i < m {
                    let mut total = 0f32;
                    #[unroll]
                    for j in 0..rank {
                        total += f32::cast_from(h[i * rank + j]) * col[j];
                    }
                    let at = i * n + c;
                    if comptime!(add) {
                        total += f32::cast_from(y[at]);
                    }
                    out[at] = F::cast_from(total);
                }
            }
        }
    }

    /// Slice `CUBE_POS_Y` of the rows of `big` `[m, n]` and `small` `[m, r]`: `partial`
    /// `[slices, r, n]` (f32) gets `Σ big[i, c]·small[i, j]` over the slice's rows for column
    /// `c = CUBE_POS_X·COLUMNS + UNIT_POS_X`.
    #[cube(launch_unchecked)]
    pub fn outer_kernel<F: Float>(
        big: &Tensor<F>,
        small: &Tensor<F>,
        partial: &mut Tensor<f32>,
        rows: usize,
        #[comptime] rank: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let c = CUBE_POS_X as usize * COLUMNS + UNIT_POS_X as usize;
        let slice = CUBE_POS_Y as usize;
        let (m, n) = (big.shape(0), big.shape(1));
        if c < n {
            let mut acc = Array::<f32>::new(rank);
            #[unroll]
            for j in 0..rank {
                acc[j] = 0.0;
            }
            let start = slice * rows;
            let end = min(m, start + rows);
            let whole = start + (end - start) / UNROLL * UNROLL;
            for base in range_stepped(start, whole, UNROLL) {
                let mut v = Array::<f32>::new(UNROLL);
                #[unroll]
                for u in 0..UNROLL {
                    v[u] = f32::cast_from(big[(base + u) * n + c]);
                }
                #[unroll]
                for u in 0..UNROLL {
                    #[unroll]
                    for j in 0..rank {
                        acc[j] += v[u] * f32::cast_from(small[(base + u) * rank + j]);
                    }
                }
            }
            for i in whole..end {
                let v = f32::cast_from(big[i * n + c]);
                #[unroll]
                for j in 0..rank {
                    acc[j] += v * f32::cast_from(small[i * rank + j]);
                }
            }
            #[unroll]
            for j in 0..rank {
                partial[(slice * rank + j) * n + c] = acc[j];
            }
        }
    }

    /// `out` = `scale·Σ_slices partial` for `partial` `[slices, r, n]`: `[n, r]` when
    /// `columns_first`, else `[r, n]`; column `CUBE_POS_X·COLUMNS + UNIT_POS_X`, rank index
    /// `CUBE_POS_Y`.
    #[cube(launch_unchecked)]
    pub fn slices_kernel<F: Float>(partial: &Tensor<f32>, out: &mut Tensor<F>, scale: f32, #[comptime] columns_first: bool, #[define(F)] _dtype: ElemType) {
        let c = CUBE_POS_X as usize * COLUMNS + UNIT_POS_X as usize;
        let j = CUBE_POS_Y as usize;
        let (slices, rank, n) = (partial.shape(0), partial.shape(1), partial.shape(2));
        if c < n {
            let mut total = 0f32;
            for s in 0..slices {
                total += partial[(s * rank + j) * n + c];
            }
            let at = if comptime!(columns_first) { c * rank + j } else { j * n + c };
            out[at] = F::cast_from(total * scale);
        }
    }

    /// One 16-row tile of `partial` `[slices, r, M]` (f32, stored transposed) per plane:
    /// `Σ_t A(i, t)·B(t, j)` over slice `slice`'s K steps, for `A` `[M, K]` and `B` `[K, r]`,
    /// each read row-major (`a_col`/`b_col` false) or column-major with its stride, on the
    /// tensor cores (16×16×16 cooperative matrices, `r / 16` accumulators).
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn mma_reduce_kernel<F: Float>(
        a: &Tensor<F>,
        b: &Tensor<F>,
        partial: &mut Tensor<f32>,
        m_tiles: usize,
        slices: usize,
        steps_per_slice: usize,
        k_steps: usize,
        stride_a: usize,
        stride_b: usize,
        #[comptime] a_col: bool,
        #[comptime] b_col: bool,
        #[comptime] rank: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let planes = CUBE_DIM as usize / PLANE_DIM as usize;
        let plane = CUBE_POS_X as usize * planes + UNIT_POS as usize / PLANE_DIM as usize;
        // Whole planes leave together: the cooperative operations below run on full planes.
        if plane < m_tiles * slices {
            let tile = plane % m_tiles;
            let slice = plane / m_tiles;
            let i0 = tile * MMA;
            let first = slice * steps_per_slice;
            let last = min(first + steps_per_slice, k_steps);
            let a_layout = comptime!(if a_col { cmma::MatrixLayout::ColMajor } else { cmma::MatrixLayout::RowMajor });
            let b_layout = comptime!(if b_col { cmma::MatrixLayout::ColMajor } else { cmma::MatrixLayout::RowMajor });
            let mut fa = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, MMA, MMA, MMA, a_layout) };
            let mut fb = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, MMA, MMA, MMA, b_layout) };
            let acc0 = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, MMA, MMA, MMA, cmma::MatrixLayout::Undefined, 0.0);
            let acc1 = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, MMA, MMA, MMA, cmma::MatrixLayout::Undefined, 0.0);
            let acc2 = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, MMA, MMA, MMA, cmma::MatrixLayout::Undefined, 0.0);
            let acc3 = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, MMA, MMA, MMA, cmma::MatrixLayout::Undefined, 0.0);
            let (a_len, b_len) = (a.len(), b.len());
            for s in first..last {
                let t0 = s * MMA;
                let a_at = if comptime!(a_col) { t0 * stride_a + i0 } else { i0 * stride_a + t0 };
                cmma::load(&mut fa, &a.slice(a_at, a_len), stride_a as u32);
                #[unroll]
                for j in 0..comptime!(rank / MMA) {
                    let j0 = comptime!(j * MMA);
                    let b_at = if comptime!(b_col) { j0 * stride_b + t0 } else { t0 * stride_b + j0 };
                    cmma::load(&mut fb, &b.slice(b_at, b_len), stride_b as u32);
                    if comptime!(j == 0) {
                        cmma::execute(&fa, &fb, &acc0, &acc0);
                    } else if comptime!(j == 1) {
                        cmma::execute(&fa, &fb, &acc1, &acc1);
                    } else if comptime!(j == 2) {
                        cmma::execute(&fa, &fb, &acc2, &acc2);
                    } else {
                        cmma::execute(&fa, &fb, &acc3, &acc3);
                    }
                }
            }
            // Column-major into [slice, j, i]: element (i, j) of the tile lands at
            // partial[(slice·r + j0 + j)·M + i0 + i].
            let mm = m_tiles * MMA;
            let p_len = partial.len();
            #[unroll]
            for j in 0..comptime!(rank / MMA) {
                let at = (slice * rank + comptime!(j * MMA)) * mm + i0;
                let mut dst = partial.slice_mut(at, p_len);
                if comptime!(j == 0) {
                    cmma::store(&mut dst, &acc0, mm as u32, cmma::MatrixLayout::ColMajor);
                } else if comptime!(j == 1) {
                    cmma::store(&mut dst, &acc1, mm as u32, cmma::MatrixLayout::ColMajor);
                } else if comptime!(j == 2) {
                    cmma::store(&mut dst, &acc2, mm as u32, cmma::MatrixLayout::ColMajor);
                } else {
                    cmma::store(&mut dst, &acc3, mm as u32, cmma::MatrixLayout::ColMajor);
                }
            }
        }
    }

    /// `out` `[m, n]` = `y + scale·h·b` (`y` only when `add`) for `h` `[m, r]` and `b` `[r, n]`,
    /// row-major: one plane per 16-row tile and `tiles` 16-column tiles, the product on the tensor cores, then through
    /// the plane's patch of workgroup memory to add `y` and convert.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn mma_up_kernel<F: Float>(
        h: &Tensor<F>,
        b: &Tensor<F>,
        y: &Tensor<F>,
        out: &mut Tensor<F>,
        scale: f32,
        #[comptime] rank: usize,
        #[comptime] tiles: usize,
        #[comptime] add: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let n = out.shape(1);
        let m = out.shape(0);
        let planes = CUBE_DIM as usize / PLANE_DIM as usize;
        let local = UNIT_POS as usize / PLANE_DIM as usize;
        let plane = CUBE_POS_X as usize * planes + local;
        let col_groups = n / comptime!(MMA * tiles);
        let mut patch = Shared::<[f32]>::new_slice(comptime!(MMA_PLANES_MAX * MMA * MMA));
        if plane < (m / MMA) * col_groups {
            let i0 = (plane / col_groups) * MMA;
            let c0 = (plane % col_groups) * comptime!(MMA * tiles);
            let mut fa = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, MMA, MMA, MMA, cmma::MatrixLayout::RowMajor) };
            let mut fb = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, MMA, MMA, MMA, cmma::MatrixLayout::RowMajor) };
            let mut acc = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, MMA, MMA, MMA, cmma::MatrixLayout::Undefined, 0.0);
            let (h_len, b_len, p_len) = (h.len(), b.len(), comptime!(MMA_PLANES_MAX * MMA * MMA));
            let base = local * comptime!(MMA * MMA);
            let lane = UNIT_POS as usize % PLANE_DIM as usize;
            let width = PLANE_DIM as usize;
            #[unroll]
            for tile in 0..tiles {
                let j0 = c0 + comptime!(tile * MMA);
                cmma::fill(&mut acc, 0.0);
                #[unroll]
                for t in 0..comptime!(rank / MMA) {
                    let t0 = comptime!(t * MMA);
                    cmma::load(&mut fa, &h.slice(i0 * rank + t0, h_len), rank as u32);
                    cmma::load(&mut fb, &b.slice(t0 * n + j0, b_len), n as u32);
                    cmma::execute(&fa, &fb, &acc, &acc);
                }
                let mut dst = patch.slice_mut(base, p_len);
                cmma::store(&mut dst, &acc, comptime!(MMA as u32), cmma::MatrixLayout::RowMajor);
                sync_plane();
                for e in range_stepped(lane, comptime!(MMA * MMA), width) {
                    let at = (i0 + e / MMA) * n + j0 + e % MMA;
                    let mut v = patch[base + e] * scale;
                    if comptime!(add) {
                        v += f32::cast_from(y[at]);
                    }
                    out[at] = F::cast_from(v);
                }
                sync_plane();
            }
        }
    }
}

/// `scale·x·wᵀ` `[m, r]` (the caller checked dtypes, rank and `k`).
fn thin(x: CubeTensor, w: CubeTensor, scale: f32) -> CubeTensor {
    let [m, k] = x.shape().dims();
    let rank = w.shape()[0];
    if mma_takes(&x, &[m, k], rank) {
        // x·wᵀ: A = x row-major, B(t, j) = w[j, t].
        return mma_reduce(into_contiguous(x), false, k, into_contiguous(w), true, k, (m, k, rank), true, scale);
    }
    let out = empty_device_dtype(x.client.clone(), x.device.clone(), Shape::new([m, rank]), x.dtype);
    if m == 0 {
        return out;
    }
    let dtype = dtype_to_storage_type(x.dtype);
    // SAFETY: both operands are contiguous with `k` columns; row `r < m` of `x` and rows
    // `j < rank` of `w` are read, `out[r·rank + j]` written for those only.
    unsafe {
        kernels::thin_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(m.div_ceil(THIN_ROWS) as u32, 1, 1),
            CubeDim::new_2d(LANES as u32, THIN_ROWS as u32),
            into_contiguous(x).into_tensor_arg(),
            into_contiguous(w).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            scale,
            rank,
            dtype,
        )
    }
    out
}

/// `y + scale·h·bt` `[m, n]`, or `scale·h·bt` without `y` (the caller checked shapes).
fn up(h: CubeTensor, bt: CubeTensor, y: Option<CubeTensor>, scale: f32) -> CubeTensor {
    let [m, rank] = h.shape().dims();
    let n = bt.shape()[1];
    let out = empty_device_dtype(h.client.clone(), h.device.clone(), Shape::new([m, n]), h.dtype);
    if m == 0 || n == 0 {
        return out;
    }
    if mma_takes(&h, &[m, n], rank) {
        return mma_up(into_contiguous(h), into_contiguous(bt), y.map(into_contiguous), out, scale);
    }
    let add = y.is_some();
    // Without `y` the kernel never reads this argument; `h` stands in (never the output).
    let y = into_contiguous(y.unwrap_or_else(|| h.clone()));
    let dtype = dtype_to_storage_type(h.dtype);
    // SAFETY: `h` `[m, rank]`, `bt` `[rank, n]` and `y` `[m, n]` are contiguous; each
    // invocation reads and writes column `c < n` of rows `i < m` only.
    unsafe {
        kernels::up_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(n.div_ceil(COLUMNS) as u32, m.div_ceil(UP_ROWS) as u32, 1),
            CubeDim::new_1d(COLUMNS as u32),
            into_contiguous(h).into_tensor_arg(),
            into_contiguous(bt).into_tensor_arg(),
            y.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            scale,
            rank,
            add,
            dtype,
        )
    }
    out
}

/// `scale·bigᵀ·small` as `[n, r]` when `columns_first`, else `[r, n]`: `big` `[m, n]`,
/// `small` `[m, r]`, rows summed in slices, then the slices (the caller checked shapes).
fn outer(big: CubeTensor, small: CubeTensor, columns_first: bool, scale: f32) -> CubeTensor {
    let [m, n] = big.shape().dims();
    let rank = small.shape()[1];
    if mma_takes(&big, &[m, n], rank) {
        // bigᵀ·small: A(i, t) = big[t, i], B = small row-major; K runs over the rows.
        return mma_reduce(into_contiguous(big), true, n, into_contiguous(small), false, rank, (n, m, rank), columns_first, scale);
    }
    let shape = if columns_first { [n, rank] } else { [rank, n] };
    let out = empty_device_dtype(big.client.clone(), big.device.clone(), Shape::new(shape), big.dtype);
    if n == 0 {
        return out;
    }
    let blocks = n.div_ceil(COLUMNS);
    let (slices, rows) = slicing(m, blocks);
    let partial = empty_device_dtype(big.client.clone(), big.device.clone(), Shape::new([slices, rank, n]), DType::F32);
    let dtype = dtype_to_storage_type(big.dtype);
    // SAFETY: `big` `[m, n]` and `small` `[m, rank]` are contiguous; slice `s < slices` reads
    // rows `s·rows..min(m, (s + 1)·rows)` and writes `partial[s, .., c]` for `c < n`; the second
    // pass reads every slice and writes each output once.
    unsafe {
        kernels::outer_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(blocks as u32, slices as u32, 1),
            CubeDim::new_1d(COLUMNS as u32),
            into_contiguous(big).into_tensor_arg(),
            into_contiguous(small).into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            rows,
            rank,
            dtype,
        );
        kernels::slices_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(blocks as u32, rank as u32, 1),
            CubeDim::new_1d(COLUMNS as u32),
            partial.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            scale,
            columns_first,
            dtype,
        )
    }
    out
}

/// Whether the f16 tensor-core path takes a product: f16 operands on a device with 16×16×16
/// f16 cooperative matrices accumulating in f32, every size a multiple of 16 (`rank` too).
/// `LORA_NO_LORA_MMA` set turns it off (the other kernels then run), for benchmarks.
fn mma_takes(t: &CubeTensor, sizes: &[usize], rank: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let (f16, f32) = (ElemType::Float(FloatKind::F16), ElemType::Float(FloatKind::F32));
    t.dtype == DType::F16
        && rank.is_multiple_of(MMA)
        && rank <= MAX_RANK
        && sizes.iter().all(|s| *s > 0 && s.is_multiple_of(MMA))
        && !*OFF.get_or_init(|| std::env::var_os("LORA_NO_LORA_MMA").is_some())
        && t.client.properties().hardware.plane_size_min >= 16
        && t.client
            .properties()
            .features
            .matmul
            .cmma
            .iter()
            .any(|c| c.a_type == f16 && c.b_type == f16 && c.cd_type == f32 && (c.m, c.n, c.k) == (MMA as u32, MMA as u32, MMA as u32))
}

/// `scale·C` for `C` `[size_m, rank]` = `A·B` with `A(i, t)` (`[size_m, size_k]`) read
/// row-major or column-major (`a_col`) with stride `stride_a`, `B(t, j)` (`[size_k, rank]`)
/// likewise: written `[size_m, rank]` when `columns_first`, else `[rank, size_m]`. K is split
/// into slices summed in f32 by a second pass (the caller checked the sizes).
#[allow(clippy::too_many_arguments)]
fn mma_reduce(
    a: CubeTensor,
    a_col: bool,
    stride_a: usize,
    b: CubeTensor,
    b_col: bool,
    stride_b: usize,
    (size_m, size_k, rank): (usize, usize, usize),
    columns_first: bool,
    scale: f32,
) -> CubeTensor {
    let shape = if columns_first { [size_m, rank] } else { [rank, size_m] };
    let out = empty_device_dtype(a.client.clone(), a.device.clone(), Shape::new(shape), a.dtype);
    let (m_tiles, k_steps) = (size_m / MMA, size_k / MMA);
    let wanted = (MMA_TARGET_PLANES / m_tiles).clamp(1, k_steps);
    let steps_per_slice = k_steps.div_ceil(wanted);
    let slices = k_steps.div_ceil(steps_per_slice);
    let partial = empty_device_dtype(a.client.clone(), a.device.clone(), Shape::new([slices, rank, size_m]), DType::F32);
    let cubes = (m_tiles * slices).div_ceil(planes_per_cube(&a));
    let dtype = dtype_to_storage_type(a.dtype);
    // SAFETY: every size is a multiple of 16 (checked by the caller), so each 16×16 tile loaded
    // lies inside its operand: A's tiles at rows/columns i0 < size_m and t0 < size_k, B's at
    // t0 < size_k and j0 < rank; each plane stores its own tiles of `partial` (slice, j, i) with
    // i < size_m, j < rank. Planes past the last tile do nothing.
    unsafe {
        kernels::mma_reduce_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(cubes.max(1) as u32, 1, 1),
            CubeDim::new_1d(MMA_UNITS as u32),
            a.into_tensor_arg(),
            b.into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            m_tiles,
            slices,
            steps_per_slice,
            k_steps,
            stride_a,
            stride_b,
            a_col,
            b_col,
            rank,
            dtype,
        );
        kernels::slices_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(size_m.div_ceil(COLUMNS) as u32, rank as u32, 1),
            CubeDim::new_1d(COLUMNS as u32),
            partial.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            scale,
            columns_first,
            dtype,
        )
    }
    out
}

/// Planes a workgroup of [`MMA_UNITS`] holds at the fewest (with the device's widest planes):
/// grids are sized by it, and any further planes find no tile and do nothing.
fn planes_per_cube(t: &CubeTensor) -> usize {
    MMA_UNITS / (t.client.properties().hardware.plane_size_max as usize).clamp(16, MMA_UNITS)
}

/// `out` = `y + scale·h·bt` (or without `y`) on the tensor cores: `h` `[m, r]`, `bt` `[r, n]`,
/// `y` `[m, n]`, contiguous, every size a multiple of 16 (the caller checked).
fn mma_up(h: CubeTensor, bt: CubeTensor, y: Option<CubeTensor>, out: CubeTensor, scale: f32) -> CubeTensor {
    let [m, rank] = h.shape().dims();
    let n = bt.shape()[1];
    let tiles = [4, 2, 1].into_iter().find(|t| (n / MMA).is_multiple_of(*t)).unwrap_or(1);
    let planes = (m / MMA) * (n / (MMA * tiles));
    let cubes = planes.div_ceil(planes_per_cube(&h)) as u32;
    let add = y.is_some();
    let y = y.unwrap_or_else(|| h.clone());
    let dtype = dtype_to_storage_type(h.dtype);
    // SAFETY: `h` `[m, rank]`, `bt` `[rank, n]`, `y` and `out` `[m, n]` are contiguous with every
    // size a multiple of 16; plane p < planes loads the 16×16 tiles of rows i0..i0+16 < m and
    // columns j0..j0+16 < n (and of `rank`), and writes only those of `out`; workgroup memory
    // holds one 16×16 patch per plane (at most MMA_PLANES_MAX planes). Without `y` the kernel
    // never reads that argument.
    unsafe {
        kernels::mma_up_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(cubes.max(1), 1, 1),
            CubeDim::new_1d(MMA_UNITS as u32),
            h.into_tensor_arg(),
            bt.into_tensor_arg(),
            y.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            scale,
            rank,
            tiles,
            add,
            dtype,
        )
    }
    out
}

/// How the row reduction splits `m` rows for `blocks` column blocks: `(slices, rows per
/// slice)`, about [`OUTER_CUBES`] workgroups in all, at least 16 rows a slice.
fn slicing(m: usize, blocks: usize) -> (usize, usize) {
    let wanted = (OUTER_CUBES / blocks).clamp(1, m.div_ceil(16).max(1)).min(MAX_CUBES);
    let rows = m.div_ceil(wanted).max(1);
    (m.div_ceil(rows).max(1), rows)
}

#[derive(Debug)]
struct LoraBackward;

/// What the backward pass keeps: the adapter's input, both factors, the `[m, r]` `x·Aᵀ`.
#[derive(Debug, Clone)]
struct LoraState<B: Backend> {
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    h: FloatTensor<B>,
    scale: f32,
}

impl<B: LoraOps> Backward<B, 4> for LoraBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node, a_node, b_node, y_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let LoraState { x, a, b, h, scale } = ops.state;
        if let Some(node) = b_node {
            // dB = s·dyᵀ·h
            grads.register::<B>(node.id, B::rows_outer(grad.clone(), h, scale));
        }
        if x_node.is_some() || a_node.is_some() {
            // dh = s·dy·B
            let dh = B::thin_linear_t(grad.clone(), B::float_transpose(b), scale);
            if let Some(node) = a_node {
                // dA = dhᵀ·x
                grads.register::<B>(node.id, B::rows_outer(dh.clone(), x, 1.0));
            }
            if let Some(node) = x_node {
                // dx = dh·A (the base's dy·W reaches x through its own node)
                grads.register::<B>(node.id, B::low_rank(dh, a, 1.0));
            }
        }
        if let Some(node) = y_node {
            grads.register::<B>(node.id, grad);
        }
    }
}

impl<B: Backend + LoraOps, C: CheckpointStrategy> LoraOps for Autodiff<B, C> {
    fn lora_add(x: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, y: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        match LoraBackward.prepare::<C>([x.node(), a.node(), b.node(), y.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, a, b, y) = (x.into_primitive(), a.into_primitive(), b.into_primitive(), y.into_primitive());
                let h = B::thin_linear_t(x.clone(), a.clone(), 1.0);
                let out = B::low_rank_add(h.clone(), B::float_transpose(b.clone()), y, scale);
                prep.finish(LoraState { x, a, b, h, scale }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::lora_add(x.into_primitive(), a.into_primitive(), b.into_primitive(), y.into_primitive(), scale)),
        }
    }
}

/// `y + scale·(x·aᵀ)·bᵀ`: `x` `[m, k]`, `a` `[r, k]`, `b` `[n, r]`, `y` `[m, n]` -> `[m, n]`,
/// all of one float dtype; differentiable in all four, with the backward of the module's
/// documentation.
pub fn lora_add(x: Tensor<2>, a: Tensor<2>, b: Tensor<2>, y: Tensor<2>, scale: f32) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LoraOps>::lora_add(x.into_dispatch(), a.into_dispatch(), b.into_dispatch(), y.into_dispatch(), scale))
}

#[cfg(test)]
mod tests {
    use super::slicing;

    #[test]
    fn row_slices_cover_every_row_once() {
        for (m, blocks) in [(1, 1), (4096, 8), (4096, 32), (17, 1), (100_000, 1), (5, 3000)] {
            let (slices, rows) = slicing(m, blocks);
            assert!(slices * rows >= m && (slices - 1) * rows < m, "m {m} blocks {blocks}: {slices} x {rows}");
            assert!(slices <= super::MAX_CUBES);
        }
    }
}
