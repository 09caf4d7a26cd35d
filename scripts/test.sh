#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what the tests
# need and the machine lacks (the Go interop peer's Debian packages, Python's
# grpcio for the non-Rust client test), then the whole cargo test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# Go peer for the interop tests (Debian packages, offline GOPATH build).
bash tests/interop/go/build.sh

# A client that is not written in Rust, for the sidecar tests.
if ! python3 -c 'import grpc' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check grpcio
fi

# Debian packages the tests use: a real Redis for the cluster tests
# (tests/cluster.rs starts its own redis-server on a free loopback port),
# a real OpenSSH client and server, and socat, for the tunnel tests.
missing=()
for p in redis-server openssh-client openssh-server socat; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Release build: the suite moves hundreds of MiB through yamux.
cargo test --workspace --release "$@"
