//! No silent fallback: every call of a CubeCL kernel through [`crate::Gemma4Backend`] goes
//! through [`run`], which counts the launches of each kernel and decides what a refusal (a shape,
//! dtype or device limit the kernel does not cover; kernels refuse before launching anything)
//! does, by a process-wide [`Policy`]:
//! - [`Policy::Strict`] (the default): the refusal panics with a message naming the kernel, the
//!   shapes and the kernel's error. Tests and benches run this way, so a kernel that stops
//!   running shows instead of being replaced by the (slow) reference.
//! - [`Policy::Warn`] (for a server): the plain reference computes the result instead, the
//!   kernel's fallback counter goes up, and the first refusal of each (kernel, shape) is logged
//!   with `tracing::warn!` (kernel, shape, reason).
//!
//! Counters are process-wide atomics keyed by the kernel names of [`KERNELS`].

use std::collections::BTreeSet;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

/// The kernels [`run`] counts, by the names it takes: the CubeCL kernels ([`CUBE_KERNELS`], wgpu
/// and CUDA), the CPU kernels of the ndarray backend ([`CPU_KERNELS`]), then the kernels of the
/// fp8 KV cache, which run only when the pool is fp8 ([`CUBE_FP8_KERNELS`], [`CPU_FP8_KERNELS`]).
pub const KERNELS: [&str; 23] = [
    "nvfp4_gemv",
    "nvfp4_gemm",
    "flash_attention",
    "paged_attention",
    "kv_write",
    "rms_norm",
    "rms_norm_add",
    "rms_norm_rope",
    "gelu_tanh_mul",
    "top_k",
    "cpu_nvfp4",
    "cpu_dense",
    "cpu_lm_head",
    "cpu_attention",
    "cpu_paged_attention",
    "cpu_rms_norm",
    "cpu_rms_norm_add",
    "cpu_rms_norm_rope",
    "cpu_gelu_tanh_mul",
    "kv_write_fp8",
    "paged_attention_fp8",
    "cpu_kv_write_fp8",
    "cpu_paged_attention_fp8",
];

/// The CubeCL kernels among [`KERNELS`] that every model step launches.
pub const CUBE_KERNELS: &[&str] = KERNELS.split_at(10).0;
/// The CPU kernels among [`KERNELS`] that every model step launches.
pub const CPU_KERNELS: &[&str] = KERNELS.split_at(10).1.split_at(9).0;
/// The CubeCL kernels of the fp8 KV cache (in place of `kv_write` and `paged_attention`).
pub const CUBE_FP8_KERNELS: &[&str] = KERNELS.split_at(19).1.split_at(2).0;
/// The CPU kernels of the fp8 KV cache (in place of `cpu_paged_attention`; the float pool's
/// write has no CPU kernel name: it is a copy).
pub const CPU_FP8_KERNELS: &[&str] = KERNELS.split_at(21).1;

/// What a kernel's refusal does (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Panic, naming the kernel, the shapes and the reason.
    #[default]
    Strict,
    /// Run the plain reference instead, count it, and warn once per (kernel, shape).
    Warn,
}

static POLICY: AtomicU8 = AtomicU8::new(0);
static LAUNCHES: [AtomicU64; KERNELS.len()] = [const { AtomicU64::new(0) }; KERNELS.len()];
static FALLBACKS: [AtomicU64; KERNELS.len()] = [const { AtomicU64::new(0) }; KERNELS.len()];
/// The (kernel, shape) pairs already warned about.
static WARNED: Mutex<BTreeSet<(&'static str, String)>> = Mutex::new(BTreeSet::new());

/// Sets the process-wide policy for every later refusal.
pub fn set_policy(policy: Policy) {
    POLICY.store(policy as u8, Ordering::Relaxed);
}

/// The current process-wide policy.
pub fn policy() -> Policy {
    match POLICY.load(Ordering::Relaxed) {
        0 => Policy::Strict,
        _ => Policy::Warn,
    }
}

fn index(kernel: &str) -> usize {
    KERNELS
        .iter()
        .position(|k| *k == kernel)
        .unwrap_or_else(|| panic!("fallback: unknown kernel name {kernel:?} (known: {KERNELS:?})"))
}

/// Calls of `kernel` that launched it.
pub fn launches(kernel: &str) -> u64 {
    LAUNCHES[index(kernel)].load(Ordering::Relaxed)
}

/// Refusals of `kernel` (each one ran the reference under [`Policy::Warn`]; under
/// [`Policy::Strict`] it is counted, then panics).
pub fn fallbacks(kernel: &str) -> u64 {
    FALLBACKS[index(kernel)].load(Ordering::Relaxed)
}

/// (kernel, launches, fallbacks) for every kernel of [`KERNELS`], in that order.
pub fn counts() -> Vec<(&'static str, u64, u64)> {
    KERNELS
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                *k,
                LAUNCHES[i].load(Ordering::Relaxed),
                FALLBACKS[i].load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// Runs `kernel_call`, the kernel named `kernel`; on a refusal applies the process-wide
/// [`Policy`] (`reference` computes the result under [`Policy::Warn`]). `shape` describes the
/// inputs, for the messages only (called on a refusal only).
pub fn run<T, E: Display>(
    kernel: &'static str,
    shape: impl FnOnce() -> String,
    kernel_call: impl FnOnce() -> Result<T, E>,
    reference: impl FnOnce() -> T,
) -> T {
    run_with(policy(), kernel, shape, kernel_call, reference)
}

fn run_with<T, E: Display>(
    policy: Policy,
    kernel: &'static str,
    shape: impl FnOnce() -> String,
    kernel_call: impl FnOnce() -> Result<T, E>,
    reference: impl FnOnce() -> T,
) -> T {
    let i = index(kernel);
    match kernel_call() {
        Ok(y) => {
            LAUNCHES[i].fetch_add(1, Ordering::Relaxed);
            y
        }
        Err(e) => {
            FALLBACKS[i].fetch_add(1, Ordering::Relaxed);
            let shape = shape();
            match policy {
                Policy::Strict => panic!(
                    "kernel {kernel} refused {shape}: {e} (fallback policy Strict; \
                     gemma4_kernels::fallback::set_policy(Policy::Warn) runs the reference instead)"
                ),
                Policy::Warn => {
                    let first = WARNED
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((kernel, shape.clone()));
                    if first {
                        tracing::warn!(kernel, shape = %shape, reason = %e, "kernel refused; running the plain reference instead");
                    }
                    reference()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The counters are process-wide and other tests of this binary may launch kernels, so only
    // kernels no unit test here launches are counted below ("nvfp4_gemm"), by deltas.
    #[test]
    fn counts_launches_and_applies_the_policy() {
        let (l0, f0) = (launches("nvfp4_gemm"), fallbacks("nvfp4_gemm"));
        let y: u32 = run_with(
            Policy::Warn,
            "nvfp4_gemm",
            || "m=1".into(),
            || Ok::<_, String>(7),
            || unreachable!(),
        );
        assert_eq!(y, 7);
        assert_eq!(
            (launches("nvfp4_gemm"), fallbacks("nvfp4_gemm")),
            (l0 + 1, f0)
        );

        // Warn: the reference's result, one fallback per refusal (the warning once per shape).
        for _ in 0..2 {
            let y: u32 = run_with(
                Policy::Warn,
                "nvfp4_gemm",
                || "m=2".into(),
                || Err("too big"),
                || 3,
            );
            assert_eq!(y, 3);
        }
        assert_eq!(
            (launches("nvfp4_gemm"), fallbacks("nvfp4_gemm")),
            (l0 + 1, f0 + 2)
        );
        assert!(WARNED
            .lock()
            .unwrap()
            .contains(&("nvfp4_gemm", "m=2".to_string())));

        // Strict: a panic naming the kernel, the shape and the reason; the reference never runs.
        let err = std::panic::catch_unwind(|| {
            run_with(
                Policy::Strict,
                "nvfp4_gemm",
                || "x [3, 40]".into(),
                || Err::<u32, _>("in_features = 40"),
                || unreachable!(),
            )
        })
        .unwrap_err();
        let msg = err
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert!(
            msg.contains("nvfp4_gemm")
                && msg.contains("x [3, 40]")
                && msg.contains("in_features = 40"),
            "{msg}"
        );
        assert_eq!(fallbacks("nvfp4_gemm"), f0 + 3);

        let row = counts().into_iter().find(|r| r.0 == "nvfp4_gemm").unwrap();
        assert!(row.1 > l0 && row.2 > f0);
        assert_eq!(counts().len(), KERNELS.len());
        assert_eq!(Policy::default(), Policy::Strict);
    }

    #[test]
    #[should_panic(expected = "unknown kernel name")]
    fn unknown_names_panic() {
        launches("no_such_kernel");
    }
}
