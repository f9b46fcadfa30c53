//! Hostile resume files (issue 14, "Fuzzing and hostile files"): a resume file of a LoRA on the
//! llama fixture read back as `train --resume` reads it, after one of three kinds of damage:
//! random bytes of its safetensors header overwritten, or the file cut short (which the
//! checksum or the header's parse refuses first); its metadata values (format version,
//! optimizer, step count, progress) and tensors (values, sizes, dtypes, names) changed and the
//! checksum set again to match ([`lora_trainer::checkpoint::seal`]), so that `restore`'s later
//! checks are reached; the same changes with the checksum removed, as files of earlier versions
//! have none. Every case must end in an error, or in a state a run can step from (each moment
//! and accumulated gradient the size of its tensor, no more optimizer steps than iterations),
//! never a panic. The case count is fixed so CI's time stays bounded.

use std::collections::HashMap;

use burn::tensor::{DType, Device};
use lora_adapters::{AdapterSpec, FineTuneType, Init, Scale, add_adapters};
use lora_model::{CausalLm, Checkpoint, ModelConfig};
use lora_testkit::{budget, edits, fixture, insert, mutate};
use lora_trainer::checkpoint::{restore, seal, to_bytes};
use lora_trainer::optim::Slot;
use lora_trainer::{Optimizer, OptimizerConfig, OptimizerKind, State, trainable_tensors};
use proptest::prelude::*;
use proptest::sample::Index;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const CASES: u32 = 200;

fn adapted_model() -> CausalLm {
    let dir = fixture("llama");
    let config = ModelConfig::from_dir(&dir).unwrap();
    // On an autodiff device, as `train` loads it: restoring marks the adapters trainable.
    let mut model = CausalLm::load(&config, &Checkpoint::open(&dir).unwrap(), &Device::flex().autodiff(), DType::F32, |_| {}).unwrap();
    let spec = AdapterSpec {
        fine_tune_type: FineTuneType::Lora,
        num_layers: -1,
        keys: Some(vec!["q_proj".into(), "v_proj".into()]),
        rank: 4,
        scale: Scale::Alpha { alpha: 8.0, rslora: false },
        dropout: 0.0,
        init: Init::Kaiming,
    };
    add_adapters(&mut model, &spec, 0).unwrap();
    model
}

proptest! {
    #![proptest_config(budget(CASES))]

    #[test]
    fn a_mutated_resume_file_is_an_error_not_a_panic(edits in edits(1..6), cut in prop::option::of(any::<usize>())) {
        let mut model = adapted_model();
        let optimizer = OptimizerConfig { kind: OptimizerKind::Adamw, weight_decay: 0.01, ..Default::default() };
        let bytes = to_bytes(&model, &State::new(Optimizer::new(optimizer))).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let out = mutate(&bytes, &edits, header, None, cut);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trainer_state.safetensors");
        std::fs::write(&path, &out).unwrap();
        let _ = restore(&mut model, &path);
    }

    /// Metadata values and tensors changed, the checksum set again to match.
    #[test]
    fn a_resealed_resume_file_with_changed_values_is_an_error_not_a_panic(
        values in prop::collection::vec(value_edit(), 0..4),
        tensors in prop::collection::vec(tensor_edit(), 0..4),
    ) {
        restore_changed(&values, &tensors, true)?;
    }

    /// The same changes with no checksum, which `restore` takes as a file of an earlier version.
    #[test]
    fn a_resume_file_without_its_checksum_with_changed_values_is_an_error_not_a_panic(
        values in prop::collection::vec(value_edit(), 0..4),
        tensors in prop::collection::vec(tensor_edit(), 0..4),
    ) {
        restore_changed(&values, &tensors, false)?;
    }
}

/// The metadata keys `restore` reads besides the checksum.
const KEYS: &[&str] = &["format_version", "optimizer", "optimizer_steps", "progress"];

/// Values, each wrong for some key or right for another: numbers out of range or of the wrong
/// type, other versions, an optimizer of another kind or with hostile numbers, progress far
/// past any run or with a zero loss scale.
const HOSTILE: &[&str] = &[
    "",
    "0",
    "1",
    "2",
    "3",
    "-1",
    "1.5",
    "18446744073709551615",
    "18446744073709551616",
    "1e400",
    "NaN",
    "null",
    "true",
    "[]",
    "{}",
    "\"2\"",
    r#"{"kind":"sgd","weight_decay":0.0,"betas":[0.9,0.999],"eps":1e-8,"momentum":0.9}"#,
    r#"{"kind":"adamw","weight_decay":-1e308,"betas":[1.0,2.0],"eps":0.0,"momentum":0.0,"lora_plus_ratio":-16.0}"#,
    r#"{"iteration":18446744073709551615,"trained_tokens":18446744073709551615,"window":{"loss_sum":1e308,"iterations":18446744073709551615,"tokens":0,"seconds":-1.0},"lr":1e308}"#,
    r#"{"iteration":3,"trained_tokens":0,"window":{"loss_sum":0.0,"iterations":0,"tokens":0,"seconds":0.0},"lr":0.0,"loss_scale":{"scale":0.0,"good_steps":0},"best":{"iteration":9,"val_loss":-1.0},"last_eval":18446744073709551615}"#,
];

/// Bytes that JSON and numbers are made of, for insertion into a value.
const JSON: &[u8] = b"{}[]\":,-+.0123456789eE nultrfas\\\xff";

/// A change to one metadata value: the key ([`KEYS`]); the action (0: removed, 1: a
/// [`HOSTILE`] value put in its place, else its bytes overwritten, inserted into and cut); the
/// hostile value; the overwrites, insertion and cut.
type ValueEdit = (usize, u8, usize, Vec<(usize, u8)>, (usize, Vec<u8>), Option<usize>);

fn value_edit() -> impl Strategy<Value = ValueEdit> {
    (0..KEYS.len(), 0..4u8, 0..HOSTILE.len(), edits(0..4), insert(JSON, 10), prop::option::of(any::<usize>()))
}

fn edit_value(metadata: &mut HashMap<String, String>, edit: &ValueEdit) {
    let (key, action, hostile, edits, insert, cut) = edit;
    let key = KEYS[*key];
    match action {
        0 => {
            metadata.remove(key);
        }
        1 => {
            metadata.insert(key.to_string(), HOSTILE[*hostile].to_string());
        }
        _ => {
            let old = metadata.get(key).cloned().unwrap_or_default();
            let new = mutate(old.as_bytes(), edits, usize::MAX, Some(insert), *cut);
            metadata.insert(key.to_string(), String::from_utf8_lossy(&new).into_owned());
        }
    }
}

/// A resume file's tensors: name, dtype, shape and bytes, in name order.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Dtypes a tensor is given in place of F32 (its bytes kept, its shape fitted to them).
const RETYPES: &[Dtype] = &[Dtype::F16, Dtype::BF16, Dtype::U8, Dtype::I32, Dtype::F64];

/// A change to one tensor: which; the action (0: values overwritten, NaN and infinities among
/// what may come out; 1: cut to fewer values, or none; 2: more values; 3: removed; 4: another
/// dtype; else renamed, so that one is missing and another is extra); the overwrites; a count
/// for cutting or adding; the dtype ([`RETYPES`]).
type TensorEdit = (Index, u8, Vec<(usize, u8)>, usize, usize);

fn tensor_edit() -> impl Strategy<Value = TensorEdit> {
    (any::<Index>(), 0..6u8, edits(1..6), any::<usize>(), 0..RETYPES.len())
}

fn edit_tensor(tensors: &mut Tensors, edit: &TensorEdit) {
    let (which, action, edits, count, retype) = edit;
    if tensors.is_empty() {
        return;
    }
    let i = which.index(tensors.len());
    if *action == 3 {
        tensors.remove(i);
        return;
    }
    let (name, dtype, shape, bytes) = &mut tensors[i];
    let size = dtype.bitsize() / 8;
    match action {
        0 => *bytes = mutate(bytes, edits, usize::MAX, None, None),
        1 => bytes.truncate(count % (bytes.len() / size + 1) * size),
        2 => bytes.resize(bytes.len() + (count % 4 + 1) * size, 0x7f),
        4 => {
            *dtype = RETYPES[*retype];
            let size = dtype.bitsize() / 8;
            bytes.truncate(bytes.len() / size * size);
        }
        _ => name.push_str(".x"),
    }
    *shape = vec![bytes.len() / (dtype.bitsize() / 8)];
}

/// A resume file of `model` as a run leaves it part-way: AdamW moments and half-accumulated
/// gradients for every tensor (so each kind of tensor is there to be changed), 3 iterations
/// and optimizer steps done.
fn resume_file(model: &CausalLm) -> Vec<u8> {
    let optimizer = OptimizerConfig { kind: OptimizerKind::Adamw, weight_decay: 0.01, ..Default::default() };
    let mut state = State::new(Optimizer::new(optimizer));
    let tensors = trainable_tensors(model);
    state.optimizer.slots = tensors.iter().map(|t| Slot { first: Some(t.clone().inner()), second: Some((t.clone() * 2.0).inner()) }).collect();
    state.optimizer.steps = 3;
    state.accumulated = Some(tensors.iter().map(|t| t.clone().inner()).collect());
    state.progress.iteration = 3;
    to_bytes(model, &state).unwrap()
}

/// The resume file taken apart: its metadata without the checksum, and its tensors.
fn take_apart(bytes: &[u8]) -> (HashMap<String, String>, Tensors) {
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap_or_default();
    metadata.remove("crc32");
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut tensors: Tensors = st.tensors().into_iter().map(|(name, v)| (name, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    tensors.sort();
    (metadata, tensors)
}

/// A resume file with `values` and `tensors` changed, sealed or without a checksum, restored
/// onto a fresh model: an error, or a state a run can step from.
fn restore_changed(values: &[ValueEdit], tensors: &[TensorEdit], sealed: bool) -> Result<(), TestCaseError> {
    let mut model = adapted_model();
    let (mut metadata, mut parts) = take_apart(&resume_file(&model));
    for edit in values {
        edit_value(&mut metadata, edit);
    }
    for edit in tensors {
        edit_tensor(&mut parts, edit);
    }
    let views = parts.iter().map(|(name, dtype, shape, bytes)| (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).expect("shape fits bytes")));
    let mut bytes = safetensors::serialize(views, Some(metadata)).expect("a valid safetensors file");
    if sealed {
        bytes = seal(&bytes).expect("sealed");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trainer_state.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    if let Ok(state) = restore(&mut model, &path) {
        let sizes: Vec<usize> = trainable_tensors(&model).iter().map(|t| t.dims()[0]).collect();
        let slots = &state.optimizer.slots;
        prop_assert!(slots.is_empty() || slots.len() == sizes.len(), "{} moment slots for {} tensors", slots.len(), sizes.len());
        for (slot, n) in slots.iter().zip(&sizes) {
            for moment in [&slot.first, &slot.second].into_iter().flatten() {
                prop_assert_eq!(moment.dims()[0], *n);
            }
        }
        if let Some(gradients) = &state.accumulated {
            prop_assert_eq!(gradients.len(), sizes.len());
            for (g, n) in gradients.iter().zip(&sizes) {
                prop_assert_eq!(g.dims()[0], *n);
            }
        }
        prop_assert!(state.optimizer.steps <= state.progress.iteration, "{} steps in {} iterations", state.optimizer.steps, state.progress.iteration);
    }
    Ok(())
}
