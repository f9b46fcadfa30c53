//! Optimizers with PyTorch's update rules: AdamW (decoupled weight decay), Adam (L2 weight
//! decay added to the gradient), both bias-corrected, and SGD with momentum. Their state is
//! plain f32 tensors in the order of [`crate::params::for_each_trainable`], so a checkpoint
//! can hold it and a resumed run continues exactly.

use burn::module::Param;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam, bias-corrected (mlx-lm's default optimizer name).
    #[default]
    Adam,
    /// AdamW: weight decay applied to the weights, not through the gradient.
    Adamw,
    /// Stochastic gradient descent, with optional momentum.
    Sgd,
}

/// Hyperparameters of the update rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// The rule.
    pub kind: OptimizerKind,
    /// Weight decay (AdamW: decoupled; Adam and SGD: added to the gradient). Default 0.
    pub weight_decay: f64,
    /// Adam's β₁ and β₂. Default (0.9, 0.999).
    pub betas: (f64, f64),
    /// Adam's ε. Default 1e-8.
    pub eps: f64,
    /// SGD momentum. Default 0.
    pub momentum: f64,
    /// LoRA+: the learning rate of `B` (and of DoRA's magnitude) over that of `A`. Default 1
    /// (plain LoRA); resume files written before it existed read as 1.
    #[serde(default = "one")]
    pub lora_plus_ratio: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self { kind: OptimizerKind::Adam, weight_decay: 0.0, betas: (0.9, 0.999), eps: 1e-8, momentum: 0.0, lora_plus_ratio: 1.0 }
    }
}

/// The state of one tensor: Adam's two moments, or SGD's momentum buffer (in `first`).
#[derive(Debug, Clone)]
pub struct Slot {
    /// First moment / momentum buffer, flattened.
    pub first: Option<Tensor<1>>,
    /// Second moment, flattened.
    pub second: Option<Tensor<1>>,
}

/// An optimizer and its state.
#[derive(Debug, Clone)]
pub struct Optimizer {
    /// Hyperparameters.
    pub config: OptimizerConfig,
    /// Optimizer steps taken.
    pub steps: usize,
    /// One slot per trainable tensor.
    pub slots: Vec<Slot>,
}

impl Optimizer {
    /// A fresh optimizer.
    pub fn new(config: OptimizerConfig) -> Self {
        Self { config, steps: 0, slots: Vec::new() }
    }

    /// Counts a step; call once before updating the tensors of that step.
    pub fn begin_step(&mut self) {
        self.steps += 1;
    }

    /// Updates tensor number `index` of this step from its gradient (on the inner,
    /// non-autodiff backend) with learning rate `lr`.
    pub fn update<const D: usize>(&mut self, index: usize, param: &mut Param<Tensor<D>>, grad: Tensor<D>, lr: f64) {
        if self.slots.len() <= index {
            self.slots.resize(index + 1, Slot { first: None, second: None });
        }
        let c = self.config;
        let shape = grad.shape();
        let strategy = param.val().gradient_checkpointing_strategy();
        let p = param.val().inner().detach();
        let device = p.device();
        let flat = |t: Tensor<D>| t.reshape([shape.num_elements()]);
        let (p, mut g) = (flat(p), flat(grad));
        let slot = &mut self.slots[index];
        let updated = match c.kind {
            OptimizerKind::Adam | OptimizerKind::Adamw => {
                let mut p = p;
                if c.weight_decay != 0.0 {
                    if c.kind == OptimizerKind::Adamw {
                        p = p * (1.0 - lr * c.weight_decay);
                    } else {
                        g = g + p.clone() * c.weight_decay;
                    }
                }
                let (b1, b2) = c.betas;
                let zeros = || Tensor::<1>::zeros([shape.num_elements()], &device);
                let m = slot.first.take().unwrap_or_else(zeros) * b1 + g.clone() * (1.0 - b1);
                let v = slot.second.take().unwrap_or_else(zeros) * b2 + g.square() * (1.0 - b2);
                let t = self.steps.max(1) as i32;
                let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                let denom = v.clone().sqrt() / bc2.sqrt() + c.eps;
                let p = p - m.clone() / denom * (lr / bc1);
                slot.first = Some(m);
                slot.second = Some(v);
                p
            }
            OptimizerKind::Sgd => {
                if c.weight_decay != 0.0 {
                    g = g + p.clone() * c.weight_decay;
                }
                if c.momentum != 0.0 {
                    let buf = match slot.first.take() {
                        Some(b) => b * c.momentum + g,
                        None => g,
                    };
                    slot.first = Some(buf.clone());
                    g = buf;
                }
                p - g * lr
            }
        };
        // Back on autodiff with the parameter's own checkpointing strategy (a plain
        // `autodiff()` would take the default one, which cannot meet the model's tensors).
        let mut value = updated.reshape(shape).autodiff();
        if let Some(strategy) = strategy {
            value = value.with_gradient_checkpointing_strategy(strategy);
        }
        let value = value.require_grad();
        *param = Param::initialized(param.id, value);
    }
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm/(norm + 1e-6)`, never above 1). Returns the norm
/// before clipping.
pub fn clip_global_norm(grads: &mut [Tensor<1>], max_norm: f64) -> f64 {
    let norm = grads.iter().map(|g| g.clone().square().sum().into_scalar::<f64>()).sum::<f64>().sqrt();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for g in grads.iter_mut() {
            *g = g.clone() * factor;
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn param(values: Vec<f32>) -> Param<Tensor<1>> {
        let device = Device::flex().autodiff();
        Param::from_tensor(Tensor::from_data(TensorData::new(values.clone(), [values.len()]), &device))
    }

    fn values(p: &Param<Tensor<1>>) -> Vec<f32> {
        p.val().into_data().try_to_vec().unwrap()
    }

    fn grad(values: Vec<f32>) -> Tensor<1> {
        Tensor::from_data(TensorData::new(values.clone(), [values.len()]), &Device::flex())
    }

    #[test]
    fn adam_first_step_moves_each_weight_by_lr_against_its_gradient() {
        let mut opt = Optimizer::new(OptimizerConfig::default());
        let mut p = param(vec![1.0, -2.0, 0.5]);
        opt.begin_step();
        opt.update(0, &mut p, grad(vec![0.3, -4.0, 1e-3]), 0.1);
        // m̂ = g, v̂ = g²: the step is lr·g/(|g| + ε).
        let v = values(&p);
        for (got, want) in v.iter().zip([0.9, -1.9, 0.4 + 0.1 * 1e-8 / (1e-3 + 1e-8)]) {
            assert!((got - want).abs() < 1e-6, "{v:?}");
        }
        assert!(p.val().is_require_grad(), "the updated weight stays trainable");
    }

    #[test]
    fn adamw_decays_the_weight_and_adam_the_gradient() {
        let config = |kind| OptimizerConfig { kind, weight_decay: 0.1, ..Default::default() };
        let mut w = Optimizer::new(config(OptimizerKind::Adamw));
        let mut p = param(vec![2.0]);
        w.begin_step();
        w.update(0, &mut p, grad(vec![0.5]), 0.01);
        // p·(1 − lr·wd) − lr·sign(g)
        assert!((values(&p)[0] - (2.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6);
        let mut a = Optimizer::new(config(OptimizerKind::Adam));
        let mut p = param(vec![2.0]);
        a.begin_step();
        a.update(0, &mut p, grad(vec![-0.1]), 0.01);
        // g + wd·p = 0.1 > 0: the step goes down by lr.
        assert!((values(&p)[0] - 1.99).abs() < 1e-6);
    }

    #[test]
    fn adam_second_step_matches_the_torch_formula() {
        let mut opt = Optimizer::new(OptimizerConfig::default());
        let mut p = param(vec![1.0]);
        let (g1, g2, lr) = (0.5f64, -0.25f64, 0.01f64);
        for g in [g1, g2] {
            opt.begin_step();
            opt.update(0, &mut p, grad(vec![g as f32]), lr);
        }
        let m = 0.9 * 0.1 * g1 + 0.1 * g2;
        let v = 0.999 * 0.001 * g1 * g1 + 0.001 * g2 * g2;
        let (bc1, bc2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
        let first = 1.0 - lr * g1 / (g1.abs() + 1e-8);
        let want = first - lr / bc1 * m / (v.sqrt() / bc2.sqrt() + 1e-8);
        assert!((values(&p)[0] as f64 - want).abs() < 1e-6, "{} vs {want}", values(&p)[0]);
    }

    #[test]
    fn sgd_with_momentum_accumulates() {
        let mut opt = Optimizer::new(OptimizerConfig { kind: OptimizerKind::Sgd, momentum: 0.9, ..Default::default() });
        let mut p = param(vec![0.0]);
        for _ in 0..2 {
            opt.begin_step();
            opt.update(0, &mut p, grad(vec![1.0]), 0.1);
        }
        // buf 1 then 1.9: −0.1 − 0.19.
        assert!((values(&p)[0] + 0.29).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let mut g = vec![grad(vec![3.0]), grad(vec![4.0])];
        let norm = clip_global_norm(&mut g, 1.0);
        assert!((norm - 5.0).abs() < 1e-9);
        let got: Vec<f32> = g.iter().map(|t| t.clone().into_scalar::<f32>()).collect();
        assert!((got[0] - 0.6).abs() < 1e-5 && (got[1] - 0.8).abs() < 1e-5, "{got:?}");
        let mut small = vec![grad(vec![0.1])];
        clip_global_norm(&mut small, 1.0);
        assert_eq!(small[0].clone().into_scalar::<f32>(), 0.1);
    }
}
