#!/usr/bin/env bash
# Static checks: clippy with warnings as errors, ruff on the Python tree.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo clippy --workspace --all-targets --quiet -- -D warnings
python3 -m pip install --quiet "ruff>=0.5"
ruff check iris_fast tests bench
