//! Fused norm / RoPE / GELU kernels on wgpu (lavapipe here), in f32 and in f16, against the plain
//! Burn references on NdArray (f32) from the same inputs (for f16, every input rounded to f16
//! first), on fresh random inputs (one Lcg seed per case), every output poisoned with NaN first
//! so that an unwritten element fails.
//!
//! Tolerances, all relative to the scale of what is compared:
//! - norms: max |Δ| ≤ 1e-5 · S per row, S = max |reference| of the row (for `rms_norm_add`,
//!   S = |scale| · max (|residual| + |rms_norm(x)·w|); for RoPE, S = max |rms_norm(x)·w| of the
//!   (token, head) row, since |cos|, |sin| ≤ 1). Both sides sum x² in f32 in different orders:
//!   ours in ≤ 84-term runs then an 8-level tree, NdArray in its own order; each is within about
//!   √n·ε ≈ 1e-6 (n = 21 504 floats) of the exact sum, so r = (Σx²/n + eps)^-½ differs by ~1e-6
//!   relative, plus a few ulp for the multiplies, sqrt and division: 1e-5 leaves a margin of ~5.
//! - GELU: |Δ| ≤ 2e-6 · |gate| · |up| per element. The reference forms 1 + tanh(z), whose rounding
//!   (~1 ulp of 1, 1.2e-7) is the dominant error where tanh → −1; ours forms 1/(1 + e^(−2z)),
//!   exact to a few ulp (Vulkan's exp: 3 ulp near 0); times 0.5·|gate|·|up| that is < 5e-7.
//!
//! f16: the kernels widen every input to f32 on load and compute exactly as in f32, then round
//! the output to f16 once: at most half an ulp, 2^-11 · |out| (f16 has 11 significant bits), or
//! 2^-25 absolute in f16's subnormal range. The f16 tolerances add that to the f32 ones:
//! - norms: + 2^-11 · S (|out| ≤ S for `rms_norm` and `rms_norm_add` by the choice of S), for
//!   RoPE + 2^-10 · S (|n_i·cos − n_j·sin| ≤ |n_i| + |n_j| ≤ 2·S); plus 2^-25 absolute;
//! - GELU: + 2^-11 · |reference| + 2^-25 per element.

use burn::backend::wgpu::WgpuDevice;
use burn::tensor::{f16, DType, Tensor, TensorData};
use burn_cubecl::FloatElement;
use gemma4_kernels::fused::cube::{
    gelu_tanh_mul, rms_norm, rms_norm_add, rms_norm_rope, FusedError,
};
use gemma4_kernels::fused::reference;
use gemma4_kernels::testing::{dtype, round, Cpu, Gpu, Lcg, F16_ROUNDOFF, F16_SUBNORMAL_HALF_ULP};

const NORM_TOL: f64 = 1e-5;
const GELU_TOL: f64 = 2e-6;
const EPS: f64 = 1e-6;

fn is_f16<F: FloatElement>() -> bool {
    dtype::<F>() == DType::F16
}

/// The norm tolerance relative to the row scale S for F: `rounding_multiple` · 2^-11 added in f16
/// (1 where |out| ≤ S, 2 for RoPE), and the absolute floor.
fn norm_tol<F: FloatElement>(rounding_multiple: f64) -> (f64, f64) {
    if is_f16::<F>() {
        (
            NORM_TOL + rounding_multiple * F16_ROUNDOFF,
            F16_SUBNORMAL_HALF_ULP,
        )
    } else {
        (NORM_TOL, 1e-30)
    }
}

/// Tensor creation options for F: its dtype explicitly, since the device's default float dtype
/// is whichever backend touched it first (f32 and f16 share it here).
fn opts<F: FloatElement>(dev: &WgpuDevice) -> (&WgpuDevice, DType) {
    (dev, dtype::<F>())
}

/// How a 2-D input is laid out in device memory (the logical `[rows, cols]` values are the same).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Contiguous,
    /// Stored `[cols, rows]`, transposed: column-major, non-contiguous.
    Transposed,
    /// Columns 3.. of a `[rows, cols + 5]` tensor: strided rows, non-contiguous.
    ColumnSlice,
    /// Rows 4.. of a `[rows + 4, cols]` tensor: contiguous at a buffer offset.
    RowOffset,
}

/// Uniform in [-amp, amp).
fn random(rng: &mut Lcg, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * amp).collect()
}

fn cpu2(v: &[f32], rows: usize, cols: usize) -> Tensor<Cpu, 2> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), [rows, cols]),
        &Default::default(),
    )
}

fn cpu1(v: &[f32]) -> Tensor<Cpu, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
}

fn gpu1<F: FloatElement>(v: &[f32], dev: &WgpuDevice) -> Tensor<Gpu<F>, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), opts::<F>(dev))
}

/// `v` (`[rows, cols]` row-major) on the device in `layout`.
fn gpu2<F: FloatElement>(
    v: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
    dev: &WgpuDevice,
) -> Tensor<Gpu<F>, 2> {
    let dev = opts::<F>(dev);
    let t = match layout {
        Layout::Contiguous => Tensor::from_data(TensorData::new(v.to_vec(), [rows, cols]), dev),
        Layout::Transposed => {
            let tr: Vec<f32> = (0..cols * rows)
                .map(|k| v[(k % rows) * cols + k / rows])
                .collect();
            Tensor::<Gpu<F>, 2>::from_data(TensorData::new(tr, [cols, rows]), dev).transpose()
        }
        Layout::ColumnSlice => {
            let w = cols + 5;
            let mut p = vec![f32::NAN; rows * w];
            for i in 0..rows {
                p[i * w + 3..i * w + 3 + cols].copy_from_slice(&v[i * cols..(i + 1) * cols]);
            }
            Tensor::<Gpu<F>, 2>::from_data(TensorData::new(p, [rows, w]), dev)
                .slice([0..rows, 3..3 + cols])
        }
        Layout::RowOffset => {
            let mut p = vec![f32::NAN; 4 * cols];
            p.extend_from_slice(v);
            Tensor::<Gpu<F>, 2>::from_data(TensorData::new(p, [rows + 4, cols]), dev)
                .slice([4..rows + 4, 0..cols])
        }
    };
    assert_eq!(t.dims(), [rows, cols]);
    t
}

fn values<const D: usize, B: burn::tensor::backend::Backend>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// A kernel output widened to f32, checked to be F.
fn read<F: FloatElement, const D: usize>(t: Tensor<Gpu<F>, D>) -> Vec<f32> {
    let data = t.into_data();
    assert_eq!(data.dtype, dtype::<F>());
    data.convert::<f32>().to_vec::<f32>().unwrap()
}

/// Checks `got` against `expected` row by row (rows of `len`): finite and
/// |Δ| ≤ tol · scale[row] + floor, with (tol, floor) from [`norm_tol`].
/// Returns (max |Δ|, max |Δ| / scale).
fn check_rows(
    name: &str,
    got: &[f32],
    expected: &[f32],
    len: usize,
    scale: &[f64],
    (tol, floor): (f64, f64),
) -> (f64, f64) {
    assert_eq!(got.len(), expected.len(), "{name}: length");
    let (mut max_abs, mut max_rel) = (0f64, 0f64);
    for (idx, (g, e)) in got.iter().zip(expected).enumerate() {
        let s = scale[idx / len];
        let d = (*g as f64 - *e as f64).abs();
        assert!(
            g.is_finite() && d <= tol * s + floor,
            "{name}: out[{}, {}] = {g} vs reference {e} (|Δ| {d:e} > {tol:e} · {s:e})",
            idx / len,
            idx % len
        );
        max_abs = max_abs.max(d);
        if s > 0.0 {
            max_rel = max_rel.max(d / s);
        }
    }
    (max_abs, max_rel)
}

/// Per-row max |v| of a `[rows, len]` buffer.
fn row_max(v: &[f32], len: usize) -> Vec<f64> {
    v.chunks(len)
        .map(|r| r.iter().fold(0f64, |a, x| a.max(x.abs() as f64)))
        .collect()
}

fn rms_norm_grid<F: FloatElement>() {
    let dev = WgpuDevice::default();
    let tol = norm_tol::<F>(1.0);
    let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
    let start = std::time::Instant::now();
    // (name, rows, dim, weight, x amplitude, layout)
    let cases: [(&str, usize, usize, bool, f32, Layout); 12] = [
        ("rows1_dim1_w", 1, 1, true, 2.0, Layout::Contiguous),
        ("rows3_dim7", 3, 7, false, 2.0, Layout::Contiguous),
        (
            "rows300_dim8_w_128_rows_per_cube",
            300,
            8,
            true,
            1.0,
            Layout::Contiguous,
        ),
        ("rows2_dim48_w", 2, 48, true, 1e3, Layout::Contiguous),
        (
            "rows5_dim130_w_transposed",
            5,
            130,
            true,
            1.0,
            Layout::Transposed,
        ),
        (
            "rows33_dim256_4_rows_per_cube",
            33,
            256,
            false,
            1e-3,
            Layout::Contiguous,
        ),
        (
            "rows4_dim1000_column_slice",
            4,
            1000,
            false,
            3.0,
            Layout::ColumnSlice,
        ),
        ("rows1_dim1001_w", 1, 1001, true, 1.0, Layout::Contiguous),
        ("rows1_dim5376_w", 1, 5376, true, 1.0, Layout::Contiguous),
        (
            "rows7_dim5376_w_row_offset",
            7,
            5376,
            true,
            20.0,
            Layout::RowOffset,
        ),
        ("rows2_dim21504_w", 2, 21504, true, 1.0, Layout::Contiguous),
        ("rows1_dim21503", 1, 21503, false, 1.0, Layout::Contiguous),
    ];
    for (n, &(name, rows, dim, has_w, amp, layout)) in cases.iter().enumerate() {
        let mut rng = Lcg::new(100 + n as u64 + if is_f16::<F>() { 50 } else { 0 });
        let x = round::<F>(&random(&mut rng, rows * dim, amp));
        let w: Vec<f32> = round::<F>(&random(&mut rng, dim, 1.5));
        let expected = values(reference::rms_norm(
            cpu2(&x, rows, dim),
            has_w.then(|| cpu1(&w)),
            EPS,
        ));
        let poisoned = Tensor::<Gpu<F>, 2>::full([rows, dim], f32::NAN, opts::<F>(&dev));
        let got = rms_norm(
            gpu2::<F>(&x, rows, dim, layout, &dev),
            has_w.then(|| gpu1::<F>(&w, &dev)),
            EPS,
            Some(poisoned),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.dims(), [rows, dim], "{name}");
        let (abs, rel) = check_rows(
            name,
            &read(got),
            &expected,
            dim,
            &row_max(&expected, dim),
            tol,
        );
        eprintln!("rms_norm      {:?} {name:<36} max |Δ| = {abs:.2e}, / row scale = {rel:.2e} (tol {:.2e})", dtype::<F>(), tol.0);
        worst_abs = worst_abs.max(abs);
        worst_rel = worst_rel.max(rel);
    }
    eprintln!(
        "rms_norm      {:?} whole grid: max |Δ| = {worst_abs:.2e}, / row scale = {worst_rel:.2e}; took {:.1} s",
        dtype::<F>(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn rms_norm_matches_reference_f32() {
    rms_norm_grid::<f32>();
}

#[test]
fn rms_norm_matches_reference_f16() {
    rms_norm_grid::<f16>();
}

fn rms_norm_add_grid<F: FloatElement>() {
    let dev = WgpuDevice::default();
    let tol = norm_tol::<F>(1.0);
    let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
    let start = std::time::Instant::now();
    // (name, rows, dim, scale, layout); the last case has 65 537 cubes: a 2-D grid.
    let cases: [(&str, usize, usize, f32, Layout); 8] = [
        ("rows1_dim1_scale1", 1, 1, 1.0, Layout::Contiguous),
        ("rows3_dim7_scale0.37", 3, 7, 0.37, Layout::Contiguous),
        ("rows2_dim48_scale1", 2, 48, 1.0, Layout::Contiguous),
        (
            "rows5_dim130_scale-2.5_transposed",
            5,
            130,
            -2.5,
            Layout::Transposed,
        ),
        (
            "rows4_dim1000_scale0.37_column_slice",
            4,
            1000,
            0.37,
            Layout::ColumnSlice,
        ),
        ("rows1_dim5376_scale1", 1, 5376, 1.0, Layout::Contiguous),
        ("rows3_dim21504_scale0.5", 3, 21504, 0.5, Layout::Contiguous),
        (
            "rows65537_dim129_scale0.8_grid2d",
            65_537,
            129,
            0.8,
            Layout::Contiguous,
        ),
    ];
    for (n, &(name, rows, dim, scale, layout)) in cases.iter().enumerate() {
        let mut rng = Lcg::new(200 + n as u64 + if is_f16::<F>() { 50 } else { 0 });
        let residual = round::<F>(&random(&mut rng, rows * dim, 30.0));
        let x = round::<F>(&random(&mut rng, rows * dim, 2.0));
        let w = round::<F>(&random(&mut rng, dim, 1.5));
        let expected = values(reference::rms_norm_add(
            cpu2(&residual, rows, dim),
            cpu2(&x, rows, dim),
            cpu1(&w),
            EPS,
            scale,
        ));
        let normed = values(reference::rms_norm(
            cpu2(&x, rows, dim),
            Some(cpu1(&w)),
            EPS,
        ));
        let row_scale: Vec<f64> = residual
            .chunks(dim)
            .zip(normed.chunks(dim))
            .map(|(r, m)| {
                r.iter()
                    .zip(m)
                    .fold(0f64, |a, (r, m)| a.max((r.abs() + m.abs()) as f64))
                    * scale.abs() as f64
            })
            .collect();
        let poisoned = Tensor::<Gpu<F>, 2>::full([rows, dim], f32::NAN, opts::<F>(&dev));
        let got = rms_norm_add(
            gpu2::<F>(&residual, rows, dim, Layout::Contiguous, &dev),
            gpu2::<F>(&x, rows, dim, layout, &dev),
            gpu1::<F>(&w, &dev),
            EPS,
            scale,
            Some(poisoned),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.dims(), [rows, dim], "{name}");
        let (abs, rel) = check_rows(name, &read(got), &expected, dim, &row_scale, tol);
        eprintln!("rms_norm_add  {:?} {name:<36} max |Δ| = {abs:.2e}, / row scale = {rel:.2e} (tol {:.2e})", dtype::<F>(), tol.0);
        worst_abs = worst_abs.max(abs);
        worst_rel = worst_rel.max(rel);
    }
    eprintln!(
        "rms_norm_add  {:?} whole grid: max |Δ| = {worst_abs:.2e}, / row scale = {worst_rel:.2e}; took {:.1} s",
        dtype::<F>(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn rms_norm_add_matches_reference_f32() {
    rms_norm_add_grid::<f32>();
}

#[test]
fn rms_norm_add_matches_reference_f16() {
    rms_norm_add_grid::<f16>();
}

/// cos/sin `[t, d]` of positions p0..p0+t: emb = cat(freqs, freqs), freqs[k] = pos · θ^(−2k/d).
fn rope_tables(p0: usize, t: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let half = d / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(t * d), Vec::with_capacity(t * d));
    for i in 0..t {
        for j in 0..d {
            let k = j % half;
            let angle = (p0 + i) as f64 * 1e6f64.powf(-2.0 * k as f64 / d as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

fn rms_norm_rope_grid<F: FloatElement>() {
    let dev = WgpuDevice::default();
    let tol = norm_tol::<F>(2.0);
    let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
    let start = std::time::Instant::now();
    // (name, t, heads, d, weight, non-contiguous x (stored [heads, t, d]) and cos/sin at an offset)
    let cases: [(&str, usize, usize, usize, bool, bool); 10] = [
        ("t1_h1_d2_w", 1, 1, 2, true, false),
        ("t3_h2_d8", 3, 2, 8, false, false),
        ("t5_h3_d12_w", 5, 3, 12, true, false),
        ("t4_h4_d72_w_strided", 4, 4, 72, true, true),
        ("t3_h5_d130", 3, 5, 130, false, false),
        ("t2_h3_d130_w_strided", 2, 3, 130, true, true),
        ("t1_h32_d256_w_decode", 1, 32, 256, true, false),
        ("t9_h16_d256_w_strided", 9, 16, 256, true, true),
        ("t1_h4_d512_w", 1, 4, 512, true, false),
        ("t17_h4_d512", 17, 4, 512, false, false),
    ];
    for (n, &(name, t, heads, d, has_w, strided)) in cases.iter().enumerate() {
        let mut rng = Lcg::new(300 + n as u64 + if is_f16::<F>() { 50 } else { 0 });
        let x = round::<F>(&random(&mut rng, t * heads * d, 3.0));
        let w = round::<F>(&random(&mut rng, d, 1.5));
        let p0 = (rng.next_u32() % 100_000) as usize;
        let (cos, sin) = rope_tables(p0, t, d);
        let (cos, sin) = (round::<F>(&cos), round::<F>(&sin));
        let xd = [t, heads, d];
        let cpu_x =
            Tensor::<Cpu, 3>::from_data(TensorData::new(x.clone(), xd), &Default::default());
        let expected = values(reference::rms_norm_rope(
            cpu_x,
            has_w.then(|| cpu1(&w)),
            EPS,
            cpu2(&cos, t, d),
            cpu2(&sin, t, d),
        ));
        let normed = values(reference::rms_norm(
            cpu2(&x, t * heads, d),
            has_w.then(|| cpu1(&w)),
            EPS,
        ));

        let gx = if strided {
            let mut p = vec![0f32; t * heads * d];
            for i in 0..t {
                for h in 0..heads {
                    let src = (i * heads + h) * d;
                    p[(h * t + i) * d..(h * t + i + 1) * d].copy_from_slice(&x[src..src + d]);
                }
            }
            Tensor::<Gpu<F>, 3>::from_data(TensorData::new(p, [heads, t, d]), opts::<F>(&dev))
                .swap_dims(0, 1)
        } else {
            Tensor::<Gpu<F>, 3>::from_data(TensorData::new(x.clone(), xd), opts::<F>(&dev))
        };
        let layout = if strided {
            Layout::RowOffset
        } else {
            Layout::Contiguous
        };
        let poisoned = Tensor::<Gpu<F>, 3>::full(xd, f32::NAN, opts::<F>(&dev));
        let got = rms_norm_rope(
            gx,
            has_w.then(|| gpu1::<F>(&w, &dev)),
            EPS,
            gpu2::<F>(&cos, t, d, layout, &dev),
            gpu2::<F>(&sin, t, d, layout, &dev),
            Some(poisoned),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.dims(), xd, "{name}");
        let (abs, rel) = check_rows(name, &read(got), &expected, d, &row_max(&normed, d), tol);
        eprintln!("rms_norm_rope {:?} {name:<36} max |Δ| = {abs:.2e}, / row scale = {rel:.2e} (tol {:.2e})", dtype::<F>(), tol.0);
        worst_abs = worst_abs.max(abs);
        worst_rel = worst_rel.max(rel);
    }
    eprintln!(
        "rms_norm_rope {:?} whole grid: max |Δ| = {worst_abs:.2e}, / row scale = {worst_rel:.2e}; took {:.1} s",
        dtype::<F>(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn rms_norm_rope_matches_reference_f32() {
    rms_norm_rope_grid::<f32>();
}

#[test]
fn rms_norm_rope_matches_reference_f16() {
    rms_norm_rope_grid::<f16>();
}

/// Checks gelu_tanh(gate)·up against the reference; returns (max |Δ|, max |Δ| / (|gate|·|up|),
/// max |Δ| / tolerance).
fn check_gelu<F: FloatElement>(
    name: &str,
    gate: &[f32],
    up: &[f32],
    rows: usize,
    width: usize,
    layout: Layout,
    dev: &WgpuDevice,
) -> (f64, f64, f64) {
    let expected = values(reference::gelu_tanh_mul(
        cpu2(gate, rows, width),
        cpu2(up, rows, width),
    ));
    let poisoned = Tensor::<Gpu<F>, 2>::full([rows, width], f32::NAN, opts::<F>(dev));
    let got = gelu_tanh_mul(
        gpu2::<F>(gate, rows, width, layout, dev),
        gpu2::<F>(up, rows, width, Layout::Contiguous, dev),
        Some(poisoned),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(got.dims(), [rows, width], "{name}");
    let got = read(got);
    let (mut max_abs, mut max_rel, mut max_frac) = (0f64, 0f64, 0f64);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        let s = (gate[i] as f64).abs() * (up[i] as f64).abs();
        let d = (*g as f64 - *e as f64).abs();
        let tol = if is_f16::<F>() {
            GELU_TOL * s + F16_ROUNDOFF * (*e as f64).abs() + F16_SUBNORMAL_HALF_ULP
        } else {
            GELU_TOL * s + 1e-30
        };
        assert!(
            g.is_finite() && d <= tol,
            "{name} {:?}: out[{i}] = {g} vs reference {e} for gate {} up {} (|Δ| {d:e})",
            dtype::<F>(),
            gate[i],
            up[i]
        );
        max_abs = max_abs.max(d);
        max_frac = max_frac.max(d / tol);
        if s > 0.0 {
            max_rel = max_rel.max(d / s);
        }
    }
    (max_abs, max_rel, max_frac)
}

fn gelu_grid<F: FloatElement>() {
    let dev = WgpuDevice::default();
    let (mut worst_abs, mut worst_rel, mut worst_frac) = (0f64, 0f64, 0f64);
    let start = std::time::Instant::now();
    // (name, rows, width, gate amplitude, layout); the last case has 65 793 cubes: a 2-D grid.
    let cases: [(&str, usize, usize, f32, Layout); 9] = [
        ("rows1_w1", 1, 1, 3.0, Layout::Contiguous),
        ("rows3_w7", 3, 7, 3.0, Layout::Contiguous),
        ("rows2_w48", 2, 48, 6.0, Layout::Contiguous),
        ("rows5_w130_transposed", 5, 130, 6.0, Layout::Transposed),
        (
            "rows4_w1000_column_slice",
            4,
            1000,
            10.0,
            Layout::ColumnSlice,
        ),
        ("rows3_w1001", 3, 1001, 6.0, Layout::Contiguous),
        ("rows1_w21504", 1, 21504, 6.0, Layout::Contiguous),
        ("rows5_w21504_row_offset", 5, 21504, 6.0, Layout::RowOffset),
        (
            "rows65537_w257_grid2d",
            65_537,
            257,
            6.0,
            Layout::Contiguous,
        ),
    ];
    for (n, &(name, rows, width, amp, layout)) in cases.iter().enumerate() {
        let mut rng = Lcg::new(400 + n as u64 + if is_f16::<F>() { 50 } else { 0 });
        let gate = round::<F>(&random(&mut rng, rows * width, amp));
        let up = round::<F>(&random(&mut rng, rows * width, 2.0));
        let (abs, rel, frac) = check_gelu::<F>(name, &gate, &up, rows, width, layout, &dev);
        eprintln!("gelu_tanh_mul {:?} {name:<36} max |Δ| = {abs:.2e}, / |gate·up| = {rel:.2e}, / tolerance = {frac:.2}", dtype::<F>());
        worst_abs = worst_abs.max(abs);
        worst_rel = worst_rel.max(rel);
        worst_frac = worst_frac.max(frac);
    }
    eprintln!(
        "gelu_tanh_mul {:?} whole grid: max |Δ| = {worst_abs:.2e}, / |gate·up| = {worst_rel:.2e}, / tolerance = {worst_frac:.2}; took {:.1} s",
        dtype::<F>(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn gelu_tanh_mul_matches_reference_f32() {
    gelu_grid::<f32>();
}

#[test]
fn gelu_tanh_mul_matches_reference_f16() {
    gelu_grid::<f16>();
}

/// Large |gate| must neither overflow nor turn into NaN: gelu(x) → x for x → +∞, → 0 for −∞.
/// (±1e4 and 1e4 · 1.5 are within f16's range, 65 504.)
fn gelu_large<F: FloatElement>() {
    let dev = WgpuDevice::default();
    let special = [
        0.0f32, 1e-6, -1e-6, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 5.0, -5.0, 9.0, -9.0,
        10.0, -10.0, 30.0, -30.0, 100.0, -100.0, 1e3, -1e3, 1e4, -1e4,
    ];
    let mut rng = Lcg::new(500);
    for (label, width) in [("vector", 100usize), ("scalar", 75)] {
        let gate: Vec<f32> = round::<F>(
            &(0..width)
                .map(|i| special[i % special.len()])
                .collect::<Vec<_>>(),
        );
        let up: Vec<f32> =
            round::<F>(&(0..width).map(|_| 0.5 + rng.next_f32()).collect::<Vec<_>>());
        let name = format!("special_values_{label}");
        let (abs, rel, frac) =
            check_gelu::<F>(&name, &gate, &up, 1, width, Layout::Contiguous, &dev);
        eprintln!("gelu_tanh_mul {:?} {name:<36} max |Δ| = {abs:.2e}, / |gate·up| = {rel:.2e}, / tolerance = {frac:.2}", dtype::<F>());
    }
    // The extremes exactly: gelu(1e4) = 1e4, gelu(-1e4) = 0 (to 1e-30).
    let out = read(
        gelu_tanh_mul(
            Tensor::<Gpu<F>, 2>::from_data(
                TensorData::new(vec![1e4f32, -1e4, 30.0, -30.0], [1, 4]),
                opts::<F>(&dev),
            ),
            Tensor::<Gpu<F>, 2>::ones([1, 4], opts::<F>(&dev)),
            None,
        )
        .unwrap(),
    );
    assert_eq!(out[0], 1e4, "{out:?}");
    assert!(out[1].abs() < 1e-30, "{out:?}");
    assert_eq!(out[2], 30.0, "{out:?}");
    assert!(out[3].abs() < 1e-30, "{out:?}");
}

#[test]
fn gelu_tanh_mul_large_inputs_f32() {
    gelu_large::<f32>();
}

#[test]
fn gelu_tanh_mul_large_inputs_f16() {
    gelu_large::<f16>();
}

/// Without `out`, or with an `out` someone else still holds, the kernels allocate their own
/// result and leave the held tensor untouched.
#[test]
fn output_allocation() {
    let dev = WgpuDevice::default();
    let mut rng = Lcg::new(600);
    let (rows, dim) = (3usize, 40usize);
    let x = random(&mut rng, rows * dim, 2.0);
    let expected = values(reference::rms_norm(cpu2(&x, rows, dim), None, EPS));
    let scale = row_max(&expected, dim);

    let got = rms_norm(
        gpu2::<f32>(&x, rows, dim, Layout::Contiguous, &dev),
        None,
        EPS,
        None,
    )
    .unwrap();
    check_rows(
        "rms_norm_no_out",
        &read(got),
        &expected,
        dim,
        &scale,
        norm_tol::<f32>(1.0),
    );

    let held = Tensor::<Gpu, 2>::full([rows, dim], f32::NAN, opts::<f32>(&dev));
    let got = rms_norm(
        gpu2::<f32>(&x, rows, dim, Layout::Contiguous, &dev),
        None,
        EPS,
        Some(held.clone()),
    )
    .unwrap();
    check_rows(
        "rms_norm_shared_out",
        &read(got),
        &expected,
        dim,
        &scale,
        norm_tol::<f32>(1.0),
    );
    assert!(
        values(held).iter().all(|v| v.is_nan()),
        "a shared out tensor was written"
    );
}

#[test]
fn refusals_carry_the_numbers() {
    let dev = WgpuDevice::default();
    let z2 = |a: usize, b: usize| Tensor::<Gpu, 2>::zeros([a, b], opts::<f32>(&dev));
    let z1 = |a: usize| Tensor::<Gpu, 1>::zeros([a], opts::<f32>(&dev));
    let z3 = |a: usize, b: usize, c: usize| Tensor::<Gpu, 3>::zeros([a, b, c], opts::<f32>(&dev));
    let shape = |what: &'static str, expected: &[usize], got: &[usize]| FusedError::Shape {
        what,
        expected: expected.to_vec(),
        got: got.to_vec(),
    };

    assert_eq!(
        rms_norm(z2(2, 8), Some(z1(9)), EPS, None).unwrap_err(),
        shape("weight", &[8], &[9])
    );
    assert_eq!(
        rms_norm(z2(2, 8), None, EPS, Some(z2(2, 9))).unwrap_err(),
        shape("out", &[2, 8], &[2, 9])
    );
    assert_eq!(
        rms_norm(z2(0, 8), None, EPS, None).unwrap_err(),
        FusedError::Empty {
            what: "x",
            shape: vec![0, 8]
        }
    );
    assert_eq!(
        rms_norm_add(z2(3, 8), z2(2, 8), z1(8), EPS, 1.0, None).unwrap_err(),
        shape("residual", &[2, 8], &[3, 8])
    );
    assert_eq!(
        rms_norm_add(z2(2, 8), z2(2, 8), z1(4), EPS, 1.0, None).unwrap_err(),
        shape("weight", &[8], &[4])
    );
    assert_eq!(
        rms_norm_rope(z3(2, 3, 7), None, EPS, z2(2, 7), z2(2, 7), None).unwrap_err(),
        FusedError::OddHeadDim { d: 7 }
    );
    assert_eq!(
        rms_norm_rope(z3(2, 3, 8), None, EPS, z2(1, 8), z2(2, 8), None).unwrap_err(),
        shape("cos", &[2, 8], &[1, 8])
    );
    assert_eq!(
        rms_norm_rope(z3(2, 3, 8), None, EPS, z2(2, 8), z2(2, 4), None).unwrap_err(),
        shape("sin", &[2, 8], &[2, 4])
    );
    assert_eq!(
        rms_norm_rope(z3(2, 3, 8), Some(z1(4)), EPS, z2(2, 8), z2(2, 8), None).unwrap_err(),
        shape("weight", &[8], &[4])
    );
    assert_eq!(
        gelu_tanh_mul(z2(2, 8), z2(2, 7), None).unwrap_err(),
        shape("up", &[2, 8], &[2, 7])
    );
    assert_eq!(
        gelu_tanh_mul(z2(2, 0), z2(2, 0), None).unwrap_err(),
        FusedError::Empty {
            what: "gate",
            shape: vec![2, 0]
        }
    );
    let msg = rms_norm(z2(2, 8), Some(z1(9)), EPS, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains('8') && msg.contains('9'), "{msg}");
}
