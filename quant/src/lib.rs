//! Weight quantization for a frozen base model.
//!
//! * [`affine`]: MLX's affine scheme (`w = scale·q + bias` per group of consecutive inputs),
//!   bits 2, 3, 4, 5, 6 and 8, group size 32, 64 or 128. [`affine::quantize`] matches
//!   `mlx.core.quantize` bit for bit, and its packed layout is MLX's, so MLX checkpoints
//!   load as they are.
//! * [`nf4`]: QLoRA's NormalFloat4 with one absmax per block of 64, optionally with
//!   double quantization of those absmax values.
//! * [`QuantWeight`]: a packed weight held on a burn device (u32 words, about bits/8 bytes
//!   per weight plus the scales) that dequantizes one layer at a time when it is used.
//!
//! This crate knows nothing of the model; the model holds its projections as
//! [`QuantWeight`]s or dense tensors.
//!
//! ```
//! use lora_quant::affine::{AffineSpec, quantize, dequantize};
//!
//! let spec = AffineSpec::new(4, 64)?;
//! let w: Vec<f32> = (0..2 * 128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0).collect();
//! let q = quantize(&w, 128, spec)?;
//! let back = dequantize(&q.packed, &q.scales, &q.biases, 128, spec);
//! let err = w.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
//! assert!(err < 1.0 / 15.0); // within one of the 15 steps over the range 1.0
//! # Ok::<(), lora_quant::QuantError>(())
//! ```
#![warn(missing_docs)]

pub mod affine;
pub mod error;
pub mod host;
pub mod kernels;
pub mod nf4;
pub mod ops;
pub mod pack;
pub mod weight;

pub use error::QuantError;
pub use weight::QuantWeight;
