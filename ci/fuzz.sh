#!/usr/bin/env bash
# Coverage-guided fuzzing of the wire decoders (native/fuzz, cargo-fuzz + libFuzzer) for a bounded
# time: every target in native/fuzz runs for FUZZ_SECONDS (default 60) starting from its committed
# corpus (native/fuzz/corpus/<target>), copied to a temporary folder so that the tree stays clean.
# Prints the executions and corpus size per target; exits non-zero on any crash, panic, leak of
# the buffer bound, timeout or out-of-memory, after printing the failing input.
#
# Toolchain: the machine's one (stable) Rust with RUSTC_BOOTSTRAP=1, which lets stable accept the
# -Z flags cargo-fuzz passes; no nightly is downloaded. Env knobs:
#   FUZZ_SECONDS    seconds per target (default 60)
#   FUZZ_TARGETS    space-separated targets (default: all of `cargo fuzz list`)
#   FUZZ_SANITIZER  none (default: the decoders are safe Rust) or address
#   FUZZ_KEEP_DIR   keep the grown corpus and any crash inputs in this folder (default: a temp dir
#                   removed at exit)
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_SANITIZER="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1

# libfuzzer-sys compiles libFuzzer's C++ sources.
if ! command -v c++ >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

if [[ -n "${FUZZ_KEEP_DIR:-}" ]]; then
    work="$FUZZ_KEEP_DIR"
    mkdir -p "$work"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi

# cargo-fuzz works from the crate that holds fuzz/.
cd native
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
# -O with -a: optimised, with debug assertions and overflow checks.
build_flags=(-O -a -s "$FUZZ_SANITIZER")
echo "fuzz: building $(echo $targets) (sanitizer $FUZZ_SANITIZER)"
cargo fuzz build "${build_flags[@]}" >"$work/build.log" 2>&1 || {
    cat "$work/build.log"
    exit 1
}

failed=()
summary=()
for t in $targets; do
    corpus="$work/corpus/$t"
    artifacts="$work/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    if [[ -d "fuzz/corpus/$t" ]]; then
        cp -R "fuzz/corpus/$t/." "$corpus/"
    fi
    start_n=$(find "$corpus" -type f | wc -l)
    log="$work/$t.log"
    echo "fuzz: $t for ${FUZZ_SECONDS}s from $start_n corpus inputs"
    rc=0
    cargo fuzz run "${build_flags[@]}" "$t" "$corpus" -- \
        -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    end_n=$(find "$corpus" -type f | wc -l)
    end_bytes=$(find "$corpus" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
    line="$t: ${execs:-?} executions in ${FUZZ_SECONDS}s, corpus $start_n -> $end_n inputs ($end_bytes bytes)"
    crashes=$(find "$artifacts" -type f | sort)
    if [[ $rc -ne 0 || -n "$crashes" ]]; then
        failed+=("$t")
        line="$line: FAILED (exit $rc)"
        echo "---- $t: last lines of the libFuzzer log ----"
        tail -n 60 "$log"
        for f in $crashes; do
            echo "---- $t: failing input $(basename "$f") (base64; reproduce with"
            echo "     base64 -d > crash && cargo fuzz run -O -a -s $FUZZ_SANITIZER $t crash) ----"
            base64 "$f"
        done
    fi
    echo "fuzz: $line"
    summary+=("$line")
done

echo "fuzz summary:"
printf '  %s\n' "${summary[@]}"
if [[ ${#failed[@]} -ne 0 ]]; then
    echo "fuzz: FAILED targets: ${failed[*]}"
    exit 1
fi
