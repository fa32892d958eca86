//! The instruction sets of the CPU kernels and the one lane abstraction they share.
//!
//! [`Isa`] names a path (portable, AVX2 + FMA, AVX-512F), detected once at run time
//! (`is_x86_feature_detected!`); tests run every path the CPU has. [`Simd`] is the set of lane
//! operations the generic kernels use, with an implementation per path: [`Avx512`] (16 lanes,
//! masked loads and stores), [`Avx2`] (8 lanes, `vmaskmovps`) and [`Portable`] (plain arrays of
//! 8 lanes that LLVM vectorizes for the build's baseline, SSE2 on x86-64).
//!
//! A generic kernel runs through [`Isa::dispatch`]: a [`Kernel`]'s `run::<S>` is instantiated
//! inside a `#[target_feature]` function of its path, so that it, and everything it inlines
//! (every `Simd` method is `#[inline(always)]`), is compiled for that path's instructions. Plain
//! loops that LLVM vectorizes by itself (attention rows, the gelu gate) use the same dispatch
//! without calling `S`'s methods: only the target features matter to them.

use std::sync::OnceLock;

/// Instruction set of a kernel path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, autovectorized for the build's baseline (SSE2 on x86-64).
    Portable,
    /// AVX2 + FMA intrinsics.
    Avx2,
    /// AVX-512F intrinsics.
    Avx512,
}

impl Isa {
    /// The best path this CPU supports (detected once).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            *Isa::available()
                .last()
                .expect("portable is always available")
        })
    }

    /// Every path this CPU can run, portable first.
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Runs `k.run::<S>()` with S this path's [`Simd`], compiled for its features. Panics if the
    /// CPU does not support the path (a cached feature test: cheap enough per kernel call).
    #[inline]
    pub fn dispatch<K: Kernel>(self, k: K) -> K::Output {
        assert!(self.supported(), "{self:?} is not supported by this CPU");
        match self {
            // SAFETY (all three): the CPU has the path's features (checked above).
            Isa::Portable => unsafe { k.run::<Portable>() },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::with_avx2(k) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::with_avx512(k) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable path exists on this architecture"),
        }
    }
}

/// A kernel generic over the lane operations, run on a chosen path by [`Isa::dispatch`].
/// Implementations mark `run` `#[inline(always)]`: it must inline into the `#[target_feature]`
/// function of the path to be compiled for it.
pub trait Kernel {
    type Output;
    /// # Safety
    /// The CPU has S's features (and whatever the implementation's own contract asks).
    unsafe fn run<S: Simd>(self) -> Self::Output;
}

/// The vector operations the kernels use, over `W` f32 lanes. Every method is `#[inline(always)]`
/// so that, once inlined into a `#[target_feature]` function, the intrinsics inline too.
///
/// # Safety
/// Of every method: the CPU has the implementation's features, and the pointers are valid for
/// the lanes read or written (`W`, or the first `n` of a `_part` operation, n ≤ W).
// One contract for all the methods, stated once above.
#[allow(clippy::missing_safety_doc)]
pub trait Simd {
    type V: Copy;
    const W: usize;
    /// Whether `fma` is fused (a single rounding); the portable path multiplies then adds.
    const FMA: bool;
    unsafe fn zero() -> Self::V;
    /// Unaligned load of W lanes.
    unsafe fn load(p: *const f32) -> Self::V;
    /// The first n lanes (n ≤ W), zero after; only those n floats are read.
    unsafe fn load_part(p: *const f32, n: usize) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Stores the first n lanes (n ≤ W) only.
    unsafe fn store_part(p: *mut f32, v: Self::V, n: usize);
    /// `*p` in every lane.
    unsafe fn splat(p: *const f32) -> Self::V;
    /// a · b + c (fused where the ISA has FMA).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// The sum of the W lanes.
    unsafe fn hsum(v: Self::V) -> f32;
}

/// Plain arrays of 8 lanes (LLVM vectorizes the loops for the baseline, SSE2 on x86-64);
/// multiply then add, since `mul_add` without FMA hardware is a library call.
pub struct Portable;

impl Simd for Portable {
    type V = [f32; 8];
    const W: usize = 8;
    const FMA: bool = false;
    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 8] {
        std::ptr::read_unaligned(p as *const [f32; 8])
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> [f32; 8] {
        let mut v = [0.0; 8];
        for (j, d) in v.iter_mut().enumerate().take(n) {
            *d = *p.add(j);
        }
        v
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 8]) {
        std::ptr::write_unaligned(p as *mut [f32; 8], v)
    }
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, v: [f32; 8], n: usize) {
        for (j, &s) in v.iter().enumerate().take(n) {
            *p.add(j) = s;
        }
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> [f32; 8] {
        [*p; 8]
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|j| a[j] * b[j] + c[j])
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|j| a[j] + b[j])
    }
    #[inline(always)]
    unsafe fn hsum(v: [f32; 8]) -> f32 {
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Kernel, Simd};

    /// `k.run::<Avx512>()` compiled for AVX-512F (and the AVX2 and FMA it implies).
    /// Safety: the CPU has avx512f, avx2 and fma.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn with_avx512<K: Kernel>(k: K) -> K::Output {
        k.run::<Avx512>()
    }

    /// `k.run::<Avx2>()` compiled for AVX2 + FMA. Safety: the CPU has avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn with_avx2<K: Kernel>(k: K) -> K::Output {
        k.run::<Avx2>()
    }

    /// AVX-512F: 16 lanes; masked loads and stores touch only the lanes that exist.
    pub struct Avx512;

    impl Simd for Avx512 {
        type V = __m512;
        const W: usize = 16;
        const FMA: bool = true;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> __m512 {
            _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, v: __m512, n: usize) {
            _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as __mmask16, v)
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m512 {
            _mm512_set1_ps(*p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
    }

    /// AVX2 + FMA: 8 lanes; `vmaskmovps` touches only the lanes that exist.
    pub struct Avx2;

    /// Lanes 0..n of a `vmaskmovps` mask set.
    #[inline(always)]
    unsafe fn mask8(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    impl Simd for Avx2 {
        type V = __m256;
        const W: usize = 8;
        const FMA: bool = true;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> __m256 {
            _mm256_maskload_ps(p, mask8(n))
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, v: __m256, n: usize) {
            _mm256_maskstore_ps(p, mask8(n), v)
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m256 {
            _mm256_broadcast_ss(&*p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
        }
    }
}

/// Prefetch hint for the cache line at `p` into L1 (`L2 = false`) or L2 (no access happens, so
/// any address is fine).
#[inline(always)]
pub fn prefetch<const L2: bool>(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults and has no effect on memory.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        if L2 {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A zeroed f32 buffer whose slice starts on a 64-byte boundary: a 64-byte load that is not
/// aligned spans two cache lines and costs two loads (on Zen 4 it halves the NVFP4 kernel's speed).
pub struct AlignedBuf {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0f32; len + 15];
        let off = (buf.as_ptr() as usize).wrapping_neg() % 64 / 4;
        Self { buf, off, len }
    }
    pub fn as_slice(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..self.off + self.len]
    }
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.as_mut_slice().as_mut_ptr()
    }
}
