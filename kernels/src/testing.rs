//! Test helpers shared by the unit tests of this crate.

/// The CPU reference backend: f32 floats, i32 ints (NVFP4 words are i32).
pub type Cpu = burn::backend::NdArray<f32, i32>;

/// The CubeCL kernels' test backend: wgpu (lavapipe here) with float element F.
pub type Gpu<F = f32> = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, F, i32, u32>;

/// f16's unit roundoff, 2^-11: the largest relative error of rounding an f32 to f16.
pub const F16_ROUNDOFF: f64 = 1.0 / 2048.0;
/// Half of f16's smallest subnormal, 2^-25: the rounding error below f16's normal range.
pub const F16_SUBNORMAL_HALF_ULP: f64 = 1.0 / 33_554_432.0;

/// F's dtype (given explicitly when creating tensors: a wgpu device's default float dtype is
/// whichever backend touched it first, and f32 and f16 share the device in the tests).
pub fn dtype<F: burn_cubecl::FloatElement>() -> burn::tensor::DType {
    <F as burn::tensor::Element>::dtype()
}

/// The values a kernel of float type F sees: `v` rounded to F (a no-op for f32).
pub fn round<F: burn_cubecl::FloatElement>(v: &[f32]) -> Vec<f32> {
    use burn::tensor::ElementConversion;
    v.iter().map(|x| x.elem::<F>().elem::<f32>()).collect()
}

/// A tiny deterministic generator for test inputs (no extra crate for a few lines).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }
    /// 32 random bits (the high half of the state).
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 32) as u32
    }
    /// Uniform in [0, 1), 24 bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}

/// A random packed NVFP4 weight [out, inp] from random checkpoint bytes: any codes, finite E4M3
/// scales of either sign (subnormals included; 0x7f/0xff, NaN, never drawn).
pub fn random_packed(
    rng: &mut Lcg,
    out: usize,
    inp: usize,
    global_scale: f32,
) -> crate::nvfp4::PackedNvfp4 {
    let weight: Vec<u8> = (0..out * inp / 2).map(|_| rng.next_u32() as u8).collect();
    let scale: Vec<u8> = (0..out * inp / 16)
        .map(|_| (rng.next_u32() % 0x7f) as u8 | ((rng.next_u32() as u8) & 0x80))
        .collect();
    crate::nvfp4::PackedNvfp4::from_checkpoint(&weight, &scale, global_scale, out, inp)
}

/// Every E2M1 code under every finite E4M3 scale byte: row r is codes 0..15 in columns 0..15
/// with scale byte r of the 254 finite ones ([`finite_e4m3_bytes`]); 16 inputs. Read back through
/// one-hot activations, y[i, r] = W[r, i].
pub fn every_code_and_scale(global_scale: f32) -> crate::nvfp4::PackedNvfp4 {
    let bytes = finite_e4m3_bytes();
    let out = bytes.len();
    // Codes 0..15 in columns 0..15 of every row: bytes 0x10, 0x32, ..., 0xfe.
    let weight: Vec<u8> = (0..out)
        .flat_map(|_| (0..8u8).map(|k| (2 * k) | ((2 * k + 1) << 4)))
        .collect();
    crate::nvfp4::PackedNvfp4::from_checkpoint(&weight, &bytes, global_scale, out, 16)
}

/// The 254 E4M3 bytes that are not NaN (0x7f, 0xff), in order.
pub fn finite_e4m3_bytes() -> Vec<u8> {
    (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect()
}
