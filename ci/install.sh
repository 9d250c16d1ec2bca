#!/usr/bin/env bash
# Install everything the tests need on a fresh machine: the Rust crate (built by maturin, crates
# fetched by cargo), the iris-fast package (Cython extension built by setup.py) and the test
# extras from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
# The power-loss and full-disk tests mount tests/lazyfs.py with FUSE: libfuse3 and fusermount3
# (Debian's fuse3). Without them those tests fail; they never skip.
if ! command -v fusermount3 >/dev/null || ! ldconfig -p | grep -q 'libfuse3\.so\.3'; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-3 >/dev/null
fi
python3 -m pip install --quiet --upgrade "pip>=23"
python3 -m pip install ./native '.[test]'
