//! Issue 16, item 2: `--mask-prompt` on chats trains on every assistant turn. On a template with
//! transformers' `{% generation %}` blocks the targets are exactly transformers'
//! `return_assistant_tokens_mask` (tests/fixtures/assistant_masks, made by its
//! make_assistant_masks.py over the qwen2 fixture's tokenizer).

use std::io::Write as _;

use lora_data::{ReadOptions, Tokenizer, load_jsonl};
use lora_testkit::fixture;
use serde_json::{Value, json};

#[test]
fn generation_blocks_give_transformers_assistant_masks() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"] {
        std::fs::copy(fixture("qwen2").join(file), dir.path().join(file)).unwrap();
    }
    std::fs::copy(fixture("assistant_masks").join("chat_template.jinja"), dir.path().join("chat_template.jinja")).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(tok.chat_template().unwrap().has_generation_blocks());

    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture("assistant_masks").join("expected.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    let data = dir.path().join("train.jsonl");
    let mut file = std::fs::File::create(&data).unwrap();
    for case in cases {
        writeln!(file, "{}", json!({"messages": case["messages"]})).unwrap();
    }
    drop(file);

    let masked = load_jsonl(&data, &tok, &ReadOptions { mask_prompt: true, ..Default::default() }).unwrap();
    assert_eq!(masked.examples.len(), cases.len());
    for (i, (case, ex)) in cases.iter().zip(&masked.examples).enumerate() {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let mask: Vec<u8> = serde_json::from_value(case["assistant_masks"].clone()).unwrap();
        assert_eq!(ex.tokens, ids, "case {i}: token ids");
        let ours: Vec<u8> = (0..ids.len()).map(|j| u8::from(ex.targets.iter().any(|r| r.contains(&j)))).collect();
        assert_eq!(ours, mask, "case {i}: assistant mask");
        // The rendered text without the blocks is what the template writes unmarked.
        let plain = tok.apply_chat_template(&case["messages"], None, false).unwrap();
        assert_eq!(tok.encode(&plain, false).unwrap(), ids, "case {i}: unmarked render");
    }

    // Unmasked, the same rows train on everything.
    let plain = load_jsonl(&data, &tok, &ReadOptions::default()).unwrap();
    assert!(plain.examples.iter().all(|ex| ex.targets.len() == 1 && ex.targets[0] == (0..ex.tokens.len())));
}
