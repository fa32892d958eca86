//! Benchmark harness shared by the examples (`mod common;`): the plain memory-read bandwidth that
//! the kernels' GB/s are compared with, and the NVFP4 matmul report of `cpu_nvfp4_bench`. Each
//! example uses part of it.
#![allow(dead_code)]

use std::time::Instant;

use gemma4_kernels::nvfp4::cpu::nvfp4_matmul_with;
use gemma4_kernels::nvfp4::scale_words_per_row;
use gemma4_kernels::simd::Isa;
use gemma4_kernels::testing::Lcg;

/// Deterministic random packed weight of a given shape: any codes, finite positive E4M3 scales
/// near 1 (benchmarks).
fn bench_weight(out: usize, inp: usize) -> (Vec<i32>, Vec<i32>) {
    let mut rng = Lcg::new(out as u64 * 31 + inp as u64);
    let codes = (0..out * inp / 8).map(|_| rng.next_u32() as i32).collect();
    let scales = (0..out * scale_words_per_row(inp))
        .map(|_| i32::from_le_bytes(std::array::from_fn(|_| 0x30 + (rng.next_u32() % 16) as u8)))
        .collect();
    (codes, scales)
}

/// Seconds the calling thread has spent on a CPU (Linux `/proc/thread-self/schedstat`), so that
/// time spent descheduled on a shared machine does not count; `None` where unavailable.
fn thread_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(s.split_whitespace().next()?.parse::<u64>().ok()? as f64 * 1e-9)
}

/// Wall time and on-CPU time (this thread) of `f`.
fn timed(f: impl FnOnce()) -> (f64, Option<f64>) {
    let c0 = thread_cpu_seconds();
    let t = Instant::now();
    f();
    let wall = t.elapsed().as_secs_f64();
    (wall, c0.zip(thread_cpu_seconds()).map(|(a, b)| b - a))
}

/// Bytes of a call: codes out·in/2 + scales out·ceil(in/64)·4 + x 4·m·in + y 4·m·out.
pub fn matmul_bytes(m: usize, out: usize, inp: usize) -> usize {
    out * inp / 2 + out * scale_words_per_row(inp) * 4 + 4 * m * (inp + out)
}

/// Plain memory-read bandwidth in GB/s (best pass, wall time): `threads` threads sum a
/// `bytes` buffer (use well above the L3 size) `iters` times.
pub fn bench_read_bandwidth(bytes: usize, threads: usize, iters: usize) -> f64 {
    let buf = read_buffer(bytes);
    let best = (0..iters.max(1))
        .map(|_| read_pass(&buf, threads).0)
        .fold(f64::INFINITY, f64::min);
    (buf.len() * 8) as f64 / best / 1e9
}

fn read_buffer(bytes: usize) -> Vec<u64> {
    (0..(bytes / 8) as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect()
}

/// One summing pass over `buf` on `threads` threads: (wall, on-CPU time of a single thread).
fn read_pass(buf: &[u64], threads: usize) -> (f64, Option<f64>) {
    let mut sum = 0u64;
    let r = if threads <= 1 {
        timed(|| sum = sum_u64(buf))
    } else {
        let part = buf.len().div_ceil(threads);
        timed(|| {
            sum = std::thread::scope(|sc| {
                let hs: Vec<_> = buf
                    .chunks(part)
                    .map(|c| sc.spawn(move || sum_u64(c)))
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap())
                    .fold(0, u64::wrapping_add)
            })
        })
    };
    std::hint::black_box(sum);
    (r.0, if threads <= 1 { r.1 } else { None })
}

fn sum_u64(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = c.chunks_exact(8);
    for ch in &mut it {
        for j in 0..8 {
            acc[j] = acc[j].wrapping_add(ch[j]);
        }
    }
    it.remainder()
        .iter()
        .chain(&acc)
        .fold(0, |a, &b| a.wrapping_add(b))
}

/// Prints the NVFP4 matmul throughput at the 31B MLP shapes (gate/up [21504, 5376], down
/// [5376, 21504]) for m = 1 and 16, next to a plain memory-read baseline (a 256 MB sum) measured
/// in the same run. Rounds interleave the baseline and every configuration so that both see the
/// same background load, and the best wall time of each is kept; each call reads a different copy
/// of the weight (≥ 256 MB of copies), so that no call finds its weight in the 32 MB L3.
/// Single-thread rows also give GB/s over the mean on-CPU time (time descheduled by other
/// processes excluded), against the same measure of the baseline.
pub fn bench_report(rounds: usize) {
    let nt = std::thread::available_parallelism().map_or(1, |n| n.get());
    let buf = read_buffer(256 << 20);
    let read_bytes = (buf.len() * 8) as f64;
    let best_isa = Isa::detect();
    struct Cfg {
        shape: usize,
        m: usize,
        isa: Isa,
        threads: usize,
        best_wall: f64,
        /// Total on-CPU seconds and calls (single thread): the mean, since the counter only
        /// advances at scheduler ticks (a single call of a few ms is not resolved).
        cpu_total: f64,
        calls: usize,
    }
    let shapes = [(21504usize, 5376usize), (5376, 21504)];
    // Enough copies of each weight that consecutive calls never find it in the caches (as in a
    // model, where each layer has its own weights): at least 256 MB per shape.
    let weights: Vec<Vec<(Vec<i32>, Vec<i32>)>> = shapes
        .iter()
        .map(|&(o, i)| {
            let copies = (256usize << 20).div_ceil(matmul_bytes(0, o, i));
            (0..copies).map(|_| bench_weight(o, i)).collect()
        })
        .collect();
    let mut next_copy = 0usize;
    let mut cfgs = Vec::new();
    for shape in 0..shapes.len() {
        for m in [1usize, 16] {
            for isa in Isa::available() {
                // The portable path only at m = 1 (seconds per call at m = 16).
                if isa == Isa::Portable && m > 1 {
                    continue;
                }
                for th in if nt > 1 { vec![1, nt] } else { vec![1] } {
                    cfgs.push(Cfg {
                        shape,
                        m,
                        isa,
                        threads: th,
                        best_wall: f64::INFINITY,
                        cpu_total: 0.0,
                        calls: 0,
                    });
                }
            }
        }
    }
    let mut rng = Lcg::new(7);
    let xs: Vec<f32> = (0..16 * 21504)
        .map(|_| rng.next_f32() * 2.0 - 1.0)
        .collect();
    let mut y = vec![0f32; 16 * 21504];
    let (mut read1, mut read1_cpu, mut read_all) = (f64::INFINITY, 0.0, f64::INFINITY);
    for _ in 0..rounds.max(1) {
        let (w, c) = read_pass(&buf, 1);
        read1 = read1.min(w);
        read1_cpu += c.unwrap_or(f64::NAN);
        read_all = read_all.min(read_pass(&buf, nt).0);
        for cfg in cfgs.iter_mut() {
            let (out, inp) = shapes[cfg.shape];
            let copies = &weights[cfg.shape];
            let (x, y) = (&xs[..cfg.m * inp], &mut y[..cfg.m * out]);
            let calls = if cfg.isa == Isa::Portable { 1 } else { 3 };
            for _ in 0..calls {
                next_copy += 1;
                let (codes, scales) = &copies[next_copy % copies.len()];
                let (w, c) = timed(|| {
                    nvfp4_matmul_with(
                        cfg.isa,
                        cfg.threads,
                        x,
                        cfg.m,
                        codes,
                        scales,
                        0.01,
                        out,
                        inp,
                        y,
                    )
                });
                cfg.best_wall = cfg.best_wall.min(w);
                if cfg.threads == 1 {
                    cfg.cpu_total += c.unwrap_or(f64::NAN);
                    cfg.calls += 1;
                }
            }
        }
    }
    std::hint::black_box(&y);
    let gbs = |bytes: f64, s: f64| bytes / s / 1e9;
    let rounds = rounds.max(1);
    let (r1, r1c, ra) = (
        gbs(read_bytes, read1),
        gbs(read_bytes, read1_cpu / rounds as f64),
        gbs(read_bytes, read_all),
    );
    println!(
        "memory read (256 MB sum, {rounds} rounds): 1 thread {r1:.1} GB/s wall (best), {r1c:.1} GB/s on-CPU (mean); {nt} threads {ra:.1} GB/s wall (best)"
    );
    println!("(best path on this CPU: {best_isa:?}; % = of the read baseline with the same threads and clock)");
    for cfg in &cfgs {
        let (out, inp) = shapes[cfg.shape];
        let bytes = matmul_bytes(cfg.m, out, inp) as f64;
        let (w, base) = (
            gbs(bytes, cfg.best_wall),
            if cfg.threads == 1 { r1 } else { ra },
        );
        let mut line = format!(
            "[{out:5}, {inp:5}] m {:2} {:8} {} thr: {:8.3} ms, {w:5.1} GB/s wall ({:3.0}%)",
            cfg.m,
            format!("{:?}", cfg.isa),
            cfg.threads,
            cfg.best_wall * 1e3,
            100.0 * w / base
        );
        if cfg.threads == 1 && cfg.cpu_total > 0.0 {
            let c = gbs(bytes, cfg.cpu_total / cfg.calls as f64);
            line += &format!(", {c:5.1} GB/s on-CPU mean ({:3.0}%)", 100.0 * c / r1c);
        }
        println!("{line}");
    }
}
