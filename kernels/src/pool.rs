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

/// Runs `f` on every item, the items split into [`threads`] contiguous ranges: the first on the
/// calling thread, the others on the pool's workers. For host work between kernel launches (the
/// engine samples its decoding sequences this way): the same threads as the CPU kernels, idle
/// then, rather than rayon's global pool, whose workers would spin against the next forward.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    let per = items.len().div_ceil(threads()).max(1);
    let f = &f;
    scope(|s| {
        let mut ranges = items.chunks_mut(per);
        let first = ranges.next();
        for range in ranges {
            s.spawn(move |_| range.iter_mut().for_each(f));
        }
        if let Some(range) = first {
            range.iter_mut().for_each(f);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_each_mut_visits_every_item_once() {
        for n in [0, 1, 2, 3, 17, 64] {
            let mut items: Vec<usize> = (0..n).collect();
            for_each_mut(&mut items, |x| *x = *x * 2 + 1);
            assert_eq!(items, (0..n).map(|x| x * 2 + 1).collect::<Vec<_>>());
        }
    }
}
