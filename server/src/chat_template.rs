//! Chat template rendering: the checkpoint's `chat_template.jinja` run through minijinja, set up to
//! render byte-for-byte what transformers' `apply_chat_template(..., tokenize=False)` renders.
//!
//! transformers renders with Jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])` plus its own `tojson`,
//! `raise_exception`, `strftime_now`, `dict` and `namespace` (see
//! `transformers/utils/chat_template_utils.py`). Before rendering it drops the `None` values of
//! every message, aliases reasoning fields (`reasoning_content` / `thinking` / `reasoning`), and
//! passes the tokenizer's special tokens (`bos_token`, ...) and the caller's kwargs as variables.
//! This module does the same; where minijinja differs from Jinja2 the environment overrides it:
//! values print as Python's `str()` does (`None`, `True`, `['a', 1.0]`, `('k', 'v')`, `1e-05`),
//! `tojson` is `json.dumps` (`", "` / `": "` separators, no HTML escaping, `ensure_ascii=False`),
//! the tests `sequence` / `iterable` follow Python (strings and dicts are sequences), `trim`,
//! `strip`, `split` and friends use Python's whitespace, `round` rounds half to even, and
//! transformers' `{% generation %}` tag is accepted. Checked against transformers renders in
//! `fixtures/chat/cases.json` (written by `conformance/fixtures_gen/chat_renders.py`).
//!
//! OpenAI messages are converted to what the template reads first ([`convert_openai_messages`]):
//! Google's Gemma 4 template reads tool results from `tool_responses` on the model message that
//! made the calls; templates that read `role: "tool"` messages instead (like the fixtures' one)
//! get the tool messages kept ([`ChatTemplate::convert_openai_messages`] picks by template).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::Path;
use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Kwargs, Object, ObjectExt, ObjectRepr, Rest, Tuple, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior, Value};
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
    /// serving.md's rule, for templates that read `tool_responses` (Google's Gemma 4 template):
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

    /// [`convert_openai_messages_with`] in the style this template reads ([`Self::tool_results`]).
    pub fn convert_openai_messages(&self, messages: &[Json]) -> Result<Vec<Json>, TemplateError> {
        convert_openai_messages_with(messages, self.tool_results())
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
            ctx.insert(k.clone(), json_to_value(v));
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
                Some(t) => Value::from(t.iter().map(json_to_value).collect::<Vec<_>>()),
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
/// `reasoning_content` and, unless present, `thinking`.
fn normalise_message(message: &Json) -> Value {
    let Json::Object(obj) = message else {
        unreachable!("render checks that every message is an object");
    };
    let mut pairs: Vec<(String, Value)> = Vec::with_capacity(obj.len() + 2);
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()));
    if let Some(r) = reasoning {
        if obj.get("thinking").is_none_or(Json::is_null) {
            pairs.push(("thinking".to_owned(), json_to_value(r)));
        }
    }
    for (k, v) in obj {
        if v.is_null() || (k == "reasoning_content" && reasoning.is_some()) {
            continue;
        }
        pairs.push((k.clone(), json_to_value(v)));
    }
    if let Some(r) = reasoning {
        pairs.push(("reasoning_content".to_owned(), json_to_value(r)));
    }
    dict_value(pairs)
}

/// A Python dict: keys in insertion order (minijinja's own maps are sorted unless its
/// `preserve_order` feature is on). Keys are few per dict, so lookups scan.
#[derive(Debug)]
struct PyDict(Vec<(Value, Value)>);

impl Object for PyDict {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_key_value_enumerator(|this| Box::new(this.0.iter().cloned()))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

fn dict_value(pairs: Vec<(String, Value)>) -> Value {
    Value::from_object(PyDict(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    ))
}

fn json_to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => Value::from(items.iter().map(json_to_value).collect::<Vec<_>>()),
        Json::Object(obj) => dict_value(
            obj.iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        ),
    }
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
    env.set_unknown_method_callback(python_methods);
    env.set_formatter(|out, _state, value| {
        let mut s = String::new();
        py_str(value, &mut s);
        out.write_str(&s).map_err(Error::from)
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_filter("trim", trim);
    env.add_filter("string", string_filter);
    env.add_filter("join", join);
    env.add_filter("round", round);
    env.add_filter("default", default);
    env.add_filter("d", default);
    env.add_filter("indent", indent);
    env.add_filter("attr", attr);
    env.add_filter("int", int_filter);
    env.add_filter("float", float_filter);
    env.add_global("dict", Value::from_object(DictGlobal));
    env.add_test("sequence", |v: &Value| {
        v.is_undefined()
            || matches!(
                v.kind(),
                ValueKind::Seq | ValueKind::Map | ValueKind::String
            )
    });
    env.add_test("iterable", |v: &Value| {
        v.is_undefined()
            || matches!(
                v.kind(),
                ValueKind::Seq | ValueKind::Map | ValueKind::String | ValueKind::Iterable
            )
    });
    Ok(env)
}

/// Source rewrites that make minijinja run a template as Jinja2 does (none changes the output's
/// whitespace: each keeps the tag's whitespace-control markers):
/// - Jinja2's newline normalisation: `\r\n` and `\r` in the source read as `\n`;
/// - transformers' `{% generation %}...{% endgeneration %}` (its AssistantTracker extension only
///   marks assistant text; rendered, it is its body in its own scope) becomes `{% with %}`;
/// - `{% set ns.attr = ... %}` gets `{% if ns is defined %}{% endif %}` in front: minijinja's
///   macros only see the outer variables their expressions read, and a namespace that a macro
///   only assigns to would otherwise be undefined inside it (Jinja2 resolves it at call time).
fn preprocess_source(source: &str) -> String {
    let normalised;
    let source = if source.contains('\r') {
        normalised = source.replace("\r\n", "\n").replace('\r', "\n");
        normalised.as_str()
    } else {
        source
    };
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        if let Some((replacement, consumed)) = rewrite_tag(tag) {
            out.push_str(&replacement);
            rest = &tag[consumed..];
        } else {
            // `{% raw %}` content is copied as is.
            let raw_end = parse_tag_word(tag)
                .filter(|(_, word, _)| *word == "raw")
                .and_then(|_| {
                    tag.find("endraw")
                        .and_then(|i| tag[i..].find("%}").map(|j| i + j + 2))
                });
            let n = raw_end.unwrap_or(2);
            out.push_str(&tag[..n]);
            rest = &tag[n..];
        }
    }
    out.push_str(rest);
    out
}

/// For a tag `{%[-+] word...`: (marker, word, rest after the word).
fn parse_tag_word(tag: &str) -> Option<(&str, &str, &str)> {
    let body = tag.strip_prefix("{%")?;
    let (marker, body) = match body.as_bytes().first() {
        Some(b'-' | b'+') => (&body[..1], &body[1..]),
        _ => ("", body),
    };
    let body = body.trim_start();
    let end = body
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(body.len());
    Some((marker, &body[..end], &body[end..]))
}

/// `tag` starts with `{%`: the rewrite of a (end)generation or `set NAME.ATTR` tag and the
/// length of source it replaces.
fn rewrite_tag(tag: &str) -> Option<(String, usize)> {
    let (marker, word, after) = parse_tag_word(tag)?;
    match word {
        "generation" | "endgeneration" => {
            let after = after.trim_start();
            let (close_marker, after) = match after.as_bytes().first() {
                Some(b'-' | b'+') => (&after[..1], &after[1..]),
                _ => ("", after),
            };
            let after = after.strip_prefix("%}")?;
            let replacement_word = if word == "generation" {
                "with"
            } else {
                "endwith"
            };
            Some((
                format!("{{%{marker} {replacement_word} {close_marker}%}}"),
                tag.len() - after.len(),
            ))
        }
        "set" => {
            let target = after.trim_start();
            let name_end = target
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(target.len());
            let name = &target[..name_end];
            let is_ident = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            if !is_ident || !target[name_end..].trim_start().starts_with('.') {
                return None;
            }
            // Re-emit the tag's start after the no-op `if`; the rest of the tag follows untouched.
            let consumed = tag.len() - after.len();
            Some((
                format!("{{%{marker} if {name} is defined %}}{{% endif %}}{{% set"),
                consumed,
            ))
        }
        _ => None,
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

// ---------------------------------------------------------------------------------------------
// Python's str() and repr().

/// Python's `str(value)`, as Jinja2 prints a value.
fn py_str(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::String => out.push_str(v.as_str().unwrap_or_default()),
        _ => py_repr(v, out),
    }
}

/// Python's `repr(value)` for the JSON-like values templates see.
fn py_repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if v.is_integer() {
                let _ = write!(out, "{v}");
            } else {
                out.push_str(&py_float_repr(f64::try_from(v.clone()).unwrap_or(f64::NAN)));
            }
        }
        ValueKind::String => py_repr_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            let tuple = v.downcast_object_ref::<Tuple>().is_some();
            out.push(if tuple { '(' } else { '[' });
            let mut n = 0;
            if let Ok(iter) = v.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&item, out);
                    n += 1;
                }
            }
            if tuple && n == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = v.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&key, out);
                    out.push_str(": ");
                    py_repr(&v.get_item(&key).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
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

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`, escapes for
/// backslash, the quote, `\t \n \r` and non-printable characters.
fn py_repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let cp = c as u32;
                let _ = if cp <= 0xff {
                    write!(out, "\\x{cp:02x}")
                } else if cp <= 0xffff {
                    write!(out, "\\u{cp:04x}")
                } else {
                    write!(out, "\\U{cp:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for one character: false for the categories Cc, Cf, Zs (but
/// space), Zl, Zp, Co (unassigned code points, Cn, are not tracked).
fn py_printable(c: char) -> bool {
    let cp = c as u32;
    !matches!(cp,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad
        | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x890..=0x891 | 0x8e2
        | 0x1680 | 0x180e
        | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x2066..=0x206f
        | 0x3000 | 0xe000..=0xf8ff | 0xfeff | 0xfff9..=0xfffb
        | 0x110bd | 0x110cd | 0x13430..=0x1343f | 0x1bca0..=0x1bca3 | 0x1d173..=0x1d17a
        | 0xe0001 | 0xe0020..=0xe007f | 0xf0000..=0x10ffff)
}

// ---------------------------------------------------------------------------------------------
// Filters.

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, positional arguments in that order.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    let mut opts: [Option<Value>; 4] = Default::default();
    if args.len() > NAMES.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    for (slot, v) in opts.iter_mut().zip(args.iter()) {
        *slot = Some(v.clone());
    }
    for (slot, name) in opts.iter_mut().zip(NAMES) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if slot.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson got multiple values for argument '{name}'"),
                ));
            }
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = opts;
    let truthy = |v: &Option<Value>| v.as_ref().is_some_and(Value::is_true);
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson indent must be an int or a string",
                    )
                })?;
                " ".repeat(n.max(0) as usize)
            }
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => (
                    a.as_str().unwrap_or_default().to_owned(),
                    b.as_str().unwrap_or_default().to_owned(),
                ),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be an (item, key) pair",
                    ))
                }
            }
        }
        _ => (
            (if indent.is_some() { "," } else { ", " }).to_owned(),
            ": ".to_owned(),
        ),
    };
    let opts = JsonOpts {
        ensure_ascii: truthy(&ensure_ascii),
        indent,
        item_sep,
        key_sep,
        sort_keys: truthy(&sort_keys),
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
        ValueKind::Number => {
            if v.is_integer() {
                let _ = write!(out, "{v}");
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&if f.is_nan() {
                    "NaN".to_owned()
                } else if f.is_infinite() {
                    if f < 0.0 { "-Infinity" } else { "Infinity" }.to_owned()
                } else {
                    py_float_repr(f)
                });
            }
        }
        ValueKind::String => json_str(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable if v.len().is_some() => {
            let items: Vec<Value> = v.try_iter()?.collect();
            json_container(out, o, level, '[', ']', items.len(), |i, out| {
                json_dumps(&items[i], o, level + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let k = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
                    ValueKind::None => "null".to_owned(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
                    ValueKind::Number if key.is_integer() => key.to_string(),
                    ValueKind::Number => py_float_repr(f64::try_from(key.clone())?),
                    _ => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "keys must be str, int, float, bool or None, not {}",
                                key.kind()
                            ),
                        ))
                    }
                };
                entries.push((k, v.get_item(&key)?));
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
            let ty = if kind == ValueKind::Undefined {
                "Undefined".to_owned()
            } else {
                kind.to_string()
            };
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {ty} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

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
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    newline(out, level + 1);
    for i in 0..len {
        if i > 0 {
            out.push_str(&o.item_sep);
            newline(out, level + 1);
        }
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
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
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

/// Python's whitespace (`str.isspace`, what `str.strip()` and `str.split()` use).
fn py_space(c: char) -> bool {
    matches!(c,
        '\t'..='\r' | '\u{1c}'..='\u{20}' | '\u{85}' | '\u{a0}' | '\u{1680}'
        | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

/// Python's `str.strip(chars)` (`start`/`end` select lstrip / rstrip).
fn py_strip<'a>(s: &'a str, chars: Option<&str>, start: bool, end: bool) -> &'a str {
    let strip = |c: char| match chars {
        Some(set) => set.contains(c),
        None => py_space(c),
    };
    let mut s = s;
    if start {
        s = s.trim_start_matches(strip);
    }
    if end {
        s = s.trim_end_matches(strip);
    }
    s
}

/// Jinja2's `trim(chars=None)`: Python's `str.strip`.
fn trim(value: &Value, chars: Option<String>) -> String {
    let mut s = String::new();
    py_str(value, &mut s);
    py_strip(&s, chars.as_deref(), true, true).to_owned()
}

/// Jinja2's `string`: Python's `str()`.
fn string_filter(value: &Value) -> String {
    let mut s = String::new();
    py_str(value, &mut s);
    s
}

/// Jinja2's `join(d='', attribute=None)`: items through Python's `str()`.
fn join(state: &State, value: &Value, d: Option<String>, kwargs: Kwargs) -> Result<String, Error> {
    let attribute: Option<Value> = kwargs.get("attribute")?;
    kwargs.assert_all_used()?;
    if value.is_undefined() || value.is_none() {
        return Ok(String::new());
    }
    let mut out = String::new();
    let items: Vec<Value> = if value.kind() == ValueKind::String {
        value
            .as_str()
            .unwrap_or_default()
            .chars()
            .map(Value::from)
            .collect()
    } else {
        value.try_iter()?.collect()
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(d.as_deref().unwrap_or(""));
        }
        let item = match &attribute {
            Some(a) => get_path(state, item, a)?,
            None => item.clone(),
        };
        py_str(&item, &mut out);
    }
    Ok(out)
}

/// Jinja2's attribute lookup for `attribute=` arguments: a dotted path, integer parts as indices.
fn get_path(_state: &State, value: &Value, path: &Value) -> Result<Value, Error> {
    if path.is_integer() {
        return value.get_item(path);
    }
    let mut v = value.clone();
    for part in path.as_str().unwrap_or_default().split('.') {
        v = match part.parse::<i64>() {
            Ok(i) => v.get_item(&Value::from(i))?,
            Err(_) => v.get_attr(part)?,
        };
    }
    Ok(v)
}

/// Jinja2's `indent(width=4, first=False, blank=False)`; `width` may be a string.
fn indent(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    let arg = |i: usize, name: &str| -> Result<Option<Value>, Error> {
        Ok(match kwargs.get::<Option<Value>>(name)? {
            Some(v) => Some(v),
            None => args.get(i).cloned(),
        })
    };
    let width = arg(0, "width")?;
    let first = arg(1, "first")?.is_some_and(|v| v.is_true());
    let blank = arg(2, "blank")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let indention = match &width {
        None => "    ".to_owned(),
        Some(w) if w.kind() == ValueKind::String => w.as_str().unwrap_or_default().to_owned(),
        Some(w) => " ".repeat(i64::try_from(w.clone())?.max(0) as usize),
    };
    let mut s = String::new();
    py_str(value, &mut s);
    s.push('\n');
    let lines = py_splitlines(&s, false);
    let mut rv = if blank {
        lines.join(&format!("\n{indention}"))
    } else {
        let mut it = lines.iter();
        let mut rv = it.next().cloned().unwrap_or_default();
        let rest: Vec<String> = it
            .map(|l| {
                if l.is_empty() {
                    String::new()
                } else {
                    format!("{indention}{l}")
                }
            })
            .collect();
        if !rest.is_empty() {
            rv.push('\n');
            rv.push_str(&rest.join("\n"));
        }
        rv
    };
    if first {
        rv.insert_str(0, &indention);
    }
    Ok(rv)
}

/// Jinja2's `attr(name)`: Python `getattr`, which finds no keys of a dict (only its methods).
fn attr(state: &State, value: &Value, name: &str) -> Result<Value, Error> {
    let _ = state;
    if value.kind() == ValueKind::Map {
        return Ok(Value::UNDEFINED);
    }
    Ok(value.get_attr(name).unwrap_or(Value::UNDEFINED))
}

/// Python's `int(text, base)`: optional sign, base prefix, `_` between digits, whitespace around.
fn py_parse_int(text: &str, base: u32) -> Option<i64> {
    let t = py_strip(text, None, true, true);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let lower = t.to_ascii_lowercase();
    let prefixed = |p: &str, b: u32| (base == b || base == 0) && lower.starts_with(p);
    let (digits, base) = if prefixed("0x", 16) {
        (&t[2..], 16)
    } else if prefixed("0o", 8) {
        (&t[2..], 8)
    } else if prefixed("0b", 2) {
        (&t[2..], 2)
    } else {
        (t, if base == 0 { 10 } else { base })
    };
    let digits = digits
        .strip_prefix('_')
        .filter(|_| digits.len() != t.len())
        .unwrap_or(digits);
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let v = i64::from_str_radix(&digits.replace('_', ""), base).ok()?;
    Some(if neg { -v } else { v })
}

/// Python's `float(text)`.
fn py_parse_float(text: &str) -> Option<f64> {
    let t = py_strip(text, None, true, true);
    let plain = t.replace('_', "");
    if t.contains("__") || t.starts_with('_') || t.ends_with('_') {
        return None;
    }
    let lower = plain.to_ascii_lowercase();
    let body = lower.trim_start_matches(['+', '-']);
    if matches!(body, "inf" | "infinity" | "nan") {
        let v = if body == "nan" {
            f64::NAN
        } else {
            f64::INFINITY
        };
        return Some(if lower.starts_with('-') { -v } else { v });
    }
    if body.is_empty()
        || !body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | '+' | '-'))
    {
        return None;
    }
    plain.parse::<f64>().ok()
}

/// Jinja2's `int(default=0, base=10)`.
fn int_filter(value: &Value, default: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let base: Option<u32> = kwargs.get("base")?;
    let default = match kwargs.get::<Option<Value>>("default")? {
        Some(d) => Some(d),
        None => default,
    };
    kwargs.assert_all_used()?;
    let default = default.unwrap_or(Value::from(0));
    let as_int = |f: f64| {
        if f.is_finite() {
            Some(Value::from(f.trunc() as i64))
        } else {
            None
        }
    };
    let rv = match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            py_parse_int(s, base.unwrap_or(10))
                .map(Value::from)
                .or_else(|| py_parse_float(s).and_then(as_int))
        }
        ValueKind::Bool => Some(Value::from(i64::from(value.is_true()))),
        ValueKind::Number if value.is_integer() => Some(value.clone()),
        ValueKind::Number => f64::try_from(value.clone()).ok().and_then(as_int),
        _ => None,
    };
    Ok(rv.unwrap_or(default))
}

/// Jinja2's `float(default=0.0)`.
fn float_filter(value: &Value, default: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let default = match kwargs.get::<Option<Value>>("default")? {
        Some(d) => Some(d),
        None => default,
    };
    kwargs.assert_all_used()?;
    let rv = match value.kind() {
        ValueKind::String => py_parse_float(value.as_str().unwrap_or_default()),
        ValueKind::Bool => Some(if value.is_true() { 1.0 } else { 0.0 }),
        ValueKind::Number => f64::try_from(value.clone()).ok(),
        _ => None,
    };
    Ok(rv
        .map(Value::from)
        .unwrap_or_else(|| default.unwrap_or(Value::from(0.0))))
}

/// transformers' `dict` global: `dict(**kwargs)`, `dict(mapping_or_pairs, **kwargs)` and
/// `dict.fromkeys(keys, value=None)`.
#[derive(Debug)]
struct DictGlobal;

impl Object for DictGlobal {
    fn call(self: &Arc<Self>, _state: &mut State<'_, '_>, args: &[Value]) -> Result<Value, Error> {
        let (source, kwargs): (Option<Value>, Kwargs) = minijinja::value::from_args(args)?;
        let mut pairs: Vec<(Value, Value)> = Vec::new();
        let mut put = |k: Value, v: Value| match pairs.iter_mut().find(|(pk, _)| *pk == k) {
            Some(slot) => slot.1 = v,
            None => pairs.push((k, v)),
        };
        if let Some(src) = source {
            if src.kind() == ValueKind::Map {
                for k in src.try_iter()? {
                    let v = src.get_item(&k)?;
                    put(k, v);
                }
            } else {
                for item in src.try_iter()? {
                    let kv: Vec<Value> = item.try_iter()?.collect();
                    let [k, v] = <[Value; 2]>::try_from(kv).map_err(|_| {
                        Error::new(ErrorKind::InvalidOperation, "dict() items must be pairs")
                    })?;
                    put(k, v);
                }
            }
        }
        for name in kwargs.args() {
            put(Value::from(name), kwargs.peek::<Value>(name)?);
        }
        Ok(Value::from_object(PyDict(pairs)))
    }

    fn call_method(
        self: &Arc<Self>,
        _state: &mut State<'_, '_>,
        method: &str,
        args: &[Value],
    ) -> Result<Value, Error> {
        if method != "fromkeys" {
            return Err(Error::from(ErrorKind::UnknownMethod));
        }
        let (keys, value): (Value, Option<Value>) = minijinja::value::from_args(args)?;
        let value = value.unwrap_or(Value::from(()));
        let mut pairs: Vec<(Value, Value)> = Vec::new();
        for k in keys.try_iter()? {
            if !pairs.iter().any(|(pk, _)| *pk == k) {
                pairs.push((k, value.clone()));
            }
        }
        Ok(Value::from_object(PyDict(pairs)))
    }
}

/// Jinja2's `default(default_value='', boolean=False)`: the default for an undefined value, or
/// with `boolean` for any falsy one.
fn default(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let mut default_value: Option<Value> = args.first().cloned();
    let mut boolean: Option<Value> = args.get(1).cloned();
    if args.len() > 2 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "default takes at most 2 arguments",
        ));
    }
    if let Some(v) = kwargs.get::<Option<Value>>("default_value")? {
        default_value = Some(v);
    }
    if let Some(v) = kwargs.get::<Option<Value>>("boolean")? {
        boolean = Some(v);
    }
    kwargs.assert_all_used()?;
    let boolean = boolean.is_some_and(|b| b.is_true());
    if value.is_undefined() || (boolean && !value.is_true()) {
        Ok(default_value.unwrap_or_else(|| Value::from("")))
    } else {
        Ok(value.clone())
    }
}

/// Jinja2's `round(precision=0, method='common')`: Python's `round` (half to even on the exact
/// binary value), always a float.
fn round(value: &Value, precision: Option<i32>, method: Option<String>) -> Result<Value, Error> {
    let x = f64::try_from(value.clone())?;
    let p = precision.unwrap_or(0);
    // Python's round() of an int is an int (Jinja2's `common` method calls it directly).
    if value.is_integer() && method.as_deref().unwrap_or("common") == "common" {
        if p >= 0 {
            return Ok(value.clone());
        }
        let m = 10f64.powi(-p);
        return Ok(Value::from(((x / m).round_ties_even() * m) as i64));
    }
    let rv = match method.as_deref().unwrap_or("common") {
        "common" => {
            if p >= 0 {
                // Rust formats exact ties half to even, as Python's correctly rounded round().
                format!("{x:.prec$}", prec = p as usize)
                    .parse::<f64>()
                    .unwrap_or(x)
            } else {
                let m = 10f64.powi(-p);
                (x / m).round_ties_even() * m
            }
        }
        "ceil" => {
            let m = 10f64.powi(p);
            (x * m).ceil() / m
        }
        "floor" => {
            let m = 10f64.powi(p);
            (x * m).floor() / m
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "method must be common, ceil or floor",
            ))
        }
    };
    Ok(Value::from(rv))
}

// ---------------------------------------------------------------------------------------------
// Python methods on strings, dicts and lists.

/// `str` methods whose Python semantics differ from minijinja-contrib's pycompat (whitespace,
/// splitting) or that it lacks; everything else goes to pycompat.
fn python_methods(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str().filter(|_| value.kind() == ValueKind::String) {
        match method {
            "strip" | "lstrip" | "rstrip" => {
                let (chars, kwargs): (Option<Value>, Kwargs) = minijinja::value::from_args(args)?;
                let chars = match chars.or(kwargs.get::<Option<Value>>("chars")?) {
                    Some(c) if !c.is_none() => {
                        Some(c.as_str().map(str::to_owned).ok_or_else(|| {
                            Error::new(ErrorKind::InvalidOperation, "strip arg must be None or str")
                        })?)
                    }
                    _ => None,
                };
                kwargs.assert_all_used()?;
                let (start, end) = match method {
                    "strip" => (true, true),
                    "lstrip" => (true, false),
                    _ => (false, true),
                };
                return Ok(Value::from(py_strip(s, chars.as_deref(), start, end)));
            }
            "split" | "rsplit" => {
                let (sep, maxsplit, kwargs): (Option<Value>, Option<i64>, Kwargs) =
                    minijinja::value::from_args(args)?;
                let sep = sep.or(kwargs.get::<Option<Value>>("sep")?);
                let maxsplit = maxsplit
                    .or(kwargs.get::<Option<i64>>("maxsplit")?)
                    .unwrap_or(-1);
                kwargs.assert_all_used()?;
                let sep = match &sep {
                    Some(v) if !v.is_none() => Some(v.as_str().ok_or_else(|| {
                        Error::new(ErrorKind::InvalidOperation, "must be str or None")
                    })?),
                    _ => None,
                };
                if sep == Some("") {
                    return Err(Error::new(ErrorKind::InvalidOperation, "empty separator"));
                }
                let max = if maxsplit < 0 {
                    usize::MAX
                } else {
                    maxsplit as usize
                };
                let parts = py_split(s, sep, max, method == "rsplit");
                return Ok(Value::from(
                    parts.into_iter().map(Value::from).collect::<Vec<_>>(),
                ));
            }
            "splitlines" => {
                let (keepends, kwargs): (Option<bool>, Kwargs) = minijinja::value::from_args(args)?;
                let keepends = keepends
                    .or(kwargs.get::<Option<bool>>("keepends")?)
                    .unwrap_or(false);
                kwargs.assert_all_used()?;
                return Ok(Value::from(
                    py_splitlines(s, keepends)
                        .into_iter()
                        .map(Value::from)
                        .collect::<Vec<_>>(),
                ));
            }
            "removeprefix" => {
                let (p,): (&str,) = minijinja::value::from_args(args)?;
                return Ok(Value::from(s.strip_prefix(p).unwrap_or(s)));
            }
            "removesuffix" => {
                let (p,): (&str,) = minijinja::value::from_args(args)?;
                return Ok(Value::from(s.strip_suffix(p).unwrap_or(s)));
            }
            "partition" | "rpartition" => {
                let (sep,): (&str,) = minijinja::value::from_args(args)?;
                let found = if method == "partition" {
                    s.find(sep)
                } else {
                    s.rfind(sep)
                };
                let parts = match found {
                    Some(i) => [&s[..i], sep, &s[i + sep.len()..]],
                    None if method == "partition" => [s, "", ""],
                    None => ["", "", s],
                };
                return Ok(Value::from(Tuple::from(parts.map(Value::from))));
            }
            "title" => {
                let () = minijinja::value::from_args(args)?;
                return Ok(Value::from(py_title(s)));
            }
            "swapcase" => {
                let () = minijinja::value::from_args(args)?;
                let mut out = String::with_capacity(s.len());
                for c in s.chars() {
                    if c.is_uppercase() {
                        out.extend(c.to_lowercase());
                    } else if c.is_lowercase() {
                        out.extend(c.to_uppercase());
                    } else {
                        out.push(c);
                    }
                }
                return Ok(Value::from(out));
            }
            "casefold" => {
                let () = minijinja::value::from_args(args)?;
                return Ok(Value::from(s.to_lowercase()));
            }
            "index" | "rindex" => {
                let (sub,): (&str,) = minijinja::value::from_args(args)?;
                let found = if method == "index" {
                    s.find(sub)
                } else {
                    s.rfind(sub)
                };
                return match found {
                    Some(i) => Ok(Value::from(s[..i].chars().count())),
                    None => Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "substring not found",
                    )),
                };
            }
            "zfill" => {
                let (width,): (usize,) = minijinja::value::from_args(args)?;
                let n = s.chars().count();
                if n >= width {
                    return Ok(Value::from(s));
                }
                let (sign, rest) = match s.chars().next() {
                    Some(c @ ('+' | '-')) => (c.to_string(), &s[1..]),
                    _ => (String::new(), s),
                };
                return Ok(Value::from(format!(
                    "{sign}{}{rest}",
                    "0".repeat(width - n)
                )));
            }
            "ljust" | "rjust" | "center" => {
                let (width, fill): (usize, Option<&str>) = minijinja::value::from_args(args)?;
                let fill = fill.unwrap_or(" ");
                let n = s.chars().count();
                if n >= width {
                    return Ok(Value::from(s));
                }
                let pad = width - n;
                let (left, right) = match method {
                    "ljust" => (0, pad),
                    "rjust" => (pad, 0),
                    // Python's center: the odd extra character goes left when the width is odd.
                    _ => {
                        let left = pad / 2 + (pad & width & 1);
                        (left, pad - left)
                    }
                };
                return Ok(Value::from(format!(
                    "{}{s}{}",
                    fill.repeat(left),
                    fill.repeat(right)
                )));
            }
            "isspace" => {
                let () = minijinja::value::from_args(args)?;
                return Ok(Value::from(!s.is_empty() && s.chars().all(py_space)));
            }
            "join" => {
                let (items,): (Value,) = minijinja::value::from_args(args)?;
                let mut out = String::new();
                for (i, item) in items.try_iter()?.enumerate() {
                    if i > 0 {
                        out.push_str(s);
                    }
                    match item.as_str().filter(|_| item.kind() == ValueKind::String) {
                        Some(t) => out.push_str(t),
                        None => {
                            return Err(Error::new(
                                ErrorKind::InvalidOperation,
                                format!(
                                    "sequence item {i}: expected str instance, {} found",
                                    item.kind()
                                ),
                            ))
                        }
                    }
                }
                return Ok(Value::from(out));
            }
            _ => {}
        }
    }
    match (value.kind(), method) {
        (ValueKind::Seq, "index") => {
            let (what,): (Value,) = minijinja::value::from_args(args)?;
            for (i, item) in value.try_iter()?.enumerate() {
                if item == what {
                    return Ok(Value::from(i));
                }
            }
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("{what} is not in list"),
            ));
        }
        (ValueKind::Map, "copy") => {
            let () = minijinja::value::from_args(args)?;
            return Ok(value.clone());
        }
        _ => {}
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Python's `str.title`: a cased character after a cased one is lowered, any other is raised.
fn py_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_cased = false;
    for c in s.chars() {
        let cased = c.is_lowercase() || c.is_uppercase();
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = cased;
    }
    out
}

/// Python's `str.split` / `str.rsplit` (`sep` None: runs of whitespace, no empty parts).
fn py_split(s: &str, sep: Option<&str>, max: usize, from_right: bool) -> Vec<String> {
    match sep {
        Some(sep) => {
            let mut parts: Vec<String> = if from_right {
                let mut v: Vec<String> = s
                    .rsplitn(max.saturating_add(1), sep)
                    .map(str::to_owned)
                    .collect();
                v.reverse();
                v
            } else {
                s.splitn(max.saturating_add(1), sep)
                    .map(str::to_owned)
                    .collect()
            };
            if parts.is_empty() {
                parts.push(String::new());
            }
            parts
        }
        None => {
            let chars: Vec<(usize, char)> = s.char_indices().collect();
            let mut parts = Vec::new();
            if !from_right {
                let mut i = 0;
                while i < chars.len() {
                    while i < chars.len() && py_space(chars[i].1) {
                        i += 1;
                    }
                    if i == chars.len() {
                        break;
                    }
                    if parts.len() == max {
                        parts.push(s[chars[i].0..].to_owned());
                        break;
                    }
                    let start = chars[i].0;
                    while i < chars.len() && !py_space(chars[i].1) {
                        i += 1;
                    }
                    let end = if i < chars.len() { chars[i].0 } else { s.len() };
                    parts.push(s[start..end].to_owned());
                }
            } else {
                let mut i = chars.len();
                while i > 0 {
                    while i > 0 && py_space(chars[i - 1].1) {
                        i -= 1;
                    }
                    if i == 0 {
                        break;
                    }
                    let end = if i < chars.len() { chars[i].0 } else { s.len() };
                    if parts.len() == max {
                        parts.push(s[..end].to_owned());
                        break;
                    }
                    while i > 0 && !py_space(chars[i - 1].1) {
                        i -= 1;
                    }
                    parts.push(s[chars[i].0..end].to_owned());
                }
                parts.reverse();
            }
            parts
        }
    }
}

/// Python's `str.splitlines`.
fn py_splitlines(s: &str, keepends: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut iter = s.char_indices().peekable();
    while let Some((i, c)) = iter.next() {
        let is_break = matches!(
            c,
            '\n' | '\r'
                | '\u{b}'
                | '\u{c}'
                | '\u{1c}'
                | '\u{1d}'
                | '\u{1e}'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        );
        if !is_break {
            continue;
        }
        let mut end = i + c.len_utf8();
        if c == '\r' {
            if let Some(&(j, '\n')) = iter.peek() {
                end = j + 1;
                iter.next();
            }
        }
        out.push(if keepends {
            s[start..end].to_owned()
        } else {
            s[start..i].to_owned()
        });
        start = end;
    }
    if start < s.len() {
        out.push(s[start..].to_owned());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// strftime_now.

/// transformers' `strftime_now(format)`: `datetime.now().strftime(format)`. The clock is read in
/// UTC (the server's local time when it runs in UTC, as containers do).
fn strftime_now(format: String) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(strftime(&format, secs))
}

/// C's strftime (glibc flavour, `-` flag for no padding) for a UTC unix time.
fn strftime(format: &str, unix_secs: i64) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
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
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            if no_pad {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match chars.next() {
            Some('Y') => {
                let _ = write!(out, "{year}");
            }
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month, 2),
            Some('d') => num(&mut out, day, 2),
            Some('e') => {
                let _ = if no_pad {
                    write!(out, "{day}")
                } else {
                    write!(out, "{day:>2}")
                };
            }
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('j') => num(&mut out, yday, 3),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('u') => {
                let _ = write!(out, "{}", weekday + 1);
            }
            Some('w') => {
                let _ = write!(out, "{}", (weekday + 1) % 7);
            }
            Some('F') => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            Some('T') => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            Some('D') => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 -> (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------------------------
// OpenAI messages -> template messages.

/// OpenAI chat messages -> what the Gemma 4 template expects: each run of `role: "tool"` messages
/// is attached to the preceding assistant message as `tool_responses: [{name, response}]` (the
/// name found through `tool_call_id` among that assistant message's `tool_calls`; the content
/// parsed as JSON when it parses, else kept as a string; content given as a list of text parts is
/// joined), and those tool messages are removed; assistant `tool_calls[].function.arguments`
/// given as a JSON string is parsed into an object for the template; `reasoning` or
/// `reasoning_content` on assistant messages becomes `reasoning_content`; `developer` role is
/// treated as `system`. Errors (tool message with no preceding assistant call, unknown
/// tool_call_id) are Err with a message naming the message index.
pub fn convert_openai_messages(messages: &[Json]) -> Result<Vec<Json>, TemplateError> {
    convert_openai_messages_with(messages, ToolResults::Attach)
}

/// [`convert_openai_messages`] with the tool results in either style. Details common to both:
/// text parts of a tool message are joined with "\n" (as vLLM does) before the JSON parse; a
/// tool message without `tool_call_id` is matched by its `name`, else by its position in the run;
/// `arguments` that are an empty string become `{}`, and a string that is not a JSON object stays
/// a string.
pub fn convert_openai_messages_with(
    messages: &[Json],
    style: ToolResults,
) -> Result<Vec<Json>, TemplateError> {
    let err = |i: usize, what: String| TemplateError(format!("messages[{i}]: {what}"));
    let mut out: Vec<Json> = Vec::with_capacity(messages.len());
    // Index in `out` of the assistant message whose calls the current tool run answers.
    let mut caller: Option<usize> = None;
    let mut run_pos = 0usize;
    for (i, message) in messages.iter().enumerate() {
        let Json::Object(obj) = message else {
            return Err(err(i, "a message must be an object".to_owned()));
        };
        let role = obj
            .get("role")
            .and_then(Json::as_str)
            .ok_or_else(|| err(i, "a message needs a string `role`".to_owned()))?;
        if role == "tool" {
            let a = caller.ok_or_else(|| {
                err(
                    i,
                    "tool message without a preceding assistant message with tool_calls".to_owned(),
                )
            })?;
            let calls: Vec<(Option<String>, String)> = out[a]
                .get("tool_calls")
                .and_then(Json::as_array)
                .map(|calls| {
                    calls
                        .iter()
                        .map(|c| {
                            let id = c.get("id").and_then(Json::as_str).map(str::to_owned);
                            let f = c.get("function").unwrap_or(c);
                            let name = f.get("name").and_then(Json::as_str).unwrap_or_default();
                            (id, name.to_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            let id = match obj.get("tool_call_id") {
                None | Some(Json::Null) => None,
                Some(Json::String(s)) => Some(s.as_str()),
                Some(_) => return Err(err(i, "`tool_call_id` must be a string".to_owned())),
            };
            let name = match id {
                Some(id) => calls
                    .iter()
                    .find(|(cid, _)| cid.as_deref() == Some(id))
                    .map(|(_, n)| n.clone())
                    .ok_or_else(|| {
                        err(
                            i,
                            format!(
                                "tool_call_id {id:?} matches no tool call of messages[{}]",
                                assistant_index(messages, i)
                            ),
                        )
                    })?,
                None => match obj
                    .get("name")
                    .and_then(Json::as_str)
                    .filter(|n| !n.is_empty())
                {
                    Some(n) => n.to_owned(),
                    None => calls.get(run_pos).map(|(_, n)| n.clone()).ok_or_else(|| {
                        err(
                            i,
                            "tool message without tool_call_id, and more results than calls"
                                .to_owned(),
                        )
                    })?,
                },
            };
            run_pos += 1;
            let response = parse_json_or_keep(tool_text(obj.get("content")));
            match style {
                ToolResults::Attach => {
                    let Some(Json::Object(target)) = out.get_mut(a) else {
                        unreachable!("`caller` indexes an assistant object in `out`");
                    };
                    let entry = Json::Object(Map::from_iter([
                        ("name".to_owned(), Json::String(name)),
                        ("response".to_owned(), response),
                    ]));
                    match target.get_mut("tool_responses") {
                        Some(Json::Array(list)) => list.push(entry),
                        _ => {
                            target.insert("tool_responses".to_owned(), Json::Array(vec![entry]));
                        }
                    }
                }
                ToolResults::Keep => {
                    let mut kept = Map::new();
                    kept.insert("role".to_owned(), Json::String("tool".to_owned()));
                    if let Some(id) = id {
                        kept.insert("tool_call_id".to_owned(), Json::String(id.to_owned()));
                    }
                    kept.insert("name".to_owned(), Json::String(name));
                    kept.insert("content".to_owned(), response);
                    out.push(Json::Object(kept));
                }
            }
            continue;
        }

        run_pos = 0;
        let mut m = obj.clone();
        match role {
            "developer" => {
                m.insert("role".to_owned(), Json::String("system".to_owned()));
                caller = None;
            }
            "assistant" => {
                if let Some(r) = m.remove("reasoning") {
                    if m.get("reasoning_content").is_none_or(Json::is_null) && !r.is_null() {
                        m.insert("reasoning_content".to_owned(), r);
                    }
                }
                let mut has_calls = false;
                if let Some(Json::Array(calls)) = m.get_mut("tool_calls") {
                    has_calls = !calls.is_empty();
                    for call in calls.iter_mut() {
                        let Json::Object(c) = call else {
                            return Err(err(i, "a tool call must be an object".to_owned()));
                        };
                        let f = match c.get_mut("function") {
                            Some(Json::Object(f)) => f,
                            _ => c,
                        };
                        if let Some(Json::String(a)) = f.get("arguments") {
                            if let Some(parsed) = parse_arguments(a) {
                                f.insert("arguments".to_owned(), parsed);
                            }
                        }
                    }
                }
                caller = has_calls.then_some(out.len());
            }
            _ => caller = None,
        }
        out.push(Json::Object(m));
    }
    Ok(out)
}

/// The index of the assistant message a tool message at `i` answers (for error messages).
fn assistant_index(messages: &[Json], i: usize) -> usize {
    (0..i)
        .rev()
        .find(|&j| messages[j].get("role").and_then(Json::as_str) != Some("tool"))
        .unwrap_or(0)
}

/// `arguments` given as a string: an empty string is `{}`, a JSON object is parsed, anything else
/// stays as given (None).
fn parse_arguments(a: &str) -> Option<Json> {
    if a.trim().is_empty() {
        return Some(Json::Object(Map::new()));
    }
    match serde_json::from_str::<Json>(a) {
        Ok(v @ Json::Object(_)) => Some(v),
        _ => None,
    }
}

/// A tool message's content as text: a string, or text parts joined with "\n".
fn tool_text(content: Option<&Json>) -> String {
    match content {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s.clone(),
        Some(Json::Array(parts)) => {
            let texts: Vec<String> = parts
                .iter()
                .filter_map(|p| match p {
                    Json::String(s) => Some(s.clone()),
                    Json::Object(o) if o.get("type").and_then(Json::as_str) == Some("text") => {
                        Some(
                            o.get("text")
                                .and_then(Json::as_str)
                                .unwrap_or_default()
                                .to_owned(),
                        )
                    }
                    _ => None,
                })
                .collect();
            texts.join("\n")
        }
        Some(other) => other.to_string(),
    }
}

fn parse_json_or_keep(text: String) -> Json {
    match serde_json::from_str::<Json>(&text) {
        Ok(v) => v,
        Err(_) => Json::String(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            let converted = convert_openai_messages_with(array(case, "openai_messages"), style)
                .unwrap_or_else(|e| panic!("[{name}] conversion failed: {e}"));
            let want_messages = array(case, "template_messages");
            if converted != want_messages {
                failures.push(format!(
                    "[{name}] converted messages differ:\n  got:  {}\n  want: {}",
                    Json::Array(converted.clone()),
                    Json::Array(want_messages.to_vec())
                ));
            }
            if style == ToolResults::Attach {
                let plain =
                    convert_openai_messages(array(case, "openai_messages")).expect("converts");
                assert_eq!(
                    plain, converted,
                    "[{name}] convert_openai_messages is the Attach style"
                );
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

    /// serving.md's list, in one template: macros with keyword defaults and recursion,
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
    fn conversion_errors_name_the_message() {
        let call = json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
        // A tool message first.
        let err = convert_openai_messages(&[
            json!({"role": "tool", "tool_call_id": "c1", "content": "x"}),
        ])
        .unwrap_err();
        assert!(err.0.starts_with("messages[0]:"), "{err}");
        // After a user message instead of the assistant call.
        let err = convert_openai_messages(&[
            call.clone(),
            user("u"),
            json!({"role": "tool", "tool_call_id": "c1", "content": "x"}),
        ])
        .unwrap_err();
        assert!(err.0.starts_with("messages[2]:"), "{err}");
        // After an assistant message without calls.
        let err = convert_openai_messages(&[
            user("u"),
            json!({"role": "assistant", "content": "a"}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "x"}),
        ])
        .unwrap_err();
        assert!(err.0.starts_with("messages[2]:"), "{err}");
        // Unknown id.
        let err = convert_openai_messages(&[
            user("u"),
            call.clone(),
            json!({"role": "tool", "tool_call_id": "nope", "content": "x"}),
        ])
        .unwrap_err();
        assert!(
            err.0.starts_with("messages[2]:")
                && err.0.contains("nope")
                && err.0.contains("messages[1]"),
            "{err}"
        );
        // Not an object / no role.
        assert!(convert_openai_messages(&[json!(3)])
            .unwrap_err()
            .0
            .starts_with("messages[0]:"));
        assert!(
            convert_openai_messages(&[user("u"), json!({"content": "x"})])
                .unwrap_err()
                .0
                .starts_with("messages[1]:")
        );
    }

    #[test]
    fn conversion_details() {
        let messages = [
            json!({"role": "developer", "content": "d"}),
            user("u"),
            json!({"role": "assistant", "content": "", "reasoning": "r",
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": [1, 2]}"}},
                    {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}},
                    {"id": "c", "type": "function", "function": {"name": "h", "arguments": "[1]"}}]}),
            json!({"role": "tool", "content": "{\"ok\": true}"}),
            json!({"role": "tool", "name": "h", "content": [{"type": "text", "text": "line 1"}, {"type": "text", "text": "line 2"}]}),
            json!({"role": "tool", "tool_call_id": "b", "content": "7"}),
        ];
        let out = convert_openai_messages(&messages).expect("converts");
        assert_eq!(out.len(), 3);
        assert_eq!(out[0]["role"], "system");
        assert_eq!(out[2]["reasoning_content"], "r");
        assert!(out[2].get("reasoning").is_none());
        let calls = &out[2]["tool_calls"];
        assert_eq!(calls[0]["function"]["arguments"], json!({"x": [1, 2]}));
        assert_eq!(calls[1]["function"]["arguments"], json!({}));
        assert_eq!(
            calls[2]["function"]["arguments"],
            json!("[1]"),
            "a non-object stays a string"
        );
        assert_eq!(
            out[2]["tool_responses"],
            json!([
                {"name": "f", "response": {"ok": true}},
                {"name": "h", "response": "line 1\nline 2"},
                {"name": "g", "response": 7},
            ])
        );
        let kept = convert_openai_messages_with(&messages, ToolResults::Keep).expect("converts");
        assert_eq!(kept.len(), 6);
        assert_eq!(
            kept[3],
            json!({"role": "tool", "name": "f", "content": {"ok": true}})
        );
        assert_eq!(
            kept[5],
            json!({"role": "tool", "tool_call_id": "b", "name": "g", "content": 7})
        );
        // A template reading tool_responses picks the Attach style.
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
    fn python_number_and_string_formats() {
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
        let mut s = String::new();
        py_repr_str("it's \"q\"\n\u{7}é\u{a0}", &mut s);
        assert_eq!(s, r#"'it\'s "q"\n\x07é\xa0'"#);
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(
            strftime("%d %b %Y, %A %B %-d %I%p %j %y %e %%", t),
            "29 Feb 2024, Thursday February 29 01PM 060 24 29 %"
        );
        assert_eq!(strftime("%F %T", 0), "1970-01-01 00:00:00");
        let now = render_str("{{ strftime_now('%Y') }}", &[user("x")]).expect("renders");
        assert!(now.len() == 4 && now.starts_with("20"), "{now}");
    }

    /// Differences from Jinja2 that remain, pinned so a change is noticed (Jinja2's output in
    /// the comments).
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
        // No `varargs` / `kwargs` in macros, no `%` formatting, no cycler / joiner.
        assert!(r("{% macro m(a) %}{{ varargs }}{% endmacro %}{{ m(1, 2) }}").is_err());
        assert!(r("{{ '%s' % 'a' }}").is_err());
        assert!(r("{% set j = joiner(', ') %}{{ j() }}").is_err());
    }
}
