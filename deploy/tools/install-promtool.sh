#!/usr/bin/env bash
# Installs promtool (Debian's `prometheus` package) into a cache directory without installing the
# package: `apt-get download` + `dpkg-deb -x` fetch and unpack it, nothing is started or configured.
# Never fails the build: without apt-get (or without a package list) it says why and exits 0, and the
# tests that need promtool skip with the same reason.
#   usage: install-promtool.sh [CACHE_DIR]   (default .cache/tools)
set -uo pipefail

cache="${1:-.cache/tools}"
dest="$cache/prometheus"
promtool="$dest/usr/bin/promtool"

if [ -x "$promtool" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "tools: apt-get/dpkg-deb not found: promtool not installed; the promtool tests will skip" \
         "(install Debian's 'prometheus' package or put promtool on PATH)" >&2
    exit 0
fi

mkdir -p "$cache/deb" || exit 0
cd "$cache/deb" || exit 0
rm -f prometheus_*.deb
if ! apt-get download prometheus >/dev/null 2>download.log; then
    # a fresh machine may have no package lists yet; refreshing them needs root
    if [ "$(id -u)" = "0" ]; then
        echo "tools: refreshing apt package lists (apt-get update)..." >&2
        apt-get update -qq >/dev/null 2>>download.log || true
        apt-get download prometheus >/dev/null 2>>download.log || true
    fi
fi
deb="$(ls prometheus_*.deb 2>/dev/null | head -n 1)"
if [ -z "$deb" ]; then
    echo "tools: 'apt-get download prometheus' failed (see $cache/deb/download.log):" \
         "promtool not installed; the promtool tests will skip" >&2
    tail -n 3 download.log >&2 || true
    exit 0
fi
cd - >/dev/null || exit 0
rm -rf "$dest"
if dpkg-deb -x "$cache/deb/$deb" "$dest" && "$promtool" --version >/dev/null 2>&1; then
    echo "tools: promtool installed at $promtool" >&2
else
    echo "tools: unpacking $deb did not give a working promtool; the promtool tests will skip" >&2
fi
rm -f "$cache/deb/$deb"
exit 0
