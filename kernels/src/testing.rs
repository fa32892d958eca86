//! Test helpers shared by the unit tests of this crate.

/// The CPU reference backend: f32 floats, i32 ints (NVFP4 words are i32).
pub type Cpu = burn::backend::NdArray<f32, i32>;

/// A tiny deterministic generator for test inputs (no extra crate for a few lines).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407))
    }
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}
