//! The `gemma4` binary end to end on a bundled fixture.

use std::path::PathBuf;
use std::process::Command;

use gemma4_model::golden::{load_reference, max_abs_diff, reference_logits, Tolerances};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-31b-recipe")
}

fn gemma4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gemma4"))
        .args(args)
        .output()
        .expect("gemma4 runs")
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gemma4-cli-{}-{name}", std::process::id()))
}

#[test]
fn logits_writes_every_position_equal_to_reference() {
    let reference = load_reference(&fixture()).unwrap();
    let case = &reference.cases[0];
    let ids: Vec<String> = case
        .prompt_ids
        .iter()
        .chain(&case.greedy_ids)
        .map(u32::to_string)
        .collect();
    let out = tmp("logits.safetensors");
    let model = fixture();
    let o = gemma4(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &ids.join(","),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let got: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let (expected, shape) = reference_logits(&fixture(), &case.name).unwrap();
    assert_eq!(t.shape(), &shape[..]);
    let (d, _) = max_abs_diff(&got, &expected);
    assert!(d <= Tolerances::F32.logits, "max|Δ| {d}");
}

#[test]
fn generate_json_last_line_has_tokens_and_text() {
    let reference = load_reference(&fixture()).unwrap();
    let case = &reference.cases[1];
    let ids: Vec<String> = case.prompt_ids.iter().map(u32::to_string).collect();
    let model = fixture();
    let n = case.greedy_ids.len().to_string();
    let o = gemma4(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &ids.join(","),
        "--max-new-tokens",
        &n,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(last["tokens"].clone()).unwrap();
    // Greedy by default, no eos among the reference's tokens: the reference continuation.
    let stop = [1u32, 106, 50];
    let expected: Vec<u32> = match case.greedy_ids.iter().position(|t| stop.contains(t)) {
        Some(i) => case.greedy_ids[..=i].to_vec(),
        None => case.greedy_ids.clone(),
    };
    assert_eq!(tokens, expected);
    assert!(
        last["text"].is_string(),
        "text present with a tokenizer: {last}"
    );
}

#[test]
fn generate_from_prompt_text_and_seeded_sampling_is_reproducible() {
    let model = fixture();
    let run = || {
        let o = gemma4(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Hello world",
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.0",
            "--top-k",
            "64",
            "--top-p",
            "0.95",
            "--seed",
            "7",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .to_string()
    };
    assert_eq!(run(), run());
}

#[test]
fn works_without_tokenizer_and_refuses_prompt_text() {
    // A directory with only the configs and the weights.
    let dir = tmp("bare");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "hf_quant_config.json",
        "generation_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    let o = gemma4(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "2,200,300",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(last["tokens"].as_array().unwrap().len(), 3);
    assert!(last.get("text").is_none());
    let o = gemma4(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("tokenizer.json"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clear_errors_for_bad_input() {
    let model = fixture();
    let m = model.to_str().unwrap();
    // Token id outside the vocabulary.
    let o = gemma4(&["generate", "--model", m, "--tokens", "2,999999"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("outside the vocabulary"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Not a checkpoint directory.
    let o = gemma4(&["generate", "--model", "/nonexistent", "--tokens", "2"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("config.json"));
    // A device this build lacks is a clear error, not a crash.
    #[cfg(not(feature = "cuda"))]
    {
        let o = gemma4(&[
            "generate", "--model", m, "--tokens", "2", "--device", "cuda",
        ]);
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("--features cuda"));
    }
}

fn json_line(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON line")
}

#[test]
fn plan_is_consistent_and_refuses_what_does_not_fit() {
    let args = ["plan", "--preset", "31b", "--memory-gib", "80"];
    let bf16 = json_line(&gemma4(&args));
    let fp8 = json_line(&gemma4(&[&args[..], &["--kv-cache-dtype", "fp8"]].concat()));
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    for p in [&bf16, &fp8] {
        assert_eq!(
            n(p, "max_concurrency"),
            n(p, "kv_cache_bytes") / n(p, "kv_bytes_per_sequence")
        );
    }
    assert_eq!(
        n(&bf16, "kv_bytes_per_sequence"),
        2 * n(&fp8, "kv_bytes_per_sequence")
    );
    assert_eq!(bf16["blocks_per_sequence"]["sliding"], 1024 / 16 + 1);
    let o = gemma4(&["plan", "--preset", "31b", "--memory-gib", "16"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("exceed"));
}

#[test]
fn bench_sampling_prints_one_json_line() {
    let v = json_line(&gemma4(&[
        "bench-sampling",
        "--vocab",
        "4096",
        "--batch",
        "1,3",
        "--repeats",
        "1",
    ]));
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        for k in [
            "greedy_us",
            "generation_config_selection_us",
            "generation_config_full_sort_us",
        ] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
    }
}

#[test]
fn bench_prefix_reuses_the_earlier_turns() {
    let model = fixture();
    let v = json_line(&gemma4(&[
        "bench-prefix",
        "--model",
        model.to_str().unwrap(),
        "--system-tokens",
        "40",
        "--turns",
        "3",
        "--user-tokens",
        "8",
        "--answer-tokens",
        "4",
        "--block-size",
        "16",
    ]));
    let turns = v["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 3, "{v}");
    let cached = |t: &serde_json::Value| t["cached_tokens"].as_u64().unwrap();
    assert_eq!(cached(&turns[0]), 0, "{v}");
    for t in &turns[1..] {
        // Whole blocks of the earlier turns, the system prompt's two at least.
        assert!(cached(t) >= 32 && cached(t) % 16 == 0, "{t}");
        assert!(cached(t) < t["prompt_tokens"].as_u64().unwrap(), "{t}");
    }
    assert_eq!(v["same_outputs"], true, "{v}");
    assert!(v["hit_rate"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["cache_bytes_end"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn bench_structured_reports_mask_times_and_both_decode_rates() {
    let model = fixture();
    let v = json_line(&gemma4(&[
        "bench-structured",
        "--model",
        model.to_str().unwrap(),
        "--vocab",
        "4096",
        "--steps",
        "60",
        "--requests",
        "1",
        "--max-tokens",
        "8",
    ]));
    let mask = &v["mask"];
    assert_eq!(mask["vocab"], 4096, "{v}");
    assert!(mask["mask_us_p50"].as_f64().unwrap() > 0.0, "{v}");
    // The schema narrows the vocabulary: on average far fewer tokens are allowed than exist.
    assert!(mask["allowed_mean"].as_f64().unwrap() < 4096.0, "{v}");
    for run in ["free", "json_schema"] {
        assert_eq!(v["decode"][run]["tokens"], 7, "{v}");
        assert!(v["decode"][run]["tok_s"].as_f64().unwrap() > 0.0, "{v}");
    }
}
