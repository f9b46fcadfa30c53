//! Hostile data and tokenizer files (issue 14, "Fuzzing and hostile files"): JSONL rows of
//! every format, the chat template and the tokenizer files of the llama fixture with random
//! bytes overwritten, inserted or cut off, read as `train` and `generate` read them. Every case
//! must end in `Ok` or an error, never a panic. The case count is fixed so CI's time stays
//! bounded.

use lora_data::{ReadOptions, Tokenizer, load_jsonl};
use lora_testkit::{budget, fixture};
use proptest::prelude::*;
use serde_json::json;

const CASES: u32 = 200;

/// Rows of the formats `train` reads.
const ROWS: &[&str] = &[
    r#"{"text": "Hello there, general."}"#,
    r#"{"prompt": "What is the capital of France?", "completion": "Paris."}"#,
    r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#,
    r#"{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "tools": [{"type": "function", "function": {"name": "add"}}]}"#,
    r#"{"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome."}"#,
    r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go."}]}"#,
    r#"{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go."}]}"#,
];

fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
    lora_testkit::edits(0..6)
}

fn insert() -> impl Strategy<Value = (usize, Vec<u8>)> {
    lora_testkit::insert(b"{}[]\":,\\\n\r\t 0-9eE.nulltrue\xff\xfe\x00", 12)
}

/// `bytes` with `edits` written anywhere, `insert` put in, then cut to `cut` bytes.
fn mutate(bytes: &[u8], edits: &[(usize, u8)], insert: &(usize, Vec<u8>), cut: Option<usize>) -> Vec<u8> {
    lora_testkit::mutate(bytes, edits, usize::MAX, Some(insert), cut)
}

proptest! {
    #![proptest_config(budget(CASES))]

    /// JSONL files of mutated rows, with and without --mask-prompt and bad-row skipping.
    #[test]
    fn mutated_jsonl_rows_are_errors_not_panics(
        row in 0..ROWS.len(),
        edits in edits(),
        insert in insert(),
        cut in prop::option::of(any::<usize>()),
        mask_prompt in any::<bool>(),
        skip in any::<bool>(),
        preference in any::<bool>(),
    ) {
        let tokenizer = Tokenizer::from_dir(&fixture("llama")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        let mut bytes = mutate(ROWS[row].as_bytes(), &edits, &insert, cut);
        bytes.push(b'\n');
        bytes.extend_from_slice(ROWS[(row + 1) % ROWS.len()].as_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let _ = load_jsonl(&path, &tokenizer, &ReadOptions { mask_prompt, skip_bad_rows: skip, preference, ..Default::default() });
    }

    /// A mutated chat template, rendered on a conversation.
    #[test]
    fn a_mutated_chat_template_is_an_error_not_a_panic(edits in edits(), insert in insert(), cut in prop::option::of(any::<usize>())) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"] {
            if fixture("llama").join(f).exists() {
                std::fs::copy(fixture("llama").join(f), dir.path().join(f)).unwrap();
            }
        }
        let template = std::fs::read(fixture("llama").join("chat_template.jinja")).unwrap();
        std::fs::write(dir.path().join("chat_template.jinja"), mutate(&template, &edits, &insert, cut)).unwrap();
        if let Ok(tokenizer) = Tokenizer::from_dir(dir.path()) {
            let messages = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]);
            let _ = tokenizer.encode_chat(&messages, None, true);
        }
    }

    /// Mutated tokenizer files (tokenizer.json, tokenizer_config.json or the
    /// generation_config.json its end-of-sequence ids come from), then encoding and decoding
    /// with what loaded.
    #[test]
    fn mutated_tokenizer_files_are_errors_not_panics(which in 0..3usize, edits in edits(), insert in insert(), cut in prop::option::of(any::<usize>())) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", "chat_template.jinja"] {
            if fixture("llama").join(f).exists() {
                std::fs::copy(fixture("llama").join(f), dir.path().join(f)).unwrap();
            }
        }
        let name = match which {
            0 => "tokenizer_config.json",
            1 => "generation_config.json",
            _ => "tokenizer.json",
        };
        let original = std::fs::read(fixture("llama").join(name)).unwrap();
        std::fs::write(dir.path().join(name), mutate(&original, &edits, &insert, cut)).unwrap();
        if let Ok(tokenizer) = Tokenizer::from_dir(dir.path())
            && let Ok(ids) = tokenizer.encode("Hello there, general Kenobi.", true)
        {
            let _ = tokenizer.decode(&ids, true);
        }
    }
}

/// Found by `mutated_tokenizer_files_are_errors_not_panics`: a tokenizer.json cut inside its
/// decoder section panicked inside the tokenizers crate ("Helper: EOF while parsing a string")
/// instead of being an error naming the file; so did a decoder of the wrong shape.
#[test]
fn a_tokenizer_json_cut_in_its_decoder_is_an_error_naming_the_file() {
    let text = std::fs::read_to_string(fixture("llama").join("tokenizer.json")).unwrap();
    let at = text.find("\"decoder\"").expect("the fixture has a decoder") + 30;
    let mut wrong_shape: serde_json::Value = serde_json::from_str(&text).unwrap();
    wrong_shape["decoder"] = json!({"type": "Sequence", "decoders": [{"type": 7}]});
    for bytes in [text[..at].to_string(), wrong_shape.to_string()] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), bytes).unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
