//! NVFP4 matmul throughput on the CPU at the 31B MLP shapes, against a plain memory-read baseline
//! measured in the same run: `cargo run --release -p gemma4-kernels --example cpu_nvfp4_bench [rounds]`.

mod common;

fn main() {
    let rounds = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    common::bench_report(rounds);
}
