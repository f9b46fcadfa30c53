//! Small tensor helpers the kernels and the crates above them share.

use burn::tensor::{DType, FloatDType, Slice};

/// The float dtype of a compute `dtype`: f16, bf16 and f64 as they are, f32 for anything else
/// (burn's own `From<DType>` panics on a non-float dtype).
pub fn float_dtype(dtype: DType) -> FloatDType {
    match dtype {
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        DType::F64 => FloatDType::F64,
        _ => FloatDType::F32,
    }
}

/// Positions `start..end` along `dim` of a tensor of rank `rank`, every other dimension whole.
pub fn slice_dim(rank: usize, dim: usize, start: usize, end: usize) -> Vec<Slice> {
    (0..rank).map(|i| if i == dim { Slice::new(start as isize, Some(end as isize), 1) } else { Slice::new(0, None, 1) }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_dtypes_keep_halves_and_f64_and_default_to_f32() {
        assert_eq!(float_dtype(DType::F16), FloatDType::F16);
        assert_eq!(float_dtype(DType::BF16), FloatDType::BF16);
        assert_eq!(float_dtype(DType::F64), FloatDType::F64);
        assert_eq!(float_dtype(DType::F32), FloatDType::F32);
        assert_eq!(float_dtype(DType::I32), FloatDType::F32);
    }
}
