#!/usr/bin/env bash
# Install the Debian packages in scripts/system-packages.txt that are missing.
# Skips quietly when not root or not on a Debian-like system (e.g. macOS).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
command -v dpkg-query >/dev/null 2>&1 || exit 0
mapfile -t wanted < <(grep -vE '^\s*(#|$)' "$here/system-packages.txt")
missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "note: missing Debian packages (${missing[*]}); run as root to install them" >&2
  exit 0
fi
echo "installing Debian packages: ${missing[*]}" >&2
DEBIAN_FRONTEND=noninteractive apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
