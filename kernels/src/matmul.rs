//! Half-precision matrix products on workgroup-scope cooperative matrices
//! (`VK_NV_cooperative_matrix2`'s tensor-addressed loads and stores).
//!
//! One workgroup of [`UNITS`] invocations computes one `BM × BN` tile of the output in an f32
//! accumulator, stepping through K `BK` at a time; the driver stages the operands and maps the
//! product onto the tensor cores. Tensor views clamp reads outside the operands to 0 and drop
//! writes outside the output, so no shape needs to be a multiple of the tile.

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

/// Invocations per workgroup.
pub const UNITS: u32 = 256;

static TILE: std::sync::Mutex<Option<(usize, usize, usize)>> = std::sync::Mutex::new(None);

/// The output tile and K step `(BM, BN, BK)`: [`set_tile`]'s, else `LORA_CM2_TILE=BMxBNxBK`,
/// else 128×256×32.
pub fn tile() -> (usize, usize, usize) {
    if let Some(t) = *TILE.lock().unwrap_or_else(|e| e.into_inner()) {
        return t;
    }
    if let Ok(v) = std::env::var("LORA_CM2_TILE") {
        let d: Vec<usize> = v.split('x').filter_map(|s| s.parse().ok()).collect();
        if let [m, n, k] = d[..] {
            return (m, n, k);
        }
    }
    (128, 256, 32)
}

/// Sets the tile of the launches that follow (`None`: back to [`tile`]'s default); for
/// benchmarks of the choices.
pub fn set_tile(tile: Option<(usize, usize, usize)>) {
    *TILE.lock().unwrap_or_else(|e| e.into_inner()) = tile;
}

/// Whether `tensor`'s device runs workgroup-scope f16 products with f32 accumulation on
/// [`UNITS`] invocations, with granularities that divide `tile`, and `dtype` is f16.
pub fn supported(tensor: &CubeTensor, dtype: DType) -> bool {
    if dtype != DType::F16 || std::env::var_os("LORA_NO_CM2").is_some() {
        return false;
    }
    let (bm, bn, bk) = tile();
    let f16 = ElemType::Float(FloatKind::F16);
    tensor.client.properties().features.matmul.cube_mma.iter().any(|c| {
        c.a_type == f16
            && c.b_type == f16
            && c.cd_type == ElemType::Float(FloatKind::F32)
            && c.units_per_block.is_none_or(|u| u == UNITS)
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

/// `lhs` `[m, k]` · `rhsᵀ` (`rhs` `[n, k]`) when `rhs_transposed`, else `lhs · rhs` (`rhs`
/// `[k, n]`): `[m, n]` in the operands' dtype. Call only where [`supported`] holds.
pub fn matmul_cm2(lhs: CubeTensor, rhs: CubeTensor, rhs_transposed: bool) -> CubeTensor {
    let [m, k] = lhs.shape().dims();
    let [r0, r1] = rhs.shape().dims();
    let n = if rhs_transposed { r0 } else { r1 };
    debug_assert_eq!(if rhs_transposed { r1 } else { r0 }, k, "matmul_cm2: inner sizes differ");
    USED.store(true, std::sync::atomic::Ordering::Relaxed);
    let dtype = lhs.dtype;
    // `LORA_CM2_F32=1`: the accumulator is stored in f32 and cast after (a diagnostic).
    let f32_out = std::env::var_os("LORA_CM2_F32").is_some();
    let out_dtype = if f32_out { DType::F32 } else { dtype };
    let out = empty_device_dtype(lhs.client.clone(), lhs.device.clone(), Shape::new([m, n]), out_dtype);
    let (bm, bn, bk) = tile();
    let count = CubeCount::Static((n as u32).div_ceil(bn as u32), (m as u32).div_ceil(bm as u32), 1);
    // SAFETY: every access goes through a tensor view sized to its operand, which clamps reads
    // and drops writes outside it; the operands are contiguous and row-major.
    unsafe {
        matmul_cm2_kernel::launch_unchecked(
            &out.client,
            count,
            CubeDim::new_1d(UNITS),
            into_contiguous(lhs).into_tensor_arg(),
            into_contiguous(rhs).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            (bm, bn, bk),
            rhs_transposed,
            dtype_to_storage_type(dtype),
            dtype_to_storage_type(out_dtype),
        )
    }
    if f32_out {
        return burn_cubecl::kernel::cast(out, dtype);
    }
    out
}
