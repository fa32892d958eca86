//! NVFP4 GEMV kernel on wgpu (lavapipe here) against the plain Burn reference on NdArray.

use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use gemma4_kernels::nvfp4_gemv::{nvfp4_matmul, KernelError, MAX_M};
use gemma4_kernels::nvfp4::{scale_words_per_row, Nvfp4Weight, PackedNvfp4};
use gemma4_kernels::testing::{every_code_and_scale, finite_e4m3_bytes, random_packed, Lcg};

type Gpu = CubeBackend<WgpuRuntime, f32, i32, u32>;
type Cpu = NdArray<f32, i32>;


fn run_kernel(packed: &PackedNvfp4, x: &[f32], m: usize, device: &WgpuDevice) -> Vec<f32> {
    let w: Nvfp4Weight<Gpu> = packed.to_device(device);
    let xt =
        Tensor::<Gpu, 2>::from_data(TensorData::new(x.to_vec(), [m, packed.in_features]), device);
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
    y.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn matches_reference_on_shape_grid() {
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let shapes: [(&str, usize, usize, usize); 5] = [
        ("gemv_tiny", 1, 8, 16),
        ("gemv_odd_out_padded_scales", 1, 37, 80),
        ("m3_padded_scales", 3, 64, 208),
        ("m16_max_rows", 16, 130, 512),
        ("m5_words_over_block", 5, 7, 1040),
    ];
    for (name, m, out, inp) in shapes {
        for seed in [1u64, 2, 3] {
            let mut rng = Lcg::new(seed * 1000 + out as u64);
            let gs = 0.25 + rng.next_f32();
            let packed = random_packed(&mut rng, out, inp, gs);
            let x: Vec<f32> = (0..m * inp).map(|_| rng.next_f32() * 2.0 - 1.0).collect();

            let got = run_kernel(&packed, &x, m, &gpu);

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
                    let tol = 1e-4 * (1.0 + abs_sum);
                    assert!(d <= tol, "{name} seed {seed}: y[{i},{o}] = {g} vs reference {e} (|Δ| {d:e} > {tol:e})");
                    max_err = max_err.max(d);
                    max_rel = max_rel.max(d / (1.0 + abs_sum));
                }
            }
            println!(
                "{name:<28} (m,out,in)=({m},{out},{inp}) seed {seed}: max |Δ| = {max_err:.3e}, max |Δ|/(1+Σ|xw|) = {max_rel:.3e}"
            );
        }
    }
}

/// Every finite E4M3 scale byte (one per row) times every E2M1 code, read out exactly through
/// one-hot activations: y[i, r] = W[r, i].
#[test]
fn decodes_every_code_and_scale_exactly() {
    let gpu = WgpuDevice::default();
    let (m, inp) = (16usize, 16usize);
    let packed = every_code_and_scale(1.0);
    let (out, bytes) = (packed.out_features, finite_e4m3_bytes());
    let mut x = vec![0f32; m * inp];
    for i in 0..m {
        x[i * inp + i] = 1.0;
    }
    let got = run_kernel(&packed, &x, m, &gpu);
    let w = packed.dequantize();
    for i in 0..m {
        for r in 0..out {
            assert_eq!(
                got[i * out + r],
                w[r * inp + i],
                "code {i}, scale byte {:#04x}",
                bytes[r]
            );
        }
    }
}

#[test]
fn shape_errors_carry_the_numbers() {
    let dev = WgpuDevice::default();
    let x = |m: usize, n: usize| Tensor::<Gpu, 2>::zeros([m, n], &dev);
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
