//! NVFP4 weights as ModelOpt writes them, and their plain Burn reference decode.
//!
//! Checkpoint layout of a quantized linear `X` (modelopt `qtensor/nvfp4_tensor.py`):
//! - `X.weight`         U8  [out, in/2]  two E2M1 codes per byte, even column in the low nibble
//! - `X.weight_scale`   F8_E4M3 [out, in/16]  one block scale per 16 inputs
//! - `X.weight_scale_2` F32 []  global scale
//! - `X.input_scale`    F32 []  activation scale, only for W4A4 (unused: Hopper runs W4A16)
//!
//! W[r, c] = e2m1(code[r, c]) * (e4m3(weight_scale[r, c / 16]) * weight_scale_2), in f32 and in
//! that order, as modelopt's `NVFP4QTensor.dequantize` (block scale times global scale first).
//!
//! In memory the weight stays packed: codes as i32 words of 8 nibbles ([out, in/8]; nibble k of
//! word w is column 8w + k, which is the checkpoint's byte order read little-endian), scales as
//! i32 words of 4 E4M3 bytes ([out, ceil(in/64)], row padded with zero bytes). The fast kernels
//! ([`gemv`], [`gemm`], [`cpu`]) read the same words; the reference below decodes them with tensor ops.

use burn::prelude::*;
use burn::tensor::{ElementConversion, TensorData};

pub mod cpu;
pub mod gemm;
pub mod gemv;

/// Inputs per E4M3 block scale.
pub const GROUP_SIZE: usize = 16;

/// The 16 E2M1 values: codes 0..7 positive, bit 3 the sign.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// E4M3 "fn" (no infinities, one NaN encoding 0x7f/0xff), bias 7.
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((byte >> 3) & 0x0f) as i32;
    let man = (byte & 0x07) as f32;
    if exp == 0x0f && (byte & 0x07) == 0x07 {
        return f32::NAN;
    }
    let mag = if exp == 0 {
        man * (2f32).powi(-9)
    } else {
        (1.0 + man / 8.0) * (2f32).powi(exp - 7)
    };
    sign * mag
}

/// E2M1 codes (0..15) to values with exact float arithmetic:
/// |v| = m/2 + relu(m - 4)/2 + relu(m - 6) for m = code & 7 gives 0, .5, 1, 1.5, 2, 3, 4, 6.
pub fn e2m1_decode<B: Backend, const D: usize>(codes: Tensor<B, D, Int>) -> Tensor<B, D> {
    let sign = codes.clone().bitwise_right_shift_scalar(3.elem()).float();
    let m = codes.bitwise_and_scalar(7.elem()).float();
    let mag = m.clone() * 0.5 + (m.clone() - 4.0).clamp_min(0.0) * 0.5 + (m - 6.0).clamp_min(0.0);
    mag * (sign * -2.0 + 1.0)
}

/// E4M3 bytes (0..255, NaN encodings excluded by the loader) to values with exact arithmetic:
/// normal (1 + m/8)·2^(e-7), subnormal m·2^-9; 2^e is built from the bits of e so that no
/// backend's `pow` rounding can enter.
pub fn e4m3_decode<B: Backend, const D: usize>(bytes: Tensor<B, D, Int>) -> Tensor<B, D> {
    let sign = bytes.clone().bitwise_right_shift_scalar(7.elem()).float();
    let e = bytes
        .clone()
        .bitwise_right_shift_scalar(3.elem())
        .bitwise_and_scalar(15.elem());
    let m = bytes.bitwise_and_scalar(7.elem()).float();
    let bit = |k: i32| {
        e.clone()
            .bitwise_right_shift_scalar(k.elem())
            .bitwise_and_scalar(1.elem())
            .float()
    };
    // 2^e = (1 + e0)(1 + 3 e1)(1 + 15 e2)(1 + 255 e3), each factor an exact small integer.
    let pow2_e =
        (bit(0) + 1.0) * (bit(1) * 3.0 + 1.0) * (bit(2) * 15.0 + 1.0) * (bit(3) * 255.0 + 1.0);
    let normal = (m.clone() * 0.125 + 1.0) * pow2_e * 2f32.powi(-7);
    let is_normal = e.clamp_max(1).float();
    let subnormal = m * 2f32.powi(-9);
    let mag = normal * is_normal.clone() + subnormal * (is_normal * -1.0 + 1.0);
    mag * (sign * -2.0 + 1.0)
}

/// A packed NVFP4 weight matrix [out, in] on a device.
#[derive(Module, Debug)]
pub struct Nvfp4Weight<B: Backend> {
    /// E2M1 codes, 8 per word: [out, in/8].
    pub codes: Tensor<B, 2, Int>,
    /// E4M3 block scales, 4 per word: [out, ceil(in/64)].
    pub scales: Tensor<B, 2, Int>,
    /// Global scale (`weight_scale_2`).
    pub global_scale: f32,
    pub out_features: usize,
    pub in_features: usize,
}

/// Host-side packed form, built by the loader from checkpoint bytes.
#[derive(Debug, Clone)]
pub struct PackedNvfp4 {
    pub codes: Vec<i32>,
    pub scales: Vec<i32>,
    pub global_scale: f32,
    pub out_features: usize,
    pub in_features: usize,
}

impl PackedNvfp4 {
    /// `weight`: [out, in/2] bytes; `scale`: [out, in/16] E4M3 bytes.
    pub fn from_checkpoint(
        weight: &[u8],
        scale: &[u8],
        global_scale: f32,
        out_features: usize,
        in_features: usize,
    ) -> Self {
        assert_eq!(
            weight.len(),
            out_features * in_features / 2,
            "caller checked the shape"
        );
        let groups = in_features / GROUP_SIZE;
        assert_eq!(
            scale.len(),
            out_features * groups,
            "caller checked the shape"
        );
        let codes = weight
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let words_per_row = scale_words_per_row(in_features);
        let mut scales = Vec::with_capacity(out_features * words_per_row);
        for row in scale.chunks_exact(groups) {
            for w in 0..words_per_row {
                let mut b = [0u8; 4];
                for (k, slot) in b.iter_mut().enumerate() {
                    if let Some(&v) = row.get(4 * w + k) {
                        *slot = v;
                    }
                }
                scales.push(i32::from_le_bytes(b));
            }
        }
        Self {
            codes,
            scales,
            global_scale,
            out_features,
            in_features,
        }
    }

    /// Dequantize on the host (tests, and the reference of the fast kernels).
    pub fn dequantize(&self) -> Vec<f32> {
        let (out, inp) = (self.out_features, self.in_features);
        let spr = scale_words_per_row(inp);
        let mut w = vec![0f32; out * inp];
        for r in 0..out {
            for c in 0..inp {
                let word = self.codes[(r * inp + c) / 8] as u32;
                let code = (word >> (4 * (c % 8))) & 0xf;
                let g = c / GROUP_SIZE;
                let sword = self.scales[r * spr + g / 4] as u32;
                let sbyte = ((sword >> (8 * (g % 4))) & 0xff) as u8;
                w[r * inp + c] =
                    E2M1_VALUES[code as usize] * (e4m3_to_f32(sbyte) * self.global_scale);
            }
        }
        w
    }

    pub fn to_device<B: Backend>(&self, device: &B::Device) -> Nvfp4Weight<B> {
        let (out, inp) = (self.out_features, self.in_features);
        Nvfp4Weight {
            codes: Tensor::from_data(TensorData::new(self.codes.clone(), [out, inp / 8]), device),
            scales: Tensor::from_data(
                TensorData::new(self.scales.clone(), [out, scale_words_per_row(inp)]),
                device,
            ),
            global_scale: self.global_scale,
            out_features: out,
            in_features: inp,
        }
    }
}

pub fn scale_words_per_row(in_features: usize) -> usize {
    (in_features / GROUP_SIZE).div_ceil(4)
}

impl<B: Backend> Nvfp4Weight<B> {
    /// Dense [out, in] weight decoded with plain tensor ops (any backend): the reference path.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let (out, inp) = (self.out_features, self.in_features);
        let groups = inp / GROUP_SIZE;
        // Codes: word [out, in/8] -> 8 nibbles -> [out, in/8, 8] -> [out, in]. Scalar shifts and
        // elementwise arithmetic only: table lookups (`select`) and integer broadcasts are slow or
        // missing on some backends.
        let nibbles: Vec<Tensor<B, 3, Int>> = (0..8)
            .map(|k| {
                self.codes
                    .clone()
                    .bitwise_right_shift_scalar((4 * k).elem())
                    .bitwise_and_scalar(0xf.elem())
                    .unsqueeze_dim(2)
            })
            .collect();
        let codes = Tensor::cat(nibbles, 2).reshape([out, inp]);
        let values = e2m1_decode(codes).reshape([out, groups, GROUP_SIZE]);

        // Scales: word [out, w] -> 4 bytes -> [out, 4w] -> the first in/16 -> E4M3 decode.
        let words = self.scales.dims()[1];
        let bytes: Vec<Tensor<B, 3, Int>> = (0..4)
            .map(|k| {
                self.scales
                    .clone()
                    .bitwise_right_shift_scalar((8 * k).elem())
                    .bitwise_and_scalar(0xff.elem())
                    .unsqueeze_dim(2)
            })
            .collect();
        let bytes = Tensor::cat(bytes, 2)
            .reshape([out, words * 4])
            .slice([0..out, 0..groups]);
        // modelopt order: block scale times global scale first, then times the E2M1 value.
        let scales = (e4m3_decode(bytes) * self.global_scale).reshape([out, groups, 1]);
        (values * scales).reshape([out, inp])
    }

    /// y = x · Wᵀ with x [n, in] -> [n, out], plain tensor ops: decode, then a dense matmul.
    /// The reference of every fast NVFP4 path.
    pub fn forward_reference(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.dequantize().transpose())
    }
}

impl<B: crate::Gemma4Backend> Nvfp4Weight<B> {
    /// y = x · Wᵀ on the backend's fastest path.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        B::nvfp4_linear(x, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Cpu, Lcg};

    #[test]
    fn e4m3_known_values() {
        // From the E4M3FN definition: 0x38 = 1.0, 0x7e = 448 (max), 0x01 = 2^-9, 0xb8 = -1.0.
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(e4m3_to_f32(0x7f).is_nan());
    }

    /// Direct byte-level decode of the checkpoint layout, independent of the word packing.
    fn decode_bytes(weight: &[u8], scale: &[u8], g: f32, out: usize, inp: usize) -> Vec<f32> {
        let mut w = vec![0f32; out * inp];
        for r in 0..out {
            for c in 0..inp {
                let byte = weight[r * inp / 2 + c / 2];
                let code = if c % 2 == 0 { byte & 0xf } else { byte >> 4 };
                let s = e4m3_to_f32(scale[r * inp / 16 + c / 16]);
                w[r * inp + c] = E2M1_VALUES[code as usize] * (s * g);
            }
        }
        w
    }

    #[test]
    fn tensor_decoders_match_tables_for_every_code() {
        let device = Default::default();
        let codes = Tensor::<Cpu, 1, Int>::from_data(
            TensorData::new((0..16).collect::<Vec<i32>>(), [16]),
            &device,
        );
        let got = e2m1_decode(codes).into_data().to_vec::<f32>().unwrap();
        assert_eq!(got, E2M1_VALUES.to_vec());
        let finite: Vec<i32> = (0..256).filter(|b| b & 0x7f != 0x7f).collect();
        let n = finite.len();
        let bytes = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(finite.clone(), [n]), &device);
        let got = e4m3_decode(bytes).into_data().to_vec::<f32>().unwrap();
        let expected: Vec<f32> = finite.iter().map(|&b| e4m3_to_f32(b as u8)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn packed_decode_matches_checkpoint_layout() {
        let device = Default::default();
        // Shapes whose group count is not a multiple of 4 (padded scale words) and is.
        for &(out, inp, seed) in &[
            (3usize, 16usize, 1u64),
            (5, 80, 2),
            (7, 128, 3),
            (2, 208, 4),
        ] {
            let mut rng = Lcg::new(seed);
            let weight: Vec<u8> = (0..out * inp / 2).map(|_| rng.next_u32() as u8).collect();
            // Finite E4M3 scales only (0x7f/0xff are NaN).
            let scale: Vec<u8> = (0..out * inp / 16)
                .map(|_| (rng.next_u32() % 0x7e) as u8 | ((rng.next_u32() as u8) & 0x80))
                .collect();
            let g = 0.37f32;
            let expected = decode_bytes(&weight, &scale, g, out, inp);
            let packed = PackedNvfp4::from_checkpoint(&weight, &scale, g, out, inp);
            assert_eq!(packed.dequantize(), expected, "host decode {out}x{inp}");
            let dev: Nvfp4Weight<Cpu> = packed.to_device(&device);
            let got = dev.dequantize().into_data().to_vec::<f32>().unwrap();
            assert_eq!(got, expected, "tensor-op decode {out}x{inp}");
        }
    }

    #[test]
    fn forward_matches_dense_matmul() {
        let device = Default::default();
        let (out, inp, n) = (6usize, 48usize, 3usize);
        let mut rng = Lcg::new(9);
        let weight: Vec<u8> = (0..out * inp / 2).map(|_| rng.next_u32() as u8).collect();
        let scale: Vec<u8> = (0..out * inp / 16)
            .map(|_| 0x30 + (rng.next_u32() % 16) as u8)
            .collect();
        let packed = PackedNvfp4::from_checkpoint(&weight, &scale, 0.5, out, inp);
        let w = packed.dequantize();
        let x: Vec<f32> = (0..n * inp).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        let dev: Nvfp4Weight<Cpu> = packed.to_device(&device);
        let y = dev
            .forward_reference(Tensor::from_data(
                TensorData::new(x.clone(), [n, inp]),
                &device,
            ))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for i in 0..n {
            for o in 0..out {
                let e: f64 = (0..inp)
                    .map(|c| x[i * inp + c] as f64 * w[o * inp + c] as f64)
                    .sum();
                let d = (y[i * out + o] as f64 - e).abs();
                assert!(
                    d <= 1e-4 * (1.0 + e.abs()),
                    "y[{i},{o}] = {} vs {e}",
                    y[i * out + o]
                );
            }
        }
    }
}
