//! OpenAI chat messages to the messages a chat template reads (what transformers'
//! `apply_chat_template` is given): `developer` becomes `system`; an image part becomes
//! `{"type": "image"}` (the image itself goes to the vision tower, not the template); assistant
//! `tool_calls[].function.arguments` given as JSON text is parsed into an object; and tool
//! results reach the template in the style it reads ([`ToolResults`]): Google's Gemma 4 template
//! reads them from `tool_responses` on the assistant message that made the calls, templates that
//! read `role: "tool"` messages get those kept, each with the `name` of the call it answers.

use serde_json::{json, Map, Value};

use super::protocol::{Content, ContentPart, Message, ToolCallParam};
use crate::chat_template::ToolResults;

/// Converts `messages`; `label(i)` names message i in error messages (`messages[2]`,
/// `input[0]`). Errors: a tool message with no assistant call before it, a `tool_call_id` that
/// matches no call of that assistant message, more results than calls.
pub fn to_template(
    messages: &[Message],
    style: ToolResults,
    label: &dyn Fn(usize) -> String,
) -> Result<Vec<Value>, String> {
    let err = |i: usize, what: String| format!("{}: {what}", label(i));
    let mut out: Vec<Value> = Vec::with_capacity(messages.len());
    // The assistant message (index in `out`, its calls) whose calls the current tool run answers.
    let mut caller: Option<(usize, &[ToolCallParam])> = None;
    let mut run_pos = 0usize;
    for (i, message) in messages.iter().enumerate() {
        let (role, content) = match message {
            Message::Tool {
                content,
                tool_call_id,
                name,
            } => {
                let (a, calls) = caller.ok_or_else(|| {
                    err(
                        i,
                        "tool message without a preceding assistant message with tool_calls".into(),
                    )
                })?;
                let name = match tool_call_id {
                    Some(id) => calls
                        .iter()
                        .find(|c| c.id.as_deref() == Some(id))
                        .map(|c| c.function.name.clone())
                        .ok_or_else(|| {
                            let at = (0..i)
                                .rev()
                                .find(|&j| !matches!(messages[j], Message::Tool { .. }))
                                .unwrap_or(0);
                            err(
                                i,
                                format!(
                                    "tool_call_id {id:?} matches no tool call of {}",
                                    label(at)
                                ),
                            )
                        })?,
                    None => match name.as_deref().filter(|n| !n.is_empty()) {
                        Some(n) => n.to_owned(),
                        None => calls
                            .get(run_pos)
                            .map(|c| c.function.name.clone())
                            .ok_or_else(|| {
                                err(
                                    i,
                                    "tool message without tool_call_id, and more results than calls"
                                        .into(),
                                )
                            })?,
                    },
                };
                run_pos += 1;
                let response = parse_json_or_keep(tool_text(content));
                match style {
                    ToolResults::Attach => {
                        let entry = json!({"name": name, "response": response});
                        match out[a].get_mut("tool_responses") {
                            Some(Value::Array(list)) => list.push(entry),
                            _ => out[a]["tool_responses"] = Value::Array(vec![entry]),
                        }
                    }
                    ToolResults::Keep => {
                        let mut kept = Map::new();
                        kept.insert("role".into(), "tool".into());
                        if let Some(id) = tool_call_id {
                            kept.insert("tool_call_id".into(), id.as_str().into());
                        }
                        kept.insert("name".into(), name.into());
                        kept.insert("content".into(), response);
                        out.push(Value::Object(kept));
                    }
                }
                continue;
            }
            Message::System { content } | Message::Developer { content } => {
                ("system", Some(content))
            }
            Message::User { content } => ("user", Some(content)),
            Message::Assistant { content, .. } => ("assistant", content.as_ref()),
        };
        run_pos = 0;
        caller = None;
        let mut m = Map::new();
        m.insert("role".into(), role.into());
        // An assistant message without content has `content: null` (what clients send; the
        // renderer drops None values as transformers does).
        m.insert("content".into(), content.map_or(Value::Null, content_json));
        if let Message::Assistant {
            reasoning_content,
            tool_calls,
            ..
        } = message
        {
            if let Some(r) = reasoning_content {
                m.insert("reasoning_content".into(), r.as_str().into());
            }
            if !tool_calls.is_empty() {
                let calls = tool_calls.iter().map(call_json).collect();
                m.insert("tool_calls".into(), Value::Array(calls));
                caller = Some((out.len(), tool_calls));
            }
        }
        out.push(Value::Object(m));
    }
    Ok(out)
}

/// Text parts as `{"type": "text", "text"}`, image parts as `{"type": "image"}`.
fn content_json(content: &Content) -> Value {
    match content {
        Content::Text(s) => s.as_str().into(),
        Content::Parts(parts) => parts
            .iter()
            .map(|p| match p.text() {
                Some(text) => json!({"type": "text", "text": text}),
                None => json!({"type": "image"}),
            })
            .collect(),
    }
}

/// `arguments` as JSON text is parsed when it is an object (an empty string is `{}`); anything
/// else stays as given.
fn call_json(call: &ToolCallParam) -> Value {
    let arguments = match &call.function.arguments {
        Value::String(a) if a.trim().is_empty() => json!({}),
        Value::String(a) => match serde_json::from_str::<Value>(a) {
            Ok(v @ Value::Object(_)) => v,
            _ => Value::String(a.clone()),
        },
        other => other.clone(),
    };
    let mut c = Map::new();
    if let Some(id) = &call.id {
        c.insert("id".into(), id.as_str().into());
    }
    c.insert("type".into(), "function".into());
    c.insert(
        "function".into(),
        json!({"name": call.function.name, "arguments": arguments}),
    );
    Value::Object(c)
}

/// A tool message's content as text: a string, or its text parts joined with "\n" (as vLLM).
fn tool_text(content: &Content) -> String {
    match content {
        Content::Text(s) => s.clone(),
        Content::Parts(parts) => parts
            .iter()
            .filter_map(ContentPart::text)
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn parse_json_or_keep(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(v: Value) -> Vec<Message> {
        serde_json::from_value(v).expect("valid messages")
    }

    fn convert(v: Value, style: ToolResults) -> Result<Vec<Value>, String> {
        to_template(&messages(v), style, &|i| format!("messages[{i}]"))
    }

    #[test]
    fn errors_name_the_message() {
        let call = json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
        let tool = json!({"role": "tool", "tool_call_id": "c1", "content": "x"});
        let user = json!({"role": "user", "content": "u"});
        let cases = [
            (json!([tool]), "messages[0]:"),
            (json!([call, user, tool]), "messages[2]:"),
            (
                json!([user, {"role": "assistant", "content": "a"}, tool]),
                "messages[2]:",
            ),
        ];
        for (msgs, prefix) in cases {
            let e = convert(msgs, ToolResults::Attach).unwrap_err();
            assert!(e.starts_with(prefix), "{e}");
        }
        let e = convert(
            json!([user, call, {"role": "tool", "tool_call_id": "nope", "content": "x"}]),
            ToolResults::Attach,
        )
        .unwrap_err();
        assert!(
            e.starts_with("messages[2]:") && e.contains("nope") && e.contains("messages[1]"),
            "{e}"
        );
    }

    #[test]
    fn details() {
        let msgs = json!([
            {"role": "developer", "content": "d"},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:x"}}]},
            {"role": "assistant", "content": "", "reasoning": "r",
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": [1, 2]}"}},
                    {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}},
                    {"id": "c", "type": "function", "function": {"name": "h", "arguments": "[1]"}}]},
            {"role": "tool", "content": "{\"ok\": true}"},
            {"role": "tool", "name": "h", "content": [{"type": "text", "text": "line 1"}, {"type": "text", "text": "line 2"}]},
            {"role": "tool", "tool_call_id": "b", "content": "7"},
        ]);
        let out = convert(msgs.clone(), ToolResults::Attach).expect("converts");
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], json!({"role": "system", "content": "d"}));
        assert_eq!(
            out[1]["content"],
            json!([{"type": "text", "text": "look"}, {"type": "image"}])
        );
        assert_eq!(out[2]["reasoning_content"], "r");
        assert!(out[2].get("reasoning").is_none());
        let calls = &out[2]["tool_calls"];
        assert_eq!(calls[0]["function"]["arguments"], json!({"x": [1, 2]}));
        assert_eq!(calls[1]["function"]["arguments"], json!({}));
        assert_eq!(calls[2]["function"]["arguments"], json!("[1]"));
        assert_eq!(
            out[2]["tool_responses"],
            json!([
                {"name": "f", "response": {"ok": true}},
                {"name": "h", "response": "line 1\nline 2"},
                {"name": "g", "response": 7},
            ])
        );
        let kept = convert(msgs, ToolResults::Keep).expect("converts");
        assert_eq!(kept.len(), 6);
        assert_eq!(
            kept[3],
            json!({"role": "tool", "name": "f", "content": {"ok": true}})
        );
        assert_eq!(
            kept[5],
            json!({"role": "tool", "tool_call_id": "b", "name": "g", "content": 7})
        );
    }

    #[test]
    fn malformed_messages_are_refused_by_path() {
        let bad = [
            (json!([3]), "invalid type"),
            (json!([{"content": "x"}]), "role"),
            (json!([{"role": "wizard", "content": "x"}]), "wizard"),
            (json!([{"role": "user"}]), "content"),
            (
                json!([{"role": "user", "content": [{"type": "audio"}]}]),
                "content[0]",
            ),
            (json!([{"role": "user", "content": 5}]), "a number"),
        ];
        for (v, needle) in bad {
            let e = serde_json::from_value::<Vec<Message>>(v.clone()).unwrap_err();
            assert!(e.to_string().contains(needle), "{v}: {e}");
        }
    }
}
