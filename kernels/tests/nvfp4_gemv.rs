//! NVFP4 GEMV kernel on wgpu (lavapipe here), in f32 and in f16, against the plain Burn reference
//! on NdArray (f32) from the same inputs (for f16, x rounded to f16 first).
//!
//! Tolerance per element, with S = Σ_c |x[i,c] · W[o,c]|:
//! - f32: |Δ| ≤ 1e-4 · (1 + S): the kernel decodes W to the reference's f32 values, so the only
//!   error is f32 accumulation in another order (~√in · 2^-24 · S typically).
//! - f16: the kernel widens x to f32, decodes W and accumulates in f32 as above, then rounds y
//!   to f16 once: at most half an ulp, 2^-11 · |y| (unit roundoff of f16's 11 significant bits),
//!   or 2^-25 absolute in f16's subnormal range. x is rounded before the reference sees it, so
//!   |Δ| ≤ 2^-11 · |y_ref| + 2^-25 + the f32 term 1e-4 · (1 + S).

use burn::backend::wgpu::WgpuDevice;
use burn::backend::NdArray;
use burn::tensor::{f16, DType, Tensor, TensorData};
use burn_cubecl::FloatElement;
use gemma4_kernels::nvfp4::gemv::{nvfp4_matmul, KernelError, MAX_M};
use gemma4_kernels::nvfp4::{scale_words_per_row, Nvfp4Weight, PackedNvfp4};
use gemma4_kernels::testing::{
    dtype, every_code_and_scale, finite_e4m3_bytes, random_packed, round, Gpu, Lcg, F16_ROUNDOFF,
    F16_SUBNORMAL_HALF_ULP,
};

type Cpu = NdArray<f32, i32>;

/// The kernel's y (widened to f32). Inputs are created with F's dtype explicitly: the device's
/// default float dtype is whichever backend touched it first (f32 and f16 share it here).
fn run_kernel<F: FloatElement>(
    packed: &PackedNvfp4,
    x: &[f32],
    m: usize,
    device: &WgpuDevice,
) -> Vec<f32> {
    let w: Nvfp4Weight<Gpu<F>> = packed.to_device(device);
    let xt = Tensor::<Gpu<F>, 2>::from_data(
        TensorData::new(x.to_vec(), [m, packed.in_features]),
        (device, dtype::<F>()),
    );
    let y = nvfp4_matmul(
        xt,
        w.codes,
        w.scales,
        w.global_scale,
        w.out_features,
        w.in_features,
    )
    .expect("valid shapes");
    assert_eq!(y.dims(), [m, packed.out_features]);
    let data = y.into_data();
    assert_eq!(data.dtype, dtype::<F>());
    data.convert::<f32>().to_vec::<f32>().unwrap()
}

/// The shape grid in `F`; returns the largest |Δ| and |Δ| / (1 + S) over it.
fn shape_grid<F: FloatElement>() -> (f64, f64) {
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let f16 = dtype::<F>() == DType::F16;
    let shapes: [(&str, usize, usize, usize); 5] = [
        ("gemv_tiny", 1, 8, 16),
        ("gemv_odd_out_padded_scales", 1, 37, 80),
        ("m3_padded_scales", 3, 64, 208),
        ("m16_max_rows", 16, 130, 512),
        ("m5_words_over_block", 5, 7, 1040),
    ];
    let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
    for (name, m, out, inp) in shapes {
        for seed in [1u64, 2, 3] {
            let mut rng = Lcg::new(seed * 1000 + out as u64 + if f16 { 7 } else { 0 });
            let gs = 0.25 + rng.next_f32();
            let packed = random_packed(&mut rng, out, inp, gs);
            let x: Vec<f32> = (0..m * inp).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let x = round::<F>(&x);

            let got = run_kernel::<F>(&packed, &x, m, &gpu);

            let w_ref: Nvfp4Weight<Cpu> = packed.to_device(&cpu);
            let x_ref = Tensor::<Cpu, 2>::from_data(TensorData::new(x.clone(), [m, inp]), &cpu);
            let expected = x_ref
                .matmul(w_ref.dequantize().transpose())
                .into_data()
                .to_vec::<f32>()
                .unwrap();

            let w = packed.dequantize();
            assert_eq!(got.len(), m * out);
            let mut max_err = 0f64;
            let mut max_rel = 0f64;
            for i in 0..m {
                for o in 0..out {
                    let abs_sum: f64 = (0..inp)
                        .map(|c| (x[i * inp + c] as f64 * w[o * inp + c] as f64).abs())
                        .sum();
                    let (g, e) = (got[i * out + o] as f64, expected[i * out + o] as f64);
                    let d = (g - e).abs();
                    let mut tol = 1e-4 * (1.0 + abs_sum);
                    if f16 {
                        tol += F16_ROUNDOFF * e.abs() + F16_SUBNORMAL_HALF_ULP;
                    }
                    assert!(d <= tol, "{name} seed {seed}: y[{i},{o}] = {g} vs reference {e} (|Δ| {d:e} > {tol:e})");
                    max_err = max_err.max(d);
                    max_rel = max_rel.max(d / (1.0 + abs_sum));
                }
            }
            eprintln!(
                "nvfp4_gemv {:?} {name:<28} (m,out,in)=({m},{out},{inp}) seed {seed}: max |Δ| = {max_err:.3e}, max |Δ|/(1+Σ|xw|) = {max_rel:.3e}",
                dtype::<F>()
            );
            worst_abs = worst_abs.max(max_err);
            worst_rel = worst_rel.max(max_rel);
        }
    }
    eprintln!("nvfp4_gemv {:?} whole grid: max |Δ| = {worst_abs:.3e}, max |Δ|/(1+Σ|xw|) = {worst_rel:.3e}", dtype::<F>());
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

/// Every finite E4M3 scale byte (one per row) times every E2M1 code, read out exactly through
/// one-hot activations: y[i, r] = W[r, i]. Exact in f16 too: e2m1 · e4m3 has at most 2 + 4
/// significant bits and lies in 2^-10 ..= 2688, inside f16's normal range.
fn every_code_and_scale_exactly<F: FloatElement>() {
    let gpu = WgpuDevice::default();
    let (m, inp) = (16usize, 16usize);
    let packed = every_code_and_scale(1.0);
    let (out, bytes) = (packed.out_features, finite_e4m3_bytes());
    let mut x = vec![0f32; m * inp];
    for i in 0..m {
        x[i * inp + i] = 1.0;
    }
    let got = run_kernel::<F>(&packed, &x, m, &gpu);
    let w = packed.dequantize();
    for i in 0..m {
        for r in 0..out {
            assert_eq!(
                got[i * out + r],
                w[r * inp + i],
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
    let ints = |r: usize, c: usize| Tensor::<Gpu, 2, burn::tensor::Int>::zeros([r, c], &dev);
    let (out, inp) = (8usize, 64usize);
    let spr = scale_words_per_row(inp);
    let call = |xx, cc, ss, o, i| nvfp4_matmul(xx, cc, ss, 1.0, o, i).map(|_| ()).unwrap_err();

    assert_eq!(
        call(x(1, 40), ints(out, 5), ints(out, 1), out, 40),
        KernelError::InFeatures { in_features: 40 }
    );
    assert_eq!(
        call(x(1, 0), ints(out, 0), ints(out, 0), out, 0),
        KernelError::InFeatures { in_features: 0 }
    );
    assert_eq!(
        call(x(1, inp), ints(0, 8), ints(0, spr), 0, inp),
        KernelError::OutFeatures { out_features: 0 }
    );
    assert_eq!(
        call(x(1, 32), ints(out, 8), ints(out, spr), out, inp),
        KernelError::XColumns {
            expected: inp,
            got: 32
        }
    );
    assert_eq!(
        call(x(MAX_M + 1, inp), ints(out, 8), ints(out, spr), out, inp),
        KernelError::Rows {
            m: MAX_M + 1,
            max: MAX_M
        }
    );
    assert_eq!(
        call(x(0, inp), ints(out, 8), ints(out, spr), out, inp),
        KernelError::Rows { m: 0, max: MAX_M }
    );
    assert_eq!(
        call(x(1, inp), ints(out, 4), ints(out, spr), out, inp),
        KernelError::CodesShape {
            expected: [out, 8],
            got: [out, 4]
        }
    );
    assert_eq!(
        call(x(1, inp), ints(out + 1, 8), ints(out, spr), out, inp),
        KernelError::CodesShape {
            expected: [out, 8],
            got: [out + 1, 8]
        }
    );
    assert_eq!(
        call(x(1, inp), ints(out, 8), ints(out, 2), out, inp),
        KernelError::ScalesShape {
            expected: [out, 1],
            got: [out, 2]
        }
    );
    let msg = call(x(1, inp), ints(out, 8), ints(out, 2), out, inp).to_string();
    assert!(msg.contains("[8, 2]") && msg.contains("[8, 1]"), "{msg}");
}
