//! LoRA and DoRA adapters over the frozen projections of `lora-model`.
//!
//! * [`AdapterSpec`]: which projections of which blocks, rank, scale (mlx-lm's raw `scale`
//!   or PEFT's `alpha`, with rsLoRA), dropout, LoRA or DoRA.
//! * [`add_adapters`] puts freshly initialized adapters on a model; [`adapter_weights`]
//!   and [`set_adapters`] move them between the model and the host.
//! * [`format`]: adapter directories in PEFT's and mlx-lm's layouts.
//!
//! The arithmetic of an adapted projection lives with the model ([`lora_model::LoraAdapter`]).
#![warn(missing_docs)]

pub mod attach;
pub mod error;
pub mod format;
pub mod fuse;
pub mod io;
pub mod spec;

pub use attach::{AdapterWeights, adapter_weights, add_adapters, check_adapters, combine, select_projections, set_adapters, trainable_count};
pub use error::AdapterError;
pub use format::{AdapterFile, AdapterFormat};
pub use spec::{AdapterSpec, FineTuneType, Init, Scale};
