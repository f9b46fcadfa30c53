//! Hugging Face chat templates, rendered with minijinja in the environment transformers
//! gives them: `trim_blocks`, `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`, `strftime_now` and a `tojson` that writes what Python's `json.dumps` writes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value, context};
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

/// A compiled chat template with the tokenizer's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    path: PathBuf,
    bos_token: String,
    eos_token: String,
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
        env.add_template_owned(NAME, source.to_string()).map_err(error)?;
        Ok(Self { env, path: path.to_path_buf(), bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders `messages` (a JSON array of `{role, content, ...}`), with optional `tools`.
    /// Stops with an error past the fuel budget or [`MAX_RENDERED`] bytes.
    pub fn render(&self, messages: &Json, tools: Option<&Json>, add_generation_prompt: bool) -> Result<String, DataError> {
        let error = |message: String| DataError::Template { path: self.path.clone(), message };
        let template = self.env.get_template(NAME).map_err(|e| error(describe(&e)))?;
        let text = template
            .render(context! {
                messages => Value::from(Serde(messages)),
                tools => tools.map(|t| Value::from(Serde(t))),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|e| error(describe(&e)))?;
        if text.len() > MAX_RENDERED {
            return Err(error(format!("renders {} bytes, more than the {MAX_RENDERED} allowed", text.len())));
        }
        Ok(text)
    }
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
