//! Dense f32 matmul y = x · w (w [in, out]) on the CPU at the 31B attention projection shapes,
//! [`gemma4_kernels::cpu_dense::dense_matmul`] against burn-ndarray's `Tensor::matmul` on the same
//! data, next to the memory-read bandwidth measured in the same run:
//! `cargo run --release -p gemma4-kernels --example cpu_dense_bench [rounds] [m,m,...] [all|dense|nt]`.
//!
//! The `nt` section times the tied LM head, y = x · Eᵀ with E `[vocab, hidden]` read in place
//! ([`gemma4_kernels::cpu_dense::dense_matmul_nt`]), at m = 1 and 16 on E = [32768, 5376] (704 MB;
//! the real vocabulary, 262144, is 8× that), against burn-ndarray's `x.matmul(E.transpose())`
//! (what the model did before: ndarray copies the transposed E on every call).
//!
//! Rounds interleave every configuration (and the read baseline), so that all of them see the
//! same background load; each call follows calls on other weights (every weight here is larger
//! than the 32 MB L3), so no call finds its weight in the caches. Prints the best and worst wall
//! time over the rounds, and GB/s (weight bytes, 4·in·out) and GFLOP/s (2·m·in·out) at the best
//! time.

mod common;

use std::time::Instant;

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use gemma4_kernels::cpu_dense::{dense_matmul_nt_with, dense_matmul_with};
use gemma4_kernels::simd::Isa;
use gemma4_kernels::testing::Lcg;

use common::bench_read_bandwidth;

type Cpu = NdArray<f32, i32>;

/// (name, in, out) of the 31B text model (hidden 5376, 32 query heads; sliding layers: head_dim
/// 256, 16 KV heads; full layers: head_dim 512, 4 KV heads, V from k_proj).
const SHAPES: [(&str, usize, usize); 6] = [
    ("sliding q_proj", 5376, 8192),
    ("sliding k/v_proj", 5376, 4096),
    ("sliding o_proj", 8192, 5376),
    ("full q_proj", 5376, 16384),
    ("full k_proj", 5376, 2048),
    ("full o_proj", 16384, 5376),
];

fn random(rng: &mut Lcg, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_u32() >> 7) & 0xff_ffff) as f32 / (1u32 << 23) as f32 - 1.0)
        .collect()
}

/// Best and worst seconds of one configuration over the rounds.
#[derive(Clone, Copy)]
struct Range(f64, f64);

impl Range {
    fn new() -> Self {
        Range(f64::INFINITY, 0.0)
    }
    fn add(&mut self, s: f64) {
        self.0 = self.0.min(s);
        self.1 = self.1.max(s);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let ms: Vec<usize> = args
        .next()
        .map(|a| {
            a.split(',')
                .map(|v| v.parse().expect("m list: 1,16,256"))
                .collect()
        })
        .unwrap_or(vec![1, 16, 256]);
    let section = args.next().unwrap_or("all".into());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let isa = Isa::detect();
    if section == "all" || section == "dense" {
        dense(rounds, &ms, threads, isa);
    }
    if section == "all" || section == "nt" {
        nt(rounds, threads, isa);
    }
}

/// The LM head shape of the `nt` section: [vocab slice, hidden].
const NT_OUT: usize = 32768;
const NT_IN: usize = 5376;

/// y = x · Eᵀ, E `[NT_OUT, NT_IN]`, at m = 1 and 16: ours (and the read baseline) every round,
/// ndarray's transpose-then-matmul in the first round only (seconds per call).
fn nt(rounds: usize, threads: usize, isa: Isa) {
    let device = Default::default();
    let mut rng = Lcg::new(12);
    let e = random(&mut rng, NT_OUT * NT_IN);
    let et = Tensor::<Cpu, 2>::from_data(TensorData::new(e.clone(), [NT_OUT, NT_IN]), &device);
    let ms = [1usize, 16];
    let xs = random(&mut rng, 16 * NT_IN);
    let mut y = vec![0f32; 16 * NT_OUT];
    let (mut ours, mut nd) = ([Range::new(); 2], [Range::new(); 2]);
    let (mut read1, mut read_all) = (Range::new(), Range::new());
    for round in 0..rounds.max(1) {
        read1.add(1.0 / bench_read_bandwidth(256 << 20, 1, 1));
        read_all.add(1.0 / bench_read_bandwidth(256 << 20, threads, 1));
        for (c, &m) in ms.iter().enumerate() {
            let x = &xs[..m * NT_IN];
            let t = Instant::now();
            dense_matmul_nt_with(isa, threads, x, m, &e, NT_OUT, NT_IN, &mut y[..m * NT_OUT]);
            ours[c].add(t.elapsed().as_secs_f64());
            if round == 0 {
                let xt =
                    Tensor::<Cpu, 2>::from_data(TensorData::new(x.to_vec(), [m, NT_IN]), &device);
                let t = Instant::now();
                let yt = xt.matmul(et.clone().transpose());
                nd[c].add(t.elapsed().as_secs_f64());
                std::hint::black_box(yt);
            }
        }
        eprintln!("nt round {} of {rounds} done", round + 1);
    }
    std::hint::black_box(&y);
    println!(
        "memory read (256 MB sum): 1 thread {:.1}-{:.1} GB/s, {threads} threads {:.1}-{:.1} GB/s ({rounds} rounds, worst-best)",
        1.0 / read1.1,
        1.0 / read1.0,
        1.0 / read_all.1,
        1.0 / read_all.0
    );
    println!(
        "LM head y = x · Eᵀ, E [{NT_OUT}, {NT_IN}] f32 ({} MB) read in place; ours: {isa:?}, {threads} threads; GB/s = 4·out·in bytes / best time",
        4 * NT_OUT * NT_IN / 1_000_000
    );
    for (c, &m) in ms.iter().enumerate() {
        let bytes = (4 * NT_OUT * NT_IN) as f64;
        let (o, d) = (ours[c], nd[c]);
        println!(
            "nt m {m:>2} | ours {:>8.2}-{:<8.2} ms {:>5.1} GB/s ({:.0}% of the {threads}-thread read best) | ndarray matmul(transpose) {:>9.2} ms {:>5.2} GB/s | {:>6.1}x",
            o.0 * 1e3,
            o.1 * 1e3,
            bytes / o.0 / 1e9,
            100.0 * (bytes / o.0 / 1e9) * read_all.0,
            d.0 * 1e3,
            bytes / d.0 / 1e9,
            d.0 / o.0
        );
    }
}

/// The attention projections, ours against ndarray, for each m.
fn dense(rounds: usize, ms: &[usize], threads: usize, isa: Isa) {
    let device = Default::default();

    let mut rng = Lcg::new(11);
    let weights: Vec<Vec<f32>> = SHAPES
        .iter()
        .map(|&(_, i, o)| random(&mut rng, i * o))
        .collect();
    let wt: Vec<Tensor<Cpu, 2>> = SHAPES
        .iter()
        .zip(&weights)
        .map(|(&(_, i, o), w)| Tensor::from_data(TensorData::new(w.clone(), [i, o]), &device))
        .collect();
    let max_m = *ms.iter().max().unwrap_or(&1);
    let xs = random(&mut rng, max_m * 16384);
    let mut y = vec![0f32; max_m * 16384];

    let n = SHAPES.len() * ms.len();
    let (mut ours, mut nd) = (vec![Range::new(); n], vec![Range::new(); n]);
    let (mut read1, mut read_all) = (Range::new(), Range::new());
    for round in 0..rounds.max(1) {
        let gbs = |t: usize| 1.0 / bench_read_bandwidth(256 << 20, t, 1);
        read1.add(gbs(1));
        read_all.add(gbs(threads));
        for (mi, &m) in ms.iter().enumerate() {
            for (si, &(_, inp, out)) in SHAPES.iter().enumerate() {
                let c = mi * SHAPES.len() + si;
                let x = &xs[..m * inp];
                let t = Instant::now();
                dense_matmul_with(
                    isa,
                    threads,
                    x,
                    m,
                    &weights[si],
                    inp,
                    out,
                    &mut y[..m * out],
                );
                ours[c].add(t.elapsed().as_secs_f64());
                let xt =
                    Tensor::<Cpu, 2>::from_data(TensorData::new(x.to_vec(), [m, inp]), &device);
                let t = Instant::now();
                let yt = xt.matmul(wt[si].clone());
                nd[c].add(t.elapsed().as_secs_f64());
                std::hint::black_box(yt);
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    std::hint::black_box(&y);

    // read1/read_all hold seconds per GB: best = highest bandwidth.
    println!(
        "memory read (256 MB sum): 1 thread {:.1}-{:.1} GB/s, {threads} threads {:.1}-{:.1} GB/s ({rounds} rounds, worst-best)",
        1.0 / read1.1,
        1.0 / read1.0,
        1.0 / read_all.1,
        1.0 / read_all.0
    );
    println!("ours: {isa:?}, {threads} threads; ndarray: burn-ndarray Tensor::matmul (matrixmultiply sgemm). GB/s = 4·in·out bytes / best time");
    println!(
        "{:<17} {:>5} {:>5} {:>4} | {:>19} {:>5} {:>6} | {:>19} {:>5} {:>6} | {:>7}",
        "shape",
        "in",
        "out",
        "m",
        "ours ms (best-worst)",
        "GB/s",
        "GFLOP/s",
        "ndarray ms",
        "GB/s",
        "GFLOP/s",
        "speedup"
    );
    for (mi, &m) in ms.iter().enumerate() {
        for (si, &(name, inp, out)) in SHAPES.iter().enumerate() {
            let c = mi * SHAPES.len() + si;
            let (bytes, flop) = ((4 * inp * out) as f64, (2 * m * inp * out) as f64);
            let (o, d) = (ours[c], nd[c]);
            println!(
                "{name:<17} {inp:>5} {out:>5} {m:>4} | {:>9.2}-{:<9.2} {:>5.1} {:>7.1} | {:>9.2}-{:<9.2} {:>5.2} {:>7.1} | {:>6.1}x",
                o.0 * 1e3,
                o.1 * 1e3,
                bytes / o.0 / 1e9,
                flop / o.0 / 1e9,
                d.0 * 1e3,
                d.1 * 1e3,
                bytes / d.0 / 1e9,
                flop / d.0 / 1e9,
                d.0 / o.0
            );
        }
    }
}
