//! 20 steps of DPO (sigmoid and IPO losses, strings and conversations) and ORPO against TRL's
//! `DPOTrainer` and `ORPOTrainer` with PEFT (`tests/fixtures/preference_reference`, made by its
//! `make_preference_reference.py`): the same initial adapter (A and B non-zero, so the policy
//! differs from the reference from the first step), the same pairs in file order, AdamW,
//! clipping at 1. The token ids must equal TRL's; each step's loss and the metrics TRL logs,
//! and the final adapter, must match within 1e-4 in f32 on the CPU.

mod common;

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{DType, Device};
use common::{fixtures, largest_adapter_difference};
use lora_adapters::{format, set_adapters};
use lora_data::{Batcher, ReadOptions, Tokenizer, collate, load_jsonl, pair_lengths, pair_rows};
use lora_model::{CausalLm, Checkpoint, ModelConfig};
use lora_trainer::preference::loss_and_gradients;
use lora_trainer::{DpoLoss, Objective, Optimizer, OptimizerConfig, OptimizerKind, apply_step, clip_global_norm};
use serde_json::Value;

fn reference() -> (PathBuf, Value) {
    let dir = fixtures().join("preference_reference");
    let expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (dir, expected)
}

#[test]
fn dpo_sigmoid_matches_trl() {
    run("dpo_sigmoid", Objective::Dpo { beta: 0.1, loss: DpoLoss::Sigmoid }, false);
}

#[test]
fn dpo_ipo_matches_trl() {
    run("dpo_ipo", Objective::Dpo { beta: 0.1, loss: DpoLoss::Ipo }, false);
}

/// Conversations rendered through the chat template.
#[test]
fn dpo_on_conversations_matches_trl() {
    run("dpo_sigmoid_chat", Objective::Dpo { beta: 0.1, loss: DpoLoss::Sigmoid }, false);
}

#[test]
fn orpo_matches_trl() {
    run("orpo", Objective::Orpo { beta: 0.1 }, false);
}

/// With gradient checkpointing (each block run again in backward) the same numbers.
#[test]
fn dpo_with_gradient_checkpointing_matches_trl() {
    run("dpo_sigmoid", Objective::Dpo { beta: 0.1, loss: DpoLoss::Sigmoid }, true);
}

/// Runs the 20 steps of `name` and compares everything.
fn run(name: &str, objective: Objective, recompute: bool) {
    let (dir, expected) = reference();
    let want = &expected["runs"][name];
    let base = fixtures().join("llama");
    let device = Device::flex().autodiff();
    let config = ModelConfig::from_dir(&base).unwrap();
    let mut model = CausalLm::load(&config, &Checkpoint::open(&base).unwrap(), &device, DType::F32, |_| {}).unwrap().no_grad();
    let initial = format::load(&dir.join("initial")).unwrap();
    set_adapters(&mut model, &initial.weights, 0.0, &initial.path).unwrap();
    model.set_training(true);

    // The pairs, tokenized as TRL tokenized them.
    let tokenizer = Tokenizer::from_dir(&base).unwrap();
    let data = want["hyperparameters"]["data"].as_str().unwrap();
    let examples = load_jsonl(&dir.join(data), &tokenizer, &ReadOptions { preference: true, ..Default::default() }).unwrap().examples;
    let rows = want["tokens"].as_array().unwrap();
    assert_eq!(examples.len(), 2 * rows.len());
    let ids = |v: &Value| -> Vec<u32> { serde_json::from_value(v.clone()).unwrap() };
    if name != "orpo" {
        for (i, row) in rows.iter().enumerate() {
            let prompt = ids(&row["prompt_ids"]);
            for (example, side) in examples[2 * i..2 * i + 2].iter().zip(["chosen_ids", "rejected_ids"]) {
                let whole: Vec<u32> = prompt.iter().copied().chain(ids(&row[side])).collect();
                assert_eq!(example.tokens, whole, "row {i} {side}: tokens differ from TRL's");
                assert_eq!(example.offset(), prompt.len(), "row {i} {side}: the prompt ends elsewhere than TRL's");
            }
        }
    }

    let batcher = Batcher::new(&pair_lengths(&examples), 2, false, 0).unwrap();
    let steps = want["steps"].as_array().unwrap();
    let hp = &want["hyperparameters"];
    let mut optimizer =
        Optimizer::new(OptimizerConfig { kind: OptimizerKind::Adamw, weight_decay: hp["weight_decay"].as_f64().unwrap(), ..Default::default() });
    let lr = hp["learning_rate"].as_f64().unwrap();
    let mut worst = 0f64;
    for (step, want) in steps.iter().enumerate() {
        let pairs = batcher.indices(step);
        assert_eq!(serde_json::to_value(pairs).unwrap(), want["rows"], "step {step}: the batch differs from TRL's");
        let batch = collate(&examples, &pair_rows(pairs), 2048);
        let (scored, mut flat) = loss_and_gradients(&mut model, &batch, objective, recompute, 1.0);
        let mut got = vec![("loss", scored.loss)];
        got.extend(scored.metrics.iter().copied());
        for (key, value) in got {
            let reference = want[key].as_f64().unwrap_or_else(|| panic!("TRL logs no {key}"));
            let diff = (value - reference).abs() / reference.abs().max(1.0);
            worst = worst.max(diff);
            assert!(diff < 1e-4, "{name} step {step} {key}: {value} against TRL's {reference}");
        }
        clip_global_norm(&mut flat, hp["max_grad_norm"].as_f64().unwrap());
        apply_step(&mut model, &mut optimizer, flat, lr);
    }
    eprintln!("{name}: worst relative difference of the loss and metrics over {} steps: {worst:.2e}", steps.len());

    let max = largest_adapter_difference(&model, &dir.join("final").join(name));
    eprintln!("{name}: largest adapter weight difference against TRL + PEFT: {max:.2e}");
    assert!(max < 1e-4, "{name}: final adapter differs by {max}");
}
