//! The real server on a free loopback port, driven over HTTP/1.1 by a minimal client (no extra
//! crates): chat (stream and not), concurrency, disconnects, bad requests, auth, metrics, openapi.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gemma4_server::http::AppState;
use gemma4_server::serve::{build_state, bundled_model, start_engine, ServeArgs};
use serde_json::{json, Value};

const KEY: &str = "test-key";

struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
}

/// One server for the whole test binary (loading once; tests run concurrently against it).
fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let args = ServeArgs {
            model: bundled_model(),
            host: "127.0.0.1".into(),
            port: 0,
            served_model_name: Some("tiny".into()),
            api_key: Some(KEY.into()),
            max_model_len: Some(256),
            max_num_seqs: 8,
            // Small chunks, so that prompts are prefilled over several steps in these tests.
            max_num_batched_tokens: 7,
            max_waiting: 64,
            shutdown_grace: 1,
            scripted_output: None,
        };
        let (engine, meta) = start_engine::<gemma4_model::CpuBackend>(&args, Default::default(), false).expect("engine starts");
        let state = Arc::new(build_state(&args, engine, meta).expect("state"));
        let (tx, rx) = std::sync::mpsc::channel();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, gemma4_server::http::router(st)).await.unwrap();
            });
        });
        Server { addr: rx.recv().unwrap(), state }
    })
}

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

fn request(method: &str, path: &str, body: Option<&[u8]>, key: Option<&str>) -> Reply {
    let mut s = TcpStream::connect(server().addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // A peer that refuses a huge body may close early: ignore write errors.
        let _ = s.write_all(b);
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse(&raw)
}

fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Reply { status, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn post(path: &str, body: Value) -> Reply {
    request("POST", path, Some(body.to_string().as_bytes()), Some(KEY))
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn assert_error(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json();
    let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no OpenAI error object: {}", r.body));
    assert!(v["error"]["type"].is_string());
    assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
}

/// Content of a streamed chat, concatenated.
fn stream_text(r: &Reply) -> String {
    let mut out = String::new();
    for e in r.events() {
        if e == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                out.push_str(t);
            }
        }
    }
    out
}

#[test]
fn chat_completion_greedy() {
    let r = post("/v1/chat/completions", chat(json!({})));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 3);
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion));
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + completion);
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "length" || finish == "stop", "{finish}");
    // Greedy is deterministic.
    let again = post("/v1/chat/completions", chat(json!({}))).json();
    assert_eq!(again["choices"][0]["message"], v["choices"][0]["message"]);
}

#[test]
fn streaming_equals_non_streaming_and_ends_with_done() {
    let whole = post("/v1/chat/completions", chat(json!({"max_tokens": 10}))).json();
    let r = post("/v1/chat/completions", chat(json!({"max_tokens": 10, "stream": true, "stream_options": {"include_usage": true}})));
    assert_eq!(r.status, 200);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], whole["usage"]["completion_tokens"]);
    assert_eq!(stream_text(&r), whole["choices"][0]["message"]["content"].as_str().unwrap());
}

#[test]
fn concurrent_streams_equal_the_request_alone() {
    let body = |i: usize| chat(json!({"max_tokens": 12, "stream": true, "messages": [{"role": "user", "content": format!("Story number {i}")}]}));
    let alone: Vec<String> = (0..4).map(|i| stream_text(&post("/v1/chat/completions", body(i)))).collect();
    let handles: Vec<_> = (0..8).map(|i| std::thread::spawn(move || stream_text(&post("/v1/chat/completions", body(i % 4))))).collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), alone[i % 4], "stream {i}");
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let b = chat(json!({"temperature": 1.0, "seed": 42, "max_tokens": 12}));
    let a = post("/v1/chat/completions", b.clone()).json();
    let c = post("/v1/chat/completions", b).json();
    assert_eq!(a["choices"][0]["message"], c["choices"][0]["message"]);
}

#[test]
fn n_choices_and_logprobs() {
    let v = post("/v1/chat/completions", chat(json!({"n": 3, "temperature": 1.0, "seed": 1, "logprobs": true, "top_logprobs": 2}))).json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let lp = c["logprobs"]["content"].as_array().unwrap();
        assert!(!lp.is_empty());
        for t in lp {
            assert!(t["logprob"].as_f64().unwrap() <= 0.0);
            assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
        }
    }
}

#[test]
fn disconnect_frees_the_slot() {
    let stats = server().state.engine.stats.clone();
    let cancelled_before = stats.requests_cancelled_total.load(Ordering::SeqCst);
    let mut s = TcpStream::connect(server().addr).unwrap();
    let body = chat(json!({"max_tokens": 200, "stream": true, "messages": [{"role": "user", "content": "never ending"}], "ignore_eos": true})).to_string();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    // Read a little of the stream, then hang up.
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    for _ in 0..12 {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    drop(reader);
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.requests_cancelled_total.load(Ordering::SeqCst) == cancelled_before {
        assert!(Instant::now() < deadline, "the disconnected request was not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_requests_are_400_and_the_server_keeps_serving() {
    let raw = request("POST", "/v1/chat/completions", Some(b"{not json"), Some(KEY));
    assert_error(&raw, 400, "");
    assert_error(&post("/v1/chat/completions", json!({"messages": "hello"})), 400, "messages");
    assert_error(&post("/v1/chat/completions", chat(json!({"temperature": "hot"}))), 400, "temperature");
    assert_error(&post("/v1/chat/completions", chat(json!({"messages": []}))), 400, "messages");
    assert_error(&post("/v1/chat/completions", chat(json!({"messages": [{"role": "wizard", "content": "x"}]}))), 400, "role");
    assert_error(&post("/v1/chat/completions", chat(json!({"temperature": 5.0}))), 400, "temperature");
    let long = "word ".repeat(400);
    assert_error(&post("/v1/chat/completions", chat(json!({"messages": [{"role": "user", "content": long}]}))), 400, "maximum context length is 256");
    let image = json!([{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]);
    assert_error(&post("/v1/chat/completions", chat(json!({"messages": [{"role": "user", "content": image}]}))), 400, "image");
    let huge = vec![b'x'; gemma4_server::http::BODY_LIMIT + 1024];
    let r = request("POST", "/v1/chat/completions", Some(&huge), Some(KEY));
    assert!(r.status == 413 || r.status == 0, "status {}", r.status); // 0: the peer closed before answering
    assert_eq!(request("GET", "/health", None, None).status, 200);
    assert_eq!(post("/v1/chat/completions", chat(json!({}))).status, 200);
}

#[test]
fn auth_and_unknown_model() {
    assert_error(&request("GET", "/v1/models", None, None), 401, "API key");
    assert_error(&request("GET", "/v1/models", None, Some("wrong")), 401, "API key");
    let models = request("GET", "/v1/models", None, Some(KEY)).json();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_error(&post("/v1/chat/completions", chat(json!({"model": "gpt-9"}))), 404, "gpt-9");
    // No auth on health, metrics, version, openapi.
    for p in ["/health", "/metrics", "/version", "/openapi.json"] {
        assert_eq!(request("GET", p, None, None).status, 200, "{p}");
    }
}

#[test]
fn tokenize_detokenize_roundtrip() {
    let t = post("/tokenize", json!({"prompt": "Hello world", "add_special_tokens": false})).json();
    let ids = t["tokens"].clone();
    assert_eq!(t["count"], ids.as_array().unwrap().len());
    let d = post("/detokenize", json!({"tokens": ids})).json();
    assert_eq!(d["prompt"], "Hello world");
    let c = post("/tokenize", json!({"messages": [{"role": "user", "content": "hi"}]})).json();
    assert!(c["count"].as_u64().unwrap() > 3);
    assert_error(&post("/detokenize", json!({"tokens": [99999999]})), 400, "vocabulary");
}

#[test]
fn metrics_and_openapi() {
    post("/v1/chat/completions", chat(json!({})));
    let m = request("GET", "/metrics", None, None).body;
    for name in [
        "gemma4_num_requests_running",
        "gemma4_num_requests_waiting",
        "gemma4_kv_cache_usage_perc",
        "gemma4_prompt_tokens_total",
        "gemma4_generation_tokens_total",
        "gemma4_time_to_first_token_seconds_bucket",
        "gemma4_inter_token_latency_seconds_bucket",
        "gemma4_e2e_request_latency_seconds_count",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    let spec = request("GET", "/openapi.json", None, None).json();
    for p in ["/v1/chat/completions", "/v1/responses", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics", "/version"] {
        assert!(spec["paths"][p].is_object(), "{p} missing from /openapi.json");
    }
    assert!(spec["components"]["schemas"]["ChatCompletionRequest"].is_object());
}

#[test]
fn responses_api() {
    let r = post("/v1/responses", json!({"model": "tiny", "input": "Say hi", "instructions": "Be brief", "max_output_tokens": 6, "temperature": 0})).json();
    assert_eq!(r["object"], "response");
    assert!(r["status"] == "completed" || r["status"] == "incomplete");
    let msg = r["output"].as_array().unwrap().iter().find(|o| o["type"] == "message").expect("message item");
    assert!(msg["content"][0]["text"].is_string());
    assert!(r["usage"]["output_tokens"].as_u64().unwrap() <= 6);
    let s = post("/v1/responses", json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}], "max_output_tokens": 4, "stream": true, "temperature": 0}));
    let events: Vec<Value> = s.events().iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(events[0]["type"], "response.created");
    let last = events.last().unwrap();
    assert!(last["type"] == "response.completed" || last["type"] == "response.incomplete", "{last}");
    let seqs: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}

#[test]
fn named_tool_choice_forces_the_call_syntax() {
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let v = post(
        "/v1/chat/completions",
        chat(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "logprobs": true, "max_tokens": 12, "ignore_eos": true})),
    )
    .json();
    let tokens: String = v["choices"][0]["logprobs"]["content"].as_array().unwrap().iter().map(|t| t["token"].as_str().unwrap().to_string()).collect();
    assert!(tokens.starts_with("<|tool_call>call:get_weather{"), "{tokens}");
    // Required: the call syntax, the model picks the name.
    let v = post("/v1/chat/completions", chat(json!({"tools": tools, "tool_choice": "required", "logprobs": true, "max_tokens": 4}))).json();
    let first = v["choices"][0]["logprobs"]["content"][0]["token"].as_str().unwrap().to_string();
    assert_eq!(first, "<|tool_call>");
    assert_error(&post("/v1/chat/completions", chat(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}))), 400, "nope");
    assert_error(&post("/v1/chat/completions", chat(json!({"tool_choice": "required"}))), 400, "tools");
}
