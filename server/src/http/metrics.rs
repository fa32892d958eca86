//! Prometheus metrics: engine gauges and counters (read from the engine's shared stats) and
//! latency histograms recorded by the HTTP layer. Text exposition format, no extra crate.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use gemma4_engine::EngineStats;

const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, model: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{model_name=\"{model}\",le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{model_name=\"{model}\",le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{model_name=\"{model}\"}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{model_name=\"{model}\"}} {}", self.count);
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    e2e: Mutex<Histogram>,
    http_errors: std::sync::atomic::AtomicU64,
}

impl Metrics {
    pub fn time_to_first_token(&self, s: f64) {
        self.ttft
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(s);
    }
    pub fn inter_token(&self, s: f64) {
        self.itl
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(s);
    }
    pub fn end_to_end(&self, s: f64) {
        self.e2e
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(s);
    }
    pub fn error(&self) {
        self.http_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, stats: &EngineStats, model: &str, bounded: bool) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{model}\"}} {v}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{model_name=\"{model}\"}} {v}"
            );
        };
        gauge(
            &mut out,
            "gemma4_num_requests_running",
            "Requests in the running batch.",
            stats.running.load(Ordering::SeqCst) as f64,
        );
        gauge(
            &mut out,
            "gemma4_num_requests_waiting",
            "Requests waiting for a slot.",
            stats.waiting.load(Ordering::SeqCst) as f64,
        );
        let blocks_used = stats.kv_blocks_used.load(Ordering::SeqCst);
        let blocks_total = stats.kv_blocks_total.load(Ordering::SeqCst);
        gauge(
            &mut out,
            "gemma4_kv_cache_blocks_used",
            "KV cache blocks (all layer kinds) held by running requests.",
            blocks_used as f64,
        );
        gauge(
            &mut out,
            "gemma4_kv_cache_blocks_total",
            "KV cache blocks (all layer kinds) in the pool; a pool without a budget grows.",
            blocks_total as f64,
        );
        gauge(
            &mut out,
            "gemma4_prefix_cache_blocks",
            "KV cache blocks (all layer kinds) the prefix cache keeps that no running request holds (taken back when needed).",
            stats
                .kv_blocks_cached
                .iter()
                .map(|n| n.load(Ordering::SeqCst))
                .sum::<usize>() as f64,
        );
        // vLLM's figure: used over total blocks of a bounded pool. A growable pool (no
        // budget) is never full: 0.
        let usage = if bounded && blocks_total > 0 {
            blocks_used as f64 / blocks_total as f64
        } else {
            0.0
        };
        gauge(
            &mut out,
            "gemma4_kv_cache_usage_perc",
            "KV cache usage: used / total blocks of the pool (0 when the pool has no budget).",
            usage,
        );
        counter(
            &mut out,
            "gemma4_prompt_tokens_total",
            "Prompt tokens processed.",
            stats.prompt_tokens_total.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "gemma4_generation_tokens_total",
            "Tokens generated.",
            stats.generation_tokens_total.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "gemma4_request_success_total",
            "Requests finished by the engine.",
            stats.requests_finished_total.load(Ordering::Relaxed),
        );
        // vLLM's prefix cache counters: prompt tokens looked up at first admission, and hits.
        counter(
            &mut out,
            "gemma4_prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache (each request's first admission).",
            stats.prefix_cache_queries_total.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "gemma4_prefix_cache_hits_total",
            "Prompt tokens whose KV the prefix cache held.",
            stats.prefix_cache_hits_total.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "gemma4_num_preemptions_total",
            "Sequences preempted for KV cache blocks (recomputed later).",
            stats.preemptions_total.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "gemma4_request_cancelled_total",
            "Requests cancelled or disconnected before finishing.",
            stats.requests_cancelled_total.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "gemma4_http_errors_total",
            "Requests answered with an error.",
            self.http_errors.load(Ordering::Relaxed),
        );
        // Kernel refusals the server survived by running the plain reference (fallback policy
        // Warn); each is also logged once per kernel and shape.
        let _ = writeln!(out, "# HELP gemma4_kernel_fallbacks_total Kernel refusals answered by the plain reference instead.\n# TYPE gemma4_kernel_fallbacks_total counter");
        for (kernel, _, fallbacks) in gemma4_model::kernels::fallback::counts() {
            let _ = writeln!(out, "gemma4_kernel_fallbacks_total{{model_name=\"{model}\",kernel=\"{kernel}\"}} {fallbacks}");
        }
        let lock = |h: &Mutex<Histogram>| h.lock().unwrap_or_else(|e| e.into_inner()).clone();
        lock(&self.ttft).render(
            &mut out,
            "gemma4_time_to_first_token_seconds",
            "Time to first token.",
            model,
        );
        lock(&self.itl).render(
            &mut out,
            "gemma4_inter_token_latency_seconds",
            "Time between tokens of a request.",
            model,
        );
        lock(&self.e2e).render(
            &mut out,
            "gemma4_e2e_request_latency_seconds",
            "End-to-end request latency.",
            model,
        );
        out
    }
}
