//! The pieces of `lora train`'s loop: the token-averaged loss, optimizers with PyTorch's
//! update rules, learning-rate schedules, and the walk over the trainable tensors.
#![warn(missing_docs)]

pub mod loss;
pub mod optim;
pub mod params;
pub mod schedule;

pub use optim::{Optimizer, OptimizerConfig, OptimizerKind, clip_global_norm};
pub use params::{Trainable, for_each_trainable};
pub use schedule::{Schedule, ScheduleKind};
