//! The packed kernels (CubeCL on wgpu, the default bodies on flex) against plain
//! dequantize-then-matmul on the host, on random inputs: every width, every group size,
//! f32 and f16, a row count that is not a multiple of a cube's outputs, and row counts of
//! `x` on both sides of the matrix-vector threshold, with and without a residual added.

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use lora_quant::affine::{self, AffineSpec};
use lora_quant::ops::MATVEC_ROWS;
use lora_quant::{QuantWeight, nf4};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

mod common;
use common::devices;

const ROWS: usize = 13;
const COLS: usize = 384;

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale + 0.003).collect()
}

fn to_vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

/// `x·Wᵀ` in f64 from the host's dense weight.
fn reference(x: &[f32], w: &[f32], m: usize) -> Vec<f32> {
    reference_rows(x, w, m, ROWS)
}

/// Relative to the largest output, so f16 and f32 read on one scale.
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    let top = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / top
}

fn round_to(v: &[f32], dtype: DType) -> Vec<f32> {
    Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), (&Device::flex(), DType::F32))
        .cast(if dtype == DType::F16 { FloatDType::F16 } else { FloatDType::F32 })
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap()
}

#[test]
fn affine_kernels_match_dequantize_then_matmul() {
    let mut rng = StdRng::seed_from_u64(7);
    let w = random(&mut rng, ROWS * COLS, 0.2);
    for device in devices() {
        for dtype in [DType::F32, DType::F16] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 4e-3 };
            for bits in affine::BITS {
                for group_size in affine::GROUP_SIZES {
                    let spec = AffineSpec::new(bits, group_size).unwrap();
                    let q = affine::quantize(&w, COLS, spec).unwrap();
                    let weight = QuantWeight::from_affine(&q, ROWS, COLS, spec, &device, dtype);
                    // The host dequantization with the scales as the device holds them.
                    let host = affine::dequantize(&q.packed, &round_to(&q.scales, dtype), &round_to(&q.biases, dtype), COLS, spec);
                    let dense = to_vec(weight.dequantize());
                    let d = rel_diff(&dense, &host);
                    assert!(d < tol, "{device:?} {dtype:?} bits {bits} group {group_size}: dequantize differs by {d}");
                    for m in [1, 3, MATVEC_ROWS, MATVEC_ROWS + 1, 40] {
                        let x = round_to(&random(&mut rng, m * COLS, 1.0), dtype);
                        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, COLS]), (&device, DType::F32)).cast(dtype_of(dtype));
                        let want = reference(&x, &host, m);
                        let d = rel_diff(&to_vec(weight.matmul_t(xt.clone())), &want);
                        assert!(d < tol, "{device:?} {dtype:?} bits {bits} group {group_size} m {m}: matmul differs by {d}");
                        let d = residual_diff(&mut rng, &device, dtype, m, &want, |r| weight.matmul_t_add(xt, r));
                        assert!(d < tol, "{device:?} {dtype:?} bits {bits} group {group_size} m {m}: matmul with residual differs by {d}");
                    }
                }
            }
        }
    }
}

#[test]
fn nf4_kernels_match_dequantize_then_matmul() {
    let mut rng = StdRng::seed_from_u64(11);
    let w = random(&mut rng, ROWS * COLS, 0.2);
    for device in devices() {
        for dtype in [DType::F32, DType::F16] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 4e-3 };
            for double_quant in [false, true] {
                let q = nf4::quantize(&w, COLS, double_quant).unwrap();
                let host = nf4::dequantize(&q, COLS);
                let weight = QuantWeight::from_nf4(&q, ROWS, COLS, &device, dtype);
                let d = rel_diff(&to_vec(weight.dequantize()), &host);
                assert!(d < tol, "{device:?} {dtype:?} double quant {double_quant}: dequantize differs by {d}");
                for m in [1, 2, MATVEC_ROWS, MATVEC_ROWS + 1, 33] {
                    let x = round_to(&random(&mut rng, m * COLS, 1.0), dtype);
                    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, COLS]), (&device, DType::F32)).cast(dtype_of(dtype));
                    let want = reference(&x, &host, m);
                    let d = rel_diff(&to_vec(weight.matmul_t(xt.clone())), &want);
                    assert!(d < tol, "{device:?} {dtype:?} double quant {double_quant} m {m}: matmul differs by {d}");
                    let d = residual_diff(&mut rng, &device, dtype, m, &want, |r| weight.matmul_t_add(xt, r));
                    assert!(d < tol, "{device:?} {dtype:?} double quant {double_quant} m {m}: matmul with residual differs by {d}");
                }
            }
        }
    }
}

/// SwiGLU's two products and activation from two packed weights of one format (one kernel
/// for a few rows on wgpu, the composition otherwise) against `silu(x·Gᵀ)·(x·Uᵀ)` on the
/// host's dequantized weights; weights of two formats are not fused.
#[test]
fn swiglu_from_two_packed_weights_matches_the_host() {
    let mut rng = StdRng::seed_from_u64(13);
    let (wg, wu) = (random(&mut rng, ROWS * COLS, 0.2), random(&mut rng, ROWS * COLS, 0.2));
    let spec = AffineSpec::new(4, 64).unwrap();
    for device in devices() {
        for dtype in [DType::F32, DType::F16] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 4e-3 };
            let affine = |w: &[f32]| {
                let q = affine::quantize(w, COLS, spec).unwrap();
                let host = affine::dequantize(&q.packed, &round_to(&q.scales, dtype), &round_to(&q.biases, dtype), COLS, spec);
                (QuantWeight::from_affine(&q, ROWS, COLS, spec, &device, dtype), host)
            };
            let nf4 = |w: &[f32]| {
                let q = nf4::quantize(w, COLS, true).unwrap();
                let host = nf4::dequantize(&q, COLS);
                (QuantWeight::from_nf4(&q, ROWS, COLS, &device, dtype), host)
            };
            for (name, (gate, host_g), (up, host_u)) in [("affine", affine(&wg), affine(&wu)), ("nf4", nf4(&wg), nf4(&wu))] {
                for (m, normed) in [1, 3, MATVEC_ROWS, MATVEC_ROWS + 1, 21].into_iter().flat_map(|m| [(m, false), (m, true)]) {
                    let x = round_to(&random(&mut rng, m * COLS, 1.0), dtype);
                    let (xin, x, norm) = with_norm(x, m, normed, dtype, &device, &mut rng);
                    let xt = Tensor::<2>::from_data(TensorData::new(xin, [m, COLS]), (&device, DType::F32)).cast(dtype_of(dtype));
                    let (g, u) = (reference(&x, &host_g, m), reference(&x, &host_u, m));
                    let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                    let got = QuantWeight::swiglu_t(xt, norm, &gate, &up).expect("one format");
                    let d = rel_diff(&to_vec(got), &want);
                    assert!(d < tol, "{device:?} {dtype:?} {name} m {m} normed {normed}: swiglu differs by {d}");
                }
            }
            let (a, _) = affine(&wg);
            let (n, _) = nf4(&wu);
            let x = Tensor::<2>::zeros([1, COLS], (&device, DType::F32)).cast(dtype_of(dtype));
            assert!(QuantWeight::swiglu_t(x, None, &a, &n).is_none(), "two formats are not fused");
        }
    }
}

/// Attention's three projections from packed weights of one format (one kernel for a few rows
/// on wgpu) against the three host products side by side; k and v narrower than q, as with
/// grouped-query attention. Mixed formats or widths are not fused.
#[test]
fn three_packed_projections_match_the_host() {
    let mut rng = StdRng::seed_from_u64(17);
    let widths = [ROWS, 5, 5];
    let ws: Vec<Vec<f32>> = widths.iter().map(|&r| random(&mut rng, r * COLS, 0.2)).collect();
    let spec = AffineSpec::new(4, 32).unwrap();
    for device in devices() {
        for dtype in [DType::F32, DType::F16] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 4e-3 };
            let affine = |w: &[f32], rows: usize| {
                let q = affine::quantize(w, COLS, spec).unwrap();
                let host = affine::dequantize(&q.packed, &round_to(&q.scales, dtype), &round_to(&q.biases, dtype), COLS, spec);
                (QuantWeight::from_affine(&q, rows, COLS, spec, &device, dtype), host)
            };
            let nf4 = |w: &[f32], rows: usize| {
                let q = nf4::quantize(w, COLS, false).unwrap();
                let host = nf4::dequantize(&q, COLS);
                (QuantWeight::from_nf4(&q, rows, COLS, &device, dtype), host)
            };
            let sets = [
                ("affine", ws.iter().zip(widths).map(|(w, r)| affine(w, r)).collect::<Vec<_>>()),
                ("nf4", ws.iter().zip(widths).map(|(w, r)| nf4(w, r)).collect()),
            ];
            for (name, set) in &sets {
                for (m, normed) in [1, 2, MATVEC_ROWS, MATVEC_ROWS + 1, 19].into_iter().flat_map(|m| [(m, false), (m, true)]) {
                    let x = round_to(&random(&mut rng, m * COLS, 1.0), dtype);
                    let (xin, x, norm) = with_norm(x, m, normed, dtype, &device, &mut rng);
                    let xt = Tensor::<2>::from_data(TensorData::new(xin, [m, COLS]), (&device, DType::F32)).cast(dtype_of(dtype));
                    let parts: Vec<Vec<f32>> = set.iter().zip(widths).map(|((_, host), rows)| reference_rows(&x, host, m, rows)).collect();
                    let want: Vec<f32> = (0..m).flat_map(|i| parts.iter().zip(widths).flat_map(move |(p, r)| p[i * r..(i + 1) * r].to_vec())).collect();
                    let got = QuantWeight::linear3_t(xt, norm, &set[0].0, &set[1].0, &set[2].0).expect("one format");
                    let d = rel_diff(&to_vec(got), &want);
                    assert!(d < tol, "{device:?} {dtype:?} {name} m {m} normed {normed}: q/k/v differ by {d}");
                }
            }
            let x = Tensor::<2>::zeros([1, COLS], (&device, DType::F32)).cast(dtype_of(dtype));
            assert!(QuantWeight::linear3_t(x, None, &sets[0].1[0].0, &sets[1].1[1].0, &sets[0].1[2].0).is_none(), "two formats are not fused");
        }
    }
}

/// The input of a product from `x` `[m, COLS]`: what the device gets, what the products see,
/// and the norm. Without `normed` both are `x`; with it the device gets `x` with row `i`
/// scaled by `1 + i` (so that every row has its own factor) and the products see that input's
/// RMSNorm by a random weight, computed on the host and rounded to `dtype` as the norm's kernel
/// rounds it; the norm is its weight on `device` and its epsilon.
#[allow(clippy::type_complexity)]
fn with_norm(x: Vec<f32>, m: usize, normed: bool, dtype: DType, device: &Device, rng: &mut StdRng) -> (Vec<f32>, Vec<f32>, Option<(Tensor<1>, f32)>) {
    if !normed {
        return (x.clone(), x, None);
    }
    let eps = 1e-5f32;
    let weight = round_to(&random(rng, COLS, 1.0).iter().map(|w| 1.0 + w).collect::<Vec<_>>(), dtype);
    let x: Vec<f32> = round_to(&x.iter().enumerate().map(|(at, v)| v * (1 + at / COLS) as f32).collect::<Vec<_>>(), dtype);
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(COLS) {
        let r = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / COLS as f32 + eps).sqrt();
        let scaled = round_to(&row.iter().map(|v| v * r).collect::<Vec<_>>(), dtype);
        out.extend(round_to(&scaled.iter().zip(&weight).map(|(v, w)| v * w).collect::<Vec<_>>(), dtype));
    }
    assert_eq!(out.len(), m * COLS);
    let weight = Tensor::<1>::from_data(TensorData::new(weight, [COLS]), (device, DType::F32)).cast(dtype_of(dtype));
    (x, out, Some((weight, eps)))
}

/// `x·Wᵀ` in f64 for a weight of `rows` rows.
fn reference_rows(x: &[f32], w: &[f32], m: usize, rows: usize) -> Vec<f32> {
    (0..m)
        .flat_map(|i| (0..rows).map(move |j| (i, j)))
        .map(|(i, j)| (0..COLS).map(|k| f64::from(x[i * COLS + k]) * f64::from(w[j * COLS + k])).sum::<f64>() as f32)
        .collect()
}

/// `product(residual)` (`residual + x·Wᵀ`) against `want` (`x·Wᵀ`) plus a random residual
/// `[m, ROWS]` in `dtype`: the largest difference relative to the largest output.
fn residual_diff(rng: &mut StdRng, device: &Device, dtype: DType, m: usize, want: &[f32], product: impl FnOnce(Tensor<2>) -> Tensor<2>) -> f32 {
    let r = round_to(&random(rng, m * ROWS, 2.0), dtype);
    let rt = Tensor::<2>::from_data(TensorData::new(r.clone(), [m, ROWS]), (device, DType::F32)).cast(dtype_of(dtype));
    let want: Vec<f32> = want.iter().zip(&r).map(|(w, r)| w + r).collect();
    rel_diff(&to_vec(product(rt)), &want)
}

fn dtype_of(dtype: DType) -> FloatDType {
    if dtype == DType::F16 { FloatDType::F16 } else { FloatDType::F32 }
}
