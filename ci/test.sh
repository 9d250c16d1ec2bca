#!/usr/bin/env bash
# The project's test command (the README's): Rust unit and property tests, then the Python suite
# against real server processes. Benchmarks (bench/) are not part of it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
cargo test --workspace --quiet
# `pytest`, not `python -m pytest`: the latter puts the source tree ahead of the installed
# package, whose compiled Cython module the source tree does not contain.
pytest -q "$@"
