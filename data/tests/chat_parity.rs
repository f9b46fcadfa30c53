//! Tokenizer and chat-template parity with transformers on the fixtures of
//! `tests/fixtures/` (made by `tests/fixtures/make_fixtures.py`).

use lora_testkit::fixture;

use lora_data::Tokenizer;
use serde_json::Value;

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap()).unwrap()
}

/// llama/mistral use a Llama 3.1-style template from chat_template.jinja; qwen2 a ChatML one
/// from tokenizer_config.json; qwen3 the ChatML one from chat_template.jinja.
const FIXTURES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

#[test]
fn chat_templates_render_exactly_as_transformers() {
    for name in FIXTURES {
        let tok = Tokenizer::from_dir(&fixture(name)).unwrap();
        let exp = expected(name);
        let chats = exp["chat"].as_array().unwrap();
        assert_eq!(chats.len(), 3, "{name}: fixture should hold three conversations");
        for case in chats {
            let add_gen = case["add_generation_prompt"].as_bool().unwrap();
            let tools = case.get("tools");
            let got = tok.apply_chat_template(&case["messages"], tools, add_gen).unwrap();
            assert_eq!(got, case["rendered"].as_str().unwrap(), "{name}: rendered template differs");
            let ids = tok.encode_chat(&case["messages"], tools, add_gen).unwrap();
            let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
            assert_eq!(ids, want, "{name}: chat token ids differ");
        }
    }
}

#[test]
fn raw_prompts_tokenize_with_the_tokenizers_bos() {
    for name in FIXTURES {
        let tok = Tokenizer::from_dir(&fixture(name)).unwrap();
        for case in expected(name)["prompts"].as_array().unwrap() {
            let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
            assert_eq!(tok.encode(case["prompt"].as_str().unwrap(), true).unwrap(), want, "{name}");
            let greedy: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();
            assert_eq!(tok.decode(&greedy, true).unwrap(), case["greedy_text"].as_str().unwrap(), "{name}");
        }
    }
}

#[test]
fn eos_ids_come_from_config_generation_config_and_tokenizer() {
    // llama: config and generation_config list [<|eot_id|>=7, <|eos|>=1]; the tokenizer's eos is <|eot_id|>.
    let tok = Tokenizer::from_dir(&fixture("llama")).unwrap();
    assert_eq!(tok.eos_ids(), [7, 1]);
    // qwen2: a single id, <|im_end|>.
    let tok = Tokenizer::from_dir(&fixture("qwen2")).unwrap();
    assert_eq!(tok.eos_ids(), [4]);
}

#[test]
fn template_errors_carry_the_raised_message() {
    let tok = Tokenizer::from_dir(&fixture("llama")).unwrap();
    // The Llama-style template refuses a conversation without a user message.
    let err = tok.apply_chat_template(&serde_json::json!([{"role": "system", "content": "x"}]), None, true).unwrap_err();
    assert!(err.to_string().contains("Conversations must contain a user message"), "{err}");
    let tok = Tokenizer::from_dir(&fixture("qwen2")).unwrap();
    let err = tok.apply_chat_template(&serde_json::json!([{"role": "robot", "content": "x"}]), None, true).unwrap_err();
    assert!(err.to_string().contains("Unknown role: robot"), "{err}");
}

#[test]
fn stream_decoder_reassembles_the_full_text() {
    let tok = Tokenizer::from_dir(&fixture("llama")).unwrap();
    let text = "Café, naïve, über, 東京 — unicode text";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = lora_data::StreamDecoder::new(&tok);
    let mut out = String::new();
    for id in ids {
        let piece = stream.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "a partial character was emitted: {piece:?}");
        out.push_str(&piece);
    }
    out.push_str(&stream.finish().unwrap());
    assert_eq!(out, text);
}
