//! Structured outputs: what a request's answer must follow (a JSON schema, any JSON object, a
//! regex, one of several strings, a Lark grammar), compiled by llguidance into a matcher that
//! says which tokens may come next. The sampler sets every other logit to −∞ before it draws, and
//! advances the matcher with the token drawn, so the answer follows the grammar by construction
//! (vLLM, SGLang and mistral.rs do the same with llguidance or XGrammar).
//!
//! With thinking on, the model may first think: its first token may also be the channel's opening
//! (`<|channel>`), after which it runs free until the channel's close (`<channel|>`); the
//! grammar applies from the first answer token.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;

/// What an answer must follow.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// A JSON value valid under this schema.
    JsonSchema(Value),
    /// Any JSON object.
    JsonObject,
    /// Text matching the regex (whole).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

/// The grammar compiler of one model's vocabulary; cheap to clone and share.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammars")
    }
}

impl Grammars {
    /// The vocabulary of `tokenizer_json` (a checkpoint's `tokenizer.json`), padded to the model's
    /// `vocab` rows (ids past the tokenizer's are never allowed); `end` is the token that ends
    /// the answer once the grammar is complete (`<turn|>`).
    pub fn new(tokenizer_json: &str, vocab: usize, end: u32) -> Result<Self, String> {
        let json: Value =
            serde_json::from_str(tokenizer_json).map_err(|e| format!("tokenizer.json: {e}"))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| format!("tokenizer.json: {e}"))?;
        if words.len() > vocab {
            return Err(format!(
                "tokenizer.json has {} tokens, the model {vocab}",
                words.len()
            ));
        }
        words.resize(vocab, vec![]);
        Self::from_words(&words, end)
    }

    /// Over a vocabulary given as each token's bytes (special tokens start with 0xFF, as
    /// llguidance reads them from tokenizer.json; empty: never allowed).
    pub fn from_words(words: &[Vec<u8>], end: u32) -> Result<Self, String> {
        let vocab = words.len();
        let info = TokRxInfo::new(vocab as u32, end);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars {
            factory: Arc::new(factory),
        })
    }

    /// The matcher of `format`, or why it cannot be compiled (an invalid schema, regex or
    /// grammar, or a feature llguidance does not support). `thinking`: the `<|channel>` and
    /// `<channel|>` ids when the model may think first.
    pub fn compile(
        &self,
        format: &Format,
        thinking: Option<(u32, u32)>,
    ) -> Result<Constraint, String> {
        let grammar = match format {
            Format::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema)?),
            Format::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(&serde_json::json!({"type": "object"}))?)
            }
            Format::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Format::Choice(options) => {
                if options.is_empty() {
                    return Err("choice needs at least one option".into());
                }
                let alternatives: Vec<String> = options.iter().map(|o| escape(o)).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            Format::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint {
            matcher,
            thinking: thinking.map(|(open, close)| Thinking {
                open,
                close,
                state: ThinkState::Start,
            }),
            lazy: None,
            ready: None,
        })
    }

    /// A lazy grammar (llama.cpp's for tool calls): the text runs free until the model draws
    /// `trigger`; from there `format` (which starts with `trigger`) applies, and once it is
    /// complete the text runs free again, until the next `trigger`.
    pub fn compile_lazy(&self, format: &Format, trigger: u32) -> Result<Constraint, String> {
        let mut c = self.compile(format, None)?;
        c.lazy = Some(Lazy {
            trigger,
            active: false,
        });
        Ok(c)
    }
}

#[derive(Debug, Clone, Copy)]
struct Lazy {
    trigger: u32,
    /// Inside the grammar (since the trigger).
    active: bool,
}

/// Compact JSON (`, ` and `: ` between items, no other whitespace): a model cannot loop on
/// whitespace, and the answer is what `json.dumps` writes.
fn compact(schema: &Value) -> Result<Value, String> {
    if !schema.is_object() {
        return Err("the JSON schema must be an object".into());
    }
    let mut schema = schema.clone();
    let options = JsonCompileOptions {
        item_separator: ", ".into(),
        key_separator: ": ".into(),
        whitespace_flexible: false,
        ..JsonCompileOptions::default()
    };
    options.apply_to(&mut schema);
    Ok(schema)
}

/// `s` as a regex that matches exactly it.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThinkState {
    /// Before the first token: it may open the thinking channel.
    Start,
    /// Inside the channel: free until it closes.
    Inside,
    /// The answer: the grammar applies.
    Answer,
}

#[derive(Debug, Clone)]
struct Thinking {
    open: u32,
    close: u32,
    state: ThinkState,
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    thinking: Option<Thinking>,
    lazy: Option<Lazy>,
    /// The mask of the current state, computed ahead by [`Constraint::prepare`].
    ready: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("thinking", &self.thinking)
            .field("lazy", &self.lazy)
            .finish()
    }
}

impl Constraint {
    /// Computes the next mask now (the engine does it while the forward runs, so that the
    /// sampler finds it ready); an error is left for [`Constraint::allowed`] to report.
    pub fn prepare(&mut self) {
        if self.ready.is_none() && !self.free_now() {
            self.ready = self.compute().ok().flatten();
        }
    }

    /// The tokens allowed next; None: any (inside the thinking channel, before a lazy
    /// grammar's trigger).
    pub fn allowed(&mut self) -> Result<Option<SimpleVob>, String> {
        match self.ready.take() {
            Some(mask) => Ok(Some(mask)),
            None => self.compute(),
        }
    }

    fn compute(&mut self) -> Result<Option<SimpleVob>, String> {
        if self.free_now() {
            return Ok(None);
        }
        let state = self.thinking.as_ref().map(|t| t.state);
        let mut mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        if let (Some(ThinkState::Start), Some(t)) = (state, &self.thinking) {
            mask.allow_token(t.open);
        }
        Ok(Some(mask))
    }

    /// Whether the next token runs free (before a lazy grammar's trigger, inside the thinking
    /// channel): then its sampler needs no mask, nor a full logits row.
    pub fn free_now(&self) -> bool {
        self.lazy.is_some_and(|l| !l.active)
            || self
                .thinking
                .as_ref()
                .is_some_and(|t| t.state == ThinkState::Inside)
    }

    /// Advances past the token drawn.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.ready = None;
        if let Some(lazy) = self.lazy.as_mut() {
            if !lazy.active {
                lazy.active = token == lazy.trigger;
                if !lazy.active {
                    return Ok(());
                }
            }
            self.matcher
                .consume_token(token)
                .map_err(|e| e.to_string())?;
            // Complete: free again until the next trigger.
            if self.matcher.is_stopped() {
                self.matcher.reset().map_err(|e| e.to_string())?;
                lazy.active = false;
            }
            return Ok(());
        }
        if let Some(t) = self.thinking.as_mut() {
            match t.state {
                ThinkState::Start if token == t.open => {
                    t.state = ThinkState::Inside;
                    return Ok(());
                }
                ThinkState::Start => t.state = ThinkState::Answer,
                ThinkState::Inside => {
                    if token == t.close {
                        t.state = ThinkState::Answer;
                    }
                    return Ok(());
                }
                ThinkState::Answer => {}
            }
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar has ended (its end token was drawn): nothing more may follow. A lazy
    /// grammar never ends the answer.
    pub fn is_done(&self) -> bool {
        self.lazy.is_none() && self.matcher.is_stopped()
    }
}

/// Sets the logits of the tokens `mask` does not allow to −∞ (a word of the mask at a time).
pub fn apply_mask(row: &mut [f32], mask: &SimpleVob) {
    mask.iter_unset_entries(|i| {
        if let Some(x) = row.get_mut(i) {
            *x = f32::NEG_INFINITY;
        }
    });
    if row.len() > mask.len() {
        row[mask.len()..].fill(f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammars() -> (Grammars, serde_json::Map<String, Value>) {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/tiny-31b-recipe"
        );
        let json = std::fs::read_to_string(format!("{dir}/tokenizer.json")).unwrap();
        let vocab: Value = serde_json::from_str(&json).unwrap();
        let words = vocab["model"]["vocab"].as_object().unwrap().clone();
        (Grammars::new(&json, 600, 106).unwrap(), words)
    }

    #[test]
    fn the_mask_follows_the_grammar_and_thinking_runs_free_first() {
        let (g, words) = grammars();
        let id = |w: &str| words[w].as_u64().unwrap() as u32;
        let (a, b, dot) = (id("a"), id("b"), id("."));
        let (open, close, end) = (100, 101, 106);
        let mut c = g
            .compile(&Format::Regex("a+b".into()), Some((open, close)))
            .unwrap();
        // First token: the grammar's (`a`) or the thinking channel's opening.
        let m = c.allowed().unwrap().unwrap();
        assert!(m.is_allowed(a) && m.is_allowed(open));
        assert!(!m.is_allowed(b) && !m.is_allowed(end));
        c.consume(open).unwrap();
        // Inside the channel anything goes, the close included.
        assert!(c.allowed().unwrap().is_none());
        c.consume(dot).unwrap();
        c.consume(close).unwrap();
        // The answer: `a`s, then `b`.
        let m = c.allowed().unwrap().unwrap();
        assert!(m.is_allowed(a) && !m.is_allowed(b) && !m.is_allowed(open));
        c.consume(a).unwrap();
        assert!(c.allowed().unwrap().unwrap().is_allowed(b));
        // Nothing can follow `b`: the grammar is done, and only the end of the turn is left.
        c.consume(b).unwrap();
        assert!(c.is_done());
        let m = c.allowed().unwrap().unwrap();
        assert!(m.is_allowed(end) && !m.is_allowed(a));
        // A token the grammar does not allow is an error, not a silent pass.
        let mut c = g.compile(&Format::Regex("a+b".into()), None).unwrap();
        assert!(
            !c.allowed().unwrap().unwrap().is_allowed(open),
            "no thinking"
        );
        assert!(c.consume(b).is_err());
    }

    #[test]
    fn a_lazy_grammar_applies_from_its_trigger_to_its_end_each_time() {
        let (g, words) = grammars();
        let id = |w: &str| words[w].as_u64().unwrap() as u32;
        let (a, b, open, close) = (id("a"), id("b"), 48, 49);
        let lark = format!("start: <[{open}]> \"a\"+ <[{close}]>");
        let mut c = g.compile_lazy(&Format::Lark(lark), open).unwrap();
        for _ in 0..2 {
            // Free text, until the trigger.
            assert!(c.free_now() && c.allowed().unwrap().is_none());
            c.consume(b).unwrap();
            c.consume(open).unwrap();
            // The grammar: `a`s, then its close; a `b` is refused.
            assert!(!c.free_now());
            let m = c.allowed().unwrap().unwrap();
            assert!(m.is_allowed(a) && !m.is_allowed(b) && !m.is_allowed(close));
            c.consume(a).unwrap();
            assert!(c.allowed().unwrap().unwrap().is_allowed(close));
            c.consume(close).unwrap();
            // Complete: free again, and the answer is not over.
            assert!(!c.is_done());
        }
        c.consume(open).unwrap();
        assert!(c.consume(b).is_err());
    }

    #[test]
    fn a_prepared_mask_is_the_mask_and_is_dropped_by_the_next_token() {
        let (g, words) = grammars();
        let id = |w: &str| words[w].as_u64().unwrap() as u32;
        let (a, b) = (id("a"), id("b"));
        let mut c = g.compile(&Format::Regex("ab".into()), None).unwrap();
        c.prepare();
        let m = c.allowed().unwrap().unwrap();
        assert!(m.is_allowed(a) && !m.is_allowed(b));
        c.prepare();
        c.consume(a).unwrap();
        // Not the stale one: after `a`, `b`.
        let m = c.allowed().unwrap().unwrap();
        assert!(m.is_allowed(b) && !m.is_allowed(a));
    }

    #[test]
    fn choices_match_exactly_and_bad_formats_are_refused() {
        let (g, words) = grammars();
        let id = |w: &str| words[w].as_u64().unwrap() as u32;
        let mut c = g
            .compile(&Format::Choice(vec!["a.b".into(), "b".into()]), None)
            .unwrap();
        // `.` is literal: after `a` only `.` may follow.
        c.consume(id("a")).unwrap();
        let m = c.allowed().unwrap().unwrap();
        assert!(m.is_allowed(id(".")) && !m.is_allowed(id("b")));
        for bad in [
            Format::Regex("(".into()),
            Format::Choice(vec![]),
            Format::Lark("start: nothing_defined".into()),
            Format::JsonSchema(Value::Bool(true)),
            Format::JsonSchema(serde_json::json!({"type": "nonsense"})),
        ] {
            assert!(g.compile(&bad, None).is_err(), "{bad:?}");
        }
    }
}
