//! The Gemma 4 tool-call syntax as a grammar (Lark, llguidance's dialect), for calls that always
//! parse: `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:1}<tool_call|>` with NAME one of the
//! allowed tools and the arguments following that tool's `parameters` schema, written the way
//! [`super::gemma_args`] reads them back (bare keys, strings between `<|"|>` tokens, other values
//! bare). The inverse of that parser, for the JSON-schema subset tools use:
//!
//! - `object`: its `properties` in order, the `required` ones always, the others optional, no
//!   other keys; `string` (with `maxLength`), `integer`, `number`, `boolean`, `null`, `enum`,
//!   `const`, `array` (with `maxItems` up to 16), a list of types, `anyOf`/`oneOf`;
//! - anything else (`$ref`, no type, ...): any value of the syntax.

use serde_json::Value;

/// The special tokens of the syntax, by id (they are single tokens, not text).
#[derive(Debug, Clone, Copy)]
pub struct CallTokens {
    pub open: u32,
    pub close: u32,
    pub quote: u32,
}

/// Lark for one call (`parallel` false) or one or more calls in a row, each to one of `tools`
/// (name, parameters schema).
pub fn tool_calls(tools: &[(String, Option<Value>)], t: CallTokens, parallel: bool) -> String {
    let mut g = Builder {
        rules: vec![],
        t,
        generic: false,
    };
    let calls: Vec<String> = tools
        .iter()
        .map(|(name, params)| {
            let object = |p: &Value| {
                p.get("type").and_then(Value::as_str) == Some("object")
                    || p.get("properties").is_some()
            };
            let args = match params {
                Some(p) if object(p) => g.value(p),
                // No parameters: an empty object.
                _ => "\"{}\"".to_string(),
            };
            format!("{} {args}", lit(name))
        })
        .collect();
    let call = format!(
        "<[{}]> \"call:\" ({}) <[{}]>",
        t.open,
        calls.join(" | "),
        t.close
    );
    let calls = if parallel { "call+" } else { "call" };
    let mut out = format!("start: {calls}\ncall: {call}\n");
    for r in &g.rules {
        out.push_str(r);
        out.push('\n');
    }
    if g.generic {
        out.push_str(&generic(t));
    }
    out
}

/// A Lark string literal.
fn lit(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

struct Builder {
    rules: Vec<String>,
    t: CallTokens,
    /// Whether the generic value rules are used.
    generic: bool,
}

impl Builder {
    /// A new rule `body`; its name.
    fn rule(&mut self, body: String) -> String {
        let name = format!("r{}", self.rules.len());
        self.rules.push(format!("{name}: {body}"));
        name
    }

    fn quoted(&self, inner: &str) -> String {
        format!("<[{q}]> {inner} <[{q}]>", q = self.t.quote)
    }

    /// The expression of a value under `schema`.
    fn value(&mut self, schema: &Value) -> String {
        if let Some(options) = schema.get("enum").and_then(Value::as_array) {
            let alts: Vec<String> = options.iter().map(|v| self.literal(v)).collect();
            return format!("({})", alts.join(" | "));
        }
        if let Some(c) = schema.get("const") {
            return self.literal(c);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = schema.get(key).and_then(Value::as_array) {
                let alts: Vec<String> = options.iter().map(|s| self.value(s)).collect();
                return format!("({})", alts.join(" | "));
            }
        }
        match schema.get("type") {
            Some(Value::String(t)) => self.typed(t, schema),
            Some(Value::Array(types)) => {
                let alts: Vec<String> = types
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|t| self.typed(t, schema))
                    .collect();
                format!("({})", alts.join(" | "))
            }
            _ => self.any(),
        }
    }

    fn typed(&mut self, t: &str, schema: &Value) -> String {
        let max = |key| schema.get(key).and_then(Value::as_u64);
        match t {
            "string" => {
                let n = max("maxLength").unwrap_or(256);
                self.quoted(&format!("/(?s:.){{0,{n}}}/"))
            }
            // Bare numbers are JSON's: llguidance's JSON compiler keeps the bounds.
            "integer" | "number" => {
                let mut n = serde_json::Map::new();
                n.insert("type".into(), t.into());
                for key in ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"] {
                    if let Some(v) = schema.get(key) {
                        n.insert(key.into(), v.clone());
                    }
                }
                self.rule(format!("%json {}", Value::Object(n)))
            }
            "boolean" => "(\"true\" | \"false\")".into(),
            "null" => "\"null\"".into(),
            "array" => {
                let item = match schema.get("items") {
                    Some(items) => self.value(items),
                    None => self.any(),
                };
                let more = match max("maxItems") {
                    Some(0) => return "\"[]\"".into(),
                    Some(1) => String::new(),
                    Some(m) if m <= 16 => format!("(\",\" {item}){{0,{}}}", m - 1),
                    _ => format!("(\",\" {item})*"),
                };
                self.rule(format!("\"[\" ({item} {more})? \"]\""))
            }
            "object" => self.object(schema),
            _ => self.any(),
        }
    }

    /// `{` the properties in order, required ones always, others optional `}`: B(i) is "from
    /// property i on, nothing written yet", A(i) "from property i on, something written" (so
    /// each item after the first has its comma).
    fn object(&mut self, schema: &Value) -> String {
        let Some(props) = schema.get("properties").and_then(Value::as_object) else {
            return self.any_object();
        };
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let items: Vec<(String, bool)> = props
            .iter()
            .map(|(k, s)| {
                let item = format!("{} {}", lit(&format!("{k}:")), self.value(s));
                (item, required.contains(&k.as_str()))
            })
            .collect();
        // A(n) and B(n) are empty.
        let (mut a, mut b): (Option<String>, Option<String>) = (None, None);
        for (item, req) in items.iter().rev() {
            let a_next = a.clone().unwrap_or_default();
            let new_a = match req {
                true => format!("\",\" {item} {a_next}"),
                false => format!("(\",\" {item})? {a_next}"),
            };
            let new_b = match (req, &b) {
                (true, _) => format!("{item} {a_next}"),
                (false, Some(b_next)) => format!("({item} {a_next}) | {b_next}"),
                (false, None) => format!("({item} {a_next})?"),
            };
            a = Some(self.rule(new_a));
            b = Some(self.rule(new_b));
        }
        match b {
            Some(b) => self.rule(format!("\"{{\" {b} \"}}\"")),
            None => "\"{}\"".into(),
        }
    }

    fn literal(&mut self, v: &Value) -> String {
        match v {
            Value::String(s) => self.quoted(&lit(s)),
            other => lit(&other.to_string()),
        }
    }

    fn any(&mut self) -> String {
        self.generic = true;
        "gval".into()
    }

    fn any_object(&mut self) -> String {
        self.generic = true;
        "gobj".into()
    }
}

/// Any value of the syntax (bounded strings and numbers, so that a call always ends).
fn generic(t: CallTokens) -> String {
    format!(
        "gval: <[{q}]> /(?s:.){{0,256}}/ <[{q}]> | /-?(0|[1-9][0-9]{{0,17}})(\\.[0-9]{{1,17}})?/ | \"true\" | \"false\" | \"null\" | gobj | \"[\" (gval (\",\" gval)*)? \"]\"\n\
         gobj: \"{{\" (gkey \":\" gval (\",\" gkey \":\" gval)*)? \"}}\"\n\
         gkey: /[A-Za-z_][A-Za-z0-9_]*/\n",
        q = t.quote
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma4_engine::structured::{Format, Grammars};
    use serde_json::json;

    /// Whether the fixture tokenizer's encoding of `text` is a complete path through `lark`
    /// (the end of the turn is id 106).
    fn accepts(lark: &str, text: &str) -> bool {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/tiny-31b-recipe");
        let json = std::fs::read_to_string(format!("{dir}/tokenizer.json")).unwrap();
        let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let grammars = Grammars::new(&json, 600, 106).unwrap();
        let mut c = grammars
            .compile(&Format::Lark(lark.to_string()), None)
            .unwrap_or_else(|e| panic!("{e}\n{lark}"));
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        // Every token taken, and then the grammar may end (done, or the end of turn allowed).
        ids.iter().all(|&id| c.consume(id).is_ok())
            && (c.is_done() || c.allowed().unwrap().unwrap().is_allowed(106))
    }

    fn tokens() -> CallTokens {
        CallTokens {
            open: 48,
            close: 49,
            quote: 15,
        }
    }

    #[test]
    fn calls_follow_each_tools_schema() {
        let tools = vec![
            (
                "set".to_string(),
                Some(json!({"type": "object", "properties": {
                    "level": {"type": "integer", "minimum": 1, "maximum": 3},
                    "mode": {"enum": ["a", "b"]},
                    "on": {"type": "boolean"}
                }, "required": ["on"]})),
            ),
            ("ping".to_string(), None),
        ];
        let one = tool_calls(&tools, tokens(), false);
        let q = "<|\"|>";
        for (text, ok) in [
            ("<|tool_call>call:set{on:true}<tool_call|>", true),
            ("<|tool_call>call:set{level:2,on:false}<tool_call|>", true),
            (
                &format!("<|tool_call>call:set{{level:3,mode:{q}b{q},on:true}}<tool_call|>")
                    as &str,
                true,
            ),
            ("<|tool_call>call:ping{}<tool_call|>", true),
            // Out of range, out of order, a missing required key, an unknown tool or key.
            ("<|tool_call>call:set{level:4,on:true}<tool_call|>", false),
            ("<|tool_call>call:set{on:true,level:2}<tool_call|>", false),
            ("<|tool_call>call:set{level:2}<tool_call|>", false),
            ("<|tool_call>call:get{on:true}<tool_call|>", false),
            ("<|tool_call>call:set{on:true,x:1}<tool_call|>", false),
            // One call only, unless parallel.
            (
                "<|tool_call>call:ping{}<tool_call|><|tool_call>call:ping{}<tool_call|>",
                false,
            ),
        ] {
            assert_eq!(accepts(&one, text), ok, "{text}");
        }
        let many = tool_calls(&tools, tokens(), true);
        assert!(accepts(
            &many,
            "<|tool_call>call:ping{}<tool_call|><|tool_call>call:set{on:false}<tool_call|>"
        ));
    }
}
