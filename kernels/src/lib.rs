//! CubeCL kernels that burn's own operations do not reach, each behind a burn backend extension
//! with a CPU (flex) path and, where it is differentiated, a hand-written backward.
//!
//! - [`linear`]: `x·Wᵀ` for a frozen weight `W` (no weight gradient, input gradient `dy·W`). On
//!   a GPU whose driver offers workgroup-scope cooperative matrices
//!   (`VK_NV_cooperative_matrix2`), both products run on [`matmul`]'s tensor-core kernel;
//!   elsewhere they are burn's matmul.
//! - [`lora`]: the low-rank adapter's thin products `x·Aᵀ`, `y + s·h·Bᵀ` and their backward,
//!   each one pass over its large operand, where a general matmul tiles them as square ones.
//! - [`matvec`]: the same product for a few rows of `x` (decoding), bound by reading `W` once.
//! - [`attention`]: causal attention in chunks of queries with a backward that recomputes the
//!   probabilities from the log-sum-exp: no `[heads, T, T]` tensor is ever held.
//! - [`flash`]: that attention on a GPU as three kernels (tensor cores where the device has
//!   them): the scores never leave workgroup memory.
//! - [`cpu`]: the CPU backend's attention in one pass per head group on every core.
//! - [`mask`]: which keys a query sees (causality aside): padding, and packed sequences.
//! - [`decode`]: a decoded token's attention over the key/value cache in one kernel.
//! - [`norm`]: RMSNorm in one kernel for inference.
//! - [`rope`]: rotary position embeddings in one kernel for inference.
//! - [`xent`]: the head's cross-entropy and its gradient in the logits as one operation.
//! - [`device`]: finding a wgpu adapter and its shader compiler, shared by every crate above.
//! - [`tensor`]: small tensor helpers (a compute dtype's float dtype, one dimension's slice).
#![warn(missing_docs)]

pub mod attention;
pub mod cpu;
pub mod decode;
pub mod device;
pub mod flash;
pub mod linear;
pub mod lora;
pub mod mask;
pub mod matmul;
pub mod matvec;
pub mod norm;
pub mod rope;
pub mod tensor;
pub mod xent;

pub use linear::{frozen_linear, frozen_linear_add, frozen_linear3, frozen_norm_linear3, frozen_norm_swiglu, frozen_swiglu, matmul_frozen};
