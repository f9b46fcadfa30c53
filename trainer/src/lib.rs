//! The training loop, optimizers, schedules and checkpoints of `lora train`.
//!
//! Arrives with the training work; this crate reserves its place in the workspace's
//! one-way import order (`quant` -> `model` -> `adapters` -> `trainer` -> `lora`).
#![warn(missing_docs)]
