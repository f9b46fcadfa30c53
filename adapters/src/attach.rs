//! Putting adapters on a model's projections, and reading them back off.

use burn::module::Param;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use lora_model::{CausalLm, LoraAdapter, PROJECTIONS};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::AdapterError;
use crate::spec::{AdapterSpec, FineTuneType, Init};

/// One projection's adapter on the host, in PEFT's layout, f32.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterWeights {
    /// The projection's checkpoint path, `model.layers.{i}.self_attn.q_proj`.
    pub module: String,
    /// `A` `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `B` `[out, rank]`, row-major.
    pub b: Vec<f32>,
    /// DoRA's magnitude `[out]`.
    pub magnitude: Option<Vec<f32>>,
    /// The rank.
    pub rank: usize,
    /// The projection's input size.
    pub inputs: usize,
    /// The projection's output size.
    pub outputs: usize,
    /// The factor on `B·A`.
    pub scale: f64,
}

/// The projection names `keys` selects, in [`PROJECTIONS`] order: a key matches a projection
/// by its full name (`self_attn.q_proj`, mlx-lm) or its last part (`q_proj`, PEFT).
pub fn select_projections(keys: Option<&[String]>) -> Result<Vec<&'static str>, AdapterError> {
    let Some(keys) = keys else { return Ok(PROJECTIONS.to_vec()) };
    let matches = |p: &str, k: &str| p == k || p.rsplit('.').next() == Some(k);
    for key in keys {
        if !PROJECTIONS.iter().any(|p| matches(p, key)) {
            return Err(AdapterError::UnknownKey { key: key.clone(), available: PROJECTIONS.join(", ") });
        }
    }
    Ok(PROJECTIONS.iter().copied().filter(|p| keys.iter().any(|k| matches(p, k))).collect())
}

/// Adds a freshly initialized adapter to every projection `spec` selects, `A` drawn on the
/// host from `seed` (the same numbers on every backend), `B` zero. Returns how many
/// projections got one.
pub fn add_adapters(model: &mut CausalLm, spec: &AdapterSpec, seed: u64) -> Result<usize, AdapterError> {
    spec.validate()?;
    let chosen = select_projections(spec.keys.as_deref())?;
    let device = model.device();
    let blocks = model.model.layers.len();
    let mut rng = StdRng::seed_from_u64(seed);
    let scale = spec.scale.value(spec.rank);
    let mut count = 0;
    for i in spec.layers(blocks) {
        for (name, linear) in model.model.layers[i].projections_mut() {
            if !chosen.contains(&name) {
                continue;
            }
            let [out, inp] = linear.weight.dims();
            let r = spec.rank;
            let a: Vec<f32> = match spec.init {
                Init::Kaiming => {
                    let bound = 1.0 / (inp as f32).sqrt();
                    (0..r * inp).map(|_| rng.random_range(-bound..bound)).collect()
                }
                Init::Gaussian => (0..r * inp).map(|_| gaussian(&mut rng) / r as f32).collect(),
            };
            let tensor = |v: Vec<f32>, shape: [usize; 2]| Tensor::<2>::from_data(TensorData::new(v, shape), (&device, DType::F32));
            let magnitude = (spec.fine_tune_type == FineTuneType::Dora).then(|| {
                // ‖W‖ per output row: with B = 0 the adapted weight is the base weight.
                let w = linear.weight.dense().cast(FloatDType::F32);
                Param::from_tensor(w.square().sum_dim(1).sqrt().squeeze_dim::<1>(1).detach())
            });
            linear.adapter = Some(LoraAdapter {
                a: Param::from_tensor(tensor(a, [r, inp])),
                b: Param::from_tensor(tensor(vec![0.0; out * r], [out, r])),
                magnitude,
                scale,
                dropout: spec.dropout,
                training: false,
                dropout_seed: 0,
            });
            count += 1;
        }
    }
    Ok(count)
}

/// A standard normal draw (Box–Muller).
fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Puts `weights` on the model's projections, replacing what is there. `source` names the
/// file in errors: a module the model lacks or a shape that does not fit is refused before
/// anything changes.
pub fn set_adapters(model: &mut CausalLm, weights: &[AdapterWeights], dropout: f64, source: &std::path::Path) -> Result<(), AdapterError> {
    let device = model.device();
    let places = check_adapters(model, weights, source)?;
    for (w, (layer, proj)) in weights.iter().zip(places) {
        let tensor = |v: &[f32], shape: [usize; 2]| Param::from_tensor(Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), (&device, DType::F32)));
        let (_, linear) = model.model.layers[layer].projections_mut().into_iter().nth(proj).expect("located");
        let training = linear.adapter.as_ref().is_some_and(|a| a.training);
        linear.adapter = Some(LoraAdapter {
            a: tensor(&w.a, [w.rank, w.inputs]),
            b: tensor(&w.b, [w.outputs, w.rank]),
            magnitude: w.magnitude.as_ref().map(|m| Param::from_tensor(Tensor::<1>::from_data(TensorData::new(m.clone(), [m.len()]), (&device, DType::F32)))),
            scale: w.scale,
            dropout,
            training,
            dropout_seed: 0,
        });
    }
    Ok(())
}

/// Checks that `weights` fit the model without changing it: every module exists and every
/// shape fits, else an error naming the first tensor of `source` that does not. Returns each
/// adapter's `(block, index in PROJECTIONS)`.
pub fn check_adapters(model: &CausalLm, weights: &[AdapterWeights], source: &std::path::Path) -> Result<Vec<(usize, usize)>, AdapterError> {
    let mut places = Vec::with_capacity(weights.len());
    for w in weights {
        let place = locate(model, &w.module).ok_or_else(|| AdapterError::UnknownModule {
            path: source.to_path_buf(),
            name: format!("{}.lora_A", w.module),
            module: w.module.clone(),
        })?;
        let [out, inp] = model.model.layers[place.0].projections()[place.1].1.weight.dims();
        let mismatch = |what: &str, expected: Vec<usize>, found: Vec<usize>| AdapterError::ShapeMismatch {
            path: source.to_path_buf(),
            name: format!("{}.{what}", w.module),
            expected,
            found,
        };
        if w.inputs != inp {
            return Err(mismatch("lora_A", vec![w.rank, inp], vec![w.rank, w.inputs]));
        }
        if w.outputs != out {
            return Err(mismatch("lora_B", vec![out, w.rank], vec![w.outputs, w.rank]));
        }
        if let Some(m) = &w.magnitude
            && m.len() != out
        {
            return Err(mismatch("lora_magnitude_vector", vec![out], vec![m.len()]));
        }
        places.push(place);
    }
    Ok(places)
}

/// `(block, index in PROJECTIONS)` of a module path such as `model.layers.3.mlp.up_proj`.
fn locate(model: &CausalLm, module: &str) -> Option<(usize, usize)> {
    let rest = module.strip_prefix("model.layers.")?;
    let (index, name) = rest.split_once('.')?;
    let layer: usize = index.parse().ok()?;
    let proj = PROJECTIONS.iter().position(|p| *p == name)?;
    (layer < model.model.layers.len()).then_some((layer, proj))
}

/// Every adapter on the model, copied to the host, in block then [`PROJECTIONS`] order.
pub fn adapter_weights(model: &CausalLm) -> Vec<AdapterWeights> {
    let host = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data");
    model
        .adapters()
        .map(|(module, linear, adapter)| {
            let [outputs, inputs] = linear.weight.dims();
            AdapterWeights {
                module,
                a: host(adapter.a.val()),
                b: host(adapter.b.val()),
                magnitude: adapter.magnitude.as_ref().map(|m| m.val().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")),
                rank: adapter.rank(),
                inputs,
                outputs,
                scale: adapter.scale,
            }
        })
        .collect()
}

/// Number of trainable values: every adapter's `A`, `B` and magnitude.
pub fn trainable_count(model: &CausalLm) -> usize {
    model.adapters().map(|(_, _, a)| a.a.shape().num_elements() + a.b.shape().num_elements() + a.magnitude.as_ref().map_or(0, |m| m.dims()[0])).sum()
}

/// Several adapters as one, each weighted: `Σ wᵢ·sᵢ·Bᵢ·Aᵢ` is `B·A` with `A` the rows of
/// every `Aᵢ` stacked and `B` the columns `wᵢ·sᵢ·Bᵢ` side by side (scale 1), so the sum runs
/// as one unmerged adapter of rank `Σ rᵢ`. A single adapter comes back unchanged but for its
/// weight. DoRA cannot be summed or weighted this way: it is accepted alone, with weight 1.
pub fn combine(adapters: &[(&[AdapterWeights], f64, &std::path::Path)]) -> Result<Vec<AdapterWeights>, AdapterError> {
    let dora = adapters.iter().find(|(w, _, _)| w.iter().any(|a| a.magnitude.is_some()));
    if let Some((_, weight, path)) = dora
        && (adapters.len() > 1 || *weight != 1.0)
    {
        return Err(AdapterError::invalid(path, "a DoRA adapter cannot be combined with others or given a scale other than 1"));
    }
    if let [(weights, weight, _)] = adapters {
        return Ok(weights
            .iter()
            .cloned()
            .map(|mut a| {
                a.scale *= weight;
                a
            })
            .collect());
    }
    let mut modules: Vec<String> = Vec::new();
    for (weights, _, _) in adapters {
        for a in weights.iter() {
            if !modules.contains(&a.module) {
                modules.push(a.module.clone());
            }
        }
    }
    let mut out = Vec::with_capacity(modules.len());
    for module in modules {
        let parts: Vec<(&AdapterWeights, f64, &std::path::Path)> =
            adapters.iter().filter_map(|(w, weight, path)| w.iter().find(|a| a.module == module).map(|a| (a, *weight, *path))).collect();
        let (first, _, _) = parts[0];
        let rank: usize = parts.iter().map(|(a, _, _)| a.rank).sum();
        let mut a_rows = Vec::with_capacity(rank * first.inputs);
        let mut b = vec![0f32; first.outputs * rank];
        let mut col = 0;
        for (p, weight, path) in &parts {
            if (p.inputs, p.outputs) != (first.inputs, first.outputs) {
                return Err(AdapterError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: format!("{module}.lora_B"),
                    expected: vec![first.outputs, first.inputs],
                    found: vec![p.outputs, p.inputs],
                });
            }
            a_rows.extend_from_slice(&p.a);
            let factor = (p.scale * weight) as f32;
            for o in 0..p.outputs {
                for r in 0..p.rank {
                    b[o * rank + col + r] = p.b[o * p.rank + r] * factor;
                }
            }
            col += p.rank;
        }
        out.push(AdapterWeights { module, a: a_rows, b, magnitude: None, rank, inputs: first.inputs, outputs: first.outputs, scale: 1.0 });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(module: &str, rank: usize, seed: f32, scale: f64) -> AdapterWeights {
        let (inputs, outputs) = (3, 2);
        AdapterWeights {
            module: module.into(),
            a: (0..rank * inputs).map(|i| seed + i as f32 * 0.1).collect(),
            b: (0..outputs * rank).map(|i| seed - i as f32 * 0.2).collect(),
            magnitude: None,
            rank,
            inputs,
            outputs,
            scale,
        }
    }

    /// `scale·B·A` `[out, in]`.
    fn delta(a: &AdapterWeights) -> Vec<f32> {
        let mut d = vec![0f32; a.outputs * a.inputs];
        for o in 0..a.outputs {
            for i in 0..a.inputs {
                d[o * a.inputs + i] = (0..a.rank).map(|r| a.b[o * a.rank + r] * a.a[r * a.inputs + i]).sum::<f32>() * a.scale as f32;
            }
        }
        d
    }

    #[test]
    fn combined_adapters_add_their_weighted_deltas() {
        let p = std::path::Path::new("x");
        let one = vec![adapter("m.q", 2, 1.0, 2.0), adapter("m.k", 1, 0.5, 1.0)];
        let two = vec![adapter("m.q", 3, -1.0, 0.5)];
        let c = combine(&[(&one, 0.5, p), (&two, 1.5, p)]).unwrap();
        assert_eq!(c.len(), 2);
        let q = &c[0];
        assert_eq!((q.module.as_str(), q.rank), ("m.q", 5));
        let want: Vec<f32> = delta(&one[0]).iter().zip(delta(&two[0])).map(|(x, y)| 0.5 * x + 1.5 * y).collect();
        for (g, w) in delta(q).iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        // A module only the first adapter has keeps its own delta, weighted.
        for (g, w) in delta(&c[1]).iter().zip(delta(&one[1])) {
            assert!((g - 0.5 * w).abs() < 1e-6);
        }
    }
}
