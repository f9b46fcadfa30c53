//! `lora serve`: an OpenAI-compatible HTTP server (axum on tokio) for a base model and any
//! number of adapters, picked per request, loaded and unloaded while serving, and reloaded
//! when a training run writes a new checkpoint (`--watch`).
//!
//! Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
//! `stream: true` as server-sent events), `POST /v1/adapters` `{name, path}`,
//! `DELETE /v1/adapters/{name}`, `GET /health`. Generation runs on one engine thread
//! ([`engine`]); the HTTP side checks requests, holds a bounded number of them, and turns the
//! engine's events into OpenAI's objects.

mod api;
mod engine;
mod stop;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use clap::Args;
use lora_data::Tokenizer;
use lora_model::{Checkpoint, ModelConfig};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use api::{ApiError, Endpoint, PromptText, Request};
use engine::{Command, Control, Engine, Event, Job, Limits, Names, Prompt, Ticket};

use crate::device::{DTypeArg, DeviceArg, compute_dtype, select};
use crate::load::load_model;
use crate::quantize::QuantArgs;

/// Flags of `lora serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model directory: a Hugging Face checkpoint (config.json, safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The base model's name in requests and /v1/models [default: the directory's name].
    #[arg(long, value_name = "NAME")]
    pub model_name: Option<String>,
    /// An adapter to serve under NAME (a PEFT or mlx-lm adapter directory); repeatable.
    #[arg(long, value_name = "NAME=DIR")]
    pub adapter: Vec<String>,
    /// Serve the adapter a training run writes into DIR under NAME, reloaded whenever a new
    /// checkpoint lands; repeatable.
    #[arg(long, value_name = "NAME=DIR")]
    pub watch: Vec<String>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub host: String,
    /// Port to bind (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080, value_name = "PORT")]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request [env: LORA_API_KEY].
    #[arg(long, value_name = "KEY", env = "LORA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Tokens generated when a request gives no max_tokens.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_tokens: usize,
    /// Sequences generated at once (each advances one token per round).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_concurrent: usize,
    /// Requests held waiting beyond those running; more are answered 503.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub queue: usize,
    /// Seconds a request may take, waiting and generating.
    #[arg(long, default_value_t = 600.0, value_name = "S")]
    pub timeout: f64,
    /// Positions a sequence may reach when config.json has no max_position_embeddings.
    #[arg(long, default_value_t = 8192, value_name = "N")]
    pub context: usize,
    /// Backend: auto (GPU through wgpu, else CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto, value_name = "D")]
    pub device: DeviceArg,
    /// Compute dtype; default f32 on the CPU, bf16 or f16 on a GPU.
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<DTypeArg>,
    #[command(flatten)]
    pub quant: QuantArgs,
}

/// Largest request body: a conversation of about a million characters.
const MAX_BODY: usize = 4 << 20;

/// How often `--watch` looks at its directories.
const WATCH_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone)]
struct AppState {
    commands: mpsc::UnboundedSender<Command>,
    names: Names,
    base: Arc<str>,
    held: Arc<AtomicUsize>,
    capacity: usize,
    timeout: Duration,
    api_key: Option<Arc<str>>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.max_concurrent == 0 || args.max_tokens == 0 || args.context < 2 {
        bail!("--max-concurrent and --max-tokens must be at least 1, --context at least 2");
    }
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .with_context(|| format!("--timeout {}: not a number of seconds > 0", args.timeout))?;
    let adapters = args.adapter.iter().map(|a| named_dir("--adapter", a)).collect::<Result<Vec<_>>>()?;
    let watched = args.watch.iter().map(|a| named_dir("--watch", a)).collect::<Result<Vec<_>>>()?;
    let dir = &args.model;
    if !dir.is_dir() {
        bail!("--model {}: not a directory", dir.display());
    }
    let base_name = match &args.model_name {
        Some(n) => n.clone(),
        None => dir.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "model".into()),
    };
    let config = ModelConfig::from_dir(dir)?;
    let tokenizer = Tokenizer::from_dir(dir)?.for_model(config.vocab_size)?;
    let device = select(args.device)?;
    let dtype = compute_dtype(&device, args.dtype, config.checkpoint_dtype.as_deref())?;
    let checkpoint = Checkpoint::open(dir)?;
    let model = load_model(&config, &checkpoint, &device, dtype, args.quant.load_options(&config)?)?;
    drop(checkpoint);
    let limits = Limits { context: config.max_positions.unwrap_or(args.context), default_max_tokens: args.max_tokens, max_active: args.max_concurrent };
    let engine = Engine::new(base_name.clone(), model, &adapters, tokenizer, limits)?;

    let (commands, receiver) = mpsc::unbounded_channel();
    let state = AppState {
        commands: commands.clone(),
        names: engine.names(),
        base: base_name.as_str().into(),
        held: Arc::new(AtomicUsize::new(0)),
        capacity: args.max_concurrent + args.queue,
        timeout,
        api_key: args.api_key.as_deref().map(Into::into),
    };
    let engine_thread = std::thread::Builder::new().name("lora-engine".into()).spawn(move || engine.run(receiver)).context("starting the engine thread")?;
    for (name, dir) in watched {
        let commands = commands.clone();
        std::thread::Builder::new().name(format!("lora-watch-{name}")).spawn(move || watch(&name, &dir, &commands)).context("starting a watcher")?;
    }
    drop(commands);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await.with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        eprintln!(
            "lora serve: {base_name} on {device:?} ({dtype:?}), listening on http://{addr}/v1{}",
            if state.api_key.is_some() { " (API key required)" } else { "" }
        );
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")
    })?;
    drop(engine_thread);
    Ok(())
}

/// `NAME=DIR` of `--adapter` and `--watch`.
fn named_dir(flag: &str, value: &str) -> Result<(String, PathBuf)> {
    match value.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok((name.to_string(), PathBuf::from(dir))),
        _ => bail!("{flag} {value}: expected NAME=DIR"),
    }
}

fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/health", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(declared_size))
        .with_state(state)
}

/// A body whose declared length is over the limit is answered 413 at once, before any of it
/// is read, and the connection closed: a client still sending reads the answer instead of a
/// reset halfway through. A body of no declared length (chunked) is cut at the limit as it
/// is read ([`DefaultBodyLimit`]).
async fn declared_size(request: axum::extract::Request, next: Next) -> Response {
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        let mut response =
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", format!("the request body is over the limit (at most {MAX_BODY} bytes)"))
                .into_response();
        response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        return response;
    }
    next.run(request).await
}

async fn authorize(State(state): State<AppState>, request: axum::extract::Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(&**key) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "a valid API key is required: Authorization: Bearer KEY").into_response();
        }
    }
    next.run(request).await
}

async fn models(State(state): State<AppState>) -> Response {
    let names = state.names.read().unwrap_or_else(|e| e.into_inner()).clone();
    let data: Vec<Value> = names
        .iter()
        .map(|(id, l)| {
            json!({"id": id, "object": "model", "created": l.created, "owned_by": "lora", "root": &*state.base,
                   "parent": if l.path.is_some() { json!(&*state.base) } else { Value::Null }})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn chat(state: State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    complete(state, Endpoint::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(state: State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    complete(state, Endpoint::Completions, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// A 413 for a body over the limit, else a 400, in OpenAI's shape.
fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "invalid_body" };
    ApiError::new(status, code, format!("{} (at most {MAX_BODY} bytes)", e.body_text()))
}

async fn complete(State(state): State<AppState>, endpoint: Endpoint, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let request = Request::parse(&body.map_err(body_error)?)?;
    let settings = request.check()?;
    let prompt = match endpoint {
        Endpoint::Chat => match request.messages {
            Some(Value::Array(m)) if !m.is_empty() && m.iter().all(Value::is_object) => Prompt::Chat { messages: api::text_messages(m)?, tools: request.tools },
            _ => return Err(ApiError::invalid("messages must be a non-empty list of message objects", Some("messages"))),
        },
        Endpoint::Completions => match request.prompt {
            Some(PromptText::One(p)) => Prompt::Text(p),
            Some(PromptText::Many(mut v)) if v.len() == 1 => Prompt::Text(v.remove(0)),
            Some(PromptText::Many(_)) => return Err(ApiError::invalid("prompt must be one string (a list of several is not supported)", Some("prompt"))),
            None => return Err(ApiError::invalid("prompt is required", Some("prompt"))),
        },
    };
    let model = request.adapter.or(request.model).unwrap_or_else(|| state.base.to_string());
    if !state.names.read().unwrap_or_else(|e| e.into_inner()).contains_key(&model) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "model_not_found", format!("the model {model} does not exist")));
    }
    let ticket = Ticket::take(&state.held, state.capacity).ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_overloaded", format!("the server holds {} requests already; retry later", state.capacity))
    })?;
    let (events, mut receiver) = mpsc::unbounded_channel();
    let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
    let job = Job { model: model.clone(), prompt, settings, deadline: Instant::now() + state.timeout, events, ticket };
    state.commands.send(Command::Generate(Box::new(job))).map_err(|_| stopped())?;
    let prompt_tokens = match receiver.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(e)) => return Err(e),
        _ => return Err(stopped()),
    };
    let id = format!("{}-{}", if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" }, unique());
    let created = engine::now();
    if request.stream {
        let first = api::chunk(endpoint, &id, created, &model, Some(""), true, None).to_string();
        let stream = Streamed { endpoint, id, created, model, include_usage, receiver, queued: VecDeque::from([first]), done: false };
        let events = futures_util::stream::unfold(stream, |mut s| async move { s.next().await.map(|e| (Ok::<_, Infallible>(e), s)) });
        return Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response());
    }
    let mut text = String::new();
    loop {
        match receiver.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { finish, completion_tokens, .. }) => {
                let usage = api::usage(prompt_tokens, completion_tokens);
                return Ok(axum::Json(api::completion(endpoint, &id, created, &model, &text, finish, usage)).into_response());
            }
            Some(Event::Failed(e)) => return Err(e),
            Some(Event::Started { .. }) | None => return Err(stopped()),
        }
    }
}

fn stopped() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "engine_stopped", "the generation engine has stopped")
}

/// A process-unique id suffix.
fn unique() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}{n:04x}", std::process::id())
}

/// A streamed response: the engine's events as OpenAI chunks, then `[DONE]`.
struct Streamed {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    receiver: mpsc::UnboundedReceiver<Event>,
    /// Server-sent events' data ready to go.
    queued: VecDeque<String>,
    done: bool,
}

impl Streamed {
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(data) = self.queued.pop_front() {
                return Some(SseEvent::default().data(data));
            }
            if self.done {
                return None;
            }
            let (e, id, created, model) = (self.endpoint, self.id.as_str(), self.created, self.model.as_str());
            match self.receiver.recv().await {
                Some(Event::Text(t)) => self.queued.push_back(api::chunk(e, id, created, model, Some(&t), false, None).to_string()),
                Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                    self.queued.push_back(api::chunk(e, id, created, model, None, false, Some(finish)).to_string());
                    if self.include_usage {
                        self.queued.push_back(api::usage_chunk(e, id, created, model, api::usage(prompt_tokens, completion_tokens)).to_string());
                    }
                    self.end();
                }
                Some(Event::Failed(err)) => {
                    self.queued.push_back(err.body().to_string());
                    self.end();
                }
                Some(Event::Started { .. }) | None => {
                    self.queued.push_back(stopped().body().to_string());
                    self.end();
                }
            }
        }
    }

    fn end(&mut self) {
        self.queued.push_back("[DONE]".into());
        self.done = true;
    }
}

async fn load_adapter(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let body: Value =
            serde_json::from_slice(&body.map_err(body_error)?).map_err(|e| ApiError::invalid(format!("the request body is not JSON: {e}"), None))?;
        let field = |k: &'static str| {
            body.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or_else(|| ApiError::invalid(format!("{k} (a string) is required"), Some(k)))
        };
        let (name, path) = (field("name")?.to_string(), PathBuf::from(field("path")?));
        let (reply, answer) = oneshot::channel();
        state.commands.send(Command::Control(Control::Load { name: name.clone(), path, reply: Some(reply) })).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())??;
        Ok::<_, ApiError>(axum::Json(json!({"id": name, "object": "model", "loaded": true})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn unload_adapter(State(state): State<AppState>, axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let run = async {
        let (reply, answer) = oneshot::channel();
        state.commands.send(Command::Control(Control::Unload { name: name.clone(), reply })).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())??;
        Ok::<_, ApiError>(axum::Json(json!({"id": name, "object": "model", "deleted": true})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `--watch`: loads the adapter in `dir` as `name` whenever its weights file changes and then
/// holds still for one look (a checkpoint being written is not read half-way); a load that
/// fails is reported and tried again at the next change.
fn watch(name: &str, dir: &Path, commands: &mpsc::UnboundedSender<Command>) {
    let stamp = |dir: &Path| {
        ["adapters.safetensors", "adapter_model.safetensors"].iter().find_map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
    };
    let (mut loaded, mut seen) = (None, None);
    loop {
        let now = stamp(dir);
        if now.is_some() && now == seen && now != loaded {
            let load = Control::Load { name: name.to_string(), path: dir.to_path_buf(), reply: None };
            if commands.send(Command::Control(load)).is_err() {
                return;
            }
            loaded = now;
        }
        seen = now;
        std::thread::sleep(WATCH_EVERY);
        if commands.is_closed() {
            return;
        }
    }
}
