//! `lora serve` end to end: the binary on a free loopback port with the llama fixture and the
//! adapters of `tests/fixtures/fuse_reference`, spoken to over plain HTTP (ureq). Greedy
//! output is compared with `lora generate`'s for the same prompt, model and adapter.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{copy_files, fixture, lora, s};
use serde_json::{Value, json};

/// A running server, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    /// `lora serve --model DIR --port 0 --device cpu ARGS`, once it listens.
    fn start(model: &Path, args: &[&str]) -> Self {
        let mut child = common::command()
            .args(["serve", "--model", s(model), "--port", "0", "--device", "cpu"])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start lora serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let base = loop {
            let line = lines.next().and_then(Result::ok).unwrap_or_else(|| panic!("the server ended before listening: {seen}"));
            if let Some(at) = line.find("listening on http://") {
                let url = line[at + "listening on ".len()..].split_whitespace().next().unwrap().trim_end_matches("/v1").to_string();
                break url;
            }
            seen.push_str(&line);
            seen.push('\n');
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST path body`: the status and the JSON answer.
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(ureq::post(&self.url(path)).send_string(&body.to_string()))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        answer(ureq::get(&self.url(path)).call())
    }

    /// The `choices[0]` text of a completion that did not stream.
    fn text(&self, path: &str, body: &Value) -> String {
        let (status, v) = self.post(path, body);
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        choice["message"]["content"].as_str().or(choice["text"].as_str()).unwrap().to_string()
    }

    /// A streamed completion: its chunks, in order, up to `[DONE]` (which must come).
    fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let response = ureq::post(&self.url(path)).send_string(&body.to_string()).expect("a streamed answer");
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        let mut chunks = Vec::new();
        for line in BufReader::new(response.into_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                return chunks;
            }
            chunks.push(serde_json::from_str(data).unwrap());
        }
        panic!("the stream ended without [DONE]: {chunks:?}");
    }

    /// Sends the headers of a POST declaring a `length`-byte body and its first kilobyte over
    /// a plain socket, then reads the answer (status and JSON body) without sending the rest.
    fn declared_over_limit(&self, path: &str, length: usize) -> (u16, Value) {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(self.base.trim_start_matches("http://")).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&[b' '; 1024]).unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // Read to the end of the JSON body: the server closes the connection after it.
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) => panic!("reading the answer: {e} (after {:?})", String::from_utf8_lossy(&answer)),
            }
        }
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {text:?}"));
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {head:?}"));
        (status, serde_json::from_str(body).unwrap_or_else(|_| panic!("{status}: not JSON: {body:?}")))
    }

    fn models(&self) -> Vec<String> {
        let (_, v) = self.get("/v1/models");
        v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let response = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("no answer: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text}")))
}

/// The text of a streamed completion's chunks, concatenated.
fn streamed_text(chunks: &[Value]) -> String {
    chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str().or(c["choices"][0]["text"].as_str())).collect()
}

fn adapter(name: &str) -> PathBuf {
    fixture("fuse_reference").join(name)
}

/// `lora generate`'s completion (stdout) for `prompt`, greedy, `max` tokens.
fn generated(prompt: &str, max: usize, extra: &[&str]) -> String {
    let llama = fixture("llama");
    let max = max.to_string();
    let out = lora(&[&["generate", "--model", s(&llama), "--prompt", prompt, "-m", &max, "--device", "cpu"][..], extra].concat());
    assert!(out.status.success(), "{}", common::stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn chat(prompt: &str, model: &str, max: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max})
}

fn adapters_args() -> Vec<String> {
    vec!["--adapter".into(), format!("peft={}", adapter("lora").display()), "--adapter".into(), format!("mlx={}", adapter("mlx").display())]
}

fn started(model: &Path, extra: &[&str]) -> Server {
    let args = adapters_args();
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    Server::start(model, &all)
}

#[test]
fn greedy_answers_equal_generates_for_the_base_and_each_adapter_streamed_or_not() {
    let server = started(&fixture("llama"), &[]);
    assert_eq!(server.models(), ["llama", "mlx", "peft"]);
    let prompt = "Tell me about llamas.";
    let base = generated(prompt, 24, &[]);
    let peft = generated(prompt, 24, &["--adapter-path", s(&adapter("lora"))]);
    let mlx = generated(prompt, 24, &["--adapter-path", s(&adapter("mlx"))]);
    assert!(base != peft && peft != mlx, "the adapters must change the output for this test to mean anything");
    for (model, expected) in [("llama", &base), ("peft", &peft), ("mlx", &mlx)] {
        assert_eq!(&server.text("/v1/chat/completions", &chat(prompt, model, 24)), expected, "{model}");
        let chunks = server.stream("/v1/chat/completions", &chat(prompt, model, 24));
        assert_eq!(&streamed_text(&chunks), expected, "{model}, streamed");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["model"] == model));
    }
    // mlx-lm's server takes the adapter in its own field.
    let body = json!({"adapters": "peft", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24});
    assert_eq!(server.text("/v1/chat/completions", &body), peft);

    // /v1/completions takes the raw prompt, as generate --ignore-chat-template.
    let raw = generated("Once upon a time", 16, &["--ignore-chat-template"]);
    let body = json!({"model": "llama", "prompt": "Once upon a time", "max_tokens": 16});
    let (status, v) = server.post("/v1/completions", &body);
    assert_eq!((status, v["choices"][0]["text"].as_str()), (200, Some(raw.as_str())));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(v["usage"]["prompt_tokens"].as_u64().unwrap() + 16));
    let mut body = body;
    body["stream_options"] = json!({"include_usage": true});
    let chunks = server.stream("/v1/completions", &body);
    assert_eq!(streamed_text(&chunks), raw);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 16);

    // A stop string ends the text before it; the rest of the answer is the same text.
    let cut: String = raw.chars().skip(6).take(3).collect();
    let mut body = json!({"prompt": "Once upon a time", "max_tokens": 16, "stop": [cut]});
    let (_, v) = server.post("/v1/completions", &body);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(raw.starts_with(text) && !text.contains(&cut) && raw[text.len()..].starts_with(&cut), "{text:?} of {raw:?}");
    body["stream"] = json!(true);
    assert_eq!(streamed_text(&server.stream("/v1/completions", &body)), text);
}

#[test]
fn concurrent_requests_with_different_adapters_each_get_their_own_output() {
    let server = started(&fixture("llama"), &["--max-concurrent", "4"]);
    let prompts = ["Hi there", "What is a llama?", "Count to three"];
    let expected: Vec<(String, String, Value)> = ["llama", "peft", "mlx"]
        .iter()
        .flat_map(|m| prompts.iter().map(move |p| (m.to_string(), p.to_string())))
        .map(|(m, p)| {
            let body = chat(&p, &m, 20);
            let text = server.text("/v1/chat/completions", &body);
            (m, text, body)
        })
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = expected
            .iter()
            .map(|(m, text, body)| {
                let server = &server;
                scope.spawn(move || {
                    let got = streamed_text(&server.stream("/v1/chat/completions", body));
                    assert_eq!(&got, text, "{m}");
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
fn adapters_load_and_unload_while_serving() {
    let server = Server::start(&fixture("llama"), &[]);
    let prompt = "Hello";
    let peft = generated(prompt, 12, &["--adapter-path", s(&adapter("lora"))]);
    let (status, v) = server.post("/v1/adapters", &json!({"name": "hot", "path": adapter("lora")}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(server.models(), ["hot", "llama"]);
    assert_eq!(server.text("/v1/chat/completions", &chat(prompt, "hot", 12)), peft);
    // Loading under the same name replaces it.
    let mlx = generated(prompt, 12, &["--adapter-path", s(&adapter("mlx"))]);
    assert_eq!(server.post("/v1/adapters", &json!({"name": "hot", "path": adapter("mlx")})).0, 200);
    assert_eq!(server.text("/v1/chat/completions", &chat(prompt, "hot", 12)), mlx);

    let (status, v) = answer(ureq::delete(&server.url("/v1/adapters/hot")).call());
    assert_eq!((status, v["deleted"].as_bool()), (200, Some(true)));
    assert_eq!(server.models(), ["llama"]);
    let (status, v) = server.post("/v1/chat/completions", &chat(prompt, "hot", 12));
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("model_not_found")));
    assert_eq!(answer(ureq::delete(&server.url("/v1/adapters/hot")).call()).0, 404);
    assert_eq!(answer(ureq::delete(&server.url("/v1/adapters/llama")).call()).0, 400);

    // A directory that is no adapter, or one that does not fit the model, is a 400 naming it.
    let (status, v) = server.post("/v1/adapters", &json!({"name": "bad", "path": fixture("llama")}));
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("llama"), "{v}");
    let (status, v) = server.post("/v1/adapters", &json!({"name": "bad"}));
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("path")));
    assert_eq!(server.models(), ["llama"]);
}

#[test]
fn watch_reloads_an_adapter_when_a_new_checkpoint_lands() {
    let run = tempfile::tempdir().unwrap();
    let watched = format!("live={}", run.path().display());
    let server = Server::start(&fixture("llama"), &["--watch", &watched]);
    assert_eq!(server.models(), ["llama"], "nothing is served until the run writes an adapter");
    let prompt = "Hello";
    let wait_for = |expected: &str| {
        let start = Instant::now();
        loop {
            let (status, v) = server.post("/v1/chat/completions", &chat(prompt, "live", 12));
            if status == 200 && v["choices"][0]["message"]["content"] == expected {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "the watched adapter was not (re)loaded: {status} {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    copy_files(&adapter("lora"), run.path());
    wait_for(&generated(prompt, 12, &["--adapter-path", s(&adapter("lora"))]));
    // A new checkpoint of the run: the same adapter at 8 times the strength (lora_alpha), its
    // weights file written again.
    let stronger = tempfile::tempdir().unwrap();
    copy_files(&adapter("lora"), stronger.path());
    let config_path = stronger.path().join("adapter_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["lora_alpha"] = json!(64);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let changed = generated(prompt, 12, &["--adapter-path", s(stronger.path())]);
    assert_ne!(changed, generated(prompt, 12, &["--adapter-path", s(&adapter("lora"))]), "the stronger adapter must change the output");
    std::fs::copy(&config_path, run.path().join("adapter_config.json")).unwrap();
    let weights = std::fs::read(stronger.path().join("adapter_model.safetensors")).unwrap();
    std::fs::write(run.path().join("adapter_model.safetensors"), &weights).unwrap();
    wait_for(&changed);
}

/// The llama fixture with a longer context (4096 positions), for long generations.
fn long_context_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_files(&fixture("llama"), dir.path());
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(4096);
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let server = Server::start(&fixture("llama"), &[]);
    let chat_url = server.url("/v1/chat/completions");
    let raw = |url: &str, body: &str| answer(ureq::post(url).send_string(body));
    let cases: Vec<(u16, Option<&str>, (u16, Value))> = vec![
        (400, None, raw(&chat_url, "{\"messages\": [")),
        (400, None, raw(&chat_url, "")),
        (400, Some("messages"), server.post("/v1/chat/completions", &json!({"messages": []}))),
        (400, Some("messages"), server.post("/v1/chat/completions", &json!({"messages": "hi"}))),
        (400, Some("prompt"), server.post("/v1/completions", &json!({"model": "llama"}))),
        (400, Some("max_tokens"), server.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}))),
        (400, Some("max_tokens"), server.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}))),
        (400, Some("temperature"), server.post("/v1/completions", &json!({"prompt": "x", "temperature": -2}))),
        (400, Some("top_p"), server.post("/v1/completions", &json!({"prompt": "x", "top_p": 7}))),
        (400, Some("n"), server.post("/v1/completions", &json!({"prompt": "x", "n": 3}))),
        (404, None, server.post("/v1/completions", &json!({"prompt": "x", "model": "gpt-4"}))),
        (404, None, server.get("/v1/nothing")),
        (405, None, server.get("/v1/chat/completions")),
    ];
    for (i, (status, param, (got, body))) in cases.into_iter().enumerate() {
        assert_eq!(got, status, "case {i}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "case {i}: {body}");
        assert_eq!(body["error"]["param"].as_str(), param, "case {i}: {body}");
    }
    // A prompt longer than the context (512 positions).
    let (status, v) = server.post("/v1/completions", &json!({"prompt": "llama ".repeat(600)}));
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("context_length_exceeded")), "{v}");
    // A body declared over the limit is refused before it is read: the answer comes while the
    // client has sent only its first kilobyte of 5 MiB.
    let (status, v) = server.declared_over_limit("/v1/completions", 5 << 20);
    assert_eq!((status, v["error"]["code"].as_str()), (413, Some("request_too_large")), "{v}");
    // Still serving.
    assert_eq!(server.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 2})).0, 200);
}

#[test]
fn an_api_key_is_required_when_set() {
    let server = Server::start(&fixture("llama"), &["--api-key", "sesame"]);
    let body = json!({"prompt": "x", "max_tokens": 2}).to_string();
    let (status, v) = answer(ureq::post(&server.url("/v1/completions")).send_string(&body));
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("invalid_api_key")));
    let (status, _) = answer(ureq::post(&server.url("/v1/completions")).set("Authorization", "Bearer wrong").send_string(&body));
    assert_eq!(status, 401);
    let (status, _) = answer(ureq::post(&server.url("/v1/completions")).set("Authorization", "Bearer sesame").send_string(&body));
    assert_eq!(status, 200);
    assert_eq!(answer(ureq::get(&server.url("/health")).call()).0, 200, "the health check needs no key");
}

#[test]
fn a_full_server_answers_503_and_a_client_that_leaves_frees_its_place() {
    let model = long_context_model();
    let server = Server::start(model.path(), &["--max-concurrent", "1", "--queue", "0"]);
    // A long generation holds the only place; it is read one chunk in, then abandoned.
    let body = json!({"prompt": "Once", "max_tokens": 4000, "ignore_eos": true, "stream": true}).to_string();
    let response = ureq::post(&server.url("/v1/completions")).send_string(&body).unwrap();
    let mut reader = BufReader::new(response.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let (status, v) = server.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!((status, v["error"]["code"].as_str()), (503, Some("server_overloaded")), "{v}");
    drop(reader);
    let start = Instant::now();
    loop {
        let (status, _) = server.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}));
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the abandoned generation kept its place");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_generation_past_the_timeout_ends_in_an_error() {
    let model = long_context_model();
    let server = Server::start(model.path(), &["--timeout", "0.2"]);
    let (status, v) = server.post("/v1/completions", &json!({"prompt": "Once", "max_tokens": 4000, "ignore_eos": true}));
    assert_eq!((status, v["error"]["code"].as_str()), (504, Some("timeout")), "{v}");
}

#[test]
fn sixty_four_concurrent_streams_all_complete_and_the_server_still_answers() {
    let server = Server::start(&fixture("llama"), &["--max-concurrent", "8", "--queue", "64"]);
    let body = |i: usize| json!({"prompt": format!("Story number {i}:"), "max_tokens": 8});
    let expected: Vec<String> = (0..4).map(|i| server.text("/v1/completions", &body(i))).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let (server, expected, body) = (&server, &expected, body(i % 4));
                scope.spawn(move || {
                    let chunks = server.stream("/v1/completions", &body);
                    assert_eq!(streamed_text(&chunks), expected[i % 4], "stream {i}");
                    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    assert_eq!(server.models(), ["llama"]);
    let mut health = String::new();
    ureq::get(&server.url("/health")).call().unwrap().into_reader().read_to_string(&mut health).unwrap();
    assert!(health.contains("ok"));
}
