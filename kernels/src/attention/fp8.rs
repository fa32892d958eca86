//! The FP8 KV cache: keys and values stored as E4M3 ("fn": bias 7, no infinities, max 448) codes
//! with one f32 scale per tensor and layer (vLLM's `--kv-cache-dtype fp8`): stored code =
//! e4m3(x / scale), rounded to nearest even and saturated to ±448 (vLLM's cache write converts with
//! `__NV_SATFINITE`; torch's plain `to(float8_e4m3fn)` rounds the same way but gives NaN past
//! 464), read value = e4m3 · scale. The scale is the checkpoint's `k_scale` / `v_scale` where
//! ModelOpt exported them, else 1.0, as vLLM does.
//!
//! Layout: a pool `[kv_heads, slots, d / 4]` of i32 words (the CubeCL backends have no u8
//! tensors), element 4i + b of a row in byte b (bits 8b..8b+8) of word i. Half the bytes of an
//! f16/bf16 cache, a quarter of an f32 one.
//!
//! This module holds the scalar codec (shared by every path) and the plain Burn reference of the
//! pool's write and read; the attention over it is `reference::paged_attention_fp8`, the CPU loop
//! in `cpu`, the CubeCL kernels in `kv_write` and `flash`.

use burn::prelude::*;
use burn::tensor::TensorData;

pub use crate::nvfp4::e4m3_to_f32;

/// The largest finite E4M3 value; codes saturate here.
pub const E4M3_MAX: f32 = 448.0;

/// E4M3 codes per i32 word of the pool.
pub const PER_WORD: usize = 4;

/// The per-tensor scales of one layer's fp8 K and V pools.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvScales {
    pub k: f32,
    pub v: f32,
}

impl Default for KvScales {
    /// Scale 1: vLLM's default when the checkpoint has no KV scales.
    fn default() -> Self {
        KvScales { k: 1.0, v: 1.0 }
    }
}

/// x to its E4M3 code: round to nearest, ties to even; |x| ≥ 448 (and ±inf) saturate to ±448;
/// NaN to 0x7f.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    // 448 is the top code (0x7e); anything that would round past it saturates.
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    let bits = a.to_bits();
    let exp = (bits >> 23) as i32 - 127;
    if exp < -6 {
        // Below the smallest normal 2^-6: multiples of 2^-9; a · 2^9 is exact in f32, and a
        // result of 8 is the code of 2^-6 (0x08).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Keep 3 of the 23 mantissa bits, ties to even; a carry into the exponent is the next binade.
    let keep = (bits >> 20) & 1;
    let rounded = (bits + 0x7_ffff + keep) >> 20;
    let e = (rounded >> 3) as i32 - 127 + 7;
    let m = rounded & 7;
    // a < 448 rounds to at most 448 (e 15, m 6).
    sign | ((e as u8) << 3) | m as u8
}

/// A row of `d` values quantized with `1 / scale` and packed 4 codes per word (`d / 4` words).
pub fn quantize_row(x: &[f32], inv_scale: f32, words: &mut [i32]) {
    debug_assert_eq!(x.len(), words.len() * PER_WORD);
    for (w, chunk) in words.iter_mut().zip(x.chunks_exact(PER_WORD)) {
        let mut word = 0u32;
        for (b, &v) in chunk.iter().enumerate() {
            word |= (f32_to_e4m3(v * inv_scale) as u32) << (8 * b);
        }
        *w = word as i32;
    }
}

/// The 256 E4M3 values times `scale`, indexed by code: the CPU loops decode by lookup.
pub fn scaled_table(scale: f32) -> [f32; 256] {
    std::array::from_fn(|c| e4m3_to_f32(c as u8) * scale)
}

/// Unpacks a row of `words` through a [`scaled_table`] into `out` (`4 · words.len()` values).
#[inline(always)]
pub fn dequantize_row(words: &[i32], table: &[f32; 256], out: &mut [f32]) {
    for (o, &w) in out.chunks_exact_mut(PER_WORD).zip(words) {
        let w = w as u32;
        for (b, o) in o.iter_mut().enumerate() {
            *o = table[((w >> (8 * b)) & 0xff) as usize];
        }
    }
}

/// Why a head_dim cannot be stored in fp8 words, or None.
pub fn check_head_dim(d: usize) -> Option<String> {
    (!d.is_multiple_of(PER_WORD))
        .then(|| format!("head_dim {d} is not a multiple of {PER_WORD} (E4M3 codes per word)"))
}

/// Reference quantization: x `[.., d]` -> words `[.., d / 4]` (on the host: the reference is the
/// scalar codec above).
pub fn quantize<B: Backend, const D: usize>(x: Tensor<B, D>, scale: f32) -> Tensor<B, D, Int> {
    let mut dims = x.dims();
    let d = dims[D - 1];
    if let Some(why) = check_head_dim(d) {
        panic!("fp8 quantize: {why}");
    }
    let device = x.device();
    let values = x
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("a float tensor reads back as f32");
    let mut words = vec![0i32; values.len() / PER_WORD];
    for (row, w) in values
        .chunks_exact(d.max(1))
        .zip(words.chunks_exact_mut((d / PER_WORD).max(1)))
    {
        quantize_row(row, 1.0 / scale, w);
    }
    dims[D - 1] = d / PER_WORD;
    Tensor::from_data(TensorData::new(words, dims), &device)
}

/// Reference dequantization with tensor ops: words `[.., w]` -> `[.., 4w]` values · scale.
pub fn dequantize<B: Backend, const D: usize>(
    words: Tensor<B, D, Int>,
    scale: f32,
) -> Tensor<B, D> {
    let mut dims = words.dims();
    let bytes: Vec<Tensor<B, D, Int>> = (0..PER_WORD)
        .map(|b| {
            words
                .clone()
                .bitwise_right_shift_scalar(((8 * b) as i32).elem())
                .bitwise_and_scalar(0xff.elem())
        })
        .collect();
    // Byte b of word i is element 4i + b: stack the bytes last, then merge with the words.
    let stacked: Tensor<B, 3, Int> = Tensor::stack::<3>(
        bytes
            .into_iter()
            .map(|t| t.reshape([-1, 1]))
            .collect::<Vec<Tensor<B, 2, Int>>>(),
        2,
    );
    dims[D - 1] *= PER_WORD;
    let bytes: Tensor<B, D, Int> = stacked.reshape(dims);
    crate::nvfp4::e4m3_decode(bytes) * scale
}

/// Reference fp8 write: `new` `[n, kv_heads, d]` quantized with `scale` into `pool`
/// `[kv_heads, slots, d / 4]` at `slots`.
pub fn kv_write<B: Backend>(
    pool: Tensor<B, 3, Int>,
    new: Tensor<B, 3>,
    slots: &[u32],
    scale: f32,
) -> Tensor<B, 3, Int> {
    super::reference::write_rows(pool, quantize(new, scale), slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Cpu, Lcg};

    /// Hand-checked against the OCP FP8 spec (E4M3: bias 7, max 448 = 0x7e, min normal 2^-6 =
    /// 0x08, min subnormal 2^-9 = 0x01) and torch's `to(float8_e4m3fn)` rounding (nearest, ties
    /// to even); saturation as vLLM's cache write (`__NV_SATFINITE`).
    #[test]
    fn e4m3_rounding_matches_hand_checked_values() {
        let cases: &[(f32, u8)] = &[
            (0.0, 0x00),
            (-0.0, 0x80),
            (1.0, 0x38),
            (-1.0, 0xb8),
            (448.0, 0x7e),
            (-448.0, 0xfe),
            (0.0625, 0x18),      // 2^-4: e = 3, m = 0
            (0.015625, 0x08),    // 2^-6, the smallest normal
            (0.001953125, 0x01), // 2^-9, the smallest subnormal
            (0.013671875, 0x07), // 7 · 2^-9, the largest subnormal
            // Ties to even: 1 + 1/16 lies between 1 (m 0) and 1.125 (m 1): to 1.0.
            (1.0625, 0x38),
            // 1.1875 between 1.125 (m 1) and 1.25 (m 2): to 1.25 (even m).
            (1.1875, 0x3a),
            // Just above a tie rounds up.
            (1.0625 + 1e-6, 0x39),
            // Subnormal ties: 0.5 · 2^-9 -> 0, 1.5 · 2^-9 -> 2 · 2^-9, 2.5 · 2^-9 -> 2 · 2^-9.
            (0.5 * 0.001953125, 0x00),
            (1.5 * 0.001953125, 0x02),
            (2.5 * 0.001953125, 0x02),
            // 7.5 · 2^-9 rounds to 8 · 2^-9 = 2^-6, the first normal code.
            (7.5 * 0.001953125, 0x08),
            // Below half the smallest subnormal: zero, keeping the sign.
            (-1e-4, 0x80),
            // 15.5 · 16 = 248 is between 240 (e 14, m 7) and 256 (e 15, m 0): ties to even, 256.
            (248.0, 0x78),
            // 432 is the midpoint of 416 (m 5) and 448 (m 6): ties to even, 448; 424 to 416.
            (432.0, 0x7e),
            (424.0, 0x7d),
            (440.0, 0x7e),
            // Saturation: past 448, +-inf.
            (464.0, 0x7e),
            (1e6, 0x7e),
            (f32::INFINITY, 0x7e),
            (-1e6, 0xfe),
            (f32::NEG_INFINITY, 0xfe),
        ];
        for &(x, code) in cases {
            assert_eq!(f32_to_e4m3(x), code, "{x} -> {:#04x}", f32_to_e4m3(x));
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7f);
    }

    /// Every finite code decodes and re-encodes to itself, and every value rounds to a nearest
    /// code (ties to the even one).
    #[test]
    fn e4m3_round_trip_and_nearest() {
        for c in 0..=255u8 {
            if c & 0x7f == 0x7f {
                continue;
            }
            let v = e4m3_to_f32(c);
            let back = f32_to_e4m3(v);
            // -0.0 and 0.0 keep their sign.
            assert_eq!(back, c, "{c:#04x} = {v}");
        }
        let finite: Vec<f32> = (0..=0x7eu8).map(e4m3_to_f32).collect();
        let mut rng = Lcg::new(5);
        for _ in 0..20_000 {
            let x = rng.next_f32() * 460.0 * if rng.next_u32() & 1 == 0 { 1.0 } else { 1e-3 };
            let got = e4m3_to_f32(f32_to_e4m3(x));
            let best = finite
                .iter()
                .map(|&f| (f - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                ((got - x).abs() - best).abs() <= 0.0,
                "{x}: got {got}, nearest at distance {best}"
            );
        }
    }

    #[test]
    fn tensor_reference_round_trips_the_packing() {
        let mut rng = Lcg::new(9);
        let (n, h, d) = (3, 2, 8);
        let x: Vec<f32> = (0..n * h * d)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * 3.0)
            .collect();
        let scale = 0.0125;
        let t =
            Tensor::<Cpu, 3>::from_data(TensorData::new(x.clone(), [n, h, d]), &Default::default());
        let words = quantize(t, scale);
        assert_eq!(words.dims(), [n, h, d / 4]);
        let back = dequantize(words.clone(), scale)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let table = scaled_table(scale);
        let host_words = words.into_data().to_vec::<i32>().unwrap();
        let mut host = vec![0f32; x.len()];
        for (w, o) in host_words.chunks_exact(d / 4).zip(host.chunks_exact_mut(d)) {
            dequantize_row(w, &table, o);
        }
        assert_eq!(back, host);
        for (a, b) in x.iter().zip(&back) {
            // Half an E4M3 ulp: 2^-4 relative for normals, 2^-10 · scale below them.
            let tol = a.abs() / 16.0 + scale * 2f32.powi(-10);
            assert!((a - b).abs() <= tol, "{a} -> {b}");
        }
    }

    /// The CPU backend's in-place write against the reference (quantize, slice_assign): exact,
    /// slots scattered and out of order, rows landing in two KV heads.
    #[test]
    fn cpu_write_matches_reference() {
        use crate::Gemma4Backend;
        let dev = Default::default();
        let mut rng = Lcg::new(3);
        let (kv, slots, d) = (2, 24, 16);
        let init: Vec<i32> = (0..kv * slots * d / 4)
            .map(|_| rng.next_u32() as i32)
            .collect();
        let pool = || {
            Tensor::<Cpu, 3, Int>::from_data(
                TensorData::new(init.clone(), [kv, slots, d / 4]),
                &dev,
            )
        };
        let at = [5u32, 6, 7, 19, 0, 11];
        let new: Vec<f32> = (0..at.len() * kv * d)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * 0.5)
            .collect();
        let new = Tensor::<Cpu, 3>::from_data(TensorData::new(new, [at.len(), kv, d]), &dev);
        let expected = kv_write(pool(), new.clone(), &at, 0.01).into_data();
        let got = Cpu::kv_write_fp8(pool(), new, &at, 0.01).into_data();
        assert_eq!(
            got.to_vec::<i32>().unwrap(),
            expected.to_vec::<i32>().unwrap()
        );
    }
}
