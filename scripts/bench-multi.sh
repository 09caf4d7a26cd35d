#!/usr/bin/env bash
# The multi-process benchmark: caller, proxy and service as separate
# processes (direct, nginx grpc_pass, two nginx in a row, hub + agent as
# configured by default, with one thread each, and with the proxying
# agent). Installs nginx-light
# when the machine lacks it (the bench skips the nginx path without it),
# builds the release binaries and runs `backchannel-bench multi` with the
# arguments given (default: every path and workload, 3 rounds).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nginx-light >/dev/null \
      || echo "could not install nginx-light: the nginx path will be skipped" >&2
  else
    echo "no apt-get: install nginx for the reference path" >&2
  fi
fi

cargo build --release -p backchannel-cli -p backchannel-bench
exec target/release/backchannel-bench multi "$@"
