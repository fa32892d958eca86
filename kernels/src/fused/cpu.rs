//! The fused steps of [`super`] on the CPU, over plain slices: one pass per row instead of the
//! reference's chain of ndarray operations (each allocating and writing a full tensor, and
//! burn's gelu calling `powf`, `tanh` and `expm1` per element). Rows are independent, so the
//! loops are plain and LLVM vectorizes them; sums are f32 in 8 lanes, like a SIMD reduction.

use crate::attention::cpu::dot;
use crate::simd::{Isa, Kernel, Simd};

/// `(mean(x²) + eps)^-½` of one row, as the reference forms it (f32 mean, then the power).
fn inv_rms(row: &[f32], eps: f64) -> f32 {
    (dot(row, row) / row.len() as f32 + eps as f32).powf(-0.5)
}

/// RMSNorm of `rows` rows of `dim`: `out = x · r · w` (w = 1 when None), or with `residual`,
/// `out = (residual + x · r · w) · scale`. All slices are `[rows, dim]` (w `[dim]`).
pub fn rms_norm(
    x: &[f32],
    dim: usize,
    weight: Option<&[f32]>,
    eps: f64,
    residual: Option<(&[f32], f32)>,
    out: &mut [f32],
) {
    assert_eq!(x.len(), out.len(), "rms_norm: x and out differ in length");
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "rms_norm: {} elements are not rows of {dim}",
        x.len()
    );
    if let Some(w) = weight {
        assert_eq!(
            w.len(),
            dim,
            "rms_norm: weight has {} elements, rows {dim}",
            w.len()
        );
    }
    if let Some((r, _)) = residual {
        assert_eq!(
            r.len(),
            x.len(),
            "rms_norm: residual and x differ in length"
        );
    }
    for (i, (row, o)) in x
        .chunks_exact(dim)
        .zip(out.chunks_exact_mut(dim))
        .enumerate()
    {
        let r = inv_rms(row, eps);
        match weight {
            Some(w) => o
                .iter_mut()
                .zip(row)
                .zip(w)
                .for_each(|((o, x), w)| *o = x * r * w),
            None => o.iter_mut().zip(row).for_each(|(o, x)| *o = x * r),
        }
        if let Some((res, scale)) = residual {
            let res = &res[i * dim..(i + 1) * dim];
            o.iter_mut()
                .zip(res)
                .for_each(|(o, h)| *o = (h + *o) * scale);
        }
    }
}

/// Per-head RMSNorm then rotate-half RoPE: x and out `[t, heads, d]`, cos/sin `[t, d]`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_rope(
    x: &[f32],
    heads: usize,
    d: usize,
    weight: Option<&[f32]>,
    eps: f64,
    cos: &[f32],
    sin: &[f32],
    out: &mut [f32],
) {
    let t = cos.len() / d.max(1);
    assert!(
        d > 0 && d.is_multiple_of(2),
        "rms_norm_rope: head_dim {d} must be even"
    );
    assert_eq!(
        x.len(),
        t * heads * d,
        "rms_norm_rope: x is not [{t}, {heads}, {d}]"
    );
    assert_eq!(
        (sin.len(), out.len()),
        (cos.len(), x.len()),
        "rms_norm_rope: sin/out shapes"
    );
    if let Some(w) = weight {
        assert_eq!(
            w.len(),
            d,
            "rms_norm_rope: weight has {} elements, head_dim {d}",
            w.len()
        );
    }
    let half = d / 2;
    let mut n = vec![0f32; d];
    for (i, (row, o)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        let pos = i / heads;
        let (c, s) = (&cos[pos * d..(pos + 1) * d], &sin[pos * d..(pos + 1) * d]);
        let r = inv_rms(row, eps);
        match weight {
            Some(w) => n
                .iter_mut()
                .zip(row)
                .zip(w)
                .for_each(|((n, x), w)| *n = x * r * w),
            None => n.iter_mut().zip(row).for_each(|(n, x)| *n = x * r),
        }
        for j in 0..half {
            o[j] = n[j] * c[j] - n[j + half] * s[j];
            o[j + half] = n[j + half] * c[j + half] + n[j] * s[j + half];
        }
    }
}

/// `gelu_tanh(gate) · up`, element-wise: gelu_tanh(x) = 0.5·x·(1 + tanh(z)) = x / (1 + e^(−2z)),
/// z = √(2/π)·(x + 0.044715·x³), one `exp` per element; the exponent is clamped to [−87, 88] so
/// that no inf/inf appears (large negative x gives a vanishing x / e^88, as tanh → −1 does).
pub fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    gelu_tanh_mul_with(Isa::detect(), gate, up, out)
}

/// [`gelu_tanh_mul`] on a given instruction set: the same loop (with a polynomial `exp` that
/// vectorizes, unlike libm's) compiled for AVX2 or AVX-512 inside `#[target_feature]` functions.
pub fn gelu_tanh_mul_with(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert_eq!(
        (gate.len(), up.len()),
        (out.len(), out.len()),
        "gelu_tanh_mul: lengths differ"
    );
    isa.dispatch(GeluMul(gate, up, out))
}

/// [`gelu_loop`] compiled for the path that runs it.
struct GeluMul<'a>(&'a [f32], &'a [f32], &'a mut [f32]);

impl Kernel for GeluMul<'_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        gelu_loop(self.0, self.1, self.2)
    }
}

#[inline(always)]
fn gelu_loop(gate: &[f32], up: &[f32], out: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        let z = SQRT_2_OVER_PI * (g + 0.044715 * g * g * g);
        *o = g / (1.0 + exp((-2.0 * z).clamp(-87.0, 88.0))) * u;
    }
}

/// e^x for x in [−87, 88], Cephes' `expf`: x = n·ln 2 + r with |r| ≤ ln 2 / 2 (ln 2 split in two
/// parts for exactness), a degree-6 polynomial for e^r, times 2^n built in the exponent bits.
/// About 1 ulp; plain arithmetic, so it vectorizes.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes writes 5.0000001e-1, which is 0.5 in f32
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::reference;
    use crate::testing::{Cpu, Lcg};
    use burn::prelude::*;
    use burn::tensor::TensorData;

    fn random(rng: &mut Lcg, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * amp).collect()
    }

    fn vec2(t: Tensor<Cpu, 2>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    /// max |a − b| / max(1, max |b|) over the whole output.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
            / scale
    }

    // Tolerance 2e-6 of the output's scale: both sides are f32 with the same operations but a
    // different summation order (a few ulps); a wrong weight, row or sign is off by O(1).
    const TOL: f32 = 2e-6;

    #[test]
    fn norms_match_reference() {
        let dev = Default::default();
        let mut rng = Lcg::new(11);
        for (rows, dim) in [
            (1usize, 1usize),
            (3, 7),
            (5, 48),
            (2, 130),
            (4, 1000),
            (1, 5376),
        ] {
            let x = random(&mut rng, rows * dim, 3.0);
            let h = random(&mut rng, rows * dim, 30.0);
            let w = random(&mut rng, dim, 1.5);
            let xt = || Tensor::<Cpu, 2>::from_data(TensorData::new(x.clone(), [rows, dim]), &dev);
            let wt = || Tensor::<Cpu, 1>::from_data(TensorData::new(w.clone(), [dim]), &dev);
            for weight in [None, Some(&w[..])] {
                let mut out = vec![f32::NAN; rows * dim];
                rms_norm(&x, dim, weight, 1e-6, None, &mut out);
                let e = vec2(reference::rms_norm(xt(), weight.map(|_| wt()), 1e-6));
                assert!(
                    rel_err(&out, &e) <= TOL,
                    "rms_norm {rows}x{dim} weight {}: {}",
                    weight.is_some(),
                    rel_err(&out, &e)
                );
            }
            for scale in [1.0f32, 0.37] {
                let mut out = vec![f32::NAN; rows * dim];
                rms_norm(&x, dim, Some(&w), 1e-6, Some((&h, scale)), &mut out);
                let ht = Tensor::<Cpu, 2>::from_data(TensorData::new(h.clone(), [rows, dim]), &dev);
                let e = vec2(reference::rms_norm_add(ht, xt(), wt(), 1e-6, scale));
                assert!(
                    rel_err(&out, &e) <= TOL,
                    "rms_norm_add {rows}x{dim} scale {scale}: {}",
                    rel_err(&out, &e)
                );
            }
        }
    }

    #[test]
    fn norm_rope_matches_reference() {
        let dev = Default::default();
        let mut rng = Lcg::new(12);
        for (t, heads, d) in [
            (1usize, 1usize, 2usize),
            (3, 2, 8),
            (5, 4, 72),
            (2, 3, 256),
            (1, 2, 512),
        ] {
            let x = random(&mut rng, t * heads * d, 2.0);
            let w = random(&mut rng, d, 1.5);
            let (cos, sin) = (random(&mut rng, t * d, 1.0), random(&mut rng, t * d, 1.0));
            for weight in [None, Some(&w[..])] {
                let mut out = vec![f32::NAN; x.len()];
                rms_norm_rope(&x, heads, d, weight, 1e-6, &cos, &sin, &mut out);
                let e: Vec<f32> = reference::rms_norm_rope(
                    Tensor::<Cpu, 3>::from_data(TensorData::new(x.clone(), [t, heads, d]), &dev),
                    weight.map(|w| Tensor::from_data(TensorData::new(w.to_vec(), [d]), &dev)),
                    1e-6,
                    Tensor::from_data(TensorData::new(cos.clone(), [t, d]), &dev),
                    Tensor::from_data(TensorData::new(sin.clone(), [t, d]), &dev),
                )
                .into_data()
                .to_vec()
                .unwrap();
                assert!(
                    rel_err(&out, &e) <= TOL,
                    "[{t}, {heads}, {d}] weight {}: {}",
                    weight.is_some(),
                    rel_err(&out, &e)
                );
            }
        }
    }

    #[test]
    fn gelu_gate_matches_reference() {
        let dev = Default::default();
        let mut rng = Lcg::new(13);
        let mut gate = random(&mut rng, 1000, 6.0);
        // Where the polynomial's argument range is widest, and both clamps.
        gate.extend((0..200).map(|i| -12.0 + 0.12 * i as f32));
        gate.extend([0.0, -0.0, 30.0, -30.0, 1e4, -1e4, 1e-30, -1e-30]);
        let up = random(&mut rng, gate.len(), 2.0);
        let n = gate.len();
        let e = vec2(reference::gelu_tanh_mul(
            Tensor::<Cpu, 2>::from_data(TensorData::new(gate.clone(), [1, n]), &dev),
            Tensor::<Cpu, 2>::from_data(TensorData::new(up.clone(), [1, n]), &dev),
        ));
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; n];
            gelu_tanh_mul_with(isa, &gate, &up, &mut out);
            // Per element, relative to |gate · up| (gelu(x) ≤ |x|): the formula and the
            // polynomial exp differ from burn's tanh chain by rounding only.
            for i in 0..n {
                let tol = 2e-6 * (gate[i] * up[i]).abs().max(1e-30);
                assert!(
                    (out[i] - e[i]).abs() <= tol,
                    "{isa:?}: gate {} up {}: {} vs {}",
                    gate[i],
                    up[i],
                    out[i],
                    e[i]
                );
            }
        }
    }
}
