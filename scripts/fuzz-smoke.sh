#!/usr/bin/env bash
# Short fuzz pass for CI: every target in fuzz/ for SECONDS_PER_TARGET
# seconds (default 30) on its stored corpus (fuzz/corpus/<target>, which is
# not modified: new inputs go to a scratch directory). Installs the nightly
# toolchain and cargo-fuzz if they are missing. Fails on the first finding;
# the reproducer is left in fuzz/artifacts/<target>/.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs="${SECONDS_PER_TARGET:-30}"
cd "$repo/fuzz"

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

for target in $(cargo +nightly fuzz list); do
  mkdir -p "$scratch/$target" "corpus/$target"
  echo "fuzz-smoke: $target for ${secs}s"
  cargo +nightly fuzz run -O "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)|panicked|ERROR|SUMMARY' || true
  # cargo fuzz's exit status is lost in the pipe: check for a reproducer.
  if compgen -G "artifacts/$target/*" >/dev/null; then
    echo "fuzz-smoke: $target found a failure: $(ls artifacts/"$target")" >&2
    exit 1
  fi
done
echo "fuzz-smoke: all targets clean"
