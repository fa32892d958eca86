//! Per-request output parser over generated token ids: splits what the model writes into reasoning
//! (thinking), content and tool calls, incrementally, for the OpenAI-compatible API.
//!
//! What Gemma 4 writes (the markers of its chat template and tokenizer):
//!
//! - Thinking: `<|channel>thought\n ...reasoning... <channel|>` then the answer. The channel name
//!   line (`thought` and the newline after it) is stripped; the rest up to `<channel|>` is reasoning.
//!   If what follows `<|channel>` is not a name line (it contains anything but `[A-Za-z0-9_-]`
//!   before the first newline, or runs past 64 bytes) it is all kept as reasoning.
//! - Tool calls: `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:1,obj:{a:<|"|>x<|"|>},l:[1]}<tool_call|>`.
//!   Strings are delimited by the `<|"|>` token, other values are bare; see [`super::gemma_args`].
//!   A complete call becomes one [`ParsedDelta::ToolCall`] with `arguments` as compact JSON text
//!   (keys in the order the model wrote them). Several `call:` entries inside one block are
//!   accepted too and each becomes its own call.
//! - Every id the tokenizer marks special (and the five markers above) is dropped from text;
//!   `<turn|>`, `<eos>`, `<|tool_response>` end generation and simply vanish here.
//!
//! Malformed input never panics:
//! - A tool-call block that does not parse (bad syntax, no `call:` prefix, no name) is emitted as
//!   **content**: its decoded text with each `<|"|>` delimiter written as `"` (best effort; no
//!   special-token text reaches the client). The same holds for a call still open at
//!   [`OutputParser::finish`] (e.g. cut by `max_tokens`) and for a call interrupted by a new
//!   `<|tool_call>`.
//! - `<|tool_call>` inside a reasoning block ends the block (the model forgot `<channel|>`) and
//!   starts the call. Stray `<channel|>`, `<tool_call|>` or `<|"|>` in content are dropped.
//! - An unterminated reasoning block is flushed as reasoning at `finish`.
//!
//! Content and reasoning text is decoded with [`IncrementalDecoder`], one segment (a run of
//! content or of reasoning) at a time: for valid UTF-8 output the concatenation of the deltas of
//! one kind equals decoding that kind's tokens at once.

use std::collections::HashSet;
use std::sync::Arc;

use tokenizers::Tokenizer;

use super::detokenize::{decode, IncrementalDecoder};
use super::gemma_args::{parse_tool_calls, STRING_DELIM};

/// Token texts the parser looks up (never their ids: those come from the tokenizer), with the
/// string delimiter [`STRING_DELIM`] of the argument grammar.
pub const CHANNEL_START: &str = "<|channel>";
pub const CHANNEL_END: &str = "<channel|>";
pub const TOOL_CALL_START: &str = "<|tool_call>";
pub const TOOL_CALL_END: &str = "<tool_call|>";
pub const TURN_END: &str = "<turn|>";
pub const EOS: &str = "<eos>";
pub const TOOL_RESPONSE_START: &str = "<|tool_response>";

/// The longest channel name line we wait for before treating the text as reasoning.
const MAX_CHANNEL_NAME_BYTES: usize = 64;

/// Ids of the tokens the parser acts on, found by their text in the tokenizer.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    pub channel_start: u32,
    pub channel_end: u32,
    pub tool_call_start: u32,
    pub tool_call_end: u32,
    pub string_delim: u32,
    /// End-of-generation tokens, when the tokenizer has them (informational: the parser drops them
    /// like any special token).
    pub turn_end: Option<u32>,
    pub eos: Option<u32>,
    pub tool_response_start: Option<u32>,
    /// Every id that never reaches emitted text: the added tokens marked special, plus the markers.
    special: HashSet<u32>,
}

impl SpecialTokens {
    /// Looks the marker tokens up by text; an error names a missing one.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self, String> {
        let find = |text: &str| {
            tok.token_to_id(text).ok_or_else(|| {
                format!("tokenizer has no `{text}` token, needed to parse Gemma 4 output")
            })
        };
        let channel_start = find(CHANNEL_START)?;
        let channel_end = find(CHANNEL_END)?;
        let tool_call_start = find(TOOL_CALL_START)?;
        let tool_call_end = find(TOOL_CALL_END)?;
        let string_delim = find(STRING_DELIM)?;
        let mut special: HashSet<u32> = tok
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        special.extend([
            channel_start,
            channel_end,
            tool_call_start,
            tool_call_end,
            string_delim,
        ]);
        Ok(Self {
            channel_start,
            channel_end,
            tool_call_start,
            tool_call_end,
            string_delim,
            turn_end: tok.token_to_id(TURN_END),
            eos: tok.token_to_id(EOS),
            tool_response_start: tok.token_to_id(TOOL_RESPONSE_START),
            special,
        })
    }

    /// Whether `id` is special (never part of emitted text).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }
}

/// One piece of parsed output.
#[derive(Debug, Clone, PartialEq)]
pub enum ParsedDelta {
    /// Reasoning (thinking) text; deltas concatenate.
    Reasoning(String),
    /// Answer text; deltas concatenate.
    Content(String),
    /// One complete tool call. `index` counts calls within the request from 0, `id` is
    /// `call_` + 32 hex digits, `arguments` is a compact JSON object.
    ToolCall {
        index: usize,
        id: String,
        name: String,
        arguments: String,
    },
}

/// Where the parser is in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Content,
    /// After `<|channel>`, collecting the channel name line.
    ChannelName,
    Reasoning,
    /// After `<|tool_call>`, collecting ids up to `<tool_call|>`.
    ToolCall,
}

/// The per-request state machine over generated ids.
pub struct OutputParser {
    special: Arc<SpecialTokens>,
    tokenizer: Arc<Tokenizer>,
    state: State,
    /// The current content or reasoning segment.
    text: IncrementalDecoder,
    /// The channel name line being collected (state ChannelName).
    name_ids: Vec<u32>,
    /// The tool call being collected (state ToolCall), string delimiters included.
    call_ids: Vec<u32>,
    out: Vec<ParsedDelta>,
    reasoning_tokens: usize,
    /// Tool calls emitted so far (the next call's index).
    calls: usize,
}

impl OutputParser {
    pub fn new(special: Arc<SpecialTokens>, tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            special,
            text: IncrementalDecoder::new(Arc::clone(&tokenizer)),
            tokenizer,
            state: State::Content,
            name_ids: Vec::new(),
            call_ids: Vec::new(),
            out: Vec::new(),
            reasoning_tokens: 0,
            calls: 0,
        }
    }

    /// For prompts that already open the thought channel (`...<|channel>thought\n` at the end of
    /// the prompt): generation starts inside the reasoning block.
    pub fn starting_in_reasoning(mut self) -> Self {
        self.state = State::Reasoning;
        self
    }

    /// Feed newly generated ids; returns the deltas they complete (possibly none).
    pub fn push(&mut self, ids: &[u32]) -> Vec<ParsedDelta> {
        for &id in ids {
            self.step(id);
        }
        match self.state {
            State::Content => self.emit_ready(false),
            State::Reasoning => self.emit_ready(true),
            State::ChannelName | State::ToolCall => {}
        }
        std::mem::take(&mut self.out)
    }

    /// End of generation: flush anything pending (an unterminated reasoning block is flushed as
    /// reasoning, an unterminated tool call as content).
    pub fn finish(&mut self) -> Vec<ParsedDelta> {
        match self.state {
            State::Content => self.end_segment(false),
            State::Reasoning => self.end_segment(true),
            // Still within the name line, which is name-like (otherwise it had turned into
            // reasoning): nothing to show.
            State::ChannelName => self.name_ids.clear(),
            State::ToolCall => {
                let text = self.call_text();
                self.call_ids.clear();
                self.push_delta(ParsedDelta::Content(text.replace(STRING_DELIM, "\"")));
            }
        }
        self.state = State::Content;
        std::mem::take(&mut self.out)
    }

    /// Tokens that were part of reasoning, from `<|channel>` to `<channel|>` inclusive (for
    /// usage.completion_tokens_details.reasoning_tokens).
    pub fn reasoning_tokens(&self) -> usize {
        self.reasoning_tokens
    }

    /// Tool calls emitted so far.
    pub fn tool_calls(&self) -> usize {
        self.calls
    }

    fn step(&mut self, id: u32) {
        let sp = Arc::clone(&self.special);
        match self.state {
            State::Content => {
                if id == sp.channel_start {
                    self.end_segment(false);
                    self.reasoning_tokens += 1;
                    self.name_ids.clear();
                    self.state = State::ChannelName;
                } else if id == sp.tool_call_start {
                    self.start_tool_call(false);
                } else if !sp.is_special(id) {
                    self.text.push(&[id]);
                }
            }
            State::ChannelName => {
                if id == sp.tool_call_start {
                    self.end_name_line();
                    self.start_tool_call(true);
                    return;
                }
                self.reasoning_tokens += 1;
                if id == sp.channel_end {
                    self.end_name_line();
                    self.end_segment(true);
                    self.state = State::Content;
                } else if !sp.is_special(id) {
                    self.name_ids.push(id);
                    self.check_name_line();
                }
            }
            State::Reasoning => {
                if id == sp.tool_call_start {
                    self.start_tool_call(true);
                    return;
                }
                self.reasoning_tokens += 1;
                if id == sp.channel_end {
                    self.end_segment(true);
                    self.state = State::Content;
                } else if !sp.is_special(id) {
                    self.text.push(&[id]);
                }
            }
            State::ToolCall => {
                if id == sp.tool_call_end {
                    self.end_tool_call();
                    self.state = State::Content;
                } else if id == sp.tool_call_start {
                    // The open call never ended: show it as text, start the new one.
                    let text = self.call_text();
                    self.call_ids.clear();
                    self.push_delta(ParsedDelta::Content(text.replace(STRING_DELIM, "\"")));
                } else if id == sp.string_delim || !sp.is_special(id) {
                    self.call_ids.push(id);
                }
            }
        }
    }

    /// After a token of the name line: once the line is complete, strip it and continue as
    /// reasoning; if it cannot be a name, everything collected is reasoning.
    fn check_name_line(&mut self) {
        let text = decode(&self.tokenizer, &self.name_ids, true);
        if let Some((line, rest)) = text.split_once('\n') {
            if is_channel_name(line) {
                let rest = rest.to_string();
                self.name_ids.clear();
                self.state = State::Reasoning;
                self.push_delta(ParsedDelta::Reasoning(rest));
            } else {
                self.name_ids_to_reasoning();
            }
        } else if text.len() > MAX_CHANNEL_NAME_BYTES || !is_channel_name(&text) {
            self.name_ids_to_reasoning();
        }
    }

    /// The channel ends (or a tool call starts) while in the name line: a name-like line is
    /// dropped, anything else is reasoning (left in `self.text` for the caller to flush).
    fn end_name_line(&mut self) {
        let text = decode(&self.tokenizer, &self.name_ids, true);
        if is_channel_name(&text) {
            self.name_ids.clear();
        } else {
            self.name_ids_to_reasoning();
        }
    }

    fn name_ids_to_reasoning(&mut self) {
        // The segment is empty here: the previous one ended at `<|channel>`.
        self.text.push(&std::mem::take(&mut self.name_ids));
        self.state = State::Reasoning;
    }

    /// `<|tool_call>` seen: flush the pending text (reasoning or content) and collect the call.
    fn start_tool_call(&mut self, reasoning: bool) {
        self.end_segment(reasoning);
        self.call_ids.clear();
        self.state = State::ToolCall;
    }

    /// Emits the text of the current segment completed so far, as reasoning or content.
    fn emit_ready(&mut self, reasoning: bool) {
        let text = self.text.next_text();
        self.push_text(reasoning, text);
    }

    /// Ends the current segment: emits the rest of its text, as reasoning or content.
    fn end_segment(&mut self, reasoning: bool) {
        let text = self.text.flush();
        self.push_text(reasoning, text);
    }

    fn push_text(&mut self, reasoning: bool, text: String) {
        self.push_delta(if reasoning {
            ParsedDelta::Reasoning(text)
        } else {
            ParsedDelta::Content(text)
        });
    }

    /// The collected call as text, `<|"|>` delimiters written as that literal text.
    fn call_text(&self) -> String {
        decode(&self.tokenizer, &self.call_ids, false)
    }

    fn end_tool_call(&mut self) {
        let text = self.call_text();
        self.call_ids.clear();
        match parse_tool_calls(&text) {
            Ok(calls) => {
                for (name, arguments) in calls {
                    let index = self.calls;
                    self.calls += 1;
                    self.push_delta(ParsedDelta::ToolCall {
                        index,
                        id: crate::ids::random_id("call_"),
                        name,
                        arguments,
                    });
                }
            }
            Err(e) => {
                tracing::debug!("output parser: malformed tool call shown as content: {e}");
                self.push_delta(ParsedDelta::Content(text.replace(STRING_DELIM, "\"")));
            }
        }
    }

    /// Appends a delta, merging text into the previous delta of the same kind; empty text is
    /// dropped.
    fn push_delta(&mut self, delta: ParsedDelta) {
        match (self.out.last_mut(), delta) {
            (_, ParsedDelta::Content(t) | ParsedDelta::Reasoning(t)) if t.is_empty() => {}
            (Some(ParsedDelta::Content(a)), ParsedDelta::Content(b)) => a.push_str(&b),
            (Some(ParsedDelta::Reasoning(a)), ParsedDelta::Reasoning(b)) => a.push_str(&b),
            (_, d) => self.out.push(d),
        }
    }
}

/// A channel name line (surrounding spaces allowed): ASCII letters, digits, `_`, `-`.
fn is_channel_name(line: &str) -> bool {
    line.len() <= MAX_CHANNEL_NAME_BYTES
        && line
            .trim_matches([' ', '\t', '\r'])
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::fixture::{tokenizer, TOKENIZER};
    use serde_json::{json, Value};

    fn special() -> Arc<SpecialTokens> {
        Arc::new(SpecialTokens::from_tokenizer(&tokenizer()).expect("fixture has the markers"))
    }

    /// A piece of a generated stream: text to encode, or a special token by its text.
    enum P<'a> {
        T(&'a str),
        S(&'a str),
    }
    use P::{S, T};

    fn build(pieces: &[P]) -> Vec<u32> {
        let tok = tokenizer();
        let mut ids = Vec::new();
        for p in pieces {
            match p {
                T(text) => {
                    let enc = tok.encode(*text, false).expect("encodes");
                    let piece = enc.get_ids().to_vec();
                    // The fixture round-trips plain text, which the expectations rely on.
                    assert_eq!(
                        tok.decode(&piece, true).expect("decodes"),
                        *text,
                        "round trip"
                    );
                    assert!(
                        piece.iter().all(|&id| !special().is_special(id)),
                        "{text:?} encodes to no special id"
                    );
                    ids.extend(piece);
                }
                S(text) => ids.push(
                    tok.token_to_id(text)
                        .unwrap_or_else(|| panic!("no token {text}")),
                ),
            }
        }
        ids
    }

    struct Expected {
        reasoning: String,
        content: String,
        calls: Vec<(String, Value)>,
    }

    fn expected(reasoning: &str, content: &str, calls: Vec<(&str, Value)>) -> Expected {
        Expected {
            reasoning: reasoning.into(),
            content: content.into(),
            calls: calls.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
        }
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    /// Feeds `ids` in chunks from `sizes`, returns all deltas (push outputs then finish).
    fn run(ids: &[u32], mut next_size: impl FnMut() -> usize) -> (Vec<ParsedDelta>, usize) {
        let mut parser = OutputParser::new(special(), tokenizer());
        let mut deltas = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            let n = next_size().clamp(1, ids.len() - i);
            deltas.extend(parser.push(&ids[i..i + n]));
            i += n;
        }
        deltas.extend(parser.finish());
        (deltas, parser.reasoning_tokens())
    }

    const SPECIAL_TEXTS: &[&str] = &[
        "<|channel>",
        "<channel|>",
        "<|tool_call>",
        "<tool_call|>",
        "<|\"|>",
        "<turn|>",
        "<|turn>",
        "<eos>",
        "<bos>",
        "<pad>",
        "<|tool_response>",
        "<tool_response|>",
        "<|think|>",
    ];

    fn check_clean(s: &str) {
        assert!(!s.contains('\u{FFFD}'), "replacement char in {s:?}");
        for sp in SPECIAL_TEXTS {
            assert!(!s.contains(sp), "special token text {sp} in {s:?}");
        }
    }

    /// Checks one run's deltas against the expectation.
    fn check(deltas: &[ParsedDelta], want: &Expected, what: &str) {
        let (mut reasoning, mut content, mut calls, mut ids) =
            (String::new(), String::new(), Vec::new(), Vec::new());
        for d in deltas {
            match d {
                ParsedDelta::Reasoning(t) => {
                    assert!(!t.is_empty());
                    check_clean(t);
                    reasoning.push_str(t);
                }
                ParsedDelta::Content(t) => {
                    assert!(!t.is_empty());
                    check_clean(t);
                    content.push_str(t);
                }
                ParsedDelta::ToolCall {
                    index,
                    id,
                    name,
                    arguments,
                } => {
                    assert_eq!(*index, calls.len(), "{what}: indices count from 0");
                    assert!(id.starts_with("call_") && id.len() == 37, "{what}: id {id}");
                    assert!(
                        id[5..].chars().all(|c| c.is_ascii_hexdigit()),
                        "{what}: id {id}"
                    );
                    check_clean(name);
                    check_clean(arguments);
                    let args: Value = serde_json::from_str(arguments).expect("arguments are JSON");
                    assert!(args.is_object());
                    // Compact: as long as serde_json's own compact form (key order aside).
                    assert_eq!(
                        arguments.len(),
                        args.to_string().len(),
                        "compact: {arguments}"
                    );
                    ids.push(id.clone());
                    calls.push((name.clone(), args));
                }
            }
        }
        assert_eq!(reasoning, want.reasoning, "{what}: reasoning");
        assert_eq!(content, want.content, "{what}: content");
        assert_eq!(calls, want.calls, "{what}: tool calls");
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "{what}: ids unique");
    }

    /// Whole, token by token, and 100 random chunkings (sizes 1..=5).
    fn check_stream(pieces: &[P], want: &Expected) -> usize {
        let ids = build(pieces);
        let (deltas, reasoning_tokens) = run(&ids, || ids.len());
        check(&deltas, want, "whole");
        let (deltas, r) = run(&ids, || 1);
        check(&deltas, want, "one by one");
        assert_eq!(r, reasoning_tokens);
        for seed in 0..100u64 {
            let mut lcg = Lcg(seed.wrapping_mul(0x9E37_79B9) + 1);
            let (deltas, r) = run(&ids, || 1 + (lcg.next() % 5) as usize);
            check(&deltas, want, &format!("seed {seed}"));
            assert_eq!(r, reasoning_tokens, "seed {seed}: reasoning tokens");
        }
        reasoning_tokens
    }

    #[test]
    fn special_tokens_found_by_text() {
        let tok = tokenizer();
        let sp = special();
        assert_eq!(Some(sp.channel_start), tok.token_to_id("<|channel>"));
        assert_eq!(Some(sp.channel_end), tok.token_to_id("<channel|>"));
        assert_eq!(Some(sp.tool_call_start), tok.token_to_id("<|tool_call>"));
        assert_eq!(Some(sp.tool_call_end), tok.token_to_id("<tool_call|>"));
        assert_eq!(Some(sp.string_delim), tok.token_to_id("<|\"|>"));
        assert_eq!(sp.turn_end, tok.token_to_id("<turn|>"));
        assert_eq!(sp.eos, tok.token_to_id("<eos>"));
        assert_eq!(sp.tool_response_start, tok.token_to_id("<|tool_response>"));
        for t in SPECIAL_TEXTS {
            assert!(sp.is_special(tok.token_to_id(t).expect("present")), "{t}");
        }
        let newline = tok.token_to_id("\n").expect("newline token");
        assert!(!sp.is_special(newline));
    }

    #[test]
    fn missing_marker_is_an_error() {
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(TOKENIZER).unwrap()).unwrap();
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .retain(|t| t["content"] != "<|tool_call>");
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        vocab.remove("<|tool_call>");
        let tok = Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
        let err = SpecialTokens::from_tokenizer(&tok).expect_err("error");
        assert!(err.contains("<|tool_call>"), "{err}");
    }

    #[test]
    fn plain_answer() {
        let r = check_stream(
            &[T("The weather in Paris is nice."), S("<turn|>")],
            &expected("", "The weather in Paris is nice.", vec![]),
        );
        assert_eq!(r, 0);
    }

    #[test]
    fn thinking_then_answer() {
        let pieces = [
            S("<|channel>"),
            T("thought\n"),
            T("The user asks about the weather.\nStep one: answer."),
            S("<channel|>"),
            T("It is sunny."),
            S("<turn|>"),
        ];
        let r = check_stream(
            &pieces,
            &expected(
                "The user asks about the weather.\nStep one: answer.",
                "It is sunny.",
                vec![],
            ),
        );
        // `<|channel>`, the name line, the reasoning and `<channel|>`.
        let ids = build(&pieces);
        let end = ids
            .iter()
            .position(|&i| i == special().channel_end)
            .unwrap();
        assert_eq!(r, end + 1);
    }

    #[test]
    fn empty_thought_channel() {
        check_stream(
            &[
                S("<|channel>"),
                T("thought\n"),
                S("<channel|>"),
                T("Hello"),
                S("<eos>"),
            ],
            &expected("", "Hello", vec![]),
        );
        check_stream(
            &[S("<|channel>"), T("thought"), S("<channel|>"), T("Hello")],
            &expected("", "Hello", vec![]),
        );
    }

    #[test]
    fn channel_without_name_line_is_all_reasoning() {
        check_stream(
            &[
                S("<|channel>"),
                T("Let me think: 2+2=4"),
                S("<channel|>"),
                T("4"),
            ],
            &expected("Let me think: 2+2=4", "4", vec![]),
        );
    }

    #[test]
    fn non_ascii_answer() {
        let text = "Café: 日本 is nice 😀! Ünïcödé ✓ 𝄞 end";
        let ids = build(&[T(text)]);
        let tok = tokenizer();
        // Byte fallback: characters outside the tiny vocab span several ids.
        let bytes_ids = ids
            .iter()
            .filter(|&&i| tok.id_to_token(i).unwrap().starts_with("<0x"))
            .count();
        assert!(bytes_ids >= 20, "{bytes_ids} byte-fallback ids");
        check_stream(&[T(text), S("<turn|>")], &expected("", text, vec![]));
        check_stream(
            &[
                S("<|channel>"),
                T("thought\n"),
                T("日本語 😀 é"),
                S("<channel|>"),
                T("é😀"),
                S("<eos>"),
            ],
            &expected("日本語 😀 é", "é😀", vec![]),
        );
    }

    #[test]
    fn split_character_is_held_back() {
        // Token by token, no delta may carry half an emoji, and the emoji arrives whole.
        let ids = build(&[T("a😀b")]);
        let mut parser = OutputParser::new(special(), tokenizer());
        let mut got = Vec::new();
        for id in &ids {
            got.extend(parser.push(&[*id]));
        }
        got.extend(parser.finish());
        assert_eq!(
            got,
            vec![
                ParsedDelta::Content("a".into()),
                ParsedDelta::Content("😀".into()),
                ParsedDelta::Content("b".into())
            ]
        );
    }

    #[test]
    fn invalid_bytes_do_not_panic() {
        // é as two byte tokens, then a lone continuation byte: decoding the whole run gives three
        // U+FFFD, so the stream cannot equal decode-all; it must not panic and shows `é�a`.
        let tok = tokenizer();
        let byte = |b: &str| tok.token_to_id(b).expect("byte-fallback token");
        let ids = [
            byte("<0xC3>"),
            byte("<0xA9>"),
            byte("<0x80>"),
            tok.token_to_id("a").unwrap(),
        ];
        let mut parser = OutputParser::new(special(), tokenizer());
        let mut content = String::new();
        for id in ids {
            for d in parser.push(&[id]) {
                if let ParsedDelta::Content(t) = d {
                    content.push_str(&t);
                }
            }
        }
        for d in parser.finish() {
            if let ParsedDelta::Content(t) = d {
                content.push_str(&t);
            }
        }
        assert_eq!(content, "é\u{FFFD}a");
        // A lone invalid byte at the end is flushed at finish.
        let mut parser = OutputParser::new(special(), tokenizer());
        assert!(parser.push(&[byte("<0xFF>")]).is_empty());
        assert_eq!(
            parser.finish(),
            vec![ParsedDelta::Content("\u{FFFD}".into())]
        );
    }

    #[test]
    fn tool_call_with_tricky_strings() {
        let pieces = [
            T("Let me check."),
            S("<|tool_call>"),
            T("call:get_weather{location:"),
            S("<|\"|>"),
            T("Paris, {France}: \"the\" city\\ é"),
            S("<|\"|>"),
            T(",days:3,metric:true,extra:null,ratio:-0.5,opts:{mode:"),
            S("<|\"|>"),
            T("a:b,c"),
            S("<|\"|>"),
            T(",deep:{x:[]}},tags:[1,"),
            S("<|\"|>"),
            T("s}"),
            S("<|\"|>"),
            T(",[true,{k:"),
            S("<|\"|>"),
            S("<|\"|>"),
            T("}]]}"),
            S("<tool_call|>"),
            S("<|tool_response>"),
        ];
        let args = json!({
            "location": "Paris, {France}: \"the\" city\\ é",
            "days": 3, "metric": true, "extra": null, "ratio": -0.5,
            "opts": {"mode": "a:b,c", "deep": {"x": []}},
            "tags": [1, "s}", [true, {"k": ""}]],
        });
        check_stream(
            &pieces,
            &expected("", "Let me check.", vec![("get_weather", args)]),
        );
        // The arguments keep the order the model wrote.
        let (deltas, _) = run(&build(&pieces), || 3);
        let args = deltas.iter().find_map(|d| match d {
            ParsedDelta::ToolCall { arguments, .. } => Some(arguments.clone()),
            _ => None,
        });
        assert!(args
            .unwrap()
            .starts_with(r#"{"location":"Paris, {France}: \"the\" city\\ é","days":3,"#));
    }

    #[test]
    fn two_tool_calls() {
        let pieces = [
            S("<|tool_call>"),
            T("call:get_weather{city:"),
            S("<|\"|>"),
            T("Paris"),
            S("<|\"|>"),
            T("}"),
            S("<tool_call|>"),
            S("<|tool_call>"),
            T("call:find_dog{name:"),
            S("<|\"|>"),
            T("Rex 😀"),
            S("<|\"|>"),
            T(",n:2}"),
            S("<tool_call|>"),
            S("<|tool_response>"),
        ];
        check_stream(
            &pieces,
            &expected(
                "",
                "",
                vec![
                    ("get_weather", json!({"city": "Paris"})),
                    ("find_dog", json!({"name": "Rex 😀", "n": 2})),
                ],
            ),
        );
        // Two calls in one block.
        check_stream(
            &[
                S("<|tool_call>"),
                T("call:a{x:1}call:b{}"),
                S("<tool_call|>"),
            ],
            &expected("", "", vec![("a", json!({"x": 1})), ("b", json!({}))]),
        );
    }

    #[test]
    fn thinking_then_tool_call() {
        let pieces = [
            S("<|channel>"),
            T("thought\n"),
            T("I should call the tool."),
            S("<channel|>"),
            S("<|tool_call>"),
            T("call:get_weather{city:"),
            S("<|\"|>"),
            T("日本"),
            S("<|\"|>"),
            T("}"),
            S("<tool_call|>"),
            S("<|tool_response>"),
        ];
        check_stream(
            &pieces,
            &expected(
                "I should call the tool.",
                "",
                vec![("get_weather", json!({"city": "日本"}))],
            ),
        );
        // The model forgot `<channel|>`: the call still ends the reasoning and is parsed.
        check_stream(
            &[
                S("<|channel>"),
                T("thought\nhmm"),
                S("<|tool_call>"),
                T("call:f{}"),
                S("<tool_call|>"),
            ],
            &expected("hmm", "", vec![("f", json!({}))]),
        );
    }

    #[test]
    fn special_tokens_vanish() {
        let pieces = [
            S("<bos>"),
            T("Hello"),
            S("<eos>"),
            T(" world"),
            S("<|\"|>"),
            S("<channel|>"),
            S("<tool_call|>"),
            S("<|image|>"),
            T(" é"),
            S("<turn|>"),
            S("<|tool_response>"),
            S("<eos>"),
        ];
        check_stream(&pieces, &expected("", "Hello world é", vec![]));
        check_stream(
            &[
                S("<|channel>"),
                T("thought\nA"),
                S("<turn|>"),
                S("<|think|>"),
                T("B"),
                S("<channel|>"),
                T("C"),
                S("<eos>"),
            ],
            &expected("AB", "C", vec![]),
        );
    }

    #[test]
    fn unterminated_blocks_at_finish() {
        // Reasoning cut by max_tokens: flushed as reasoning.
        check_stream(
            &[S("<|channel>"), T("thought\nStill thinking 日")],
            &expected("Still thinking 日", "", vec![]),
        );
        // A tool call cut short: its text as content, delimiters as `"`.
        check_stream(
            &[
                T("Hi"),
                S("<|tool_call>"),
                T("call:f{a:"),
                S("<|\"|>"),
                T("x"),
            ],
            &expected("", "Hicall:f{a:\"x", vec![]),
        );
    }

    #[test]
    fn malformed_tool_call_becomes_content() {
        check_stream(
            &[
                S("<|tool_call>"),
                T("call:f{a:"),
                S("<|\"|>"),
                T("x"),
                S("<|\"|>"),
                T(",b}"),
                S("<tool_call|>"),
                T("ok"),
            ],
            &expected("", "call:f{a:\"x\",b}ok", vec![]),
        );
        check_stream(
            &[S("<|tool_call>"), T("get_weather{}"), S("<tool_call|>")],
            &expected("", "get_weather{}", vec![]),
        );
        // A new call before the first one ended.
        check_stream(
            &[
                S("<|tool_call>"),
                T("call:f{a:1"),
                S("<|tool_call>"),
                T("call:g{}"),
                S("<tool_call|>"),
            ],
            &expected("", "call:f{a:1", vec![("g", json!({}))]),
        );
        // An empty block shows nothing.
        check_stream(
            &[S("<|tool_call>"), S("<tool_call|>"), T("x")],
            &expected("", "x", vec![]),
        );
    }

    #[test]
    fn prompt_that_opens_the_channel() {
        let ids = build(&[T("reasoning"), S("<channel|>"), T("answer")]);
        let mut parser = OutputParser::new(special(), tokenizer()).starting_in_reasoning();
        let mut got = parser.push(&ids);
        got.extend(parser.finish());
        assert_eq!(
            got,
            vec![
                ParsedDelta::Reasoning("reasoning".into()),
                ParsedDelta::Content("answer".into())
            ]
        );
    }

    #[test]
    fn call_ids_differ_between_parsers() {
        let ids = build(&[S("<|tool_call>"), T("call:f{}"), S("<tool_call|>")]);
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let mut p = OutputParser::new(special(), tokenizer());
            for d in p.push(&ids) {
                if let ParsedDelta::ToolCall { id, .. } = d {
                    assert!(seen.insert(id));
                }
            }
        }
        assert_eq!(seen.len(), 50);
    }
}
