//! The resume file: one safetensors file holding the trainable tensors, the optimizer's
//! moments, any half-accumulated gradients, and (in its metadata) the optimizer's step count
//! and the run's [`Progress`]. Being one file written atomically, it is always whole: a run
//! killed at any moment resumes from the last one saved.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{DType, Tensor, TensorData};
use lora_model::CausalLm;
use lora_model::checkpoint::{decode_floats, encode_floats};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::TrainError;
use crate::optim::{Optimizer, OptimizerConfig, Slot};
use crate::params::{Trainable, for_each_trainable, trainable_tensors};
use crate::run::{Progress, State};

/// The resume file's name in the adapter directory.
pub const STATE_FILE: &str = "trainer_state.safetensors";

const VERSION: &str = "1";

fn host(t: &Tensor<1>) -> Vec<f32> {
    t.clone().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}

/// The resume file's bytes for `model`'s trainable tensors and `state`.
pub fn to_bytes(model: &CausalLm, state: &State) -> Result<Vec<u8>, TrainError> {
    let mut tensors: Vec<(String, Vec<f32>)> = Vec::new();
    for (i, t) in trainable_tensors(model).iter().enumerate() {
        tensors.push((format!("param.{i}"), host(t)));
    }
    for (i, slot) in state.optimizer.slots.iter().enumerate() {
        if let Some(m) = &slot.first {
            tensors.push((format!("optimizer.{i}.first"), host(m)));
        }
        if let Some(v) = &slot.second {
            tensors.push((format!("optimizer.{i}.second"), host(v)));
        }
    }
    for (i, g) in state.accumulated.iter().flatten().enumerate() {
        tensors.push((format!("accumulated.{i}"), host(g)));
    }
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, v)| encode_floats(v, Dtype::F32)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, v), b)| TensorView::new(Dtype::F32, vec![v.len()], b).map(|view| (name.clone(), view)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrainError::State(e.to_string()))?;
    let mut metadata = HashMap::new();
    metadata.insert("format_version".to_string(), VERSION.to_string());
    metadata.insert("optimizer".to_string(), serde_json::to_string(&state.optimizer.config).expect("serializable"));
    metadata.insert("optimizer_steps".to_string(), state.optimizer.steps.to_string());
    metadata.insert("progress".to_string(), serde_json::to_string(&state.progress).expect("serializable"));
    let sum = checksum(&metadata, tensors.iter().map(|(n, _)| n.as_str()).zip(bytes.iter().map(Vec::as_slice)));
    metadata.insert(CHECKSUM.to_string(), sum);
    safetensors::serialize(views, Some(metadata)).map_err(|e| TrainError::State(e.to_string()))
}

/// The metadata key of the file's checksum.
const CHECKSUM: &str = "crc32";

/// CRC-32 of the metadata (but the checksum) and every tensor's name and bytes, each in name
/// order, as hex: a flipped bit anywhere in what is restored changes it.
fn checksum<'a>(metadata: &HashMap<String, String>, tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut hasher = crc32fast::Hasher::new();
    let mut keys: Vec<&String> = metadata.keys().filter(|k| *k != CHECKSUM).collect();
    keys.sort();
    for k in keys {
        for part in [k.as_bytes(), b"\0", metadata[k].as_bytes(), b"\0"] {
            hasher.update(part);
        }
    }
    let mut tensors: Vec<(&str, &[u8])> = tensors.collect();
    tensors.sort_by_key(|(n, _)| *n);
    for (name, data) in tensors {
        hasher.update(name.as_bytes());
        hasher.update(&(data.len() as u64).to_le_bytes());
        hasher.update(data);
    }
    format!("{:08x}", hasher.finalize())
}

/// Reads the resume file at `path`: puts its trainable tensors on `model` (whose adapters
/// must have the shapes of the run that saved it) and returns the state to continue from.
pub fn restore(model: &mut CausalLm, path: &Path) -> Result<State, TrainError> {
    let invalid = |message: String| TrainError::Resume { path: path.to_path_buf(), message };
    let bytes = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    // Files of earlier versions carry no checksum and are taken as they are.
    if let Some(stored) = meta.get(CHECKSUM) {
        let names = st.names();
        let views: Vec<(&str, &[u8])> = names.iter().filter_map(|&n| st.tensor(n).ok().map(|v| (n, v.data()))).collect();
        let actual = checksum(&meta, views.into_iter());
        if &actual != stored {
            return Err(invalid(format!("damaged: its checksum is {actual}, it was saved as {stored}; resume from an earlier checkpoint or start again")));
        }
    }
    let field = |key: &str| meta.get(key).ok_or_else(|| invalid(format!("metadata has no {key:?}: not a lora resume file")));
    if field("format_version")? != VERSION {
        return Err(invalid(format!("format_version {} is not {VERSION}", field("format_version")?)));
    }
    let config: OptimizerConfig = serde_json::from_str(field("optimizer")?).map_err(|e| invalid(format!("optimizer: {e}")))?;
    let steps: usize = field("optimizer_steps")?.parse().map_err(|_| invalid("optimizer_steps is not a number".into()))?;
    let progress: Progress = serde_json::from_str(field("progress")?).map_err(|e| invalid(format!("progress: {e}")))?;
    let device = model.device();
    let read = |name: &str| -> Result<Option<Vec<f32>>, TrainError> {
        match st.tensor(name) {
            Ok(view) if view.dtype() == Dtype::F32 => Ok(decode_floats(view.data(), Dtype::F32)),
            Ok(view) => Err(invalid(format!("{name}: dtype {:?}, expected F32", view.dtype()))),
            Err(_) => Ok(None),
        }
    };
    let tensor = |v: Vec<f32>| {
        let n = v.len();
        Tensor::<1>::from_data(TensorData::new(v, [n]), (&device, DType::F32))
    };

    // The trainable tensors, checked against the model before any is replaced.
    let current = trainable_tensors(model);
    let mut params = Vec::with_capacity(current.len());
    for (i, t) in current.iter().enumerate() {
        let name = format!("param.{i}");
        let v = read(&name)?.ok_or_else(|| invalid(format!("{name} is missing: the adapters differ from the run that saved this file")))?;
        if v.len() != t.dims()[0] {
            return Err(invalid(format!(
                "{name} has {} values, the model's tensor {}: the adapters differ from the run that saved this file",
                v.len(),
                t.dims()[0]
            )));
        }
        params.push(v);
    }
    if read(&format!("param.{}", current.len()))?.is_some() {
        return Err(invalid(format!("holds more than the model's {} trainable tensors: the adapters differ from the run that saved this file", current.len())));
    }
    let mut params = params.into_iter();
    for_each_trainable(model, |t| {
        let v = params.next().expect("checked above");
        match t {
            Trainable::A(p) | Trainable::B(p) => {
                let shape = p.val().dims();
                let value = tensor(v).reshape(shape).require_grad();
                *p = Param::initialized(p.id, value);
            }
            Trainable::Magnitude(p) => *p = Param::initialized(p.id, tensor(v).require_grad()),
        }
    });

    let inner = |v: Vec<f32>| tensor(v).inner();
    let mut slots = Vec::new();
    for i in 0..current.len() {
        let first = read(&format!("optimizer.{i}.first"))?.map(inner);
        let second = read(&format!("optimizer.{i}.second"))?.map(inner);
        slots.push(Slot { first, second });
    }
    if slots.iter().all(|s| s.first.is_none() && s.second.is_none()) {
        slots.clear();
    }
    let accumulated: Vec<Tensor<1>> =
        (0..current.len()).map_while(|i| read(&format!("accumulated.{i}")).transpose()).map(|r| r.map(inner)).collect::<Result<_, _>>()?;
    let accumulated = (!accumulated.is_empty()).then_some(accumulated);
    Ok(State { optimizer: Optimizer { config, steps, slots }, accumulated, progress })
}
