#!/usr/bin/env bash
# THE regeneration command for fixtures/ (run from anywhere):
#   bash conformance/fixtures_gen/run.sh [generate.py args]
# Uses the venv at $FIXTURES_VENV if set (must exist), else conformance/fixtures_gen/.venv
# (created if absent); pip-installs requirements.txt into it; runs generate.py, which rewrites
# <repo>/fixtures/ (and generate_vision.py, which rewrites fixtures/tiny-vision/). CPU only; a few
# minutes (most of it the first pip install).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"

if [[ -n "${FIXTURES_VENV:-}" ]]; then
    VENV="$FIXTURES_VENV"
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "FIXTURES_VENV=$VENV is not a venv (no $VENV/bin/python)" >&2
        exit 1
    fi
else
    VENV="$HERE/.venv"
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "creating venv $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi

"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"

cd "$REPO"
# One CPU thread for bit-reproducible calibration and reference numbers.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES="" PYTHONHASHSEED=0
"$VENV/bin/python" "$HERE/generate.py" "$@"
"$VENV/bin/python" "$HERE/generate_vision.py"  # fixtures/tiny-vision: vision tower, images, processor reference
exec "$VENV/bin/python" "$HERE/chat_renders.py"  # fixtures/chat/cases.json: reference chat-template renders
