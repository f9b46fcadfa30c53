//! OpenAI's wire format: the requests `lora serve` reads, the errors it answers with, and the
//! completion and chunk objects it writes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// An error as OpenAI's API writes it: an HTTP status and `{"error": {message, type, param,
/// code}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is malformed or a value is out of range.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param, code: None }
    }

    /// `status` with an `invalid_request_error` of `code`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind: "invalid_request_error", param: None, code: Some(code) }
    }

    /// 500: the server failed the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: None }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `prompt` of `/v1/completions`: a string, or a list holding one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptText {
    One(String),
    Many(Vec<String>),
}

/// The fields both completion endpoints take. Fields OpenAI defines that do not change the
/// result here (`user`, `presence_penalty` at 0, ...) are ignored, as unknown fields are.
#[derive(Debug, Deserialize)]
pub struct Request {
    /// The base model's name or an adapter's.
    pub model: Option<String>,
    /// An adapter's name, as mlx-lm's server takes `adapters`; wins over `model`.
    #[serde(alias = "adapters")]
    pub adapter: Option<String>,
    /// Chat: the conversation.
    pub messages: Option<Value>,
    /// Chat: tools for the template.
    pub tools: Option<Value>,
    /// Completions: the raw prompt.
    pub prompt: Option<PromptText>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub logprobs: Option<Value>,
    /// Generate past end-of-sequence tokens up to `max_tokens` (llama.cpp's and vLLM's
    /// extension, for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// What the engine needs of a request, checked.
#[derive(Debug, Clone)]
pub struct Checked {
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// Stop strings per request, as OpenAI allows.
const MAX_STOPS: usize = 4;

/// Characters of one stop string (each token's check is quadratic in it).
const MAX_STOP_CHARS: usize = 512;

impl Request {
    /// Parses a request body; a body that is not JSON or has a field of the wrong type is a
    /// 400 naming the problem.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the request body is not a valid request: {e}"), None))
    }

    /// The sampling and length settings, each checked against its range.
    pub fn check(&self) -> Result<Checked, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
        }
        if self.logprobs.as_ref().is_some_and(|v| !matches!(v, Value::Bool(false) | Value::Null)) {
            return Err(ApiError::invalid("logprobs are not supported by this server", Some("logprobs")));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            Some(n) => return Err(ApiError::invalid(format!("max_tokens must be at least 1 (got {n})"), Some("max_tokens"))),
        };
        let temperature = self.temperature.unwrap_or(0.0);
        if !temperature.is_finite() || !(0.0..=100.0).contains(&temperature) {
            return Err(ApiError::invalid(format!("temperature must be between 0 and 100 (got {temperature})"), Some("temperature")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(format!("top_p must be in (0, 1] (got {top_p})"), Some("top_p")));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => return Err(ApiError::invalid(format!("top_k must be 0 or more (got {k})"), Some("top_k"))),
        };
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !repetition_penalty.is_finite() || repetition_penalty <= 0.0 {
            return Err(ApiError::invalid(format!("repetition_penalty must be > 0 (got {repetition_penalty})"), Some("repetition_penalty")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS {
            return Err(ApiError::invalid(format!("at most {MAX_STOPS} stop strings (got {})", stop.len()), Some("stop")));
        }
        if let Some(long) = stop.iter().find(|s| s.chars().count() > MAX_STOP_CHARS) {
            return Err(ApiError::invalid(format!("a stop string is at most {MAX_STOP_CHARS} characters (got {})", long.chars().count()), Some("stop")));
        }
        Ok(Checked {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            repetition_penalty: repetition_penalty as f32,
            seed: self.seed.map(|s| s as u64),
            stop,
            ignore_eos: self.ignore_eos,
        })
    }
}

/// `messages` with each content given as a list of parts (`[{"type": "text", "text": ...}]`,
/// as OpenAI's SDKs may send it) joined into one string, as chat templates expect; a part
/// that is not text is a 400.
pub fn text_messages(mut messages: Vec<Value>) -> Result<Value, ApiError> {
    for m in &mut messages {
        let Some(Value::Array(parts)) = m.get("content") else { continue };
        let mut text = String::new();
        for part in parts {
            match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => text.push_str(t),
                (kind, _) => {
                    return Err(ApiError::invalid(format!("only text content is supported (got a part of type {})", kind.unwrap_or("none")), Some("messages")));
                }
            }
        }
        m["content"] = Value::String(text);
    }
    Ok(Value::Array(messages))
}

/// Which endpoint a request came through: the response objects differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// Why a generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// `usage`.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// The whole response of a request that did not stream.
pub fn completion(endpoint: Endpoint, id: &str, created: u64, model: &str, text: &str, finish: Finish, usage: Value) -> Value {
    let choice = match endpoint {
        Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish.as_str()}),
        Endpoint::Completions => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str()}),
    };
    let object = match endpoint {
        Endpoint::Chat => "chat.completion",
        Endpoint::Completions => "text_completion",
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage})
}

/// One streamed chunk: `text` (a chat chunk's first one also carries the role), or the last
/// one with `finish` and no text.
pub fn chunk(endpoint: Endpoint, id: &str, created: u64, model: &str, text: Option<&str>, first: bool, finish: Option<Finish>) -> Value {
    let finish = finish.map(Finish::as_str);
    let (object, choice) = match endpoint {
        Endpoint::Chat => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            ("chat.completion.chunk", json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}))
        }
        Endpoint::Completions => ("text_completion", json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})),
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
}

/// The usage chunk streamed last when `stream_options.include_usage` asks for it.
pub fn usage_chunk(endpoint: Endpoint, id: &str, created: u64, model: &str, usage: Value) -> Value {
    let object = if endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str) -> Result<Checked, ApiError> {
        Request::parse(body.as_bytes())?.check()
    }

    #[test]
    fn bad_bodies_and_values_are_400s_naming_the_field() {
        assert!(Request::parse(b"{not json").unwrap_err().message.contains("not a valid request"));
        assert!(Request::parse(br#"{"max_tokens": "ten"}"#).unwrap_err().message.contains("invalid type"));
        for (body, param) in [
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_completion_tokens": -5}"#, "max_tokens"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"logprobs": true}"#, "logprobs"),
            (r#"{"stop": ["a", "b", "c", "d", "e"]}"#, "stop"),
            (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
            (&format!(r#"{{"stop": "{}"}}"#, "x".repeat(513)), "stop"),
        ] {
            let e = check(body).unwrap_err();
            assert_eq!((e.status, e.param), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {}", e.message);
        }
    }

    #[test]
    fn defaults_are_greedy_and_unknown_fields_are_ignored() {
        let c = check(r#"{"model": "m", "user": "x", "presence_penalty": 0, "stop": "\n", "seed": 7}"#).unwrap();
        assert_eq!((c.temperature, c.top_p, c.top_k, c.max_tokens, c.seed), (0.0, 1.0, 0, None, Some(7)));
        assert_eq!(c.stop, ["\n"]);
    }

    #[test]
    fn content_parts_are_joined_and_other_parts_refused() {
        let m = text_messages(vec![
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "system", "content": "s"}),
        ])
        .unwrap();
        assert_eq!(m, json!([{"role": "user", "content": "ab"}, {"role": "system", "content": "s"}]));
        let e = text_messages(vec![json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]})]).unwrap_err();
        assert!(e.message.contains("image_url") && e.param == Some("messages"), "{}", e.message);
    }

    mod fuzz {
        use lora_testkit::{budget, edits, insert, mutate};
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(budget(500))]

            /// A request body mutated anywhere (issue 13: nothing a client sends crashes the
            /// server): parsing and checking end in a request or a 4xx, never a panic.
            #[test]
            fn a_mutated_request_body_is_a_request_or_a_4xx(
                edits in edits(0..6),
                insert in insert(b"{}[]\":,-0123456789e.truefalsnul \\\xff", 12),
                cut in prop::option::of(any::<usize>()),
            ) {
                let body = br#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "stop": ["\n", "User:"], "seed": 3, "stream": true, "stream_options": {"include_usage": true}}"#;
                let bytes = mutate(body, &edits, usize::MAX, Some(&insert), cut);
                match Request::parse(&bytes) {
                    Ok(r) => {
                        if let Err(e) = r.check() {
                            prop_assert!(e.status.is_client_error());
                        }
                        if let Some(Value::Array(m)) = r.messages && m.iter().all(Value::is_object) {
                            let _ = text_messages(m);
                        }
                    }
                    Err(e) => prop_assert!(e.status.is_client_error()),
                }
            }
        }
    }

    #[test]
    fn chunks_have_openais_shape() {
        let first = chunk(Endpoint::Chat, "id", 1, "m", Some(""), true, None);
        assert_eq!(first["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        let last = chunk(Endpoint::Chat, "id", 1, "m", None, false, Some(Finish::Length));
        assert_eq!((last["choices"][0]["delta"].clone(), last["choices"][0]["finish_reason"].clone()), (json!({}), json!("length")));
        let text = chunk(Endpoint::Completions, "id", 1, "m", Some("ab"), false, None);
        assert_eq!((text["object"].as_str(), text["choices"][0]["text"].as_str()), (Some("text_completion"), Some("ab")));
    }
}
