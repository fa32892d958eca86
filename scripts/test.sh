#!/usr/bin/env bash
# The project's test command (README): Rust tests, then the official `openai` Python client
# against the real `gemma4 serve` binary and the same server over the scripted test model. Needs the
# Rust toolchain and python3 (PyPI for the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}"

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The product binary and the scripted test server (server/examples/scripted_serve.rs) with the
# tests' feature set: `cargo test` built both already, so this compiles nothing (a `-p` build, or
# one without --examples, would resolve features anew and rebuild).
cargo build --workspace --bins --examples

VENV="${TEST_VENV:-.venv-test}"
REQS=conformance/openai_client/requirements.txt
# (Re)installs when the requirements changed since the venv was made (a copy is kept in it).
if ! cmp -s "$REQS" "$VENV/requirements.txt"; then
    [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQS"
    cp "$REQS" "$VENV/requirements.txt"
fi
GEMMA4_BIN="$TARGET/debug/gemma4" GEMMA4_SCRIPTED_BIN="$TARGET/debug/examples/scripted_serve" \
    "$VENV/bin/pytest" -q conformance/openai_client
