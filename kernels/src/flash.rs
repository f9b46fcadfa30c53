//! Causal attention forward and backward as three kernels on the GPU (the flash-attention
//! recurrence): no score matrix ever leaves workgroup memory.
//!
//! Every kernel runs workgroups of [`UNITS`] invocations in four groups of 32; a workgroup
//! covers [`BLOCK`] query (or key) positions of one head, each group 16 of them, and steps
//! through the other side [`BLOCK`] positions at a time. A group's 16×64 tiles of scores,
//! probabilities and their gradients live in its own patch of workgroup memory, where its 32
//! invocations apply the mask and the exponentials, two invocations per row.
//!
//! - Forward ([`forward`]): per query block, a first pass over the key blocks finds every
//!   row's log-sum-exp (online, one exponential per score); a second computes the normalized
//!   probabilities and adds `P·V` into accumulators that are never rescaled.
//! - Backward ([`backward`]): `D = rowsum(dO ∘ O)` in a small kernel; per key block (and
//!   every query head of its key/value head), `dV += Pᵀ·dO` and `dK += dSᵀ·Q`; per query
//!   block, `dQ += dS·K`, with `dS = P ∘ (dO·Vᵀ − D)/√d` recomputed from the forward's
//!   log-sum-exp in both.
//!
//! The 16×64 and 16×d products run on the tensor cores (16×16×16 cooperative matrices, f16
//! operands, f32 accumulators) where the device has them and the head size is a multiple of
//! 16 ([`Path::Mma`], the default: see [`Mode`]); [`Path::Scalar`] computes the same products one dot product per
//! invocation, so that the rest of the kernels (masks, the softmax and its gradient, the
//! indexing) is checked on a device without tensor cores (lavapipe in CI). Query head `i`
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
/// One group's patch of workgroup memory: a 16×64 tile.
const PATCH: usize = ROWS * BLOCK;
/// Side of the 16×16×16 cooperative matrices.
const MMA: usize = 16;

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
/// of exactly 32 invocations (the groups of the kernels are planes then).
fn has_mma(t: &CubeTensor) -> bool {
    let props = t.client.properties();
    let (f16, f32) = (ElemType::Float(FloatKind::F16), ElemType::Float(FloatKind::F32));
    props.hardware.plane_size_min == LANES as u32
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
    if mode == Mode::Mma && q.dtype == DType::F16 && d.is_multiple_of(MMA) && has_mma(q) {
        return Some(Path::Mma);
    }
    (mode == Mode::Scalar && d.is_multiple_of(2)).then_some(Path::Scalar)
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

/// `out[out_at + r·64 + c] = Σ_t a[a_at + r·a_row + t]·x[x_at + c·x_row + t]` for the group's
/// 16 rows `r` and 64 columns `c` (`t < d`): a 16×d tile times the transpose of a 64×d one.
#[allow(clippy::needless_borrow)] // cmma's loads and stores take slices by reference
#[cube]
#[allow(clippy::too_many_arguments)]
fn product_nt<F: Float>(
    a: &Tensor<F>,
    a_at: usize,
    a_row: usize,
    x: &Tensor<F>,
    x_at: usize,
    x_row: usize,
    out: &mut Shared<[f32]>,
    out_at: usize,
    #[comptime] d: usize,
    #[comptime] mma: bool,
) {
    if comptime!(mma) {
        let mut fa = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, MMA, MMA, MMA, cmma::MatrixLayout::RowMajor) };
        let mut fb = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, MMA, MMA, MMA, cmma::MatrixLayout::ColMajor) };
        let mut accs = Sequence::<cmma::Matrix<f32>>::new();
        #[unroll]
        for _ in 0..comptime!(BLOCK / MMA) {
            accs.push(cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, MMA, MMA, MMA, cmma::MatrixLayout::Undefined, 0.0));
        }
        let (a_len, x_len) = (a.len(), x.len());
        #[unroll]
        for t in 0..comptime!(d / MMA) {
            cmma::load(&mut fa, &a.slice(a_at + comptime!(t * MMA), a_len), a_row as u32);
            #[unroll]
            for n in 0..comptime!(BLOCK / MMA) {
                // B(t, c) = x[c, t]: column-major with the row stride of x.
                cmma::load(&mut fb, &x.slice(x_at + comptime!(n * MMA) * x_row + comptime!(t * MMA), x_len), x_row as u32);
                let acc = accs.index(n);
                cmma::execute(&fa, &fb, acc, acc);
            }
        }
        let end = out_at + comptime!(PATCH);
        #[unroll]
        for n in 0..comptime!(BLOCK / MMA) {
            let mut dst = out.slice_mut(out_at + comptime!(n * MMA), end);
            cmma::store(&mut dst, accs.index(n), comptime!(BLOCK as u32), cmma::MatrixLayout::RowMajor);
        }
    } else {
        let lane = UNIT_POS as usize % LANES;
        for e in range_stepped(lane, comptime!(PATCH), LANES) {
            let (r, c) = (e / BLOCK, e % BLOCK);
            let (ar, xr) = (a_at + r * a_row, x_at + c * x_row);
            let mut dot = 0f32;
            for t in 0..d {
                dot += f32::cast_from(a[ar + t]) * f32::cast_from(x[xr + t]);
            }
            out[out_at + e] = dot;
        }
    }
}

/// New zeroed accumulators for a 16×d tile: `d / 16` cooperative matrices, or `d / 2` values
/// per invocation (element `lane + 32·i` of the row-major tile).
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

/// Adds `p[p_at..]` (16×64, row-major in workgroup memory) times `y[y_at..]` (64×d, row stride
/// `y_row`) to the accumulators.
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
    #[comptime] d: usize,
    #[comptime] mma: bool,
) {
    if comptime!(mma) {
        let mut fa = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, MMA, MMA, MMA, cmma::MatrixLayout::RowMajor) };
        let mut fb = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, MMA, MMA, MMA, cmma::MatrixLayout::RowMajor) };
        let (p_end, y_len) = (p_at + comptime!(PATCH), y.len());
        #[unroll]
        for t in 0..comptime!(BLOCK / MMA) {
            cmma::load(&mut fa, &p.slice(p_at + comptime!(t * MMA), p_end), comptime!(BLOCK as u32));
            #[unroll]
            for n in 0..comptime!(d / MMA) {
                cmma::load(&mut fb, &y.slice(y_at + comptime!(t * MMA) * y_row + comptime!(n * MMA), y_len), y_row as u32);
                let acc = mats.index(n);
                cmma::execute(&fa, &fb, acc, acc);
            }
        }
    } else {
        let lane = UNIT_POS as usize % LANES;
        #[unroll]
        for i in 0..comptime!(d / 2) {
            let e = lane + comptime!(i * LANES);
            let (r, n) = (e / d, e % d);
            let mut sum = 0f32;
            for c in 0..comptime!(BLOCK) {
                sum += f32::cast_from(p[p_at + r * BLOCK + c]) * f32::cast_from(y[y_at + c * y_row + n]);
            }
            vals[i] += sum;
        }
    }
}

/// Writes the accumulated 16×d tile to `out[out_at + r·out_row + n]`, through the group's
/// patch `stage[stage_at..]` on the tensor-core path. Every invocation of the workgroup calls
/// it (it synchronizes the workgroup).
#[allow(clippy::needless_borrow)] // cmma's loads and stores take slices by reference
#[cube]
#[allow(clippy::too_many_arguments)]
fn acc_store<F: Float>(
    mats: &Sequence<cmma::Matrix<f32>>,
    vals: &Array<f32>,
    stage: &mut Shared<[f32]>,
    stage_at: usize,
    out: &mut Tensor<F>,
    out_at: usize,
    out_row: usize,
    #[comptime] d: usize,
    #[comptime] mma: bool,
) {
    let lane = UNIT_POS as usize % LANES;
    if comptime!(mma) {
        let end = stage_at + comptime!(PATCH);
        // Four 16×16 tiles (64 columns) through the patch at a time.
        #[unroll]
        for round in 0..comptime!(d.div_ceil(BLOCK)) {
            #[unroll]
            for n in 0..comptime!(BLOCK / MMA) {
                if comptime!(round * (BLOCK / MMA) + n < d / MMA) {
                    let mut dst = stage.slice_mut(stage_at + comptime!(n * MMA), end);
                    cmma::store(&mut dst, mats.index(comptime!(round * (BLOCK / MMA) + n)), comptime!(BLOCK as u32), cmma::MatrixLayout::RowMajor);
                }
            }
            sync_cube();
            for e in range_stepped(lane, comptime!(PATCH), LANES) {
                let (r, c) = (e / BLOCK, e % BLOCK);
                let col = comptime!(round * BLOCK) + c;
                if col < d {
                    out[out_at + r * out_row + col] = F::cast_from(stage[stage_at + e]);
                }
            }
            sync_cube();
        }
    } else {
        #[unroll]
        for i in 0..comptime!(d / 2) {
            let e = lane + comptime!(i * LANES);
            out[out_at + (e / d) * out_row + e % d] = F::cast_from(vals[i]);
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
    let mut scores = Shared::<[f32]>::new_slice(comptime!(4 * PATCH));
    let mut probs = Shared::<[F]>::new_slice(comptime!(4 * PATCH));
    let patch = group * PATCH;
    // Two invocations per row, each over half of the block's columns.
    let (r, half) = (lane / 2, lane % 2);
    let i = first_q + r;
    let first_kb = first_key_block(qb, window);
    let blocks = s / BLOCK;
    let minimum = f32::new(-3.4028235e38); // f32::MIN

    // Pass 1: every row's maximum and sum of exponentials, online.
    let mut m = minimum;
    let mut l = 0f32;
    for kb in first_kb..qb + 1 {
        if blocks_meet(ranges, row, blocks, qb, kb) {
            let full = blocks_full(ranges, row, blocks, qb, kb, window);
            product_nt::<F>(q, q_at, q_row, k, k_base + kb * BLOCK * k_row, k_row, &mut scores, patch, d, mma);
            sync_cube();
            for c in 0..comptime!(BLOCK / 2) {
                let col = half * comptime!(BLOCK / 2) + c;
                let j = kb * BLOCK + col;
                if visible(full, keys, row, s, i, j, window) {
                    let x = scores[patch + r * BLOCK + col] * scale;
                    if x > m {
                        l = l * (m - x).exp() + 1.0;
                        m = x;
                    } else {
                        l += (x - m).exp();
                    }
                }
            }
            sync_cube();
        }
    }
    // The two halves of each row meet through the (now free) scores.
    scores[2 * unit] = m;
    scores[2 * unit + 1] = l;
    sync_cube();
    let (m2, l2) = (scores[2 * (unit ^ 1)], scores[2 * (unit ^ 1) + 1]);
    sync_cube();
    let top = max(m, m2);
    let total = l * (m - top).exp() + l2 * (m2 - top).exp();
    // A row that may see no key keeps P = 0 (every entry masked) whatever its log-sum-exp.
    let mut row_lse = 0f32;
    if total > 0.0 {
        row_lse = top + total.ln();
    }
    if half == 0 {
        lse[(row * h + head) * s + i] = row_lse;
    }

    // Pass 2: the normalized probabilities times the values.
    let (mats, mut vals) = acc_new(d, mma);
    for kb in first_kb..qb + 1 {
        if blocks_meet(ranges, row, blocks, qb, kb) {
            let full = blocks_full(ranges, row, blocks, qb, kb, window);
            product_nt::<F>(q, q_at, q_row, k, k_base + kb * BLOCK * k_row, k_row, &mut scores, patch, d, mma);
            sync_cube();
            for c in 0..comptime!(BLOCK / 2) {
                let col = half * comptime!(BLOCK / 2) + c;
                let j = kb * BLOCK + col;
                let at = patch + r * BLOCK + col;
                let mut p = 0f32;
                if visible(full, keys, row, s, i, j, window) {
                    p = (scores[at] * scale - row_lse).exp();
                }
                probs[at] = F::cast_from(p);
            }
            sync_cube();
            acc_add::<F>(&mats, &mut vals, &probs, patch, v, v_base + kb * BLOCK * v_row, v_row, d, mma);
            sync_cube();
        }
    }
    let out_row = out.stride(2);
    let out_at = row * out.stride(0) + head * out.stride(1) + first_q * out_row;
    acc_store::<F>(&mats, &vals, &mut scores, patch, out, out_at, out_row, d, mma);
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

/// `dk`, `dv` `[b, kv, s, d]` (contiguous) for one key block of one key/value head: a sum over
/// its query heads and the query blocks that may see it. Workgroup `(key block, kv head, row)`.
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
    #[define(F)] _dtype: ElemType,
) {
    let unit = UNIT_POS as usize;
    let (group, lane) = (unit / LANES, unit % LANES);
    let (kb, kvh, row) = (CUBE_POS_X as usize, CUBE_POS_Y as usize, CUBE_POS_Z as usize);
    let (h, s, kv) = (q.shape(1), q.shape(2), k.shape(1));
    let rep = h / kv;
    let first_k = kb * BLOCK + group * ROWS; // the group's first key
    let k_at = row * k.stride(0) + kvh * k.stride(1) + first_k * k.stride(2);
    let v_at = row * v.stride(0) + kvh * v.stride(1) + first_k * v.stride(2);
    let (q_row, k_row, v_row, do_row) = (q.stride(2), k.stride(2), v.stride(2), dout.stride(2));
    // A group's f32 tile (scores, then the probabilities' gradient) and its tile in the
    // operands' dtype (the probabilities, then the scores' gradient): 32 KiB for f32, within
    // every Vulkan device's limit.
    let mut tile = Shared::<[f32]>::new_slice(comptime!(4 * PATCH));
    let mut operand = Shared::<[F]>::new_slice(comptime!(4 * PATCH));
    let patch = group * PATCH;
    let (r, half) = (lane / 2, lane % 2);
    let j = first_k + r; // this invocation's key
    let blocks = s / BLOCK;
    let mut last_qb = blocks - 1;
    if window > 0 {
        // The last query that may see the block's last key: (kb + 1)·64 − 1 + window − 1.
        last_qb = min(last_qb, ((kb + 1) * BLOCK + window - 2) / BLOCK);
    }
    let (dk_mats, mut dk_vals) = acc_new(d, mma);
    let (dv_mats, mut dv_vals) = acc_new(d, mma);
    for qh in 0..rep {
        let head = kvh * rep + qh;
        let q_base = row * q.stride(0) + head * q.stride(1);
        let do_base = row * dout.stride(0) + head * dout.stride(1);
        let stat = (row * h + head) * s;
        for qb in kb..last_qb + 1 {
            if blocks_meet(ranges, row, blocks, qb, kb) {
                let full = blocks_full(ranges, row, blocks, qb, kb, window);
                let q_at = q_base + qb * BLOCK * q_row;
                let do_at = do_base + qb * BLOCK * do_row;
                // Sᵀ = K·Qᵀ: the group's 16 keys against the block's 64 queries.
                product_nt::<F>(k, k_at, k_row, q, q_at, q_row, &mut tile, patch, d, mma);
                sync_cube();
                for c in 0..comptime!(BLOCK / 2) {
                    let col = half * comptime!(BLOCK / 2) + c;
                    let i = qb * BLOCK + col;
                    let at = patch + r * BLOCK + col;
                    let mut p = 0f32;
                    if visible(full, keys, row, s, i, j, window) {
                        p = (tile[at] * scale - lse[stat + i]).exp();
                    }
                    operand[at] = F::cast_from(p);
                }
                sync_cube();
                // dV += Pᵀ·dO; dPᵀ = V·dOᵀ.
                acc_add::<F>(&dv_mats, &mut dv_vals, &operand, patch, dout, do_at, do_row, d, mma);
                product_nt::<F>(v, v_at, v_row, dout, do_at, do_row, &mut tile, patch, d, mma);
                sync_cube();
                // dSᵀ = Pᵀ ∘ (dPᵀ − D)/√d, in place of Pᵀ (each invocation rewrites what it reads).
                for c in 0..comptime!(BLOCK / 2) {
                    let col = half * comptime!(BLOCK / 2) + c;
                    let i = qb * BLOCK + col;
                    let at = patch + r * BLOCK + col;
                    operand[at] = F::cast_from(f32::cast_from(operand[at]) * (tile[at] - delta[stat + i]) * scale);
                }
                sync_cube();
                // dK += dSᵀ·Q.
                acc_add::<F>(&dk_mats, &mut dk_vals, &operand, patch, q, q_at, q_row, d, mma);
                sync_cube();
            }
        }
    }
    let out_at = ((row * kv + kvh) * s + first_k) * d;
    acc_store::<F>(&dk_mats, &dk_vals, &mut tile, patch, dk, out_at, d, d, mma);
    acc_store::<F>(&dv_mats, &dv_vals, &mut tile, patch, dv, out_at, d, d, mma);
}

/// `dq` `[b, h, s, d]` (contiguous) for one query block of one head. Workgroup `(query block,
/// head, row)`.
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
    let mut tile = Shared::<[f32]>::new_slice(comptime!(4 * PATCH));
    let mut operand = Shared::<[F]>::new_slice(comptime!(4 * PATCH));
    let patch = group * PATCH;
    let (r, half) = (lane / 2, lane % 2);
    let i = first_q + r;
    let stat = (row * h + head) * s + i;
    let (row_lse, row_delta) = (lse[stat], delta[stat]);
    let first_kb = first_key_block(qb, window);
    let (mats, mut vals) = acc_new(d, mma);
    let blocks = s / BLOCK;
    for kb in first_kb..qb + 1 {
        if blocks_meet(ranges, row, blocks, qb, kb) {
            let full = blocks_full(ranges, row, blocks, qb, kb, window);
            product_nt::<F>(q, q_at, q_row, k, k_base + kb * BLOCK * k_row, k_row, &mut tile, patch, d, mma);
            sync_cube();
            for c in 0..comptime!(BLOCK / 2) {
                let col = half * comptime!(BLOCK / 2) + c;
                let j = kb * BLOCK + col;
                let at = patch + r * BLOCK + col;
                let mut p = 0f32;
                if visible(full, keys, row, s, i, j, window) {
                    p = (tile[at] * scale - row_lse).exp();
                }
                operand[at] = F::cast_from(p);
            }
            sync_cube();
            product_nt::<F>(dout, do_at, do_row, v, v_base + kb * BLOCK * v_row, v_row, &mut tile, patch, d, mma);
            sync_cube();
            // dS = P ∘ (dP − D)/√d, in place of P.
            for c in 0..comptime!(BLOCK / 2) {
                let at = patch + r * BLOCK + half * comptime!(BLOCK / 2) + c;
                operand[at] = F::cast_from(f32::cast_from(operand[at]) * (tile[at] - row_delta) * scale);
            }
            sync_cube();
            acc_add::<F>(&mats, &mut vals, &operand, patch, k, k_base + kb * BLOCK * k_row, k_row, d, mma);
            sync_cube();
        }
    }
    let out_at = ((row * h + head) * s + first_q) * d;
    acc_store::<F>(&mats, &vals, &mut tile, patch, dq, out_at, d, d, mma);
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
    let padded = s.next_multiple_of(BLOCK);
    let [q, k, v] = [q, k, v].map(|t| rows_contiguous(pad(t, 2, padded)));
    let keys = into_contiguous(pad(keys, 1, padded));
    let ranges = block_ranges(&keys);
    let out = empty_device_dtype(q.client.clone(), q.device.clone(), Shape::new([b, h, padded, d]), q.dtype);
    let lse = empty_device_dtype(q.client.clone(), q.device.clone(), Shape::new([b, kv, h / kv, padded, 1]), DType::F32);
    let (count, dim) = launch_dims(padded / BLOCK, h, b);
    let dtype = dtype_to_storage_type(q.dtype);
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
    let padded = s.next_multiple_of(BLOCK);
    let [q, k, v, out, dout] = [q, k, v, out, dout].map(|t| rows_contiguous(pad(t, 2, padded)));
    let keys = into_contiguous(pad(keys, 1, padded));
    let lse = into_contiguous(pad(lse, 3, padded));
    let ranges = block_ranges(&keys);
    let (client, device) = (q.client.clone(), q.device.clone());
    let delta = empty_device_dtype(client.clone(), device.clone(), Shape::new([b, h, padded]), DType::F32);
    let dq = empty_device_dtype(client.clone(), device.clone(), Shape::new([b, h, padded, d]), q.dtype);
    let dk = empty_device_dtype(client.clone(), device.clone(), Shape::new([b, kv, padded, d]), q.dtype);
    let dv = empty_device_dtype(client.clone(), device.clone(), Shape::new([b, kv, padded, d]), q.dtype);
    let dtype = dtype_to_storage_type(q.dtype);
    let scale = 1.0 / (d as f32).sqrt();
    let mma = path == Path::Mma;
    let rows = b * h * padded;
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
        let (count, dim) = launch_dims(padded / BLOCK, kv, b);
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
            dtype,
        );
        let (count, dim) = launch_dims(padded / BLOCK, h, b);
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
            dtype,
        );
    }
    (unpad(dq, 2, s), unpad(dk, 2, s), unpad(dv, 2, s))
}
