//! `gemma4 check`: compares the engine on any device against a fixture's reference outputs
//! (transformers' logits and greedy continuations). The same comparison as the conformance
//! tests, as a command, so it runs on the GPU machine from the stripped binary.

use std::path::Path;

use anyhow::{bail, Result};
use burn::prelude::*;
use gemma4_conformance::{load_reference, max_abs_diff, reference_logits};
use gemma4_model::{generate, GenerateRequest, KvCache, Logits, Model, SamplingParams};

pub fn check<B: Backend>(m: &Model<B>, dir: &Path, tolerance: f32) -> Result<()> {
    if !dir.join("reference.json").exists() {
        bail!("{} has no reference.json: not a conformance fixture", dir.display());
    }
    let reference = load_reference(dir);
    let mut failures = 0;
    for case in &reference.cases {
        let seq: Vec<u32> = case.prompt_ids.iter().chain(&case.greedy_ids).copied().collect();
        let (expected, _) = reference_logits(dir, &case.name);
        let mut cache = KvCache::new(&m.text);
        let got = m.text.forward(&seq, &mut cache, Logits::All)?.into_data().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let (d, _) = max_abs_diff(&got, &expected);
        let req = GenerateRequest {
            prompt: case.prompt_ids.clone(),
            max_new_tokens: case.greedy_ids.len(),
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            suppress_ids: vec![],
            max_len: usize::MAX,
        };
        let greedy = generate(&m.text, &req, |_| {})?.tokens;
        let ok = d <= tolerance && greedy == case.greedy_ids;
        failures += usize::from(!ok);
        println!(
            "{} {}: {} positions, max|Δlogit| {d:.2e} (tolerance {tolerance:.0e}), greedy {}",
            if ok { "PASS" } else { "FAIL" },
            case.name,
            seq.len(),
            if greedy == case.greedy_ids { "identical".to_string() } else { format!("{greedy:?} != {:?}", case.greedy_ids) }
        );
    }
    if failures > 0 {
        bail!("{failures} of {} cases failed", reference.cases.len());
    }
    Ok(())
}
