//! Dynamic loss scaling for f16 compute, with `torch.amp.GradScaler`'s rule.
//!
//! The gradient of a token-averaged loss is tiny: the softmax part of `∂loss/∂logits` is
//! about `1 / (vocab · tokens)`, below f16's smallest subnormal (6·10⁻⁸) for any real
//! vocabulary and batch, so in f16 most of it would flush to zero. The loss is therefore
//! multiplied by a large scale before backward and the (f32) gradients divided by it after.
//! A step whose gradients overflowed is skipped and the scale halved; after
//! [`GROWTH_INTERVAL`] good steps in a row it is doubled.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// The first scale (`GradScaler`'s `init_scale`).
pub const INITIAL: f64 = 65536.0;
/// Good steps in a row before the scale doubles (`growth_interval`).
pub const GROWTH_INTERVAL: usize = 2000;
/// Below this the gradients overflow even without scaling: the run cannot go on in f16.
pub const SMALLEST: f64 = 1.0 / 65536.0;

/// The scale and its count of good steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// What the loss is multiplied by before backward.
    pub scale: f64,
    /// Optimizer steps without overflow since the scale last changed.
    pub good_steps: usize,
}

impl Default for LossScale {
    fn default() -> Self {
        Self { scale: INITIAL, good_steps: 0 }
    }
}

/// What [`LossScale::update`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The gradients are finite: take the step.
    Step,
    /// They overflowed: skip the step (the scale was halved).
    Skip,
    /// They overflow even at [`SMALLEST`]: the loss or the activations are not finite in f16.
    GiveUp,
}

impl LossScale {
    /// Records one optimizer step's outcome (`finite`: every gradient is finite).
    pub fn update(&mut self, finite: bool) -> Verdict {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
            return Verdict::Step;
        }
        self.good_steps = 0;
        self.scale *= 0.5;
        if self.scale < SMALLEST { Verdict::GiveUp } else { Verdict::Skip }
    }
}

/// Divides every gradient by `scale`.
pub fn unscale(grads: &mut [Tensor<1>], scale: f64) {
    let inverse = 1.0 / scale;
    for g in grads.iter_mut() {
        *g = g.clone() * inverse;
    }
}

/// Whether every element of `grads` is finite, reading one scalar back: the sum of |g| is
/// finite exactly when every element is (f32 sums of finite gradients do not reach f32's
/// limit).
pub fn all_finite(grads: &[Tensor<1>]) -> bool {
    let sums: Vec<Tensor<1>> = grads.iter().map(|g| g.clone().abs().sum()).collect();
    if sums.is_empty() {
        return true;
    }
    Tensor::cat(sums, 0).sum().into_scalar::<f64>().is_finite()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Device, TensorData};

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_the_interval() {
        let mut s = LossScale::default();
        assert_eq!(s.update(false), Verdict::Skip);
        assert_eq!(s.scale, INITIAL / 2.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert_eq!(s.update(true), Verdict::Step);
        }
        assert_eq!(s.scale, INITIAL / 2.0);
        assert_eq!(s.update(true), Verdict::Step);
        assert_eq!((s.scale, s.good_steps), (INITIAL, 0));
        // An overflow resets the count.
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.good_steps), (INITIAL / 2.0, 0));
    }

    #[test]
    fn it_gives_up_when_even_the_smallest_scale_overflows() {
        let mut s = LossScale { scale: SMALLEST, good_steps: 0 };
        assert_eq!(s.update(false), Verdict::GiveUp);
    }

    #[test]
    fn unscaling_divides_and_the_check_finds_infinities_and_nans() {
        let device = Device::flex();
        let t = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), (&device, DType::F32));
        let mut grads = vec![t(vec![2.0, -4.0]), t(vec![8.0])];
        unscale(&mut grads, 2.0);
        assert!(all_finite(&grads));
        assert_eq!(grads[0].clone().into_data().try_to_vec::<f32>().unwrap(), [1.0, -2.0]);
        assert_eq!(grads[1].clone().into_data().try_to_vec::<f32>().unwrap(), [4.0]);
        assert!(!all_finite(&[t(vec![1.0]), t(vec![f32::INFINITY, 0.0])]));
        assert!(!all_finite(&[t(vec![f32::NAN])]));
        assert!(all_finite(&[]));
    }
}
