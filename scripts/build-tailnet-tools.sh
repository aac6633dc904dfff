#!/bin/sh
# Build the pinned real-tailnet programs (headscale, tailscaled, tailscale) from
# tools/tailnet/go.mod into a per-version cache dir, once per machine.
# Prints the bin dir on stdout. Needs Go (1.26+) and the Go module proxy.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
mod="$here/tools/tailnet"
command -v go >/dev/null 2>&1 || { echo "build-tailnet-tools: Go is not installed (need 1.26+)" >&2; exit 1; }
hash=$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-16)
cache="${LMLINK_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmlink/tailnet-tools}"
bin="$cache/$hash/bin"
if [ -x "$bin/headscale" ] && [ -x "$bin/tailscaled" ] && [ -x "$bin/tailscale" ]; then
    echo "$bin"; exit 0
fi
mkdir -p "$cache/$hash"
tmp=$(mktemp -d "$cache/$hash/build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
echo "build-tailnet-tools: building headscale, tailscaled, tailscale (first time only, several minutes)..." >&2
# CGO off: pure-Go builds, no C toolchain needed; -trimpath keeps paths out of binaries.
(cd "$mod" && CGO_ENABLED=0 nice go build -trimpath -o "$tmp/" \
    github.com/juanfont/headscale/cmd/headscale \
    tailscale.com/cmd/tailscaled \
    tailscale.com/cmd/tailscale)
rm -rf "$bin"; mv "$tmp" "$bin"; trap - EXIT
echo "build-tailnet-tools: built in $(( $(date +%s) - start ))s into $bin" >&2
echo "$bin"
