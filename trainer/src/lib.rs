//! `lora train`'s loop and its pieces: the token-averaged loss, optimizers with PyTorch's
//! update rules, learning-rate schedules, f16 loss scaling, the walk over the trainable
//! tensors, and the resume file.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod error;
pub mod loss;
pub mod optim;
pub mod params;
pub mod preference;
pub mod run;
pub mod scale;
pub mod schedule;

pub use error::TrainError;
pub use optim::{Optimizer, OptimizerConfig, OptimizerKind, clip_global_norm};
pub use params::{Trainable, for_each_trainable, trainable_tensors};
pub use preference::{DpoLoss, Objective, Scored};
pub use run::{Best, EarlyStop, Evaluation, Observer, Outcome, Progress, Report, Settings, State, apply_step, evaluate, train};
pub use schedule::{Schedule, ScheduleKind};
