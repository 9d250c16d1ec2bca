#!/usr/bin/env bash
# Install everything the tests need on a fresh machine: the Rust crate (built by maturin, crates
# fetched by cargo), the iris-fast package (Cython extension built by setup.py) and the test
# extras from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --upgrade "pip>=23"
python3 -m pip install ./native '.[test]'
