//! NVFP4 prefill GEMM kernel on wgpu (lavapipe here), in f32 and in f16, against a host f64
//! matmul of the plain reference decode (`PackedNvfp4::dequantize`) from the same inputs (for
//! f16, x rounded to f16 first), and its shape errors.
//!
//! Tolerance: |y − y_ref| ≤ 1e-5 · Σ_c |x[i,c] · W[o,c]| per element, with y_ref the exact f64
//! dot product of the same f32 weights (`PackedNvfp4::dequantize`). The kernel decodes W to the
//! same f32 values as the reference, so the only error is f32 accumulation over `in` terms:
//! ~√in · 2^-24 relative to Σ|x·w| typically (1.9e-6 at in = 1024; measured ≤ 7e-7), in · 2^-24
//! in the worst case (6e-5 at in = 1024, never approached by random signs).
//!
//! f16: x is widened to f32 as it is staged, W decoded and y accumulated in f32 exactly as
//! above, and y rounded to f16 once on store: at most half an ulp, 2^-11 · |y| (f16 has 11
//! significant bits), or 2^-25 absolute in f16's subnormal range. x is rounded to f16 before the
//! reference sees it, so |Δ| ≤ 1e-5 · Σ|x·w| + 2^-11 · |y_exact| + 2^-25.

use std::time::Instant;

use burn::backend::wgpu::WgpuDevice;
use burn::tensor::backend::Backend;
use burn::tensor::{f16, DType, Int, Tensor, TensorData};
use burn_cubecl::FloatElement;
use gemma4_kernels::nvfp4::gemm::{
    nvfp4_gemm, nvfp4_gemm_into, time_nvfp4_gemm, GemmError, KernelError, MAX_ROWS,
};
use gemma4_kernels::nvfp4::{scale_words_per_row, Nvfp4Weight, PackedNvfp4};
use gemma4_kernels::testing::{
    dtype, every_code_and_scale, finite_e4m3_bytes, random_packed, round, Gpu, Lcg, F16_ROUNDOFF,
    F16_SUBNORMAL_HALF_ULP,
};

const REL_TOL: f64 = 1e-5;

/// The kernel's y (widened to f32), written into a NaN-filled buffer so that any element it
/// misses stays NaN. Tensors are created with F's dtype explicitly: the device's default float
/// dtype is whichever backend touched it first (f32 and f16 share it here).
fn run_kernel<F: FloatElement>(
    packed: &PackedNvfp4,
    x: &[f32],
    m: usize,
    device: &WgpuDevice,
) -> Vec<f32> {
    let w: Nvfp4Weight<Gpu<F>> = packed.to_device(device);
    let opts = (device, dtype::<F>());
    let xt =
        Tensor::<Gpu<F>, 2>::from_data(TensorData::new(x.to_vec(), [m, packed.in_features]), opts);
    let poisoned = Tensor::<Gpu<F>, 2>::full([m, packed.out_features], f32::NAN, opts);
    let y = nvfp4_gemm_into(
        xt,
        w.codes,
        w.scales,
        w.global_scale,
        w.out_features,
        w.in_features,
        poisoned,
    )
    .expect("valid shapes");
    assert_eq!(y.dims(), [m, packed.out_features]);
    let data = y.into_data();
    assert_eq!(data.dtype, dtype::<F>());
    data.convert::<f32>().to_vec::<f32>().unwrap()
}

/// (largest |Δ|, largest |Δ| / Σ|x·w|) over y; panics past the tolerance of the module docs
/// (NaN included), with the f16 rounding terms when `f16`.
#[allow(clippy::too_many_arguments)]
fn check(
    name: &str,
    got: &[f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    out: usize,
    inp: usize,
    f16: bool,
) -> (f64, f64) {
    assert_eq!(got.len(), m * out);
    let (mut max_abs, mut max_rel) = (0f64, 0f64);
    for i in 0..m {
        let xr = &x[i * inp..(i + 1) * inp];
        for o in 0..out {
            let wr = &w[o * inp..(o + 1) * inp];
            let (mut e, mut abs_sum) = (0f64, 0f64);
            for (a, b) in xr.iter().zip(wr) {
                let p = *a as f64 * *b as f64;
                e += p;
                abs_sum += p.abs();
            }
            let g = got[i * out + o] as f64;
            let d = (g - e).abs();
            let rel = d / abs_sum.max(f64::MIN_POSITIVE);
            let mut tol = REL_TOL * abs_sum;
            if f16 {
                tol += F16_ROUNDOFF * e.abs() + F16_SUBNORMAL_HALF_ULP;
            }
            assert!(
                d <= tol,
                "{name}: y[{i},{o}] = {g} vs exact {e} (|Δ| {d:e} > {tol:e}, Σ|xw| = {abs_sum:e})"
            );
            max_abs = max_abs.max(d);
            max_rel = max_rel.max(rel);
        }
    }
    (max_abs, max_rel)
}

/// m past the GEMV's 16 rows and across the 64-row tile edge; out below, across and at the
/// 64-feature tile; in at one group, padded scale words (80 = 5 groups, 272 = 17 groups), a
/// half K tile (80, 272 are not multiples of 32) and a longer K. Returns the largest |Δ| and
/// |Δ| / Σ|x·w| over the grid.
fn shape_grid<F: FloatElement>() -> (f64, f64) {
    let gpu = WgpuDevice::default();
    let f16 = dtype::<F>() == DType::F16;
    let ms = [17usize, 64, 100, 257];
    let outs = [1usize, 33, 130, 256];
    let ins = [16usize, 80, 272, 1024];
    let mut worst = Vec::new();
    let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
    for &inp in &ins {
        let (mut max_abs, mut max_rel) = (0f64, 0f64);
        for &out in &outs {
            for &m in &ms {
                let mut rng =
                    Lcg::new((m * 1_000_003 + out * 1009 + inp) as u64 + if f16 { 17 } else { 0 });
                let gs = 0.25 + rng.next_f32();
                let packed = random_packed(&mut rng, out, inp, gs);
                let x: Vec<f32> = (0..m * inp).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
                let x = round::<F>(&x);
                let got = run_kernel::<F>(&packed, &x, m, &gpu);
                let name = format!("{:?} (m,out,in)=({m},{out},{inp})", dtype::<F>());
                let (abs, rel) = check(&name, &got, &x, &packed.dequantize(), m, out, inp, f16);
                max_abs = max_abs.max(abs);
                max_rel = max_rel.max(rel);
            }
        }
        worst.push((inp, max_abs, max_rel));
        worst_abs = worst_abs.max(max_abs);
        worst_rel = worst_rel.max(max_rel);
    }
    for (inp, abs, rel) in worst {
        eprintln!("nvfp4_gemm {:?} in = {inp:>4}, all m × out: max |Δ| = {abs:.3e}, max |Δ|/Σ|x·w| = {rel:.3e}", dtype::<F>());
    }
    eprintln!(
        "nvfp4_gemm {:?} whole grid: max |Δ| = {worst_abs:.3e}, max |Δ|/Σ|x·w| = {worst_rel:.3e}",
        dtype::<F>()
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

/// Every finite E4M3 scale byte (one per output row) times every E2M1 code, read out exactly
/// through one-hot activations: y[i, r] = W[r, i] for i < 16, and row 16 (zeros) gives 0. Exact
/// in f16 too: e2m1 · e4m3 has at most 2 + 4 significant bits and lies in 2^-10 ..= 2688.
fn every_code_and_scale_exactly<F: FloatElement>() {
    let gpu = WgpuDevice::default();
    let (m, inp) = (17usize, 16usize);
    let packed = every_code_and_scale(1.0);
    let (out, bytes) = (packed.out_features, finite_e4m3_bytes());
    let mut x = vec![0f32; m * inp];
    for i in 0..16 {
        x[i * inp + i] = 1.0;
    }
    let got = run_kernel::<F>(&packed, &x, m, &gpu);
    let w = packed.dequantize();
    for i in 0..m {
        for r in 0..out {
            let expected = if i < 16 { w[r * inp + i] } else { 0.0 };
            assert_eq!(
                got[i * out + r],
                expected,
                "{:?}: code {i}, scale byte {:#04x}",
                dtype::<F>(),
                bytes[r]
            );
        }
    }
}

#[test]
fn decodes_every_code_and_scale_exactly_f32() {
    every_code_and_scale_exactly::<f32>();
}

#[test]
fn decodes_every_code_and_scale_exactly_f16() {
    every_code_and_scale_exactly::<f16>();
}

#[test]
fn shape_errors_carry_the_numbers() {
    let dev = WgpuDevice::default();
    let x = |m: usize, n: usize| Tensor::<Gpu, 2>::zeros([m, n], (&dev, DType::F32));
    let ints = |r: usize, c: usize| Tensor::<Gpu, 2, Int>::zeros([r, c], &dev);
    let (out, inp) = (8usize, 64usize);
    let spr = scale_words_per_row(inp);
    let call = |xx, cc, ss, o, i| nvfp4_gemm(xx, cc, ss, 1.0, o, i).map(|_| ()).unwrap_err();
    let shape = |e: KernelError| GemmError::Shape(e);

    assert_eq!(
        call(x(20, 40), ints(out, 5), ints(out, 1), out, 40),
        shape(KernelError::InFeatures { in_features: 40 })
    );
    assert_eq!(
        call(x(20, 0), ints(out, 0), ints(out, 0), out, 0),
        shape(KernelError::InFeatures { in_features: 0 })
    );
    assert_eq!(
        call(x(20, inp), ints(0, 8), ints(0, spr), 0, inp),
        shape(KernelError::OutFeatures { out_features: 0 })
    );
    assert_eq!(
        call(x(20, 32), ints(out, 8), ints(out, spr), out, inp),
        shape(KernelError::XColumns {
            expected: inp,
            got: 32
        })
    );
    assert_eq!(
        call(x(0, inp), ints(out, 8), ints(out, spr), out, inp),
        shape(KernelError::Rows {
            m: 0,
            max: MAX_ROWS
        })
    );
    assert_eq!(
        call(x(20, inp), ints(out, 4), ints(out, spr), out, inp),
        shape(KernelError::CodesShape {
            expected: [out, 8],
            got: [out, 4]
        })
    );
    assert_eq!(
        call(x(20, inp), ints(out + 1, 8), ints(out, spr), out, inp),
        shape(KernelError::CodesShape {
            expected: [out, 8],
            got: [out + 1, 8]
        })
    );
    assert_eq!(
        call(x(20, inp), ints(out, 8), ints(out, 2), out, inp),
        shape(KernelError::ScalesShape {
            expected: [out, 1],
            got: [out, 2]
        })
    );
    let err = nvfp4_gemm_into(
        x(20, inp),
        ints(out, 8),
        ints(out, spr),
        1.0,
        out,
        inp,
        x(20, out + 1),
    )
    .map(|_| ())
    .unwrap_err();
    assert_eq!(
        err,
        GemmError::OutputShape {
            expected: [20, out],
            got: [20, out + 1]
        }
    );
    let msg = call(x(20, inp), ints(out, 8), ints(out, 2), out, inp).to_string();
    assert!(msg.contains("[8, 2]") && msg.contains("[8, 1]"), "{msg}");
}

/// Bench helper check and the timing the lead asked for: m = 256, out = in = 1024, the kernel
/// vs the reference path (tensor-op dequantize + Burn matmul) on the same wgpu device.
/// `cargo test -p gemma4-kernels --test nvfp4_gemm -- --ignored --nocapture`
#[test]
#[ignore = "timing, run explicitly"]
fn timing_m256_1024() {
    let dev = WgpuDevice::default();
    let (m, out, inp, iters) = (256usize, 1024usize, 1024usize, 5usize);
    let mut rng = Lcg::new(77);
    let packed = random_packed(&mut rng, out, inp, 0.5);
    let w: Nvfp4Weight<Gpu> = packed.to_device(&dev);
    let x: Vec<f32> = (0..m * inp).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
    let xt = Tensor::<Gpu, 2>::from_data(TensorData::new(x, [m, inp]), (&dev, DType::F32));

    let t_kernel =
        time_nvfp4_gemm(&xt, &w.codes, &w.scales, w.global_scale, out, inp, iters).unwrap();

    drop(w.forward_reference(xt.clone()));
    Gpu::<f32>::sync(&dev).unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        drop(w.forward_reference(xt.clone()));
    }
    Gpu::<f32>::sync(&dev).unwrap();
    let t_ref = start.elapsed() / iters as u32;

    let flops = 2.0 * (m * out * inp) as f64;
    println!(
        "m={m} out={out} in={inp}: nvfp4_gemm {:.2} ms ({:.2} GFLOP/s), reference dequantize+matmul {:.2} ms ({:.2} GFLOP/s)",
        t_kernel.as_secs_f64() * 1e3,
        flops / t_kernel.as_secs_f64() / 1e9,
        t_ref.as_secs_f64() * 1e3,
        flops / t_ref.as_secs_f64() / 1e9
    );
}

/// Tile-shape sweep on m = 256, out = in = 1024 (tuning aid; each shape is checked against
/// Burn's matmul of the dequantized weight). Shapes `bm,bn,bk,tm,tn` separated by `;` in TILES:
/// `TILES="64,64,16,8,8;32,64,32,4,8" cargo test -p gemma4-kernels --test nvfp4_gemm tune -- --ignored --nocapture`
#[test]
#[ignore = "tuning sweep, run explicitly"]
fn tune_tiles() {
    use gemma4_kernels::nvfp4::gemm::{nvfp4_gemm_tiled, TileConfig};
    let dev = WgpuDevice::default();
    let (m, out, inp, iters) = (256usize, 1024usize, 1024usize, 3usize);
    let mut rng = Lcg::new(78);
    let packed = random_packed(&mut rng, out, inp, 0.5);
    let w: Nvfp4Weight<Gpu> = packed.to_device(&dev);
    let x: Vec<f32> = (0..m * inp).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
    let xt = Tensor::<Gpu, 2>::from_data(TensorData::new(x, [m, inp]), (&dev, DType::F32));
    let dense = w.dequantize().transpose();
    Gpu::<f32>::sync(&dev).unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        drop(xt.clone().matmul(dense.clone()));
    }
    Gpu::<f32>::sync(&dev).unwrap();
    println!(
        "burn matmul alone (pre-dequantized): {:.2} ms",
        start.elapsed().as_secs_f64() * 1e3 / iters as f64
    );
    let reference = xt
        .clone()
        .matmul(dense)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let env = std::env::var("TILES").unwrap_or_default();
    let mut cfgs = vec![TileConfig::DEFAULT];
    for spec in env.split(';').filter(|s| !s.is_empty()) {
        let v: Vec<usize> = spec.split(',').map(|t| t.trim().parse().unwrap()).collect();
        cfgs.push(TileConfig {
            bm: v[0],
            bn: v[1],
            bk: v[2],
            tm: v[3],
            tn: v[4],
        });
    }
    let mut best = vec![f64::INFINITY; cfgs.len()];
    for round in 0..5 {
        for (n, cfg) in cfgs.iter().enumerate() {
            let call = || {
                nvfp4_gemm_tiled(
                    xt.clone(),
                    w.codes.clone(),
                    w.scales.clone(),
                    0.5,
                    out,
                    inp,
                    *cfg,
                )
                .unwrap()
            };
            if round == 0 {
                let y = call().into_data().to_vec::<f32>().unwrap();
                let max_d = y
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(max_d < 1e-2, "{cfg:?}: max |Δ| vs burn {max_d:e}");
            }
            Gpu::<f32>::sync(&dev).unwrap();
            let start = Instant::now();
            drop(call());
            Gpu::<f32>::sync(&dev).unwrap();
            best[n] = best[n].min(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    for (cfg, t) in cfgs.iter().zip(best) {
        println!("{cfg:?}: best of 5 {t:.2} ms");
    }
}
