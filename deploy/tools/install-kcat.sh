#!/usr/bin/env bash
# Installs kcat (Debian's `kcat` package) for the tests that produce records other clients cannot parse
# (tests/integration/test_unreadable_records.py). As root: `apt-get install kcat`. Otherwise: `apt-get
# download` of kcat and the libraries it needs that are not installed, unpacked with `dpkg-deb -x` into
# CACHE_DIR/kcat (the tests run it with LD_LIBRARY_PATH pointing there). Nothing is started or configured.
# Never fails the build: when it cannot install kcat it says why and exits 0, and the kcat tests skip
# (the same record is also sent without kcat).
#   usage: install-kcat.sh [CACHE_DIR]   (default .cache/tools)
set -uo pipefail

cache="${1:-.cache/tools}"
dest="$cache/kcat"

if command -v kcat >/dev/null 2>&1 || [ -x "$dest/usr/bin/kcat" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "tools: apt-get/dpkg-deb not found: kcat not installed; the kcat tests will skip" \
         "(install kcat, or put it on PATH)" >&2
    exit 0
fi

if [ "$(id -u)" = "0" ]; then
    mkdir -p "$cache" || exit 0
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat >/dev/null 2>"$cache/kcat-install.log"; then
        echo "tools: refreshing apt package lists (apt-get update)..." >&2
        apt-get update -qq >/dev/null 2>>"$cache/kcat-install.log" || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat >/dev/null 2>>"$cache/kcat-install.log" || true
    fi
    if command -v kcat >/dev/null 2>&1; then
        echo "tools: kcat installed ($(command -v kcat))" >&2
    else
        echo "tools: 'apt-get install kcat' failed (see $cache/kcat-install.log); the kcat tests will skip" >&2
    fi
    exit 0
fi

# not root: kcat and its missing libraries, unpacked into the cache
mkdir -p "$cache/deb-kcat" || exit 0
cd "$cache/deb-kcat" || exit 0
rm -f ./*.deb
packages="kcat"
for dep in $(apt-cache depends kcat 2>/dev/null | awk '/Depends:/ {print $2}' | grep -v '^<'); do
    dpkg -s "$dep" >/dev/null 2>&1 || packages="$packages $dep"
done
# shellcheck disable=SC2086
if ! apt-get download $packages >/dev/null 2>download.log; then
    echo "tools: 'apt-get download $packages' failed (see $cache/deb-kcat/download.log): kcat not installed;" \
         "the kcat tests will skip" >&2
    exit 0
fi
cd - >/dev/null || exit 0
rm -rf "$dest"
for deb in "$cache"/deb-kcat/*.deb; do
    dpkg-deb -x "$deb" "$dest" || true
done
rm -f "$cache"/deb-kcat/*.deb
libs="$(find "$dest/usr/lib" -maxdepth 1 -type d -name '*-linux-gnu' 2>/dev/null | tr '\n' ':')$dest/usr/lib"
if LD_LIBRARY_PATH="$libs" "$dest/usr/bin/kcat" -V >/dev/null 2>&1; then
    echo "tools: kcat unpacked at $dest/usr/bin/kcat" >&2
else
    echo "tools: the unpacked kcat does not run here; the kcat tests will skip" >&2
    rm -rf "$dest"
fi
exit 0
