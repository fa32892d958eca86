//! Chat template rendering: the checkpoint's `chat_template.jinja` run through minijinja, set up to
//! render byte-for-byte what transformers' `apply_chat_template(..., tokenize=False)` renders.
//!
//! transformers renders with Jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])` plus its own `tojson`,
//! `raise_exception`, `strftime_now`, `dict` and `namespace` (see
//! `transformers/utils/chat_template_utils.py`). Before rendering it drops the `None` values of
//! every message, aliases reasoning fields (`reasoning_content` / `thinking` / `reasoning`), and
//! passes the tokenizer's special tokens (`bos_token`, ...) and the caller's kwargs as variables.
//! This module does the same with minijinja (its own `dict` and `namespace`) and
//! minijinja-contrib's `pycompat` (Python's string and dict methods), and overrides minijinja only
//! where the published chat templates (Gemma 4's, Llama's, Qwen's, Granite's, ...) would render
//! differently: `tojson` is transformers' `json.dumps` (`", "` / `": "` separators,
//! no HTML escaping, `ensure_ascii=False`, `indent`, `sort_keys`), floats print as Python's `str()`
//! (`1e-05`), `strftime_now` writes the date directives templates use, transformers'
//! `{% generation %}` tag is accepted and `\r\n` in the source reads as `\n`. The Jinja2 features
//! beyond that which minijinja lacks or does differently are not emulated (the test
//! `known_divergences_from_jinja2` pins them). Checked against transformers renders in
//! `fixtures/chat/cases.json` (written by `conformance/fixtures_gen/chat_renders.py`).
//!
//! The messages rendered here are template messages: OpenAI messages are converted to them by
//! `crate::openai::messages`, in the tool-result style [`ChatTemplate::tool_results`] says this
//! template reads.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, Serde, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value};
use serde_json::{Map, Value as Json};

/// A chat template could not be loaded or rendered, or messages could not be converted.
#[derive(Debug)]
pub struct TemplateError(pub String);

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateError {}

impl TemplateError {
    fn from_minijinja(context: &str, err: &Error) -> Self {
        let mut msg = format!("{context}: {err}");
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            let _ = write!(msg, ": {s}");
            source = s.source();
        }
        TemplateError(msg)
    }
}

/// How tool results (OpenAI `role: "tool"` messages) reach the template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolResults {
    /// The serving rule, for templates that read `tool_responses` (Google's Gemma 4 template):
    /// each run of tool messages becomes `tool_responses: [{name, response}]` on the preceding
    /// assistant message, and the tool messages are removed.
    Attach,
    /// For templates that read `role: "tool"` messages: they stay where they are, with `name`
    /// (found through `tool_call_id`) and the content parsed as JSON when it parses.
    Keep,
}

const TEMPLATE_NAME: &str = "chat_template";
const TOOL_USE_TEMPLATE_NAME: &str = "chat_template.tool_use";
/// The named special tokens transformers exposes to templates (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];
/// Variables transformers passes itself; a kwarg with one of these names is a Python TypeError.
const RESERVED_VARIABLES: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

/// A loaded chat template, ready to render (cheap to share: `Send + Sync`).
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether a `tool_use` template exists (picked when tools are given, as transformers does).
    has_tool_use: bool,
    /// Special token variables (`bos_token`, ..., and the tokenizer's named extra tokens).
    special_tokens: Vec<(String, String)>,
    /// Whether the (default) template reads `tool_responses`.
    reads_tool_responses: bool,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("has_tool_use", &self.has_tool_use)
            .field("special_tokens", &self.special_tokens)
            .field("reads_tool_responses", &self.reads_tool_responses)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// `chat_template.jinja` in `dir`, else the `chat_template` field of `tokenizer_config.json`;
    /// None if neither. bos/eos token strings from tokenizer_config.json (`bos_token`,
    /// `eos_token`, either plain strings or {"content": ..} objects).
    ///
    /// Also like transformers: every named special token of tokenizer_config.json (`unk_token`,
    /// `pad_token`, ..., and the names in an `extra_special_tokens` object) is a template
    /// variable; a `chat_template` field given as a list of `{name, template}` is read as named
    /// templates (`default`, and `tool_use` used when tools are given).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, TemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<Json> = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| {
                TemplateError(format!("cannot read {}: {e}", config_path.display()))
            })?;
            Some(serde_json::from_str(&text).map_err(|e| {
                TemplateError(format!("cannot parse {}: {e}", config_path.display()))
            })?)
        } else {
            None
        };
        let special_tokens = config.as_ref().map(special_tokens_of).unwrap_or_default();

        let jinja_path = dir.join("chat_template.jinja");
        let mut templates: Vec<(String, String)> = Vec::new();
        if jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path)
                .map_err(|e| TemplateError(format!("cannot read {}: {e}", jinja_path.display())))?;
            templates.push(("default".to_owned(), source));
        } else if let Some(field) = config.as_ref().and_then(|c| c.get("chat_template")) {
            match field {
                Json::String(s) => templates.push(("default".to_owned(), s.clone())),
                Json::Array(items) => {
                    for item in items {
                        let name = item.get("name").and_then(Json::as_str);
                        let template = item.get("template").and_then(Json::as_str);
                        match (name, template) {
                            (Some(n), Some(t)) => templates.push((n.to_owned(), t.to_owned())),
                            _ => {
                                return Err(TemplateError(format!(
                                    "{}: chat_template list entries need `name` and `template`",
                                    config_path.display()
                                )))
                            }
                        }
                    }
                }
                Json::Null => {}
                _ => {
                    return Err(TemplateError(format!(
                        "{}: chat_template is neither a string nor a list",
                        config_path.display()
                    )))
                }
            }
        }
        if templates.is_empty() {
            return Ok(None);
        }
        let default = templates
            .iter()
            .find(|(n, _)| n == "default")
            .map(|(_, t)| t.clone());
        let tool_use = templates
            .iter()
            .find(|(n, _)| n == "tool_use")
            .map(|(_, t)| t.clone());
        let Some(default) = default.or_else(|| tool_use.clone()) else {
            let names: Vec<&str> = templates.iter().map(|(n, _)| n.as_str()).collect();
            return Err(TemplateError(format!(
                "{}: several chat templates ({}) and none named `default`",
                config_path.display(),
                names.join(", ")
            )));
        };
        Self::build(&default, tool_use.as_deref(), special_tokens).map(Some)
    }

    pub fn from_source(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, TemplateError> {
        let special_tokens = vec![
            ("bos_token".to_owned(), bos_token.to_owned()),
            ("eos_token".to_owned(), eos_token.to_owned()),
        ];
        Self::build(source, None, special_tokens)
    }

    /// Like [`ChatTemplate::from_source`] with every special-token variable given (name, text).
    pub fn from_source_with_special_tokens(
        source: &str,
        special_tokens: Vec<(String, String)>,
    ) -> Result<Self, TemplateError> {
        Self::build(source, None, special_tokens)
    }

    fn build(
        source: &str,
        tool_use: Option<&str>,
        special_tokens: Vec<(String, String)>,
    ) -> Result<Self, TemplateError> {
        let mut env = new_environment()?;
        env.add_template_owned(TEMPLATE_NAME, preprocess_source(source))
            .map_err(|e| TemplateError::from_minijinja("chat template does not parse", &e))?;
        if let Some(t) = tool_use {
            env.add_template_owned(TOOL_USE_TEMPLATE_NAME, preprocess_source(t))
                .map_err(|e| {
                    TemplateError::from_minijinja("tool_use chat template does not parse", &e)
                })?;
        }
        Ok(ChatTemplate {
            env,
            has_tool_use: tool_use.is_some(),
            special_tokens,
            reads_tool_responses: source.contains("tool_responses"),
        })
    }

    /// How this template wants tool results: [`ToolResults::Attach`] when it reads
    /// `tool_responses` (Google's Gemma 4 template), else [`ToolResults::Keep`].
    pub fn tool_results(&self) -> ToolResults {
        if self.reads_tool_responses {
            ToolResults::Attach
        } else {
            ToolResults::Keep
        }
    }

    /// Renders template-native messages (already converted). `tools`: OpenAI tool list or None.
    /// `kwargs`: extra variables (e.g. enable_thinking) from chat_template_kwargs.
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
    ) -> Result<String, TemplateError> {
        let name = if tools.is_some() && self.has_tool_use {
            TOOL_USE_TEMPLATE_NAME
        } else {
            TEMPLATE_NAME
        };
        let template = self
            .env
            .get_template(name)
            .map_err(|e| TemplateError::from_minijinja("chat template", &e))?;

        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Value::from(v.as_str()));
        }
        for (k, v) in kwargs {
            if RESERVED_VARIABLES.contains(&k.as_str()) {
                return Err(TemplateError(format!(
                    "chat_template_kwargs may not set `{k}` (the renderer sets it)"
                )));
            }
            ctx.insert(k.clone(), Value::from(Serde(v)));
        }
        // transformers refuses these before rendering.
        if messages.is_empty() {
            return Err(TemplateError(
                "cannot apply the chat template to an empty conversation".to_owned(),
            ));
        }
        if let Some(i) = messages.iter().position(|m| !m.is_object()) {
            return Err(TemplateError(format!(
                "messages[{i}]: a chat message must be an object"
            )));
        }
        let messages: Vec<Value> = messages.iter().map(normalise_message).collect();
        ctx.insert("messages".to_owned(), Value::from(messages));
        ctx.insert(
            "tools".to_owned(),
            match tools {
                Some(t) => Value::from(Serde(t)),
                None => Value::from(()),
            },
        );
        ctx.insert("documents".to_owned(), Value::from(()));
        ctx.insert(
            "add_generation_prompt".to_owned(),
            Value::from(add_generation_prompt),
        );
        template
            .render(Value::from(ctx))
            .map_err(|e| TemplateError::from_minijinja("chat template failed", &e))
    }
}

/// Named special tokens of a tokenizer_config.json, as transformers' `special_tokens_map`.
fn special_tokens_of(config: &Json) -> Vec<(String, String)> {
    fn text(v: &Json) -> Option<String> {
        match v {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
            _ => None,
        }
    }
    let mut out = Vec::new();
    for name in SPECIAL_TOKEN_NAMES {
        if let Some(t) = config.get(name).and_then(text) {
            out.push((name.to_owned(), t));
        }
    }
    if let Some(Json::Object(extra)) = config.get("extra_special_tokens") {
        for (name, v) in extra {
            if let Some(t) = text(v) {
                out.retain(|(n, _)| n != name);
                out.push((name.clone(), t));
            }
        }
    }
    out
}

/// What transformers does to each message before rendering: drop the keys whose value is None,
/// then alias reasoning (`reasoning_content` / `thinking` / `reasoning`, first non-None wins) as
/// `reasoning_content` and, unless present, `thinking`. Keys keep their order, as in a Python dict
/// (minijinja's and serde_json's `preserve_order` features).
fn normalise_message(message: &Json) -> Value {
    let Json::Object(obj) = message else {
        unreachable!("render checks that every message is an object");
    };
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()));
    let mut out = Map::new();
    if let Some(r) = reasoning {
        if obj.get("thinking").is_none_or(Json::is_null) {
            out.insert("thinking".to_owned(), r.clone());
        }
    }
    for (k, v) in obj {
        if v.is_null() || (k == "reasoning_content" && reasoning.is_some()) {
            continue;
        }
        out.insert(k.clone(), v.clone());
    }
    if let Some(r) = reasoning {
        out.insert("reasoning_content".to_owned(), r.clone());
    }
    Value::from(Serde(out))
}

// ---------------------------------------------------------------------------------------------
// The environment.

fn new_environment() -> Result<Environment<'static>, TemplateError> {
    let mut env = Environment::new();
    // Jinja2 as transformers configures it: trim_blocks, lstrip_blocks, no keep_trailing_newline.
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .map_err(|e| TemplateError::from_minijinja("syntax config", &e))?;
    env.set_syntax(syntax);
    // Jinja2's default Undefined: prints empty, iterates empty, fails on attribute access.
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // Python's str and dict methods (`.strip()`, `.split()`, `.startswith()`, `.get()`, ...).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Gemma 4's template prints numeric tool arguments bare (`{{ argument }}`): floats as Python's
    // str() writes them (`1e-05`, where minijinja writes `0.00001`).
    env.set_formatter(|out, state, value| match f64_of(value) {
        Some(f) => out.write_str(&py_float_repr(f)).map_err(Error::from),
        None => minijinja::escape_formatter(out, state, value),
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    Ok(env)
}

/// Source rewrites that make minijinja run a template as Jinja2 does:
/// - Jinja2's newline normalisation: `\r\n` and `\r` in the source read as `\n`;
/// - transformers' `{% generation %}...{% endgeneration %}` (its AssistantTracker extension only
///   marks assistant text; rendered, it is its body in its own scope) becomes `{% with %}`, the
///   tag's whitespace-control markers kept.
fn preprocess_source(source: &str) -> String {
    let source = source.replace("\r\n", "\n").replace('\r', "\n");
    let mut out = String::with_capacity(source.len());
    let mut rest = source.as_str();
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start + 2);
        out.push_str(before);
        let word_at = tag.len() - tag.trim_start_matches(['-', '+']).trim_start().len();
        let word_len = tag[word_at..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tag.len() - word_at);
        let replacement = match &tag[word_at..word_at + word_len] {
            "generation" => "with",
            "endgeneration" => "endwith",
            _ => {
                rest = tag;
                continue;
            }
        };
        out.push_str(&tag[..word_at]);
        out.push_str(replacement);
        rest = &tag[word_at + word_len..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The value as a float when it is one (not an integer).
fn f64_of(value: &Value) -> Option<f64> {
    (value.kind() == ValueKind::Number && !value.is_integer())
        .then(|| f64::try_from(value.clone()).ok())
        .flatten()
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f < 0.0 { "-inf" } else { "inf" }.to_owned();
    }
    // Rust's Debug switches to exponent form at the same thresholds as Python's repr.
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

// ---------------------------------------------------------------------------------------------
// tojson.

/// transformers' `tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// `json.dumps` with those arguments, positional or keyword. Unlike minijinja's own `tojson` it
/// escapes no HTML and writes Python's separators (`", "` and `": "`; `","` when indented).
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(Error::from(ErrorKind::TooManyArguments));
    }
    let mut opts: [Value; 4] = Default::default();
    for (i, slot) in opts.iter_mut().enumerate() {
        if let Some(v) = kwargs.get::<Option<Value>>(NAMES[i])? {
            *slot = v;
        } else if let Some(v) = args.get(i) {
            *slot = v.clone();
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = opts;
    // Python's default None and an argument not given read the same.
    let given = |v: &Value| !v.is_none() && !v.is_undefined();
    let indent = match indent.as_str() {
        _ if !given(&indent) => None,
        Some(s) => Some(s.to_owned()),
        None => Some(" ".repeat(i64::try_from(indent)?.max(0) as usize)),
    };
    let (item_sep, key_sep) = if given(&separators) {
        match separators.try_iter()?.collect::<Vec<_>>()[..] {
            [ref item, ref key] => (item.to_string(), key.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson separators must be an (item, key) pair",
                ))
            }
        }
    } else {
        let item_sep = if indent.is_some() { "," } else { ", " };
        (item_sep.to_owned(), ": ".to_owned())
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.is_true(),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.is_true(),
    };
    let mut out = String::new();
    json_dumps(value, &opts, 0, &mut out)?;
    Ok(out)
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn json_dumps(v: &Value, o: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match f64_of(v) {
            Some(f) => out.push_str(&py_float_repr(f)),
            None => {
                let _ = write!(out, "{v}");
            }
        },
        ValueKind::String => json_str(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq => {
            let items: Vec<Value> = v.try_iter()?.collect();
            json_container(out, o, level, '[', ']', items.len(), |i, out| {
                json_dumps(&items[i], o, level + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let Some(k) = key.as_str() else {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: keys must be strings, not {}", key.kind()),
                    ));
                };
                entries.push((k.to_owned(), v.get_item(&key)?));
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            json_container(out, o, level, '{', '}', entries.len(), |i, out| {
                json_str(&entries[i].0, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                json_dumps(&entries[i].1, o, level + 1, out)
            })?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// `len` items between `open` and `close`, each on its own indented line when indenting.
fn json_container(
    out: &mut String,
    o: &JsonOpts,
    level: usize,
    open: char,
    close: char,
    len: usize,
    mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
    };
    for i in 0..len {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        newline(out, level + 1);
        item(i, out)?;
    }
    newline(out, level);
    out.push(close);
    Ok(())
}

/// A JSON string as Python's json module writes it.
fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
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
            // ensure_ascii escapes all but printable ASCII (DEL too).
            c if c < ' ' || (ensure_ascii && c > '~') => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime_now.

/// transformers' `strftime_now(format)`: `datetime.now().strftime(format)`, the clock read in
/// UTC (the server's local time when it runs in UTC, as containers do).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, secs)
}

/// The strftime directives chat templates use for today's date and time (Llama 3's
/// `%d %b %Y`, Granite's `%B %d, %Y`, `%Y-%m-%d`, ...): `%Y %m %d %B %b %A %a %H %M %S %%`;
/// any other directive is written as is.
fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday", // 1970-01-01
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let month_name = MONTHS[month as usize - 1];
    let day_name = DAYS[days.rem_euclid(7) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{day_name}"),
            Some('a') => write!(out, "{}", &day_name[..3]),
            Some('H') => write!(out, "{:02}", secs / 3600),
            Some('M') => write!(out, "{:02}", secs / 60 % 60),
            Some('S') => write!(out, "{:02}", secs % 60),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

// ---------------------------------------------------------------------------------------------
// OpenAI messages -> template messages.

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::messages::to_template;
    use crate::openai::protocol::Message;
    use serde_json::json;
    use std::path::PathBuf;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn cases_file() -> Json {
        let path = repo().join("fixtures/chat/cases.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("cases.json parses")
    }

    fn array<'a>(v: &'a Json, key: &str) -> &'a [Json] {
        v[key]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_else(|| panic!("`{key}` is not a list"))
    }

    fn tools_of(case: &Json) -> Option<&[Json]> {
        case["tools"].as_array().map(Vec::as_slice)
    }

    fn kwargs_of(case: &Json) -> Map<String, Json> {
        case["kwargs"].as_object().cloned().unwrap_or_default()
    }

    /// None when equal; else both texts and the first differing byte offset.
    fn difference(got: &str, want: &str) -> Option<String> {
        if got == want {
            return None;
        }
        let offset = got
            .bytes()
            .zip(want.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let mut start = offset.saturating_sub(40);
        while !want.is_char_boundary(start) || !got.is_char_boundary(start) {
            start -= 1;
        }
        let tail = |s: &str| {
            let mut end = (offset + 40).min(s.len());
            while !s.is_char_boundary(end) {
                end += 1;
            }
            s[start.min(s.len())..end].to_owned()
        };
        Some(format!(
            "first difference at byte {offset}\n  got:  {:?}\n  want: {:?}\nfull got:\n{got:?}\nfull want:\n{want:?}",
            tail(got),
            tail(want)
        ))
    }

    fn fixture_template() -> ChatTemplate {
        ChatTemplate::from_dir(&repo().join("fixtures/tiny-31b-recipe"))
            .expect("fixture template loads")
            .expect("fixture has a chat template")
    }

    #[test]
    fn fixture_cases_render_like_transformers() {
        let cases = cases_file();
        let template = fixture_template();
        let mut failures = Vec::new();
        for case in array(&cases, "cases") {
            let name = case["name"].as_str().unwrap_or("?");
            let want = case["expected"].as_str().expect("expected text");
            let tools = tools_of(case);
            let agp = case["add_generation_prompt"].as_bool().unwrap_or(false);
            let kwargs = kwargs_of(case);

            match template.render(array(case, "template_messages"), tools, agp, &kwargs) {
                Ok(got) => {
                    if let Some(d) = difference(&got, want) {
                        failures.push(format!("[{name}] template_messages: {d}"));
                    }
                }
                Err(e) => failures.push(format!("[{name}] template_messages: {e}")),
            }

            let style = match case["tool_results"].as_str() {
                Some("keep") => ToolResults::Keep,
                _ => ToolResults::Attach,
            };
            let openai: Vec<Message> =
                serde_json::from_value(Json::Array(array(case, "openai_messages").to_vec()))
                    .unwrap_or_else(|e| panic!("[{name}] openai_messages: {e}"));
            let converted = to_template(&openai, style, &|i| format!("messages[{i}]"))
                .unwrap_or_else(|e| panic!("[{name}] conversion failed: {e}"));
            let want_messages = array(case, "template_messages");
            // The server gives the template `{"type": "image"}` for an image part (the image
            // goes to the vision tower); the case keeps the part as sent: compare renders only.
            let has_image = Json::Array(array(case, "openai_messages").to_vec())
                .to_string()
                .contains("image_url");
            if converted != want_messages && !has_image {
                failures.push(format!(
                    "[{name}] converted messages differ:\n  got:  {}\n  want: {}",
                    Json::Array(converted.clone()),
                    Json::Array(want_messages.to_vec())
                ));
            }
            match template.render(&converted, tools, agp, &kwargs) {
                Ok(got) => {
                    if let Some(d) = difference(&got, want) {
                        failures.push(format!("[{name}] converted openai_messages: {d}"));
                    }
                }
                Err(e) => failures.push(format!("[{name}] converted openai_messages: {e}")),
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }

    #[test]
    fn fixture_cases_tokenize_like_transformers() {
        let cases = cases_file();
        let path = repo().join(cases["tokenizer"].as_str().expect("tokenizer path"));
        let tokenizer = tokenizers::Tokenizer::from_file(&path).expect("tokenizer.json loads");
        let template = fixture_template();
        for case in array(&cases, "cases") {
            let name = case["name"].as_str().unwrap_or("?");
            let text = template
                .render(
                    array(case, "template_messages"),
                    tools_of(case),
                    case["add_generation_prompt"].as_bool().unwrap_or(false),
                    &kwargs_of(case),
                )
                .expect("renders");
            let want: Vec<u32> = array(case, "expected_ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            let got = tokenizer.encode(text.as_str(), false).expect("encodes");
            assert_eq!(got.get_ids(), want.as_slice(), "[{name}] token ids");
        }
    }

    #[test]
    fn fixture_template_is_loaded_with_the_special_tokens_transformers_passes() {
        let cases = cases_file();
        let template = fixture_template();
        let mut want: Vec<(String, String)> = cases["special_tokens"]
            .as_object()
            .expect("special_tokens")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("token text").to_owned()))
            .collect();
        let mut got = template.special_tokens.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(
            template.tool_results(),
            ToolResults::Attach,
            "the fixture template reads tool_responses, as Google's"
        );
    }

    /// Whether JSON objects and template dict literals keep their insertion order in this build.
    fn preserves_key_order() -> bool {
        let parsed: Json = serde_json::from_str(r#"{"b": 0, "a": 0}"#).expect("parses");
        let json_ordered = parsed
            .as_object()
            .and_then(|o| o.keys().next())
            .map(String::as_str)
            == Some("b");
        let t = ChatTemplate::from_source("{{ {'b': 0, 'a': 0} | list }}", "", "").expect("loads");
        let literal = t
            .render(&[json!({"role": "user"})], None, false, &Map::new())
            .expect("renders");
        json_ordered && literal == "['b', 'a']"
    }

    #[test]
    fn feature_templates_render_like_transformers() {
        let cases = cases_file();
        let special: Vec<(String, String)> = cases["special_tokens"]
            .as_object()
            .expect("special_tokens")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        let mut failures = Vec::new();
        let ordered = preserves_key_order();
        for feat in array(&cases, "feature_templates") {
            let name = feat["name"].as_str().unwrap_or("?");
            if feat["needs_preserve_order"].as_bool() == Some(true) && !ordered {
                eprintln!(
                    "[{name}] skipped: dicts are key-sorted in this build (serde_json and minijinja \
                     need their `preserve_order` features for Python's insertion order)"
                );
                continue;
            }
            let source = feat["template"].as_str().expect("template");
            let template =
                match ChatTemplate::from_source_with_special_tokens(source, special.clone()) {
                    Ok(t) => t,
                    Err(e) => {
                        failures.push(format!("[{name}] does not load: {e}"));
                        continue;
                    }
                };
            let result = template.render(
                array(feat, "messages"),
                tools_of(feat),
                feat["add_generation_prompt"].as_bool().unwrap_or(false),
                &kwargs_of(feat),
            );
            match (
                result,
                feat["expected"].as_str(),
                feat["expected_error"].as_str(),
            ) {
                (Ok(got), Some(want), _) => {
                    if let Some(d) = difference(&got, want) {
                        failures.push(format!("[{name}] {d}"));
                    }
                }
                (Err(e), None, Some(msg)) => {
                    if !e.0.contains(msg) {
                        failures.push(format!("[{name}] error {e:?} does not contain {msg:?}"));
                    }
                }
                (Ok(got), None, _) => {
                    failures.push(format!("[{name}] rendered {got:?}, expected an error"))
                }
                (Err(e), _, _) => failures.push(format!("[{name}] {e}")),
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }

    fn render_str(source: &str, messages: &[Json]) -> Result<String, TemplateError> {
        ChatTemplate::from_source(source, "<bos>", "<eos>")?.render(
            messages,
            None,
            false,
            &Map::new(),
        )
    }

    fn user(text: &str) -> Json {
        json!({"role": "user", "content": text})
    }

    /// The template features the published chat templates use, in one template: macros with keyword defaults and recursion,
    /// namespace(), dictsort, upper, trim, default, map('upper') | list, the tests mapping /
    /// sequence / string / boolean / defined / none, `.split`, slicing, `+` concatenation and
    /// loop.index0 / loop.last. (The fixture's feature templates check the same against Jinja2.)
    #[test]
    fn serving_md_feature_list() {
        let source = r#"
{%- macro show(v, depth=0, open='<', close='>') -%}
{%- if v is mapping -%}{{ open }}{% for k, x in v | dictsort %}{{ k | upper }}:{{ show(x, depth + 1) }}{{ ',' if not loop.last }}{% endfor %}{{ close }}
{%- elif v is string -%}"{{ v | trim }}"
{%- elif v is boolean -%}{{ 'yes' if v else 'no' }}
{%- elif v is none -%}nil
{%- elif v is sequence -%}[{% for x in v %}{{ loop.index0 }}={{ show(x, depth + 1, open='(', close=')') }}{{ ';' if not loop.last }}{% endfor %}]
{%- else -%}{{ v }}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(n=0, roles='') -%}
{%- for m in messages[1:] -%}
{%- set ns.n = ns.n + 1 -%}
{%- set ns.roles = ns.roles + m.role + ('' if loop.last else '/') -%}
{%- endfor -%}
{{ ns.n }} {{ ns.roles }} {{ messages[0].content.split(',') | map('upper') | list }} {{ missing | default('dflt') }} {{ (missing is defined) ~ '' }}
{{ show(messages[1].data) }}
"#;
        let messages = [
            json!({"role": "system", "content": "a,b"}),
            json!({"role": "user", "content": "x", "data": {"b": [1, {"z": null, "y": true}], "a": "  s  ", "c": false}}),
            json!({"role": "assistant", "content": "y"}),
        ];
        let got = render_str(source, &messages).expect("renders");
        assert_eq!(
            got,
            "2 user/assistant ['A', 'B'] dflt False\n<A:\"s\",B:[0=1;1=(Y:yes,Z:nil)],C:no>"
        );
    }

    #[test]
    fn syntax_error_is_an_error() {
        let err = ChatTemplate::from_source("{% if messages %}unclosed", "", "").unwrap_err();
        assert!(err.0.contains("does not parse"), "{err}");
        let err = ChatTemplate::from_source("{{ messages | }}", "", "").unwrap_err();
        assert!(err.0.contains("does not parse"), "{err}");
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('Only user messages, not ' + messages[0].role) }}{% endif %}ok";
        let err = render_str(source, &[json!({"role": "system", "content": "s"})]).unwrap_err();
        assert!(err.0.contains("Only user messages, not system"), "{err}");
        assert_eq!(render_str(source, &[user("hi")]).expect("renders"), "ok");
    }

    #[test]
    fn render_refuses_what_transformers_refuses() {
        let t = ChatTemplate::from_source("{{ messages | length }}", "", "").expect("loads");
        assert!(
            t.render(&[], None, false, &Map::new()).is_err(),
            "empty conversation"
        );
        assert!(
            t.render(&[json!("text")], None, false, &Map::new())
                .is_err(),
            "non-object message"
        );
        let mut kwargs = Map::new();
        kwargs.insert("messages".to_owned(), json!([]));
        let err = t.render(&[user("x")], None, false, &kwargs).unwrap_err();
        assert!(err.0.contains("messages"), "{err}");
    }

    #[test]
    fn kwargs_override_special_tokens_and_tools_none_is_defined() {
        let t = ChatTemplate::from_source(
            "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ tools | length if tools is not none }}|{{ documents is none }}|{{ add_generation_prompt }}",
            "<bos>",
            "<eos>",
        )
        .expect("loads");
        let mut kwargs = Map::new();
        kwargs.insert("eos_token".to_owned(), json!("<end>"));
        let tools = [json!({"type": "function", "function": {"name": "f"}})];
        assert_eq!(
            t.render(&[user("x")], None, true, &kwargs)
                .expect("renders"),
            "<bos>|<end>|True||True|True"
        );
        assert_eq!(
            t.render(&[user("x")], Some(&tools), false, &Map::new())
                .expect("renders"),
            "<bos>|<eos>|False|1|True|False"
        );
    }

    #[test]
    fn tool_results_style_follows_the_template() {
        let google_like =
            ChatTemplate::from_source("{{ messages[0].tool_responses }}", "", "").expect("loads");
        assert_eq!(google_like.tool_results(), ToolResults::Attach);
    }

    #[test]
    fn from_dir_reads_tokenizer_config() {
        let dir = std::env::temp_dir().join(format!("chat_template_test_{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        assert!(
            ChatTemplate::from_dir(&dir).expect("no error").is_none(),
            "no template at all"
        );
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "pad_token": null,
                "chat_template": [{"name": "default", "template": "D{{ bos_token }}{{ eos_token }}{{ pad_token is defined }}"},
                                  {"name": "tool_use", "template": "T{{ tools | length }}"}]}"#,
        )
        .expect("write config");
        let t = ChatTemplate::from_dir(&dir)
            .expect("loads")
            .expect("has a template");
        assert_eq!(
            t.render(&[user("x")], None, false, &Map::new())
                .expect("renders"),
            "D<s></s>False"
        );
        let tools = [json!({"type": "function", "function": {"name": "f"}})];
        assert_eq!(
            t.render(&[user("x")], Some(&tools), false, &Map::new())
                .expect("renders"),
            "T1"
        );
        std::fs::write(dir.join("chat_template.jinja"), "J{{ bos_token }}\n").expect("write jinja");
        let t = ChatTemplate::from_dir(&dir)
            .expect("loads")
            .expect("has a template");
        assert_eq!(
            t.render(&[user("x")], Some(&tools), false, &Map::new())
                .expect("renders"),
            "J<s>"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn floats_print_as_python_does() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (2.5e-7, "2.5e-07"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (-0.0, "-0.0"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(py_float_repr(x), want);
        }
    }

    /// Python's `time.strftime(format, time.gmtime(t))` gives the same.
    #[test]
    fn strftime_formats_utc() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(
            strftime("%d %b %Y, %A %B %a %%", t),
            "29 Feb 2024, Thursday February Thu %"
        );
        assert_eq!(strftime("%Y-%m-%d %A", 0), "1970-01-01 Thursday");
        assert_eq!(strftime("%d %B %Y %a", -31_622_400), "31 December 1968 Tue");
        assert_eq!(
            strftime("%B %d, %Y %A", 951_782_400),
            "February 29, 2000 Tuesday"
        );
        assert_eq!(strftime("%H:%M:%S %a", 4_102_444_799), "23:59:59 Thu");
        // Directives no chat template uses are written as is (Python: "060").
        assert_eq!(strftime("%j", t), "%j");
        let now = render_str("{{ strftime_now('%Y') }}", &[user("x")]).expect("renders");
        assert!(now.len() == 4 && now.starts_with("20"), "{now}");
    }

    /// Differences from Jinja2 that remain, pinned so a change is noticed (Jinja2's output in
    /// the comments). None matters to the chat templates published (Gemma 4's, Llama's, Qwen's,
    /// ...): they test `is string` / `is mapping` before `is sequence`, and call only the Python
    /// methods minijinja-contrib's pycompat has.
    #[test]
    fn known_divergences_from_jinja2() {
        let r = |s: &str| render_str(s, &[user("x")]);
        // `~` formats floats with minijinja's Display: Jinja2 "x1e-05".
        assert_eq!(r("{{ 'x' ~ 1e-5 }}").expect("renders"), "x0.00001");
        // Attribute syntax finds dict keys before methods: Jinja2 gives the bound method `items`.
        assert_eq!(r("{{ {'items': 5}.items }}").expect("renders"), "5");
        // Macro defaults cannot see earlier parameters: Jinja2 "x!".
        assert_eq!(
            r("{% macro m(a, b=a ~ '!') %}{{ b }}{% endmacro %}{{ m('x') }}").expect("renders"),
            "!"
        );
        // Strings and dicts are not sequences, None is iterable: Jinja2 "True True False".
        assert_eq!(
            r("{{ 's' is sequence }} {{ {} is sequence }} {{ none is iterable }}")
                .expect("renders"),
            "False False True"
        );
        // pycompat's methods: `title` starts words after whitespace only, `splitlines` breaks at
        // `\n` only, `strip` and `split` use Rust's whitespace: Jinja2 "O'Neil 2 1".
        assert_eq!(
            r("{{ \"o'neil\".title() }} {{ 'a\\rb'.splitlines() | length }} {{ '\\x1ca'.strip() | length }}")
                .expect("renders"),
            "O'neil 1 2"
        );
        // `indent` drops a trailing newline: Jinja2 "a\n  b\n".
        assert_eq!(
            r("{{ 'a\\nb\\n' | indent(2) }}").expect("renders"),
            "a\n  b"
        );
        // Errors where Jinja2 renders: Python methods pycompat lacks, `int` of a non-number
        // (Jinja2 0), a macro assigning to an outer namespace it does not read, `varargs` /
        // `kwargs` in macros, `%` formatting, cycler / joiner.
        assert!(r("{{ 'a b'.rsplit(' ', 1) }}").is_err());
        assert!(r("{{ 'abc' | int }}").is_err());
        assert!(r(
            "{% set ns = namespace(x=1) %}{% macro m() %}{% set ns.x = 2 %}{% endmacro %}{{ m() }}"
        )
        .is_err());
        assert!(r("{% macro m(a) %}{{ varargs }}{% endmacro %}{{ m(1, 2) }}").is_err());
        assert!(r("{{ '%s' % 'a' }}").is_err());
        assert!(r("{% set j = joiner(', ') %}{{ j() }}").is_err());
    }
}
