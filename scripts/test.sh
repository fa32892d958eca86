#!/usr/bin/env bash
# The project's test command (README): Rust tests, then the official `openai` Python client
# against the real `gemma4 serve` binary. Needs the Rust toolchain and python3 (PyPI for the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}"

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# Same feature set as the tests (a `-p` build would resolve features anew and rebuild everything).
cargo build --workspace --bins

VENV="${TEST_VENV:-.venv-test}"
if [ ! -x "$VENV/bin/pytest" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r conformance/openai_client/requirements.txt
fi
GEMMA4_BIN="$TARGET/debug/gemma4" "$VENV/bin/pytest" -q conformance/openai_client
