//! The Gemma 4 tool-call grammar: the text of a tool-call block,
//! `call:NAME{key:<|"|>text<|"|>,n:1,obj:{a:<|"|>x<|"|>},l:[1]}`, to each call's name and its
//! arguments as compact JSON. Pure functions on text, no tokenizer: the string delimiter `<|"|>`,
//! a single special token in the model's output, appears as its literal text (the block decoded
//! with special tokens kept).
//!
//! Strings run raw (no escapes) from one `<|"|>` to the next; every other value is bare; see
//! [`gemma_args_to_json`] for the grammar. Malformed input never panics: it is an `Err` that says
//! what is wrong and at which byte.

/// The string delimiter of the tool-call syntax, a single special token.
pub const STRING_DELIM: &str = "<|\"|>";

/// Nesting limit of tool-call arguments (deeper input is refused rather than risking the stack).
const MAX_ARGS_DEPTH: usize = 128;

/// The text of one tool-call block (`call:NAME{...}`, possibly several in a row) to (name, compact
/// JSON arguments) pairs.
pub fn parse_tool_calls(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut calls = Vec::new();
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("empty tool call".into());
    }
    while !rest.is_empty() {
        let body = rest
            .strip_prefix("call:")
            .ok_or_else(|| format!("tool call does not start with `call:`: {rest:?}"))?;
        let brace = body.find('{').ok_or("tool call has no `{`")?;
        let name = body[..brace].trim();
        if name.is_empty()
            || name.contains(|c: char| c.is_whitespace() || "}[],:".contains(c) || c == '"')
        {
            return Err(format!("bad tool name {name:?}"));
        }
        let mut p = ArgParser {
            s: body,
            pos: brace,
        };
        let args = p.value(0)?;
        let mut arguments = String::new();
        write_json(&args, &mut arguments);
        calls.push((name.to_string(), arguments));
        rest = body[p.pos..].trim_start();
        // Tolerate separators between calls of one block.
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Ok(calls)
}

/// The Gemma 4 tool-call argument syntax (the text between `call:NAME` braces, with `<|"|>` as the
/// string delimiter given as the literal text `<|"|>`) to JSON.
///
/// Accepts either the object body (`key:<|"|>v<|"|>,n:1`) or the whole object with its braces
/// (`{key:...}`). Grammar: `object = '{' [pair (',' pair)* [',']] '}'`, `pair = key ':' value`, keys
/// bare (any text up to `:` without `{}[],`) or `<|"|>`-quoted, `value = <|"|>raw text<|"|> | object
/// | '[' [value (',' value)* [',']] ']' | number | true | false | null`; whitespace between items
/// is ignored. Leniency: a bare word that is none of these (`unit:celsius`) is taken as a string.
/// Errors (never panics): unbalanced brackets, unterminated strings, missing `:` or key, empty
/// values, duplicate keys, trailing text, nesting deeper than 128.
pub fn gemma_args_to_json(text: &str) -> Result<serde_json::Value, String> {
    let trimmed = text.trim();
    let mut p = ArgParser { s: trimmed, pos: 0 };
    let arg = if trimmed.starts_with('{') {
        p.value(0)?
    } else {
        Arg::Obj(p.pairs(None, 0)?)
    };
    p.skip_ws();
    if p.pos != trimmed.len() {
        return Err(format!(
            "unexpected text after the arguments at byte {}: {:?}",
            p.pos,
            &trimmed[p.pos..]
        ));
    }
    Ok(arg.into_value())
}

/// A parsed argument value, objects in the order written.
#[derive(Debug)]
enum Arg {
    Obj(Vec<(String, Arg)>),
    List(Vec<Arg>),
    Str(String),
    Num(serde_json::Number),
    Bool(bool),
    Null,
}

impl Arg {
    fn into_value(self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Arg::Obj(pairs) => Value::Object(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k, v.into_value()))
                    .collect(),
            ),
            Arg::List(items) => Value::Array(items.into_iter().map(Arg::into_value).collect()),
            Arg::Str(s) => Value::String(s),
            Arg::Num(n) => Value::Number(n),
            Arg::Bool(b) => Value::Bool(b),
            Arg::Null => Value::Null,
        }
    }
}

/// Compact JSON, keys in the order written.
fn write_json(arg: &Arg, out: &mut String) {
    match arg {
        Arg::Obj(pairs) => {
            out.push('{');
            for (i, (k, v)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                write_json(v, out);
            }
            out.push('}');
        }
        Arg::List(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(v, out);
            }
            out.push(']');
        }
        Arg::Str(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
        Arg::Num(n) => out.push_str(&n.to_string()),
        Arg::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Arg::Null => out.push_str("null"),
    }
}

/// Recursive-descent parser over the argument text; `pos` is a byte offset on a char boundary.
struct ArgParser<'a> {
    s: &'a str,
    pos: usize,
}

impl ArgParser<'_> {
    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn err(&self, what: &str) -> String {
        let near: String = self.rest().chars().take(24).collect();
        format!("{what} at byte {} (near {near:?})", self.pos)
    }

    /// A `<|"|>`-delimited string; `pos` is at the opening delimiter.
    fn string(&mut self) -> Result<String, String> {
        let start = self.pos + STRING_DELIM.len();
        let len = self.s[start..]
            .find(STRING_DELIM)
            .ok_or_else(|| self.err("unterminated string"))?;
        self.pos = start + len + STRING_DELIM.len();
        Ok(self.s[start..start + len].to_string())
    }

    fn value(&mut self, depth: usize) -> Result<Arg, String> {
        if depth > MAX_ARGS_DEPTH {
            return Err(self.err("arguments nested too deeply"));
        }
        self.skip_ws();
        let rest = self.rest();
        if rest.starts_with(STRING_DELIM) {
            return self.string().map(Arg::Str);
        }
        match rest.chars().next() {
            None => Err(self.err("missing value")),
            Some('{') => {
                self.pos += 1;
                let pairs = self.pairs(Some('}'), depth + 1)?;
                Ok(Arg::Obj(pairs))
            }
            Some('[') => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws();
                    if self.rest().starts_with(']') {
                        self.pos += 1;
                        return Ok(Arg::List(items));
                    }
                    items.push(self.value(depth + 1)?);
                    self.skip_ws();
                    match self.rest().chars().next() {
                        Some(',') => self.pos += 1,
                        Some(']') => {}
                        _ => return Err(self.err("expected `,` or `]` in list")),
                    }
                }
            }
            Some(_) => self.bare(),
        }
    }

    /// Pairs up to `close` (or the end of the text when None), the closer consumed.
    fn pairs(&mut self, close: Option<char>, depth: usize) -> Result<Vec<(String, Arg)>, String> {
        let mut pairs: Vec<(String, Arg)> = Vec::new();
        loop {
            self.skip_ws();
            match (self.rest().chars().next(), close) {
                (None, None) => return Ok(pairs),
                (None, Some(_)) => return Err(self.err("unterminated object")),
                (Some(c), Some(cl)) if c == cl => {
                    self.pos += 1;
                    return Ok(pairs);
                }
                _ => {}
            }
            let key = self.key()?;
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(self.err(&format!("duplicate key {key:?}")));
            }
            let value = self.value(depth)?;
            pairs.push((key, value));
            self.skip_ws();
            match (self.rest().chars().next(), close) {
                (Some(','), _) => self.pos += 1,
                (None, None) => return Ok(pairs),
                (Some(c), Some(cl)) if c == cl => {}
                _ => return Err(self.err("expected `,` or the end of the object")),
            }
        }
    }

    /// A key and its `:`.
    fn key(&mut self) -> Result<String, String> {
        let key = if self.rest().starts_with(STRING_DELIM) {
            self.string()?
        } else {
            let rest = self.rest();
            let end = rest
                .find(|c: char| ":{}[],".contains(c))
                .unwrap_or(rest.len());
            let key = rest[..end].trim().to_string();
            if key.is_empty() || key.contains(STRING_DELIM) {
                return Err(self.err("expected a key"));
            }
            self.pos += end;
            key
        };
        self.skip_ws();
        if !self.rest().starts_with(':') {
            return Err(self.err("expected `:` after key"));
        }
        self.pos += 1;
        Ok(key)
    }

    /// A bare value: number, true, false, null, or (lenient) a plain word taken as a string.
    fn bare(&mut self) -> Result<Arg, String> {
        let rest = self.rest();
        let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
        let word = rest[..end].trim();
        if word.is_empty() {
            return Err(self.err("missing value"));
        }
        let arg = match word {
            "true" => Arg::Bool(true),
            "false" => Arg::Bool(false),
            "null" => Arg::Null,
            _ => {
                if let Ok(n) = serde_json::from_str::<serde_json::Number>(word) {
                    Arg::Num(n)
                } else if let Some(n) = word
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .and_then(serde_json::Number::from_f64)
                {
                    Arg::Num(n)
                } else if word.contains(|c: char| ":{[\"".contains(c)) || word.contains("<|") {
                    return Err(self.err("malformed value"));
                } else {
                    Arg::Str(word.to_string())
                }
            }
        };
        self.pos += end;
        Ok(arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn args_to_json() {
        let d = STRING_DELIM;
        let cases: Vec<(String, Value)> = vec![
            (
                format!("key:{d}text{d},n:1,flag:true,obj:{{a:{d}x{d}}},list:[1,{d}s{d}]"),
                json!({"key": "text", "n": 1, "flag": true, "obj": {"a": "x"}, "list": [1, "s"]}),
            ),
            (
                format!("{{key:{d}te{{x}},t:{d}}}"),
                json!({"key": "te{x},t:"}),
            ),
            (String::new(), json!({})),
            ("{}".into(), json!({})),
            (
                " { a : 1 , b : [ ] , c : { } } ".into(),
                json!({"a": 1, "b": [], "c": {}}),
            ),
            (
                "a:-2,b:1.5,c:1e-05,d:false,e:null,f:0".into(),
                json!({"a": -2, "b": 1.5, "c": 1e-05, "d": false, "e": null, "f": 0}),
            ),
            (
                format!("s:{d}line\nquote\" back\\ tab\t 日本 😀{d}"),
                json!({"s": "line\nquote\" back\\ tab\t 日本 😀"}),
            ),
            (
                format!("empty:{d}{d},l:[[1,[2]],{{}}]"),
                json!({"empty": "", "l": [[1, [2]], {}]}),
            ),
            ("unit:celsius".into(), json!({"unit": "celsius"})),
            (
                format!("{d}my key{d}:1,trailing:2,"),
                json!({"my key": 1, "trailing": 2}),
            ),
            (
                "big:12345678901234567890".into(),
                json!({"big": 12345678901234567890u64}),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(gemma_args_to_json(&text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn args_to_json_malformed() {
        let d = STRING_DELIM;
        let bad = [
            "{a:1".to_string(),
            "{a:1}}".into(),
            "a 1".into(),
            ":1".into(),
            "{:1}".into(),
            "a:".into(),
            "a:1,b:".into(),
            "a:[1,2".into(),
            "a:[1,2}".into(),
            "a:{b:1]".into(),
            format!("a:{d}unterminated"),
            format!("a:{d}x{d}{d}y{d}"),
            "a:1,a:2".into(),
            "a:x:y".into(),
            "a:1 b:2".into(),
            "}".into(),
            "a:\"json style\"".into(),
            format!("a:{}", "[".repeat(10_000)),
            format!("a:{}1{}", "[".repeat(10_000), "]".repeat(10_000)),
        ];
        for text in &bad {
            assert!(
                gemma_args_to_json(text).is_err(),
                "{text:?} should be an error: {:?}",
                gemma_args_to_json(text)
            );
        }
        // Nesting within the limit parses.
        let ok = format!("a:{}1{}", "[".repeat(100), "]".repeat(100));
        assert!(gemma_args_to_json(&ok).is_ok());
    }

    #[test]
    fn tool_call_text_parsing() {
        assert_eq!(
            parse_tool_calls(" call:f{a:1} "),
            Ok(vec![("f".into(), r#"{"a":1}"#.into())])
        );
        assert!(parse_tool_calls("call:{a:1}").is_err());
        assert!(parse_tool_calls("call:f").is_err());
        assert!(parse_tool_calls("call:f{a:1}junk").is_err());
        assert!(parse_tool_calls("").is_err());
    }

    #[test]
    fn several_calls_and_bad_names() {
        assert_eq!(
            parse_tool_calls("call:a{} , call:b{x:1}call:c{}"),
            Ok(vec![
                ("a".into(), "{}".into()),
                ("b".into(), r#"{"x":1}"#.into()),
                ("c".into(), "{}".into()),
            ])
        );
        for bad in [
            "call:a b{}",
            "call:f,g{}",
            "call:\"f\"{}",
            "call:f{}, junk",
            "call:f{}call:g",
            "call:f{a:1}}",
        ] {
            assert!(parse_tool_calls(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arguments_are_compact_json_in_written_order() {
        // Raw string text (quotes, backslashes, control characters, spaces kept) gets JSON's
        // escapes; keys keep the order written; numbers are JSON's.
        let d = STRING_DELIM;
        let text = format!(
            "call:f{{z:1,{d}k\"ey{d}:{d} a\"b\\c\n\t\u{1} {d},a:[true,false,null,-0.5,1e3,word]}}"
        );
        assert_eq!(
            parse_tool_calls(&text),
            Ok(vec![(
                "f".into(),
                r#"{"z":1,"k\"ey":" a\"b\\c\n\t\u0001 ","a":[true,false,null,-0.5,1000.0,"word"]}"#
                    .into()
            )])
        );
    }

    #[test]
    fn nesting_is_limited() {
        let lists = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        // Every object and list is a level, the braces of the arguments object included: a call
        // takes 127 lists inside them, a bare body (no braces) 128.
        assert!(parse_tool_calls(&format!("call:f{{a:{}}}", lists(127))).is_ok());
        assert!(parse_tool_calls(&format!("call:f{{a:{}}}", lists(128))).is_err());
        assert!(gemma_args_to_json(&format!("a:{}", lists(MAX_ARGS_DEPTH))).is_ok());
        let err = gemma_args_to_json(&format!("a:{}", lists(MAX_ARGS_DEPTH + 1))).unwrap_err();
        assert!(err.contains("nested too deeply"), "{err}");
        let objects = |n: usize| format!("{}1{}", "{b:".repeat(n), "}".repeat(n));
        assert!(gemma_args_to_json(&format!("a:{}", objects(MAX_ARGS_DEPTH))).is_ok());
        assert!(gemma_args_to_json(&format!("a:{}", objects(MAX_ARGS_DEPTH + 1))).is_err());
    }
}
