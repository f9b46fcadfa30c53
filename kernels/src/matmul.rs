//! Half-precision matrix products on workgroup-scope cooperative matrices
//! (`VK_NV_cooperative_matrix2`'s tensor-addressed loads and stores).
//!
//! One workgroup of [`UNITS`] invocations (or [`Cm2Config::units`]) computes one `BM × BN`
//! tile of the output in an f32 accumulator, stepping through K `BK` at a time; the driver
//! stages the operands and maps the product onto the tensor cores. In the general kernel,
//! tensor views clamp reads outside the operands to 0 and drop writes outside the output, so
//! no shape needs to be a multiple of the tile; where every size is one, the exact-shape
//! kernel compiles the sizes in and skips the clamping (about 1.6× faster on an H200).

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cmma;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;

static USED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process has launched the kernel (for reports: which path ran).
pub fn used() -> bool {
    USED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Invocations per workgroup by default.
pub const UNITS: u32 = 256;

static TILE: std::sync::Mutex<Option<Cm2Config>> = std::sync::Mutex::new(None);

/// How the tensor-core kernel runs: its output tile and K step, and whether products whose
/// sizes are all multiples of the tile take the exact-shape kernel (sizes compiled in, loads
/// unclamped, the K loop unrolled `unroll` steps at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cm2Config {
    /// `(BM, BN, BK)`.
    pub tile: (usize, usize, usize),
    /// Exact-shape kernel where the sizes allow it.
    pub exact: bool,
    /// K steps per unrolled loop body of the exact-shape kernel.
    pub unroll: usize,
    /// The exact-shape kernel loads the next K step's operands before it multiplies the
    /// current ones (two sets of operand matrices in registers).
    pub pipelined: bool,
    /// Invocations per workgroup.
    pub units: u32,
    /// The exact-shape kernel walks the output tiles in column strips `group` tiles tall, so
    /// that the workgroups running at once share their operand tiles in L2 (0: row by row).
    pub group: u32,
}

impl Cm2Config {
    /// `BMxBNxBK`, then optionally `+e` (exact-shape kernel), `+eU` (and unrolled `U` steps),
    /// either followed by `gG` (output tiles walked in strips `G` tiles tall), or `+p`
    /// (exact-shape and pipelined), then optionally `@W` (`W` invocations per workgroup, a
    /// multiple of 32 up to 1024).
    pub fn parse(spec: &str) -> Option<Self> {
        let (spec, units) = match spec.split_once('@') {
            Some((spec, w)) => (spec, w.parse::<u32>().ok().filter(|w| w % 32 == 0 && (32..=1024).contains(w))?),
            None => (spec, UNITS),
        };
        let (tile, variant) = match spec.split_once('+') {
            Some((tile, variant)) => (tile, Some(variant)),
            None => (spec, None),
        };
        let d: Vec<usize> = tile.split('x').map(|s| s.parse().ok()).collect::<Option<_>>()?;
        let [m, n, k] = d[..] else { return None };
        if m == 0 || n == 0 || k == 0 {
            return None;
        }
        let (exact, unroll, pipelined, group) = match variant {
            None => (false, 1, false, 0),
            Some("p") => (true, 2, true, 0),
            Some(v) => {
                let v = v.strip_prefix('e')?;
                let (u, g) = match v.split_once('g') {
                    Some((u, g)) => (u, g.parse::<u32>().ok().filter(|g| (1..=64).contains(g))?),
                    None => (v, 0),
                };
                let unroll = if u.is_empty() { 1 } else { u.parse::<usize>().ok().filter(|u| (1..=16).contains(u))? };
                (true, unroll, false, g)
            }
        };
        Some(Self { tile: (m, n, k), exact, unroll, units, pipelined, group })
    }
}

impl std::fmt::Display for Cm2Config {
    /// The [`Cm2Config::parse`] spelling.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (m, n, k) = self.tile;
        write!(f, "{m}x{n}x{k}")?;
        if self.pipelined {
            write!(f, "+p")?;
        } else if self.exact {
            write!(f, "+e")?;
            if self.unroll > 1 {
                write!(f, "{}", self.unroll)?;
            }
            if self.group > 0 {
                write!(f, "g{}", self.group)?;
            }
        }
        if self.units != UNITS {
            write!(f, "@{}", self.units)?;
        }
        Ok(())
    }
}

/// The configuration every product takes when it is not tuned: 128×256×32 with the
/// exact-shape kernel where the sizes allow it (on an H200 it ran the 8B geometry's 2048-row
/// products at 175–225 TFLOP/s against the clamped kernel's 113–126; BENCHMARKS.md).
pub const DEFAULT: Cm2Config = Cm2Config { tile: (128, 256, 32), exact: true, unroll: 1, units: UNITS, pipelined: false, group: 0 };

/// The configurations autotune measures against each other for every new product shape (the
/// fastest is kept in cubecl's persistent autotune cache). No one is best everywhere on an
/// H200: the large tiles win on the 8B geometry's wide products, the small ones on the narrow
/// products (a 512-wide output is 64 workgroups of 128×256 on 132 multiprocessors), and the
/// strip order on the products whose weight does not fit in L2.
pub const CANDIDATES: [Cm2Config; 6] = [
    DEFAULT,
    Cm2Config { group: 8, ..DEFAULT },
    Cm2Config { tile: (128, 256, 64), ..DEFAULT },
    Cm2Config { tile: (256, 128, 32), group: 8, ..DEFAULT },
    Cm2Config { tile: (128, 128, 32), units: 128, ..DEFAULT },
    Cm2Config { tile: (64, 128, 32), units: 128, ..DEFAULT },
];

/// The configuration every product is held to, if any: [`set_config`]'s, else
/// `LORA_CM2_TILE`'s (as [`Cm2Config::parse`] reads it). Without one, each product shape takes
/// the fastest of [`CANDIDATES`] on its device.
pub fn fixed_config() -> Option<Cm2Config> {
    if let Some(c) = *TILE.lock().unwrap_or_else(|e| e.into_inner()) {
        return Some(c);
    }
    // Read once: every product asks, several times.
    static FROM_ENV: std::sync::OnceLock<Option<Cm2Config>> = std::sync::OnceLock::new();
    *FROM_ENV.get_or_init(|| std::env::var("LORA_CM2_TILE").ok().and_then(|v| Cm2Config::parse(&v)))
}

/// [`fixed_config`], else [`DEFAULT`]: what decides whether a product is large enough for the
/// kernel and whether the device runs it.
pub fn config() -> Cm2Config {
    fixed_config().unwrap_or(DEFAULT)
}

/// The output tile and K step `(BM, BN, BK)` of [`config`].
pub fn tile() -> (usize, usize, usize) {
    config().tile
}

/// Holds every launch that follows to `config` (`None`: back to [`fixed_config`]'s
/// environment choice or to autotune); for benchmarks of the choices.
pub fn set_config(config: Option<Cm2Config>) {
    *TILE.lock().unwrap_or_else(|e| e.into_inner()) = config;
}

/// Whether `tensor`'s device runs workgroup-scope f16 products with f32 accumulation on
/// [`config`]'s invocations, with granularities that divide its tile, and `dtype` is f16.
pub fn supported(tensor: &CubeTensor, dtype: DType) -> bool {
    dtype == DType::F16 && std::env::var_os("LORA_NO_CM2").is_none() && runs(tensor, config())
}

/// Whether `tensor`'s device runs `config`'s f16 products with f32 accumulation.
fn runs(tensor: &CubeTensor, config: Cm2Config) -> bool {
    let Cm2Config { tile: (bm, bn, bk), units, .. } = config;
    let f16 = ElemType::Float(FloatKind::F16);
    tensor.client.properties().features.matmul.cube_mma.iter().any(|c| {
        c.a_type == f16
            && c.b_type == f16
            && c.cd_type == ElemType::Float(FloatKind::F32)
            && c.units_per_block.is_none_or(|u| u == units)
            && (bm as u32).is_multiple_of(c.m_granularity)
            && (bn as u32).is_multiple_of(c.n_granularity)
            && (bk as u32).is_multiple_of(c.k_granularity)
            && bm as u32 <= c.m_max
            && bn as u32 <= c.n_max
            && bk as u32 <= c.k_max
    })
}

/// `out = lhs · rhsᵀ` (`rhs_transposed`, rhs `[n, k]`) or `lhs · rhs` (rhs `[k, n]`); lhs
/// `[m, k]`, out `[m, n]`, all row-major.
#[cube(launch_unchecked)]
fn matmul_cm2_kernel<F: Float, O: Float>(
    lhs: &Tensor<F>,
    rhs: &Tensor<F>,
    out: &mut Tensor<O>,
    #[comptime] tile: (usize, usize, usize),
    #[comptime] rhs_transposed: bool,
    #[define(F)] _dtype: ElemType,
    #[define(O)] _out_dtype: ElemType,
) {
    let (bm, bn, bk) = tile;
    let m = out.shape(0) as u32;
    let n = out.shape(1) as u32;
    let k = lhs.shape(1) as u32;
    let row0 = CUBE_POS_Y * bm as u32;
    let col0 = CUBE_POS_X * bn as u32;

    let lhs_view = TensorView::new(lhs.as_slice(), seq![m, k]).finish();
    let out_view = TensorView::new(out.as_slice(), seq![m, n]).finish();

    let mut a = unsafe { cmma::Matrix::<F, cmma::Cube>::uninitialized(cmma::MatrixIdent::A, bm, bn, bk, cmma::MatrixLayout::Undefined) };
    let mut b = unsafe { cmma::Matrix::<F, cmma::Cube>::uninitialized(cmma::MatrixIdent::B, bm, bn, bk, cmma::MatrixLayout::Undefined) };
    let acc = cmma::Matrix::<f32, cmma::Cube>::from_value(cmma::MatrixIdent::Accumulator, bm, bn, bk, cmma::MatrixLayout::Undefined, 0.0);

    if comptime!(rhs_transposed) {
        let rhs_view = TensorView::new(rhs.as_slice(), seq![n, k]).finish();
        for k0 in range_stepped(0, k, bk as u32) {
            let av = lhs_view.slice(seq![row0, k0], seq![bm as u32, bk as u32]);
            let bv = rhs_view.slice(seq![col0, k0], seq![bn as u32, bk as u32]);
            let bv = bv.permuted(seq![1, 0]);
            cmma::load_tensor(&mut a, &av);
            cmma::load_tensor(&mut b, &bv);
            cmma::execute(&a, &b, &acc, &acc);
        }
    } else {
        let rhs_view = TensorView::new(rhs.as_slice(), seq![k, n]).finish();
        for k0 in range_stepped(0, k, bk as u32) {
            let av = lhs_view.slice(seq![row0, k0], seq![bm as u32, bk as u32]);
            let bv = rhs_view.slice(seq![k0, col0], seq![bk as u32, bn as u32]);
            cmma::load_tensor(&mut a, &av);
            cmma::load_tensor(&mut b, &bv);
            cmma::execute(&a, &b, &acc, &acc);
        }
    }
    let result: cmma::Matrix<O, cmma::Cube> = cmma::cast(&acc);
    let mut ov = out_view.slice(seq![row0, col0], seq![bm as u32, bn as u32]);
    cmma::store_tensor(&mut ov, &result);
}

/// [`matmul_cm2_kernel`] for sizes `(m, n, k)` known when it is compiled, each a multiple of
/// the tile: constant strides, loads and stores without clamping, the K loop unrolled
/// `unroll` steps at a time (`k / bk` a multiple of it), and the output tiles in strips
/// `group` tiles tall where `group` is not 0.
#[cube(launch_unchecked)]
fn matmul_cm2_exact_kernel<F: Float, O: Float>(
    lhs: &Tensor<F>,
    rhs: &Tensor<F>,
    out: &mut Tensor<O>,
    #[comptime] dims: (usize, usize, usize),
    #[comptime] tile: (usize, usize, usize),
    #[comptime] unroll: usize,
    #[comptime] group: u32,
    #[comptime] rhs_transposed: bool,
    #[define(F)] _dtype: ElemType,
    #[define(O)] _out_dtype: ElemType,
) {
    let (m, n, k) = dims;
    let (bm, bn, bk) = tile;
    let mut row_tile = CUBE_POS_Y;
    let mut col_tile = CUBE_POS_X;
    if comptime!(group > 0) {
        // Strips `group` tiles tall, walked column by column: the workgroups in flight at once
        // read a few row tiles of lhs and a few column tiles of rhs, not one row of tiles
        // against the whole of rhs.
        let tiles_m = comptime!((m / bm) as u32);
        let per_strip = comptime!(group * (n / bn) as u32);
        let linear = CUBE_POS_Y * comptime!((n / bn) as u32) + CUBE_POS_X;
        let first = (linear / per_strip) * group;
        let rows = min(tiles_m - first, group.runtime());
        let within = linear % per_strip;
        row_tile = first + within % rows;
        col_tile = within / rows;
    }
    let row0 = row_tile * bm as u32;
    let col0 = col_tile * bn as u32;
    let steps = comptime!((k / (bk * unroll)) as u32);

    let lhs_view = TensorView::new(lhs.as_slice(), seq![m as u32, k as u32]).with_clamp_mode(comptime![TensorClampMode::Undefined]).finish();
    let out_view = TensorView::new(out.as_slice(), seq![m as u32, n as u32]).with_clamp_mode(comptime![TensorClampMode::Undefined]).finish();

    let mut a = unsafe { cmma::Matrix::<F, cmma::Cube>::uninitialized(cmma::MatrixIdent::A, bm, bn, bk, cmma::MatrixLayout::Undefined) };
    let mut b = unsafe { cmma::Matrix::<F, cmma::Cube>::uninitialized(cmma::MatrixIdent::B, bm, bn, bk, cmma::MatrixLayout::Undefined) };
    let acc = cmma::Matrix::<f32, cmma::Cube>::from_value(cmma::MatrixIdent::Accumulator, bm, bn, bk, cmma::MatrixLayout::Undefined, 0.0);

    if comptime!(rhs_transposed) {
        let rhs_view = TensorView::new(rhs.as_slice(), seq![n as u32, k as u32]).with_clamp_mode(comptime![TensorClampMode::Undefined]).finish();
        for s in 0..steps {
            #[unroll]
            for j in 0..unroll {
                let k0 = (s * unroll as u32 + j as u32) * bk as u32;
                let av = lhs_view.slice(seq![row0, k0], seq![bm as u32, bk as u32]);
                let bv = rhs_view.slice(seq![col0, k0], seq![bn as u32, bk as u32]);
                let bv = bv.permuted(seq![1, 0]);
                cmma::load_tensor(&mut a, &av);
                cmma::load_tensor(&mut b, &bv);
                cmma::execute(&a, &b, &acc, &acc);
            }
        }
    } else {
        let rhs_view = TensorView::new(rhs.as_slice(), seq![k as u32, n as u32]).with_clamp_mode(comptime![TensorClampMode::Undefined]).finish();
        for s in 0..steps {
            #[unroll]
            for j in 0..unroll {
                let k0 = (s * unroll as u32 + j as u32) * bk as u32;
                let av = lhs_view.slice(seq![row0, k0], seq![bm as u32, bk as u32]);
                let bv = rhs_view.slice(seq![k0, col0], seq![bk as u32, bn as u32]);
                cmma::load_tensor(&mut a, &av);
                cmma::load_tensor(&mut b, &bv);
                cmma::execute(&a, &b, &acc, &acc);
            }
        }
    }
    let result: cmma::Matrix<O, cmma::Cube> = cmma::cast(&acc);
    let mut ov = out_view.slice(seq![row0, col0], seq![bm as u32, bn as u32]);
    cmma::store_tensor(&mut ov, &result);
}

/// Loads K step `k0`'s operand tiles: `lhs` rows from `row0`, `rhs` columns (of the output)
/// from `col0`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_step<F: Float>(
    a: &mut cmma::Matrix<F, cmma::Cube>,
    b: &mut cmma::Matrix<F, cmma::Cube>,
    lhs: &TensorView<F>,
    rhs: &TensorView<F>,
    row0: u32,
    col0: u32,
    k0: u32,
    #[comptime] tile: (usize, usize, usize),
    #[comptime] rhs_transposed: bool,
) {
    let (bm, bn, bk) = tile;
    let av = lhs.slice(seq![row0, k0], seq![bm as u32, bk as u32]);
    cmma::load_tensor(a, &av);
    if comptime!(rhs_transposed) {
        let bv = rhs.slice(seq![col0, k0], seq![bn as u32, bk as u32]);
        let bv = bv.permuted(seq![1, 0]);
        cmma::load_tensor(b, &bv);
    } else {
        let bv = rhs.slice(seq![k0, col0], seq![bk as u32, bn as u32]);
        cmma::load_tensor(b, &bv);
    }
}

/// [`matmul_cm2_exact_kernel`] with the loads of each K step issued before the product of the
/// step before it, from two sets of operand matrices (`k / bk` even and at least 2).
#[cube(launch_unchecked)]
fn matmul_cm2_pipelined_kernel<F: Float, O: Float>(
    lhs: &Tensor<F>,
    rhs: &Tensor<F>,
    out: &mut Tensor<O>,
    #[comptime] dims: (usize, usize, usize),
    #[comptime] tile: (usize, usize, usize),
    #[comptime] rhs_transposed: bool,
    #[define(F)] _dtype: ElemType,
    #[define(O)] _out_dtype: ElemType,
) {
    let (m, n, k) = dims;
    let (bm, bn, bk) = tile;
    let (r0, r1) = comptime!(if rhs_transposed { (n, k) } else { (k, n) });
    let row0 = CUBE_POS_Y * bm as u32;
    let col0 = CUBE_POS_X * bn as u32;
    let pairs = comptime!((k / (2 * bk)) as u32);
    let step = comptime!(bk as u32);

    let lhs_view = TensorView::new(lhs.as_slice(), seq![m as u32, k as u32]).with_clamp_mode(comptime![TensorClampMode::Undefined]).finish();
    let rhs_view = TensorView::new(rhs.as_slice(), seq![r0 as u32, r1 as u32]).with_clamp_mode(comptime![TensorClampMode::Undefined]).finish();
    let out_view = TensorView::new(out.as_slice(), seq![m as u32, n as u32]).with_clamp_mode(comptime![TensorClampMode::Undefined]).finish();

    let mut a0 = unsafe { cmma::Matrix::<F, cmma::Cube>::uninitialized(cmma::MatrixIdent::A, bm, bn, bk, cmma::MatrixLayout::Undefined) };
    let mut b0 = unsafe { cmma::Matrix::<F, cmma::Cube>::uninitialized(cmma::MatrixIdent::B, bm, bn, bk, cmma::MatrixLayout::Undefined) };
    let mut a1 = unsafe { cmma::Matrix::<F, cmma::Cube>::uninitialized(cmma::MatrixIdent::A, bm, bn, bk, cmma::MatrixLayout::Undefined) };
    let mut b1 = unsafe { cmma::Matrix::<F, cmma::Cube>::uninitialized(cmma::MatrixIdent::B, bm, bn, bk, cmma::MatrixLayout::Undefined) };
    let acc = cmma::Matrix::<f32, cmma::Cube>::from_value(cmma::MatrixIdent::Accumulator, bm, bn, bk, cmma::MatrixLayout::Undefined, 0.0);

    load_step::<F>(&mut a0, &mut b0, &lhs_view, &rhs_view, row0, col0, 0, tile, rhs_transposed);
    for s in 1..pairs {
        let k0 = s * 2 * step;
        load_step::<F>(&mut a1, &mut b1, &lhs_view, &rhs_view, row0, col0, k0 - step, tile, rhs_transposed);
        cmma::execute(&a0, &b0, &acc, &acc);
        load_step::<F>(&mut a0, &mut b0, &lhs_view, &rhs_view, row0, col0, k0, tile, rhs_transposed);
        cmma::execute(&a1, &b1, &acc, &acc);
    }
    load_step::<F>(&mut a1, &mut b1, &lhs_view, &rhs_view, row0, col0, comptime!((k - bk) as u32), tile, rhs_transposed);
    cmma::execute(&a0, &b0, &acc, &acc);
    cmma::execute(&a1, &b1, &acc, &acc);

    let result: cmma::Matrix<O, cmma::Cube> = cmma::cast(&acc);
    let mut ov = out_view.slice(seq![row0, col0], seq![bm as u32, bn as u32]);
    cmma::store_tensor(&mut ov, &result);
}

/// `lhs` `[m, k]` · `rhsᵀ` (`rhs` `[n, k]`) when `rhs_transposed`, else `lhs · rhs` (`rhs`
/// `[k, n]`): `[m, n]` in the operands' dtype, with [`fixed_config`]'s configuration or else
/// the one autotune found fastest for this shape. Call only where [`supported`] holds.
pub fn matmul_cm2(lhs: CubeTensor, rhs: CubeTensor, rhs_transposed: bool) -> CubeTensor {
    USED.store(true, std::sync::atomic::Ordering::Relaxed);
    match fixed_config() {
        Some(config) => launch(lhs, rhs, rhs_transposed, config),
        None => tune::matmul(lhs, rhs, rhs_transposed),
    }
}

/// The configurations autotune settled on in this process, by product (for reports), in the
/// order the products first ran.
pub fn tuned() -> Vec<(String, Cm2Config)> {
    tune::CHOICES.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(product, config)| (product.to_string(), *config)).collect()
}

/// Runs the product with `config`: the exact-shape kernel (pipelined where asked) where every
/// size is a multiple of its tile and `config` asks for it, the clamping kernel otherwise.
fn launch(lhs: CubeTensor, rhs: CubeTensor, rhs_transposed: bool, config: Cm2Config) -> CubeTensor {
    let [m, k] = lhs.shape().dims();
    let [r0, r1] = rhs.shape().dims();
    let n = if rhs_transposed { r0 } else { r1 };
    debug_assert_eq!(if rhs_transposed { r1 } else { r0 }, k, "matmul_cm2: inner sizes differ");
    let dtype = lhs.dtype;
    // `LORA_CM2_F32=1`: the accumulator is stored in f32 and cast after (a diagnostic).
    let f32_out = std::env::var_os("LORA_CM2_F32").is_some();
    let out_dtype = if f32_out { DType::F32 } else { dtype };
    let out = empty_device_dtype(lhs.client.clone(), lhs.device.clone(), Shape::new([m, n]), out_dtype);
    let (bm, bn, bk) = config.tile;
    let count = CubeCount::Static((n as u32).div_ceil(bn as u32), (m as u32).div_ceil(bm as u32), 1);
    let exact = config.exact && m % bm == 0 && n % bn == 0 && k % (bk * config.unroll) == 0;
    let (lhs, rhs) = (into_contiguous(lhs), into_contiguous(rhs));
    if exact && config.pipelined {
        // SAFETY: as the exact-shape kernel's; `k` is a multiple of two K steps (checked
        // above: `unroll` is 2), so every step loaded is inside the operands.
        unsafe {
            matmul_cm2_pipelined_kernel::launch_unchecked(
                &out.client,
                count,
                CubeDim::new_1d(config.units),
                lhs.into_tensor_arg(),
                rhs.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                (m, n, k),
                (bm, bn, bk),
                rhs_transposed,
                dtype_to_storage_type(dtype),
                dtype_to_storage_type(out_dtype),
            )
        }
    } else if exact {
        // SAFETY: the sizes compiled in are the operands' own, each a multiple of its tile
        // (checked above), so every unclamped load and store is inside its operand; the
        // operands are contiguous and row-major. The strip order maps the launch's workgroups
        // one to one onto the output tiles.
        unsafe {
            matmul_cm2_exact_kernel::launch_unchecked(
                &out.client,
                count,
                CubeDim::new_1d(config.units),
                lhs.into_tensor_arg(),
                rhs.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                (m, n, k),
                (bm, bn, bk),
                config.unroll,
                config.group,
                rhs_transposed,
                dtype_to_storage_type(dtype),
                dtype_to_storage_type(out_dtype),
            )
        }
    } else {
        // SAFETY: every access goes through a tensor view sized to its operand, which clamps
        // reads and drops writes outside it; the operands are contiguous and row-major.
        unsafe {
            matmul_cm2_kernel::launch_unchecked(
                &out.client,
                count,
                CubeDim::new_1d(config.units),
                lhs.into_tensor_arg(),
                rhs.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                (bm, bn, bk),
                rhs_transposed,
                dtype_to_storage_type(dtype),
                dtype_to_storage_type(out_dtype),
            )
        }
    }
    if f32_out {
        return burn_cubecl::kernel::cast(out, dtype);
    }
    out
}

/// The choice among [`CANDIDATES`], through cubecl's autotune: each new product shape runs
/// every candidate the device takes and keeps the fastest, in memory and in cubecl's
/// persistent cache (so a later run does not measure again).
mod tune {
    use burn_cubecl::CubeTuneId;
    use burn_cubecl::cubecl::tune::{AutotuneKey, LocalTuner, Tunable, TunableSet, local_tuner};
    use burn_cubecl::tensor::CubeTensor;

    use super::{CANDIDATES, Cm2Config, launch, runs};

    type Inputs = (CubeTensor, CubeTensor, bool);

    /// What a product's choice depends on. Rows are rounded up to a power of two, so that
    /// prompts of every length do not each tune anew, with whether they are a multiple of the
    /// largest tile side (the exact-shape kernel's condition) kept apart.
    #[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    pub struct Key {
        rows: usize,
        rows_aligned: bool,
        n: usize,
        k: usize,
        rhs_transposed: bool,
        dtype: String,
    }

    impl std::fmt::Display for Key {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let op = if self.rhs_transposed { "x·wT" } else { "x·w" };
            let aligned = if self.rows_aligned { "" } else { ", unaligned" };
            write!(f, "{op} {}: rows ≤ {}{aligned}, n {}, k {}", self.dtype, self.rows, self.n, self.k)
        }
    }

    fn key((lhs, rhs, rhs_transposed): &Inputs) -> Key {
        let (m, k) = (lhs.meta.shape()[0], lhs.meta.shape()[1]);
        let n = if *rhs_transposed { rhs.meta.shape()[0] } else { rhs.meta.shape()[1] };
        Key { rows: m.next_power_of_two(), rows_aligned: m % 256 == 0, n, k, rhs_transposed: *rhs_transposed, dtype: format!("{:?}", lhs.dtype) }
    }

    impl AutotuneKey for Key {}

    static TUNER: LocalTuner<Key, CubeTuneId> = local_tuner!();

    fn tunables() -> TunableSet<Key, Inputs, CubeTensor, Cm2Config> {
        let mut set = TunableSet::new_cloning_inputs(key);
        for config in CANDIDATES {
            set = set.with(Tunable::identified(config, move |(lhs, rhs, rhs_transposed): Inputs| {
                if !runs(&lhs, config) {
                    return Err(format!("the device has no workgroup-scope products for {config}"));
                }
                Ok(launch(lhs, rhs, rhs_transposed, config))
            }));
        }
        set
    }

    /// What [`super::tuned`] reports: each product's key once, with its choice.
    pub static CHOICES: std::sync::Mutex<Vec<(Key, Cm2Config)>> = std::sync::Mutex::new(Vec::new());

    pub fn matmul(lhs: CubeTensor, rhs: CubeTensor, rhs_transposed: bool) -> CubeTensor {
        let client = lhs.client.clone();
        let id = CubeTuneId::new(&client, &lhs.device);
        let set = TUNER.init(&id, tunables);
        let inputs = (lhs, rhs, rhs_transposed);
        let product = key(&inputs);
        let out = TUNER.execute(&id, &client, set.clone(), inputs);
        let mut choices = CHOICES.lock().unwrap_or_else(|e| e.into_inner());
        if !choices.iter().any(|(k, _)| *k == product)
            && let Some(config) = TUNER.fastest_identity(&id, &set, &product)
        {
            choices.push((product, config));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Cm2Config;

    #[test]
    fn configurations_parse_and_nonsense_does_not() {
        let c = |tile, exact, unroll| Some(Cm2Config { tile, exact, unroll, units: super::UNITS, pipelined: false, group: 0 });
        assert_eq!(Cm2Config::parse("128x256x32"), c((128, 256, 32), false, 1));
        assert_eq!(Cm2Config::parse("128x256x32+e"), c((128, 256, 32), true, 1));
        assert_eq!(Cm2Config::parse("256x128x64+e4"), c((256, 128, 64), true, 4));
        assert_eq!(
            Cm2Config::parse("128x128x32+e2@128"),
            Some(Cm2Config { tile: (128, 128, 32), exact: true, unroll: 2, units: 128, pipelined: false, group: 0 })
        );
        assert_eq!(Cm2Config::parse("128x256x32+p"), Some(Cm2Config { tile: (128, 256, 32), exact: true, unroll: 2, units: 256, pipelined: true, group: 0 }));
        assert_eq!(
            Cm2Config::parse("256x128x32+eg8"),
            Some(Cm2Config { tile: (256, 128, 32), exact: true, unroll: 1, units: 256, pipelined: false, group: 8 })
        );
        assert_eq!(
            Cm2Config::parse("64x128x32+e2g4@128"),
            Some(Cm2Config { tile: (64, 128, 32), exact: true, unroll: 2, units: 128, pipelined: false, group: 4 })
        );
        for bad in [
            "",
            "128x256",
            "128x256x32x1",
            "0x256x32",
            "128x256x32+",
            "128x256x32+x",
            "128x256x32+e0",
            "128x256x32+e17",
            "axbxc",
            "128x256x32+e-1",
            "128x256x32@",
            "128x256x32@100",
            "128x256x32+e@2048",
            "128x256x32+eg",
            "128x256x32+eg0",
            "128x256x32+eg65",
            "128x256x32+g8",
            "128x256x32+pg8",
        ] {
            assert_eq!(Cm2Config::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn configurations_print_as_they_parse() {
        for spec in ["128x256x32", "128x256x32+e", "128x256x64+e4", "256x128x32+eg8", "64x128x32+e2g4@128", "128x256x32+p@512"] {
            assert_eq!(Cm2Config::parse(spec).unwrap().to_string(), spec);
        }
        for config in super::CANDIDATES {
            assert_eq!(Cm2Config::parse(&config.to_string()), Some(config), "{config}");
        }
    }
}
