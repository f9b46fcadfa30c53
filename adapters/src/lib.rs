//! LoRA and DoRA adapters over the frozen base projections of `lora-model`.
//!
//! The adapter layer, its initialisation and the PEFT and mlx-lm file formats arrive with
//! the training work; this crate reserves their place in the workspace's one-way import
//! order (`quant` -> `model` -> `adapters` -> `trainer` -> `lora`).
#![warn(missing_docs)]
