//! Golden-output conformance tests (test-only: nothing outside the tests depends on this crate).
//! The fixtures under `fixtures/` were made by transformers 5.23.0 and nvidia-modelopt 0.47.0
//! (`conformance/fixtures_gen/`); their reference format, the comparison and the per-dtype
//! tolerances are `gemma4_model::golden` (shared with `gemma4 check`). This crate finds the
//! fixtures.

use std::path::{Path, PathBuf};

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Fixture directories that carry reference outputs, sorted by name.
pub fn fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.json").exists())
        .collect();
    dirs.sort();
    dirs
}

/// Fixture directories with multimodal reference cases.
pub fn vision_fixtures() -> Vec<PathBuf> {
    fixtures()
        .into_iter()
        .filter(|d| {
            std::fs::read_to_string(d.join("reference.json"))
                .is_ok_and(|t| t.contains("\"multimodal_cases\""))
        })
        .collect()
}

pub fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}
