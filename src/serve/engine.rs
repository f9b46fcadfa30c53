//! The thread that owns the model: it takes requests from the HTTP side, keeps up to
//! `max_active` sequences going at once, and advances each by one token per round, so
//! requests join and leave between tokens and no request waits for another to finish.
//!
//! Each adapter is the base model with that adapter attached: burn's tensors are shared
//! handles, so the adapters' models share the base's weights and hold only their own
//! matrices. A sequence keeps the model it started with, so loading or unloading an adapter
//! never disturbs a generation under way.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use lora_data::{StreamDecoder, Tokenizer};
use lora_model::{CausalLm, Decoding, Sampler, SamplingConfig};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::api::{ApiError, Checked, Finish};
use super::stop::StopFilter;

/// What a request asks to continue.
#[derive(Debug)]
pub enum Prompt {
    /// `/v1/chat/completions`: rendered through the model's chat template.
    Chat { messages: Value, tools: Option<Value> },
    /// `/v1/completions`: tokenized as `generate --ignore-chat-template` does.
    Text(String),
}

/// One generation request.
#[derive(Debug)]
pub struct Job {
    /// The base model's name or an adapter's.
    pub model: String,
    pub prompt: Prompt,
    pub settings: Checked,
    /// When the request gives up: waiting and generating together.
    pub deadline: Instant,
    pub events: mpsc::UnboundedSender<Event>,
    /// Its place among the requests the server holds; released when the job is dropped.
    #[expect(dead_code, reason = "held for its Drop, never read")]
    pub ticket: Ticket,
}

/// What the engine tells a request, in this order: `Started` or `Failed`, then `Text`s, then
/// `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Started { prompt_tokens: usize },
    Text(String),
    Done { finish: Finish, prompt_tokens: usize, completion_tokens: usize },
    Failed(ApiError),
}

/// Adapter management, answered through `reply` (none for the watcher's reloads).
#[derive(Debug)]
pub enum Control {
    Load { name: String, path: PathBuf, reply: Option<oneshot::Sender<Result<(), ApiError>>> },
    Unload { name: String, reply: oneshot::Sender<Result<(), ApiError>> },
}

#[derive(Debug)]
pub enum Command {
    Generate(Box<Job>),
    Control(Control),
}

/// A served model as `/v1/models` lists it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub created: u64,
    /// The adapter's directory; `None` for the base.
    pub path: Option<PathBuf>,
}

/// The names the server answers to, shared with the HTTP side.
pub type Names = Arc<RwLock<BTreeMap<String, Listed>>>;

/// A held place among the requests the server accepts at once (running and waiting); the
/// place is freed when the ticket is dropped, however the request ends.
#[derive(Debug)]
pub struct Ticket(Arc<AtomicUsize>);

impl Ticket {
    /// A place if fewer than `capacity` are held.
    pub fn take(held: &Arc<AtomicUsize>, capacity: usize) -> Option<Self> {
        held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < capacity).then_some(n + 1)).ok().map(|_| Self(held.clone()))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The engine's fixed settings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Positions a sequence may reach, prompt and completion together.
    pub context: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Sequences advanced together.
    pub max_active: usize,
}

pub struct Engine {
    base: String,
    models: HashMap<String, CausalLm>,
    names: Names,
    tokenizer: Arc<Tokenizer>,
    limits: Limits,
    seeds: u64,
}

/// A running generation.
struct Sequence {
    job: Box<Job>,
    model: CausalLm,
    decoding: Decoding,
    text: StreamDecoder<Arc<Tokenizer>>,
    stop: StopFilter,
    prompt_tokens: usize,
    generated: usize,
    max_tokens: usize,
}

impl Engine {
    /// An engine serving `base` under the name `base_name`, with `adapters` (name, directory)
    /// attached to copies of it. An adapter that does not load is an error naming its file.
    pub fn new(base_name: String, base: CausalLm, adapters: &[(String, PathBuf)], tokenizer: Tokenizer, limits: Limits) -> anyhow::Result<Self> {
        let names: Names = Arc::new(RwLock::new(BTreeMap::from([(base_name.clone(), Listed { created: now(), path: None })])));
        let mut engine = Self { base: base_name.clone(), models: HashMap::from([(base_name, base)]), names, tokenizer: Arc::new(tokenizer), limits, seeds: 0 };
        for (name, path) in adapters {
            engine.load(name, path).map_err(|e| anyhow::anyhow!("--adapter {name}={}: {}", path.display(), e.message))?;
        }
        Ok(engine)
    }

    /// The names served, for the HTTP side.
    pub fn names(&self) -> Names {
        self.names.clone()
    }

    /// Runs until every sender of `commands` is gone.
    pub fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut waiting: VecDeque<Box<Job>> = VecDeque::new();
        let mut active: Vec<Sequence> = Vec::new();
        loop {
            if active.is_empty() && waiting.is_empty() {
                match commands.blocking_recv() {
                    Some(c) => self.handle(c, &mut waiting),
                    None => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(c) => self.handle(c, &mut waiting),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) if active.is_empty() && waiting.is_empty() => return,
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            }
            while active.len() < self.limits.max_active {
                let Some(job) = waiting.pop_front() else { break };
                if let Some(seq) = self.start(job) {
                    active.push(seq);
                }
            }
            active.retain_mut(|seq| self.advance(seq));
        }
    }

    fn handle(&mut self, command: Command, waiting: &mut VecDeque<Box<Job>>) {
        match command {
            Command::Generate(job) => waiting.push_back(job),
            Command::Control(Control::Load { name, path, reply }) => {
                let result = self.load(&name, &path);
                match (&result, reply) {
                    (_, Some(reply)) => {
                        let _ = reply.send(result);
                    }
                    (Ok(()), None) => eprintln!("lora serve: loaded adapter {name} from {}", path.display()),
                    (Err(e), None) => eprintln!("lora serve: adapter {name} from {}: {}", path.display(), e.message),
                }
            }
            Command::Control(Control::Unload { name, reply }) => {
                let result = if name == self.base {
                    Err(ApiError::invalid(format!("{name} is the base model, which cannot be unloaded"), Some("name")))
                } else if self.models.remove(&name).is_some() {
                    self.names.write().unwrap_or_else(|e| e.into_inner()).remove(&name);
                    Ok(())
                } else {
                    Err(ApiError::new(StatusCode::NOT_FOUND, "model_not_found", format!("no adapter named {name}")))
                };
                let _ = reply.send(result);
            }
        }
    }

    /// Attaches the adapter at `path` to a copy of the base under `name`, replacing an adapter
    /// of that name.
    fn load(&mut self, name: &str, path: &std::path::Path) -> Result<(), ApiError> {
        if name == self.base {
            return Err(ApiError::invalid(format!("{name} is the base model's name"), Some("name")));
        }
        let mut model = self.models[&self.base].clone();
        crate::load::apply_adapters(&mut model, &[path.to_path_buf()], &[]).map_err(|e| ApiError::invalid(crate::describe(&e), Some("path")))?;
        self.models.insert(name.to_string(), model);
        self.names.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), Listed { created: now(), path: Some(path.to_path_buf()) });
        Ok(())
    }

    /// Tokenizes and checks a job and starts its sequence; a job that cannot start is told why.
    fn start(&mut self, job: Box<Job>) -> Option<Sequence> {
        if job.events.is_closed() {
            return None;
        }
        match self.prepare(&job) {
            Ok((model, prompt, max_tokens)) => {
                let seed = job.settings.seed.unwrap_or_else(|| {
                    self.seeds += 1;
                    now() ^ self.seeds.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                });
                let s = &job.settings;
                let sampler =
                    Sampler::new(SamplingConfig { temperature: s.temperature, top_p: s.top_p, top_k: s.top_k, repetition_penalty: s.repetition_penalty, seed });
                let _ = job.events.send(Event::Started { prompt_tokens: prompt.len() });
                Some(Sequence {
                    decoding: Decoding::new(&prompt, max_tokens, sampler),
                    text: StreamDecoder::new(self.tokenizer.clone()),
                    stop: StopFilter::new(job.settings.stop.clone()),
                    prompt_tokens: prompt.len(),
                    generated: 0,
                    max_tokens,
                    model,
                    job,
                })
            }
            Err(e) => {
                let _ = job.events.send(Event::Failed(e));
                None
            }
        }
    }

    /// The job's model, prompt ids and token budget, or the 4xx that refuses it.
    fn prepare(&self, job: &Job) -> Result<(CausalLm, Vec<u32>, usize), ApiError> {
        if Instant::now() >= job.deadline {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request timed out waiting for a free slot"));
        }
        let model = self
            .models
            .get(&job.model)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "model_not_found", format!("the model {} does not exist", job.model)))?
            .clone();
        let prompt = match &job.prompt {
            Prompt::Chat { messages, tools } => {
                if self.tokenizer.chat_template().is_none() {
                    return Err(ApiError::invalid("the model has no chat template: send the text to /v1/completions", Some("messages")));
                }
                self.tokenizer.encode_chat(messages, tools.as_ref(), true).map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?
            }
            Prompt::Text(text) => self.tokenizer.encode(text, true).map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?,
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid("the prompt is empty after tokenization", Some("prompt")));
        }
        let context = self.limits.context;
        if prompt.len() >= context {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                format!("the prompt is {} tokens; this model's context is {context} tokens, completion included", prompt.len()),
            ));
        }
        let asked = job.settings.max_tokens.unwrap_or(self.limits.default_max_tokens);
        if asked > context {
            return Err(ApiError {
                param: Some("max_tokens"),
                ..ApiError::invalid(format!("max_tokens is {asked}; this model's context is {context} tokens"), None)
            });
        }
        let budget = asked.min(context - prompt.len());
        Ok((model, prompt, budget))
    }

    /// One token of `seq`; false when the sequence has ended (finished, failed or abandoned).
    fn advance(&mut self, seq: &mut Sequence) -> bool {
        if seq.job.events.is_closed() {
            return false;
        }
        if Instant::now() >= seq.job.deadline {
            let _ = seq.job.events.send(Event::Failed(ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "the generation timed out")));
            return false;
        }
        let (model, decoding) = (&seq.model, &mut seq.decoding);
        let picked = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decoding.step(model))) {
            Ok(p) => p,
            Err(_) => {
                let _ = seq.job.events.send(Event::Failed(ApiError::internal("the model failed while generating")));
                return false;
            }
        };
        let Some(id) = picked else {
            let _ = seq
                .job
                .events
                .send(Event::Failed(ApiError::internal("the model's logits are not finite (its weights hold NaN or infinity, or the compute overflowed)")));
            return false;
        };
        if !seq.job.settings.ignore_eos && self.tokenizer.eos_ids().contains(&id) {
            return self.finish(seq, Finish::Stop);
        }
        seq.generated += 1;
        let piece = match seq.text.push(id) {
            Ok(p) => p,
            Err(e) => {
                let _ = seq.job.events.send(Event::Failed(ApiError::internal(format!("decoding the completion: {e}"))));
                return false;
            }
        };
        let (text, stopped) = seq.stop.push(&piece);
        if !text.is_empty() {
            let _ = seq.job.events.send(Event::Text(text));
        }
        if stopped {
            return self.done(seq, Finish::Stop);
        }
        if seq.generated >= seq.max_tokens {
            return self.finish(seq, Finish::Length);
        }
        true
    }

    /// Sends what the decoder and the stop filter still hold, then `Done`.
    fn finish(&self, seq: &mut Sequence, finish: Finish) -> bool {
        let rest = seq.text.finish().unwrap_or_default();
        let (mut text, stopped) = seq.stop.push(&rest);
        if !stopped {
            text.push_str(&seq.stop.finish());
        }
        if !text.is_empty() {
            let _ = seq.job.events.send(Event::Text(text));
        }
        self.done(seq, if stopped { Finish::Stop } else { finish })
    }

    fn done(&self, seq: &mut Sequence, finish: Finish) -> bool {
        let _ = seq.job.events.send(Event::Done { finish, prompt_tokens: seq.prompt_tokens, completion_tokens: seq.generated });
        false
    }
}
