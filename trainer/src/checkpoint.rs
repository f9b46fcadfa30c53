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
use crate::params::{Trainable, for_each_trainable, trainable_names, trainable_tensors};
use crate::run::{Progress, State};

/// The resume file's name in the adapter directory.
pub const STATE_FILE: &str = "trainer_state.safetensors";

/// Version 2 keys every tensor by its module path (`param.model.layers.0.self_attn.q_proj.lora_A`,
/// `optimizer.<same>.first`), as PEFT and mlx-lm key theirs; version 1 keyed them by position
/// (`param.0`), and is still read.
const VERSION: &str = "2";

fn host(t: &Tensor<1>) -> Vec<f32> {
    t.clone().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}

/// The resume file's bytes for `model`'s trainable tensors and `state`.
pub fn to_bytes(model: &CausalLm, state: &State) -> Result<Vec<u8>, TrainError> {
    let mut tensors: Vec<(String, Vec<f32>)> = Vec::new();
    let keys = trainable_names(model);
    for (key, t) in keys.iter().zip(trainable_tensors(model).iter()) {
        tensors.push((format!("param.{key}"), host(t)));
    }
    for (key, slot) in keys.iter().zip(&state.optimizer.slots) {
        if let Some(m) = &slot.first {
            tensors.push((format!("optimizer.{key}.first"), host(m)));
        }
        if let Some(v) = &slot.second {
            tensors.push((format!("optimizer.{key}.second"), host(v)));
        }
    }
    for (key, g) in keys.iter().zip(state.accumulated.iter().flatten()) {
        tensors.push((format!("accumulated.{key}"), host(g)));
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

/// `bytes`, a safetensors file, with its checksum set to what the file now holds, as
/// [`to_bytes`] sets it. For the resume-file fuzz target (`tests/fuzz.rs`) only: it changes
/// the metadata and the tensors of a resume file, then seals the result, so that the checks of
/// [`restore`] after the checksum are reached. A run never calls it: a damaged file must stay
/// refused.
#[doc(hidden)]
pub fn seal(bytes: &[u8]) -> Result<Vec<u8>, TrainError> {
    let error = |e: safetensors::SafeTensorError| TrainError::State(e.to_string());
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(error)?;
    let st = SafeTensors::deserialize(bytes).map_err(error)?;
    let mut metadata = header.metadata().clone().unwrap_or_default();
    let views = st.tensors();
    let sum = checksum(&metadata, views.iter().map(|(n, v)| (n.as_str(), v.data())));
    metadata.insert(CHECKSUM.to_string(), sum);
    safetensors::serialize(views, Some(metadata)).map_err(error)
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
    let version = field("format_version")?;
    if version != VERSION && version != "1" {
        return Err(invalid(format!("format_version {version} is not {VERSION} (or 1)")));
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
    let keys: Vec<String> = if version == "1" { (0..current.len()).map(|i| i.to_string()).collect() } else { trainable_names(model) };
    let mut params = Vec::with_capacity(current.len());
    for (key, t) in keys.iter().zip(&current) {
        let name = format!("param.{key}");
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
    let expected: std::collections::HashSet<String> = keys.iter().map(|k| format!("param.{k}")).collect();
    // safetensors lists names in no fixed order: name the first extra one in sorted order.
    let mut names = st.names();
    names.sort_unstable();
    if let Some(extra) = names.into_iter().find(|n| n.starts_with("param.") && !expected.contains(*n)) {
        return Err(invalid(format!("holds {extra}, which the model has no trainable tensor for: the adapters differ from the run that saved this file")));
    }
    // One optimizer step at most per iteration; a count beyond would overflow in the steps to come.
    if steps > progress.iteration {
        return Err(invalid(format!("optimizer_steps {steps} is more than the {} iterations done: the file is damaged", progress.iteration)));
    }

    // The optimizer's moments and any half-accumulated gradients, each of its tensor's size,
    // read before any tensor is replaced: a size that differs, or gradients for only some
    // tensors, would otherwise fail the first optimizer step (issue 14: the resume-file fuzz
    // target reaches here with files sealed again, or without a checksum, after mutation).
    let sized = |name: String, len: usize| -> Result<Option<Vec<f32>>, TrainError> {
        match read(&name)? {
            Some(v) if v.len() != len => Err(invalid(format!("{name} has {} values, its tensor {len}: the file is damaged", v.len()))),
            v => Ok(v),
        }
    };
    let inner = |v: Vec<f32>| tensor(v).inner();
    let mut slots = Vec::new();
    for (key, t) in keys.iter().zip(&current) {
        let len = t.dims()[0];
        let first = sized(format!("optimizer.{key}.first"), len)?.map(inner);
        let second = sized(format!("optimizer.{key}.second"), len)?.map(inner);
        slots.push(Slot { first, second });
    }
    if slots.iter().all(|s| s.first.is_none() && s.second.is_none()) {
        slots.clear();
    }
    let accumulated: Vec<Tensor<1>> = keys
        .iter()
        .zip(&current)
        .map_while(|(key, t)| sized(format!("accumulated.{key}"), t.dims()[0]).transpose())
        .map(|r| r.map(inner))
        .collect::<Result<_, _>>()?;
    // Saved for every tensor or for none: a step adds one gradient to each.
    if !accumulated.is_empty() && accumulated.len() != keys.len() {
        return Err(invalid(format!("holds accumulated gradients for {} of its {} tensors: the file is damaged", accumulated.len(), keys.len())));
    }
    let accumulated = (!accumulated.is_empty()).then_some(accumulated);

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
    Ok(State { optimizer: Optimizer { config, steps, slots }, accumulated, progress })
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use lora_adapters::{AdapterSpec, FineTuneType, Init, Scale, add_adapters};
    use lora_model::{Checkpoint, Geometry};

    use super::*;
    use crate::optim::OptimizerKind;

    fn model(keys: &[&str], seed: u64) -> CausalLm {
        let config = Geometry::named("tiny").expect("tiny").config();
        let mut model = CausalLm::load(&config, &Checkpoint::random(&config), &Device::flex().autodiff(), DType::F32, |_| {}).unwrap();
        let spec = AdapterSpec {
            fine_tune_type: FineTuneType::Dora,
            num_layers: -1,
            keys: Some(keys.iter().map(|k| k.to_string()).collect()),
            rank: 2,
            scale: Scale::Alpha { alpha: 4.0, rslora: false },
            dropout: 0.0,
            init: Init::Gaussian,
        };
        add_adapters(&mut model, &spec, seed).unwrap();
        model
    }

    fn state(model: &CausalLm) -> State {
        let mut state = State::new(Optimizer::new(OptimizerConfig { kind: OptimizerKind::Adamw, ..Default::default() }));
        // Moments of the tensors' own sizes, each distinct, so a mix-up shows.
        state.optimizer.slots = trainable_tensors(model)
            .iter()
            .enumerate()
            .map(|(i, t)| Slot { first: Some((t.clone() + i as f64).inner()), second: Some((t.clone() * 2.0).inner()) })
            .collect();
        state.optimizer.steps = 7;
        state.progress.iteration = 7;
        state
    }

    fn write(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(STATE_FILE);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn values(model: &CausalLm) -> Vec<Vec<f32>> {
        trainable_tensors(model).iter().map(host).collect()
    }

    /// Issue 15: the resume file keys every tensor by its module path (format 2), and files of
    /// format 1 (keyed by position) still resume.
    #[test]
    fn resume_files_are_keyed_by_module_path_and_old_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let saved = model(&["q_proj", "v_proj"], 1);
        let bytes = to_bytes(&saved, &state(&saved)).unwrap();
        let names = SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(str::to_string).collect::<Vec<_>>();
        assert!(names.contains(&"param.model.layers.1.self_attn.v_proj.lora_magnitude_vector".to_string()), "{names:?}");
        assert!(names.contains(&"optimizer.model.layers.0.self_attn.q_proj.lora_B.second".to_string()), "{names:?}");

        let mut fresh = model(&["q_proj", "v_proj"], 2);
        let restored = restore(&mut fresh, &write(dir.path(), &bytes)).unwrap();
        assert_eq!(values(&fresh), values(&saved));
        assert_eq!(restored.optimizer.steps, 7);
        let first = |s: &State| s.optimizer.slots.iter().map(|s| host(&Tensor::from_inner(s.first.clone().unwrap()))).collect::<Vec<_>>();
        assert_eq!(first(&restored), first(&state(&saved)));

        // The same file in format 1: names by position, no checksum.
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let keys = trainable_names(&saved);
        let old_name = |n: &str| keys.iter().enumerate().fold(n.to_string(), |n, (i, k)| n.replace(&format!(".{k}"), &format!(".{i}")));
        let data: Vec<(String, Vec<u8>)> = st.names().iter().map(|&n| (old_name(n), st.tensor(n).unwrap().data().to_vec())).collect();
        let views = data.iter().map(|(n, b)| (n.clone(), TensorView::new(Dtype::F32, vec![b.len() / 4], b).unwrap()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut meta = meta.metadata().clone().unwrap();
        meta.remove(CHECKSUM);
        meta.insert("format_version".into(), "1".into());
        let v1 = safetensors::serialize(views, Some(meta)).unwrap();
        assert!(SafeTensors::deserialize(&v1).unwrap().names().contains(&"param.0"));
        let mut fresh = model(&["q_proj", "v_proj"], 3);
        restore(&mut fresh, &write(dir.path(), &v1)).unwrap();
        assert_eq!(values(&fresh), values(&saved));
    }

    /// A resume file of other adapters is refused naming the tensor, and nothing changes.
    #[test]
    fn a_resume_file_of_other_adapters_names_the_module() {
        let dir = tempfile::tempdir().unwrap();
        let saved = model(&["q_proj", "v_proj"], 1);
        let path = write(dir.path(), &to_bytes(&saved, &state(&saved)).unwrap());
        let mut other = model(&["q_proj", "k_proj"], 2);
        let before = values(&other);
        let e = restore(&mut other, &path).unwrap_err().to_string();
        assert!(e.contains("param.model.layers.0.self_attn.k_proj.lora_A is missing"), "{e}");
        assert_eq!(values(&other), before);
        let mut fewer = model(&["q_proj"], 2);
        let e = restore(&mut fewer, &path).unwrap_err().to_string();
        assert!(e.contains("holds param.model.layers.0.self_attn.v_proj"), "{e}");
    }

    /// A resume file's tensors (name and bytes, all F32, in name order) and its metadata.
    type Parts = (Vec<(String, Vec<u8>)>, HashMap<String, String>);

    fn parts(bytes: &[u8]) -> Parts {
        let st = SafeTensors::deserialize(bytes).unwrap();
        let mut tensors: Vec<(String, Vec<u8>)> = st.names().iter().map(|&n| (n.to_string(), st.tensor(n).unwrap().data().to_vec())).collect();
        tensors.sort();
        let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
        (tensors, meta.metadata().clone().unwrap())
    }

    /// The file of `parts`, its checksum set to what it holds.
    fn sealed(parts: Parts) -> Vec<u8> {
        let (tensors, meta) = parts;
        let views = tensors.iter().map(|(n, b)| (n.clone(), TensorView::new(Dtype::F32, vec![b.len() / 4], b).unwrap()));
        seal(&safetensors::serialize(views, Some(meta)).unwrap()).unwrap()
    }

    /// Issue 14: a resume file whose checksum is right but whose optimizer moment or
    /// accumulated gradients do not fit their tensors, or that counts more optimizer steps than
    /// iterations, is refused before anything changes, where the first optimizer step failed
    /// on the moment's shape, ran out of gradients, or overflowed the count.
    #[test]
    fn moments_gradients_and_steps_that_do_not_fit_the_run_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let saved = model(&["q_proj"], 1);
        let mut s = state(&saved);
        s.accumulated = Some(trainable_tensors(&saved).iter().map(|t| t.clone().inner()).collect());
        let bytes = to_bytes(&saved, &s).unwrap();
        let names = trainable_names(&saved);
        let moment = format!("optimizer.{}.first", names[1]);
        let gradient = format!("accumulated.{}", names[names.len() - 1]);

        let (mut short, meta) = parts(&bytes);
        short.iter_mut().filter(|(n, _)| *n == moment).for_each(|(_, b)| b.truncate(4));
        let (mut partial, meta_partial) = parts(&bytes);
        partial.retain(|(n, _)| *n != gradient);
        let (tensors, mut counted) = parts(&bytes);
        counted.insert("optimizer_steps".into(), "8".into());
        let cases = [
            (sealed((short, meta)), format!("{moment} has 1 values")),
            (sealed((partial, meta_partial)), format!("accumulated gradients for {} of its {} tensors", names.len() - 1, names.len())),
            (sealed((tensors, counted)), "optimizer_steps 8 is more than the 7 iterations".to_string()),
        ];
        for (file, needle) in cases {
            let mut fresh = model(&["q_proj"], 2);
            let before = values(&fresh);
            let e = restore(&mut fresh, &write(dir.path(), &file)).unwrap_err().to_string();
            assert!(e.contains(&needle), "{e}");
            assert_eq!(values(&fresh), before, "nothing changes");
        }
        // Taken apart and sealed again as it was, the file resumes, gradients and all.
        let mut fresh = model(&["q_proj"], 2);
        let restored = restore(&mut fresh, &write(dir.path(), &sealed(parts(&bytes)))).unwrap();
        assert_eq!(restored.accumulated.as_ref().map(Vec::len), Some(names.len()));
        assert_eq!(values(&fresh), values(&saved));
    }
}
