//! Fused attention kernels on wgpu (lavapipe here), in f32 and in f16, against the plain Burn
//! reference on NdArray (f32) from the same inputs (for f16, q, k, v rounded to f16 first).
//!
//! Tolerance: max |Δ| ≤ 1e-4 · max|v| (the output is a convex combination of v rows, so max|v|
//! is the output's scale). In f16 the kernel widens q, k, v to f32 as it stages them and runs the
//! dot products, the online softmax and P·V in f32 as in the f32 run, then rounds the output to
//! f16 once: at most half an ulp, 2^-11 · |out| (f16 has 11 significant bits), or 2^-25 absolute
//! in f16's subnormal range; so per element |Δ| ≤ 1e-4 · max|v| + 2^-11 · |out_ref| + 2^-25.
//! Every case runs with the automatic plan and with a second plan that takes the other path
//! (split-K vs direct) and another row tile, into a NaN-poisoned output.

use burn::backend::wgpu::WgpuDevice;
use burn::tensor::{f16, DType, Tensor, TensorData};
use burn_cubecl::FloatElement;
use gemma4_kernels::attention::flash::{
    fused_attention, fused_attention_with_plan, plan, AttentionError, FlashPlan,
};
use gemma4_kernels::attention::{reference, AttentionParams};
use gemma4_kernels::testing::{dtype, round, Cpu, Gpu, Lcg, F16_ROUNDOFF, F16_SUBNORMAL_HALF_ULP};

const TOL: f64 = 1e-4;

/// `v` as a `Gpu<F>` tensor. F's dtype is given explicitly: the device's default float dtype is
/// whichever backend touched it first (f32 and f16 share it here).
fn gpu<F: FloatElement, const D: usize>(
    v: &[f32],
    dims: [usize; D],
    dev: &WgpuDevice,
) -> Tensor<Gpu<F>, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), dims), (dev, dtype::<F>()))
}

/// A kernel output widened to f32 (and checked to be F).
fn read<F: FloatElement, const D: usize>(t: Tensor<Gpu<F>, D>) -> Vec<f32> {
    let data = t.into_data();
    assert_eq!(data.dtype, dtype::<F>());
    data.convert::<f32>().to_vec::<f32>().unwrap()
}

/// The per-element tolerance of the module docs for F.
fn tolerance<F: FloatElement>(v_max: f64, reference: f32) -> f64 {
    let mut tol = TOL * v_max;
    if dtype::<F>() == DType::F16 {
        tol += F16_ROUNDOFF * (reference as f64).abs() + F16_SUBNORMAL_HALF_ULP;
    }
    tol
}

struct Case {
    name: &'static str,
    t: usize,
    s: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    q_start: usize,
    k_start: usize,
    causal: bool,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    spans: Vec<std::ops::Range<usize>>,
}

/// Causal text: the cache (s - t keys) sits right before the t queries.
#[allow(clippy::too_many_arguments)]
fn text(
    name: &'static str,
    t: usize,
    s: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    k_start: usize,
    window: Option<usize>,
) -> Case {
    Case {
        name,
        t,
        s,
        heads,
        kv_heads,
        d,
        q_start: k_start + s - t,
        k_start,
        causal: true,
        window,
        scale: 1.0,
        softcap: None,
        spans: Vec::new(),
    }
}

fn vision(name: &'static str, t: usize, heads: usize, d: usize) -> Case {
    Case {
        name,
        t,
        s: t,
        heads,
        kv_heads: heads,
        d,
        q_start: 0,
        k_start: 0,
        causal: false,
        window: None,
        scale: 1.0,
        softcap: None,
        spans: Vec::new(),
    }
}

#[allow(clippy::single_range_in_vec_init)]
fn cases() -> Vec<Case> {
    let with = |mut c: Case, scale: f32, softcap: Option<f32>| {
        c.scale = scale;
        c.softcap = softcap;
        c
    };
    let spans = |mut c: Case, spans: Vec<std::ops::Range<usize>>| {
        c.spans = spans;
        c
    };
    vec![
        // Decode, t = 1: split-K over the keys.
        text("decode_s1_d256_g2_w1024", 1, 1, 4, 2, 256, 0, Some(1024)),
        text("decode_s17_d64_g8", 1, 17, 8, 1, 64, 0, None),
        text(
            "decode_s1024_d256_g2_w1024_kstart500",
            1,
            1024,
            4,
            2,
            256,
            500,
            Some(1024),
        ),
        text(
            "decode_s1500_d256_g2_w1024_beyond_window",
            1,
            1500,
            4,
            2,
            256,
            0,
            Some(1024),
        ),
        text("decode_s1500_d512_g8_full", 1, 1500, 16, 2, 512, 0, None),
        with(
            text(
                "decode_s1500_d32_g1_softcap_scale",
                1,
                1500,
                2,
                2,
                32,
                3,
                None,
            ),
            0.3,
            Some(5.0),
        ),
        text("decode_s17_d72_g1", 1, 17, 3, 3, 72, 0, Some(16)),
        // Short multi-token decode (speculative), GQA 8 at d = 512.
        text("decode_t4_s1024_d512_g8", 4, 1024, 8, 1, 512, 0, None),
        // Prefill, cache before the queries.
        text("prefill_t1_s40_d72_g1", 1, 40, 2, 2, 72, 0, None),
        text("prefill_t5_s5_d64_g2_w16", 5, 5, 4, 2, 64, 0, Some(16)),
        text("prefill_t5_s69_d256_g2_w16", 5, 69, 4, 2, 256, 0, Some(16)),
        with(
            text("prefill_t33_s33_d32_g1_softcap", 33, 33, 2, 2, 32, 0, None),
            1.0,
            Some(3.0),
        ),
        with(
            text(
                "prefill_t33_s100_d512_g8_kstart37",
                33,
                100,
                8,
                1,
                512,
                37,
                None,
            ),
            0.044,
            None,
        ),
        text(
            "prefill_t130_s130_d256_g2_w16",
            130,
            130,
            4,
            2,
            256,
            0,
            Some(16),
        ),
        text(
            "prefill_t130_s300_d256_g2_w1024",
            130,
            300,
            4,
            2,
            256,
            11,
            Some(1024),
        ),
        text("prefill_t130_s130_d512_g8", 130, 130, 8, 1, 512, 0, None),
        with(
            text(
                "prefill_t130_s200_d64_g8_scale2_softcap30",
                130,
                200,
                8,
                1,
                64,
                5,
                Some(64),
            ),
            2.0,
            Some(30.0),
        ),
        // Non-causal (vision encoder).
        with(vision("vision_t130_d72_g1", 130, 4, 72), 0.125, None),
        with(
            vision("vision_t33_d64_g1_softcap", 33, 2, 64),
            1.0,
            Some(2.0),
        ),
        // Non-causal with a window (it bounds the past only).
        Case {
            name: "noncausal_window16_t33_s50_d32_g2",
            t: 33,
            s: 50,
            heads: 4,
            kv_heads: 2,
            d: 32,
            q_start: 10,
            k_start: 0,
            causal: false,
            window: Some(16),
            scale: 0.5,
            softcap: None,
            spans: Vec::new(),
        },
        // Bidirectional spans (image soft tokens): queries in a span also see its later keys.
        spans(
            text(
                "span_prefill_t130_s130_d256_g2_w16",
                130,
                130,
                4,
                2,
                256,
                0,
                Some(16),
            ),
            vec![20..84],
        ),
        spans(
            text(
                "spans_prefill_t33_s100_d512_g8_kstart37",
                33,
                100,
                8,
                1,
                512,
                37,
                None,
            ),
            vec![70..80, 90..130, 135..136],
        ),
        spans(
            text(
                "span_prefill_t5_s40_d72_g1_w1024",
                5,
                40,
                2,
                2,
                72,
                0,
                Some(1024),
            ),
            vec![36..40],
        ),
    ]
}

fn params(c: &Case) -> AttentionParams {
    AttentionParams {
        q_start: c.q_start,
        k_start: c.k_start,
        causal: c.causal,
        window: c.window,
        scale: c.scale,
        softcap: c.softcap,
        bidirectional: c.spans.clone(),
    }
}

/// Uniform in [-amp, amp).
fn random(rng: &mut Lcg, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * amp).collect()
}

/// Every case of [`cases`] in F; returns the largest |Δ| and |Δ| / max|v| over the grid.
fn shape_grid<F: FloatElement>() -> (f64, f64) {
    let gpu_dev = WgpuDevice::default();
    let cpu = Default::default();
    let f16 = dtype::<F>() == DType::F16;
    let start = std::time::Instant::now();
    let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
    for (n, c) in cases().iter().enumerate() {
        let mut rng = Lcg::new(1000 + n as u64 + if f16 { 500 } else { 0 });
        let q = round::<F>(&random(&mut rng, c.t * c.heads * c.d, 1.0));
        let k = round::<F>(&random(&mut rng, c.kv_heads * c.s * c.d, 1.0));
        let v = round::<F>(&random(&mut rng, c.kv_heads * c.s * c.d, 1.5));
        let v_max = v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
        let p = params(c);
        let qd = [c.t, c.heads, c.d];
        let kd = [c.kv_heads, c.s, c.d];

        let expected = reference::attention(
            Tensor::<Cpu, 3>::from_data(TensorData::new(q.clone(), qd), &cpu),
            Tensor::<Cpu, 3>::from_data(TensorData::new(k.clone(), kd), &cpu),
            Tensor::<Cpu, 3>::from_data(TensorData::new(v.clone(), kd), &cpu),
            &p,
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();

        let auto = plan(c.t, c.heads, c.kv_heads, c.s, &p);
        let other = FlashPlan {
            rows_per_cube: if auto.rows_per_cube == 16 { 8 } else { 16 },
            splits: if auto.splits > 1 { 1 } else { 3 },
        };
        for (label, pl) in [("auto", auto), ("other", other)] {
            let poisoned =
                Tensor::<Gpu<F>, 2>::full([c.t, c.heads * c.d], f32::NAN, (&gpu_dev, dtype::<F>()));
            let got = fused_attention_with_plan(
                gpu::<F, 3>(&q, qd, &gpu_dev),
                gpu::<F, 3>(&k, kd, &gpu_dev),
                gpu::<F, 3>(&v, kd, &gpu_dev),
                &p,
                pl,
                Some(poisoned),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert_eq!(got.dims(), [c.t, c.heads * c.d], "{}", c.name);
            let got = read(got);
            let mut max_err = 0f64;
            for (idx, (g, e)) in got.iter().zip(&expected).enumerate() {
                let d = (*g as f64 - *e as f64).abs();
                let tol = tolerance::<F>(v_max, *e);
                assert!(
                    g.is_finite() && d <= tol,
                    "{} {:?} ({label} plan {pl:?}): out[{}, {}] = {g} vs reference {e} (|Δ| {d:e} > {tol:e})",
                    c.name,
                    dtype::<F>(),
                    idx / (c.heads * c.d),
                    idx % (c.heads * c.d),
                );
                max_err = max_err.max(d);
            }
            eprintln!(
                "flash_attention {:?} {:<44} {label:<5} rows/cube {:>2} splits {:>3}: max |Δ| = {max_err:.2e}, / max|v| = {:.2e} (f32 tol {:.1e})",
                dtype::<F>(),
                c.name,
                pl.rows_per_cube,
                pl.splits,
                max_err / v_max,
                TOL * v_max
            );
            worst_abs = worst_abs.max(max_err);
            worst_rel = worst_rel.max(max_err / v_max);
        }
    }
    eprintln!(
        "flash_attention {:?} whole grid: max |Δ| = {worst_abs:.2e}, max |Δ|/max|v| = {worst_rel:.2e}; took {:.1} s",
        dtype::<F>(),
        start.elapsed().as_secs_f64()
    );
    (worst_abs, worst_rel)
}

#[test]
fn matches_reference_on_shape_grid_f32() {
    shape_grid::<f32>();
}

#[test]
fn matches_reference_on_shape_grid_f16() {
    shape_grid::<f16>();
}

/// The default entry point picks the plan itself.
fn uses_its_plan<F: FloatElement>() {
    let gpu_dev = WgpuDevice::default();
    let cpu = Default::default();
    let (t, s, heads, kv, d) = (2usize, 300usize, 8usize, 2usize, 64usize);
    let mut rng = Lcg::new(7);
    let q = round::<F>(&random(&mut rng, t * heads * d, 1.0));
    let k = round::<F>(&random(&mut rng, kv * s * d, 1.0));
    let v = round::<F>(&random(&mut rng, kv * s * d, 1.0));
    let v_max = v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
    let p = AttentionParams::causal(s - t, 0, None);
    let run_ref = reference::attention(
        Tensor::<Cpu, 3>::from_data(TensorData::new(q.clone(), [t, heads, d]), &cpu),
        Tensor::<Cpu, 3>::from_data(TensorData::new(k.clone(), [kv, s, d]), &cpu),
        Tensor::<Cpu, 3>::from_data(TensorData::new(v.clone(), [kv, s, d]), &cpu),
        &p,
    )
    .into_data()
    .to_vec::<f32>()
    .unwrap();
    let got = read(
        fused_attention(
            gpu::<F, 3>(&q, [t, heads, d], &gpu_dev),
            gpu::<F, 3>(&k, [kv, s, d], &gpu_dev),
            gpu::<F, 3>(&v, [kv, s, d], &gpu_dev),
            &p,
        )
        .unwrap(),
    );
    let mut max_err = 0f64;
    for (g, e) in got.iter().zip(&run_ref) {
        let d = (*g as f64 - *e as f64).abs();
        assert!(
            d <= tolerance::<F>(v_max, *e),
            "{:?}: {g} vs {e}",
            dtype::<F>()
        );
        max_err = max_err.max(d);
    }
    eprintln!(
        "flash_attention {:?} default plan: max |Δ| = {max_err:.2e}",
        dtype::<F>()
    );
    assert!(
        plan(t, heads, kv, s, &p).splits > 1,
        "decode-sized input should split the keys"
    );
}

#[test]
fn fused_attention_uses_its_plan_f32() {
    uses_its_plan::<f32>();
}

#[test]
fn fused_attention_uses_its_plan_f16() {
    uses_its_plan::<f16>();
}

/// K/V as views of a larger buffer (the KV cache: `[kv_heads, capacity, d]`, live entries
/// `first..first + s`) are read through their strides, not copied, and give the reference's output.
fn strided_cache_views<F: FloatElement>() {
    let gpu_dev = WgpuDevice::default();
    let cpu = Default::default();
    // (t, s, heads, kv heads, d, capacity, first): decode and prefill, d 64 and 256.
    for (n, &(t, s, heads, kv, d, cap, first)) in [
        (1usize, 300usize, 8usize, 2usize, 64usize, 512usize, 64usize),
        (5, 70, 4, 2, 256, 128, 16),
        (1, 40, 4, 4, 256, 96, 0),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Lcg::new(77 + n as u64);
        let q = round::<F>(&random(&mut rng, t * heads * d, 1.0));
        let kb = round::<F>(&random(&mut rng, kv * cap * d, 1.0));
        let vb = round::<F>(&random(&mut rng, kv * cap * d, 1.0));
        let v_max = vb.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
        let p = AttentionParams::causal(first + s - t, first, Some(48));
        let live = [0..kv, first..first + s, 0..d];
        let expected = reference::attention(
            Tensor::<Cpu, 3>::from_data(TensorData::new(q.clone(), [t, heads, d]), &cpu),
            Tensor::<Cpu, 3>::from_data(TensorData::new(kb.clone(), [kv, cap, d]), &cpu)
                .slice(live.clone()),
            Tensor::<Cpu, 3>::from_data(TensorData::new(vb.clone(), [kv, cap, d]), &cpu)
                .slice(live.clone()),
            &p,
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();
        let kt = gpu::<F, 3>(&kb, [kv, cap, d], &gpu_dev).slice(live.clone());
        let vt = gpu::<F, 3>(&vb, [kv, cap, d], &gpu_dev).slice(live);
        let got =
            read(fused_attention(gpu::<F, 3>(&q, [t, heads, d], &gpu_dev), kt, vt, &p).unwrap());
        let mut max_err = 0f64;
        for (g, e) in got.iter().zip(&expected) {
            let diff = (*g as f64 - *e as f64).abs();
            assert!(
                diff <= tolerance::<F>(v_max, *e),
                "{:?} t {t} s {s} d {d}: {g} vs {e}",
                dtype::<F>()
            );
            max_err = max_err.max(diff);
        }
        eprintln!("flash_attention {:?} strided view t {t} s {s} d {d} capacity {cap} first {first}: max |Δ| = {max_err:.2e}", dtype::<F>());
    }
}

#[test]
fn strided_cache_views_match_reference_f32() {
    strided_cache_views::<f32>();
}

#[test]
fn strided_cache_views_match_reference_f16() {
    strided_cache_views::<f16>();
}

/// Queries that see no key at all get zeros (the reference would give NaN).
fn rows_without_visible_keys<F: FloatElement>() {
    let dev = WgpuDevice::default();
    let (t, s, heads, d) = (3usize, 40usize, 2usize, 32usize);
    // Keys at positions 10..50, queries at 0..3: nothing is causally visible.
    let p = AttentionParams::causal(0, 10, None);
    let opts = (&dev, dtype::<F>());
    let out = read(
        fused_attention(
            Tensor::<Gpu<F>, 3>::ones([t, heads, d], opts),
            Tensor::<Gpu<F>, 3>::ones([heads, s, d], opts),
            Tensor::<Gpu<F>, 3>::ones([heads, s, d], opts),
            &p,
        )
        .unwrap(),
    );
    assert!(out.iter().all(|&x| x == 0.0), "{out:?}");
}

#[test]
fn rows_without_visible_keys_are_zero_f32() {
    rows_without_visible_keys::<f32>();
}

#[test]
fn rows_without_visible_keys_are_zero_f16() {
    rows_without_visible_keys::<f16>();
}

#[test]
fn refusals_carry_the_numbers() {
    let dev = WgpuDevice::default();
    let x = |a: usize, b: usize, c: usize| Tensor::<Gpu, 3>::zeros([a, b, c], (&dev, DType::F32));
    let p = AttentionParams::causal(0, 0, None);
    let call = |q, k, v, p: &AttentionParams| fused_attention(q, k, v, p).map(|_| ()).unwrap_err();

    let mut spans = p.clone();
    spans.bidirectional = (0..65).map(|i| 2 * i..2 * i + 1).collect();
    assert_eq!(
        call(x(1, 2, 32), x(2, 4, 32), x(2, 4, 32), &spans),
        AttentionError::Spans { spans: 65, max: 64 }
    );
    assert_eq!(
        call(x(1, 3, 32), x(2, 4, 32), x(2, 4, 32), &p),
        AttentionError::Groups {
            heads: 3,
            kv_heads: 2
        }
    );
    assert_eq!(
        call(x(1, 2, 520), x(2, 4, 520), x(2, 4, 520), &p),
        AttentionError::HeadDim { d: 520, max: 512 }
    );
    assert_eq!(
        call(x(1, 2, 64), x(2, 4, 32), x(2, 4, 32), &p),
        AttentionError::KeyDim { q: 64, k: 32 }
    );
    assert_eq!(
        call(x(1, 2, 32), x(2, 4, 32), x(2, 5, 32), &p),
        AttentionError::ValueShape {
            k: [2, 4, 32],
            v: [2, 5, 32]
        }
    );
    assert_eq!(
        call(x(0, 2, 32), x(2, 4, 32), x(2, 4, 32), &p),
        AttentionError::Empty { t: 0, s: 4 }
    );
    let w0 = AttentionParams::causal(0, 0, Some(0));
    assert_eq!(
        call(x(1, 2, 32), x(2, 4, 32), x(2, 4, 32), &w0),
        AttentionError::ZeroWindow
    );
    let msg = call(x(1, 2, 520), x(2, 4, 520), x(2, 4, 520), &p).to_string();
    assert!(msg.contains("520") && msg.contains("512"), "{msg}");
}
