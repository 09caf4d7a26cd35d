#!/usr/bin/env bash
# Builds the Go interop peer (tests/interop/go/gopeer) from Debian packages only, offline,
# in GOPATH mode. Usage: build.sh [OUTPUT] (default: <repo>/target/interop/gopeer).
# Installs the Debian packages if missing (one apt-get update, non-interactive); skips the
# build when OUTPUT is newer than every .go source and this script.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
out="${1:-$repo/target/interop/gopeer}"
src="$here/gopeer"
pkgs=(golang-go golang-github-hashicorp-yamux-dev golang-google-grpc-dev golang-google-protobuf-dev)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "build.sh: installing ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

export PATH="/usr/lib/go/bin:$PATH"
export GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS= GOTOOLCHAIN=local
export GOCACHE="${GOCACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/go-build}"

grpc_version="$(sed -n 's/^const Version = "\(.*\)"/\1/p' /usr/share/gocode/src/google.golang.org/grpc/version.go)"
yamux_version="$(dpkg-query -W -f='${Version}' golang-github-hashicorp-yamux-dev)"
echo "build.sh: $(go version); grpc-go $grpc_version; yamux $yamux_version" >&2

if [ -x "$out" ] && [ -z "$(find "$src" "$here/build.sh" -newer "$out" \( -name '*.go' -o -name build.sh \) -print -quit)" ]; then
  echo "build.sh: $out is up to date" >&2
  exit 0
fi
mkdir -p "$(dirname "$out")"
(cd "$src" && go build -o "$out.tmp.$$" .)
mv -f "$out.tmp.$$" "$out"
echo "build.sh: built $out" >&2
