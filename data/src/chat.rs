//! Hugging Face chat templates, rendered with minijinja in the environment transformers
//! gives them: `trim_blocks`, `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`, `strftime_now` and a `tojson` that writes what Python's `json.dumps` writes.
//! transformers' `{% generation %}` blocks, which mark the assistant's text, are rendered as
//! their content, and [`ChatTemplate::assistant_spans`] reads them.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value, context};
use serde_json::Value as Json;

use crate::error::DataError;

const NAME: &str = "chat_template";

/// The instruction budget of one render (minijinja's fuel, which also charges about one unit
/// per 64 bytes allocated): a template that loops or grows a string without end stops with
/// an error instead of running until killed. Real templates over long chats use a few
/// thousand.
const FUEL: u64 = 4_000_000;

/// The most a render may produce.
const MAX_RENDERED: usize = 64 << 20;

/// Where a `{% generation %}` block's text begins and ends in a render of
/// [`ChatTemplate::assistant_spans`]: two code points of Unicode's last private use plane.
const BLOCK_START: char = '\u{10FFF0}';
const BLOCK_END: char = '\u{10FFF1}';

/// The context variable that turns the block markers on.
const MARK_VAR: &str = "__lora_mark_generation";

/// Stand-ins for one message's content, which [`ChatTemplate::assistant_spans`] swaps in to find
/// where the template writes it.
const PROBES: [&str; 2] = ["\u{10FFF2}a", "\u{10FFF3}b"];

/// A compiled chat template with the tokenizer's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    path: PathBuf,
    bos_token: String,
    eos_token: String,
    /// The source has `{% generation %}` blocks.
    generation_blocks: bool,
    /// What the template writes after an assistant message's content to end the turn
    /// (`<|im_end|>\n`, `<|eot_id|>`), found on first use ([`ChatTemplate::turn_end`]).
    turn_end: OnceLock<String>,
}

/// A rendered chat with the byte ranges of its assistant turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssistantSpans {
    /// The rendered chat, as [`ChatTemplate::render`] writes it.
    pub text: String,
    /// Byte ranges of `text`, in order and disjoint, one per assistant message (one per
    /// `{% generation %}` block where the template has them).
    pub spans: Vec<Range<usize>>,
    /// The spans come from the template's `{% generation %}` blocks.
    pub from_blocks: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`, read from `path` (which errors name); `bos_token` and `eos_token`
    /// are the strings the template sees.
    pub fn new(source: &str, path: &Path, bos_token: &str, eos_token: &str) -> Result<Self, DataError> {
        let error = |e: Error| DataError::Template { path: path.to_path_buf(), message: describe(&e) };
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("generation", generation);
        let (source, generation_blocks) = translate_generation_blocks(source);
        env.add_template_owned(NAME, source).map_err(error)?;
        Ok(Self {
            env,
            path: path.to_path_buf(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            generation_blocks,
            turn_end: OnceLock::new(),
        })
    }

    /// The template marks the assistant's text with transformers' `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.generation_blocks
    }

    /// Renders `messages` (a JSON array of `{role, content, ...}`), with optional `tools`.
    /// Stops with an error past the fuel budget or [`MAX_RENDERED`] bytes.
    pub fn render(&self, messages: &Json, tools: Option<&Json>, add_generation_prompt: bool) -> Result<String, DataError> {
        self.render_with(messages, tools, add_generation_prompt, false)
    }

    /// [`render`](Self::render), with `{% generation %}` blocks between [`BLOCK_START`] and
    /// [`BLOCK_END`] when `mark` is set.
    fn render_with(&self, messages: &Json, tools: Option<&Json>, add_generation_prompt: bool, mark: bool) -> Result<String, DataError> {
        let template = self.env.get_template(NAME).map_err(|e| self.error(describe(&e)))?;
        let text = template
            .render(context! {
                messages => Value::from(Serde(messages)),
                tools => tools.map(|t| Value::from(Serde(t))),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
                __lora_mark_generation => mark,
            })
            .map_err(|e| self.error(describe(&e)))?;
        if text.len() > MAX_RENDERED {
            return Err(self.error(format!("renders {} bytes, more than the {MAX_RENDERED} allowed", text.len())));
        }
        Ok(text)
    }

    fn error(&self, message: String) -> DataError {
        DataError::Template { path: self.path.clone(), message }
    }

    /// Renders `messages` (without a generation prompt) and finds the text of every assistant
    /// turn in it: what training on every assistant turn trains on.
    ///
    /// Where the template has `{% generation %}` blocks, the spans are the blocks' text, as
    /// transformers' `return_assistant_tokens_mask` reads them. Otherwise each assistant
    /// message's span runs from where the template writes its content (found by rendering the
    /// chat again with that content swapped for two stand-ins: the first byte where a render
    /// differs) to the end of the turn: past its tool calls, through the text the template ends
    /// an assistant turn with. That works for templates that write a message differently once
    /// later turns follow (Qwen3 drops earlier turns' reasoning), where rendering prefixes of the
    /// chat does not. An error names the message whose text cannot be found.
    pub fn assistant_spans(&self, messages: &Json, tools: Option<&Json>) -> Result<AssistantSpans, DataError> {
        let text = self.render(messages, tools, false)?;
        if text.chars().any(|c| (BLOCK_START..='\u{10FFF3}').contains(&c)) {
            return Err(self.error("the chat holds a code point of U+10FFF0..U+10FFF3, which marks the assistant's text when it is found".into()));
        }
        if self.generation_blocks {
            let marked = self.render_with(messages, tools, false, true)?;
            let (unmarked, spans) = strip_block_markers(&marked).map_err(|e| self.error(e))?;
            if unmarked != text {
                return Err(self.error("renders differently with its {% generation %} blocks marked".into()));
            }
            return Ok(AssistantSpans { text, spans, from_blocks: true });
        }
        let list = messages.as_array().map(Vec::as_slice).unwrap_or_default();
        // Where each assistant message's own text lies, then where each turn ends: searched only
        // up to the next assistant message, so a turn never takes in a later one.
        let mut found: Vec<Range<usize>> = Vec::new();
        for (i, message) in list.iter().enumerate() {
            if message.get("role").and_then(Json::as_str) != Some("assistant") || nothing_to_train(message) {
                continue;
            }
            let region = match self.content_region(&text, list, i, tools)? {
                Some(region) => region,
                // Templates that write no content beside tool calls (Llama 3.1's): the turn starts
                // where the chat before it, with the generation prompt, ends.
                None => self
                    .prompt_region(&text, list, i, tools)
                    .ok_or_else(|| self.error(format!("does not write the content of message {i} (an assistant message), so its turn cannot be found")))?,
            };
            if found.last().is_some_and(|last| last.end > region.start) {
                return Err(
                    self.error(format!("writes message {i} (an assistant message) where an earlier assistant turn ends, so the turns cannot be told apart"))
                );
            }
            found.push(region);
        }
        let turn_end = self.turn_end();
        let spans = found
            .iter()
            .enumerate()
            .map(|(n, region)| {
                let limit = found.get(n + 1).map_or(text.len(), |next| next.start);
                let end = match text[region.end..limit].find(turn_end.as_str()) {
                    Some(at) if !turn_end.is_empty() => region.end + at + turn_end.len(),
                    _ => region.end,
                };
                region.start..end
            })
            .collect();
        Ok(AssistantSpans { text, spans, from_blocks: false })
    }

    /// Where message `i`'s content lies in `text` (the chat rendered): the bytes that change when
    /// it is swapped for the two stand-ins; `None` when the template does not write it.
    fn content_region(&self, text: &str, list: &[Json], i: usize, tools: Option<&Json>) -> Result<Option<Range<usize>>, DataError> {
        let (mut start, mut end) = (text.len(), text.len());
        for probe in PROBES {
            let mut swapped = list.to_vec();
            if let Some(message) = swapped[i].as_object_mut() {
                message.insert("content".into(), Json::String(probe.to_string()));
            }
            let other = self.render(&Json::Array(swapped), tools, false)?;
            if other == text {
                return Ok(None);
            }
            start = start.min(common_prefix(text, &other));
            end = end.min(common_suffix(text, &other));
        }
        Ok(Some(start..(text.len() - end).max(start)))
    }

    /// The end of the chat before message `i` with the generation prompt, as an empty region,
    /// where that render is how `text` begins.
    fn prompt_region(&self, text: &str, list: &[Json], i: usize, tools: Option<&Json>) -> Option<Range<usize>> {
        let prompt = self.render(&Json::Array(list[..i].to_vec()), tools, true).ok()?;
        (text.starts_with(&prompt) && prompt.len() < text.len()).then_some(prompt.len()..prompt.len())
    }

    /// What the template writes after an assistant message's content to end its turn: what
    /// follows the content both where the chat ends there and where another user turn follows
    /// (templates that end the whole chat with an EOS, as Phi-3's, add it only in the first),
    /// up to the last tag or line end the two share; tried with a system message first too;
    /// empty when no probe chat renders.
    fn turn_end(&self) -> &String {
        self.turn_end.get_or_init(|| {
            let after = |chat: Json| -> Option<String> {
                let text = self.render(&chat, None, false).ok()?;
                text.find(PROBES[0]).map(|at| text[at + PROBES[0].len()..].to_string())
            };
            let user = |c: &str| serde_json::json!({"role": "user", "content": c});
            let assistant = |c: &str| serde_json::json!({"role": "assistant", "content": c});
            let system = serde_json::json!({"role": "system", "content": "\u{10FFF3}s"});
            for head in [vec![], vec![system]] {
                let chat = |more: bool| {
                    let mut chat = head.clone();
                    chat.extend([user(PROBES[1]), assistant(PROBES[0])]);
                    if more {
                        chat.extend([user("\u{10FFF3}c"), assistant("\u{10FFF2}d")]);
                    }
                    Json::Array(chat)
                };
                match (after(chat(false)), after(chat(true))) {
                    (Some(alone), Some(followed)) => {
                        // Where the two part before the whole chat's own end, back to the end of
                        // the last tag or line they share (`<|end|>\n` of `<|end|>\n<`).
                        let shared = &alone[..common_prefix(&alone, &followed)];
                        let end = if shared.len() == alone.len() { shared.len() } else { shared.rfind(['>', '\n']).map_or(0, |at| at + 1) };
                        return shared[..end].to_string();
                    }
                    (Some(alone), None) => return alone,
                    _ => {}
                }
            }
            String::new()
        })
    }
}

/// An assistant message with neither content nor tool calls: nothing of it to train on.
fn nothing_to_train(message: &Json) -> bool {
    let content = message.get("content").and_then(Json::as_str).is_some_and(|c| !c.is_empty());
    let calls = message.get("tool_calls").and_then(Json::as_array).is_some_and(|c| !c.is_empty());
    !content && !calls
}

/// Bytes `a` and `b` share at their start, backed off to a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// Bytes `a` and `b` share at their end, backed off to a character boundary of `a`.
fn common_suffix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().rev().zip(b.bytes().rev()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(a.len() - n) {
        n -= 1;
    }
    n
}

/// The text without [`BLOCK_START`] and [`BLOCK_END`], and the byte ranges (of that text) they
/// enclosed; an error where they do not pair up.
fn strip_block_markers(marked: &str) -> Result<(String, Vec<Range<usize>>), String> {
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut open = None;
    for c in marked.chars() {
        match (c, open) {
            (BLOCK_START, None) => open = Some(text.len()),
            (BLOCK_END, Some(start)) => {
                spans.push(start..text.len());
                open = None;
            }
            (BLOCK_START | BLOCK_END, _) => return Err("has {% generation %} blocks inside one another".into()),
            _ => text.push(c),
        }
    }
    if open.is_some() {
        return Err("has a {% generation %} block that does not end".into());
    }
    spans.retain(|s| !s.is_empty());
    Ok((text, spans))
}

/// transformers' `{% generation %}` / `{% endgeneration %}` (a jinja2 extension) as minijinja's
/// `{% filter generation %}` / `{% endfilter %}`: a block tag as well, so `trim_blocks` and
/// `lstrip_blocks` treat it alike, and whitespace control (`{%-`, `-%}`) is kept. Also says
/// whether there were any.
fn translate_generation_blocks(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at + 2..];
        let open_ctl = tag.strip_prefix(['-', '+']).map_or("", |_| &tag[..1]);
        let body = tag[open_ctl.len()..].trim_start();
        let word_len = body.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(body.len());
        let (word, after) = body.split_at(word_len);
        let after = after.trim_start();
        let close_ctl = after.strip_prefix(['-', '+']).map_or("", |_| &after[..1]);
        let replacement = match word {
            "generation" => "filter generation",
            "endgeneration" => "endfilter",
            _ => "",
        };
        match after[close_ctl.len()..].strip_prefix("%}") {
            Some(tail) if !replacement.is_empty() => {
                found = true;
                let _ = write!(out, "{{%{open_ctl} {replacement} {close_ctl}%}}");
                rest = tail;
            }
            _ => {
                out.push_str("{%");
                rest = tag;
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

/// The body of a `{% generation %}` block: as it is, or between the block markers when the
/// render asks for them.
fn generation(state: &State, body: String) -> String {
    if state.lookup(MARK_VAR).is_some_and(|v| v.is_true()) { format!("{BLOCK_START}{body}{BLOCK_END}") } else { body }
}

/// minijinja errors carry their cause chain; join it into one line.
fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    msg
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time with the common strftime fields.
fn strftime_now(format: String) -> Result<String, Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Ok(strftime(secs, &format))
}

fn strftime(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let name = MONTHS[(month - 1) as usize];
        match chars.next() {
            Some('d') => {
                let _ = write!(out, "{day:02}");
            }
            Some('m') => {
                let _ = write!(out, "{month:02}");
            }
            Some('Y') => {
                let _ = write!(out, "{year}");
            }
            Some('y') => {
                let _ = write!(out, "{:02}", year % 100);
            }
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => {
                let _ = write!(out, "{:02}", rem / 3600);
            }
            Some('M') => {
                let _ = write!(out, "{:02}", rem / 60 % 60);
            }
            Some('S') => {
                let _ = write!(out, "{:02}", rem % 60);
            }
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`, not minijinja's HTML-safe one.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an int or a string")),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a = s.get_item(&Value::from(0))?;
            let b = s.get_item(&Value::from(1))?;
            (a.as_str().unwrap_or(",").to_string(), b.as_str().unwrap_or(":").to_string())
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false), ensure_ascii: ensure_ascii.unwrap_or(false) };
    let mut out = String::new();
    dump(value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn dump(v: &Value, o: &JsonOpts, depth: usize, out: &mut String) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                let _ = write!(out, "{i}");
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&python_float(f));
            }
        }
        ValueKind::String => push_string(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                dump(item, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort_by_key(|a| a.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                push_string(&key.to_string(), o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                dump(&v.get_item(key)?, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => push_string(&v.to_string(), o.ensure_ascii, out),
    }
    Ok(())
}

/// A JSON string literal as Python writes it: `\uXXXX` (lowercase) for control
/// characters, and for everything beyond ASCII when `ensure_ascii` is set.
fn push_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside [1e-4, 1e16).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust writes `1e-5`; Python writes `1e-05`.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let s = format!("{f}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, messages: Json) -> Result<String, DataError> {
        ChatTemplate::new(src, Path::new("chat_template.jinja"), "<s>", "</s>")?.render(&messages, None, false)
    }

    fn template(src: &str) -> ChatTemplate {
        ChatTemplate::new(src, Path::new("chat_template.jinja"), "<s>", "</s>").unwrap()
    }

    fn fixture_template(name: &str) -> ChatTemplate {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name).join("chat_template.jinja");
        ChatTemplate::new(&std::fs::read_to_string(&path).unwrap(), &path, "", "<|im_end|>").unwrap()
    }

    /// The text of each span [`ChatTemplate::assistant_spans`] finds.
    fn spans(t: &ChatTemplate, messages: Json, tools: Option<Json>) -> Vec<String> {
        let found = t.assistant_spans(&messages, tools.as_ref()).unwrap();
        assert_eq!(found.text, t.render(&messages, tools.as_ref(), false).unwrap());
        found.spans.iter().map(|s| found.text[s.clone()].to_string()).collect()
    }

    /// Issue 16, item 2, without `{% generation %}` blocks: each assistant turn from its content
    /// through the end of the turn, tool calls included, tool results and user turns left out.
    #[test]
    fn assistant_spans_cover_each_assistant_turn() {
        // Mistral's [INST] template ends an assistant turn with the EOS token.
        let mistral = template(
            "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}",
        );
        let chat = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]);
        assert_eq!(spans(&mistral, chat, None), ["Hello.</s>", "Hello.</s>"]);

        // ChatML with tool calls (the qwen3 fixture's Qwen2.5-style template).
        let chatml = fixture_template("qwen3");
        let call = json!({"type": "function", "function": {"name": "add", "arguments": {"a": 1}}});
        let chat = json!([
            {"role": "user", "content": "Add one"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "Two."},
        ]);
        let got = spans(&chatml, chat, None);
        assert_eq!(got.len(), 2);
        assert!(got[0].contains("<tool_call>") && got[0].ends_with("</tool_call><|im_end|>\n") && !got[0].contains("user"), "{got:?}");
        assert_eq!(got[1], "Two.<|im_end|>\n");

        // Like Qwen3's: an assistant turn before the last user message is written without its
        // reasoning, so rendering the chat up to that turn is not a prefix of the whole.
        let reasoning = template(
            "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}\
             {% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.index0 < ns.last %}{{ m.content.split('</think>')[-1].lstrip('\n') }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}",
        );
        let chat = json!([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "<think>\nWave.\n</think>\n\nBye."},
        ]);
        assert_eq!(spans(&reasoning, chat, None), ["Hello.<|im_end|>\n", "<think>\nWave.\n</think>\n\nBye.<|im_end|>\n"]);

        // Llama 3.1's template writes no content beside tool calls: the turn starts after the
        // assistant header.
        let llama = fixture_template("llama");
        let chat = json!([
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "rain"},
            {"role": "assistant", "content": "Rain."},
        ]);
        let got = spans(&llama, chat, None);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("{\"name\": \"weather\"") && got[0].ends_with("<|eot_id|>") && !got[0].contains("rain"), "{got:?}");
        assert_eq!(got[1], "Rain.<|eot_id|>");

        // Like Phi-3's: the whole chat ends with the EOS when there is no generation prompt, which
        // is not part of an earlier turn's end.
        let phi = template(
            "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}",
        );
        let chat = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]);
        assert_eq!(spans(&phi, chat, None), ["Hello.<|end|>\n", "Bye.<|end|>\n"]);

        // An empty assistant message has nothing to train on.
        let chat = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]);
        assert_eq!(spans(&chatml, chat, None), ["Yes.<|im_end|>\n"]);

        // A chat without assistant messages has no spans.
        assert!(spans(&mistral, json!([{"role": "user", "content": "Hi"}]), None).is_empty());
    }

    #[test]
    fn a_template_that_drops_an_assistant_message_is_an_error_naming_it() {
        let skipping = template("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}");
        let chat = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]);
        let e = skipping.assistant_spans(&chat, None).unwrap_err().to_string();
        assert!(e.contains("chat_template.jinja") && e.contains("message 1"), "{e}");
        let marked = json!([{"role": "user", "content": "Hi \u{10FFF0}"}]);
        assert!(skipping.assistant_spans(&marked, None).unwrap_err().to_string().contains("U+10FFF0"));
    }

    /// transformers' `{% generation %}` blocks render as their content with jinja2's block
    /// whitespace rules, and mark the assistant's text.
    #[test]
    fn generation_blocks_render_plain_and_mark_the_assistant_text() {
        let src = "{% for m in messages %}\n  {% if m.role == 'assistant' %}\n<a>{%- generation %}\n{{ m.content }}</a>{% endgeneration %}\n{% else %}<u>{{ m.content }}</u>{% endif %}\n{% endfor %}";
        let t = template(src);
        assert!(t.has_generation_blocks());
        let chat = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]);
        // What jinja2 renders with trim_blocks and lstrip_blocks.
        assert_eq!(t.render(&chat, None, false).unwrap(), "<u>q</u><a>x</a><a>y</a>");
        assert_eq!(spans(&t, chat, None), ["x</a>", "y</a>"]);
        assert!(!template("{{ 'generation' }}{% if true %}{% endif %}").has_generation_blocks());
        let unclosed = ChatTemplate::new("{% generation %}x", Path::new("t.jinja"), "", "").unwrap_err().to_string();
        assert!(unclosed.contains("t.jinja"), "{unclosed}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ [] | tojson }}";
        let out = render(src, json!([{"b": 1, "a": [1.5, "x<y>&\"é\n"], "c": {}, "d": 1e-5}])).unwrap();
        assert_eq!(
            out,
            "{\"b\": 1, \"a\": [1.5, \"x<y>&\\\"é\\n\"], \"c\": {}, \"d\": 1e-05}|{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    \"x<y>&\\\"é\\n\"\n  ],\n  \"c\": {},\n  \"d\": 1e-05\n}|[]"
        );
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let err = render("{{ raise_exception('Only user and assistant roles') }}", json!([])).unwrap_err();
        assert!(err.to_string().contains("Only user and assistant roles"), "{err}");
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let src = "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.content.strip().upper() }}{% endfor %}";
        assert_eq!(render(src, json!([{"content": "  hi "}, {"content": "no"}])).unwrap(), "HI");
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-07-26 13:05:09 UTC
        assert_eq!(strftime(1_722_000_309, "%d %b %Y %H:%M:%S %B %%"), "26 Jul 2024 13:25:09 July %");
    }

    /// Issue 14, defect 5: templates that would run until killed or fill the memory stop
    /// with an error naming the template file.
    #[test]
    fn runaway_templates_stop_with_an_error_naming_the_file() {
        let doubling = "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}";
        let loops = "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}x{% endfor %}{% endfor %}{% endfor %}";
        let repeated = "{% for i in range(100) %}{{ 'y' * 90000000 }}{% endfor %}";
        for src in [doubling, loops, repeated] {
            let started = std::time::Instant::now();
            let e = render(src, json!([])).unwrap_err().to_string();
            assert!(e.contains("chat_template.jinja"), "{e}");
            assert!(started.elapsed().as_secs() < 30, "{src} took {:?}", started.elapsed());
        }
        // A real template over a long chat stays well inside the budget.
        let chat = "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}{% if not loop.last %}\n{% endif %}{% endfor %}";
        let messages: Vec<Json> = (0..2000).map(|i| json!({"role": "user", "content": format!("message {i} ").repeat(50)})).collect();
        assert!(render(chat, Json::Array(messages)).unwrap().len() > 1_000_000);
    }
}
