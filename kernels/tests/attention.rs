//! Fused attention kernels on wgpu (lavapipe here) against the plain Burn reference on NdArray.
//!
//! Tolerance: max |Δ| ≤ 1e-4 · max|v| (the output is a convex combination of v rows, so max|v|
//! is the output's scale). Every case runs with the automatic plan and with a second plan that
//! takes the other path (split-K vs direct) and another row tile, into a NaN-poisoned output.

use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::tensor::{Tensor, TensorData};
use gemma4_kernels::attention::flash::{
    fused_attention, fused_attention_with_plan, plan, AttentionError, FlashPlan,
};
use gemma4_kernels::attention::{reference, AttentionParams};
use gemma4_kernels::testing::{Cpu, Lcg};

type Gpu = CubeBackend<WgpuRuntime, f32, i32, u32>;

const TOL: f64 = 1e-4;

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

#[test]
fn matches_reference_on_shape_grid() {
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let start = std::time::Instant::now();
    for (n, c) in cases().iter().enumerate() {
        let mut rng = Lcg::new(1000 + n as u64);
        let q = random(&mut rng, c.t * c.heads * c.d, 1.0);
        let k = random(&mut rng, c.kv_heads * c.s * c.d, 1.0);
        let v = random(&mut rng, c.kv_heads * c.s * c.d, 1.5);
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
            let qt = Tensor::<Gpu, 3>::from_data(TensorData::new(q.clone(), qd), &gpu);
            let kt = Tensor::<Gpu, 3>::from_data(TensorData::new(k.clone(), kd), &gpu);
            let vt = Tensor::<Gpu, 3>::from_data(TensorData::new(v.clone(), kd), &gpu);
            let poisoned = Tensor::<Gpu, 2>::full([c.t, c.heads * c.d], f32::NAN, &gpu);
            let got = fused_attention_with_plan(qt, kt, vt, &p, pl, Some(poisoned))
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert_eq!(got.dims(), [c.t, c.heads * c.d], "{}", c.name);
            let got = got.into_data().to_vec::<f32>().unwrap();
            let mut max_err = 0f64;
            for (idx, (g, e)) in got.iter().zip(&expected).enumerate() {
                let d = (*g as f64 - *e as f64).abs();
                assert!(
                    g.is_finite() && d <= TOL * v_max,
                    "{} ({label} plan {pl:?}): out[{}, {}] = {g} vs reference {e} (|Δ| {d:e} > {:e})",
                    c.name,
                    idx / (c.heads * c.d),
                    idx % (c.heads * c.d),
                    TOL * v_max
                );
                max_err = max_err.max(d);
            }
            println!(
                "{:<44} {label:<5} rows/cube {:>2} splits {:>3}: max |Δ| = {max_err:.2e} (tol {:.1e})",
                c.name,
                pl.rows_per_cube,
                pl.splits,
                TOL * v_max
            );
        }
    }
    println!("grid took {:.1} s", start.elapsed().as_secs_f64());
}

/// The default entry point picks the plan itself.
#[test]
fn fused_attention_uses_its_plan() {
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let (t, s, heads, kv, d) = (2usize, 300usize, 8usize, 2usize, 64usize);
    let mut rng = Lcg::new(7);
    let q = random(&mut rng, t * heads * d, 1.0);
    let k = random(&mut rng, kv * s * d, 1.0);
    let v = random(&mut rng, kv * s * d, 1.0);
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
    let got = fused_attention(
        Tensor::<Gpu, 3>::from_data(TensorData::new(q, [t, heads, d]), &gpu),
        Tensor::<Gpu, 3>::from_data(TensorData::new(k, [kv, s, d]), &gpu),
        Tensor::<Gpu, 3>::from_data(TensorData::new(v, [kv, s, d]), &gpu),
        &p,
    )
    .unwrap()
    .into_data()
    .to_vec::<f32>()
    .unwrap();
    let max_err = got
        .iter()
        .zip(&run_ref)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_err <= 1e-4, "max |Δ| {max_err:e}");
    assert!(
        plan(t, heads, kv, s, &p).splits > 1,
        "decode-sized input should split the keys"
    );
}

/// K/V as views of a larger buffer (the KV cache: `[kv_heads, capacity, d]`, live entries
/// `first..first + s`) are read through their strides, not copied, and give the reference's output.
#[test]
fn strided_cache_views_match_reference() {
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    // (t, s, heads, kv heads, d, capacity, first): decode and prefill, d 64 and 256.
    for (n, &(t, s, heads, kv, d, cap, first)) in [(1usize, 300usize, 8usize, 2usize, 64usize, 512usize, 64usize), (5, 70, 4, 2, 256, 128, 16), (1, 40, 4, 4, 256, 96, 0)].iter().enumerate() {
        let mut rng = Lcg::new(77 + n as u64);
        let q = random(&mut rng, t * heads * d, 1.0);
        let kb = random(&mut rng, kv * cap * d, 1.0);
        let vb = random(&mut rng, kv * cap * d, 1.0);
        let p = AttentionParams::causal(first + s - t, first, Some(48));
        let live = [0..kv, first..first + s, 0..d];
        let expected = reference::attention(
            Tensor::<Cpu, 3>::from_data(TensorData::new(q.clone(), [t, heads, d]), &cpu),
            Tensor::<Cpu, 3>::from_data(TensorData::new(kb.clone(), [kv, cap, d]), &cpu).slice(live.clone()),
            Tensor::<Cpu, 3>::from_data(TensorData::new(vb.clone(), [kv, cap, d]), &cpu).slice(live.clone()),
            &p,
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();
        let kt = Tensor::<Gpu, 3>::from_data(TensorData::new(kb, [kv, cap, d]), &gpu).slice(live.clone());
        let vt = Tensor::<Gpu, 3>::from_data(TensorData::new(vb, [kv, cap, d]), &gpu).slice(live);
        let got = fused_attention(Tensor::<Gpu, 3>::from_data(TensorData::new(q, [t, heads, d]), &gpu), kt, vt, &p)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let max_err = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("strided view t {t} s {s} d {d} capacity {cap} first {first}: max |Δ| = {max_err:.2e}");
        assert!(max_err <= 1e-4, "t {t} s {s} d {d}: max |Δ| {max_err:e}");
    }
}

/// Queries that see no key at all get zeros (the reference would give NaN).
#[test]
fn rows_without_visible_keys_are_zero() {
    let gpu = WgpuDevice::default();
    let (t, s, heads, d) = (3usize, 40usize, 2usize, 32usize);
    // Keys at positions 10..50, queries at 0..3: nothing is causally visible.
    let p = AttentionParams::causal(0, 10, None);
    let out = fused_attention(
        Tensor::<Gpu, 3>::ones([t, heads, d], &gpu),
        Tensor::<Gpu, 3>::ones([heads, s, d], &gpu),
        Tensor::<Gpu, 3>::ones([heads, s, d], &gpu),
        &p,
    )
    .unwrap()
    .into_data()
    .to_vec::<f32>()
    .unwrap();
    assert!(out.iter().all(|&x| x == 0.0), "{out:?}");
}

#[test]
fn refusals_carry_the_numbers() {
    let dev = WgpuDevice::default();
    let x = |a: usize, b: usize, c: usize| Tensor::<Gpu, 3>::zeros([a, b, c], &dev);
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
