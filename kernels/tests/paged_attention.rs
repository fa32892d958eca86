//! The paged CubeCL kernels on wgpu (lavapipe here), in f32 and in f16, against the plain Burn
//! reference on NdArray (f32) from the same inputs (for f16 rounded to f16 first):
//! [`paged_attention`] against [`reference::paged_attention`] (which gathers each sequence's keys
//! and runs the contiguous reference), and [`kv_write`] against [`reference::kv_write`].
//!
//! Tolerance of the attention as in `tests/attention.rs`: |Δ| ≤ 1e-4 · max|v| per element, plus
//! in f16 half an ulp of the output, 2^-11 · |out_ref| + 2^-25. The write is a copy: exact.
//!
//! The pools are filled with random values everywhere and every sequence's blocks are drawn from
//! a shuffled free list, so a kernel that read keys from the wrong slots (ignoring the block
//! table, or the block size) would be far off.

use std::ops::Range;

use burn::backend::wgpu::WgpuDevice;
use burn::tensor::{f16, DType, Tensor, TensorData};
use burn_cubecl::FloatElement;
use gemma4_kernels::attention::flash::{
    paged_attention, paged_attention_with_plan, paged_plan, AttentionError, FlashPlan,
};
use gemma4_kernels::attention::kv_write::{kv_write, KvWriteError};
use gemma4_kernels::attention::{reference, AttentionParams, PagedBatch, PagedSeq};
use gemma4_kernels::fallback;
use gemma4_kernels::testing::{dtype, round, Cpu, Gpu, Lcg, F16_ROUNDOFF, F16_SUBNORMAL_HALF_ULP};
use gemma4_kernels::Gemma4Backend;

const TOL: f64 = 1e-4;

fn gpu<F: FloatElement, const D: usize>(
    v: &[f32],
    dims: [usize; D],
    dev: &WgpuDevice,
) -> Tensor<Gpu<F>, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), dims), (dev, dtype::<F>()))
}

fn cpu<const D: usize>(v: &[f32], dims: [usize; D]) -> Tensor<Cpu, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), dims), &Default::default())
}

fn read<F: FloatElement, const D: usize>(t: Tensor<Gpu<F>, D>) -> Vec<f32> {
    let data = t.into_data();
    assert_eq!(data.dtype, dtype::<F>());
    data.convert::<f32>().to_vec::<f32>().unwrap()
}

fn tolerance<F: FloatElement>(v_max: f64, reference: f32) -> f64 {
    let mut tol = TOL * v_max;
    if dtype::<F>() == DType::F16 {
        tol += F16_ROUNDOFF * (reference as f64).abs() + F16_SUBNORMAL_HALF_ULP;
    }
    tol
}

/// Uniform in [-amp, amp).
fn random(rng: &mut Lcg, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * amp).collect()
}

/// Uniform in 0..n.
fn pick(rng: &mut Lcg, n: usize) -> usize {
    (rng.next_u32() as usize) % n.max(1)
}

/// A pool's shape and the batch's scaling.
struct Config {
    heads: usize,
    kv_heads: usize,
    d: usize,
    block_size: usize,
    num_blocks: usize,
    scale: f32,
    softcap: Option<f32>,
}

/// A random ragged batch over a pool of `c.num_blocks` blocks handed out from a shuffled free
/// list: decode rows (t = 1) and prefill chunks with a cache before them, fresh prompts, windows
/// whose table starts mid-sequence (k_start > 0 at a block boundary), bidirectional spans, a
/// non-causal sequence, a sequence without keys and one without rows.
fn random_batch(rng: &mut Lcg, c: &Config, n_seqs: usize) -> PagedBatch {
    let bs = c.block_size;
    let mut free: Vec<u32> = (0..c.num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, pick(rng, i + 1));
    }
    let mut seqs = Vec::new();
    let mut rows = 0;
    for n in 0..n_seqs {
        let kind = if n == 0 { 0 } else { pick(rng, 7) };
        let (t, before) = match kind {
            0 | 1 => (1, pick(rng, 80)),                 // decode
            2 | 3 => (1 + pick(rng, 40), pick(rng, 60)), // prefill chunk after a cache
            4 => (1 + pick(rng, 30), 0),                 // fresh prompt
            5 => (1 + pick(rng, 20), pick(rng, 30)),     // non-causal
            _ => (2, 0),                                 // no keys, or no rows
        };
        let window = [None, Some(8), Some(24)][pick(rng, 3)];
        let mut params = match kind {
            5 => AttentionParams {
                q_start: before,
                ..AttentionParams::bidirectional()
            },
            _ => {
                // With a window the table may begin at a later block.
                let k_start = match window {
                    Some(w) => (before.saturating_sub(w) / bs) * bs,
                    None => 0,
                };
                AttentionParams::causal(before, k_start, window)
            }
        };
        params.scale = c.scale;
        params.softcap = c.softcap;
        if kind != 5 && t > 6 && pick(rng, 2) == 0 {
            params.bidirectional = vec![before + 2..before + 6, before + t - 2..before + t + 3];
        }
        let (t, keys) = match kind {
            6 if pick(rng, 2) == 0 => (2, 0), // keys 0: zero rows
            6 => (0, 5 + pick(rng, 20)),      // no rows: contributes nothing
            _ => (t, before + t - params.k_start),
        };
        let n_blocks = keys.div_ceil(bs) + pick(rng, 2); // sometimes a spare block
        if free.len() < n_blocks {
            break;
        }
        let blocks = free.split_off(free.len() - n_blocks);
        seqs.push(PagedSeq {
            rows: rows..rows + t,
            params,
            keys,
            blocks,
        });
        rows += t;
    }
    PagedBatch {
        block_size: bs,
        seqs,
    }
}

fn describe(b: &PagedBatch) -> Vec<(Range<usize>, usize, usize, usize)> {
    b.seqs
        .iter()
        .map(|s| (s.rows.clone(), s.params.q_start, s.params.k_start, s.keys))
        .collect()
}

/// Runs `batch` with the automatic plan and with one taking the other path (split-K vs direct)
/// and another row tile, into NaN-poisoned outputs; returns the largest |Δ| / max|v|.
#[allow(clippy::too_many_arguments)]
fn check_batch<F: FloatElement>(
    name: &str,
    dev: &WgpuDevice,
    c: &Config,
    batch: &PagedBatch,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    force_split: bool,
) -> f64 {
    let rows = batch.rows();
    let slots = c.num_blocks * c.block_size;
    let (qd, pd) = ([rows, c.heads, c.d], [c.kv_heads, slots, c.d]);
    let v_max = v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
    let expected: Vec<f32> = reference::paged_attention(cpu(q, qd), cpu(k, pd), cpu(v, pd), batch)
        .into_data()
        .to_vec()
        .unwrap();
    let auto = paged_plan(batch, c.heads, c.kv_heads);
    if force_split {
        assert!(auto.splits > 1, "{name}: expected split-K, plan {auto:?}");
    }
    let other = FlashPlan {
        rows_per_cube: if auto.rows_per_cube == 16 { 4 } else { 16 },
        splits: if auto.splits > 1 { 1 } else { 3 },
    };
    let mut worst = 0f64;
    for (label, pl) in [("auto", auto), ("other", other)] {
        let poisoned =
            Tensor::<Gpu<F>, 2>::full([rows, c.heads * c.d], f32::NAN, (dev, dtype::<F>()));
        let got = paged_attention_with_plan(
            gpu::<F, 3>(q, qd, dev),
            gpu::<F, 3>(k, pd, dev),
            gpu::<F, 3>(v, pd, dev),
            batch,
            pl,
            Some(poisoned),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.dims(), [rows, c.heads * c.d], "{name}");
        let got = read(got);
        let mut max_err = 0f64;
        for (idx, (g, e)) in got.iter().zip(&expected).enumerate() {
            let diff = (*g as f64 - *e as f64).abs();
            let tol = tolerance::<F>(v_max, *e);
            assert!(
                g.is_finite() && diff <= tol,
                "{name} {:?} ({label} plan {pl:?}): out[{}, {}] = {g} vs reference {e} \
                 (|Δ| {diff:e} > {tol:e}); sequences (rows, q_start, k_start, keys) {:?}",
                dtype::<F>(),
                idx / (c.heads * c.d),
                idx % (c.heads * c.d),
                describe(batch),
            );
            max_err = max_err.max(diff);
        }
        eprintln!(
            "paged_attention {:?} {name:<34} {label:<5} rows/cube {:>2} splits {:>3}: max |Δ| = {max_err:.2e}, / max|v| = {:.2e}",
            dtype::<F>(),
            pl.rows_per_cube,
            pl.splits,
            max_err / v_max
        );
        worst = worst.max(max_err / v_max);
    }
    worst
}

/// Random ragged batches on shuffled block layouts, over GQA groups 1/2/8, head dims
/// 32/64/72/256/512 and block sizes 16, 7, 5, 12, 1 (small key counts: lavapipe is slow).
#[allow(clippy::single_range_in_vec_init)]
fn random_batches<F: FloatElement>() {
    let dev = WgpuDevice::default();
    let f16 = dtype::<F>() == DType::F16;
    let configs = [
        ("g2_d32_bs16", 4, 2, 32, 16, 24, 1.0, None),
        ("g8_d64_bs7_scale_softcap", 8, 1, 64, 7, 64, 0.5, Some(5.0)),
        ("g1_d256_bs5", 2, 2, 256, 5, 80, 1.0, None),
        ("g8_d512_bs16", 8, 1, 512, 16, 24, 1.0, None),
        ("g1_d72_bs12", 3, 3, 72, 12, 40, 1.0, None),
        ("g2_d64_bs1", 4, 2, 64, 1, 400, 1.0, None),
    ];
    let start = std::time::Instant::now();
    let mut worst = 0f64;
    for (n, &(name, heads, kv_heads, d, block_size, num_blocks, scale, softcap)) in
        configs.iter().enumerate()
    {
        let c = Config {
            heads,
            kv_heads,
            d,
            block_size,
            num_blocks,
            scale,
            softcap,
        };
        let mut rng = Lcg::new(4000 + n as u64 + if f16 { 100 } else { 0 });
        let batch = random_batch(&mut rng, &c, 5);
        let slots = num_blocks * block_size;
        let q = round::<F>(&random(&mut rng, batch.rows() * heads * d, 1.0));
        let k = round::<F>(&random(&mut rng, kv_heads * slots * d, 1.0));
        let v = round::<F>(&random(&mut rng, kv_heads * slots * d, 1.5));
        worst = worst.max(check_batch::<F>(name, &dev, &c, &batch, &q, &k, &v, false));
    }
    // Two prefill chunks with their own spans (each sequence reads its own, not the first's),
    // after a decode row, on shuffled blocks of 16 (blocks 9, 2, 7, ...).
    let c = Config {
        heads: 4,
        kv_heads: 2,
        d: 64,
        block_size: 16,
        num_blocks: 12,
        scale: 1.0,
        softcap: None,
    };
    let chunk = |rows: Range<usize>, before: usize, spans: Vec<Range<usize>>, blocks: Vec<u32>| {
        let t = rows.len();
        PagedSeq {
            rows,
            params: AttentionParams {
                bidirectional: spans,
                ..AttentionParams::causal(before, 0, None)
            },
            keys: before + t,
            blocks,
        }
    };
    let batch = PagedBatch {
        block_size: 16,
        seqs: vec![
            chunk(0..1, 20, vec![], vec![9, 2]),
            chunk(1..21, 10, vec![12..16, 22..28], vec![7, 0]),
            chunk(21..41, 30, vec![33..50], vec![11, 4, 5, 1]),
        ],
    };
    let mut rng = Lcg::new(4100 + if f16 { 100 } else { 0 });
    let slots = c.num_blocks * c.block_size;
    let q = round::<F>(&random(&mut rng, batch.rows() * c.heads * c.d, 1.0));
    let k = round::<F>(&random(&mut rng, c.kv_heads * slots * c.d, 1.0));
    let v = round::<F>(&random(&mut rng, c.kv_heads * slots * c.d, 1.5));
    let name = "spans_in_two_sequences_g2_d64_bs16";
    worst = worst.max(check_batch::<F>(name, &dev, &c, &batch, &q, &k, &v, false));
    eprintln!(
        "paged_attention {:?} random batches: max |Δ|/max|v| = {worst:.2e}; took {:.1} s",
        dtype::<F>(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn paged_matches_reference_on_random_batches_f32() {
    random_batches::<f32>();
}

#[test]
fn paged_matches_reference_on_random_batches_f16() {
    random_batches::<f16>();
}

/// A decode batch (t = 1 per sequence, hundreds of keys) takes split-K; through the backend
/// trait as well, which counts the launch.
fn decode_batch_splits<F: FloatElement>() {
    let dev = WgpuDevice::default();
    let c = Config {
        heads: 8,
        kv_heads: 2,
        d: 256,
        block_size: 16,
        num_blocks: 160,
        scale: 1.0,
        softcap: None,
    };
    let mut rng = Lcg::new(77);
    let mut free: Vec<u32> = (0..c.num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, pick(&mut rng, i + 1));
    }
    let mut seqs = Vec::new();
    for (i, (before, window)) in [(700usize, None), (1100, Some(1024)), (300, None)]
        .into_iter()
        .enumerate()
    {
        let keys = before + 1;
        seqs.push(PagedSeq {
            rows: i..i + 1,
            params: AttentionParams::causal(before, 0, window),
            keys,
            blocks: free.split_off(free.len() - keys.div_ceil(c.block_size)),
        });
    }
    let batch = PagedBatch {
        block_size: c.block_size,
        seqs,
    };
    let slots = c.num_blocks * c.block_size;
    let q = round::<F>(&random(&mut rng, 3 * c.heads * c.d, 1.0));
    let k = round::<F>(&random(&mut rng, c.kv_heads * slots * c.d, 1.0));
    let v = round::<F>(&random(&mut rng, c.kv_heads * slots * c.d, 1.0));
    check_batch::<F>(
        "decode_3seqs_d256_g4_bs16",
        &dev,
        &c,
        &batch,
        &q,
        &k,
        &v,
        true,
    );

    // The backend's entry point runs the kernel (Strict policy: a refusal would panic).
    let before = fallback::launches("paged_attention");
    let (qd, pd) = ([3, c.heads, c.d], [c.kv_heads, slots, c.d]);
    let got = read(<Gpu<F> as Gemma4Backend>::paged_attention(
        gpu::<F, 3>(&q, qd, &dev),
        gpu::<F, 3>(&k, pd, &dev),
        gpu::<F, 3>(&v, pd, &dev),
        &batch,
    ));
    let direct = read(
        paged_attention(
            gpu::<F, 3>(&q, qd, &dev),
            gpu::<F, 3>(&k, pd, &dev),
            gpu::<F, 3>(&v, pd, &dev),
            &batch,
        )
        .unwrap(),
    );
    assert_eq!(got, direct);
    assert!(fallback::launches("paged_attention") > before);
    assert_eq!(fallback::fallbacks("paged_attention"), 0);
}

#[test]
fn paged_decode_batch_takes_split_k_f32() {
    decode_batch_splits::<f32>();
}

#[test]
fn paged_decode_batch_takes_split_k_f16() {
    decode_batch_splits::<f16>();
}

/// The scatter against the reference: shuffled slots, an exclusively owned pool (written in
/// place) and a shared one (copied first: the other handle keeps the old contents).
fn kv_write_case<F: FloatElement>() {
    let dev = WgpuDevice::default();
    for (n, &(kv_heads, d, slots, rows)) in [
        (2usize, 64usize, 100usize, 37usize),
        (1, 512, 40, 1),
        (4, 72, 300, 130),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Lcg::new(500 + n as u64);
        let mut order: Vec<u32> = (0..slots as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, pick(&mut rng, i + 1));
        }
        let at = &order[..rows];
        let pool = round::<F>(&random(&mut rng, kv_heads * slots * d, 1.0));
        let new = round::<F>(&random(&mut rng, rows * kv_heads * d, 1.0));
        let (pd, nd) = ([kv_heads, slots, d], [rows, kv_heads, d]);
        let expected: Vec<f32> = reference::kv_write(cpu(&pool, pd), cpu(&new, nd), at)
            .into_data()
            .to_vec()
            .unwrap();

        let before = fallback::launches("kv_write");
        let owned = <Gpu<F> as Gemma4Backend>::kv_write(
            gpu::<F, 3>(&pool, pd, &dev),
            gpu::<F, 3>(&new, nd, &dev),
            at,
        );
        assert_eq!(
            read(owned),
            expected,
            "kv_write {kv_heads}x{slots}x{d}, {rows} rows"
        );
        // Counters are process-wide (the f16 test may launch at the same time): at least this one.
        assert!(fallback::launches("kv_write") > before);

        let shared = gpu::<F, 3>(&pool, pd, &dev);
        let written = kv_write(shared.clone(), gpu::<F, 3>(&new, nd, &dev), at).unwrap();
        assert_eq!(read(written), expected, "kv_write into a shared pool");
        assert_eq!(
            read(shared),
            pool,
            "the other handle of a shared pool is untouched"
        );
    }
}

#[test]
fn kv_write_matches_reference_f32() {
    kv_write_case::<f32>();
}

#[test]
fn kv_write_matches_reference_f16() {
    kv_write_case::<f16>();
}

/// The flash kernel over fp8 pools (decoding while staging K/V) against the reference (gather,
/// dequantize with tensor ops, attend) on the same words: the decoded values are the same f32
/// numbers on both sides (code value times scale, one rounding), so the float tolerance holds.
/// Random ragged batches as above, and a decode batch long enough for split-K.
fn fp8_batches<F: FloatElement>() {
    use burn::tensor::Int;
    use gemma4_kernels::attention::fp8::{self, KvScales};
    let dev = WgpuDevice::default();
    let f16 = dtype::<F>() == DType::F16;
    let configs = [
        ("g2_d32_bs16", 4, 2, 32, 16, 24, 1.0, None, 5),
        (
            "g8_d64_bs7_scale_softcap",
            8,
            1,
            64,
            7,
            64,
            0.5,
            Some(5.0),
            5,
        ),
        ("g1_d256_bs5", 2, 2, 256, 5, 80, 1.0, None, 5),
        ("g2_d64_bs16_decode", 4, 2, 64, 16, 96, 1.0, None, 1),
    ];
    let scales = KvScales { k: 0.004, v: 0.01 };
    for (n, &(name, heads, kv_heads, d, block_size, num_blocks, scale, softcap, n_seqs)) in
        configs.iter().enumerate()
    {
        let c = Config {
            heads,
            kv_heads,
            d,
            block_size,
            num_blocks,
            scale,
            softcap,
        };
        let mut rng = Lcg::new(6000 + n as u64 + if f16 { 100 } else { 0 });
        let mut batch = random_batch(&mut rng, &c, n_seqs);
        if n_seqs == 1 {
            // One decode row over all of the pool's blocks but one: split-K.
            let keys = (num_blocks - 1) * block_size;
            batch = PagedBatch {
                block_size,
                seqs: vec![PagedSeq {
                    rows: 0..1,
                    params: AttentionParams::causal(keys - 1, 0, None),
                    keys,
                    blocks: (0..num_blocks as u32 - 1).rev().collect(),
                }],
            };
        }
        let slots = num_blocks * block_size;
        let q = round::<F>(&random(&mut rng, batch.rows() * heads * d, 1.0));
        let k = random(&mut rng, kv_heads * slots * d, 1.0);
        let v = random(&mut rng, kv_heads * slots * d, 1.5);
        let (pd, wd) = ([kv_heads, slots, d], [kv_heads, slots, d / 4]);
        let words = |x: &[f32], s: f32| -> Vec<i32> {
            fp8::quantize(cpu(x, pd), s).into_data().to_vec().unwrap()
        };
        let (kw, vw) = (words(&k, scales.k), words(&v, scales.v));
        let int_cpu = |w: &[i32]| {
            Tensor::<Cpu, 3, Int>::from_data(TensorData::new(w.to_vec(), wd), &Default::default())
        };
        let int_gpu =
            |w: &[i32]| Tensor::<Gpu<F>, 3, Int>::from_data(TensorData::new(w.to_vec(), wd), &dev);
        let qd = [batch.rows(), heads, d];
        let expected: Vec<f32> =
            reference::paged_attention_fp8(cpu(&q, qd), int_cpu(&kw), int_cpu(&vw), scales, &batch)
                .into_data()
                .to_vec()
                .unwrap();
        let before = fallback::launches("paged_attention_fp8");
        let got = read(<Gpu<F> as Gemma4Backend>::paged_attention_fp8(
            gpu::<F, 3>(&q, qd, &dev),
            int_gpu(&kw),
            int_gpu(&vw),
            scales,
            &batch,
        ));
        assert!(fallback::launches("paged_attention_fp8") > before);
        let v_max = 1.5f64;
        let mut max_err = 0f64;
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            let diff = (*g as f64 - *e as f64).abs();
            assert!(
                diff <= tolerance::<F>(v_max, *e),
                "fp8 {name} {:?}: element {i}: {g} vs {e}",
                dtype::<F>()
            );
            max_err = max_err.max(diff);
        }
        eprintln!(
            "paged_attention_fp8 {:?} {name:<26} splits {:>3}: max |Δ| vs reference = {max_err:.2e}",
            dtype::<F>(),
            paged_plan(&batch, heads, kv_heads).splits
        );
    }
}

#[test]
fn paged_fp8_matches_reference_f32() {
    fp8_batches::<f32>();
}

#[test]
fn paged_fp8_matches_reference_f16() {
    fp8_batches::<f16>();
}

/// The fp8 scatter (quantize, pack, write) against the reference (scalar codec, slice_assign):
/// the same words exactly. Values spread over E4M3's whole range after the scale (subnormals to
/// past 448, saturating), plus a row of hand-checked values: ties, subnormals, saturation.
fn kv_write_fp8_case<F: FloatElement>() {
    use gemma4_kernels::attention::fp8;
    let dev = WgpuDevice::default();
    for (n, &(kv_heads, d, slots, rows, scale)) in [
        (2usize, 64usize, 100usize, 37usize, 0.01f32),
        (1, 512, 40, 1, 1.0),
        (4, 72, 300, 130, 0.004),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Lcg::new(800 + n as u64);
        let mut order: Vec<u32> = (0..slots as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, pick(&mut rng, i + 1));
        }
        let at = &order[..rows];
        let pool: Vec<i32> = (0..kv_heads * slots * d / 4)
            .map(|_| rng.next_u32() as i32)
            .collect();
        // |x| / scale spread log-uniformly over 2^-12 .. 2^10.
        let mut new: Vec<f32> = (0..rows * kv_heads * d)
            .map(|_| {
                let mag = 2f32.powf(rng.next_f32() * 22.0 - 12.0) * scale;
                if rng.next_u32() & 1 == 0 {
                    mag
                } else {
                    -mag
                }
            })
            .collect();
        // Row 0: hand-checked codes (see fp8::tests), times the scale.
        let hand = [
            1.0625f32,
            1.1875,
            432.0,
            424.0,
            248.0,
            464.0,
            1e6,
            -448.0,
            0.0625,
            0.015625,
            0.001953125,
            0.0029296875,
            0.0048828125,
            0.0146484375,
            1e-4,
            -1.0,
        ];
        for (x, h) in new.iter_mut().zip(hand) {
            *x = h * scale;
        }
        let new = round::<F>(&new);
        let (pd, nd) = ([kv_heads, slots, d / 4], [rows, kv_heads, d]);
        let pool_cpu = || {
            Tensor::<Cpu, 3, burn::tensor::Int>::from_data(
                TensorData::new(pool.clone(), pd),
                &Default::default(),
            )
        };
        let expected: Vec<i32> = fp8::kv_write(pool_cpu(), cpu(&new, nd), at, scale)
            .into_data()
            .to_vec()
            .unwrap();
        let before = fallback::launches("kv_write_fp8");
        let pool_gpu = Tensor::<Gpu<F>, 3, burn::tensor::Int>::from_data(
            TensorData::new(pool.clone(), pd),
            &dev,
        );
        let got = <Gpu<F> as Gemma4Backend>::kv_write_fp8(
            pool_gpu,
            gpu::<F, 3>(&new, nd, &dev),
            at,
            scale,
        )
        .into_data()
        .convert::<i32>()
        .to_vec::<i32>()
        .unwrap();
        let diff = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(
            diff, 0,
            "kv_write_fp8 {kv_heads}x{slots}x{d}, {rows} rows: {diff} words differ"
        );
        assert!(fallback::launches("kv_write_fp8") > before);
    }
}

#[test]
fn kv_write_fp8_matches_reference_f32() {
    kv_write_fp8_case::<f32>();
}

#[test]
fn kv_write_fp8_matches_reference_f16() {
    kv_write_fp8_case::<f16>();
}

#[test]
fn refusals_come_before_any_launch() {
    let dev = WgpuDevice::default();
    let x = |a: usize, b: usize, c: usize| Tensor::<Gpu, 3>::zeros([a, b, c], (&dev, DType::F32));
    let seq = |rows: Range<usize>, keys: usize, blocks: Vec<u32>| PagedSeq {
        rows,
        params: AttentionParams::causal(keys.saturating_sub(1), 0, None),
        keys,
        blocks,
    };
    let batch = |seqs| PagedBatch {
        block_size: 4,
        seqs,
    };
    let call = |q, b: &PagedBatch| paged_attention(q, x(2, 16, 32), x(2, 16, 32), b).map(|_| ());

    // q rows that the batch does not account for, a table too short, a block past the pool.
    let err = call(x(3, 2, 32), &batch(vec![seq(0..2, 3, vec![0])])).unwrap_err();
    assert!(
        matches!(err, AttentionError::Batch(ref m) if m.contains('3')),
        "{err}"
    );
    let err = call(x(1, 2, 32), &batch(vec![seq(0..1, 9, vec![0, 1])])).unwrap_err();
    assert!(matches!(err, AttentionError::Batch(_)), "{err}");
    let err = call(x(1, 2, 32), &batch(vec![seq(0..1, 3, vec![4])])).unwrap_err();
    assert!(
        matches!(err, AttentionError::Batch(ref m) if m.contains("past")),
        "{err}"
    );
    // Sequences with different scaling.
    let mut other = seq(1..2, 3, vec![1]);
    other.params.scale = 0.5;
    let err = call(x(2, 2, 32), &batch(vec![seq(0..1, 3, vec![0]), other])).unwrap_err();
    assert!(matches!(err, AttentionError::Plan(_)), "{err}");
    // The contiguous kernel's refusals hold per sequence.
    let mut spans = seq(0..1, 3, vec![0]);
    spans.params.bidirectional = (0..65).map(|i| 2 * i..2 * i + 1).collect();
    assert_eq!(
        call(x(1, 2, 32), &batch(vec![spans])).unwrap_err(),
        AttentionError::Spans { spans: 65, max: 64 }
    );
    assert_eq!(
        call(x(1, 3, 32), &batch(vec![seq(0..1, 3, vec![0])])).unwrap_err(),
        AttentionError::Groups {
            heads: 3,
            kv_heads: 2
        }
    );

    // kv_write: shapes, slot count, slots past the pool, a slot twice.
    let pool = || x(2, 16, 32);
    let err = kv_write(pool(), x(2, 2, 16), &[0, 1]).unwrap_err();
    assert!(matches!(err, KvWriteError::Shape { .. }), "{err}");
    let err = kv_write(pool(), x(2, 2, 32), &[0]).unwrap_err();
    assert_eq!(err, KvWriteError::Slots { rows: 2, slots: 1 });
    let err = kv_write(pool(), x(2, 2, 32), &[0, 16]).unwrap_err();
    assert_eq!(
        err,
        KvWriteError::PastPool {
            slot: 16,
            slots: 16
        }
    );
    let err = kv_write(pool(), x(2, 2, 32), &[5, 5]).unwrap_err();
    assert_eq!(err, KvWriteError::Duplicate(5));
}
