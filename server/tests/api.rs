//! The real server on a free loopback port, driven over HTTP/1.1 by hyper's client (already in
//! the tree for the image fetcher): chat (stream and not), concurrency, disconnects, bad
//! requests, auth, metrics, openapi.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gemma4_model::testing::png_header;
use gemma4_server::http::AppState;
use gemma4_server::serve::{build_state, bundled_model, start_engine, ServeArgs};
use serde_json::{json, Value};

const KEY: &str = "test-key";

struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    /// Sending (or dropping) it shuts the server down, as Ctrl-C does.
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

/// One server for the whole test binary (loading once; tests run concurrently against it).
fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    // Small chunks, so that prompts are prefilled over several steps in these tests.
    S.get_or_init(|| start(bundled_model(), 256, 7, false, |_| {}))
}

/// Starts the server in-process on a free loopback port.
fn start(
    model: PathBuf,
    max_model_len: usize,
    chunk: usize,
    image_urls: bool,
    tweak: impl FnOnce(&mut AppState),
) -> Server {
    start_with_blocks(model, max_model_len, chunk, image_urls, None, tweak)
}

/// As `start`, with a KV block budget (`--num-kv-blocks`).
fn start_with_blocks(
    model: PathBuf,
    max_model_len: usize,
    chunk: usize,
    image_urls: bool,
    num_kv_blocks: Option<usize>,
    tweak: impl FnOnce(&mut AppState),
) -> Server {
    start_with_args(
        model,
        max_model_len,
        chunk,
        image_urls,
        num_kv_blocks,
        |_| {},
        tweak,
    )
}

/// As `start_with_blocks`, with any other server flag set by `args`.
fn start_with_args(
    model: PathBuf,
    max_model_len: usize,
    chunk: usize,
    image_urls: bool,
    num_kv_blocks: Option<usize>,
    edit: impl FnOnce(&mut ServeArgs),
    tweak: impl FnOnce(&mut AppState),
) -> Server {
    let mut args = ServeArgs {
        model,
        host: "127.0.0.1".into(),
        port: 0,
        served_model_name: Some("tiny".into()),
        api_key: Some(KEY.into()),
        max_model_len: Some(max_model_len),
        max_num_seqs: 8,
        max_num_batched_tokens: chunk,
        max_waiting: 64,
        num_kv_blocks,
        kv_cache_memory: None,
        block_size: 16,
        kv_cache_dtype: gemma4_model::KvDtype::Model,
        no_enable_prefix_caching: false,
        shutdown_grace: 1,
        header_read_timeout: 20,
        body_read_timeout: 60,
        keep_alive_timeout: 15,
        no_image_urls: !image_urls,
        allowed_media_domains: vec![],
        image_ca_file: None,
        limit_images_per_prompt: 8,
        image_fetch_timeout: 5,
        responses_store_max_bytes: 256 << 20,
        responses_store_ttl: 3600,
    };
    edit(&mut args);
    let (engine, meta) = start_engine::<gemma4_model::CpuBackend>(&args, Default::default(), false)
        .expect("engine starts");
    let mut state = build_state(&args, engine, meta).expect("state");
    tweak(&mut state);
    let state = Arc::new(state);
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let limits = args.conn_limits();
    let grace = Duration::from_secs(args.shutdown_grace);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let stop = async {
                let _ = stop_rx.await;
            };
            gemma4_server::serve::serve_until(st, listener, limits, grace, stop).await;
        });
    });
    Server {
        addr: rx.recv().unwrap(),
        state,
        stop: std::sync::Mutex::new(Some(stop_tx)),
    }
}

struct Reply {
    status: u16,
    body: String,
    headers: hyper::HeaderMap,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

fn request(method: &str, path: &str, body: Option<&[u8]>, key: Option<&str>) -> Reply {
    request_to(server().addr, method, path, body, key)
}

/// The client side's runtime (tests call from many threads; `block_on` takes `&self`).
fn client_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Opens a connection and sends one request; the connection's task is returned so that a test
/// can hang up by aborting it.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    key: Option<&str>,
) -> (
    hyper::Result<hyper::Response<hyper::body::Incoming>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body =
        http_body_util::Full::new(hyper::body::Bytes::from(body.unwrap_or_default().to_vec()));
    let resp = sender.send_request(req.body(body).unwrap()).await;
    (resp, conn)
}

/// One request and its whole answer; status 0 when the server closed the connection without
/// answering (a body over the limit may be refused before it is read).
fn request_to(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    key: Option<&str>,
) -> Reply {
    client_runtime().block_on(async {
        let answer = tokio::time::timeout(Duration::from_secs(120), async {
            let (resp, _conn) = send(addr, method, path, body, key).await;
            let Ok(resp) = resp else {
                return Reply {
                    status: 0,
                    body: String::new(),
                    headers: Default::default(),
                };
            };
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Reply {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
                headers,
            }
        });
        answer.await.expect("the server answers within 120 s")
    })
}

/// An authenticated JSON POST to the server at `addr`.
fn post_at(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    request_to(
        addr,
        "POST",
        path,
        Some(body.to_string().as_bytes()),
        Some(KEY),
    )
}

fn post(path: &str, body: Value) -> Reply {
    post_at(server().addr, path, &body)
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
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no OpenAI error object: {}", r.body));
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
    // Greedy on the random fixture never samples an end-of-turn within max_tokens (8).
    assert_eq!(completion, 8);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + completion
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Greedy is deterministic.
    let again = post("/v1/chat/completions", chat(json!({}))).json();
    assert_eq!(again["choices"][0]["message"], v["choices"][0]["message"]);
}

#[test]
fn streaming_equals_non_streaming_and_ends_with_done() {
    let whole = post("/v1/chat/completions", chat(json!({"max_tokens": 10}))).json();
    let r = post(
        "/v1/chat/completions",
        chat(json!({"max_tokens": 10, "stream": true, "stream_options": {"include_usage": true}})),
    );
    assert_eq!(r.status, 200);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    assert_eq!(
        stream_text(&r),
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[test]
fn concurrent_streams_equal_the_request_alone() {
    let body = |i: usize| {
        chat(
            json!({"max_tokens": 12, "stream": true, "messages": [{"role": "user", "content": format!("Story number {i}")}]}),
        )
    };
    let alone: Vec<String> = (0..4)
        .map(|i| stream_text(&post("/v1/chat/completions", body(i))))
        .collect();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || stream_text(&post("/v1/chat/completions", body(i % 4))))
        })
        .collect();
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
    let v = post(
        "/v1/chat/completions",
        chat(json!({"n": 3, "temperature": 1.0, "seed": 1, "logprobs": true, "top_logprobs": 2})),
    )
    .json();
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
    let body = chat(json!({"max_tokens": 200, "stream": true, "messages": [{"role": "user", "content": "never ending"}], "ignore_eos": true})).to_string();
    client_runtime().block_on(async {
        let (resp, conn) = send(
            server().addr,
            "POST",
            "/v1/chat/completions",
            Some(body.as_bytes()),
            Some(KEY),
        )
        .await;
        // Read a few frames of the stream, then hang up.
        let mut body = resp.unwrap().into_body();
        for _ in 0..4 {
            http_body_util::BodyExt::frame(&mut body)
                .await
                .expect("a frame")
                .unwrap();
        }
        drop(body);
        conn.abort();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.requests_cancelled_total.load(Ordering::SeqCst) == cancelled_before {
        assert!(
            Instant::now() < deadline,
            "the disconnected request was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_requests_are_400_and_the_server_keeps_serving() {
    let raw = request(
        "POST",
        "/v1/chat/completions",
        Some(b"{not json"),
        Some(KEY),
    );
    assert_error(&raw, 400, "");
    assert_error(
        &post("/v1/chat/completions", json!({"messages": "hello"})),
        400,
        "messages",
    );
    assert_error(
        &post("/v1/chat/completions", chat(json!({"temperature": "hot"}))),
        400,
        "temperature",
    );
    assert_error(
        &post("/v1/chat/completions", chat(json!({"messages": []}))),
        400,
        "messages",
    );
    assert_error(
        &post(
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "wizard", "content": "x"}]})),
        ),
        400,
        "role",
    );
    assert_error(
        &post("/v1/chat/completions", chat(json!({"temperature": 5.0}))),
        400,
        "temperature",
    );
    let long = "word ".repeat(400);
    assert_error(
        &post(
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": long}]})),
        ),
        400,
        "maximum context length is 256",
    );
    let image = json!([{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]);
    assert_error(
        &post(
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": image}]})),
        ),
        400,
        "no vision tower",
    );
    let huge = vec![b'x'; gemma4_server::http::BODY_LIMIT + 1024];
    let r = request("POST", "/v1/chat/completions", Some(&huge), Some(KEY));
    assert!(r.status == 413 || r.status == 0, "status {}", r.status); // 0: the peer closed before answering
    assert_eq!(request("GET", "/health", None, None).status, 200);
    assert_eq!(post("/v1/chat/completions", chat(json!({}))).status, 200);
}

#[test]
fn auth_and_unknown_model() {
    assert_error(&request("GET", "/v1/models", None, None), 401, "API key");
    assert_error(
        &request("GET", "/v1/models", None, Some("wrong")),
        401,
        "API key",
    );
    let models = request("GET", "/v1/models", None, Some(KEY)).json();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_error(
        &post("/v1/chat/completions", chat(json!({"model": "gpt-9"}))),
        404,
        "gpt-9",
    );
    // No auth on health, metrics, version, openapi.
    for p in ["/health", "/metrics", "/version", "/openapi.json"] {
        assert_eq!(request("GET", p, None, None).status, 200, "{p}");
    }
}

#[test]
fn validation_matches_vllm_and_names_the_field() {
    let tool = |parameters: Value| json!([{"type": "function", "function": {"name": "f", "parameters": parameters}}]);
    let cases = [
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "user", "content": {"a": 1}}]}),
            "messages",
        ),
        (json!({"tools": tool(json!("garbage"))}), "tools"),
        (json!({"tools": tool(json!({"type": "banana"}))}), "tools"),
        (
            json!({"tools": tool(json!({"type": "object", "properties": [1]}))}),
            "tools",
        ),
        (json!({"presence_penalty": -3}), "presence_penalty"),
        (json!({"frequency_penalty": 3}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"repetition_penalty": -0.5}), "repetition_penalty"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"reasoning_effort": "bogus"}), "reasoning_effort"),
        (json!({"max_tokens": 300}), "max_tokens"),
        (
            json!({"max_completion_tokens": 250}),
            "max_completion_tokens",
        ),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
    ];
    for (extra, param) in cases {
        let r = post("/v1/chat/completions", chat(extra.clone()));
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let e = &r.json()["error"];
        assert_eq!(e["type"], "invalid_request_error", "{extra}");
        // serde's own errors (content of the wrong type) name the path in the message.
        let named = e["param"] == param || e["message"].as_str().unwrap().contains(param);
        assert!(named, "{extra}: {e}");
    }
    let r = post("/v1/chat/completions", chat(json!({"max_tokens": 300})));
    assert_error(&r, 400, "'max_tokens' is too large: 300");
    let responses = [
        (
            json!({"input": "hi", "reasoning": {"effort": "bogus"}}),
            "reasoning",
        ),
        (
            json!({"input": "hi", "max_output_tokens": 1000}),
            "max_output_tokens",
        ),
        (
            json!({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": 7}]}),
            "tools",
        ),
    ];
    for (body, param) in responses {
        let r = post("/v1/responses", body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    // In range: accepted.
    let ok = chat(
        json!({"presence_penalty": 2, "repetition_penalty": 1.2, "reasoning_effort": "minimal",
                          "logprobs": true, "top_logprobs": 20, "max_tokens": 4}),
    );
    assert_eq!(post("/v1/chat/completions", ok).status, 200);
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = client_runtime().block_on(async {
            let tcp = tokio::net::TcpStream::connect(server().addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = hyper::Request::get("/v1/models")
                .header("host", "localhost")
                .header("authorization", format!("{scheme} {KEY}"))
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .unwrap();
            sender.send_request(req).await.unwrap().status().as_u16()
        });
        assert_eq!(r, 200, "{scheme}");
    }
    assert_eq!(
        request("GET", "/v1/models", None, Some("bearer-less")).status,
        401
    );
}

/// A long generation: the request holds its slot for seconds on the CPU backend.
fn long_chat() -> Value {
    chat(json!({"max_tokens": 230, "ignore_eos": true, "temperature": 1.0, "seed": 1}))
}

#[test]
fn a_burst_gets_slots_plus_queue_and_the_rest_retry_after() {
    // 2 slots + 2 waiting: of 8 requests sent at once, exactly 4 are taken.
    let s = start_with_args(
        bundled_model(),
        256,
        64,
        false,
        None,
        |a| {
            a.max_num_seqs = 2;
            a.max_waiting = 2;
        },
        |_| {},
    );
    let body = long_chat();
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| post_at(s.addr, "/v1/chat/completions", &body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        (ok, busy.len()),
        (4, 4),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in busy {
        assert_eq!(r.headers["retry-after"], "1");
        assert_error(r, 503, "--max-num-seqs + --max-waiting");
    }
}

/// A raw TCP client: writes `head`, then reads until the server closes or `limit` passes.
/// Returns what was read and whether the server closed the connection in time.
fn raw_exchange(addr: SocketAddr, head: &[u8], limit: Duration) -> (String, bool) {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.write_all(head).unwrap();
    tcp.set_read_timeout(Some(limit)).unwrap();
    let mut got = vec![];
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tcp.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

#[test]
fn stalled_clients_are_cut_off() {
    let s = start_with_args(
        bundled_model(),
        256,
        64,
        false,
        None,
        |a| {
            a.header_read_timeout = 1;
            a.body_read_timeout = 1;
            a.keep_alive_timeout = 1;
        },
        |_| {},
    );
    // Many connections that never finish their headers, and one that never sends a byte.
    let t0 = Instant::now();
    let stalled: Vec<_> = (0..50)
        .map(|i| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let head: &[u8] = if i == 0 {
                    b""
                } else {
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                };
                raw_exchange(addr, head, Duration::from_secs(10))
            })
        })
        .collect();
    // Meanwhile the server answers others.
    assert_eq!(request_to(s.addr, "GET", "/health", None, None).status, 200);
    for t in stalled {
        let (_, closed) = t.join().unwrap();
        assert!(closed, "a stalled connection stayed open");
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    // A body that stops half-way: a 408 with an error object, after the body timeout.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"messages\""
    );
    let (answer, _) = raw_exchange(s.addr, head.as_bytes(), Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-read-timeout"), "{answer}");
    // An idle keep-alive connection is closed after its timeout, once its response is sent.
    let t0 = Instant::now();
    let (answer, closed) = raw_exchange(
        s.addr,
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        closed && t0.elapsed() < Duration::from_secs(5),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn shutdown_ends_cut_streams_with_an_error_frame_and_done() {
    let s = start_with_args(
        bundled_model(),
        256,
        64,
        false,
        None,
        |a| a.shutdown_grace = 0,
        |_| {},
    );
    let mut body = long_chat();
    body["stream"] = json!(true);
    let frames = client_runtime().block_on(async {
        let (resp, _conn) = send(
            s.addr,
            "POST",
            "/v1/chat/completions",
            Some(body.to_string().as_bytes()),
            Some(KEY),
        )
        .await;
        let mut body = resp.unwrap().into_body();
        let mut text = String::new();
        let mut stopped = false;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                text.push_str(&String::from_utf8_lossy(data));
            }
            // After the first tokens, the operator presses Ctrl-C.
            if !stopped && text.matches("data: ").count() >= 3 {
                stopped = true;
                drop(s.stop.lock().unwrap().take());
            }
        }
        text
    });
    let events: Vec<&str> = frames
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let n = events.len();
    assert!(n >= 5, "{frames}");
    assert_eq!(events[n - 1], "[DONE]", "{frames}");
    let error: Value = serde_json::from_str(events[n - 2]).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{error}"
    );
    // The listener is closed.
    assert!(std::net::TcpStream::connect(s.addr).is_err());
}

#[test]
fn a_huge_prompt_is_refused_before_it_is_tokenized() {
    // 4 MB of text cannot fit 256 tokens whatever the tokenization (no token is longer than
    // the vocabulary's longest entry): refused from its length alone.
    let text = "lorem ipsum ".repeat(350_000);
    let t0 = Instant::now();
    let r = post(
        "/v1/chat/completions",
        chat(json!({"messages": [{"role": "user", "content": text}]})),
    );
    assert_error(&r, 400, "at least");
    assert_error(&r, 400, "maximum context length is 256");
    assert_eq!(r.json()["error"]["param"], "messages");
    let fast = t0.elapsed();
    let r = post("/v1/responses", json!({"input": text}));
    assert_error(&r, 400, "at least");
    assert_eq!(r.json()["error"]["param"], "input");
    assert!(fast < Duration::from_secs(30), "{fast:?}");
}

#[test]
fn an_incomplete_response_has_an_incomplete_message() {
    let r = post(
        "/v1/responses",
        json!({"input": "Hello", "max_output_tokens": 2, "temperature": 0}),
    )
    .json();
    assert_eq!(r["status"], "incomplete", "{r}");
    let message = r["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == "message")
        .unwrap();
    assert_eq!(message["status"], "incomplete", "{r}");
}

#[test]
fn control_token_text_in_user_content_is_the_control_token() {
    // As vLLM and transformers: the rendered prompt is tokenized with its special tokens, so
    // `<turn|>` typed by a user is the end-of-turn token (README: "Control tokens in text").
    let turn_end = server()
        .state
        .special
        .turn_end
        .expect("the fixture has <turn|>");
    let ids = |content: &str| -> Vec<u64> {
        let t = post(
            "/tokenize",
            json!({"messages": [{"role": "user", "content": content}]}),
        )
        .json();
        t["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let count = |v: &[u64]| v.iter().filter(|&&t| t == u64::from(turn_end)).count();
    assert_eq!(
        count(&ids("hello <turn|> world")),
        count(&ids("hello world")) + 1
    );
}

#[test]
fn tokenize_detokenize_roundtrip() {
    let t = post(
        "/tokenize",
        json!({"prompt": "Hello world", "add_special_tokens": false}),
    )
    .json();
    let ids = t["tokens"].clone();
    assert_eq!(t["count"], ids.as_array().unwrap().len());
    let d = post("/detokenize", json!({"tokens": ids})).json();
    assert_eq!(d["prompt"], "Hello world");
    let c = post(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .json();
    assert!(c["count"].as_u64().unwrap() > 3);
    // Without the opening of the model's turn the prompt is a strict prefix of the one with it.
    let bare = post(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": false}),
    )
    .json();
    let (with, without) = (
        c["tokens"].as_array().unwrap(),
        bare["tokens"].as_array().unwrap(),
    );
    assert!(without.len() < with.len() && with.starts_with(without));
    assert_error(
        &post("/detokenize", json!({"tokens": [99999999]})),
        400,
        "vocabulary",
    );
}

#[test]
fn a_small_kv_budget_preempts_without_changing_outputs() {
    let s = start_with_blocks(bundled_model(), 256, 64, false, Some(4), |_| {});
    let post_to = |body: Value| post_at(s.addr, "/v1/chat/completions", &body);
    let body = |i: usize| {
        chat(json!({"max_tokens": 24, "ignore_eos": true,
            "messages": [{"role": "user", "content": format!("Request number {i}")}]}))
    };
    let content = |r: &Reply| {
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["message"]["content"].clone()
    };
    // Each alone, then all at once in 4 blocks of 16 tokens (about two sequences' worth).
    let alone: Vec<Value> = (0..6).map(|i| content(&post_to(body(i)))).collect();
    let together: Vec<Value> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..6)
            .map(|i| sc.spawn(move || content(&post_to(body(i)))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    assert!(
        s.state
            .engine
            .stats
            .preemptions_total
            .load(Ordering::SeqCst)
            > 0
    );
    let m = request_to(s.addr, "GET", "/metrics", None, None).body;
    assert!(
        m.contains("gemma4_num_preemptions_total{model_name=\"tiny\"}"),
        "{m}"
    );
    // A prompt that can never fit is a 400 naming the limit.
    // (About 90 tokens: under the 256-token context, over 4 blocks of 16.)
    let long = "word ".repeat(20);
    let r = post_to(chat(
        json!({"messages": [{"role": "user", "content": long}]}),
    ));
    assert_error(&r, 400, "--num-kv-blocks");
}

#[test]
fn prefix_caching_reports_cached_tokens_and_changes_nothing() {
    // The same two-turn conversation on a server with prefix caching (the default) and one
    // started with --no-enable-prefix-caching: the second turn reuses the first's blocks on
    // the first, and its tokens and logprobs are those of the full recomputation.
    let on = start_with_blocks(bundled_model(), 512, 64, false, None, |_| {});
    let off = start_with_args(
        bundled_model(),
        512,
        64,
        false,
        None,
        |a| a.no_enable_prefix_caching = true,
        |_| {},
    );
    let system = "You are a careful assistant who answers in short sentences. ".repeat(4);
    let turn = |s: &Server, messages: Value| {
        let body = chat(json!({"messages": messages, "logprobs": true, "ignore_eos": true}));
        let r = post_at(s.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let first =
        json!([{"role": "system", "content": system}, {"role": "user", "content": "Hello there"}]);
    let a_on = turn(&on, first.clone());
    let a_off = turn(&off, first.clone());
    assert_eq!(a_on["choices"], a_off["choices"]);
    assert_eq!(a_on["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let answer = a_on["choices"][0]["message"]["content"].clone();
    let mut second = first.as_array().unwrap().clone();
    second.push(json!({"role": "assistant", "content": answer}));
    second.push(json!({"role": "user", "content": "And then?"}));
    let b_on = turn(&on, json!(second));
    let b_off = turn(&off, json!(second));
    let cached = b_on["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = b_on["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached >= 32 && cached % 16 == 0 && cached < prompt,
        "{cached} of {prompt}"
    );
    assert_eq!(b_off["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let logprobs = |v: &Value| -> Vec<(String, f64)> {
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["token"].as_str().unwrap().into(),
                    t["logprob"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (x, y) = (logprobs(&b_on), logprobs(&b_off));
    assert_eq!(x.len(), y.len());
    for ((tx, lx), (ty, ly)) in x.iter().zip(&y) {
        assert_eq!(tx, ty);
        assert!((lx - ly).abs() < 1e-4, "{lx} vs {ly}");
    }
    // The Responses API reports it as input_tokens_details.cached_tokens.
    let body = json!({"model": "tiny", "input": "Say hi", "instructions": system, "max_output_tokens": 4, "temperature": 0});
    post_at(on.addr, "/v1/responses", &body);
    let r = post_at(on.addr, "/v1/responses", &body).json();
    let cached = r["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 16, "{r}");
    // vLLM's counters, in tokens.
    let m = request_to(on.addr, "GET", "/metrics", None, None).body;
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {m}"))
    };
    assert!(value("gemma4_prefix_cache_hits_total") >= 48.0);
    assert!(value("gemma4_prefix_cache_queries_total") > value("gemma4_prefix_cache_hits_total"));
    assert!(value("gemma4_prefix_cache_blocks") > 0.0);
    let m = request_to(off.addr, "GET", "/metrics", None, None).body;
    assert!(
        m.contains("gemma4_prefix_cache_hits_total{model_name=\"tiny\"} 0"),
        "{m}"
    );
}

/// The schema of the structured-output tests: nested objects, arrays, enums, bounded strings and
/// integers, required fields (bounded so that a random-weight model always finishes).
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"zip": {"type": "integer", "minimum": 1000, "maximum": 9999}, "ok": {"type": "boolean"}},
                "required": ["zip", "ok"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "tags", "address"],
        "additionalProperties": false
    })
}

/// Whether `v` is valid under `person_schema` (checked by hand: every keyword it uses).
fn valid_person(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    let keys: Vec<&str> = o.keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    let int_in = |v: &Value, lo: i64, hi: i64| v.as_i64().is_some_and(|n| (lo..=hi).contains(&n));
    let address = &o["address"];
    sorted == ["address", "age", "name", "tags"]
        && o["name"].as_str().is_some_and(|s| s.chars().count() <= 8)
        && int_in(&o["age"], 0, 120)
        && o["tags"].as_array().is_some_and(|t| {
            t.len() <= 3
                && t.iter()
                    .all(|x| ["red", "green", "blue"].contains(&x.as_str().unwrap_or("")))
        })
        && address.as_object().is_some_and(|a| a.len() == 2)
        && int_in(&address["zip"], 1000, 9999)
        && address["ok"].is_boolean()
}

#[test]
fn structured_outputs_always_follow_the_format() {
    // Random weights at temperature 1: without enforcement, not one answer would parse.
    let answer = |extra: Value, seed: u64| {
        let body = chat(
            json!({"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": seed, "max_tokens": 120}),
        );
        let mut body = body.as_object().unwrap().clone();
        body.extend(extra.as_object().unwrap().clone());
        let r = post("/v1/chat/completions", Value::Object(body));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "stop", "{v}");
        c["message"]["content"].as_str().unwrap().to_string()
    };
    let schema = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema(), "strict": true}}});
    let mut valid = 0;
    for seed in 0..20 {
        let text = answer(schema.clone(), seed);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(valid_person(&v), "{text}");
        valid += 1;
    }
    println!("json_schema: {valid} of 20 answers valid");
    // vLLM's structured_outputs: the schema as text, a regex, a choice, a Lark grammar.
    let text_schema = json!({"structured_outputs": {"json": person_schema().to_string()}});
    let v: Value = serde_json::from_str(&answer(text_schema, 7)).unwrap();
    assert!(valid_person(&v));
    for seed in 0..20 {
        let text = answer(
            json!({"structured_outputs": {"regex": "[a-z]{2,5}-[0-9]{2}"}}),
            seed,
        );
        let (word, digits) = text.split_once('-').unwrap_or_else(|| panic!("{text}"));
        assert!(
            (2..=5).contains(&word.len()) && word.chars().all(|c| c.is_ascii_lowercase()),
            "{text}"
        );
        assert!(
            digits.len() == 2 && digits.chars().all(|c| c.is_ascii_digit()),
            "{text}"
        );
        let choice = answer(
            json!({"structured_outputs": {"choice": ["alpha", "beta", "gamma (c)"]}}),
            seed,
        );
        assert!(
            ["alpha", "beta", "gamma (c)"].contains(&choice.as_str()),
            "{choice}"
        );
        let lark = answer(
            json!({"structured_outputs": {"grammar": "start: (\"ab\" | \"cd\")+ \".\""}}),
            seed,
        );
        assert!(lark.ends_with('.') && lark.len() <= 200, "{lark}");
    }
    // Bad formats are a 400 naming the field.
    for (extra, needle) in [
        (
            json!({"response_format": {"type": "bogus"}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
            "response_format",
        ),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
            "only one",
        ),
        (json!({"structured_outputs": {}}), "needs one"),
        (
            json!({"response_format": {"type": "json_object"}, "tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "cannot be combined with response_format",
        ),
        (
            json!({"structured_outputs": {"grammar": "start: undefined_rule"}}),
            "structured_outputs",
        ),
    ] {
        assert_error(&post("/v1/chat/completions", chat(extra)), 400, needle);
    }
}

#[test]
fn forced_tool_calls_always_parse_and_follow_the_schema() {
    // Random weights at temperature 1: the call's name and arguments are the grammar's doing.
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": person_schema()}},
        {"type": "function", "function": {"name": "set_flag", "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}}, "required": ["on"]}}},
        {"type": "function", "function": {"name": "ping"}}
    ]);
    // Its own server: the tool declarations need more context than the shared one's.
    let s = start(bundled_model(), 2048, 256, false, |_| {});
    let call = |choice: Value, parallel: bool, seed: u64| {
        let body = chat(
            json!({"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": seed, "max_tokens": 200}),
        );
        let r = post_at(s.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .clone()
    };
    let mut calls = 0;
    for seed in 0..20 {
        for c in call(json!("required"), seed % 2 == 0, seed) {
            let args: Value =
                serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            match c["function"]["name"].as_str().unwrap() {
                "get_weather" => assert!(valid_person(&args), "{args}"),
                "set_flag" => {
                    let o = args.as_object().unwrap();
                    assert!(
                        o["on"].is_boolean() && o.keys().all(|k| k == "on" || k == "level"),
                        "{args}"
                    );
                    assert!(
                        o.get("level")
                            .is_none_or(|l| [1, 2, 3].contains(&l.as_i64().unwrap())),
                        "{args}"
                    );
                }
                "ping" => assert_eq!(args, json!({})),
                other => panic!("unknown tool {other}"),
            }
            calls += 1;
        }
        // A named function: that one, exactly once without parallel calls.
        let named = call(
            json!({"type": "function", "function": {"name": "get_weather"}}),
            false,
            seed,
        );
        assert_eq!(named.len(), 1);
        assert_eq!(named[0]["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(named[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(valid_person(&args), "{args}");
        calls += 1;
    }
    println!("{calls} forced calls, all valid");
    // `auto`: the text runs free, and every call the model opens follows the grammar (a bias
    // on `<|tool_call>`, id 48, makes the random model open calls).
    let mut auto_calls = 0;
    for seed in 0..20 {
        let body = chat(
            json!({"tools": tools, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": seed, "max_tokens": 200, "logit_bias": {"48": 10}}),
        );
        let r = post_at(s.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        for c in v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let args: Value =
                serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            let name = c["function"]["name"].as_str().unwrap();
            assert!(
                ["get_weather", "set_flag", "ping"].contains(&name),
                "{name}"
            );
            if name == "get_weather" {
                assert!(valid_person(&args), "{args}");
            }
            auto_calls += 1;
        }
    }
    println!("auto: {auto_calls} calls in 20 answers, all valid");
    assert!(
        auto_calls > 0,
        "the random model never opened a call: the test tests nothing"
    );
}

#[test]
fn metrics_and_openapi() {
    post("/v1/chat/completions", chat(json!({})));
    let m = request("GET", "/metrics", None, None).body;
    for name in [
        "gemma4_num_requests_running",
        "gemma4_num_requests_waiting",
        "gemma4_kv_cache_usage_perc",
        "gemma4_kv_cache_blocks_used",
        "gemma4_num_preemptions_total",
        "gemma4_prompt_tokens_total",
        "gemma4_generation_tokens_total",
        "gemma4_time_to_first_token_seconds_bucket",
        "gemma4_inter_token_latency_seconds_bucket",
        "gemma4_e2e_request_latency_seconds_count",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    // Every kernel has a fallback counter, all 0 on the CPU fixture.
    for kernel in gemma4_model::kernels::fallback::KERNELS {
        let line =
            format!("gemma4_kernel_fallbacks_total{{model_name=\"tiny\",kernel=\"{kernel}\"}} 0");
        assert!(m.contains(&line), "{line} missing from /metrics:\n{m}");
    }
    let spec = request("GET", "/openapi.json", None, None).json();
    for p in [
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
        "/version",
    ] {
        assert!(
            spec["paths"][p].is_object(),
            "{p} missing from /openapi.json"
        );
    }
    // The request types are documented as they are: only the required fields are required, and
    // messages are typed down to their content parts.
    let schemas = &spec["components"]["schemas"];
    assert_eq!(
        schemas["ChatCompletionRequest"]["required"],
        json!(["messages"])
    );
    assert_eq!(schemas["ResponsesRequest"]["required"], json!(["input"]));
    for typed in [
        "Message",
        "Content",
        "ContentPart",
        "Tool",
        "ToolChoice",
        "ResponseFormat",
        "StreamOptions",
        "MmProcessorKwargs",
        "InputItem",
    ] {
        assert!(
            schemas[typed].is_object(),
            "{typed} missing from the schemas"
        );
    }
    let roles: Vec<&str> = schemas["Message"]["oneOf"]
        .as_array()
        .expect("Message is one of the roles")
        .iter()
        .filter_map(|m| m["properties"]["role"]["enum"][0].as_str())
        .collect();
    assert_eq!(roles, ["system", "developer", "user", "assistant", "tool"]);
}

#[test]
fn responses_api() {
    let r = post("/v1/responses", json!({"model": "tiny", "input": "Say hi", "instructions": "Be brief", "max_output_tokens": 6, "temperature": 0})).json();
    assert_eq!(r["object"], "response");
    assert!(r["status"] == "completed" || r["status"] == "incomplete");
    let msg = r["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == "message")
        .expect("message item");
    assert!(msg["content"][0]["text"].is_string());
    assert!(r["usage"]["output_tokens"].as_u64().unwrap() <= 6);
    let s = post(
        "/v1/responses",
        json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}], "max_output_tokens": 4, "stream": true, "temperature": 0}),
    );
    let events: Vec<Value> = s
        .events()
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "response.created");
    let last = events.last().unwrap();
    assert!(
        last["type"] == "response.completed" || last["type"] == "response.incomplete",
        "{last}"
    );
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}

#[test]
fn named_tool_choice_forces_the_call_syntax() {
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let v = post(
        "/v1/chat/completions",
        chat(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "logprobs": true, "max_tokens": 40, "ignore_eos": true})),
    )
    .json();
    let tokens: String = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect();
    assert!(
        tokens.starts_with("<|tool_call>call:get_weather{"),
        "{tokens}"
    );
    // Required: the call syntax, the model picks the name.
    let v = post(
        "/v1/chat/completions",
        chat(json!({"tools": tools, "tool_choice": "required", "logprobs": true, "max_tokens": 4})),
    )
    .json();
    let first = v["choices"][0]["logprobs"]["content"][0]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(first, "<|tool_call>");
    assert_error(
        &post(
            "/v1/chat/completions",
            chat(
                json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            ),
        ),
        400,
        "nope",
    );
    assert_error(
        &post(
            "/v1/chat/completions",
            chat(json!({"tool_choice": "required"})),
        ),
        400,
        "tools",
    );
}

// ------------------------------------------------------------------------------------------------
// Images, against the vision fixture (random weights with a vision tower; processor budget 70).

fn vision_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/tiny-vision"
    ))
}

/// The vision fixture served with small prefill chunks (16 tokens: every image's run of
/// placeholders is longer, so chunks get extended to the end of the run).
fn vision_server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        assert!(
            vision_dir().join("config.json").is_file(),
            "fixtures/tiny-vision is missing (conformance/fixtures_gen/generate_vision.py)"
        );
        start(vision_dir(), 1024, 16, false, |_| {})
    })
}

fn vpost(path: &str, body: Value) -> Reply {
    post_at(vision_server().addr, path, &body)
}

fn fixture_image(name: &str) -> Vec<u8> {
    std::fs::read(vision_dir().join("images").join(name))
        .unwrap_or_else(|e| panic!("fixtures/tiny-vision/images/{name}: {e}"))
}

fn data_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn image_chat(parts: Value, extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 6, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

const QUESTION: &str = "What is in this picture?";

fn one_image(url: &str) -> Value {
    json!([{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}])
}

/// A 3-token chat about the image at `url`, to the server at `addr`.
fn post_image(addr: SocketAddr, url: &str) -> Reply {
    let body = image_chat(one_image(url), json!({"max_tokens": 3}));
    post_at(addr, "/v1/chat/completions", &body)
}

/// The prompt length and the first `n` greedy tokens (as text) computed directly through
/// gemma4_model: the template with one image part, the k-th `<|image|>` expanded to
/// `<|image>` + n × `<|image|>` + `<image|>`, the vision tower, `forward_multimodal`.
fn reference_greedy(image: &[u8], n: usize) -> (usize, Vec<String>) {
    use gemma4_model::vision::preprocess::{
        decode_image, preprocess, DecodeLimits, ImageProcessorConfig,
    };
    use gemma4_model::{Logits, Model, SamplingParams};
    let dir = vision_dir();
    let model = Model::<gemma4_model::CpuBackend>::load(&dir, &Default::default()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let template = gemma4_server::chat_template::ChatTemplate::from_dir(&dir)
        .unwrap()
        .expect("a chat template");
    // The template message the server makes of a text part and an image part.
    let msgs = [
        json!({"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}),
    ];
    let text = template
        .render(&msgs, None, true, &Default::default())
        .unwrap();
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let cfg = ImageProcessorConfig::from_dir(&dir).unwrap();
    let pre = preprocess(
        &decode_image(image, &DecodeLimits::default()).unwrap(),
        &cfg,
        cfg.max_soft_tokens,
    )
    .unwrap();
    let c = &model.config;
    let (img, boi, eoi) = (
        c.image_token_id.unwrap(),
        c.boi_token_id.unwrap(),
        c.eoi_token_id.unwrap(),
    );
    assert_eq!(ids.iter().filter(|&&t| t == img).count(), 1);
    let mut prompt = vec![];
    for &t in &ids {
        if t == img {
            prompt.push(boi);
            prompt.extend(std::iter::repeat_n(img, pre.num_soft_tokens));
            prompt.push(eoi);
        } else {
            prompt.push(t);
        }
    }
    let soft = model.encode_image(&pre).unwrap();
    let mut cache = model.text.new_cache();
    let mut logits = model
        .text
        .forward_multimodal(&prompt, Some(soft), &mut cache, Logits::Last)
        .unwrap();
    let mut rng = gemma4_model::generation::Rng::new(0);
    let mut out = vec![];
    for _ in 0..n {
        let row = logits.into_data().to_vec::<f32>().unwrap();
        let id = gemma4_model::generation::sample(
            &row,
            &SamplingParams::greedy(),
            &model.generation.suppress_tokens,
            &mut rng,
        );
        out.push(tok.decode(&[id], false).unwrap());
        logits = model.text.forward(&[id], &mut cache, Logits::Last).unwrap();
    }
    (prompt.len(), out)
}

#[test]
fn image_chat_equals_the_model_run_directly() {
    let png = fixture_image("noise_square.png");
    let r = vpost(
        "/v1/chat/completions",
        image_chat(
            one_image(&data_url(&png)),
            json!({"logprobs": true, "ignore_eos": true}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let tokens = logprob_tokens(&v);
    let (prompt_len, expected) = reference_greedy(&png, 6);
    // 48x48 -> 384x384 at the fixture's budget of 70: 24x24 patches, 64 soft tokens.
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        prompt_len
    );
    assert!(prompt_len > 64 + 2);
    assert_eq!(tokens, expected);
    // /tokenize expands the same way.
    let t = vpost(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": one_image(&data_url(&png))}]}),
    )
    .json();
    assert_eq!(t["count"].as_u64().unwrap() as usize, prompt_len);
}

/// The tokens of the first choice's logprobs.
fn logprob_tokens(v: &Value) -> Vec<String> {
    v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn image_prompts_reuse_the_cache_for_the_same_image_only() {
    // Its own server, so that no other test's requests evict or fill its cache.
    let s = start(vision_dir(), 1024, 16, false, |_| {});
    let send = |png: &[u8]| {
        let body = image_chat(
            one_image(&data_url(png)),
            json!({"logprobs": true, "ignore_eos": true}),
        );
        let r = post_at(s.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
        (cached.unwrap() as usize, logprob_tokens(&v))
    };
    // Two images of 64 soft tokens: the same placeholder ids in the same prompt.
    let (noise, checker) = (
        fixture_image("noise_square.png"),
        fixture_image("checker_gray.png"),
    );
    let (prompt_len, expected) = reference_greedy(&noise, 6);
    assert_eq!(send(&noise), (0, expected.clone()));
    // Again: everything up to the last full block before the end is reused, the image too.
    let (cached, tokens) = send(&noise);
    assert_eq!(cached, (prompt_len - 1) / 16 * 16);
    assert!(cached > 64);
    assert_eq!(tokens, expected);
    // Another image behind the same ids: only blocks before the image are reused (the text
    // before it), and the answer is that image's.
    let (cached, tokens) = send(&checker);
    assert!(
        cached % 16 == 0 && cached + 64 < prompt_len,
        "{cached} of {prompt_len}"
    );
    assert_eq!(tokens, reference_greedy(&checker, 6).1);
}

#[test]
fn image_streaming_equals_non_streaming() {
    let url = data_url(&fixture_image("gradient_tall.png"));
    let whole = vpost(
        "/v1/chat/completions",
        image_chat(one_image(&url), json!({"max_tokens": 8})),
    )
    .json();
    let r = vpost(
        "/v1/chat/completions",
        image_chat(
            one_image(&url),
            json!({"max_tokens": 8, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        usage["usage"]["prompt_tokens"],
        whole["usage"]["prompt_tokens"]
    );
    assert_eq!(
        stream_text(&r),
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[test]
fn image_budget_and_several_images() {
    let url = data_url(&fixture_image("large_gradient.png"));
    let count = |mm: Value| {
        let t = vpost(
            "/tokenize",
            json!({"messages": [{"role": "user", "content": one_image(&url)}], "mm_processor_kwargs": mm}),
        );
        assert_eq!(t.status, 200, "{}", t.body);
        t.json()["count"].as_u64().unwrap()
    };
    let (d, small, big) = (
        count(json!({})),
        count(json!({"max_soft_tokens": 70})),
        count(json!({"max_soft_tokens": 140})),
    );
    assert_eq!(d, small, "the fixture's default budget is 70");
    assert!(big > small + 40, "{small} -> {big}");
    // Two images (the string form of image_url too) in one user turn: 200, both counted, the
    // same count as /tokenize.
    let parts = json!([{"type": "image_url", "image_url": url}, {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]);
    let mm = json!({"max_soft_tokens": 140});
    let two = vpost(
        "/v1/chat/completions",
        image_chat(
            parts.clone(),
            json!({"max_tokens": 2, "mm_processor_kwargs": mm}),
        ),
    );
    assert_eq!(two.status, 200, "{}", two.body);
    let p2 = two.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let t = vpost(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": parts}], "mm_processor_kwargs": mm}),
    )
    .json();
    assert_eq!(t["count"].as_u64().unwrap(), p2);
    assert!(p2 > big + 40, "{big} -> {p2}");
}

#[test]
fn bad_images_are_400_and_the_server_keeps_serving() {
    let chat_with =
        |url: &str, extra: Value| vpost("/v1/chat/completions", image_chat(one_image(url), extra));
    let at = "messages[0].content[1]";
    let e = chat_with("data:image/png;base64,@@@not base64@@@", json!({}));
    assert_error(&e, 400, "base64");
    assert_error(&e, 400, at);
    assert_error(
        &chat_with(
            &data_url(b"this is not an image, just some text"),
            json!({}),
        ),
        400,
        "unrecognised image format",
    );
    let bomb = chat_with(&data_url(&png_header(100_000, 100_000, 2)), json!({}));
    assert_error(&bomb, 400, "pixels");
    assert_error(&bomb, 400, at);
    let tiny = data_url(&fixture_image("pixel_1x1.png"));
    let many: Vec<Value> = (0..9)
        .map(|_| json!({"type": "image_url", "image_url": {"url": tiny}}))
        .collect();
    assert_error(
        &vpost("/v1/chat/completions", image_chat(json!(many), json!({}))),
        400,
        "limit of 8",
    );
    assert_error(
        &chat_with("http://example.com/cat.png", json!({})),
        400,
        "--no-image-urls",
    );
    assert_error(
        &chat_with("https://example.com/cat.png", json!({})),
        400,
        "--no-image-urls",
    );
    assert_error(
        &chat_with("ftp://example.com/cat.png", json!({})),
        400,
        "unsupported image URL",
    );
    for bad in [
        json!({"max_soft_tokens": 100}),
        json!({"max_soft_tokens": "280"}),
        json!("280"),
    ] {
        assert_error(
            &chat_with(&tiny, json!({"mm_processor_kwargs": bad})),
            400,
            "mm_processor_kwargs",
        );
    }
    // The placeholder token typed in the text is not an image.
    let typed = vpost(
        "/v1/chat/completions",
        image_chat(json!("look: <|image|>"), json!({})),
    );
    assert_error(&typed, 400, "<|image|>");
    let no_url = vpost(
        "/v1/chat/completions",
        image_chat(json!([{"type": "image_url", "image_url": {}}]), json!({})),
    );
    assert_error(&no_url, 400, "no URL");
    // Still serving, images included.
    assert_eq!(
        request_to(vision_server().addr, "GET", "/health", None, None).status,
        200
    );
    assert_eq!(chat_with(&tiny, json!({"max_tokens": 2})).status, 200);
}

#[test]
fn responses_input_image() {
    let url = data_url(&fixture_image("noise_square.png"));
    let input = json!([{"role": "user", "content": [{"type": "input_text", "text": QUESTION}, {"type": "input_image", "image_url": url}]}]);
    let r = vpost(
        "/v1/responses",
        json!({"input": input, "max_output_tokens": 4, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let chat = vpost(
        "/v1/chat/completions",
        image_chat(one_image(&url), json!({"max_tokens": 4})),
    )
    .json();
    assert_eq!(v["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    let bad = json!([{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]);
    let e = vpost("/v1/responses", json!({"input": bad}));
    assert_error(&e, 400, "input[0].content[0]");
    assert_eq!(e.json()["error"]["param"], "input");
}

#[test]
fn https_image_urls() {
    let png = fixture_image("noise_square.png");
    let host = tls_image_host(png.clone());
    let tls_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls"));
    // Trusts the test CA (--image-ca-file) besides Mozilla's roots; loopback let through as above.
    let trusting = start(vision_dir(), 1024, 64, true, |s| {
        s.images.allow_private_hosts = true;
        s.images
            .add_ca_file(&tls_dir.join("ca.pem"))
            .expect("the test CA loads");
    });
    let post = |srv: &Server, url: String| post_image(srv.addr, &url);
    let ok = post(
        &trusting,
        format!("https://localhost:{}/ok.png", host.port()),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let inline = post(&trusting, data_url(&png));
    assert_same_usage(&ok, &inline);
    assert_eq!(
        ok.json()["choices"][0]["message"],
        inline.json()["choices"][0]["message"]
    );
    // The certificate names localhost and 127.0.0.1, not other names of the host.
    assert_error(
        &post(
            &trusting,
            format!("https://127.0.0.2:{}/ok.png", host.port()),
        ),
        400,
        "TLS handshake",
    );
    assert_error(
        &post(
            &trusting,
            format!("https://localhost:{}/missing.png", host.port()),
        ),
        400,
        "404",
    );
    // Without the CA the certificate is not trusted.
    let default_roots = start(vision_dir(), 1024, 64, true, |s| {
        s.images.allow_private_hosts = true
    });
    assert_error(
        &post(
            &default_roots,
            format!("https://localhost:{}/ok.png", host.port()),
        ),
        400,
        "TLS handshake",
    );
    // A file without certificates is refused at startup, naming it.
    let mut settings = gemma4_server::images::ImageSettings::new(
        None,
        None,
        gemma4_server::images::UrlPolicy::Fetch { domains: vec![] },
        8,
        Duration::from_secs(1),
    );
    let e = settings
        .add_ca_file(&tls_dir.join("README.md"))
        .unwrap_err();
    assert!(e.contains("README.md"), "{e}");
}

/// An https server for the fetch test, with the test certificate of tests/data/tls: /ok.png, else 404.
fn tls_image_host(png: Vec<u8>) -> SocketAddr {
    use gemma4_server_tls::*;
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls"));
    let certs = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    let cfg = Arc::new(cfg);
    // Every loopback address, so that 127.0.0.2 (a name the certificate lacks) connects too.
    let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let (png, cfg) = (png.clone(), cfg.clone());
            std::thread::spawn(move || {
                let Ok(conn) = ServerConnection::new(cfg) else {
                    return;
                };
                let mut tls = StreamOwned::new(conn, s);
                let mut buf = [0u8; 4096];
                let Ok(n) = tls.read(&mut buf) else { return };
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let resp: Vec<u8> = match head.split_whitespace().nth(1).unwrap_or("/") {
                    "/ok.png" => [format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", png.len()).into_bytes(), png].concat(),
                    _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                };
                let _ = tls.write_all(&resp);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    addr
}

/// rustls, through the server's own dependency.
mod gemma4_server_tls {
    pub use tokio_rustls::rustls::{
        self, pki_types::pem::PemObject, pki_types::CertificateDer, pki_types::PrivateKeyDer,
        ServerConfig, ServerConnection, StreamOwned,
    };
}

/// A local HTTP server for the fetch tests: /ok.png, a redirect, an oversized and a slow answer.
fn image_host(png: Vec<u8>) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let png = png.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let resp: Vec<u8> = match path.as_str() {
                    "/ok.png" => [format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", png.len()).into_bytes(), png].concat(),
                    "/redirect" => b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1/ok.png\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    "/huge" => b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\nConnection: close\r\n\r\n".to_vec(),
                    "/slow" => {
                        std::thread::sleep(Duration::from_secs(5));
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
                    }
                    _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                };
                let _ = s.write_all(&resp);
            });
        }
    });
    addr
}

/// The same token counts: the same image fetched and inline. The second request reuses the
/// first's KV (the same pixels hash alike wherever they came from).
fn assert_same_usage(first: &Reply, second: &Reply) {
    let (a, b) = (&first.json()["usage"], &second.json()["usage"]);
    for field in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(a[field], b[field], "{field}");
    }
    let cached = b["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 64, "{b}");
}

#[test]
fn image_urls_are_fetched_from_public_or_allowed_hosts() {
    let png = fixture_image("noise_square.png");
    let host = image_host(png.clone());
    // Loopback is refused in production; this test server lets it through to reach `host`.
    let fetching = start(vision_dir(), 1024, 64, true, |s| {
        s.images.allow_private_hosts = true;
        s.images.fetch_timeout = Duration::from_secs(2);
    });
    let post_f = |url: String| post_image(fetching.addr, &url);
    let ok = post_f(format!("http://{host}/ok.png"));
    assert_eq!(ok.status, 200, "{}", ok.body);
    let inline = post_f(data_url(&png));
    assert_same_usage(&ok, &inline);
    assert_error(
        &post_f(format!("http://{host}/redirect")),
        400,
        "redirects are not followed",
    );
    assert_error(&post_f(format!("http://{host}/missing.png")), 400, "404");
    assert_error(&post_f(format!("http://{host}/huge")), 400, "limit");
    assert_error(&post_f(format!("http://{host}/slow")), 400, "within");
    // Without the test override, loopback hosts are refused.
    let strict = start(vision_dir(), 1024, 64, true, |_| {});
    let body = image_chat(one_image(&format!("http://{host}/ok.png")), json!({}));
    let r = post_at(strict.addr, "/v1/chat/completions", &body);
    assert_error(&r, 400, "non-public");
    assert_eq!(post_f(data_url(&png)).status, 200);
    // --allowed-media-domains: only those hosts (and their subdomains) are fetched.
    let domains = start_with_args(
        vision_dir(),
        1024,
        64,
        true,
        None,
        |a| a.allowed_media_domains = vec!["localhost".into()],
        |s| s.images.allow_private_hosts = true,
    );
    let port = host.port();
    let by_name = post_image(domains.addr, &format!("http://localhost:{port}/ok.png"));
    assert_eq!(by_name.status, 200, "{}", by_name.body);
    assert_eq!(
        by_name.json()["usage"]["prompt_tokens"],
        ok.json()["usage"]["prompt_tokens"]
    );
    assert_error(
        &post_image(domains.addr, &format!("http://{host}/ok.png")),
        400,
        "allowed media domains",
    );
}

#[test]
fn an_image_beyond_the_position_table_is_a_400() {
    // The tiny vision tower has positions for 256 patches per side; a long thin image at the
    // largest budget would need 1119.
    let mut png = vec![];
    image::RgbImage::from_fn(6000, 48, |x, y| {
        image::Rgb([(x % 251) as u8, (y * 5) as u8, 7])
    })
    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
    .unwrap();
    let body = image_chat(
        one_image(&data_url(&png)),
        json!({"mm_processor_kwargs": {"max_soft_tokens": 1120}}),
    );
    let r = vpost("/v1/chat/completions", body);
    assert_error(&r, 400, "more than the vision tower's 256 per side");
    assert_eq!(r.json()["error"]["param"], "messages");
    // At the default budget the same image fits, and the server kept serving.
    let r = vpost(
        "/v1/chat/completions",
        image_chat(one_image(&data_url(&png)), json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---------------------------------------------------------------------------------------------
// Legacy completions (`POST /v1/completions`).

fn completion(extra: Value) -> Value {
    let mut body =
        json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn complete(extra: Value) -> Value {
    let r = post("/v1/completions", completion(extra));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The tokenizer's ids of `text` (with `<bos>` unless `add_special_tokens` is false).
fn token_ids(text: &str, add_special_tokens: bool) -> Vec<u64> {
    let body = json!({"prompt": text, "add_special_tokens": add_special_tokens});
    let v = post("/tokenize", body).json();
    let ids = v["tokens"].as_array().unwrap();
    ids.iter().map(|t| t.as_u64().unwrap()).collect()
}

fn usage_of(v: &Value) -> (u64, u64) {
    let u = &v["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c, "{u}");
    (p, c)
}

fn assert_param(r: &Reply, status: u16, param: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], param, "{}", r.body);
}

#[test]
fn completion_greedy_text_and_ids_agree() {
    let v = complete(json!({}));
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], "tiny");
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["finish_reason"], "length");
    assert!(c["logprobs"].is_null());
    let text = c["text"].as_str().unwrap();
    let ids = token_ids("Once upon a time", true);
    assert_eq!(usage_of(&v), (ids.len() as u64, 8));
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    // Greedy is deterministic, and the same prompt as token ids is the same prompt.
    assert_eq!(complete(json!({}))["choices"][0]["text"], text);
    let by_ids = complete(json!({ "prompt": ids }));
    assert_eq!(by_ids["choices"][0]["text"], text);
    assert_eq!(usage_of(&by_ids), usage_of(&v));
    // Without special tokens the prompt has no <bos>.
    let bare = complete(json!({"add_special_tokens": false}));
    assert_eq!(usage_of(&bare).0, ids.len() as u64 - 1);
    // The chat path runs the same engine: its answer is the completion of the chat prompt's ids.
    let chat_ids = post(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hello there"}]}),
    )
    .json()["tokens"]
        .clone();
    let answer = post("/v1/chat/completions", chat(json!({}))).json();
    let completed = complete(json!({ "prompt": chat_ids }));
    assert_eq!(
        completed["choices"][0]["text"],
        answer["choices"][0]["message"]["content"]
    );
}

#[test]
fn completion_prompts_times_n() {
    let prompts = ["Once upon a time", "The weather today"];
    let v = complete(json!({"prompt": prompts, "n": 2}));
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        // Choice p × n + j is of prompt p: greedy, each is that prompt's completion alone.
        let alone = complete(json!({"prompt": prompts[i / 2]}));
        assert_eq!(c["text"], alone["choices"][0]["text"], "choice {i}");
    }
    // Each prompt counted once (as vLLM), every choice's completion tokens.
    let prompt_tokens: usize = prompts.iter().map(|p| token_ids(p, true).len()).sum();
    assert_eq!(usage_of(&v), (prompt_tokens as u64, 4 * 8));
    // Lists of token ids: the same.
    let ids: Vec<Vec<u64>> = prompts.iter().map(|p| token_ids(p, true)).collect();
    let by_ids = complete(json!({"prompt": ids, "n": 2}));
    assert_eq!(by_ids["choices"], v["choices"]);
    // Seeded sampling: reproducible, and the choices of a prompt differ (seed + j).
    let seeded =
        json!({"prompt": prompts, "n": 2, "temperature": 1.0, "seed": 5, "max_tokens": 12});
    let a = complete(seeded.clone());
    assert_eq!(a["choices"], complete(seeded)["choices"]);
    assert_ne!(a["choices"][0]["text"], a["choices"][1]["text"]);
}

#[test]
fn completion_echo() {
    let plain = complete(json!({}));
    let generated = plain["choices"][0]["text"].as_str().unwrap();
    let echoed = complete(json!({"echo": true}));
    assert_eq!(
        echoed["choices"][0]["text"].as_str().unwrap(),
        format!("Once upon a time{generated}")
    );
    // max_tokens 0: the prompt alone.
    let only = complete(json!({"echo": true, "max_tokens": 0, "n": 2}));
    for c in only["choices"].as_array().unwrap() {
        assert_eq!(c["text"], "Once upon a time");
        assert_eq!(c["finish_reason"], "length");
    }
    let ids = token_ids("Once upon a time", true);
    assert_eq!(usage_of(&only), (ids.len() as u64, 0));
    // Token ids are echoed decoded, special tokens kept (as vLLM).
    let by_ids = complete(json!({"prompt": ids, "echo": true, "max_tokens": 0}));
    assert_eq!(by_ids["choices"][0]["text"], "<bos>Once upon a time");
}

/// The legacy logprobs of choice `c`: (tokens, token_logprobs, top_logprobs, text_offset).
fn legacy_logprobs(c: &Value) -> (Vec<String>, Vec<Option<f64>>, Vec<Value>, Vec<u64>) {
    let lp = &c["logprobs"];
    let list = |k: &str| {
        lp[k]
            .as_array()
            .unwrap_or_else(|| panic!("no {k}: {lp}"))
            .clone()
    };
    let tokens: Vec<String> = list("tokens")
        .iter()
        .map(|t| t.as_str().unwrap().into())
        .collect();
    let logprobs = list("token_logprobs").iter().map(Value::as_f64).collect();
    let offsets = list("text_offset")
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    (tokens, logprobs, list("top_logprobs"), offsets)
}

#[test]
fn completion_logprobs_shape() {
    let v = complete(json!({"logprobs": 3, "max_tokens": 10}));
    let c = &v["choices"][0];
    let (tokens, logprobs, tops, offsets) = legacy_logprobs(c);
    assert_eq!(tokens.len() as u64, usage_of(&v).1);
    assert_eq!((logprobs.len(), tops.len(), offsets.len()), (10, 10, 10));
    let mut at = 0;
    for i in 0..10 {
        let lp = logprobs[i].unwrap();
        assert!(lp <= 0.0);
        // The token and the 3 most likely, each text once (byte-fallback pieces all read
        // "\u{FFFD}"): at most 4 entries.
        let top = tops[i].as_object().unwrap();
        assert!((1..=4).contains(&top.len()), "{top:?}");
        assert_eq!(top[&tokens[i]].as_f64(), Some(lp));
        // Greedy: the token is the most likely.
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(best, lp);
        assert_eq!(offsets[i], at);
        at += tokens[i].chars().count() as u64;
    }
    // logprobs 0: the token alone.
    let v = complete(json!({"logprobs": 0}));
    let (_, _, tops, _) = legacy_logprobs(&v["choices"][0]);
    assert!(tops.iter().all(|t| t.as_object().unwrap().len() == 1));
}

#[test]
fn completion_prompt_logprobs_equal_the_generated_ones() {
    // Greedy from P gives tokens T with their logprobs; echoing P + T with max_tokens 0 must
    // give T's positions the same logprobs (P + T replayed after its first token). An
    // end-of-turn id inside the prompt must not cut it short.
    let turn_end = token_ids("<turn|>", false);
    assert_eq!(turn_end.len(), 1);
    let mut prompt = token_ids("Once upon a time", true);
    prompt.extend(&turn_end);
    prompt.extend(token_ids(" there was", false));
    let first = complete(json!({"prompt": prompt, "logprobs": 2, "max_tokens": 6}));
    let (gen_tokens, gen_lps, gen_tops, _) = legacy_logprobs(&first["choices"][0]);
    // The ids of T: the engine's own greedy run (the completion's tokens are those).
    let generated = engine_greedy(&prompt, 6);
    for (id, token) in generated.iter().zip(&gen_tokens) {
        let text = post("/detokenize", json!({"tokens": [id]})).json()["prompt"].clone();
        assert_eq!(&text, token);
    }
    let mut whole = prompt.clone();
    whole.extend(&generated);
    let echoed = complete(json!({"prompt": whole, "logprobs": 2, "max_tokens": 0, "echo": true}));
    let c = &echoed["choices"][0];
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(usage_of(&echoed), (whole.len() as u64, 0));
    let (tokens, lps, tops, _) = legacy_logprobs(c);
    assert_eq!(tokens.len(), whole.len());
    assert_eq!(tokens[0], "<bos>");
    assert!(lps[0].is_none() && tops[0].is_null());
    assert!(lps[1..].iter().all(|l| l.is_some_and(|l| l <= 0.0)));
    let tail = whole.len() - 6;
    for i in 0..6 {
        let (a, b) = (gen_lps[i].unwrap(), lps[tail + i].unwrap());
        assert!(
            (a - b).abs() < 1e-3,
            "position {i}: {a} generated, {b} replayed"
        );
        let keys = |t: &Value| {
            let mut k: Vec<String> = t.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&gen_tops[i]), keys(&tops[tail + i]), "position {i}");
    }
    // With generation after the echo: the prompt's entries, then the generated ones.
    let more = complete(json!({"prompt": prompt, "logprobs": 1, "max_tokens": 4, "echo": true}));
    let (tokens, lps, _, _) = legacy_logprobs(&more["choices"][0]);
    assert_eq!(usage_of(&more), (prompt.len() as u64, 4));
    assert_eq!(
        (tokens.len(), lps.len()),
        (prompt.len() + 4, prompt.len() + 4)
    );
    // A one-token prompt has nothing to replay.
    let one = complete(json!({"prompt": [2], "logprobs": 1, "max_tokens": 0, "echo": true}));
    let (tokens, lps, _, _) = legacy_logprobs(&one["choices"][0]);
    assert_eq!((tokens, lps), (vec!["<bos>".to_string()], vec![None]));
}

/// The engine's greedy continuation of `prompt`, run directly: `n` token ids.
fn engine_greedy(prompt: &[u64], n: usize) -> Vec<u64> {
    let ids = prompt.iter().map(|&t| t as u32).collect();
    let req = gemma4_engine::EngineRequest::greedy(ids, n);
    let mut handle = server().state.engine.submit(req).unwrap();
    let mut out = vec![];
    loop {
        match handle.events.blocking_recv() {
            Some(gemma4_engine::EngineEvent::Token { id, .. }) => out.push(u64::from(id)),
            Some(gemma4_engine::EngineEvent::Error(e)) => panic!("{e}"),
            Some(gemma4_engine::EngineEvent::Finished { .. }) | None => return out,
            Some(_) => {}
        }
    }
}

/// Per choice index: the text and the logprobs lists of a streamed completion, concatenated.
fn stream_choices(r: &Reply) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = vec![];
    for e in r.events() {
        if e == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["object"], "text_completion");
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if out.len() <= i {
                out.resize(i + 1, (String::new(), json!({})));
            }
            out[i].0.push_str(c["text"].as_str().unwrap());
            if let Some(lp) = c["logprobs"].as_object() {
                for (k, list) in lp {
                    let acc = out[i]
                        .1
                        .as_object_mut()
                        .unwrap()
                        .entry(k.clone())
                        .or_insert(json!([]));
                    acc.as_array_mut()
                        .unwrap()
                        .extend(list.as_array().unwrap().iter().cloned());
                }
            }
        }
    }
    out
}

#[test]
fn completion_stream_equals_non_stream() {
    for extra in [
        json!({"prompt": ["Once upon a time", "The weather today"], "n": 2, "max_tokens": 10}),
        json!({"echo": true, "logprobs": 2, "max_tokens": 5}),
        json!({"echo": true, "max_tokens": 0}),
    ] {
        let whole = complete(extra.clone());
        let mut streamed = extra.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let r = post("/v1/completions", completion(streamed.clone()));
        assert_eq!(r.status, 200, "{}", r.body);
        let events = r.events();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"], whole["usage"], "{extra}");
        let choices = stream_choices(&r);
        let expected = whole["choices"].as_array().unwrap();
        assert_eq!(choices.len(), expected.len());
        for (c, e) in choices.iter().zip(expected) {
            assert_eq!(c.0, e["text"].as_str().unwrap(), "{extra}");
            if !e["logprobs"].is_null() {
                assert_eq!(c.1, e["logprobs"], "{extra}");
            }
        }
        // Without include_usage, no usage chunk.
        streamed["stream_options"] = json!({"include_usage": false});
        let r = post("/v1/completions", completion(streamed));
        assert!(r.events().iter().all(|e| !e.contains("\"usage\"")));
    }
}

#[test]
fn completion_stop_strings() {
    let whole = complete(json!({"max_tokens": 16}));
    let text = whole["choices"][0]["text"].as_str().unwrap();
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    for stop in [json!(stop), json!(["never in gibberish", stop])] {
        let v = complete(json!({"max_tokens": 16, "stop": stop}));
        assert_eq!(v["choices"][0]["text"], cut);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn completion_bad_requests_name_their_param() {
    let bad = |extra: Value| post("/v1/completions", completion(extra));
    assert_param(&bad(json!({"suffix": "x"})), 400, "suffix");
    assert_param(&bad(json!({"best_of": 3})), 400, "best_of");
    assert_param(&bad(json!({"logprobs": 21})), 400, "logprobs");
    assert_param(&bad(json!({"max_tokens": 0})), 400, "max_tokens");
    assert_param(&bad(json!({"n": 17})), 400, "n");
    for empty in [json!(""), json!([]), json!(["a", ""]), json!([[]])] {
        assert_param(&bad(json!({ "prompt": empty })), 400, "prompt");
    }
    let r = bad(json!({"prompt": [2, 1_000_000]}));
    assert_param(&r, 400, "prompt");
    assert_error(&r, 400, "outside the vocabulary");
    let r = bad(json!({"prompt": ["fine", [1]]}));
    assert_error(&r, 400, "prompt[1]");
    let r = bad(json!({"prompt": "word ".repeat(400)}));
    assert_param(&r, 400, "prompt");
    assert_error(&r, 400, "maximum context length is 256");
    assert_error(&bad(json!({"model": "other"})), 404, "does not exist");
    let unauthorized = request("POST", "/v1/completions", Some(b"{}"), None);
    assert_error(&unauthorized, 401, "API key");
    let spec = request("GET", "/openapi.json", None, None).json();
    assert!(spec["paths"]["/v1/completions"].is_object());
    let schemas = &spec["components"]["schemas"];
    assert_eq!(schemas["CompletionRequest"]["required"], json!(["prompt"]));
    assert!(schemas["Completion"].is_object());
    assert_eq!(complete(json!({})).as_object().unwrap().len(), 6);
}

// ------------------------------------------------------------------------------------------------
// Stored responses: GET and DELETE /v1/responses/{id}, `store`, `previous_response_id`.

/// GET or DELETE of a stored response on the server at `addr`.
fn stored_at(addr: SocketAddr, method: &str, id: &str) -> Reply {
    request_to(
        addr,
        method,
        &format!("/v1/responses/{id}"),
        None,
        Some(KEY),
    )
}

fn stored(method: &str, id: &str) -> Reply {
    stored_at(server().addr, method, id)
}

/// A 404 for the response `id`, naming it and the field it came in.
fn assert_not_found(r: &Reply, id: &str, param: &str) {
    assert_error(r, 404, id);
    let e = &r.json()["error"];
    assert_eq!(
        (&e["param"], &e["code"]),
        (&json!(param), &json!("response_not_found"))
    );
}

fn response(extra: Value) -> Value {
    let mut body =
        json!({"model": "tiny", "input": "Hello there", "max_output_tokens": 8, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = post("/v1/responses", body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn output_text(r: &Value) -> String {
    r["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["type"] == "message")
        .map(|o| o["content"][0]["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn stored_responses_get_and_delete() {
    let r = response(json!({"instructions": "Be brief", "background": false}));
    assert_eq!(
        (&r["store"], &r["previous_response_id"]),
        (&json!(true), &Value::Null)
    );
    let id = r["id"].as_str().unwrap();
    assert_eq!(stored("GET", id).json(), r);
    assert_eq!(
        request("GET", &format!("/v1/responses/{id}"), None, None).status,
        401
    );
    let deleted = stored("DELETE", id);
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(
        deleted.json(),
        json!({"id": id, "object": "response", "deleted": true})
    );
    assert_not_found(&stored("GET", id), id, "response_id");
    assert_not_found(&stored("DELETE", id), id, "response_id");
    // `store: false` keeps nothing.
    let r = response(json!({"store": false}));
    assert_eq!(r["store"], false);
    let id = r["id"].as_str().unwrap();
    assert_not_found(&stored("GET", id), id, "response_id");
    assert_not_found(
        &post(
            "/v1/responses",
            json!({"input": "hi", "previous_response_id": id}),
        ),
        id,
        "previous_response_id",
    );
    let r = post("/v1/responses", json!({"input": "hi", "background": true}));
    assert_error(&r, 400, "background");
    assert_eq!(r.json()["error"]["param"], "background");
    let spec = request("GET", "/openapi.json", None, None).json();
    let path = &spec["paths"]["/v1/responses/{response_id}"];
    assert!(
        path["get"].is_object() && path["delete"].is_object(),
        "{path}"
    );
}

#[test]
fn streamed_responses_are_stored() {
    let s = post(
        "/v1/responses",
        json!({"input": "Say hi", "max_output_tokens": 4, "stream": true, "temperature": 0}),
    );
    let last: Value = serde_json::from_str(s.events().last().expect("events")).unwrap();
    let r = &last["response"];
    assert_eq!(r["status"], "incomplete", "{last}");
    assert_eq!(stored("GET", r["id"].as_str().unwrap()).json(), *r);
}

/// A continuation prompts exactly as a request that spells out the same conversation: the
/// earlier input and output, without the earlier instructions, after the new instructions.
#[test]
fn previous_response_id_continues_the_conversation() {
    let first = response(json!({"instructions": "Be brief"}));
    assert!(!output_text(&first).is_empty(), "{first}");
    let again = json!({"role": "user", "content": "And again?"});
    let next = response(json!({
        "instructions": "Answer in French",
        "input": [again],
        "previous_response_id": first["id"],
    }));
    assert_eq!(next["previous_response_id"], first["id"]);
    let mut items = vec![json!({"role": "user", "content": "Hello there"})];
    items.extend(first["output"].as_array().unwrap().iter().cloned());
    items.push(again.clone());
    let spelled = response(json!({"instructions": "Answer in French", "input": items}));
    let tokens = |r: &Value| r["usage"]["input_tokens"].as_u64().unwrap();
    assert_eq!(tokens(&next), tokens(&spelled));
    assert_eq!(output_text(&next), output_text(&spelled));
    let alone = response(json!({"instructions": "Answer in French", "input": [again]}));
    assert!(tokens(&next) > tokens(&alone), "{next}\n{alone}");
    // The continuation is stored in turn, and continues.
    let third = response(json!({"input": "Once more", "previous_response_id": next["id"]}));
    assert!(tokens(&third) > tokens(&next));
}

#[test]
fn the_store_evicts_the_oldest_and_skips_what_exceeds_its_budget() {
    let small = start_with_args(
        bundled_model(),
        256,
        64,
        false,
        None,
        |a| a.responses_store_max_bytes = 2000,
        |_| {},
    );
    // `extra` makes a response large: tools are kept with it but, under tool_choice "none",
    // not rendered into the prompt.
    let create = |extra: Value| {
        let mut body = json!({"input": "Hello there", "max_output_tokens": 2, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = post_at(small.addr, "/v1/responses", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["id"].as_str().unwrap().to_string()
    };
    let present = |id: &String| stored_at(small.addr, "GET", id).status == 200;
    let mut ids = vec![];
    while ids.len() < 12 && ids.first().is_none_or(present) {
        ids.push(create(json!({})));
        // What is kept is always the newest ones.
        let kept: Vec<bool> = ids.iter().map(present).collect();
        assert!(kept.windows(2).all(|w| w[0] <= w[1]), "{kept:?}");
        assert!(kept.last() == Some(&true));
    }
    assert!(!present(&ids[0]), "2000 bytes held {} responses", ids.len());
    let kept = ids.iter().filter(|id| present(id)).count();
    assert!(kept >= 2, "{kept}");
    // One larger than the whole budget is answered but not kept, and evicts nothing.
    let tools = json!([{"type": "function", "name": "f", "description": "x".repeat(2000)}]);
    let big = create(json!({"tools": tools, "tool_choice": "none"}));
    assert!(!present(&big));
    assert_eq!(ids.iter().filter(|id| present(id)).count(), kept);
}
