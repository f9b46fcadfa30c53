//! CPU (flex) kernels for what burn's element-wise operations do one element and one thread at
//! a time there: causal attention forward and backward as one pass per (batch row, key/value
//! head), on every core, with its products on the `gemm` crate (which flex's matmul uses too),
//! SwiGLU's activation and its gradient, and the head's cross-entropy with its gradient; all
//! through an exponential that vectorizes.

use rayon::prelude::*;

/// Query rows per block: the scores of one block against every key before it are held at once.
const QUERY_BLOCK: usize = 128;

/// `exp(x)` for each element, in place: Cephes' single-precision range reduction and
/// polynomial (about 2 ulp), written without branches so that the loop vectorizes. Inputs below
/// -87.3 give about 1e-38, not 0.
pub fn exp_in_place(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp(*x);
    }
}

/// One element of [`exp_in_place`].
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The largest element.
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.max(*v);
        }
    }
    rest.iter().fold(acc.iter().copied().fold(f32::NEG_INFINITY, f32::max), |m, v| m.max(*v))
}

/// The sum, in eight interleaved partial sums.
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `Σ a·b`, in eight interleaved partial sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// A row-major view of an `[rows, cols]` matrix inside a slice, or its transpose.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    /// Elements between rows (of the stored matrix).
    stride: usize,
    transposed: bool,
}

impl<'a> Mat<'a> {
    fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(rows == 0 || cols == 0 || (rows - 1) * stride + cols <= data.len(), "matrix outside its slice");
        Self { data, rows, cols, stride, transposed: false }
    }

    fn t(self) -> Self {
        Self { transposed: !self.transposed, ..self }
    }

    /// `(rows, cols)` as seen.
    fn dims(&self) -> (usize, usize) {
        if self.transposed { (self.cols, self.rows) } else { (self.rows, self.cols) }
    }

    /// `(row stride, column stride)` as seen.
    fn strides(&self) -> (isize, isize) {
        if self.transposed { (1, self.stride as isize) } else { (self.stride as isize, 1) }
    }
}

/// `c = a·b` (or `c += a·b` with `accumulate`) for `c` `[m, n]` row-major with row stride
/// `ldc`, on the calling thread.
fn matmul(c: &mut [f32], ldc: usize, a: Mat, b: Mat, accumulate: bool) {
    let ((m, k), (kb, n)) = (a.dims(), b.dims());
    assert_eq!(k, kb, "inner sizes");
    assert!(m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(), "output outside its slice");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    let ((a_rs, a_cs), (b_rs, b_cs)) = (a.strides(), b.strides());
    // SAFETY: every element read or written lies inside its slice: the views were checked
    // against their slices when made (`Mat::new`), the output above, and the strides are those
    // of the checked layouts.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The keys query `i` may see: `lo..=i`, with the window's lower bound.
fn visible(i: usize, window: usize) -> usize {
    if window > 0 { (i + 1).saturating_sub(window) } else { 0 }
}

/// Shapes of one attention call: `q` `[b, h, s, d]`, `k` and `v` `[b, kv, s, d]`.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Batch rows.
    pub b: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads.
    pub kv: usize,
    /// Positions.
    pub s: usize,
    /// Head width.
    pub d: usize,
}

/// For block `rows` of queries `i0..` of one head: `p` `[rows, end]` (row stride `end`) holds the
/// scaled scores on entry and the probabilities on return, 0 where masked (later keys, keys
/// outside the window, padding). Without `given`, `lse` receives each row's log-sum-exp (0 for
/// a row that sees no key, whose probabilities are all 0); with it, `lse` holds them already and
/// the probabilities are `exp(score − lse)`.
fn softmax_rows(p: &mut [f32], end: usize, i0: usize, window: usize, keys: &[f32], lse: &mut [f32], given: bool) {
    for (r, row) in p.chunks_mut(end).enumerate() {
        let i = i0 + r;
        let lo = visible(i, window);
        let own = keys[i];
        let seen_keys = &keys[lo..=i];
        let seen = &mut row[lo..=i];
        for (x, &k) in seen.iter_mut().zip(seen_keys) {
            if !crate::mask::key_visible(k, own) {
                *x = f32::NEG_INFINITY;
            }
        }
        let m = max(seen);
        if m == f32::NEG_INFINITY {
            seen.fill(0.0);
            lse[r] = 0.0;
        } else {
            let shift = if given { lse[r] } else { m };
            for x in seen.iter_mut() {
                *x -= shift;
            }
            exp_in_place(seen);
            // Hidden keys were -inf, which the exponential clamps to about 1e-38: exactly 0.
            for (x, &k) in seen.iter_mut().zip(seen_keys) {
                if !crate::mask::key_visible(k, own) {
                    *x = 0.0;
                }
            }
            if !given {
                let total = sum(seen);
                let inv = 1.0 / total;
                for x in seen.iter_mut() {
                    *x *= inv;
                }
                lse[r] = m + total.ln();
            }
        }
        row[..lo].fill(0.0);
        row[i + 1..].fill(0.0);
    }
}

/// Causal attention: `out` `[b, h, s, d]` and the log-sum-exp `[b, h, s]` for `q`, `k`, `v`
/// (contiguous f32, shapes of `dims`), key flags `keys` `[b, s]` (see
/// [`crate::mask::key_visible`]) and a sliding `window` (0 for none). A query that sees no
/// key gets 0.
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], keys: &[f32], dims: Dims, window: usize) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, h, kv, s, d } = dims;
    let rep = h / kv;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; b * h * s * d];
    let mut lse = vec![0f32; b * h * s];
    // One task per (batch row, key/value head): its query heads' outputs are contiguous.
    out.par_chunks_mut(rep * s * d).zip(lse.par_chunks_mut(rep * s)).enumerate().for_each(|(task, (out, lse))| {
        let (bi, g) = (task / kv, task % kv);
        let kg = &k[(bi * kv + g) * s * d..][..s * d];
        let vg = &v[(bi * kv + g) * s * d..][..s * d];
        let keys = &keys[bi * s..][..s];
        let mut p = vec![0f32; QUERY_BLOCK.min(s) * s];
        for r in 0..rep {
            let head = g * rep + r;
            let qh = &q[(bi * h + head) * s * d..][..s * d];
            for i0 in (0..s).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(s - i0);
                let end = i0 + rows;
                let p = &mut p[..rows * end];
                // p = q_block·k[..end]ᵀ·scale
                matmul(p, end, Mat::new(&qh[i0 * d..], rows, d, d), Mat::new(kg, end, d, d).t(), false);
                for x in p.iter_mut() {
                    *x *= scale;
                }
                softmax_rows(p, end, i0, window, keys, &mut lse[r * s + i0..][..rows], false);
                matmul(&mut out[(r * s + i0) * d..], d, Mat::new(p, rows, end, end), Mat::new(vg, end, d, d), false);
            }
        }
    });
    (out, lse)
}

/// The gradients `(dq, dk, dv)` of [`attention_forward`] for the output's gradient `dout`,
/// recomputing the probabilities from the saved `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dims: Dims,
    window: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, h, kv, s, d } = dims;
    let rep = h / kv;
    let scale = 1.0 / (d as f32).sqrt();
    let mut dq = vec![0f32; b * h * s * d];
    let mut dk = vec![0f32; b * kv * s * d];
    let mut dv = vec![0f32; b * kv * s * d];
    dq.par_chunks_mut(rep * s * d).zip(dk.par_chunks_mut(s * d).zip(dv.par_chunks_mut(s * d))).enumerate().for_each(|(task, (dq, (dk, dv)))| {
        let (bi, g) = (task / kv, task % kv);
        let kg = &k[(bi * kv + g) * s * d..][..s * d];
        let vg = &v[(bi * kv + g) * s * d..][..s * d];
        let keys = &keys[bi * s..][..s];
        let block = QUERY_BLOCK.min(s);
        let (mut p, mut dp) = (vec![0f32; block * s], vec![0f32; block * s]);
        let (mut delta, mut row_lse) = (vec![0f32; block], vec![0f32; block]);
        for r in 0..rep {
            let head = (bi * h + g * rep + r) * s;
            let (qh, oh, doh) = (&q[head * d..][..s * d], &out[head * d..][..s * d], &dout[head * d..][..s * d]);
            for i0 in (0..s).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(s - i0);
                let end = i0 + rows;
                let (p, dp) = (&mut p[..rows * end], &mut dp[..rows * end]);
                let q_blk = Mat::new(&qh[i0 * d..], rows, d, d);
                let do_blk = Mat::new(&doh[i0 * d..], rows, d, d);
                matmul(p, end, q_blk, Mat::new(kg, end, d, d).t(), false);
                for x in p.iter_mut() {
                    *x *= scale;
                }
                row_lse[..rows].copy_from_slice(&lse[head + i0..][..rows]);
                softmax_rows(p, end, i0, window, keys, &mut row_lse[..rows], true);
                // dv[..end] += pᵀ·do
                matmul(dv, d, Mat::new(p, rows, end, end).t(), do_blk, true);
                // dp = do·v[..end]ᵀ; ds = p ∘ (dp − rowsum(do ∘ o))·scale, in dp
                matmul(dp, end, do_blk, Mat::new(vg, end, d, d).t(), false);
                for (r, dl) in delta[..rows].iter_mut().enumerate() {
                    let at = (i0 + r) * d;
                    *dl = dot(&doh[at..at + d], &oh[at..at + d]);
                }
                for ((dp_row, p_row), dl) in dp.chunks_mut(end).zip(p.chunks(end)).zip(&delta) {
                    for (x, pv) in dp_row.iter_mut().zip(p_row) {
                        *x = pv * (*x - dl) * scale;
                    }
                }
                let ds = Mat::new(dp, rows, end, end);
                // dq = ds·k[..end]; dk[..end] += dsᵀ·q
                matmul(&mut dq[(r * s + i0) * d..], d, ds, Mat::new(kg, end, d, d), false);
                matmul(dk, d, ds.t(), q_blk, true);
            }
        }
    });
    (dq, dk, dv)
}

/// Elements per task of the element-wise kernels.
const ELEMENTWISE_TASK: usize = 1 << 14;
/// Elements per vectorized step inside a task (a stack buffer of exponentials).
const ELEMENTWISE_STEP: usize = 512;

/// `sigmoid(g)` for each element of `g`, into `s` (same length), through [`exp_in_place`].
fn sigmoid_into(g: &[f32], s: &mut [f32]) {
    for (x, v) in s.iter_mut().zip(g) {
        *x = -v;
    }
    exp_in_place(s);
    for x in s.iter_mut() {
        *x = 1.0 / (1.0 + *x);
    }
}

/// `silu(g)·u` (SwiGLU's activation) for equally long `g` and `u`, on every core.
pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "swiglu: gate and up differ in length");
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(ELEMENTWISE_TASK).zip(g.par_chunks(ELEMENTWISE_TASK).zip(u.par_chunks(ELEMENTWISE_TASK))).for_each(|(out, (g, u))| {
        let mut s = [0f32; ELEMENTWISE_STEP];
        for ((out, g), u) in out.chunks_mut(ELEMENTWISE_STEP).zip(g.chunks(ELEMENTWISE_STEP)).zip(u.chunks(ELEMENTWISE_STEP)) {
            let s = &mut s[..g.len()];
            sigmoid_into(g, s);
            for (((o, gv), uv), sv) in out.iter_mut().zip(g).zip(u).zip(s.iter()) {
                *o = gv * sv * uv;
            }
        }
    });
    out
}

/// The gradients `(dg, du)` of [`swiglu`] for the output's gradient `dh`:
/// `du = dh·silu(g)`, `dg = dh·u·σ(g)·(1 + g·(1 − σ(g)))`.
pub fn swiglu_backward(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(g.len() == u.len() && g.len() == dh.len(), "swiglu_backward: lengths differ");
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    let t = ELEMENTWISE_TASK;
    dg.par_chunks_mut(t).zip(du.par_chunks_mut(t)).zip(g.par_chunks(t).zip(u.par_chunks(t)).zip(dh.par_chunks(t))).for_each(|((dg, du), ((g, u), dh))| {
        let mut s = [0f32; ELEMENTWISE_STEP];
        let steps = dg.chunks_mut(ELEMENTWISE_STEP).zip(du.chunks_mut(ELEMENTWISE_STEP));
        for ((dg, du), ((g, u), dh)) in steps.zip(g.chunks(ELEMENTWISE_STEP).zip(u.chunks(ELEMENTWISE_STEP)).zip(dh.chunks(ELEMENTWISE_STEP))) {
            let s = &mut s[..g.len()];
            sigmoid_into(g, s);
            for i in 0..g.len() {
                let (gv, sv) = (g[i], s[i]);
                du[i] = dh[i] * gv * sv;
                dg[i] = dh[i] * u[i] * sv * (1.0 + gv * (1.0 - sv));
            }
        }
    });
    (dg, du)
}

/// The cross-entropy of `rows` rows of `logits` (`[rows, vocab]`, row-major) against their
/// `targets`, and its gradient, each row a task on every core: returns every row's
/// `lse − logit[target]` and overwrites `logits` with `weight·(softmax − onehot(target))`.
/// A row whose weight is 0 gives 0 (its target is never read); one whose target is outside the
/// vocabulary gives NaN.
pub fn cross_entropy(logits: &mut [f32], vocab: usize, targets: &[i64], weights: &[f32]) -> Vec<f32> {
    let rows = targets.len();
    assert!(logits.len() == rows * vocab && weights.len() == rows && vocab > 0, "cross_entropy: sizes differ");
    let mut nll = vec![0f32; rows];
    logits.par_chunks_mut(vocab).zip(nll.par_iter_mut()).zip(targets.par_iter().zip(weights.par_iter())).for_each(|((row, nll), (&t, &w))| {
        let target = usize::try_from(t).ok().filter(|&t| t < vocab);
        let picked = target.map_or(f32::NAN, |t| row[t]);
        let m = max(row);
        for x in row.iter_mut() {
            *x -= m;
        }
        exp_in_place(row);
        let total = sum(row);
        *nll = if w == 0.0 { 0.0 } else { m + total.ln() - picked };
        let scale = w / total;
        for x in row.iter_mut() {
            *x *= scale;
        }
        if let Some(t) = target {
            row[t] -= w;
        }
    });
    nll
}

/// A contiguous f32 flex tensor's elements, for the kernels above.
pub(crate) fn f32s(t: &burn_flex::FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// An f32 flex tensor of `shape` holding a kernel's output `values`.
pub(crate) fn flex_f32(values: Vec<f32>, shape: impl Into<burn::tensor::Shape>) -> burn_flex::FlexTensor {
    burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(values, shape.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_standard_library() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let mut v = [x];
            exp_in_place(&mut v);
            let want = x.exp();
            worst = worst.max(((v[0] - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst:e}");
        let mut v = [0.0f32, -1e-8, f32::NEG_INFINITY, -1000.0];
        exp_in_place(&mut v);
        assert_eq!(v[0], 1.0);
        assert!(v[2] < 1e-37 && v[3] < 1e-37);
    }

    #[test]
    fn reductions_match_their_plain_forms() {
        let xs: Vec<f32> = (0..37).map(|i| ((i * 7919) % 23) as f32 - 11.5).collect();
        assert_eq!(max(&xs), xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert!((sum(&xs) - xs.iter().sum::<f32>()).abs() < 1e-4);
        assert!((dot(&xs, &xs) - xs.iter().map(|x| x * x).sum::<f32>()).abs() < 1e-2);
    }
}
