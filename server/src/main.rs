//! The `gemma4` binary. Subcommands:
//! - `serve`: the OpenAI-compatible API (the `gemma4_server` library);
//! - `logits`: logits at every position of a token sequence, written to a safetensors file;
//! - `generate`: prefill + decode with greedy or seeded sampling;
//! - `check`: a fixture's reference logits and greedy outputs (`gemma4_model::golden`);
//! - `bench`, `bench-kernels`, `bench-vision`, `bench-prefix`, `bench-structured`: speed;
//! - `synth`: a random-valued checkpoint in the real format (`gemma4_model::synth`).

/// The CLI-only tools.
mod cli {
    pub mod bench;
    pub mod bench_structured;
    pub mod check;
}

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use gemma4_model::Gemma4Backend;
use gemma4_model::{generate, GenerateRequest, Logits, Model, SamplingParams};

#[derive(Parser)]
#[command(name = "gemma4", version, about = "Gemma 4 (NVFP4) inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum DeviceArg {
    /// Pure-Rust CPU reference backend (ndarray, f32).
    Cpu,
    /// CubeCL over wgpu (Vulkan/Metal/...; lavapipe on CPU-only machines). Needs the `wgpu` feature.
    Wgpu,
    /// CubeCL over CUDA. Needs the `cuda` feature and an NVIDIA driver.
    Cuda,
}

/// The float type the model computes and stores its non-NVFP4 weights in (NVFP4 weights stay
/// packed; every kernel accumulates in f32).
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum DtypeArg {
    /// bfloat16 on cuda, float32 on cpu and wgpu.
    Auto,
    /// CUDA only (WGSL has no bf16; the CPU kernels are f32).
    Bfloat16,
    /// wgpu where the adapter has SHADER_F16 (Mesa's lavapipe does), and cuda. Not a serving
    /// default: Gemma's activations can exceed f16's range on real weights.
    Float16,
    Float32,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum PlanDtype {
    Bfloat16,
    Float16,
    Float32,
}

/// The KV cache's element type: the compute dtype's, or FP8 E4M3 (1 byte).
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum KvCacheDtype {
    Auto,
    Fp8,
}

/// Where the model runs and in which float type.
#[derive(clap::Args, Clone, Copy, Debug)]
struct BackendArgs {
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DtypeArg,
}

#[derive(Subcommand)]
enum Command {
    /// Write the logits at every position of `--tokens` to a safetensors file (tensor `logits`, f32 [tokens, vocab]).
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 2,10,20.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Generate a continuation of `--tokens` or `--prompt`.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated prompt token ids (no tokenizer needed).
        #[arg(
            long,
            value_delimiter = ',',
            conflicts_with = "prompt",
            required_unless_present = "prompt"
        )]
        tokens: Option<Vec<u32>>,
        /// Prompt text, encoded with the checkpoint's tokenizer.json (special tokens added as the tokenizer defines).
        #[arg(long)]
        prompt: Option<String>,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// 0 disables top-k.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0.0)]
        min_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print `{"tokens": [...], "text": "..."}` as the last line of stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Serve the OpenAI-compatible API (chat completions, responses, models, tokenize, metrics, ...).
    Serve {
        #[command(flatten)]
        args: gemma4_server::serve::ServeArgs,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Write a checkpoint with the real Gemma 4 names, shapes, dtypes and NVFP4 layout and random
    /// values (for benchmarks; presets: 31b, 31b-6l, 31b-2l, small, tiny).
    Synth {
        #[arg(long, default_value = "31b")]
        preset: String,
        #[arg(long)]
        out: PathBuf,
        /// Largest shard size in GB (an index is written when there is more than one shard).
        #[arg(long, default_value_t = 5.0)]
        shard_gb: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Compare against a conformance fixture's reference logits and greedy outputs.
    Check {
        #[arg(long)]
        model: PathBuf,
        /// Max |Δ logit|; default: the conformance tolerance of the dtype (1.3e-4 for float32,
        /// 0.2 for float16, 1.6 for bfloat16).
        #[arg(long)]
        tolerance: Option<f32>,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// End-to-end speed on random token ids: prefill tokens/s, decode tokens/s at batch 1, and
    /// batched decode tokens/s with --batch sequences stepping together.
    Bench {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 256)]
        prompt_len: usize,
        /// Decode steps measured after a 16-token prompt.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Batch sizes of the batched decode measurement, e.g. 1,16,64 (1 is the batch-1 decode).
        #[arg(long, value_delimiter = ',', default_values_t = [1usize])]
        batch: Vec<usize>,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Automatic prefix caching on a multi-turn chat of random ids through the engine: the
    /// conversation with caching off, then on (greedy answers, fresh engines); per turn TTFT
    /// both ways and the prompt tokens served from the cache, the hit rate, the TTFT ratio over
    /// turns 2.., whether the answers agree, and the cache's size at the end. One JSON line.
    BenchPrefix {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 2000)]
        system_tokens: usize,
        #[arg(long, default_value_t = 10)]
        turns: usize,
        #[arg(long, default_value_t = 64)]
        user_tokens: usize,
        #[arg(long, default_value_t = 16)]
        answer_tokens: usize,
        #[arg(long, default_value_t = gemma4_model::DEFAULT_BLOCK_SIZE)]
        block_size: usize,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Structured outputs: llguidance's mask time per token at a --vocab-token vocabulary (a
    /// synthetic one shaped like a real tokenizer's), and decode tok/s on --model through the
    /// engine with and without a JSON schema, in the same run.
    BenchStructured {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 262_144)]
        vocab: usize,
        /// Tokens walked through the schema for the mask times.
        #[arg(long, default_value_t = 400)]
        steps: usize,
        /// Requests decoded each way.
        #[arg(long, default_value_t = 8)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Time to encode one image at each soft-token budget with the checkpoint's vision tower
    /// (`gemma4 synth --preset 31b-6l` has the 31B's).
    BenchVision {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_delimiter = ',', default_values_t = [70usize, 140, 280, 560, 1120])]
        budgets: Vec<usize>,
        /// Run the whole tower only up to this budget; above it the time is composed from one
        /// measured encoder layer.
        #[arg(long, default_value_t = 280)]
        full_up_to: usize,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Host sampling speed at a real vocabulary: µs per sequence-token for greedy, for the 31B's
    /// generation_config (temperature 1.0, top_k 64, top_p 0.95) by selection, and for the same
    /// by the plain full sort, on random logit rows, in one run. One JSON line.
    BenchSampling {
        #[arg(long, default_value_t = 262_144)]
        vocab: usize,
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 64])]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Device→host bytes and time per decode step of what sampling needs: full logit rows
    /// against the device top-k (`k` per row, with ids and the lse), on random logits
    /// `[batch, vocab]` on the chosen device. One JSON line.
    BenchFetch {
        #[arg(long, default_value_t = 262_144)]
        vocab: usize,
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 64])]
        batch: Vec<usize>,
        /// The 31B's generation_config top_k.
        #[arg(long, default_value_t = 64)]
        k: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// The memory plan of serving a preset's model on a device of `--memory-gib`, without loading
    /// weights: weight bytes, estimated activations, KV bytes per token by layer kind, blocks per
    /// sequence at `--max-model-len`, and the maximum concurrency. One JSON line on stdout and the
    /// summary line on stderr.
    Plan {
        /// A `gemma4 synth` preset (31b: the real model's shapes).
        #[arg(long, default_value = "31b")]
        preset: String,
        #[arg(long)]
        memory_gib: f64,
        #[arg(long, default_value_t = 8192)]
        max_model_len: usize,
        /// The compute dtype (float weights and, unless --kv-cache-dtype fp8, the KV cache).
        #[arg(long, value_enum, default_value = "bfloat16")]
        dtype: PlanDtype,
        #[arg(long, value_enum, default_value = "auto")]
        kv_cache_dtype: KvCacheDtype,
        #[arg(long, default_value_t = 0.9)]
        gpu_memory_utilization: f64,
        #[arg(long, default_value_t = 16)]
        max_num_seqs: usize,
        #[arg(long, default_value_t = 2048)]
        max_num_batched_tokens: usize,
        #[arg(long, default_value_t = 16)]
        block_size: usize,
    },
    /// Each kernel at the 31B shapes on random data: time, GB/s, TFLOP/s, fraction of the
    /// roofline (bytes over the copy bandwidth measured in the same run) and speed-up over the
    /// plain Burn reference.
    BenchKernels {
        /// m of the prefill GEMM and t of the prefill attention.
        #[arg(long, default_value_t = 64)]
        prefill_rows: usize,
        /// Keys of the full-layer decode attention.
        #[arg(long, default_value_t = 4096)]
        context: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Skip the reference timings (slow on big shapes).
        #[arg(long)]
        no_reference: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Command::Synth {
        preset,
        out,
        shard_gb,
        seed,
    } = &cli.command
    {
        let p = gemma4_model::synth::preset(preset)?;
        let (mlp, attn, embed, other) = gemma4_model::synth::byte_budget(&p);
        eprintln!(
            "synth {preset}: NVFP4 MLP {:.2} GB, bf16 attention {:.2} GB, bf16 embedding {:.2} GB, other {:.3} GB",
            mlp as f64 / 1e9,
            attn as f64 / 1e9,
            embed as f64 / 1e9,
            other as f64 / 1e9
        );
        gemma4_model::synth::synth(
            preset,
            out,
            (shard_gb * 1e9) as usize,
            *seed,
            |file, i, n| tracing::info!("wrote {file} ({i}/{n})"),
        )?;
        return Ok(());
    }
    if let Command::Plan {
        preset,
        memory_gib,
        max_model_len,
        dtype,
        kv_cache_dtype,
        gpu_memory_utilization,
        max_num_seqs,
        max_num_batched_tokens,
        block_size,
    } = &cli.command
    {
        let p = gemma4_model::synth::preset(preset)?;
        let config =
            gemma4_model::ModelConfig::from_values(&gemma4_model::synth::config_json(&p), None)?;
        let (nvfp4, attn, embed, other) = gemma4_model::synth::byte_budget(&p);
        let dtype_bytes = if *dtype == PlanDtype::Float32 { 4 } else { 2 };
        let input = gemma4_model::plan::PlanInput {
            memory_bytes: (memory_gib * (1u64 << 30) as f64) as u64,
            gpu_memory_utilization: *gpu_memory_utilization,
            max_model_len: *max_model_len,
            max_num_seqs: *max_num_seqs,
            max_num_batched_tokens: *max_num_batched_tokens,
            block_size: *block_size,
            dtype_bytes,
            kv_bytes: if *kv_cache_dtype == KvCacheDtype::Fp8 {
                1
            } else {
                dtype_bytes
            },
            nvfp4_weight_bytes: nvfp4 as u64,
            bf16_weight_bytes: (attn + embed + other) as u64,
        };
        let plan = gemma4_model::plan::plan(&config.text, &input).map_err(anyhow::Error::msg)?;
        let gib = gemma4_model::plan::gib;
        eprintln!(
            "{preset} on {memory_gib} GiB × {gpu_memory_utilization}: weights {:.2} GiB, activations ≈{:.2} GiB, KV cache {:.2} GiB = {} sliding + {} full blocks of {block_size} tokens; maximum concurrency for {max_model_len} tokens per request: {}",
            gib(plan.weight_bytes),
            gib(plan.activation_bytes),
            gib(plan.kv_cache_bytes),
            plan.num_blocks_sliding,
            plan.num_blocks_full,
            plan.max_concurrency
        );
        println!(
            "{}",
            serde_json::json!({
                "preset": preset, "memory_gib": memory_gib, "gpu_memory_utilization": gpu_memory_utilization,
                "dtype": format!("{dtype:?}").to_lowercase(), "kv_cache_dtype": format!("{kv_cache_dtype:?}").to_lowercase(),
                "max_model_len": max_model_len, "block_size": block_size,
                "weight_bytes": plan.weight_bytes, "activation_bytes_estimate": plan.activation_bytes,
                "kv_cache_bytes": plan.kv_cache_bytes,
                "kv_bytes_per_token": {"sliding_layer": plan.kv_token_bytes_sliding, "full_layer": plan.kv_token_bytes_full,
                    "sliding_layers": plan.sliding_layers, "full_layers": plan.full_layers},
                "block_bytes": {"sliding": plan.block_bytes_sliding, "full": plan.block_bytes_full},
                "blocks_per_sequence": {"sliding": plan.blocks_per_seq_sliding, "full": plan.blocks_per_seq_full},
                "kv_bytes_per_sequence": plan.seq_bytes,
                "max_concurrency": plan.max_concurrency,
                "num_blocks": {"sliding": plan.num_blocks_sliding, "full": plan.num_blocks_full},
            })
        );
        return Ok(());
    }
    if let Command::BenchSampling {
        vocab,
        batch,
        repeats,
    } = &cli.command
    {
        println!("{}", cli::bench::sampling(*vocab, batch, (*repeats).max(1)));
        return Ok(());
    }
    let backend = match &cli.command {
        Command::Synth { .. } | Command::BenchSampling { .. } | Command::Plan { .. } => {
            unreachable!("handled above")
        }
        Command::Logits { backend, .. }
        | Command::Generate { backend, .. }
        | Command::Bench { backend, .. }
        | Command::BenchPrefix { backend, .. }
        | Command::BenchStructured { backend, .. }
        | Command::BenchKernels { backend, .. }
        | Command::BenchFetch { backend, .. }
        | Command::BenchVision { backend, .. }
        | Command::Check { backend, .. }
        | Command::Serve { backend, .. } => *backend,
    };
    match backend.device {
        DeviceArg::Cpu => match backend.dtype {
            DtypeArg::Auto | DtypeArg::Float32 => with_backend::<gemma4_model::CpuBackend>(cli, Default::default()),
            other => bail!("--device cpu computes in float32 (its kernels are f32); --dtype {} needs --device wgpu or cuda", dtype_name(other)),
        },
        DeviceArg::Wgpu => wgpu_device(cli, backend.dtype),
        DeviceArg::Cuda => cuda_device(cli, backend.dtype),
    }
}

fn dtype_name(d: DtypeArg) -> String {
    d.to_possible_value()
        .map_or_else(|| format!("{d:?}"), |v| v.get_name().to_string())
}

#[cfg(feature = "wgpu")]
fn wgpu_device(cli: Cli, dtype: DtypeArg) -> Result<()> {
    use burn::backend::wgpu::{Wgpu, WgpuDevice, WgpuRuntime};
    let device = WgpuDevice::default();
    match dtype {
        DtypeArg::Auto | DtypeArg::Float32 => with_backend::<Wgpu<f32, i32>>(cli, device),
        DtypeArg::Float16 => {
            if !gemma4_model::kernels::device::supports_f16::<WgpuRuntime>(&device) {
                bail!("--dtype float16: the wgpu adapter ({device:?}) has no SHADER_F16; use --dtype float32");
            }
            with_backend::<Wgpu<half::f16, i32>>(cli, device)
        }
        DtypeArg::Bfloat16 => bail!("--device wgpu has no bfloat16 (WGSL has none; burn's Wgpu<bf16> would store f16): use --dtype float16 or float32"),
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(_: Cli, _: DtypeArg) -> Result<()> {
    bail!("this gemma4 binary was built without wgpu support: rebuild with `--features wgpu`")
}

#[cfg(feature = "cuda")]
fn cuda_device(cli: Cli, dtype: DtypeArg) -> Result<()> {
    // Without libcuda the first tensor op panics in a background thread: check first.
    let found = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/local/nvidia/lib64",
        "/usr/local/cuda/lib64",
        "/usr/lib",
    ]
    .iter()
    .map(PathBuf::from)
    .chain(
        std::env::var("LD_LIBRARY_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
    )
    .any(|d| d.join("libcuda.so.1").exists() || d.join("libcuda.so").exists())
        || std::process::Command::new("ldconfig")
            .arg("-p")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so.1"));
    if !found {
        bail!("--device cuda: no NVIDIA driver library (libcuda.so.1) found on this machine");
    }
    use burn::backend::cuda::{Cuda, CudaDevice};
    let device = CudaDevice::default();
    match dtype {
        DtypeArg::Auto | DtypeArg::Bfloat16 => with_backend::<Cuda<half::bf16, i32>>(cli, device),
        DtypeArg::Float16 => with_backend::<Cuda<half::f16, i32>>(cli, device),
        DtypeArg::Float32 => with_backend::<Cuda<f32, i32>>(cli, device),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_: Cli, _: DtypeArg) -> Result<()> {
    bail!("this gemma4 binary was built without CUDA support: rebuild with `--features cuda`")
}

fn load<B: Gemma4Backend>(dir: &Path, device: &B::Device) -> Result<Model<B>> {
    let start = Instant::now();
    let model =
        Model::<B>::load(dir, device).with_context(|| format!("loading {}", dir.display()))?;
    let r = &model.report;
    eprintln!(
        "loaded {} in {:.2}s: {} tensors, {} NVFP4 linears, {} dense linears; {}{}",
        dir.display(),
        start.elapsed().as_secs_f64(),
        r.tensors_used,
        r.nvfp4_linears,
        r.dense_linears,
        r.bytes,
        if r.skipped.is_empty() {
            String::new()
        } else {
            format!(
                ", {} vision tensors not loaded (the config has no vision_config)",
                r.skipped.len()
            )
        }
    );
    Ok(model)
}

fn with_backend<B: Gemma4Backend>(cli: Cli, device: B::Device) -> Result<()> {
    match cli.command {
        Command::Logits {
            model, tokens, out, ..
        } => {
            let m = load::<B>(&model, &device)?;
            let mut cache = m.text.new_cache();
            let start = Instant::now();
            let logits = m.text.forward(&tokens, &mut cache, Logits::All)?;
            let [t, v] = logits.dims();
            let data = gemma4_model::to_host_f32(logits);
            eprintln!("{t} positions in {:.3}s", start.elapsed().as_secs_f64());
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![t, v], &bytes)?;
            safetensors::serialize_to_file([("logits", view)], None, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(())
        }
        Command::Generate {
            model,
            tokens,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            json,
            ..
        } => {
            let m = load::<B>(&model, &device)?;
            let tokenizer_path = model.join("tokenizer.json");
            let tokenizer = if tokenizer_path.exists() {
                Some(
                    tokenizers::Tokenizer::from_file(&tokenizer_path)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", tokenizer_path.display()))?,
                )
            } else {
                None
            };
            let prompt_ids = match (tokens, prompt) {
                (Some(ids), _) => ids,
                (None, Some(text)) => {
                    let Some(tok) = &tokenizer else {
                        bail!(
                            "--prompt needs {}; pass --tokens instead",
                            tokenizer_path.display()
                        )
                    };
                    tok.encode(text, true)
                        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
                        .get_ids()
                        .to_vec()
                }
                (None, None) => bail!("give --tokens or --prompt"),
            };
            let sampling = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                seed,
            };
            let req = GenerateRequest {
                prompt: prompt_ids.clone(),
                max_new_tokens,
                sampling,
                stop_ids: m.stop_ids(),
                suppress_ids: m.generation.suppress_tokens.clone(),
                max_len: m.config.text.max_position_embeddings,
            };
            let out = generate(&m.text, &req, |id| {
                if !json {
                    match &tokenizer {
                        Some(t) => print!("{}", t.decode(&[id], false).unwrap_or_default()),
                        None => print!("{id} "),
                    }
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                }
            })?;
            if !json {
                println!();
            }
            let n = out.tokens.len();
            eprintln!(
                "prompt {} tokens in {:.3}s ({:.1} tok/s); {} new tokens in {:.3}s ({:.1} tok/s); finish: {:?}",
                prompt_ids.len(),
                out.prompt_seconds,
                prompt_ids.len() as f64 / out.prompt_seconds.max(1e-9),
                n,
                out.decode_seconds,
                n.saturating_sub(1) as f64 / out.decode_seconds.max(1e-9),
                out.finish
            );
            if json {
                let mut obj = serde_json::json!({ "tokens": out.tokens });
                if let Some(t) = &tokenizer {
                    obj["text"] = serde_json::Value::String(
                        t.decode(&out.tokens, true)
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                    );
                }
                println!("{obj}");
            }
            Ok(())
        }
        Command::Serve { args, .. } => gemma4_server::serve::run::<B>(args, device),
        Command::Synth { .. } | Command::BenchSampling { .. } | Command::Plan { .. } => {
            unreachable!("handled before a backend is chosen")
        }
        Command::Check {
            model, tolerance, ..
        } => {
            let m = load::<B>(&model, &device)?;
            let dtype = m.text.embed_tokens.val().dtype();
            let tolerance =
                tolerance.unwrap_or(gemma4_model::golden::Tolerances::for_dtype(dtype).logits);
            eprintln!("checking in {dtype:?} against the f32 reference, tolerance {tolerance:.1e}");
            cli::check::check(&m, &model, tolerance)
        }
        Command::Bench {
            model,
            prompt_len,
            decode_tokens,
            repeats,
            batch,
            backend,
        } => {
            let m = load::<B>(&model, &device)?;
            let host = matches!(backend.device, DeviceArg::Cpu);
            println!(
                "{}",
                cli::bench::end_to_end(
                    &m,
                    prompt_len,
                    decode_tokens,
                    repeats.max(1),
                    &batch,
                    host
                )?
            );
            Ok(())
        }
        Command::BenchPrefix {
            model,
            system_tokens,
            turns,
            user_tokens,
            answer_tokens,
            block_size,
            backend,
        } => {
            let conv = cli::bench::Conversation {
                system_tokens,
                turns: turns.max(1),
                user_tokens,
                answer_tokens: answer_tokens.max(1),
                block_size: block_size.max(1),
            };
            let mut v = cli::bench::prefix::<B>(&model, device, &conv)?;
            v["device"] = serde_json::json!(format!("{:?}", backend.device).to_lowercase());
            println!("{v}");
            Ok(())
        }
        Command::BenchStructured {
            model,
            vocab,
            steps,
            requests,
            max_tokens,
            ..
        } => {
            let v = cli::bench_structured::run::<B>(
                &model, device, vocab, steps, requests, max_tokens,
            )?;
            println!("{v}");
            Ok(())
        }
        Command::BenchVision {
            model,
            budgets,
            full_up_to,
            ..
        } => {
            let m = load::<B>(&model, &device)?;
            println!("{}", cli::bench::vision(&m, &model, &budgets, full_up_to)?);
            Ok(())
        }
        Command::BenchFetch {
            vocab,
            batch,
            k,
            repeats,
            ..
        } => {
            println!(
                "{}",
                cli::bench::fetch::<B>(&device, vocab, &batch, k, repeats.max(1))?
            );
            Ok(())
        }
        Command::BenchKernels {
            prefill_rows,
            context,
            repeats,
            no_reference,
            json,
            backend,
        } => {
            let host = matches!(backend.device, DeviceArg::Cpu);
            let table = cli::bench::kernels::<B>(
                &device,
                prefill_rows.max(1),
                context.max(1),
                repeats.max(1),
                !no_reference,
                host,
            )?;
            if json {
                println!("{table}");
            } else {
                cli::bench::print_kernel_table(&table);
            }
            Ok(())
        }
    }
}
