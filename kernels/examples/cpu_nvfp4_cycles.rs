//! Kernel cost in isolation: CPU time (from /proc/thread-self/schedstat, so other processes on a
//! shared machine do not count) per 128 weights of a cache-resident NVFP4 matmul, single thread.
//! `cargo run --release -p gemma4-kernels --example cpu_nvfp4_cycles`

use gemma4_kernels::nvfp4::cpu::nvfp4_matmul_with;
use gemma4_kernels::simd::Isa;

fn cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (out, inp) = if a.len() == 2 {
        (a[0], a[1])
    } else {
        (256usize, 2048usize)
    };
    let codes: Vec<i32> = (0..out * inp / 8)
        .map(|i| (i as i32).wrapping_mul(-1640531535))
        .collect();
    let scales: Vec<i32> = vec![0x38383838; out * gemma4_kernels::nvfp4::scale_words_per_row(inp)];
    let ms: Vec<usize> = std::env::var("MS")
        .map(|v| v.split(',').map(|a| a.parse().unwrap()).collect())
        .unwrap_or(vec![1, 4, 8, 16, 64]);
    for &m in &ms {
        let x: Vec<f32> = (0..m * inp).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut y = vec![0f32; m * out];
        for isa in Isa::available()
            .into_iter()
            .filter(|i| std::env::var("ISA").map_or(true, |v| format!("{i:?}") == v))
        {
            let reps = ((1usize << 29) / (m * out * inp)).clamp(5, 2000);
            nvfp4_matmul_with(isa, 1, &x, m, &codes, &scales, 0.5, out, inp, &mut y);
            let (t0, w0) = (cpu_ns(), std::time::Instant::now());
            for _ in 0..reps {
                nvfp4_matmul_with(isa, 1, &x, m, &codes, &scales, 0.5, out, inp, &mut y);
            }
            let cpu = (cpu_ns() - t0) as f64;
            let wall = w0.elapsed().as_nanos() as f64;
            let per = cpu / reps as f64;
            let macs = (m * out * inp) as f64;
            println!(
                "m {m:3} {:8}: {:8.1} us/call cpu ({:.0}% of wall), {:6.2} ns per 128 weights per x row, {:5.2} G MAC/s",
                format!("{isa:?}"),
                per / 1e3,
                100.0 * cpu / wall,
                per / (macs / 128.0),
                macs / per
            );
        }
    }
    std::hint::black_box(&codes);
}
