//! Causal attention forward and backward as three kernels on the GPU (the flash-attention
//! recurrence): no score matrix ever leaves workgroup memory.
//!
//! Every kernel runs workgroups of [`UNITS`] invocations in four groups of 32; a workgroup
//! covers [`BLOCK`] query (or key) positions of one head, each group 16 of them, and steps
//! through the other side [`BLOCK`] positions at a time. A group's 16×64 tiles of scores,
//! probabilities and their gradients live in its own patch of workgroup memory, where its 32
//! invocations apply the mask and the exponentials, two invocations per row (every other
//! column each); in half precision the patches' rows are padded so that those accesses do not
//! meet in one memory bank, and a group synchronizes only itself where it is a plane.
//!
//! - Forward ([`forward`]): per query block, one pass over the key blocks (the online softmax):
//!   each row adds `exp(x − m)·V` into accumulators against a reference point `m` that moves
//!   (rescaling them) only when a score passes it by more than 8, and divides by the sum of the
//!   exponentials at the end; the log-sum-exp is kept for the backward.
//! - Backward ([`backward`]): `D = rowsum(dO ∘ O)` in a small kernel; per key block and query
//!   head, `dV += Pᵀ·dO` and `dK += dSᵀ·Q` (a key/value head's query heads summed after);
//!   per query block, `dQ += dS·K`, with `dS = P ∘ (dO·Vᵀ − D)/√d` recomputed from the
//!   forward's log-sum-exp in both.
//!
//! The 16×64 and 16×d products run on the tensor cores (16×16×16 cooperative matrices, f16
//! operands, f32 accumulators) where the device has them and the head size is a multiple of
//! 16 ([`Path::Mma`], the default: see [`Mode`]). There the block of 64 rows that all four
//! groups multiply by (keys and values in the forward and for dQ, queries and output gradients
//! for dK and dV) is copied into workgroup memory once, by the whole workgroup in coalesced
//! reads, two blocks at a time where they fit; the queries a group multiplies stay in registers
//! across the steps of the forward and of dQ (the backward's other operands are loaded from
//! global memory at each step, for the registers' sake). [`Path::Scalar`] computes the same products
//! one dot product per invocation, from the same staged blocks where workgroup memory holds them
//! (half precision; f32 reads global memory), so that the rest of the kernels (the staging and
//! its barriers, masks, the softmax and its gradient, the indexing) is checked on a device
//! without tensor cores (lavapipe in CI). Query head `i`
//! reads key/value head `i / (h / kv)` (grouped-query attention, no copy); masks are causal,
//! optionally with a sliding window, and key padding; a query that may see no key gets a zero
//! output (such positions never reach a loss).
//!
//! Packed rows (several sequences in one row, each seeing only itself) skip whole blocks: a
//! small kernel first summarizes each block of 64 positions by the lowest and highest flag of
//! its visible keys and whether it holds a query that may see every key ([`ranges_kernel`]),
//! and a query block and a key block whose flags cannot meet are never multiplied. A sequence
//! of 200 tokens in a row of 2048 then costs its own few blocks, not the row's triangle.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cmma;
use cubecl::ir::features::Plane;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;

use crate::tensor::slice_dim;

/// Invocations per workgroup: four groups of 32.
pub const UNITS: usize = 128;
/// Query (or key) positions per workgroup, and key (or query) positions per loop step.
pub const BLOCK: usize = 64;
/// The largest head size the kernels take (accumulators held per invocation).
pub const MAX_HEAD: usize = 128;
/// Rows per group of 32 invocations.
const ROWS: usize = 16;
/// Invocations per group.
const LANES: usize = 32;
/// Entries of a group's 16×64 tile.
const TILE: usize = ROWS * BLOCK;
/// Side of the 16×16×16 cooperative matrices.
const MMA: usize = 16;

/// Row stride of a group's f32 tile in workgroup memory. Padded, four words past the row: the
/// 16 rows' entries of one column then lie in different banks (at a stride of 64 they all fell
/// in one, so that every scalar access of the softmax was a 16-way bank conflict), and every
/// row still starts on 16 bytes, as the cooperative matrices' loads and stores want.
const fn tile_stride(padded: bool) -> usize {
    if padded { BLOCK + 4 } else { BLOCK }
}

/// Row stride of a group's tile in the operands' dtype: 144-byte rows when padded (f16).
const fn op_stride(padded: bool) -> usize {
    if padded { BLOCK + 8 } else { BLOCK }
}

/// Row stride of a block of 64 rows (keys, values, queries or output gradients) staged in
/// workgroup memory: 8 entries past the row (16 bytes in half precision), so that the rows'
/// starts fall in different banks.
const fn block_stride(d: usize) -> usize {
    d + 8
}

static STAGING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(2);

/// The most blocks of 64 rows the kernels stage in workgroup memory at once (2, the default, or
/// 1: tests check the one-block sequence with it).
pub fn set_staging(blocks: usize) {
    STAGING.store(blocks.clamp(1, 2), std::sync::atomic::Ordering::Relaxed);
}

/// How many blocks of 64 rows the kernels stage in workgroup memory at once for operands of
/// `size` bytes and head size `d`: both of a step's operands (keys and values, or queries and
/// output gradients) where `max_shared` bytes hold them, else one at a time, else none (the
/// scalar path then reads them from global memory; the tensor-core path needs one).
fn staged_blocks(size: usize, d: usize, max_shared: usize) -> usize {
    let most = STAGING.load(std::sync::atomic::Ordering::Relaxed);
    (1..=most).rev().find(|&n| shared_bytes(size, d, n) <= max_shared).unwrap_or(0)
}

/// Workgroup memory of a kernel with operands of `size` bytes, head size `d` and `blocks`
/// staged blocks: four groups' f32 tile and operand tile, and the blocks.
const fn shared_bytes(size: usize, d: usize, blocks: usize) -> usize {
    let padded = size == 2;
    4 * ROWS * (tile_stride(padded) * 4 + op_stride(padded) * size) + blocks * BLOCK * block_stride(d) * size
}

/// Whether the kernels pad their tiles' rows for operands of `dtype`: for half-precision ones
/// (the tensor-core path's). Padded f32 tiles would pass 32 KiB of workgroup memory, the most
/// Metal and some drivers give a workgroup.
fn padded(dtype: DType) -> bool {
    dtype.size() == 2
}

/// A barrier for one group's invocations and its patch of workgroup memory: the group's plane
/// on the tensor-core path (groups are planes of 32 there), the whole workgroup elsewhere (a
/// device's planes may be narrower than a group).
#[cube]
fn sync_group(#[comptime] mma: bool) {
    if comptime!(mma) {
        sync_plane();
    } else {
        sync_cube();
    }
}

/// How the kernels compute their tile products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// On the tensor cores (f16, head size a multiple of 16).
    Mma,
    /// One dot product per invocation (any float dtype, even head size).
    Scalar,
}

/// Which attention runs on a CubeCL device (`LORA_FLASH=mma|scalar|off`; [`DEFAULT_MODE`]
/// when unset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The tensor-core kernels where they apply, the chunked composition elsewhere.
    Mma,
    /// The scalar kernels wherever the shapes allow, the tensor-core ones never (tests, and
    /// devices without 16×16×16 cooperative matrices).
    Scalar,
    /// The chunked composition of tensor operations always.
    Off,
}

/// The mode when `LORA_FLASH` is unset: the tensor-core kernels where the device has them.
/// They passed their tests on an H100 (`bench/h200.sh kerneltest`, 2026-12-07) and trained the
/// 1B benchmark 11% faster than the composition in the same call (BENCHMARKS.md).
pub const DEFAULT_MODE: Mode = Mode::Mma;

static MODE: std::sync::Mutex<Option<Mode>> = std::sync::Mutex::new(None);
static LAUNCHED: [std::sync::atomic::AtomicUsize; 2] = [const { std::sync::atomic::AtomicUsize::new(0) }; 2];

/// How many forward and backward passes this process has run on `path` (tests check that the
/// kernels, not the composition, ran).
pub fn launched(path: Path) -> usize {
    LAUNCHED[path as usize].load(std::sync::atomic::Ordering::Relaxed)
}

fn count(path: Path) {
    LAUNCHED[path as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Replaces the mode `LORA_FLASH` gave for this process (tests and benchmarks).
pub fn set_mode(mode: Mode) {
    *MODE.lock().unwrap_or_else(|e| e.into_inner()) = Some(mode);
}

fn mode() -> Mode {
    let mut mode = MODE.lock().unwrap_or_else(|e| e.into_inner());
    *mode.get_or_insert_with(|| match std::env::var("LORA_FLASH").as_deref() {
        Ok("mma") => Mode::Mma,
        Ok("scalar") => Mode::Scalar,
        Ok("off") => Mode::Off,
        _ => DEFAULT_MODE,
    })
}

/// Whether the device runs 16×16×16 f16 cooperative matrices with f32 accumulators on planes
/// of exactly 32 invocations (the groups of the kernels are planes then), with the planes'
/// votes and barriers.
fn has_mma(t: &CubeTensor) -> bool {
    let props = t.client.properties();
    let (f16, f32) = (ElemType::Float(FloatKind::F16), ElemType::Float(FloatKind::F32));
    props.features.plane.contains(Plane::Ops)
        && props.features.plane.contains(Plane::Sync)
        && props.hardware.plane_size_min == LANES as u32
        && props.hardware.plane_size_max == LANES as u32
        && props
            .features
            .matmul
            .cmma
            .iter()
            .any(|c| c.a_type == f16 && c.b_type == f16 && c.cd_type == f32 && (c.m, c.n, c.k) == (MMA as u32, MMA as u32, MMA as u32))
}

/// The path the kernels take for `q` `[b, h, s, d]`, `k` `[b, kv, s, d]`, `v`, `keys` `[b,
/// s]` and the further tensors `more` (which must share `q`'s dtype), or `None` for the
/// composition.
pub fn path(q: &CubeTensor, k: &CubeTensor, v: &CubeTensor, keys: &CubeTensor, more: &[&CubeTensor]) -> Option<Path> {
    let mode = mode();
    if mode == Mode::Off || q.shape().num_dims() != 4 || k.shape().num_dims() != 4 || keys.shape().num_dims() != 2 {
        return None;
    }
    let [b, h, s, d] = q.shape().dims();
    let kv = k.shape()[1];
    let shapes = kv > 0
        && h.is_multiple_of(kv)
        && k.shape().dims::<4>() == [b, kv, s, d]
        && v.shape() == k.shape()
        && keys.shape().dims::<2>() == [b, s]
        && more.iter().all(|t| t.shape() == q.shape())
        && b > 0
        && s > 0
        && b <= 65_535
        && h <= 65_535
        && s.div_ceil(BLOCK) <= 65_535;
    let dtypes = matches!(q.dtype, DType::F16 | DType::F32 | DType::BF16) && [k, v].iter().chain(more).all(|t| t.dtype == q.dtype) && keys.dtype == DType::F32;
    if !shapes || !dtypes || d == 0 || d > MAX_HEAD {
        return None;
    }
    let chosen = if mode == Mode::Mma && q.dtype == DType::F16 && d.is_multiple_of(MMA) && has_mma(q) {
        Path::Mma
    } else if mode == Mode::Scalar && d.is_multiple_of(2) {
        Path::Scalar
    } else {
        return None;
    };
    let (max_shared, size) = (q.client.properties().hardware.max_shared_memory_size, q.dtype.size());
    let least = if chosen == Path::Mma { 1 } else { 0 };
    (shared_bytes(size, d, least) <= max_shared).then_some(chosen)
}

/// Whether query `i` (flag `query`) may see key `j` (flag `key`): causal, inside the window, and
/// `crate::attention::key_visible`.
#[cube]
fn allowed(i: usize, j: usize, window: usize, key: f32, query: f32) -> bool {
    // `j <= i` first: `i - j` is only read where it does not wrap.
    let mut ok = j <= i && key >= 0.5 && (query < 0.5 || key == query);
    if ok && window > 0 {
        ok = i - j < window;
    }
    ok
}

/// [`allowed`] for query `i` and key `j` of row `row` (flags in `keys` `[b, s]`), or true without
/// reading a flag where the pair of blocks is `full` ([`blocks_full`]).
#[cube]
fn visible(full: bool, keys: &Tensor<f32>, row: usize, s: usize, i: usize, j: usize, window: usize) -> bool {
    let mut ok = full;
    if !full {
        ok = allowed(i, j, window, keys[row * s + j], keys[row * s + i]);
    }
    ok
}

/// The group's 16 rows `a[at + r·row ..]` (`d` entries each) as `d / 16` tensor-core A operands;
/// none on the scalar path.
#[allow(clippy::needless_borrow)] // cmma's loads take slices by reference
#[cube]
fn a_frags<F: Float>(a: &Tensor<F>, at: usize, row: usize, #[comptime] d: usize, #[comptime] mma: bool) -> Sequence<cmma::Matrix<F>> {
    let mut frags = Sequence::<cmma::Matrix<F>>::new();
    if comptime!(mma) {
        let len = a.len();
        #[unroll]
        for t in 0..comptime!(d / MMA) {
            let mut fa = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, MMA, MMA, MMA, cmma::MatrixLayout::RowMajor) };
            cmma::load(&mut fa, &a.slice(at + comptime!(t * MMA), len), row as u32);
            frags.push(fa);
        }
    }
    frags
}

/// Copies the 64 rows `src[at + r·row ..]` (`d` entries each) into `blocks[block_at..]`, rows
/// [`block_stride`] apart: every invocation of the workgroup copies its share, consecutive
/// invocations consecutive entries (coalesced reads). The barriers around it are the caller's.
#[cube]
fn stage_block<F: Float>(src: &Tensor<F>, at: usize, row: usize, blocks: &mut Shared<[F]>, block_at: usize, #[comptime] d: usize) {
    let unit = UNIT_POS as usize;
    let stride = comptime!(block_stride(d));
    #[unroll]
    for step in 0..comptime!(BLOCK * d / UNITS) {
        let e = comptime!(step * UNITS) + unit;
        let (r, c) = (e / d, e % d);
        blocks[block_at + r * stride + c] = src[at + r * row + c];
    }
}

/// `out[out_at + r·stride + c] = Σ_t a[r, t]·x[c, t]` for the group's 16 rows `r` and 64
/// columns `c` (`t < d`, `stride` [`tile_stride`]): a 16×d tile times the transpose of a 64×d
/// one. On the tensor cores `a` is `a_frags` ([`a_frags`]); on the scalar path it is read from
/// global memory, `a[a_at + r·a_row + t]`. `x` is the block staged at `blocks[block_at..]` where
/// `staged` (always on the tensor cores), else `x[x_at + c·x_row + t]` in global memory.
#[allow(clippy::needless_borrow)] // cmma's loads and stores take slices by reference
#[cube]
#[allow(clippy::too_many_arguments)]
fn product_nt<F: Float>(
    a_frags: &Sequence<cmma::Matrix<F>>,
    a: &Tensor<F>,
    a_at: usize,
    a_row: usize,
    x: &Tensor<F>,
    x_at: usize,
    x_row: usize,
    blocks: &Shared<[F]>,
    block_at: usize,
    out: &mut Shared<[f32]>,
    out_at: usize,
    #[comptime] d: usize,
    #[comptime] mma: bool,
    #[comptime] padded: bool,
    #[comptime] staged: bool,
) {
    let stride = comptime!(tile_stride(padded));
    let ks = comptime!(block_stride(d));
    if comptime!(mma) {
        let mut fb = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, MMA, MMA, MMA, cmma::MatrixLayout::ColMajor) };
        let mut accs = Sequence::<cmma::Matrix<f32>>::new();
        #[unroll]
        for _ in 0..comptime!(BLOCK / MMA) {
            accs.push(cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, MMA, MMA, MMA, cmma::MatrixLayout::Undefined, 0.0));
        }
        let block_end = block_at + comptime!(BLOCK * ks);
        #[unroll]
        for t in 0..comptime!(d / MMA) {
            #[unroll]
            for n in 0..comptime!(BLOCK / MMA) {
                // B(t, c) = x[c, t]: column-major with the staged rows' stride.
                cmma::load(&mut fb, &blocks.slice(block_at + comptime!(n * MMA * ks + t * MMA), block_end), comptime!(ks as u32));
                let acc = accs.index(n);
                cmma::execute(a_frags.index(t), &fb, acc, acc);
            }
        }
        let end = out_at + comptime!(ROWS * stride);
        #[unroll]
        for n in 0..comptime!(BLOCK / MMA) {
            let mut dst = out.slice_mut(out_at + comptime!(n * MMA), end);
            cmma::store(&mut dst, accs.index(n), comptime!(stride as u32), cmma::MatrixLayout::RowMajor);
        }
    } else {
        let lane = UNIT_POS as usize % LANES;
        for e in range_stepped(lane, comptime!(TILE), LANES) {
            let (r, c) = (e / BLOCK, e % BLOCK);
            let ar = a_at + r * a_row;
            let mut dot = 0f32;
            if comptime!(staged) {
                let xr = block_at + c * ks;
                for t in 0..d {
                    dot += f32::cast_from(a[ar + t]) * f32::cast_from(blocks[xr + t]);
                }
            } else {
                let xr = x_at + c * x_row;
                for t in 0..d {
                    dot += f32::cast_from(a[ar + t]) * f32::cast_from(x[xr + t]);
                }
            }
            out[out_at + r * stride + c] = dot;
        }
    }
}

/// New zeroed accumulators for a 16×d tile: `d / 16` cooperative matrices, or `d / 2` values
/// per invocation (entry `i` is the tile's row `lane / 2`, column `2·i + lane % 2`: an
/// invocation holds half of the row its softmax work is on).
#[cube]
fn acc_new(#[comptime] d: usize, #[comptime] mma: bool) -> (Sequence<cmma::Matrix<f32>>, Array<f32>) {
    let mut mats = Sequence::<cmma::Matrix<f32>>::new();
    if comptime!(mma) {
        #[unroll]
        for _ in 0..comptime!(d / MMA) {
            mats.push(cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, MMA, MMA, MMA, cmma::MatrixLayout::Undefined, 0.0));
        }
    }
    let vals = Array::<f32>::new(comptime!(if mma { 1 } else { d / 2 }));
    (mats, vals)
}

/// Adds `p[p_at..]` (16×64, row-major in workgroup memory, rows [`op_stride`] apart) times a
/// 64×d block `y` to the accumulators: the block staged at `blocks[block_at..]` where `staged`
/// (always on the tensor cores), else `y[y_at + c·y_row + n]` in global memory.
#[allow(clippy::needless_borrow)] // cmma's loads and stores take slices by reference
#[cube]
#[allow(clippy::too_many_arguments)]
fn acc_add<F: Float>(
    mats: &Sequence<cmma::Matrix<f32>>,
    vals: &mut Array<f32>,
    p: &Shared<[F]>,
    p_at: usize,
    y: &Tensor<F>,
    y_at: usize,
    y_row: usize,
    blocks: &Shared<[F]>,
    block_at: usize,
    #[comptime] d: usize,
    #[comptime] mma: bool,
    #[comptime] padded: bool,
    #[comptime] staged: bool,
) {
    let stride = comptime!(op_stride(padded));
    let ks = comptime!(block_stride(d));
    if comptime!(mma) {
        let mut fa = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, MMA, MMA, MMA, cmma::MatrixLayout::RowMajor) };
        let mut fb = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, MMA, MMA, MMA, cmma::MatrixLayout::RowMajor) };
        let (p_end, block_end) = (p_at + comptime!(ROWS * stride), block_at + comptime!(BLOCK * ks));
        #[unroll]
        for t in 0..comptime!(BLOCK / MMA) {
            cmma::load(&mut fa, &p.slice(p_at + comptime!(t * MMA), p_end), comptime!(stride as u32));
            #[unroll]
            for n in 0..comptime!(d / MMA) {
                cmma::load(&mut fb, &blocks.slice(block_at + comptime!(t * MMA * ks + n * MMA), block_end), comptime!(ks as u32));
                let acc = mats.index(n);
                cmma::execute(&fa, &fb, acc, acc);
            }
        }
    } else {
        let lane = UNIT_POS as usize % LANES;
        let (r, half) = (lane / 2, lane % 2);
        #[unroll]
        for i in 0..comptime!(d / 2) {
            let n = comptime!(2 * i) + half;
            let mut sum = 0f32;
            if comptime!(staged) {
                for c in 0..comptime!(BLOCK) {
                    sum += f32::cast_from(p[p_at + r * stride + c]) * f32::cast_from(blocks[block_at + c * ks + n]);
                }
            } else {
                for c in 0..comptime!(BLOCK) {
                    sum += f32::cast_from(p[p_at + r * stride + c]) * f32::cast_from(y[y_at + c * y_row + n]);
                }
            }
            vals[i] += sum;
        }
    }
}

/// Writes the accumulated 16×d tile, each row times its invocations' `row_scale`, to
/// `out[out_at + r·out_row + n]`, through the group's patch `stage[stage_at..]` on the
/// tensor-core path. Every invocation of the group calls it (it synchronizes the group).
#[cube]
#[allow(clippy::too_many_arguments)]
fn acc_store<F: Float>(
    mats: &mut Sequence<cmma::Matrix<f32>>,
    vals: &Array<f32>,
    stage: &mut Shared<[f32]>,
    stage_at: usize,
    out: &mut Tensor<F>,
    out_at: usize,
    out_row: usize,
    row_scale: f32,
    #[comptime] d: usize,
    #[comptime] mma: bool,
    #[comptime] padded: bool,
) {
    let lane = UNIT_POS as usize % LANES;
    let (r, half) = (lane / 2, lane % 2);
    if comptime!(mma) {
        let stride = comptime!(tile_stride(padded));
        // Four 16×16 tiles (64 columns) through the patch at a time.
        #[unroll]
        for round in 0..comptime!(d.div_ceil(BLOCK)) {
            stage_round(mats, stage, stage_at, round, d, padded);
            sync_group(mma);
            #[unroll]
            for c in 0..comptime!(BLOCK / 2) {
                let col = comptime!(2 * c) + half;
                if comptime!(round * BLOCK) + col < d {
                    out[out_at + r * out_row + comptime!(round * BLOCK) + col] = F::cast_from(stage[stage_at + r * stride + col] * row_scale);
                }
            }
            sync_group(mma);
        }
    } else {
        #[unroll]
        for i in 0..comptime!(d / 2) {
            out[out_at + r * out_row + comptime!(2 * i) + half] = F::cast_from(vals[i] * row_scale);
        }
    }
}

/// Stores the accumulators of columns `64·round ..` (up to four 16×16 matrices) to the
/// group's patch `stage[stage_at..]`, rows [`tile_stride`] apart.
#[allow(clippy::needless_borrow)] // cmma's loads and stores take slices by reference
#[cube]
fn stage_round(
    mats: &mut Sequence<cmma::Matrix<f32>>,
    stage: &mut Shared<[f32]>,
    stage_at: usize,
    #[comptime] round: usize,
    #[comptime] d: usize,
    #[comptime] padded: bool,
) {
    let stride = comptime!(tile_stride(padded));
    let end = stage_at + comptime!(ROWS * stride);
    #[unroll]
    for n in 0..comptime!(BLOCK / MMA) {
        if comptime!(round * (BLOCK / MMA) + n < d / MMA) {
            let mut dst = stage.slice_mut(stage_at + comptime!(n * MMA), end);
            cmma::store(&mut dst, mats.index(comptime!(round * (BLOCK / MMA) + n)), comptime!(stride as u32), cmma::MatrixLayout::RowMajor);
        }
    }
}

/// Multiplies each row of the accumulated 16×d tile by its invocations' `factor`: on the
/// tensor cores a round trip through the group's patch `stage[stage_at..]` (an accumulator's
/// entries have no row an invocation could name); every invocation of the group calls it then.
#[allow(clippy::needless_borrow)] // cmma's loads and stores take slices by reference
#[cube]
#[allow(clippy::too_many_arguments)]
fn acc_scale(
    mats: &mut Sequence<cmma::Matrix<f32>>,
    vals: &mut Array<f32>,
    stage: &mut Shared<[f32]>,
    stage_at: usize,
    factor: f32,
    #[comptime] d: usize,
    #[comptime] mma: bool,
    #[comptime] padded: bool,
) {
    if comptime!(mma) {
        let lane = UNIT_POS as usize % LANES;
        let (r, half) = (lane / 2, lane % 2);
        let stride = comptime!(tile_stride(padded));
        let end = stage_at + comptime!(ROWS * stride);
        #[unroll]
        for round in 0..comptime!(d.div_ceil(BLOCK)) {
            stage_round(mats, stage, stage_at, round, d, padded);
            sync_group(mma);
            #[unroll]
            for c in 0..comptime!(BLOCK / 2) {
                let at = stage_at + r * stride + comptime!(2 * c) + half;
                stage[at] *= factor;
            }
            sync_group(mma);
            #[unroll]
            for n in 0..comptime!(BLOCK / MMA) {
                if comptime!(round * (BLOCK / MMA) + n < d / MMA) {
                    let acc = mats.index_mut(comptime!(round * (BLOCK / MMA) + n));
                    cmma::load_with_layout(acc, &stage.slice(stage_at + comptime!(n * MMA), end), comptime!(stride as u32), cmma::MatrixLayout::RowMajor);
                }
            }
            sync_group(mma);
        }
    } else {
        #[unroll]
        for i in 0..comptime!(d / 2) {
            vals[i] *= factor;
        }
    }
}

/// Flags summarized per block of [`BLOCK`] positions: `ranges[(row·blocks + block)·3 + ..]` is
/// the lowest and the highest flag of the block's visible keys (flag ≥ 0.5; highest < lowest
/// when it has none) and 1 where one of its positions has a flag below 0.5 (a query that may
/// see every key, see `crate::attention::key_visible`), else 0. `keys` `[b, s]` contiguous, `s`
/// a multiple of [`BLOCK`]; one invocation per block.
#[cube(launch_unchecked)]
fn ranges_kernel(keys: &Tensor<f32>, ranges: &mut Tensor<f32>) {
    let id = ABSOLUTE_POS;
    let s = keys.shape(1);
    let blocks = s / BLOCK;
    if id < keys.shape(0) * blocks {
        let at = (id / blocks) * s + (id % blocks) * BLOCK;
        let mut lo = f32::new(3.4028235e38);
        let mut hi = f32::new(-3.4028235e38);
        let mut open = 0f32;
        for c in 0..BLOCK {
            let flag = keys[at + c];
            if flag >= 0.5 {
                lo = min(lo, flag);
                hi = max(hi, flag);
            } else {
                open = 1.0;
            }
        }
        ranges[id * 3] = lo;
        ranges[id * 3 + 1] = hi;
        ranges[id * 3 + 2] = open;
    }
}

/// Whether some query of block `qb` may see some key of block `kb` by their flags alone (the
/// causal and window tests are the loops' bounds), from [`ranges_kernel`]'s summary of row
/// `row`: false when the key block has no visible key, or when every query of the query block
/// is restricted to its own flag and no key of the key block carries one in their range. The
/// same for every invocation of a workgroup, so the loops' barriers stay uniform.
#[cube]
fn blocks_meet(ranges: &Tensor<f32>, row: usize, blocks: usize, qb: usize, kb: usize) -> bool {
    let (q, k) = ((row * blocks + qb) * 3, (row * blocks + kb) * 3);
    let (k_lo, k_hi) = (ranges[k], ranges[k + 1]);
    k_lo <= k_hi && (ranges[q + 2] > 0.5 || (k_hi >= ranges[q] && k_lo <= ranges[q + 1]))
}

/// Whether every query of block `qb` may see every key of block `kb`: the key block lies wholly
/// below the diagonal and inside the window of every query, holds no padding and one flag only,
/// and every restricted query of the query block carries that flag. The masks' per-score tests
/// are skipped then (most blocks of unpacked rows). Uniform over a workgroup, as
/// [`blocks_meet`].
#[cube]
fn blocks_full(ranges: &Tensor<f32>, row: usize, blocks: usize, qb: usize, kb: usize, window: usize) -> bool {
    let (q, k) = ((row * blocks + qb) * 3, (row * blocks + kb) * 3);
    let (k_lo, k_hi, k_open) = (ranges[k], ranges[k + 1], ranges[k + 2]);
    let (q_lo, q_hi) = (ranges[q], ranges[q + 1]);
    // The farthest pair: the query block's last query and the key block's first key.
    let mut inside = kb < qb;
    if inside && window > 0 {
        inside = (qb - kb) * BLOCK + BLOCK - 1 < window;
    }
    inside && k_open < 0.5 && k_lo == k_hi && (q_lo > q_hi || (q_lo == k_lo && q_hi == k_lo))
}

/// The first key block any query of query block `qb` may see.
#[cube]
fn first_key_block(qb: usize, window: usize) -> usize {
    let lowest = qb * BLOCK; // the block's first query
    let mut first = 0usize;
    if window > 0 && lowest + 1 > window {
        first = (lowest + 1 - window) / BLOCK;
    }
    first
}

/// `out` `[b, h, s, d]` and `lse` `[b, h, s]` (f32) for `q` `[b, h, s, d]`, `k`, `v` `[b, kv,
/// s, d]` (any strides with the last dimension contiguous), `keys` `[b, s]` contiguous; `s` a
/// multiple of [`BLOCK`]. Workgroup `(query block, head, row)`.
///
/// One pass over the key blocks (online softmax): each row keeps a reference point `m` and the
/// sum of `exp(x − m)` over its scores so far, and adds `exp(x − m)·V` into accumulators that are
/// divided by the sum at the end. `m` moves only when a block's largest score passes it by more
/// than 8, so that the probabilities stay within `e⁸` (inside f16's range) and the accumulators
/// are rescaled rarely (on the tensor cores a round trip through workgroup memory).
///
/// On the tensor cores the queries stay in registers and each key and value block is staged in
/// workgroup memory once for the four groups ([`staged_blocks`] of them at a time).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    keys: &Tensor<f32>,
    ranges: &Tensor<f32>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    window: usize,
    #[comptime] d: usize,
    #[comptime] mma: bool,
    #[comptime] padded: bool,
    #[comptime] staged: usize,
    #[define(F)] _dtype: ElemType,
) {
    let unit = UNIT_POS as usize;
    let (group, lane) = (unit / LANES, unit % LANES);
    let (qb, head, row) = (CUBE_POS_X as usize, CUBE_POS_Y as usize, CUBE_POS_Z as usize);
    let (h, s) = (q.shape(1), q.shape(2));
    let kvh = head / (h / k.shape(1));
    let first_q = qb * BLOCK + group * ROWS; // the group's first query
    let q_at = row * q.stride(0) + head * q.stride(1) + first_q * q.stride(2);
    let (k_base, v_base) = (row * k.stride(0) + kvh * k.stride(1), row * v.stride(0) + kvh * v.stride(1));
    let (q_row, k_row, v_row) = (q.stride(2), k.stride(2), v.stride(2));
    let (stride, op) = (comptime!(tile_stride(padded)), comptime!(op_stride(padded)));
    let mut scores = Shared::<[f32]>::new_slice(comptime!(4 * ROWS * tile_stride(padded)));
    // The operand tiles, then (tensor cores) the staged blocks: one array, as the scalar path has
    // no room for another on some devices.
    let mut probs = Shared::<[F]>::new_slice(comptime!(4 * ROWS * op_stride(padded) + staged * BLOCK * block_stride(d)));
    let staging_at = comptime!(4 * ROWS * op_stride(padded));
    // The staged keys, and the values after them where both fit (in their place otherwise).
    let v_block = comptime!(if staged == 2 { BLOCK * block_stride(d) } else { 0 });
    let (patch, op_patch) = (group * ROWS * stride, group * ROWS * op);
    // Two invocations per row, each over every other column of the block.
    let (r, half) = (lane / 2, lane % 2);
    let i = first_q + r;
    let first_kb = first_key_block(qb, window);
    let blocks = s / BLOCK;
    let minimum = f32::new(-3.4028235e38); // f32::MIN
    let q_frags = a_frags::<F>(q, q_at, q_row, d, mma);

    // The row's reference point (the same in both of its invocations) and this invocation's
    // sum of exp(x − m) over its columns.
    let mut m = minimum;
    let mut l = 0f32;
    let (mut mats, mut vals) = acc_new(d, mma);
    for kb in first_kb..qb + 1 {
        if blocks_meet(ranges, row, blocks, qb, kb) {
            let full = blocks_full(ranges, row, blocks, qb, kb, window);
            let (k_at, v_at) = (k_base + kb * BLOCK * k_row, v_base + kb * BLOCK * v_row);
            if comptime!(staged > 0) {
                // Every group is done with the previous block's values.
                sync_cube();
                stage_block::<F>(k, k_at, k_row, &mut probs, staging_at, d);
                if comptime!(staged == 2) {
                    stage_block::<F>(v, v_at, v_row, &mut probs, staging_at + v_block, d);
                }
                sync_cube();
            }
            product_nt::<F>(&q_frags, q, q_at, q_row, k, k_at, k_row, &probs, staging_at, &mut scores, patch, d, mma, padded, comptime!(staged > 0));
            if comptime!(staged == 1) {
                // Every group is done with the keys: the values take their place.
                sync_cube();
                stage_block::<F>(v, v_at, v_row, &mut probs, staging_at, d);
            } else {
                sync_group(mma);
            }
            // The row's largest visible score in the block: on the tensor cores each invocation
            // reads its half and the two meet through a shuffle (a group is a plane there);
            // elsewhere both read the whole row.
            let mut top = minimum;
            if comptime!(mma) {
                #[unroll]
                for c in 0..comptime!(BLOCK / 2) {
                    let col = comptime!(2 * c) + half;
                    if visible(full, keys, row, s, i, kb * BLOCK + col, window) {
                        top = max(top, scores[patch + r * stride + col] * scale);
                    }
                }
                top = max(top, plane_shuffle_xor(top, 1));
            } else {
                #[unroll]
                for c in 0..comptime!(BLOCK) {
                    if visible(full, keys, row, s, i, kb * BLOCK + c, window) {
                        top = max(top, scores[patch + r * stride + c] * scale);
                    }
                }
            }
            let mut factor = 1f32;
            if top > m + 8.0 {
                factor = (m - top).exp(); // 0 while m is still f32::MIN
                m = top;
            }
            // The row holds accumulated values that the move rescales.
            let rescale = factor < 1.0 && l > 0.0;
            l *= factor;
            #[unroll]
            for c in 0..comptime!(BLOCK / 2) {
                let col = comptime!(2 * c) + half;
                let mut p = 0f32;
                if visible(full, keys, row, s, i, kb * BLOCK + col, window) {
                    p = (scores[patch + r * stride + col] * scale - m).exp();
                }
                l += p;
                probs[op_patch + r * op + col] = F::cast_from(p);
            }
            sync_group(mma);
            if comptime!(mma) {
                // The round trip is the whole group's (a plane here): it runs where any of its
                // rows moved.
                if plane_any(rescale) {
                    acc_scale(&mut mats, &mut vals, &mut scores, patch, factor, d, mma, padded);
                }
            } else {
                acc_scale(&mut mats, &mut vals, &mut scores, patch, factor, d, mma, padded);
            }
            if comptime!(staged == 1) {
                // The values are staged.
                sync_cube();
            }
            acc_add::<F>(&mats, &mut vals, &probs, op_patch, v, v_at, v_row, &probs, staging_at + v_block, d, mma, padded, comptime!(staged > 0));
            sync_group(mma);
        }
    }
    // The two halves' sums meet through the (now free) scores.
    scores[patch + lane] = l;
    sync_group(mma);
    let total = l + scores[patch + (lane ^ 1)];
    sync_group(mma);
    // A row that may see no key keeps P = 0 (every entry masked) whatever its log-sum-exp.
    let mut row_lse = 0f32;
    let mut inverse = 0f32;
    if total > 0.0 {
        row_lse = m + total.ln();
        inverse = 1.0 / total;
    }
    if half == 0 {
        lse[(row * h + head) * s + i] = row_lse;
    }
    let out_row = out.stride(2);
    let out_at = row * out.stride(0) + head * out.stride(1) + first_q * out_row;
    acc_store::<F>(&mut mats, &vals, &mut scores, patch, out, out_at, out_row, inverse, d, mma, padded);
}

/// `delta[(b·h + head)·s + i] = Σ_c dout[b, head, i, c]·out[b, head, i, c]` in f32, one row per
/// invocation.
#[cube(launch_unchecked)]
fn delta_kernel<F: Float>(dout: &Tensor<F>, out: &Tensor<F>, delta: &mut Tensor<f32>, #[comptime] d: usize, #[define(F)] _dtype: ElemType) {
    let id = ABSOLUTE_POS;
    let (h, s) = (out.shape(1), out.shape(2));
    if id < delta.len() {
        let (i, head, row) = (id % s, (id / s) % h, id / (s * h));
        let a = row * dout.stride(0) + head * dout.stride(1) + i * dout.stride(2);
        let o = row * out.stride(0) + head * out.stride(1) + i * out.stride(2);
        let mut sum = 0f32;
        for c in 0..d {
            sum += f32::cast_from(dout[a + c]) * f32::cast_from(out[o + c]);
        }
        delta[id] = sum;
    }
}

/// `dk`, `dv` `[b, h, s, d]` (contiguous) for one key block as seen by one query head: a sum
/// over the query blocks that may see it (the caller sums a key/value head's query heads).
/// Workgroup `(key block, query head, row)`; on the tensor cores each query and output-gradient
/// block is staged in workgroup memory for the four groups ([`staged_blocks`] at a time).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn dkv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    keys: &Tensor<f32>,
    ranges: &Tensor<f32>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    window: usize,
    #[comptime] d: usize,
    #[comptime] mma: bool,
    #[comptime] padded: bool,
    #[comptime] staged: usize,
    #[define(F)] _dtype: ElemType,
) {
    let unit = UNIT_POS as usize;
    let (group, lane) = (unit / LANES, unit % LANES);
    let (kb, head, row) = (CUBE_POS_X as usize, CUBE_POS_Y as usize, CUBE_POS_Z as usize);
    let (h, s) = (q.shape(1), q.shape(2));
    let kvh = head / (h / k.shape(1));
    let first_k = kb * BLOCK + group * ROWS; // the group's first key
    let k_at = row * k.stride(0) + kvh * k.stride(1) + first_k * k.stride(2);
    let v_at = row * v.stride(0) + kvh * v.stride(1) + first_k * v.stride(2);
    let (q_row, k_row, v_row, do_row) = (q.stride(2), k.stride(2), v.stride(2), dout.stride(2));
    // A group's f32 tile (scores, then the probabilities' gradient) and its tile in the
    // operands' dtype (the probabilities, then the scores' gradient).
    let (stride, op) = (comptime!(tile_stride(padded)), comptime!(op_stride(padded)));
    let mut tile = Shared::<[f32]>::new_slice(comptime!(4 * ROWS * tile_stride(padded)));
    // The operand tiles, then (tensor cores) the staged blocks: one array, as the scalar path has
    // no room for another on some devices.
    let mut operand = Shared::<[F]>::new_slice(comptime!(4 * ROWS * op_stride(padded) + staged * BLOCK * block_stride(d)));
    let staging_at = comptime!(4 * ROWS * op_stride(padded));
    // The staged queries, and the output gradients after them where both fit (in their place
    // otherwise, the queries staged again for dK).
    let do_block = comptime!(if staged == 2 { BLOCK * block_stride(d) } else { 0 });
    let (patch, op_patch) = (group * ROWS * stride, group * ROWS * op);
    let (r, half) = (lane / 2, lane % 2);
    let j = first_k + r; // this invocation's key
    let blocks = s / BLOCK;
    let mut last_qb = blocks - 1;
    if window > 0 {
        // The last query that may see the block's last key: (kb + 1)·64 − 1 + window − 1.
        last_qb = min(last_qb, ((kb + 1) * BLOCK + window - 2) / BLOCK);
    }
    let (mut dk_mats, mut dk_vals) = acc_new(d, mma);
    let (mut dv_mats, mut dv_vals) = acc_new(d, mma);
    let q_base = row * q.stride(0) + head * q.stride(1);
    let do_base = row * dout.stride(0) + head * dout.stride(1);
    let stat = (row * h + head) * s;
    for qb in kb..last_qb + 1 {
        if blocks_meet(ranges, row, blocks, qb, kb) {
            let full = blocks_full(ranges, row, blocks, qb, kb, window);
            let q_at = q_base + qb * BLOCK * q_row;
            let do_at = do_base + qb * BLOCK * do_row;
            if comptime!(staged > 0) {
                // Every group is done with the previous block's operands.
                sync_cube();
                stage_block::<F>(q, q_at, q_row, &mut operand, staging_at, d);
                if comptime!(staged == 2) {
                    stage_block::<F>(dout, do_at, do_row, &mut operand, staging_at + do_block, d);
                }
                sync_cube();
            }
            // Sᵀ = K·Qᵀ: the group's 16 keys against the block's 64 queries.
            let k_frags = a_frags::<F>(k, k_at, k_row, d, mma);
            product_nt::<F>(&k_frags, k, k_at, k_row, q, q_at, q_row, &operand, staging_at, &mut tile, patch, d, mma, padded, comptime!(staged > 0));
            sync_group(mma);
            // Pᵀ, kept in registers for dSᵀ as well.
            let mut p = Array::<f32>::new(comptime!(BLOCK / 2));
            #[unroll]
            for c in 0..comptime!(BLOCK / 2) {
                let col = comptime!(2 * c) + half;
                let i = qb * BLOCK + col;
                let mut pc = 0f32;
                if visible(full, keys, row, s, i, j, window) {
                    pc = (tile[patch + r * stride + col] * scale - lse[stat + i]).exp();
                }
                p[c] = pc;
                operand[op_patch + r * op + col] = F::cast_from(pc);
            }
            if comptime!(staged == 1) {
                // Every group is done with the queries: the output gradients take their place.
                sync_cube();
                stage_block::<F>(dout, do_at, do_row, &mut operand, staging_at, d);
                sync_cube();
            } else {
                sync_group(mma);
            }
            // dV += Pᵀ·dO; dPᵀ = V·dOᵀ.
            acc_add::<F>(
                &dv_mats,
                &mut dv_vals,
                &operand,
                op_patch,
                dout,
                do_at,
                do_row,
                &operand,
                staging_at + do_block,
                d,
                mma,
                padded,
                comptime!(staged > 0),
            );
            let v_frags = a_frags::<F>(v, v_at, v_row, d, mma);
            product_nt::<F>(
                &v_frags,
                v,
                v_at,
                v_row,
                dout,
                do_at,
                do_row,
                &operand,
                staging_at + do_block,
                &mut tile,
                patch,
                d,
                mma,
                padded,
                comptime!(staged > 0),
            );
            sync_group(mma);
            // dSᵀ = Pᵀ ∘ (dPᵀ − D)/√d, in place of Pᵀ (the group is past reading it).
            #[unroll]
            for c in 0..comptime!(BLOCK / 2) {
                let col = comptime!(2 * c) + half;
                operand[op_patch + r * op + col] = F::cast_from(p[c] * (tile[patch + r * stride + col] - delta[stat + qb * BLOCK + col]) * scale);
            }
            if comptime!(staged == 1) {
                // Every group is done with the output gradients: the queries again.
                sync_cube();
                stage_block::<F>(q, q_at, q_row, &mut operand, staging_at, d);
                sync_cube();
            } else {
                sync_group(mma);
            }
            // dK += dSᵀ·Q.
            acc_add::<F>(&dk_mats, &mut dk_vals, &operand, op_patch, q, q_at, q_row, &operand, staging_at, d, mma, padded, comptime!(staged > 0));
            sync_group(mma);
        }
    }
    let out_at = ((row * h + head) * s + first_k) * d;
    acc_store::<F>(&mut dk_mats, &dk_vals, &mut tile, patch, dk, out_at, d, 1.0, d, mma, padded);
    acc_store::<F>(&mut dv_mats, &dv_vals, &mut tile, patch, dv, out_at, d, 1.0, d, mma, padded);
}

/// `dq` `[b, h, s, d]` (contiguous) for one query block of one head. Workgroup `(query block,
/// head, row)`; on the tensor cores the queries stay in registers and each value and key block
/// is staged in workgroup memory for the four groups ([`staged_blocks`] at a time).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    keys: &Tensor<f32>,
    ranges: &Tensor<f32>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dq: &mut Tensor<F>,
    scale: f32,
    window: usize,
    #[comptime] d: usize,
    #[comptime] mma: bool,
    #[comptime] padded: bool,
    #[comptime] staged: usize,
    #[define(F)] _dtype: ElemType,
) {
    let unit = UNIT_POS as usize;
    let (group, lane) = (unit / LANES, unit % LANES);
    let (qb, head, row) = (CUBE_POS_X as usize, CUBE_POS_Y as usize, CUBE_POS_Z as usize);
    let (h, s) = (q.shape(1), q.shape(2));
    let kvh = head / (h / k.shape(1));
    let first_q = qb * BLOCK + group * ROWS;
    let q_at = row * q.stride(0) + head * q.stride(1) + first_q * q.stride(2);
    let do_at = row * dout.stride(0) + head * dout.stride(1) + first_q * dout.stride(2);
    let (k_base, v_base) = (row * k.stride(0) + kvh * k.stride(1), row * v.stride(0) + kvh * v.stride(1));
    let (q_row, k_row, v_row, do_row) = (q.stride(2), k.stride(2), v.stride(2), dout.stride(2));
    let (stride, op) = (comptime!(tile_stride(padded)), comptime!(op_stride(padded)));
    let mut tile = Shared::<[f32]>::new_slice(comptime!(4 * ROWS * tile_stride(padded)));
    // The operand tiles, then (tensor cores) the staged blocks: one array, as the scalar path has
    // no room for another on some devices.
    let mut operand = Shared::<[F]>::new_slice(comptime!(4 * ROWS * op_stride(padded) + staged * BLOCK * block_stride(d)));
    let staging_at = comptime!(4 * ROWS * op_stride(padded));
    // The staged keys, and the values after them where both fit (in their place otherwise).
    let v_block = comptime!(if staged == 2 { BLOCK * block_stride(d) } else { 0 });
    let (patch, op_patch) = (group * ROWS * stride, group * ROWS * op);
    let (r, half) = (lane / 2, lane % 2);
    let i = first_q + r;
    let stat = (row * h + head) * s + i;
    let (row_lse, row_delta) = (lse[stat], delta[stat]);
    let first_kb = first_key_block(qb, window);
    let (mut mats, mut vals) = acc_new(d, mma);
    let blocks = s / BLOCK;
    let q_frags = a_frags::<F>(q, q_at, q_row, d, mma);
    for kb in first_kb..qb + 1 {
        if blocks_meet(ranges, row, blocks, qb, kb) {
            let full = blocks_full(ranges, row, blocks, qb, kb, window);
            let (k_at, v_at) = (k_base + kb * BLOCK * k_row, v_base + kb * BLOCK * v_row);
            if comptime!(staged > 0) {
                // Every group is done with the previous block's keys.
                sync_cube();
                stage_block::<F>(v, v_at, v_row, &mut operand, staging_at + v_block, d);
                if comptime!(staged == 2) {
                    stage_block::<F>(k, k_at, k_row, &mut operand, staging_at, d);
                }
                sync_cube();
            }
            // dP = dO·Vᵀ, and dP − D for this invocation's half of the row, kept in registers.
            let do_frags = a_frags::<F>(dout, do_at, do_row, d, mma);
            product_nt::<F>(
                &do_frags,
                dout,
                do_at,
                do_row,
                v,
                v_at,
                v_row,
                &operand,
                staging_at + v_block,
                &mut tile,
                patch,
                d,
                mma,
                padded,
                comptime!(staged > 0),
            );
            sync_group(mma);
            let mut dp = Array::<f32>::new(comptime!(BLOCK / 2));
            #[unroll]
            for c in 0..comptime!(BLOCK / 2) {
                dp[c] = tile[patch + r * stride + comptime!(2 * c) + half] - row_delta;
            }
            if comptime!(staged == 1) {
                // Every group is done with the values: the keys take their place.
                sync_cube();
                stage_block::<F>(k, k_at, k_row, &mut operand, staging_at, d);
                sync_cube();
            } else {
                sync_group(mma);
            }
            // S = Q·Kᵀ, then dS = P ∘ (dP − D)/√d.
            product_nt::<F>(&q_frags, q, q_at, q_row, k, k_at, k_row, &operand, staging_at, &mut tile, patch, d, mma, padded, comptime!(staged > 0));
            sync_group(mma);
            #[unroll]
            for c in 0..comptime!(BLOCK / 2) {
                let col = comptime!(2 * c) + half;
                let mut p = 0f32;
                if visible(full, keys, row, s, i, kb * BLOCK + col, window) {
                    p = (tile[patch + r * stride + col] * scale - row_lse).exp();
                }
                operand[op_patch + r * op + col] = F::cast_from(p * dp[c] * scale);
            }
            sync_group(mma);
            acc_add::<F>(&mats, &mut vals, &operand, op_patch, k, k_at, k_row, &operand, staging_at, d, mma, padded, comptime!(staged > 0));
            sync_group(mma);
        }
    }
    let out_at = ((row * h + head) * s + first_q) * d;
    acc_store::<F>(&mut mats, &vals, &mut tile, patch, dq, out_at, d, 1.0, d, mma, padded);
}

/// `t` with its last dimension contiguous (a view's other strides are kept).
fn rows_contiguous(t: CubeTensor) -> CubeTensor {
    let rank = t.shape().num_dims();
    if t.meta.strides()[rank - 1] == 1 { t } else { into_contiguous(t) }
}

/// `t` `[.., s, ..]` padded with zeros along `dim` to `to` positions.
fn pad(t: CubeTensor, dim: usize, to: usize) -> CubeTensor {
    use burn::backend::ops::FloatTensorOps;
    let shape = t.shape();
    if shape[dim] == to {
        return t;
    }
    let mut padded = shape.clone();
    padded[dim] = to;
    let zeros = zeros_client(t.client.clone(), t.device.clone(), padded, t.dtype);
    burn_cubecl::CubeBackend::float_slice_assign(zeros, &slice_dim(shape.num_dims(), dim, 0, shape[dim]), t)
}

/// The first `s` positions of `t` along `dim`.
fn unpad(t: CubeTensor, dim: usize, s: usize) -> CubeTensor {
    use burn::backend::ops::FloatTensorOps;
    if t.shape()[dim] == s {
        return t;
    }
    let rank = t.shape().num_dims();
    into_contiguous(burn_cubecl::CubeBackend::float_slice(t, &slice_dim(rank, dim, 0, s)))
}

/// [`ranges_kernel`]'s summary `[b, s / BLOCK, 3]` of `keys` `[b, s]` (contiguous f32, `s` a
/// multiple of [`BLOCK`]).
fn block_ranges(keys: &CubeTensor) -> CubeTensor {
    let [b, s] = keys.shape().dims();
    let blocks = b * (s / BLOCK);
    let ranges = empty_device_dtype(keys.client.clone(), keys.device.clone(), Shape::new([b, s / BLOCK, 3]), DType::F32);
    // SAFETY: one invocation per block, guarded by `id < b · s / BLOCK`; it reads its block's
    // BLOCK flags of the contiguous `keys` and writes its three entries of `ranges`.
    unsafe {
        ranges_kernel::launch_unchecked(
            &keys.client,
            CubeCount::Static(blocks.div_ceil(256) as u32, 1, 1),
            CubeDim::new_1d(256),
            keys.clone().into_tensor_arg(),
            ranges.clone().into_tensor_arg(),
        )
    }
    ranges
}

fn launch_dims(blocks: usize, heads: usize, b: usize) -> (CubeCount, CubeDim) {
    (CubeCount::Static(blocks as u32, heads as u32, b as u32), CubeDim::new_1d(UNITS as u32))
}

/// The attention's output `[b, h, s, d]` and the f32 log-sum-exp of every query's scores
/// `[b, kv, h / kv, s, 1]` (the layout of [`crate::attention`]'s composition). The caller
/// chose `path` with [`path`].
pub fn forward(q: CubeTensor, k: CubeTensor, v: CubeTensor, keys: CubeTensor, window: usize, path: Path) -> (CubeTensor, CubeTensor) {
    count(path);
    let [b, h, s, d] = q.shape().dims();
    let kv = k.shape()[1];
    let positions = s.next_multiple_of(BLOCK);
    let [q, k, v] = [q, k, v].map(|t| rows_contiguous(pad(t, 2, positions)));
    let keys = into_contiguous(pad(keys, 1, positions));
    let ranges = block_ranges(&keys);
    let out = empty_device_dtype(q.client.clone(), q.device.clone(), Shape::new([b, h, positions, d]), q.dtype);
    let lse = empty_device_dtype(q.client.clone(), q.device.clone(), Shape::new([b, kv, h / kv, positions, 1]), DType::F32);
    let (count, dim) = launch_dims(positions / BLOCK, h, b);
    let dtype = dtype_to_storage_type(q.dtype);
    let staged = staged_blocks(q.dtype.size(), d, q.client.properties().hardware.max_shared_memory_size);
    // SAFETY: `path` checked the shapes ([b, h, s, d] queries, [b, kv, s, d] keys and values
    // with kv dividing h, [b, s] key flags) and d ≤ MAX_HEAD; every tensor is padded to a
    // multiple of BLOCK positions, so each workgroup's 64 queries and every key block it reads
    // lie inside them; the tensor-core path needs d a multiple of 16 (checked).
    unsafe {
        forward_kernel::launch_unchecked(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            keys.into_tensor_arg(),
            ranges.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            1.0 / (d as f32).sqrt(),
            window,
            d,
            path == Path::Mma,
            padded(q.dtype),
            staged,
            dtype,
        )
    }
    (unpad(out, 2, s), unpad(lse, 3, s))
}

/// `(dq, dk, dv)` for the output gradient `dout`, from the forward's inputs, output and
/// log-sum-exp. The caller chose `path` with [`path`].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    keys: CubeTensor,
    out: CubeTensor,
    lse: CubeTensor,
    dout: CubeTensor,
    window: usize,
    path: Path,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    count(path);
    let [b, h, s, d] = q.shape().dims();
    let kv = k.shape()[1];
    let positions = s.next_multiple_of(BLOCK);
    let [q, k, v, out, dout] = [q, k, v, out, dout].map(|t| rows_contiguous(pad(t, 2, positions)));
    let keys = into_contiguous(pad(keys, 1, positions));
    let lse = into_contiguous(pad(lse, 3, positions));
    let ranges = block_ranges(&keys);
    let (client, device) = (q.client.clone(), q.device.clone());
    let delta = empty_device_dtype(client.clone(), device.clone(), Shape::new([b, h, positions]), DType::F32);
    let dq = empty_device_dtype(client.clone(), device.clone(), Shape::new([b, h, positions, d]), q.dtype);
    // Per query head; a key/value head's query heads are summed below.
    let dk = empty_device_dtype(client.clone(), device.clone(), Shape::new([b, h, positions, d]), q.dtype);
    let dv = empty_device_dtype(client.clone(), device.clone(), Shape::new([b, h, positions, d]), q.dtype);
    let dtype = dtype_to_storage_type(q.dtype);
    let scale = 1.0 / (d as f32).sqrt();
    let (mma, tiles_padded) = (path == Path::Mma, padded(q.dtype));
    let staged = staged_blocks(q.dtype.size(), d, client.properties().hardware.max_shared_memory_size);
    let rows = b * h * positions;
    // SAFETY: as in `forward`; `delta` and `lse` hold one f32 per (row, head, padded query);
    // dq, dk and dv are contiguous with the padded shapes, each workgroup writing its own block.
    unsafe {
        delta_kernel::launch_unchecked(
            &client,
            CubeCount::Static(rows.div_ceil(256) as u32, 1, 1),
            CubeDim::new_1d(256),
            dout.clone().into_tensor_arg(),
            out.into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            d,
            dtype,
        );
        let (count, dim) = launch_dims(positions / BLOCK, h, b);
        dkv_kernel::launch_unchecked(
            &client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            keys.clone().into_tensor_arg(),
            ranges.clone().into_tensor_arg(),
            dout.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            scale,
            window,
            d,
            mma,
            tiles_padded,
            staged,
            dtype,
        );
        let (count, dim) = launch_dims(positions / BLOCK, h, b);
        dq_kernel::launch_unchecked(
            &client,
            count,
            dim,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            keys.into_tensor_arg(),
            ranges.into_tensor_arg(),
            dout.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            scale,
            window,
            d,
            mma,
            tiles_padded,
            staged,
            dtype,
        );
    }
    let [dk, dv] = [dk, dv].map(|t| unpad(heads_summed(t, kv), 2, s));
    (unpad(dq, 2, s), dk, dv)
}

/// `t` `[b, h, s, d]` summed over each run of `h / kv` heads: `[b, kv, s, d]`.
fn heads_summed(t: CubeTensor, kv: usize) -> CubeTensor {
    use burn::backend::ops::FloatTensorOps;
    use burn_cubecl::CubeBackend as B;
    let [b, h, s, d] = t.shape().dims();
    if h == kv {
        return t;
    }
    let grouped = B::float_sum_dim(B::float_reshape(t, Shape::new([b, kv, h / kv, s, d])), 2);
    B::float_reshape(grouped, Shape::new([b, kv, s, d]))
}
