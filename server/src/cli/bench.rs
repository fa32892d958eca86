//! `gemma4 bench`: end-to-end tokens/s on a checkpoint, and `gemma4 bench-kernels`: each kernel
//! of the engine at the 31B shapes on random data, against the plain Burn reference measured in
//! the same run and against the roofline (bytes moved over the copy bandwidth measured in the
//! same run). Everything goes through `Gemma4Backend`, so the same code measures the CPU fast
//! path, wgpu and CUDA. `gemma4 bench-prefix`: prefix caching through the engine on a chat.

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{Distribution, Tensor, TensorData};
use gemma4_model::generation::{sample, Rng};
use gemma4_model::kernels::attention::{reference, AttentionParams};
use gemma4_model::kernels::fused::reference as fused_ref;
use gemma4_model::kernels::pool::for_each_mut;
use gemma4_model::nvfp4::{scale_words_per_row, Nvfp4Weight, GROUP_SIZE};
use gemma4_model::{Gemma4Backend, Logits, Model, SamplingParams, SeqKv, SeqStep};
use serde_json::{json, Value};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sync<B: Gemma4Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| anyhow!("device sync: {e:?}"))
}

/// [`time`] when `on` (the kernel table's reference column), else None.
fn time_if<B: Gemma4Backend, T>(
    on: bool,
    device: &B::Device,
    repeats: usize,
    f: impl FnMut() -> T,
) -> Result<Option<f64>> {
    if on {
        time::<B, T>(device, repeats, f).map(Some)
    } else {
        Ok(None)
    }
}

/// Median seconds of `f` over `repeats` runs after one warm-up, each run ended by a device sync.
fn time<B: Gemma4Backend, T>(
    device: &B::Device,
    repeats: usize,
    mut f: impl FnMut() -> T,
) -> Result<f64> {
    drop(f());
    sync::<B>(device)?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let out = f();
        sync::<B>(device)?;
        times.push(start.elapsed().as_secs_f64());
        drop(out);
    }
    Ok(median(times))
}

/// Prefill tokens/s over `prompt_len` random ids; decode tokens/s at batch 1 (greedy, through
/// the cache after a 16-token prompt); batched decode tokens/s for each of `batches` (sequences
/// stepping together through the engine's continuous-batching forward; 1 is skipped there, the
/// batch-1 figure is `decode_tok_s`).
///
/// Beside decode it prints the bound the weights set: a decode step reads every text-tower weight
/// once (`report.text_bytes`; the KV cache of a short context adds little), so tok/s cannot exceed
/// read bandwidth / those bytes. The bandwidth is measured in the same run: a host read on the
/// CPU (`host`), a device copy elsewhere.
pub fn end_to_end<B: Gemma4Backend>(
    m: &Model<B>,
    prompt_len: usize,
    decode_tokens: usize,
    repeats: usize,
    batches: &[usize],
    host: bool,
) -> Result<Value> {
    let vocab = m.text.vocab_size as u64;
    let mut rng = Rng::new(1234);
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let read = |t: Tensor<B, 2>| t.into_data(); // reading back waits for the device
    read(
        m.text
            .forward(&prompt, &mut m.text.new_cache(), Logits::Last)?,
    );
    let mut prefill = vec![];
    for _ in 0..repeats {
        let mut cache = m.text.new_cache();
        let start = Instant::now();
        read(m.text.forward(&prompt, &mut cache, Logits::Last)?);
        prefill.push(prompt_len as f64 / start.elapsed().as_secs_f64());
    }
    let short = &prompt[..16.min(prompt_len)];
    let mut decode = vec![];
    for _ in 0..repeats.min(3) {
        let mut cache = m.text.new_cache();
        read(m.text.forward(short, &mut cache, Logits::Last)?);
        let mut next = [prompt[0]];
        let start = Instant::now();
        for _ in 0..decode_tokens {
            let row = gemma4_model::to_host_f32(m.text.forward(&next, &mut cache, Logits::Last)?);
            next[0] = sample(&row, &SamplingParams::greedy(), &[], &mut Rng::new(0));
        }
        decode.push(decode_tokens as f64 / start.elapsed().as_secs_f64());
    }
    let mut batched = serde_json::Map::new();
    for &batch in batches.iter().filter(|&&b| b > 1) {
        // One paged pool for the batch, as the engine has (it grows to what the batch needs).
        let mut pool = m.text.new_pool(
            gemma4_model::DEFAULT_BLOCK_SIZE,
            None,
            gemma4_model::KvDtype::Model,
        );
        let mut seqs: Vec<SeqKv> = (0..batch).map(|_| pool.new_seq()).collect();
        let mut steps: Vec<SeqStep<B>> = seqs
            .iter_mut()
            .map(|kv| SeqStep {
                tokens: short,
                soft: None,
                kv,
            })
            .collect();
        read(m.text.forward_step(&mut pool, &mut steps, Logits::Last)?);
        let n_steps = (decode_tokens / 4).max(4);
        let tokens: Vec<[u32; 1]> = (0..batch).map(|b| [prompt[b % prompt.len()]]).collect();
        let start = Instant::now();
        for _ in 0..n_steps {
            let mut steps: Vec<SeqStep<B>> = seqs
                .iter_mut()
                .zip(&tokens)
                .map(|(kv, t)| SeqStep {
                    tokens: t,
                    soft: None,
                    kv,
                })
                .collect();
            read(m.text.forward_step(&mut pool, &mut steps, Logits::Last)?);
        }
        let steps = n_steps;
        let tok_s = (batch * steps) as f64 / start.elapsed().as_secs_f64();
        batched.insert(batch.to_string(), json!(tok_s));
    }
    let (bandwidth, baseline) = bandwidth::<B>(&m.text.embed_tokens.device(), repeats, host)?;
    let step_bytes = m.report.text_bytes as f64;
    let decode_tok_s = median(decode);
    let bound = bandwidth / step_bytes;
    Ok(json!({
        "engine": "gemma4 (burn)",
        "dtype": format!("{:?}", m.text.embed_tokens.val().dtype()),
        "prompt_len": prompt_len,
        "prefill_tok_s": median(prefill),
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tok_s,
        "decode_step_weight_GB": step_bytes / 1e9,
        "bandwidth_GB_s": bandwidth / 1e9,
        "bandwidth_baseline": baseline,
        "decode_bound_tok_s": bound,
        "decode_fraction_of_bound": decode_tok_s / bound,
        "batched_decode_tok_s": batched,
    }))
}

/// Random packed NVFP4 weight [out, in]: random codes, finite E4M3 scales near 1.
fn random_nvfp4<B: Gemma4Backend>(out: usize, inp: usize, device: &B::Device) -> Nvfp4Weight<B> {
    let mut rng = Rng::new((out * 31 + inp) as u64);
    let codes: Vec<i32> = (0..out * inp / 8).map(|_| rng.next_u64() as i32).collect();
    let spr = scale_words_per_row(inp);
    // E4M3 0x30..0x3f are 0.5..0.9375 / 1..1.875: finite, never NaN.
    let scales: Vec<i32> = (0..out * spr)
        .map(|_| i32::from_le_bytes([0x30 + (rng.next_u64() % 16) as u8; 4]))
        .collect();
    Nvfp4Weight {
        codes: Tensor::from_data(TensorData::new(codes, [out, inp / 8]), device),
        scales: Tensor::from_data(TensorData::new(scales, [out, spr]), device),
        global_scale: 0.01,
        out_features: out,
        in_features: inp,
    }
}

struct Row {
    kernel: String,
    shape: String,
    seconds: f64,
    bytes: f64,
    flops: f64,
    reference_seconds: Option<f64>,
}

/// The kernel table at the 31B shapes. `prefill_rows`: m of the prefill GEMM and t of the
/// prefill attention (keep it small on the CPU); `context`: keys of the full-layer decode.
pub fn kernels<B: Gemma4Backend>(
    device: &B::Device,
    prefill_rows: usize,
    context: usize,
    repeats: usize,
    with_reference: bool,
    host: bool,
) -> Result<Value> {
    let (copy_bw, baseline) = bandwidth::<B>(device, repeats, host)?;

    let mut rows = Vec::new();
    // NVFP4 MLP linears: gate/up [21504, 5376] and down [5376, 21504].
    for (name, out, inp) in [
        ("nvfp4 gate/up_proj", 21504usize, 5376usize),
        ("nvfp4 down_proj", 5376, 21504),
    ] {
        let w = random_nvfp4::<B>(out, inp, device);
        let weight_bytes = (out * inp / 2 + out * inp / GROUP_SIZE) as f64;
        for m in [1usize, 16, prefill_rows] {
            let x = Tensor::<B, 2>::random([m, inp], Distribution::Uniform(-1.0, 1.0), device);
            let seconds = time::<B, _>(device, repeats, || w.forward(x.clone()))?;
            let reference_seconds =
                time_if::<B, _>(with_reference, device, repeats.min(3), || {
                    w.forward_reference(x.clone())
                })?;
            rows.push(Row {
                kernel: name.into(),
                shape: format!("m={m} out={out} in={inp}"),
                seconds,
                bytes: weight_bytes + ((m * inp + m * out) * 4) as f64,
                flops: (2 * m * out * inp) as f64,
                reference_seconds,
            });
        }
    }

    // Attention: full layers (32 query heads over 4 KV heads of 512), sliding layers (32 over 16
    // KV heads of 256, window 1024). Decode: one query against the cache; prefill: t queries.
    let attention = |rows: &mut Vec<Row>,
                     name: &str,
                     t: usize,
                     s: usize,
                     kv: usize,
                     d: usize,
                     window: Option<usize>|
     -> Result<()> {
        let q = Tensor::<B, 3>::random([t, 32, d], Distribution::Uniform(-1.0, 1.0), device);
        let k = Tensor::<B, 3>::random([kv, s, d], Distribution::Uniform(-1.0, 1.0), device);
        let v = Tensor::<B, 3>::random([kv, s, d], Distribution::Uniform(-1.0, 1.0), device);
        let p = AttentionParams::causal(s - t, 0, window);
        let seconds = time::<B, _>(device, repeats, || {
            <B as Gemma4Backend>::attention(q.clone(), k.clone(), v.clone(), &p)
        })?;
        let reference_seconds = time_if::<B, _>(with_reference, device, repeats.min(3), || {
            reference::attention(q.clone(), k.clone(), v.clone(), &p)
        })?;
        let visible: usize = (0..t)
            .map(|i| {
                let qp = s - t + i;
                window.map_or(qp + 1, |w| w.min(qp + 1))
            })
            .sum();
        rows.push(Row {
            kernel: name.into(),
            shape: format!(
                "t={t} s={s} heads=32 kv={kv} d={d}{}",
                window.map_or(String::new(), |w| format!(" window={w}"))
            ),
            seconds,
            bytes: ((2 * kv * s * d + 2 * t * 32 * d) * 4) as f64,
            flops: (4 * 32 * d * visible) as f64,
            reference_seconds,
        });
        Ok(())
    };
    attention(
        &mut rows,
        "attention decode, full",
        1,
        context,
        4,
        512,
        None,
    )?;
    attention(
        &mut rows,
        "attention decode, sliding",
        1,
        1024,
        16,
        256,
        Some(1024),
    )?;
    attention(
        &mut rows,
        "attention prefill, full",
        prefill_rows,
        prefill_rows,
        4,
        512,
        None,
    )?;
    attention(
        &mut rows,
        "attention prefill, sliding",
        prefill_rows,
        prefill_rows,
        16,
        256,
        Some(1024),
    )?;

    // The fused steps around the matmuls, at decode (m = 1) and prefill rows; the reference is
    // the chain of Burn ops they replace. Bytes: every input read once, the output written once.
    let unif =
        |shape: [usize; 2]| Tensor::<B, 2>::random(shape, Distribution::Uniform(-1.0, 1.0), device);
    for m in [1usize, prefill_rows] {
        let (h, x, w) = (
            unif([m, 5376]),
            unif([m, 5376]),
            Tensor::<B, 1>::random([5376], Distribution::Uniform(0.5, 1.5), device),
        );
        let seconds = time::<B, _>(device, repeats, || {
            B::rms_norm_add(h.clone(), x.clone(), w.clone(), 1e-6, 0.5)
        })?;
        let reference_seconds = time_if::<B, _>(with_reference, device, repeats, || {
            fused_ref::rms_norm_add(h.clone(), x.clone(), w.clone(), 1e-6, 0.5)
        })?;
        rows.push(Row {
            kernel: "rms_norm_add (sandwich norm)".into(),
            shape: format!("m={m} dim=5376"),
            seconds,
            bytes: ((3 * m + 1) * 5376 * 4) as f64,
            flops: 0.0,
            reference_seconds,
        });

        let q = Tensor::<B, 3>::random([m, 32, 256], Distribution::Uniform(-1.0, 1.0), device);
        let (cos, sin, qw) = (
            unif([m, 256]),
            unif([m, 256]),
            Tensor::<B, 1>::random([256], Distribution::Uniform(0.5, 1.5), device),
        );
        let seconds = time::<B, _>(device, repeats, || {
            B::rms_norm_rope(q.clone(), Some(qw.clone()), 1e-6, cos.clone(), sin.clone())
        })?;
        let reference_seconds = time_if::<B, _>(with_reference, device, repeats, || {
            fused_ref::rms_norm_rope(q.clone(), Some(qw.clone()), 1e-6, cos.clone(), sin.clone())
        })?;
        rows.push(Row {
            kernel: "rms_norm_rope (q, sliding)".into(),
            shape: format!("t={m} heads=32 d=256"),
            seconds,
            bytes: ((2 * m * 32 * 256 + 2 * m * 256 + 256) * 4) as f64,
            flops: 0.0,
            reference_seconds,
        });

        let (gate, up) = (unif([m, 21504]), unif([m, 21504]));
        let seconds = time::<B, _>(device, repeats, || {
            B::gelu_tanh_mul(gate.clone(), up.clone())
        })?;
        let reference_seconds = time_if::<B, _>(with_reference, device, repeats, || {
            fused_ref::gelu_tanh_mul(gate.clone(), up.clone())
        })?;
        rows.push(Row {
            kernel: "gelu_tanh_mul (MLP gate)".into(),
            shape: format!("m={m} width=21504"),
            seconds,
            bytes: (3 * m * 21504 * 4) as f64,
            flops: 0.0,
            reference_seconds,
        });
    }

    // Dense linears (bf16 in the checkpoint; f32 on these backends) through the backend's
    // `dense_linear`, against Burn's matmul: the k_proj of a sliding layer [4096, 5376] (q_proj's
    // 176 MB in f32 is over wgpu's default buffer limit).
    let w = Tensor::<B, 2>::random([5376, 4096], Distribution::Uniform(-0.1, 0.1), device);
    for m in [1usize, 16, prefill_rows] {
        let x = unif([m, 5376]);
        let seconds = time::<B, _>(device, repeats, || B::dense_linear(x.clone(), w.clone()))?;
        let reference_seconds = time_if::<B, _>(with_reference, device, repeats.min(3), || {
            x.clone().matmul(w.clone())
        })?;
        rows.push(Row {
            kernel: "dense k_proj (f32)".into(),
            shape: format!("m={m} out=4096 in=5376"),
            seconds,
            bytes: ((5376 * 4096 + m * (5376 + 4096)) * 4) as f64,
            flops: (2 * m * 5376 * 4096) as f64,
            reference_seconds,
        });
    }

    let table: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "kernel": r.kernel,
                "shape": r.shape,
                "us": r.seconds * 1e6,
                "GB_s": r.bytes / r.seconds / 1e9,
                "TFLOP_s": r.flops / r.seconds / 1e12,
                "roofline_fraction": (r.bytes / copy_bw) / r.seconds,
                "reference_us": r.reference_seconds.map(|s| s * 1e6),
                "speedup_vs_reference": r.reference_seconds.map(|s| s / r.seconds),
            })
        })
        .collect();
    Ok(
        json!({ "copy_bandwidth_GB_s": copy_bw / 1e9, "bandwidth_baseline": baseline, "kernels": table }),
    )
}

/// The table as aligned text, for people.
pub fn print_kernel_table(v: &Value) {
    println!(
        "bandwidth for the roofline ({}): {:.1} GB/s",
        v["bandwidth_baseline"].as_str().unwrap_or(""),
        v["copy_bandwidth_GB_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<32} {:<44} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "kernel", "shape", "us", "GB/s", "TFLOP/s", "roofline", "vs ref"
    );
    for r in v["kernels"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].as_f64();
        println!(
            "{:<32} {:<44} {:>11.1} {:>9.2} {:>9.4} {:>8.0}% {:>9}",
            r["kernel"].as_str().unwrap_or(""),
            r["shape"].as_str().unwrap_or(""),
            f("us").unwrap_or(0.0),
            f("GB_s").unwrap_or(0.0),
            f("TFLOP_s").unwrap_or(0.0),
            100.0 * f("roofline_fraction").unwrap_or(0.0),
            f("speedup_vs_reference").map_or("-".into(), |s| format!("{s:.1}x")),
        );
    }
}

/// Time to encode one image at each soft-token budget: the whole tower where `full_up_to`
/// allows (budget ≤ it), and always its parts — patch embedding, one encoder layer, pooling and
/// projection — composed as embed + layers × layer + pool (every encoder layer has the same
/// shapes), so the large budgets can be estimated where a full run would take too long.
pub fn vision<B: Gemma4Backend>(
    m: &Model<B>,
    dir: &std::path::Path,
    budgets: &[usize],
    full_up_to: usize,
) -> Result<Value> {
    use gemma4_model::vision::preprocess::{preprocess, ImageProcessorConfig};
    let tower = m
        .vision
        .as_ref()
        .ok_or_else(|| anyhow!("this checkpoint has no vision tower"))?;
    let device = m.text.embed_tokens.device();
    let cfg = ImageProcessorConfig::from_dir(dir).map_err(|e| anyhow!("{e}"))?;
    // A 4:3 photo-sized gradient: every budget resizes it to nearly its full token count.
    let img = image::RgbImage::from_fn(1200, 900, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut rows = Vec::new();
    for &budget in budgets {
        let pre = preprocess(&img, &cfg, budget).map_err(|e| anyhow!("{e}"))?;
        let n = pre.positions.len();
        let pixels = Tensor::<B, 2>::from_data(
            TensorData::new(pre.pixel_values.clone(), [n, pre.pixel_values.len() / n]),
            &device,
        );
        let xs: Vec<usize> = pre.positions.iter().map(|p| p[0] as usize).collect();
        let ys: Vec<usize> = pre.positions.iter().map(|p| p[1] as usize).collect();
        let embed_s = time::<B, _>(&device, 1, || {
            tower.patch_embedder.forward(pixels.clone(), &xs, &ys)
        })?;
        let h = tower.patch_embedder.forward(pixels.clone(), &xs, &ys);
        let (cos, sin) = tower.rope.tables::<B>(&xs, &ys, &device);
        let layer_s = time::<B, _>(&device, 1, || {
            tower.layers[0].forward(h.clone(), &cos, &sin)
        })?;
        let pool_s = time::<B, _>(&device, 1, || {
            tower.embed_vision.forward(tower.pooler.forward(
                h.clone(),
                pre.patches_h,
                pre.patches_w,
            ))
        })?;
        let composed = embed_s + tower.layers.len() as f64 * layer_s + pool_s;
        let full = if budget <= full_up_to {
            Some(time::<B, _>(&device, 1, || m.encode_image(&pre))?)
        } else {
            None
        };
        rows.push(json!({
            "max_soft_tokens": budget,
            "soft_tokens": pre.num_soft_tokens,
            "patches": n,
            "resized": format!("{}x{}", pre.patches_w * 16, pre.patches_h * 16),
            "layer_s": layer_s,
            "estimated_encode_s": composed,
            "measured_encode_s": full,
        }));
    }
    Ok(json!({ "vision_layers": tower.layers.len(), "images": rows }))
}

/// The roofline's bandwidth in bytes/s, measured in this run: on a device, y = x + 1 over
/// 512 MiB; on the host, a plain read of 256 MiB on every core (the tensor library's elementwise
/// ops are far below the memory's speed there).
fn bandwidth<B: Gemma4Backend>(
    device: &B::Device,
    repeats: usize,
    host: bool,
) -> Result<(f64, &'static str)> {
    if host {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        return Ok((
            host_read_bandwidth(256 << 20, threads, 5),
            "host memory read, 256 MiB, all cores",
        ));
    }
    // Eight buffers of 64 MiB: far beyond any L2, each within wgpu's default buffer limit.
    let n = 16 << 20;
    let xs: Vec<Tensor<B, 1>> = (0..8)
        .map(|_| Tensor::<B, 1>::random([n], Distribution::Default, device))
        .collect();
    let copy_s = time::<B, _>(device, repeats, || {
        xs.iter().map(|x| x.clone() + 1.0).collect::<Vec<_>>()
    })?;
    let elem = xs[0].dtype().size();
    Ok((
        (8 * 2 * n * elem) as f64 / copy_s,
        "device copy y = x + 1 over 8 buffers of 16 Mi elements, read + written",
    ))
}

/// Plain memory-read bandwidth of the host in bytes/s (best of `iters` passes, wall time):
/// `threads` threads sum a `bytes` buffer of u64 (use well above the L3 size). The same
/// measurement as the kernels' bench examples (`kernels/examples/common`).
fn host_read_bandwidth(bytes: usize, threads: usize, iters: usize) -> f64 {
    let buf: Vec<u64> = (0..(bytes / 8) as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let part = buf.len().div_ceil(threads.max(1)).max(1);
    let sum = |c: &[u64]| {
        let mut acc = [0u64; 8];
        let mut it = c.chunks_exact(8);
        for ch in &mut it {
            for j in 0..8 {
                acc[j] = acc[j].wrapping_add(ch[j]);
            }
        }
        it.remainder()
            .iter()
            .chain(&acc)
            .fold(0u64, |a, &b| a.wrapping_add(b))
    };
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        let total = std::thread::scope(|sc| {
            let hs: Vec<_> = buf.chunks(part).map(|c| sc.spawn(move || sum(c))).collect();
            hs.into_iter()
                .map(|h| h.join().expect("a summing thread panicked"))
                .fold(0u64, u64::wrapping_add)
        });
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(total);
    }
    (buf.len() * 8) as f64 / best
}

/// `gemma4 bench-sampling`: per batch size, the median over `repeats` of the time to pick one
/// token for each of `batch` random rows, divided by `batch` (µs per sequence-token): greedy,
/// the 31B's generation_config by selection (`sampling::sample`), and the same by the full sort
/// (`sampling::sample_reference`).
pub fn sampling(vocab: usize, batches: &[usize], repeats: usize) -> Value {
    use gemma4_model::sampling::{sample as fast, sample_reference};
    let config = SamplingParams {
        temperature: 1.0,
        top_k: 64,
        top_p: 0.95,
        min_p: 0.0,
        seed: 0,
    };
    let greedy = SamplingParams::greedy();
    let mut rng = Rng::new(1);
    let mut rows_out = vec![];
    for &batch in batches {
        let batch = batch.max(1);
        // Logit rows shaped like a language model's: a normal body with a heavier upper tail.
        let rows: Vec<Vec<f32>> = (0..batch)
            .map(|_| {
                (0..vocab)
                    .map(|_| {
                        let (u, v) = (rng.next_f64().max(1e-300), rng.next_f64());
                        let n = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                        (n * 2.5 + if v < 1e-3 { 8.0 } else { 0.0 }) as f32
                    })
                    .collect()
            })
            .collect();
        let per_token = |f: &dyn Fn(&[f32], &mut Rng) -> u32| {
            let mut times = vec![];
            let mut sink = 0u64;
            for r in 0..repeats {
                let mut draw = Rng::new(r as u64);
                let t = Instant::now();
                for row in &rows {
                    sink = sink.wrapping_add(f(row, &mut draw) as u64);
                }
                times.push(t.elapsed().as_secs_f64() * 1e6 / batch as f64);
            }
            std::hint::black_box(sink);
            median(times)
        };
        let g = per_token(&|row, r| fast(row, &greedy, &[], r));
        let sel = per_token(&|row, r| fast(row, &config, &[], r));
        let sort = per_token(&|row, r| sample_reference(row, &config, &[], r));
        // The engine samples its decoding sequences in parallel on the CPU kernels' threads.
        let mut times = vec![];
        for rep in 0..repeats {
            let mut work: Vec<(usize, &Vec<f32>, u32)> = rows
                .iter()
                .enumerate()
                .map(|(i, row)| (i, row, 0))
                .collect();
            let t = Instant::now();
            for_each_mut(&mut work, |(i, row, id)| {
                *id = fast(row, &config, &[], &mut Rng::new((rep * batch + *i) as u64));
            });
            times.push(t.elapsed().as_secs_f64() * 1e6 / batch as f64);
            std::hint::black_box(work);
        }
        let parallel = median(times);
        rows_out.push(json!({
            "batch": batch,
            "greedy_us": g,
            "generation_config_selection_us": sel,
            "generation_config_full_sort_us": sort,
            "generation_config_selection_parallel_us": parallel,
            "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "speedup": sort / sel,
        }));
    }
    json!({
        "bench": "sampling",
        "vocab": vocab,
        "generation_config": {"temperature": 1.0, "top_k": 64, "top_p": 0.95},
        "unit": "us per sequence-token (median of repeats)",
        "repeats": repeats,
        "rows": rows_out,
    })
}

/// `gemma4 bench-fetch`: what one decode step's sampling moves from the device to the host, per
/// batch size, on random logits `[batch, vocab]` already on the device: the full rows (what the
/// engine copied before) against the device top-k (`Gemma4Backend::top_k_rows`, `2k + 1` words
/// a row) at the 31B's top_k. Median seconds over `repeats`, each ended by the read itself; the
/// bytes are what crosses.
pub fn fetch<B: Gemma4Backend>(
    device: &B::Device,
    vocab: usize,
    batches: &[usize],
    k: usize,
    repeats: usize,
) -> Result<Value> {
    let mut rows_out = vec![];
    for &batch in batches {
        let batch = batch.max(1);
        let logits = Tensor::<B, 2>::random([batch, vocab], Distribution::Normal(0.0, 2.5), device);
        let full = time::<B, _>(device, repeats, || {
            gemma4_model::to_host_f32(logits.clone())
        })?;
        let top = time::<B, _>(device, repeats, || B::top_k_rows(logits.clone(), k))?;
        let full_bytes = batch * vocab * 4;
        let top_bytes = batch * (2 * k + 1) * 4;
        rows_out.push(json!({
            "batch": batch,
            "full_row_bytes": full_bytes,
            "full_row_s": full,
            "top_k_bytes": top_bytes,
            "top_k_s": top,
            "bytes_ratio": full_bytes as f64 / top_bytes as f64,
        }));
    }
    Ok(json!({
        "bench": "fetch",
        "vocab": vocab,
        "k": k,
        "backend": std::any::type_name::<B>(),
        "repeats": repeats,
        "unit": "bytes device->host and median seconds per step",
        "rows": rows_out,
    }))
}

/// The chat `gemma4 bench-prefix` plays: a system prompt, then turns of user tokens each
/// answered by the model.
pub struct Conversation {
    pub system_tokens: usize,
    pub turns: usize,
    pub user_tokens: usize,
    pub answer_tokens: usize,
    pub block_size: usize,
}

/// One turn of a run.
struct Turn {
    ttft_s: f64,
    prompt_tokens: usize,
    cached_tokens: usize,
    answer: Vec<u32>,
}

/// What one run of the conversation measured: its turns, and the engine's prefix cache once
/// its thread has ended.
struct ChatRun {
    turns: Vec<Turn>,
    queries: u64,
    hits: u64,
    cached_blocks: [usize; 2],
}

/// What the bench needs of the model, taken on the engine thread (the model stays there).
struct ModelShape {
    vocab: usize,
    max_len: usize,
    /// Ids random prompts must not contain beyond the control tokens (image, audio, ...).
    reserved: Vec<u32>,
    /// Past the control tokens at the bottom of the vocabulary (up to `<turn|>`, an eos id).
    first_id: u32,
    /// KV bytes of one block of each kind (sliding, full), over all layers of that kind.
    block_bytes: [u64; 2],
    dtype: String,
}

/// `gemma4 bench-prefix`: automatic prefix caching on a multi-turn chat of random ids. The
/// conversation runs twice on the real engine, caching off then on, each on its own engine (a
/// fresh, empty cache); turn k's prompt is the system prompt, every earlier turn's user tokens
/// and answer, and its own user tokens, as a chat client resends them. Per turn: TTFT (submit
/// to the first token) both ways and the tokens the cache served; overall: the hit rate, the
/// TTFT ratio over the turns that can hit (2..), whether greedy answers agree, and what the
/// cache holds at the end.
pub fn prefix<B: Gemma4Backend>(
    dir: &std::path::Path,
    device: B::Device,
    conv: &Conversation,
) -> Result<Value> {
    let (off, shape) = chat::<B>(dir, device.clone(), conv, false)?;
    let (on, _) = chat::<B>(dir, device, conv, true)?;
    let ms = |s: f64| s * 1e3;
    let turns: Vec<Value> = on
        .turns
        .iter()
        .zip(&off.turns)
        .enumerate()
        .map(|(k, (on, off))| {
            json!({
                "turn": k + 1,
                "prompt_tokens": on.prompt_tokens,
                "cached_tokens": on.cached_tokens,
                "ttft_ms_off": ms(off.ttft_s),
                "ttft_ms_on": ms(on.ttft_s),
            })
        })
        .collect();
    let later = |r: &ChatRun| r.turns.iter().skip(1).map(|t| t.ttft_s).sum::<f64>();
    let same_outputs = on
        .turns
        .iter()
        .zip(&off.turns)
        .all(|(a, b)| a.answer == b.answer);
    let cache_bytes: u64 = (0..2)
        .map(|i| on.cached_blocks[i] as u64 * shape.block_bytes[i])
        .sum();
    Ok(json!({
        "bench": "prefix",
        "model": dir.display().to_string(),
        "backend": std::any::type_name::<B>(),
        "dtype": shape.dtype,
        "system_tokens": conv.system_tokens,
        "user_tokens": conv.user_tokens,
        "answer_tokens": conv.answer_tokens,
        "block_size": conv.block_size,
        "turns": turns,
        "prefix_cache_queries": on.queries,
        "prefix_cache_hits": on.hits,
        "hit_rate": on.hits as f64 / on.queries.max(1) as f64,
        "ttft_ratio": later(&off) / later(&on),
        "same_outputs": same_outputs,
        "cache_blocks_end": on.cached_blocks[0] + on.cached_blocks[1],
        "cache_blocks_end_by_kind": {"sliding": on.cached_blocks[0], "full": on.cached_blocks[1]},
        "block_bytes": {"sliding": shape.block_bytes[0], "full": shape.block_bytes[1]},
        "cache_bytes_end": cache_bytes,
    }))
}

/// The conversation on a new engine over a freshly loaded model, turn after turn.
fn chat<B: Gemma4Backend>(
    dir: &std::path::Path,
    device: B::Device,
    conv: &Conversation,
    caching: bool,
) -> Result<(ChatRun, ModelShape)> {
    use gemma4_engine::{BlockBudget, Engine, EngineConfig, EngineEvent, EngineRequest};
    use gemma4_model::cache::kind_index;
    use std::sync::atomic::Ordering;

    let config = EngineConfig {
        // `gemma4 serve`'s defaults.
        max_num_seqs: 16,
        prefill_chunk: 2048,
        max_waiting: 16,
        blocks: BlockBudget {
            num_kv_blocks: None,
            block_size: conv.block_size.max(1),
            prefix_caching: caching,
            ..BlockBudget::default()
        },
    };
    let (shape_tx, shape_rx) = std::sync::mpsc::channel();
    let (dir_owned, block_size) = (dir.to_path_buf(), conv.block_size.max(1));
    let (engine, thread) = Engine::start::<Model<B>, _>(config, move || {
        let m = crate::load::<B>(&dir_owned, &device)?;
        let elem = std::mem::size_of::<B::FloatElem>();
        let mut block_bytes = [0u64; 2];
        for a in m.text.layers.iter().map(|l| &l.self_attn) {
            // K and V.
            block_bytes[kind_index(a.kind())] +=
                (2 * a.num_kv_heads * a.head_dim * elem * block_size) as u64;
        }
        let c = &m.config;
        let reserved = [
            c.image_token_id,
            c.boi_token_id,
            c.eoi_token_id,
            c.video_token_id,
            c.audio_token_id,
        ];
        let controls = c
            .eos_token_ids
            .iter()
            .chain(&c.bos_token_id)
            .chain(&c.pad_token_id);
        let _ = shape_tx.send(ModelShape {
            vocab: m.text.vocab_size,
            max_len: c.text.max_position_embeddings,
            reserved: reserved.into_iter().flatten().collect(),
            first_id: controls.max().map_or(0, |&id| id + 1),
            block_bytes,
            dtype: format!("{:?}", m.text.embed_tokens.val().dtype()),
        });
        Ok(m)
    })?;
    let shape = shape_rx
        .recv()
        .context("the engine did not report the model")?;
    let total = conv.system_tokens + conv.turns * (conv.user_tokens + conv.answer_tokens);
    if total > shape.max_len {
        bail!(
            "the conversation reaches {total} tokens, over the model's {}",
            shape.max_len
        );
    }
    // The same ids on both runs: a fixed seed.
    let mut rng = Rng::new(2026);
    let lo = shape.first_id as u64;
    let hi = (shape.vocab as u64).min(lo + 50_000);
    if hi <= lo + shape.reserved.len() as u64 {
        bail!(
            "the vocabulary ({}) has no ordinary ids to draw",
            shape.vocab
        );
    }
    let mut draw = |n: usize| -> Vec<u32> {
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let id = (lo + rng.next_u64() % (hi - lo)) as u32;
            if !shape.reserved.contains(&id) {
                ids.push(id);
            }
        }
        ids
    };
    let mut prompt = draw(conv.system_tokens);
    let users: Vec<Vec<u32>> = (0..conv.turns).map(|_| draw(conv.user_tokens)).collect();

    let mut turns = Vec::with_capacity(conv.turns);
    for user in users {
        prompt.extend(&user);
        let req = EngineRequest::greedy(prompt.clone(), conv.answer_tokens);
        let start = Instant::now();
        let mut handle = engine.submit(req).map_err(|e| anyhow!("submit: {e}"))?;
        let (mut ttft, mut cached, mut answer) = (None, 0, vec![]);
        while let Some(event) = handle.events.blocking_recv() {
            match event {
                EngineEvent::Admitted { cached_tokens } => cached = cached_tokens,
                EngineEvent::Token { id, .. } => {
                    ttft.get_or_insert_with(|| start.elapsed().as_secs_f64());
                    answer.push(id);
                }
                EngineEvent::Finished { .. } => break,
                EngineEvent::Error(e) => bail!("turn {}: {e}", turns.len() + 1),
            }
        }
        let ttft_s = ttft.ok_or_else(|| anyhow!("turn {}: no token", turns.len() + 1))?;
        prompt.extend(&answer);
        turns.push(Turn {
            ttft_s,
            prompt_tokens: prompt.len() - answer.len(),
            cached_tokens: cached,
            answer,
        });
    }
    // The gauges are stored at the end of each step: once the thread has ended, they hold
    // the last one's.
    engine.shutdown();
    thread
        .join()
        .map_err(|_| anyhow!("the engine thread panicked"))?;
    let s = &engine.stats;
    let run = ChatRun {
        turns,
        queries: s.prefix_cache_queries_total.load(Ordering::SeqCst),
        hits: s.prefix_cache_hits_total.load(Ordering::SeqCst),
        cached_blocks: [0, 1].map(|i| s.kv_blocks_cached[i].load(Ordering::SeqCst)),
    };
    Ok((run, shape))
}
