//! The KV pool's write in CubeCL (any runtime, any float element `F`): a step's keys or values
//! `new` `[n, kv_heads, d]` scattered into the pool `[kv_heads, slots, d]` at `slots[i]`, in one
//! launch for all rows (semantics of [`super::reference::kv_write`]).
//!
//! In place: the pool is written through its own strides when its buffer is exclusively owned
//! (the KV cache owns it and hands it over by value) and its elements do not overlap. A pool whose
//! buffer is shared (another tensor still holds it) is copied first, so the other holder never
//! sees the write, as with Burn's own in-place ops; a copy per call is slow, the cache should not
//! keep a second handle. Duplicate slots in one call are refused (the reference lets the last row
//! win; parallel stores would pick one at random), as are slots past the pool, and shapes or
//! dtypes that do not fit; every refusal comes before any launch.
//!
//! [`kv_write_fp8`] is the same scatter into an fp8 pool `[kv_heads, slots, d / 4]` of i32 words
//! (see [`super::fp8`]): one thread per word quantizes its 4 values (x / scale, round to nearest
//! even, saturate at ±448) and packs them, with float compares and integer ops only (WGSL has
//! no fp8 and no bit casts are needed). One difference from the scalar codec: -0.0 is stored
//! as +0 (the same value).

use std::collections::HashSet;

use burn::tensor::{DType, Element, Int, Tensor as BurnTensor, TensorData, TensorPrimitive};
use burn_cubecl::{
    kernel::into_contiguous, tensor::CubeTensor, BoolElement, CubeRuntime, FloatElement,
};
use cubecl::prelude::*;

use super::flash::AttentionBackend;
use super::fp8;

/// Threads per cube.
const NT: usize = 256;
/// Largest cube count along one grid axis (the WebGPU / Vulkan minimum guarantee).
const MAX_GRID_AXIS: usize = 65_535;

/// Why [`kv_write`] did not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvWriteError {
    #[error("rows {new:?} do not fit pool {pool:?} (expected [n, kv_heads, d] for [kv_heads, slots, d])")]
    Shape { new: [usize; 3], pool: [usize; 3] },
    #[error("{rows} rows for {slots} slots")]
    Slots { rows: usize, slots: usize },
    #[error("slot {slot} is past the pool's {slots} slots")]
    PastPool { slot: u32, slots: usize },
    #[error("slot {0} is written twice")]
    Duplicate(u32),
    #[error("{what} has dtype {got:?}, expected the backend's float element {expected:?}")]
    Dtype {
        what: &'static str,
        got: DType,
        expected: DType,
    },
    #[error("{what} = {value} exceeds the kernel's 32-bit range {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },
}

/// One thread per element of `new` (contiguous `[n, kv_heads, d]`): it goes to
/// `pool[h, slots[i], c]` through the pool's strides.
#[cube(launch)]
fn kv_write_kernel<F: Float>(
    new: &Tensor<F>,
    pool: &mut Tensor<F>,
    slots: &Tensor<i32>,
    total: u32,
    kv_heads: u32,
    d: u32,
) {
    let pos =
        (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * comptime!(NT) + UNIT_POS_X as usize;
    let d = d as usize;
    let kv_heads = kv_heads as usize;
    if pos < total as usize {
        let i = pos / (kv_heads * d);
        let h = (pos / d) % kv_heads;
        let c = pos % d;
        let slot = slots[i] as usize;
        pool[h * pool.stride(0) + slot * pool.stride(1) + c * pool.stride(2)] = new[pos];
    }
}

/// Checks what [`kv_write`] would refuse, without touching the tensors' buffers.
pub fn kv_write_check<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    pool: &BurnTensor<AttentionBackend<R, F, BT>, 3>,
    new: &BurnTensor<AttentionBackend<R, F, BT>, 3>,
    slots: &[u32],
) -> Result<(), KvWriteError> {
    let ([n, kv_heads, d], [pkv, pslots, pd]) = (new.dims(), pool.dims());
    if (kv_heads, d) != (pkv, pd) {
        return Err(KvWriteError::Shape {
            new: new.dims(),
            pool: pool.dims(),
        });
    }
    if n != slots.len() {
        return Err(KvWriteError::Slots {
            rows: n,
            slots: slots.len(),
        });
    }
    let expected = <F as Element>::dtype();
    for (what, got) in [("pool", pool.dtype()), ("new", new.dtype())] {
        if got != expected {
            return Err(KvWriteError::Dtype {
                what,
                got,
                expected,
            });
        }
    }
    let limit = (i32::MAX as usize) / 2;
    for (what, value) in [
        ("pool elements", pkv * pslots * pd),
        ("new elements", n * pkv * pd),
    ] {
        if value > limit {
            return Err(KvWriteError::TooLarge { what, value, limit });
        }
    }
    check_slots(slots, pslots)
}

/// Every slot inside a pool of `pool_slots` and none twice (parallel writes to one slot would
/// leave a row at random where the reference lets the last one win): the float and fp8 writes.
fn check_slots(slots: &[u32], pool_slots: usize) -> Result<(), KvWriteError> {
    let mut seen = HashSet::with_capacity(slots.len());
    for &slot in slots {
        if slot as usize >= pool_slots {
            return Err(KvWriteError::PastPool {
                slot,
                slots: pool_slots,
            });
        }
        if !seen.insert(slot) {
            return Err(KvWriteError::Duplicate(slot));
        }
    }
    Ok(())
}

/// Writes `new` `[n, kv_heads, d]` into `pool` `[kv_heads, slots, d]` at `slots` (one per row)
/// and returns the pool: in place when its buffer is exclusively owned, else into a copy (see the
/// module docs). One launch; none for n = 0.
pub fn kv_write<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    pool: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    new: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    slots: &[u32],
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 3>, KvWriteError> {
    kv_write_check(&pool, &new, slots)?;
    let [n, kv_heads, d] = new.dims();
    let total = n * kv_heads * d;
    if total == 0 {
        return Ok(pool);
    }
    let device = new.device();
    let slots_t: CubeTensor<R> = BurnTensor::<AttentionBackend<R, F, BT>, 1, Int>::from_data(
        TensorData::new(slots.iter().map(|&s| s as i32).collect::<Vec<_>>(), [n]),
        &device,
    )
    .into_primitive();
    let new = into_contiguous(new.into_primitive().tensor());
    let mut pool = pool.into_primitive().tensor();
    if !(pool.can_mut() && pool.is_nonoverlapping()) {
        pool = if pool.is_contiguous() {
            pool.copy()
        } else {
            into_contiguous(pool)
        };
    }
    let cubes = total.div_ceil(NT);
    let grid_x = cubes.min(MAX_GRID_AXIS);
    let client = new.client.clone();
    kv_write_kernel::launch::<F, R>(
        &client,
        CubeCount::Static(grid_x as u32, cubes.div_ceil(grid_x) as u32, 1),
        CubeDim::new_1d(NT as u32),
        new.into_tensor_arg(),
        pool.clone().into_tensor_arg(),
        slots_t.into_tensor_arg(),
        total as u32,
        kv_heads as u32,
        d as u32,
    );
    Ok(BurnTensor::from_primitive(TensorPrimitive::Float(pool)))
}

/// The E4M3 code of `y` (see the module docs): the binade by comparisons against 2^-6..2^8, the
/// mantissa rounded to nearest even by hand (WGSL's `round` ties to even, CUDA's away from zero).
#[cube]
#[allow(clippy::eq_op)] // `y != y` is the NaN test the kernel language expands.
fn e4m3_code(y: f32) -> u32 {
    let a = f32::abs(y);
    let mut code = 0x7eu32;
    if a < 448.0f32 {
        // ef: the exponent field a would have (0 below 2^-6); eb = max(ef, 1) sets the step
        // 2^(eb - 10) (subnormals share the first binade's step, 2^-9).
        let mut eb = 1u32;
        let mut th = 0.015625f32; // 2^-6
        #[unroll]
        for k in 0..15u32 {
            if a >= th {
                eb = k + 1;
            }
            th *= 2.0f32;
        }
        let step = f32::cast_from(1u32 << eb) * 0.0009765625f32; // 2^(eb - 10)
        let v = a / step; // exact: a power-of-two division
        let mut r = f32::floor(v);
        let frac = v - r;
        let odd = (u32::cast_from(r) & 1) == 1;
        if frac > 0.5f32 || (frac == 0.5f32 && odd) {
            r += 1.0f32;
        }
        // (eb - 1) · 8 + m: the mantissa carries into the exponent field by itself.
        code = (eb - 1) * 8 + u32::cast_from(r);
    }
    if y < 0.0f32 {
        code |= 0x80;
    }
    if y != y {
        code = 0x7f;
    }
    code
}

/// One thread per word of `new`'s rows (`[n, kv_heads, d]` contiguous, `d / 4` words per row):
/// its 4 values quantized with `inv_scale` and packed into `pool[h, slots[i], w]`.
#[cube(launch)]
fn kv_write_fp8_kernel<F: Float>(
    new: &Tensor<F>,
    pool: &mut Tensor<i32>,
    slots: &Tensor<i32>,
    total: u32,
    kv_heads: u32,
    words: u32,
    inv_scale: f32,
) {
    let pos =
        (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * comptime!(NT) + UNIT_POS_X as usize;
    let words = words as usize;
    let kv_heads = kv_heads as usize;
    if pos < total as usize {
        let i = pos / (kv_heads * words);
        let h = (pos / words) % kv_heads;
        let w = pos % words;
        let mut word = 0u32;
        #[unroll]
        for b in 0..4u32 {
            let x = f32::cast_from(new[pos * 4 + b as usize]) * inv_scale;
            word |= e4m3_code(x) << (8 * b);
        }
        let slot = slots[i] as usize;
        pool[h * pool.stride(0) + slot * pool.stride(1) + w * pool.stride(2)] =
            i32::cast_from(word);
    }
}

/// Checks what [`kv_write_fp8`] would refuse, without touching the tensors' buffers.
pub fn kv_write_fp8_check<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    pool: &BurnTensor<AttentionBackend<R, F, BT>, 3, Int>,
    new: &BurnTensor<AttentionBackend<R, F, BT>, 3>,
    slots: &[u32],
) -> Result<(), KvWriteError> {
    let ([n, kv_heads, d], [pkv, pslots, pw]) = (new.dims(), pool.dims());
    if fp8::check_head_dim(d).is_some() || (kv_heads, d) != (pkv, pw * fp8::PER_WORD) {
        return Err(KvWriteError::Shape {
            new: new.dims(),
            pool: pool.dims(),
        });
    }
    if n != slots.len() {
        return Err(KvWriteError::Slots {
            rows: n,
            slots: slots.len(),
        });
    }
    let expected = <F as Element>::dtype();
    if new.dtype() != expected {
        return Err(KvWriteError::Dtype {
            what: "new",
            got: new.dtype(),
            expected,
        });
    }
    let limit = (i32::MAX as usize) / 2;
    for (what, value) in [
        ("pool words", pkv * pslots * pw),
        ("new elements", n * pkv * d),
    ] {
        if value > limit {
            return Err(KvWriteError::TooLarge { what, value, limit });
        }
    }
    check_slots(slots, pslots)
}

/// Quantizes `new` `[n, kv_heads, d]` with `scale` into the fp8 pool `[kv_heads, slots, d / 4]`
/// at `slots` (one per row) and returns the pool, in place as [`kv_write`] (same refusals, plus a
/// head_dim that is not a multiple of 4). One launch; none for n = 0.
pub fn kv_write_fp8<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    pool: BurnTensor<AttentionBackend<R, F, BT>, 3, Int>,
    new: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    slots: &[u32],
    scale: f32,
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 3, Int>, KvWriteError> {
    kv_write_fp8_check(&pool, &new, slots)?;
    let ([n, kv_heads, _], [_, _, pw]) = (new.dims(), pool.dims());
    let total = n * kv_heads * pw;
    if total == 0 {
        return Ok(pool);
    }
    let device = new.device();
    let slots_t: CubeTensor<R> = BurnTensor::<AttentionBackend<R, F, BT>, 1, Int>::from_data(
        TensorData::new(slots.iter().map(|&s| s as i32).collect::<Vec<_>>(), [n]),
        &device,
    )
    .into_primitive();
    let new = into_contiguous(new.into_primitive().tensor());
    let mut pool: CubeTensor<R> = pool.into_primitive();
    if !(pool.can_mut() && pool.is_nonoverlapping()) {
        pool = if pool.is_contiguous() {
            pool.copy()
        } else {
            into_contiguous(pool)
        };
    }
    let cubes = total.div_ceil(NT);
    let grid_x = cubes.min(MAX_GRID_AXIS);
    let client = new.client.clone();
    kv_write_fp8_kernel::launch::<F, R>(
        &client,
        CubeCount::Static(grid_x as u32, cubes.div_ceil(grid_x) as u32, 1),
        CubeDim::new_1d(NT as u32),
        new.into_tensor_arg(),
        pool.clone().into_tensor_arg(),
        slots_t.into_tensor_arg(),
        total as u32,
        kv_heads as u32,
        pw as u32,
        1.0 / scale,
    );
    Ok(BurnTensor::from_primitive(pool))
}
