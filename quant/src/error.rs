//! The error type of this crate.

/// What can be wrong with a quantization request or with quantized tensors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// The number of bits is not one the scheme supports.
    #[error("unsupported quantization bits {bits}; supported: {supported}")]
    UnsupportedBits {
        /// The bits asked for.
        bits: usize,
        /// The supported values, comma separated.
        supported: &'static str,
    },
    /// The group (block) size is not one the scheme supports.
    #[error("unsupported quantization group size {group_size}; supported: {supported}")]
    UnsupportedGroupSize {
        /// The group size asked for.
        group_size: usize,
        /// The supported values, comma separated.
        supported: &'static str,
    },
    /// The input size of a matrix is not a multiple of the group size.
    #[error("input size {cols} is not a multiple of the group size {group_size}")]
    NotDivisible {
        /// The matrix's input size (columns).
        cols: usize,
        /// The group size.
        group_size: usize,
    },
    /// A packed weight, its scales or its biases do not fit together.
    #[error("{name}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// The shape that fits the weight.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
}
