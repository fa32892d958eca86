//! `gemma4 check`: compares the engine on any device against a fixture's reference outputs
//! (transformers' logits and greedy continuations). The same comparison as the conformance
//! tests, as a command, so it runs on the GPU machine from the stripped binary.

use std::path::Path;

use anyhow::{bail, Result};
use gemma4_model::golden::{
    case_greedy, case_logits, load_reference, max_abs_diff, reference_logits,
};
use gemma4_model::{Gemma4Backend, Model};

pub fn check<B: Gemma4Backend>(m: &Model<B>, dir: &Path, tolerance: f32) -> Result<()> {
    if !dir.join("reference.json").exists() {
        bail!(
            "{} has no reference.json: not a conformance fixture",
            dir.display()
        );
    }
    let reference = load_reference(dir)?;
    let mut failures = 0;
    for case in &reference.cases {
        let (expected, _) = reference_logits(dir, &case.name)?;
        let (d, _) = max_abs_diff(&case_logits(&m.text, case)?, &expected);
        let greedy = case_greedy(&m.text, case)?;
        let ok = d <= tolerance && greedy == case.greedy_ids;
        failures += usize::from(!ok);
        println!(
            "{} {}: {} positions, max|Δlogit| {d:.2e} (tolerance {tolerance:.1e}), greedy {}",
            if ok { "PASS" } else { "FAIL" },
            case.name,
            case.sequence().len(),
            if greedy == case.greedy_ids {
                "identical".to_string()
            } else {
                format!("{greedy:?} != {:?}", case.greedy_ids)
            }
        );
    }
    if failures > 0 {
        bail!("{failures} of {} cases failed", reference.cases.len());
    }
    Ok(())
}
