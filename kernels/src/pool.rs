//! The CPU kernels' thread pool: `available_parallelism() − 1` rayon workers, the calling thread
//! being the last one (it runs the first range of every split itself, as `std::thread::scope`
//! with spawned helpers did). rayon's global pool would have `available_parallelism()` workers
//! besides the caller: one more thread than cores, whose idle spinning competes with the
//! caller's range.

use std::sync::OnceLock;

use rayon::{Scope, ThreadPool, ThreadPoolBuilder};

/// Threads a kernel splits its work over: the caller and the pool's workers.
pub(crate) fn threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

fn pool() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        ThreadPoolBuilder::new()
            .num_threads(threads().saturating_sub(1).max(1))
            .thread_name(|i| format!("gemma4-cpu-{i}"))
            .build()
            .expect("building the CPU kernels' thread pool (threads can be spawned)")
    })
}

/// A rayon scope on the kernels' pool that runs `f` on the calling thread: work spawned in it
/// goes to the pool's workers, and the call returns once all of it is done.
pub(crate) fn scope<'s, R>(f: impl FnOnce(&Scope<'s>) -> R) -> R {
    pool().in_place_scope(f)
}
